"""HyFormer: non-sequential feature tokens decode the jagged history by target attention,
alternating with RankMixer query boosting, in one backbone (`structure="decoupled"`: decode once,
as a LONGER-style compressor in front of RankMixer)."""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from recray.data.jagged import Batch
from recray.data.schema import Schema
from recray.kernels import jagged_target_attention
from recray.models.layers import (
    FieldTokens,
    RankMixerBlock,
    RankMixerHparams,
    Tokenizer,
    common_dim,
    require_sequences,
)


class QueryDecoding(nn.Module):
    """Each of the T query tokens attends (softmax) over every sequence feature's jagged history;
    the decoded vectors, summed over sequences, are added to the queries: LN(x + sum O(attn))."""

    def __init__(self, sequences: list[str], seq_dim: int, dim: int, heads: int) -> None:
        super().__init__()
        self.heads, self.head_dim = heads, dim // heads
        self.query = nn.Linear(dim, dim)
        # Softmax ignores a score shift shared by all keys, so a key bias could never learn.
        self.key = nn.ModuleDict({s: nn.Linear(seq_dim, dim, bias=False) for s in sequences})
        self.value = nn.ModuleDict({s: nn.Linear(seq_dim, dim) for s in sequences})
        self.out = nn.Linear(dim, dim)
        self.norm = nn.LayerNorm(dim)

    def forward(
        self, x: torch.Tensor, sequences: dict[str, tuple[torch.Tensor, torch.Tensor]]
    ) -> torch.Tensor:
        batch, tokens, dim = x.shape
        shape = (-1, self.heads, self.head_dim)
        q = self.query(x).reshape(shape)
        # T queries per row share that row's history through query_to_seq, without copies.
        query_to_seq = torch.arange(batch, device=x.device).repeat_interleave(tokens)
        decoded = sum(
            jagged_target_attention(
                q, self.key[name](history).view(shape), self.value[name](history).view(shape),
                offsets, query_to_seq=query_to_seq,
            )
            for name, (history, offsets) in sequences.items()
        )  # fmt: skip
        return self.norm(x + self.out(decoded.reshape(batch, tokens, dim)))


class HyFormer(nn.Module):
    """Non-sequence features -> T RankMixer tokens (the queries); per layer: query decoding over
    the histories, then query boosting (token mixing + per-token FFN); logits = Linear(mean).

    `hybrid` decodes in every layer, so later layers query the history with tokens that have
    already mixed; `decoupled` decodes once before the first layer and then only mixes.
    """

    class Hparams(RankMixerHparams):
        """HyFormer hyperparameters: RankMixer's, plus the decoding heads and the structure."""

        heads: int = 2
        structure: Literal["hybrid", "decoupled"] = "hybrid"

    def __init__(self, schema: Schema, hparams: HyFormer.Hparams | None = None) -> None:
        super().__init__()
        hp = hparams or self.Hparams()
        require_sequences(schema, "hyformer")
        if hp.heads < 1 or hp.token_dim % hp.heads:
            raise ValueError(
                f"hyformer: heads={hp.heads} must be >= 1 and divide token_dim={hp.token_dim}"
            )
        self.fields = FieldTokens(schema, hp.field_dim or common_dim(schema), keep_sequences=True)
        self.tokenizer = Tokenizer(
            self.fields.num_tokens * self.fields.dim, hp.tokens, hp.token_dim, "hyformer"
        )
        names = [f.name for f in schema.sequence_features]
        decoders = hp.layers if hp.structure == "hybrid" else 1
        self.decoders = nn.ModuleList(
            QueryDecoding(names, self.fields.dim, hp.token_dim, hp.heads) for _ in range(decoders)
        )
        self.boosters = nn.ModuleList(
            RankMixerBlock(hp.tokens, hp.token_dim, hp.ffn_ratio, hp.experts)
            for _ in range(hp.layers)
        )
        self.head = nn.Linear(hp.token_dim, len(schema.labels))

    def forward(self, batch: Batch) -> torch.Tensor:
        fields, sequences = self.fields(batch)
        x = self.tokenizer(fields.flatten(1))
        for layer, boost in enumerate(self.boosters):
            if layer < len(self.decoders):
                x = self.decoders[layer](x, sequences)
            x = boost(x)
        return self.head(x.mean(1))
