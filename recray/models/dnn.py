"""DNN: concatenated field embeddings and dense features through an MLP."""

from __future__ import annotations

import torch
from torch import nn

from recray.data.jagged import Batch
from recray.data.schema import Schema
from recray.models.layers import MLP, FeatureEmbedding, MLPHparams


class DNN(nn.Module):
    """Logits = MLP(concat(pooled id fields, dense))."""

    class Hparams(MLPHparams):
        """DNN hyperparameters: only its MLP."""

    def __init__(self, schema: Schema, hparams: DNN.Hparams | None = None) -> None:
        super().__init__()
        hp = hparams or self.Hparams()
        self.embedding = FeatureEmbedding(schema)
        in_dim = self.embedding.output_dim + len(schema.dense_features)
        self.mlp = MLP(in_dim, hp.hidden, len(schema.labels), hp.dropout, hp.activation)

    def forward(self, batch: Batch) -> torch.Tensor:
        return self.mlp(torch.cat([*self.embedding.fields(batch.sparse), batch.dense], 1))
