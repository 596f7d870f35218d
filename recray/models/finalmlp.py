"""FinalMLP (Mao et al. 2023): two MLP streams, each with its own gated feature selection, fused by
multi-head bilinear interaction."""

from __future__ import annotations

import torch
from pydantic import PositiveInt
from torch import nn

from recray.data.jagged import Batch
from recray.data.schema import Schema
from recray.models.layers import MLP, FeatureEmbedding, MLPHparams


class FeatureSelection(nn.Module):
    """x * 2 sigmoid(MLP(context)): a stream's view of the features, gated by a context (chosen id
    fields, or a learned vector when none are named)."""

    def __init__(self, in_dim: int, context: list[str], dims: dict[str, int], hidden: int) -> None:
        super().__init__()
        self.context = context
        width = sum(dims[name] for name in context) if context else hidden
        # Random, not zeros: a zero context would leave the gate's first layer without a gradient.
        self.learned = None if context else nn.Parameter(torch.randn(1, hidden))
        self.gate = MLP(width, [hidden], in_dim)

    def forward(self, x: torch.Tensor, fields: dict[str, torch.Tensor]) -> torch.Tensor:
        if self.learned is not None:
            context = self.learned.expand(len(x), -1)
        else:
            context = torch.cat([fields[name] for name in self.context], 1)
        return x * 2 * torch.sigmoid(self.gate(context))


class FinalMLP(nn.Module):
    """o_k = MLP_k(select_k(x)) for two streams; logits per head h of both outputs:
    b + w1.o1_h + w2.o2_h + o1_h^T W3 o2_h, summed over heads."""

    class Hparams(MLPHparams):
        """FinalMLP hyperparameters: `hidden` is stream 1's MLP, `hidden2` stream 2's."""

        hidden2: list[PositiveInt] = [128, 64]
        fusion_heads: PositiveInt = 1
        selection_hidden: PositiveInt = 64
        context1: list[str] = []
        context2: list[str] = []

    def __init__(self, schema: Schema, hparams: FinalMLP.Hparams | None = None) -> None:
        super().__init__()
        hp = hparams or self.Hparams()
        self.embedding = FeatureEmbedding(schema)
        dims = self.embedding.dims
        for field, context in (("context1", hp.context1), ("context2", hp.context2)):
            unknown = [name for name in context if name not in dims]
            if unknown:
                raise ValueError(
                    f"finalmlp: {field} names {unknown}, not id features; id features are "
                    f"{list(dims)}"
                )
        in_dim = self.embedding.output_dim + len(schema.dense_features)
        self.select1 = FeatureSelection(in_dim, hp.context1, dims, hp.selection_hidden)
        self.select2 = FeatureSelection(in_dim, hp.context2, dims, hp.selection_hidden)
        self.stream1 = MLP(in_dim, hp.hidden, None, hp.dropout, hp.activation)
        self.stream2 = MLP(in_dim, hp.hidden2, None, hp.dropout, hp.activation)
        heads = hp.fusion_heads
        for name, stream in (("hidden", self.stream1), ("hidden2", self.stream2)):
            if stream.out_dim % heads:
                raise ValueError(
                    f"finalmlp: fusion_heads={heads} must divide {name}'s output width "
                    f"{stream.out_dim}"
                )
        self.heads = heads
        tasks = len(schema.labels)
        self.linear1 = nn.Linear(self.stream1.out_dim, tasks)
        self.linear2 = nn.Linear(self.stream2.out_dim, tasks, bias=False)
        d1, d2 = self.stream1.out_dim // heads, self.stream2.out_dim // heads
        self.bilinear = nn.Parameter(torch.randn(heads, d1, d2, tasks) / (d1 * d2) ** 0.5)

    def forward(self, batch: Batch) -> torch.Tensor:
        pooled = self.embedding.fields(batch.sparse)
        x = torch.cat([*pooled, batch.dense], 1)
        fields = dict(zip(self.embedding.id_names, pooled, strict=True))
        o1 = self.stream1(self.select1(x, fields))
        o2 = self.stream2(self.select2(x, fields))
        h1 = o1.view(len(x), self.heads, -1)
        h2 = o2.view(len(x), self.heads, -1)
        bilinear = torch.einsum("bhi,hijt,bhj->bt", h1, self.bilinear, h2)
        return self.linear1(o1) + self.linear2(o2) + bilinear
