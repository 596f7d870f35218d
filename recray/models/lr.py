"""Logistic regression: one learned scalar per id (per task) summed over fields, plus dense weights."""

from __future__ import annotations

import torch
from torch import nn

from recray.data.jagged import Batch
from recray.data.schema import Schema
from recray.models.layers import BaseHparams, FirstOrder


class LogisticRegression(nn.Module):
    """Logits = bias + sum of per-id weights + w . dense, one output per task."""

    class Hparams(BaseHparams):
        """Logistic regression has no hyperparameters."""

    def __init__(self, schema: Schema, hparams: LogisticRegression.Hparams | None = None) -> None:
        super().__init__()
        self.linear = FirstOrder(schema, len(schema.labels))

    def forward(self, batch: Batch) -> torch.Tensor:
        return self.linear(batch)
