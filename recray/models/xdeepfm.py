"""xDeepFM (Lian et al. 2018): linear part + Compressed Interaction Network (CIN) + DNN."""

from __future__ import annotations

import torch
from pydantic import PositiveInt
from torch import nn

from recray.data.jagged import Batch
from recray.data.schema import Schema
from recray.models.layers import MLP, FieldTokens, FirstOrder, MLPHparams, common_dim


class CIN(nn.Module):
    """X^{k+1}_h = sum_{i,j} W^k_{h,i,j} (X^k_i * X^0_j) (vector-wise, element-wise product);
    each layer's maps are sum-pooled over the embedding axis and concatenated."""

    def __init__(self, num_fields: int, layer_sizes: list[int]) -> None:
        super().__init__()
        sizes = [num_fields, *layer_sizes]
        self.compress = nn.ModuleList(
            nn.Linear(sizes[k] * num_fields, sizes[k + 1]) for k in range(len(layer_sizes))
        )
        self.out_dim = sum(layer_sizes)

    def forward(self, x0: torch.Tensor) -> torch.Tensor:
        batch, _, dim = x0.shape
        x, pooled = x0, []
        for compress in self.compress:
            outer = torch.einsum("bhd,bmd->bdhm", x, x0).reshape(batch, dim, -1)
            x = compress(outer).transpose(1, 2)
            pooled.append(x.sum(2))
        return torch.cat(pooled, 1)


class XDeepFM(nn.Module):
    """Logits = linear(x) + Linear(CIN(fields)) + MLP(flatten(fields))."""

    class Hparams(MLPHparams):
        """xDeepFM hyperparameters; `cin` lists the feature maps per CIN layer."""

        cin: list[PositiveInt] = [16, 16]
        field_dim: PositiveInt | None = None

    def __init__(self, schema: Schema, hparams: XDeepFM.Hparams | None = None) -> None:
        super().__init__()
        hp = hparams or self.Hparams()
        tasks = len(schema.labels)
        self.first_order = FirstOrder(schema, tasks)
        self.fields = FieldTokens(schema, hp.field_dim or common_dim(schema))
        self.cin = CIN(self.fields.num_tokens, hp.cin)
        self.cin_head = nn.Linear(self.cin.out_dim, tasks)
        flat = self.fields.num_tokens * self.fields.dim
        self.dnn = MLP(flat, hp.hidden, tasks, hp.dropout, hp.activation)

    def forward(self, batch: Batch) -> torch.Tensor:
        fields, _ = self.fields(batch)
        return (
            self.first_order(batch) + self.cin_head(self.cin(fields)) + self.dnn(fields.flatten(1))
        )
