"""MMoE (Ma et al. 2018): shared experts, one softmax gate and one tower per task."""

from __future__ import annotations

import torch
from pydantic import PositiveInt
from torch import nn

from recray.data.jagged import Batch
from recray.data.schema import Schema
from recray.models.layers import MLP, FeatureEmbedding, MLPHparams


class MMoE(nn.Module):
    """x = concat(fields, dense); for task t: logit_t = tower_t(sum_e softmax(G_t x)_e expert_e(x))."""

    class Hparams(MLPHparams):
        """MMoE hyperparameters: `hidden` is each expert's MLP, `tower` each task's."""

        experts: PositiveInt = 4
        tower: list[PositiveInt] = [32]

    def __init__(self, schema: Schema, hparams: MMoE.Hparams | None = None) -> None:
        super().__init__()
        hp = hparams or self.Hparams()
        self.embedding = FeatureEmbedding(schema)
        in_dim = self.embedding.output_dim + len(schema.dense_features)
        self.experts = nn.ModuleList(
            MLP(in_dim, hp.hidden, None, hp.dropout, hp.activation) for _ in range(hp.experts)
        )
        tasks = len(schema.labels)
        self.gates = nn.ModuleList(nn.Linear(in_dim, hp.experts) for _ in range(tasks))
        expert_dim = self.experts[0].out_dim
        self.towers = nn.ModuleList(
            MLP(expert_dim, hp.tower, 1, hp.dropout, hp.activation) for _ in range(tasks)
        )

    def forward(self, batch: Batch) -> torch.Tensor:
        x = torch.cat([*self.embedding.fields(batch.sparse), batch.dense], 1)
        experts = torch.stack([expert(x) for expert in self.experts], 1)
        return torch.cat(
            [
                tower(torch.einsum("be,bed->bd", gate(x).softmax(1), experts))
                for gate, tower in zip(self.gates, self.towers, strict=True)
            ],
            1,
        )
