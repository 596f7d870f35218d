"""AutoInt (Song et al. 2019): stacked multi-head self-attention over field tokens; `plus` adds a
parallel MLP (AutoInt+)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import PositiveInt
from torch import nn

from recray.data.jagged import Batch
from recray.data.schema import Schema
from recray.models.layers import MLP, FieldTokens, MLPHparams, common_dim


class InteractingLayer(nn.Module):
    """ReLU(MultiHeadAttention(x) + W_res x): each field attends to every other field."""

    def __init__(self, in_dim: int, heads: int, head_dim: int) -> None:
        super().__init__()
        width = heads * head_dim
        self.project = nn.Linear(in_dim, width, bias=False)
        # No biases: the paper's W_Q, W_K, W_V are plain maps (and a key bias could not learn).
        self.attention = nn.MultiheadAttention(width, heads, bias=False, batch_first=True)
        self.residual = nn.Linear(in_dim, width, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        projected = self.project(x)
        attended, _ = self.attention(projected, projected, projected, need_weights=False)
        return F.relu(attended + self.residual(x))


class AutoInt(nn.Module):
    """Logits = Linear(flatten(interacting layers(fields))) [+ MLP(flatten(fields)) if plus]."""

    class Hparams(MLPHparams):
        """AutoInt hyperparameters; `hidden` is AutoInt+'s MLP, used only when `plus`."""

        attention_layers: PositiveInt = 3
        heads: PositiveInt = 2
        head_dim: PositiveInt = 16
        plus: bool = False
        field_dim: PositiveInt | None = None

    def __init__(self, schema: Schema, hparams: AutoInt.Hparams | None = None) -> None:
        super().__init__()
        hp = hparams or self.Hparams()
        self.fields = FieldTokens(schema, hp.field_dim or common_dim(schema))
        dims = [self.fields.dim] + [hp.heads * hp.head_dim] * hp.attention_layers
        self.interacting = nn.Sequential(
            *(InteractingLayer(d, hp.heads, hp.head_dim) for d in dims[:-1])
        )
        tasks = len(schema.labels)
        self.head = nn.Linear(self.fields.num_tokens * dims[-1], tasks)
        flat = self.fields.num_tokens * self.fields.dim
        self.dnn = MLP(flat, hp.hidden, tasks, hp.dropout, hp.activation) if hp.plus else None

    def forward(self, batch: Batch) -> torch.Tensor:
        fields, _ = self.fields(batch)
        logits = self.head(self.interacting(fields).flatten(1))
        return logits + self.dnn(fields.flatten(1)) if self.dnn is not None else logits
