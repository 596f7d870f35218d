"""DCN-v2 (Wang et al. 2021): a full-rank cross network and an MLP, stacked or in parallel."""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import PositiveInt
from torch import nn

from recray.data.jagged import Batch
from recray.data.schema import Schema
from recray.models.layers import MLP, CrossNetV2, FeatureEmbedding, MLPHparams


class DCNv2(nn.Module):
    """x0 = concat(fields, dense); stacked: MLP(cross(x0)); parallel: concat(cross(x0), MLP(x0))."""

    class Hparams(MLPHparams):
        """DCN-v2 hyperparameters."""

        cross_layers: PositiveInt = 3
        structure: Literal["stacked", "parallel"] = "stacked"

    def __init__(self, schema: Schema, hparams: DCNv2.Hparams | None = None) -> None:
        super().__init__()
        hp = hparams or self.Hparams()
        self.embedding = FeatureEmbedding(schema)
        width = self.embedding.output_dim + len(schema.dense_features)
        self.cross = CrossNetV2(width, hp.cross_layers)
        self.mlp = MLP(width, hp.hidden, None, hp.dropout, hp.activation)
        self.parallel = hp.structure == "parallel"
        self.head = nn.Linear(
            self.mlp.out_dim + (width if self.parallel else 0), len(schema.labels)
        )

    def forward(self, batch: Batch) -> torch.Tensor:
        x0 = torch.cat([*self.embedding.fields(batch.sparse), batch.dense], 1)
        if self.parallel:
            return self.head(torch.cat([self.cross(x0), self.mlp(x0)], 1))
        return self.head(self.mlp(self.cross(x0)))
