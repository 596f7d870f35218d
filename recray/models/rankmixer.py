"""RankMixer (Zhu et al. 2025): feature tokens, parameter-free token mixing, per-token FFNs or MoE."""

from __future__ import annotations

import torch
from torch import nn

from recray.data.jagged import Batch
from recray.data.schema import Schema
from recray.models.layers import (
    FieldTokens,
    RankMixerBlock,
    RankMixerHparams,
    Tokenizer,
    common_dim,
)


class RankMixer(nn.Module):
    """All features flattened and cut into T tokens; L blocks of token mixing + per-token FFN
    (`experts` > 0: a per-token sparse MoE with ReLU routing); logits = Linear(mean of tokens).

    The paper adds an L1 penalty on the ReLU gates to make routing sparser; the training loss is
    the platform's, so here sparsity comes from the ReLU alone.
    """

    class Hparams(RankMixerHparams):
        """RankMixer hyperparameters; `field_dim` defaults to the most common embedding dim."""

    def __init__(self, schema: Schema, hparams: RankMixer.Hparams | None = None) -> None:
        super().__init__()
        hp = hparams or self.Hparams()
        self.fields = FieldTokens(schema, hp.field_dim or common_dim(schema))
        self.tokenizer = Tokenizer(
            self.fields.num_tokens * self.fields.dim, hp.tokens, hp.token_dim, "rankmixer"
        )
        self.blocks = nn.Sequential(
            *(
                RankMixerBlock(hp.tokens, hp.token_dim, hp.ffn_ratio, hp.experts)
                for _ in range(hp.layers)
            )
        )
        self.head = nn.Linear(hp.token_dim, len(schema.labels))

    def forward(self, batch: Batch) -> torch.Tensor:
        fields, _ = self.fields(batch)
        tokens = self.blocks(self.tokenizer(fields.flatten(1)))
        return self.head(tokens.mean(1))
