"""DeepFM (Guo et al. 2017): linear part + factorization machine + DNN over shared field embeddings."""

from __future__ import annotations

import torch
from pydantic import PositiveInt
from torch import nn

from recray.data.jagged import Batch
from recray.data.schema import Schema
from recray.models.layers import (
    MLP,
    FactorizationMachine,
    FirstOrder,
    MLPHparams,
    SameDimFields,
    common_dim,
)


class DeepFM(nn.Module):
    """Logits = linear(x) + FM(fields) + MLP(fields); the FM term is shared by all tasks.

    FM needs one width for all fields: id features of another width are projected into it, and
    each dense feature becomes a field as its value times a learned vector.
    """

    class Hparams(MLPHparams):
        """DeepFM hyperparameters; `field_dim` defaults to the most common embedding dim."""

        field_dim: PositiveInt | None = None

    def __init__(self, schema: Schema, hparams: DeepFM.Hparams | None = None) -> None:
        super().__init__()
        hp = hparams or self.Hparams()
        dim = hp.field_dim or common_dim(schema)
        self.first_order = FirstOrder(schema, len(schema.labels))
        self.fields = SameDimFields(schema, dim)
        num_dense = len(schema.dense_features)
        self.dense_vectors = (
            nn.Parameter(torch.randn(num_dense, dim) / dim**0.5) if num_dense else None
        )
        self.fm = FactorizationMachine()
        num_fields = self.fields.num_fields + num_dense
        self.dnn = MLP(num_fields * dim, hp.hidden, len(schema.labels), hp.dropout, hp.activation)

    def forward(self, batch: Batch) -> torch.Tensor:
        fields = self.fields(batch.sparse)
        if self.dense_vectors is not None:
            fields = torch.cat([fields, batch.dense[:, :, None] * self.dense_vectors], 1)
        return self.first_order(batch) + self.fm(fields) + self.dnn(fields.flatten(1))
