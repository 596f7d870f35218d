"""MaskNet (Wang et al. 2021): instance-guided masks, computed from the embeddings, multiply the
hidden units of MaskBlocks, chained (serial) or side by side (parallel)."""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field, PositiveInt
from torch import nn

from recray.data.jagged import Batch
from recray.data.schema import Schema
from recray.models.layers import MLP, FeatureEmbedding, MLPHparams


class MaskBlock(nn.Module):
    """ReLU(LN(W (mask(e) * h))), with mask(e) = W2 ReLU(W1 e) from the raw embeddings e."""

    def __init__(self, embed_dim: int, in_dim: int, out_dim: int, reduction: float) -> None:
        super().__init__()
        self.mask = MLP(embed_dim, [max(1, round(reduction * embed_dim))], in_dim)
        self.hidden = nn.Linear(in_dim, out_dim, bias=False)
        self.norm = nn.LayerNorm(out_dim)

    def forward(self, embeddings: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        return F.relu(self.norm(self.hidden(self.mask(embeddings) * h)))


class MaskNet(nn.Module):
    """e = concat(fields, dense). serial: h = LN(e), then each block h = block(e, h), logits =
    MLP(h); parallel: every block reads LN(e), logits = MLP(concat of the blocks)."""

    class Hparams(MLPHparams):
        """MaskNet hyperparameters; `hidden` is the MLP after the blocks."""

        structure: Literal["serial", "parallel"] = "parallel"
        blocks: PositiveInt = 3
        block_dim: PositiveInt = 64
        reduction: float = Field(default=1.0, gt=0.0)

    def __init__(self, schema: Schema, hparams: MaskNet.Hparams | None = None) -> None:
        super().__init__()
        hp = hparams or self.Hparams()
        self.embedding = FeatureEmbedding(schema)
        width = self.embedding.output_dim + len(schema.dense_features)
        self.norm = nn.LayerNorm(width)
        self.serial = hp.structure == "serial"
        inputs = [width] + [hp.block_dim] * (hp.blocks - 1) if self.serial else [width] * hp.blocks
        self.blocks = nn.ModuleList(
            MaskBlock(width, d, hp.block_dim, hp.reduction) for d in inputs
        )
        out_in = hp.block_dim * (1 if self.serial else hp.blocks)
        self.mlp = MLP(out_in, hp.hidden, len(schema.labels), hp.dropout, hp.activation)

    def forward(self, batch: Batch) -> torch.Tensor:
        e = torch.cat([*self.embedding.fields(batch.sparse), batch.dense], 1)
        if self.serial:
            h = self.norm(e)
            for block in self.blocks:
                h = block(e, h)
            return self.mlp(h)
        normed = self.norm(e)
        return self.mlp(torch.cat([block(e, normed) for block in self.blocks], 1))
