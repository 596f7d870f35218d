"""DLRM (Naumov et al. 2019): bottom MLP on dense, pairwise dot products with the embeddings, top MLP."""

from __future__ import annotations

import torch
from pydantic import PositiveInt
from torch import nn

from recray.data.jagged import Batch
from recray.data.schema import Schema
from recray.models.layers import MLP, MLPHparams, SameDimFields, common_dim


class DLRM(nn.Module):
    """Logits = top(concat(bottom(dense), dots between all pairs of [bottom(dense), fields])).

    The bottom MLP ends at the field width (`field_dim`, by default the most common embedding
    dim); id features of another width are projected into it.
    """

    class Hparams(MLPHparams):
        """DLRM hyperparameters: `hidden` is the top MLP, `bottom` the dense MLP's hidden widths."""

        bottom: list[PositiveInt] = [64]
        field_dim: PositiveInt | None = None

    def __init__(self, schema: Schema, hparams: DLRM.Hparams | None = None) -> None:
        super().__init__()
        hp = hparams or self.Hparams()
        dim = hp.field_dim or common_dim(schema)
        self.fields = SameDimFields(schema, dim)
        num_dense = len(schema.dense_features)
        self.bottom = (
            MLP(num_dense, [*hp.bottom, dim], activation=hp.activation) if num_dense else None
        )
        num_fields = self.fields.num_fields + (1 if num_dense else 0)
        # A lone field has no pair to interact with, so it interacts with itself.
        pairs = torch.triu_indices(num_fields, num_fields, offset=1 if num_fields > 1 else 0)
        self.register_buffer("pairs", pairs, persistent=False)
        top_in = (dim if num_dense else 0) + pairs.shape[1]
        self.top = MLP(top_in, hp.hidden, len(schema.labels), hp.dropout, hp.activation)

    def forward(self, batch: Batch) -> torch.Tensor:
        fields = self.fields(batch.sparse)
        top_in = []
        if self.bottom is not None:
            dense_out = self.bottom(batch.dense)
            fields = torch.cat([dense_out[:, None], fields], 1)
            top_in.append(dense_out)
        top_in.append(torch.bmm(fields, fields.transpose(1, 2))[:, self.pairs[0], self.pairs[1]])
        return self.top(torch.cat(top_in, 1))
