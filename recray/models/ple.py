"""PLE (Tang et al. 2020): progressive layered extraction; per level, task-specific and shared
experts, each task gating its own and the shared ones, the shared gate all of them."""

from __future__ import annotations

import torch
from pydantic import PositiveInt
from torch import nn

from recray.data.jagged import Batch
from recray.data.schema import Schema
from recray.models.layers import MLP, FeatureEmbedding, MLPHparams


class ExtractionLevel(nn.Module):
    """One CGC level: inputs (one per task + a shared one) -> outputs of the same layout."""

    def __init__(
        self, in_dim: int, tasks: int, hp: PLE.Hparams, shared_output: bool
    ) -> None:
        super().__init__()
        per, shared = hp.task_experts, hp.shared_experts

        def experts(n: int) -> nn.ModuleList:
            return nn.ModuleList(
                MLP(in_dim, hp.hidden, None, hp.dropout, hp.activation) for _ in range(n)
            )

        self.task_experts = nn.ModuleList(experts(per) for _ in range(tasks))
        self.shared_experts = experts(shared)
        self.task_gates = nn.ModuleList(nn.Linear(in_dim, per + shared) for _ in range(tasks))
        # The last level's shared output feeds nothing, so it has no gate.
        self.shared_gate = (
            nn.Linear(in_dim, tasks * per + shared) if shared_output else None
        )
        self.out_dim = self.shared_experts[0].out_dim

    def forward(self, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
        *task_inputs, shared_input = inputs
        shared = [expert(shared_input) for expert in self.shared_experts]
        own = [
            [expert(x) for expert in group]
            for x, group in zip(task_inputs, self.task_experts, strict=True)
        ]
        outputs = [
            _mix(gate(x), [*mine, *shared])
            for x, gate, mine in zip(task_inputs, self.task_gates, own, strict=True)
        ]
        if self.shared_gate is not None:
            everything = [e for mine in own for e in mine] + shared
            outputs.append(_mix(self.shared_gate(shared_input), everything))
        return outputs


def _mix(gate_logits: torch.Tensor, experts: list[torch.Tensor]) -> torch.Tensor:
    return torch.einsum("be,bed->bd", gate_logits.softmax(1), torch.stack(experts, 1))


class PLE(nn.Module):
    """x = concat(fields, dense); `levels` extraction levels; logit_t = tower_t(task t's output)."""

    class Hparams(MLPHparams):
        """PLE hyperparameters: `hidden` is each expert's MLP, `tower` each task's."""

        levels: PositiveInt = 2
        task_experts: PositiveInt = 1
        shared_experts: PositiveInt = 2
        tower: list[PositiveInt] = [32]

    def __init__(self, schema: Schema, hparams: PLE.Hparams | None = None) -> None:
        super().__init__()
        hp = hparams or self.Hparams()
        self.embedding = FeatureEmbedding(schema)
        in_dim = self.embedding.output_dim + len(schema.dense_features)
        tasks = len(schema.labels)
        self.levels = nn.ModuleList()
        for level in range(hp.levels):
            self.levels.append(ExtractionLevel(in_dim, tasks, hp, level < hp.levels - 1))
            in_dim = self.levels[-1].out_dim
        self.towers = nn.ModuleList(
            MLP(in_dim, hp.tower, 1, hp.dropout, hp.activation) for _ in range(tasks)
        )

    def forward(self, batch: Batch) -> torch.Tensor:
        x = torch.cat([*self.embedding.fields(batch.sparse), batch.dense], 1)
        outputs = [x] * (len(self.towers) + 1)
        for level in self.levels:
            outputs = level(outputs)
        return torch.cat(
            [tower(out) for tower, out in zip(self.towers, outputs, strict=True)], 1
        )
