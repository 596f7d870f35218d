"""MDL: scenario and task tokens take part in the feature interaction (a transformer over feature
tokens); each task reads its logit off its own token, conditioned on the row's scenario."""

from __future__ import annotations

import torch
from pydantic import Field, PositiveInt
from torch import nn

from recray.data.jagged import Batch
from recray.data.schema import Schema
from recray.models.layers import BaseHparams, FieldTokens, common_dim


class MDL(nn.Module):
    """tokens = [feature tokens, scenario token, one token per task (task + scenario embedding)];
    L transformer layers; logit_t = w_t . LN(task token t).

    The scenario is a single-id sparse feature named by `scenario` (its vocabulary is the number
    of scenarios); without one every row is one scenario and only the task tokens remain.
    """

    class Hparams(BaseHparams):
        """MDL hyperparameters; `field_dim` (token width) defaults to the common embedding dim."""

        scenario: str | None = None
        layers: PositiveInt = 2
        heads: PositiveInt = 2
        ffn_ratio: PositiveInt = 2
        dropout: float = Field(default=0.0, ge=0.0, lt=1.0)
        field_dim: PositiveInt | None = None

    def __init__(self, schema: Schema, hparams: MDL.Hparams | None = None) -> None:
        super().__init__()
        hp = hparams or self.Hparams()
        dim = hp.field_dim or common_dim(schema)
        if dim % hp.heads:
            raise ValueError(f"mdl: heads={hp.heads} must divide the token width {dim}")
        self.scenario = hp.scenario
        num_scenarios = 1
        if hp.scenario is not None:
            sparse = {f.name: f for f in schema.sparse_features}
            if hp.scenario not in sparse:
                raise ValueError(
                    f"mdl: scenario={hp.scenario!r} is not a sparse feature; sparse features "
                    f"are {list(sparse)}"
                )
            num_scenarios = sparse[hp.scenario].num_embeddings
        self.fields = FieldTokens(schema, dim)
        self.scenarios = nn.Embedding(num_scenarios, dim)
        self.tasks = nn.Parameter(torch.randn(len(schema.labels), dim) / dim**0.5)
        # bias=False: a key bias is a score shift softmax ignores, so it could never learn.
        layer = nn.TransformerEncoderLayer(
            dim, hp.heads, hp.ffn_ratio * dim, hp.dropout, batch_first=True, norm_first=True,
            bias=False,
        )  # fmt: skip
        self.interaction = nn.TransformerEncoder(layer, hp.layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)
        self.heads = nn.Parameter(torch.randn(len(schema.labels), dim) / dim**0.5)
        self.bias = nn.Parameter(torch.zeros(len(schema.labels)))

    def _scenario_ids(self, batch: Batch) -> torch.Tensor:
        if self.scenario is None:
            return torch.zeros(len(batch), dtype=torch.long, device=batch.labels.device)
        ids = batch.sparse[self.scenario]
        if ids.values().numel() != len(batch) or bool((ids.lengths() != 1).any()):
            raise ValueError(f"mdl: scenario feature {self.scenario!r} needs exactly one id a row")
        return ids.values()

    def forward(self, batch: Batch) -> torch.Tensor:
        fields, _ = self.fields(batch)
        scenario = self.scenarios(self._scenario_ids(batch))
        tasks = self.tasks + scenario[:, None]
        x = self.interaction(torch.cat([fields, scenario[:, None], tasks], 1))
        task_states = self.norm(x[:, -self.tasks.shape[0]:])
        return (task_states * self.heads).sum(2) + self.bias
