"""Wide & Deep (Cheng et al. 2016): a linear (wide) part plus an MLP (deep) over the embeddings."""

from __future__ import annotations

import torch
from torch import nn

from recray.data.jagged import Batch
from recray.data.schema import Schema
from recray.models.layers import MLP, FeatureEmbedding, FirstOrder, MLPHparams


class WideDeep(nn.Module):
    """Logits = linear(x) + MLP(concat(fields, dense)), trained jointly."""

    class Hparams(MLPHparams):
        """Wide & Deep hyperparameters: only the deep part's MLP."""

    def __init__(self, schema: Schema, hparams: WideDeep.Hparams | None = None) -> None:
        super().__init__()
        hp = hparams or self.Hparams()
        self.wide = FirstOrder(schema, len(schema.labels))
        self.embedding = FeatureEmbedding(schema)
        in_dim = self.embedding.output_dim + len(schema.dense_features)
        self.deep = MLP(in_dim, hp.hidden, len(schema.labels), hp.dropout, hp.activation)

    def forward(self, batch: Batch) -> torch.Tensor:
        deep_in = torch.cat([*self.embedding.fields(batch.sparse), batch.dense], 1)
        return self.wide(batch) + self.deep(deep_in)
