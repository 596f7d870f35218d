"""MSN: a product-key memory (`product_key_topk`) retrieves per-sample parameters that modulate a
DNN backbone's first hidden layer."""

from __future__ import annotations

import torch
from pydantic import PositiveInt
from torch import nn

from recray.data.jagged import Batch
from recray.data.schema import Schema
from recray.kernels import product_key_topk
from recray.models.layers import ACTIVATIONS, MLP, FeatureEmbedding, MLPHparams


class MSN(nn.Module):
    """x = concat(fields, dense); (gamma, beta) = PKM(W_q x), the softmax-weighted sum of the
    top-k of keys_a x keys_b memory slots; h1 = act(W_1 x) * (1 + gamma) + beta;
    logits = MLP(h1).

    Each sample reads its own k of `memory_keys`^2 slots, so the memory holds many parameter
    sets at the compute of k.
    """

    class Hparams(MLPHparams):
        """MSN hyperparameters: the DNN backbone, and the memory's keys per half, key width, k."""

        memory_keys: PositiveInt = 16
        key_dim: PositiveInt = 32
        topk: PositiveInt = 8

    def __init__(self, schema: Schema, hparams: MSN.Hparams | None = None) -> None:
        super().__init__()
        hp = hparams or self.Hparams()
        if hp.key_dim % 2:
            raise ValueError(f"msn: key_dim={hp.key_dim} must be even (split into two halves)")
        if hp.topk > hp.memory_keys:
            raise ValueError(f"msn: topk={hp.topk} exceeds memory_keys={hp.memory_keys}")
        if not hp.hidden:
            raise ValueError("msn: hidden must name at least one layer for the memory to modulate")
        self.topk = hp.topk
        self.embedding = FeatureEmbedding(schema)
        in_dim = self.embedding.output_dim + len(schema.dense_features)
        width = hp.hidden[0]
        self.first = nn.Sequential(nn.Linear(in_dim, width), ACTIVATIONS[hp.activation]())
        self.query = nn.Sequential(nn.Linear(in_dim, hp.key_dim), nn.LayerNorm(hp.key_dim))
        half = hp.key_dim // 2
        self.keys_a = nn.Parameter(torch.randn(hp.memory_keys, half) / half**0.5)
        self.keys_b = nn.Parameter(torch.randn(hp.memory_keys, half) / half**0.5)
        # Small but not zero: zero values would leave the query and keys without a gradient.
        self.values = nn.Parameter(0.01 * torch.randn(hp.memory_keys**2, 2 * width))
        self.rest = MLP(width, hp.hidden[1:], len(schema.labels), hp.dropout, hp.activation)

    def forward(self, batch: Batch) -> torch.Tensor:
        x = torch.cat([*self.embedding.fields(batch.sparse), batch.dense], 1)
        memory = product_key_topk(self.query(x), self.keys_a, self.keys_b, self.values, self.topk)
        gamma, beta = memory.chunk(2, 1)
        return self.rest(self.first(x) * (1 + gamma) + beta)
