"""DIN (Zhou et al. 2018): the candidate attends over the user's jagged history, never padded."""

from __future__ import annotations

import torch
from pydantic import PositiveInt
from torch import nn

from recray.data.jagged import Batch
from recray.data.schema import Schema
from recray.kernels import jagged_target_attention
from recray.models.layers import MLP, FeatureEmbedding, MLPHparams, sequence_targets


class DIN(nn.Module):
    """Per sequence feature: query = projected target embedding, keys = projected history,
    values = the history embeddings (per head); logits = MLP(concat(interests, fields, dense)).

    The target of a sequence is the first sparse feature on its table (`item_id` for a `history`
    on table item_id) unless `targets={sequence: sparse}` says otherwise.
    """

    class Hparams(MLPHparams):
        """DIN hyperparameters."""

        attention_heads: PositiveInt = 2
        attention_dim: PositiveInt = 16
        targets: dict[str, str] = {}

    def __init__(self, schema: Schema, hparams: DIN.Hparams | None = None) -> None:
        super().__init__()
        hp = hparams or self.Hparams()
        self.heads, self.head_dim = hp.attention_heads, hp.attention_dim
        self.embedding = FeatureEmbedding(schema)
        self.targets = sequence_targets(schema, hp.targets, "din")
        width = self.heads * self.head_dim
        dims = self.embedding.dims
        self.query = nn.ModuleDict({s: nn.Linear(dims[t], width) for s, t in self.targets.items()})
        # Softmax ignores a score shift shared by all keys, so a key bias could never learn.
        self.key = nn.ModuleDict({s: nn.Linear(dims[s], width, bias=False) for s in self.targets})
        in_dim = (
            sum(dims[name] for name in self.embedding.sparse_names)
            + sum(self.heads * dims[s] for s in self.targets)
            + len(schema.dense_features)
        )
        self.mlp = MLP(in_dim, hp.hidden, len(schema.labels), hp.dropout, hp.activation)

    def forward(self, batch: Batch) -> torch.Tensor:
        pooled, sequences = self.embedding(batch.sparse)
        interests = []
        for name, (history, offsets) in sequences.items():
            q = self.query[name](pooled[self.targets[name]]).view(-1, self.heads, self.head_dim)
            k = self.key[name](history).view(-1, self.heads, self.head_dim)
            v = history.unsqueeze(1).expand(-1, self.heads, -1)
            interests.append(jagged_target_attention(q, k, v, offsets).flatten(1))
        return self.mlp(torch.cat([*interests, *pooled.values(), batch.dense], 1))

