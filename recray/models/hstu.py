"""HSTU (Zhai et al. 2024): pointwise SiLU attention over the jagged history with the candidate
appended last, through `jagged_flash_attention(activation="silu")`; never padded."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import PositiveInt
from torch import nn

from recray.data.jagged import Batch
from recray.data.schema import Schema
from recray.kernels import jagged_flash_attention
from recray.models.layers import (
    MLP,
    FeatureEmbedding,
    MLPHparams,
    require_sequences,
    sequence_targets,
)


class HSTULayer(nn.Module):
    """U, V, Q, K = split(SiLU(W1 LN(x))); A = SiLU(QK^T)/n V (causal, jagged);
    x + W2(LN(A) * U)."""

    def __init__(self, dim: int, heads: int, head_dim: int, max_len: int) -> None:
        super().__init__()
        self.heads, self.head_dim, self.max_len = heads, head_dim, max_len
        width = heads * head_dim
        self.norm = nn.LayerNorm(dim)
        self.uvqk = nn.Linear(dim, 4 * width)
        self.attention_norm = nn.LayerNorm(width)
        self.out = nn.Linear(width, dim)

    def forward(self, x: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        u, v, q, k = F.silu(self.uvqk(self.norm(x))).chunk(4, 1)
        shape = (-1, self.heads, self.head_dim)
        attended = jagged_flash_attention(
            q.reshape(shape), k.reshape(shape), v.reshape(shape), offsets, self.max_len,
            causal=True, activation="silu",
        )  # fmt: skip
        return x + self.out(self.attention_norm(attended.flatten(1)) * u)


class HSTU(nn.Module):
    """Per sequence feature: tokens = [history (oldest first)..., candidate], each plus an
    embedding of its distance to the candidate (the relative position the candidate sees);
    L causal HSTU layers, so the history never sees the candidate and the candidate sees all of
    it; logits = MLP(concat(candidate's last state per sequence, fields, dense)).

    Only the latest `max_len - 1` history items are kept; `max_len` is also the SiLU attention's
    fixed normaliser, so a row's score never depends on the other rows of its batch. The
    kernel takes no attention bias, so the relative bias enters as the position embedding.
    """

    class Hparams(MLPHparams):
        """HSTU hyperparameters; `dim` is the token width, `max_len` counts the candidate."""

        dim: PositiveInt = 32
        layers: PositiveInt = 2
        heads: PositiveInt = 2
        head_dim: PositiveInt = 16
        max_len: PositiveInt = 256
        targets: dict[str, str] = {}

    def __init__(self, schema: Schema, hparams: HSTU.Hparams | None = None) -> None:
        super().__init__()
        hp = hparams or self.Hparams()
        require_sequences(schema, "hstu")
        if hp.max_len < 2:
            raise ValueError(f"hstu: max_len={hp.max_len} leaves no room for history")
        self.max_len = hp.max_len
        self.embedding = FeatureEmbedding(schema)
        self.targets = sequence_targets(schema, hp.targets, "hstu")
        dims = self.embedding.dims
        for sequence, target in self.targets.items():
            if dims[target] != dims[sequence]:
                raise ValueError(
                    f"hstu: targets[{sequence!r}]={target!r} has embedding_dim {dims[target]}, "
                    f"the sequence {dims[sequence]}; the candidate joins the sequence as a token"
                )
        self.inputs = nn.ModuleDict({s: nn.Linear(dims[s], hp.dim) for s in self.targets})
        self.positions = nn.ModuleDict(
            {s: nn.Embedding(hp.max_len, hp.dim) for s in self.targets}
        )
        self.stacks = nn.ModuleDict(
            {
                s: nn.ModuleList(
                    HSTULayer(hp.dim, hp.heads, hp.head_dim, hp.max_len) for _ in range(hp.layers)
                )
                for s in self.targets
            }
        )
        self.final_norm = nn.LayerNorm(hp.dim)
        in_dim = (
            hp.dim * len(self.targets)
            + sum(dims[name] for name in self.embedding.sparse_names)
            + len(schema.dense_features)
        )
        self.mlp = MLP(in_dim, hp.hidden, len(schema.labels), hp.dropout, hp.activation)

    def _with_candidate(
        self, history: torch.Tensor, offsets: torch.Tensor, candidate: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Latest history items + the candidate last -> (tokens, offsets, distance to the
        candidate per token, index of each candidate token), all jagged."""
        lengths = offsets[1:] - offsets[:-1]
        rows = torch.repeat_interleave(torch.arange(lengths.numel(), device=offsets.device), lengths)
        from_end = offsets[1:][rows] - torch.arange(history.shape[0], device=offsets.device)
        keep = from_end < self.max_len  # from_end is 1 for the latest item, the candidate is 0
        kept = lengths.clamp(max=self.max_len - 1) + 1
        new_offsets = F.pad(kept.cumsum(0), (1, 0))
        last = new_offsets[1:] - 1
        tokens = history.new_empty(int(new_offsets[-1]), history.shape[1])
        distance = torch.zeros(tokens.shape[0], dtype=torch.long, device=history.device)
        slots = last[rows[keep]] - from_end[keep]
        tokens[slots] = history[keep]
        distance[slots] = from_end[keep]
        tokens[last] = candidate
        return tokens, new_offsets, distance, last

    def forward(self, batch: Batch) -> torch.Tensor:
        pooled, sequences = self.embedding(batch.sparse)
        states = []
        for name, (history, offsets) in sequences.items():
            candidate = pooled[self.targets[name]]
            tokens, jagged_offsets, distance, last = self._with_candidate(
                history, offsets, candidate
            )
            x = self.inputs[name](tokens) + self.positions[name](distance)
            for layer in self.stacks[name]:
                x = layer(x, jagged_offsets)
            states.append(self.final_norm(x[last]))
        return self.mlp(torch.cat([*states, *pooled.values(), batch.dense], 1))
