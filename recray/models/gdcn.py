"""GDCN (Wang et al. 2023): a gated cross network, whose sigmoid gates keep only the useful
crosses, and an MLP, stacked or in parallel."""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import PositiveInt
from torch import nn

from recray.data.jagged import Batch
from recray.data.schema import Schema
from recray.models.layers import MLP, FeatureEmbedding, MLPHparams


class GatedCrossNet(nn.Module):
    """c_{l+1} = c_0 * (W_c c_l + b_c) * sigmoid(W_g c_l) + c_l."""

    def __init__(self, dim: int, layers: int) -> None:
        super().__init__()
        self.cross = nn.ModuleList(nn.Linear(dim, dim) for _ in range(layers))
        self.gates = nn.ModuleList(nn.Linear(dim, dim, bias=False) for _ in range(layers))

    def forward(self, c0: torch.Tensor) -> torch.Tensor:
        c = c0
        for cross, gate in zip(self.cross, self.gates, strict=True):
            c = c0 * cross(c) * torch.sigmoid(gate(c)) + c
        return c


class GDCN(nn.Module):
    """c0 = concat(fields, dense); stacked: MLP(GCN(c0)); parallel: concat(GCN(c0), MLP(c0))."""

    class Hparams(MLPHparams):
        """GDCN hyperparameters."""

        cross_layers: PositiveInt = 3
        structure: Literal["stacked", "parallel"] = "stacked"

    def __init__(self, schema: Schema, hparams: GDCN.Hparams | None = None) -> None:
        super().__init__()
        hp = hparams or self.Hparams()
        self.embedding = FeatureEmbedding(schema)
        width = self.embedding.output_dim + len(schema.dense_features)
        self.cross = GatedCrossNet(width, hp.cross_layers)
        self.mlp = MLP(width, hp.hidden, None, hp.dropout, hp.activation)
        self.parallel = hp.structure == "parallel"
        self.head = nn.Linear(
            self.mlp.out_dim + (width if self.parallel else 0), len(schema.labels)
        )

    def forward(self, batch: Batch) -> torch.Tensor:
        c0 = torch.cat([*self.embedding.fields(batch.sparse), batch.dense], 1)
        if self.parallel:
            return self.head(torch.cat([self.cross(c0), self.mlp(c0)], 1))
        return self.head(self.mlp(self.cross(c0)))
