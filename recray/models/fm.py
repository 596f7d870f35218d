"""FM (Rendle 2010): linear part + pairwise factorised interactions of all field embeddings."""

from __future__ import annotations

import torch
from pydantic import PositiveInt
from torch import nn

from recray.data.jagged import Batch
from recray.data.schema import Schema
from recray.models.layers import (
    BaseHparams,
    FactorizationMachine,
    FieldTokens,
    FirstOrder,
    common_dim,
)


class FM(nn.Module):
    """Logits = linear(x) + sum_{i<j} <v_i, v_j>; the pairwise term is shared by all tasks."""

    class Hparams(BaseHparams):
        """FM hyperparameters; `field_dim` defaults to the most common embedding dim."""

        field_dim: PositiveInt | None = None

    def __init__(self, schema: Schema, hparams: FM.Hparams | None = None) -> None:
        super().__init__()
        hp = hparams or self.Hparams()
        self.first_order = FirstOrder(schema, len(schema.labels))
        self.fields = FieldTokens(schema, hp.field_dim or common_dim(schema))
        self.fm = FactorizationMachine()

    def forward(self, batch: Batch) -> torch.Tensor:
        fields, _ = self.fields(batch)
        return self.first_order(batch) + self.fm(fields)
