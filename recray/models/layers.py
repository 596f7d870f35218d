"""Layers the model zoo shares: TorchRec feature embeddings, tokens, MLP, cross nets, FM, RankMixer."""

from __future__ import annotations

from collections import Counter
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, PositiveInt, model_validator
from torch import nn
from torchrec.modules.embedding_configs import EmbeddingBagConfig, EmbeddingConfig, PoolingType
from torchrec.modules.embedding_modules import EmbeddingBagCollection, EmbeddingCollection
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from recray.data.jagged import Batch
from recray.data.schema import Feature, Schema

ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU, "tanh": nn.Tanh}
DEFAULT_FIELD_DIM = 16  # field width for FM/DLRM on a schema without id features


class BaseHparams(BaseModel):
    """Base of every model's hyperparameters: unknown names are errors, not silently ignored."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class MLPHparams(BaseHparams):
    """Hyperparameters of a model's MLP."""

    hidden: list[PositiveInt] = [128, 64]
    dropout: float = Field(default=0.0, ge=0.0, lt=1.0)
    activation: Literal["relu", "gelu", "silu", "tanh"] = "relu"


def segment_pool(values: torch.Tensor, lengths: torch.Tensor, pooling: str) -> torch.Tensor:
    """Jagged `values [T, D]` with `lengths [B]` -> `[B, D]` sum or mean; an empty row gives zeros."""
    lengths = lengths.long()
    rows = torch.repeat_interleave(torch.arange(lengths.numel(), device=values.device), lengths)
    pooled = values.new_zeros(lengths.numel(), values.shape[1]).index_add(0, rows, values)
    if pooling == "mean":
        pooled = pooled / lengths.clamp(min=1).unsqueeze(1).to(values.dtype)
    return pooled


class FeatureEmbedding(nn.Module):
    """Every id feature of a schema -> pooled vectors and jagged sequences; one table per table_name.

    Tables used only by sparse features of one pooling live in a pooled `EmbeddingBagCollection`.
    Tables that a sequence feature uses (or whose sparse features pool differently) live in an
    unpooled `EmbeddingCollection`, one per embedding dim since TorchRec wants one dim per EC, and
    the sparse features on them are pooled here. Both are plain TorchRec modules, so
    `DistributedModelParallel` can shard them; pass `device=torch.device("meta")` for that.
    """

    def __init__(self, schema: Schema, device: torch.device | str | None = None) -> None:
        super().__init__()
        device = torch.device(device) if device is not None else None
        by_table: dict[str, list[Feature]] = {}
        for f in schema.id_features:
            by_table.setdefault(f.table_name, []).append(f)
        bag_tables: list[EmbeddingBagConfig] = []
        unpooled_by_dim: dict[int, list[EmbeddingConfig]] = {}
        self._pooled_here: dict[str, str] = {}
        for table, features in by_table.items():
            table_args = {
                "name": table,
                "num_embeddings": features[0].num_embeddings,
                "embedding_dim": features[0].embedding_dim,
                "feature_names": [f.name for f in features],
            }
            poolings = {f.pooling for f in features}
            if any(f.kind == "sequence" for f in features) or len(poolings) > 1:
                unpooled_by_dim.setdefault(table_args["embedding_dim"], []).append(
                    EmbeddingConfig(**table_args)
                )
                self._pooled_here.update(
                    {f.name: f.pooling for f in features if f.kind == "sparse"}
                )
            else:
                pooling = PoolingType.MEAN if poolings == {"mean"} else PoolingType.SUM
                bag_tables.append(EmbeddingBagConfig(**table_args, pooling=pooling))
        self.bags = EmbeddingBagCollection(bag_tables, device=device) if bag_tables else None
        self.unpooled = nn.ModuleDict(
            {
                f"dim{dim}": EmbeddingCollection(tables, device=device)
                for dim, tables in unpooled_by_dim.items()
            }
        )
        self.sparse_names = [f.name for f in schema.sparse_features]
        self.sequence_names = [f.name for f in schema.sequence_features]
        self.id_names = [f.name for f in schema.id_features]
        self.dims = {f.name: f.embedding_dim for f in schema.id_features}

    @property
    def output_dim(self) -> int:
        """Width of all fields concatenated."""
        return sum(self.dims.values())

    def forward(
        self, features: KeyedJaggedTensor
    ) -> tuple[dict[str, torch.Tensor], dict[str, tuple[torch.Tensor, torch.Tensor]]]:
        """-> (`{sparse name: [B, dim]}`, `{sequence name: (values [T, dim], offsets [B+1])}`).

        `features` may carry TorchRec's `inverse_indices` (a variable-batch KJT): they map each
        of the B rows to the row of each key that holds its ids (serving: one user's ids looked
        up once for all their candidates). The bags broadcast their output themselves; unpooled
        lookups are broadcast here, after the lookup, so every row gets its own ids' vectors.
        """
        pooled, sequences, rows = self._lookup(features)
        for name, (values, lengths) in sequences.items():
            if rows is not None:
                values, lengths = torch.ops.fbgemm.jagged_index_select(values, lengths, rows[name])
            sequences[name] = (values, F.pad(lengths.long().cumsum(0), (1, 0)))
        return pooled, sequences

    def fields(self, features: KeyedJaggedTensor) -> list[torch.Tensor]:
        """One `[B, dim]` field per id feature in schema order; sequences are mean-pooled (once
        per row of their key, then broadcast when `features` carries `inverse_indices`)."""
        pooled, sequences, rows = self._lookup(features)
        for name, (values, lengths) in sequences.items():
            vectors = segment_pool(values, lengths, "mean")
            pooled[name] = vectors if rows is None else vectors[rows[name]]
        return [pooled[name] for name in self.id_names]

    def _lookup(self, features: KeyedJaggedTensor) -> tuple[
        dict[str, torch.Tensor], dict[str, tuple[torch.Tensor, torch.Tensor]],
        dict[str, torch.Tensor] | None,
    ]:
        """-> (`{sparse: [B, dim]}`, `{sequence: (values, lengths)}` per row of its key, rows)."""
        pooled = self.bags(features).to_dict() if self.bags is not None else {}
        rows = _rows_per_key(features)
        sequences = {}
        for collection in self.unpooled.values():
            for name, jagged in collection(features).items():
                values, lengths = jagged.values(), jagged.lengths()
                if name in self._pooled_here:
                    vectors = segment_pool(values, lengths, self._pooled_here[name])
                    pooled[name] = vectors if rows is None else vectors[rows[name]]
                else:
                    sequences[name] = (values, lengths)
        return (
            {name: pooled[name] for name in self.sparse_names},
            {name: sequences[name] for name in self.sequence_names},
            rows,
        )


def _rows_per_key(features: KeyedJaggedTensor) -> dict[str, torch.Tensor] | None:
    """`{key: [B] row of that key for each batch row}` of a variable-batch KJT, else None."""
    inverse = features.inverse_indices_or_none()
    if inverse is None:
        return None
    keys, rows = inverse
    return dict(zip(keys, rows.long().unbind(), strict=True))


def common_dim(schema: Schema) -> int:
    """The embedding dim most id features have: the field width for models that need one."""
    dims = Counter(f.embedding_dim for f in schema.id_features)
    return dims.most_common(1)[0][0] if dims else DEFAULT_FIELD_DIM


class SameDimFields(nn.Module):
    """Id features as `[B, F, dim]` fields; a feature of another width gets its own bias-free Linear."""

    def __init__(self, schema: Schema, dim: int) -> None:
        super().__init__()
        self.embedding = FeatureEmbedding(schema)
        self.dim = dim
        self.projections = nn.ModuleDict(
            {
                name: nn.Linear(width, dim, bias=False)
                for name, width in self.embedding.dims.items()
                if width != dim
            }
        )

    @property
    def num_fields(self) -> int:
        return len(self.embedding.id_names)

    def forward(self, features: KeyedJaggedTensor) -> torch.Tensor:
        fields = [
            self.projections[name](field) if name in self.projections else field
            for name, field in zip(
                self.embedding.id_names, self.embedding.fields(features), strict=True
            )
        ]
        if not fields:
            return torch.zeros(features.stride(), 0, self.dim, device=features.values().device)
        return torch.stack(fields, 1)


class MLP(nn.Sequential):
    """Linear + activation (+ dropout) per hidden width, then an optional linear output layer."""

    def __init__(
        self,
        in_dim: int,
        hidden: list[int],
        out_dim: int | None = None,
        dropout: float = 0.0,
        activation: str = "relu",
    ) -> None:
        layers: list[nn.Module] = []
        for width in hidden:
            layers += [nn.Linear(in_dim, width), ACTIVATIONS[activation]()]
            if dropout:
                layers.append(nn.Dropout(dropout))
            in_dim = width
        if out_dim is not None:
            layers.append(nn.Linear(in_dim, out_dim))
        super().__init__(*layers)
        self.out_dim = out_dim if out_dim is not None else in_dim


class CrossNetV2(nn.Module):
    """DCN-v2 full-rank cross network: x_{l+1} = x0 * (W_l x_l + b_l) + x_l."""

    def __init__(self, dim: int, layers: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(dim, dim) for _ in range(layers))

    def forward(self, x0: torch.Tensor) -> torch.Tensor:
        x = x0
        for layer in self.layers:
            x = x0 * layer(x) + x
        return x


class FactorizationMachine(nn.Module):
    """Pairwise FM term by the sum-square trick: fields `[B, F, D]` -> `[B, 1]`."""

    def forward(self, fields: torch.Tensor) -> torch.Tensor:
        square_of_sum = fields.sum(1).pow(2)
        sum_of_squares = fields.pow(2).sum(1)
        return 0.5 * (square_of_sum - sum_of_squares).sum(1, keepdim=True)


class FirstOrder(nn.Module):
    """Linear part: a learned scalar per id and output summed over fields, plus a linear map of dense."""

    def __init__(self, schema: Schema, out_dim: int) -> None:
        super().__init__()
        # The per-id weights are embedding tables of width out_dim, so they shard like any table.
        scalar_schema = Schema(
            features=[
                f.model_copy(update={"embedding_dim": out_dim}) if f.is_id else f
                for f in schema.features
            ],
            labels=schema.labels,
        )
        self.weights = FeatureEmbedding(scalar_schema)
        num_dense = len(schema.dense_features)
        self.dense = nn.Linear(num_dense, out_dim, bias=False) if num_dense else None
        self.bias = nn.Parameter(torch.zeros(out_dim))

    def forward(self, batch: Batch) -> torch.Tensor:
        out = sum(self.weights.fields(batch.sparse), self.bias.expand(len(batch), -1))
        return out + self.dense(batch.dense) if self.dense is not None else out


class FieldTokens(nn.Module):
    """Every feature as one `dim`-wide token `[B, F, dim]`: id fields (a bias-free Linear where
    their width differs), then each dense value times a learned vector.

    Sequences are mean-pooled into a token, or with `keep_sequences` returned jagged (projected
    to `dim`) beside the tokens for the models that attend over them.
    """

    def __init__(self, schema: Schema, dim: int, keep_sequences: bool = False) -> None:
        super().__init__()
        self.embedding = FeatureEmbedding(schema)
        self.dim = dim
        self.keep_sequences = keep_sequences
        kept = set(self.embedding.sequence_names) if keep_sequences else set()
        self.token_names = [n for n in self.embedding.id_names if n not in kept]
        self.projections = nn.ModuleDict(
            {
                name: nn.Linear(width, dim, bias=False)
                for name, width in self.embedding.dims.items()
                if width != dim
            }
        )
        num_dense = len(schema.dense_features)
        self.dense_vectors = (
            nn.Parameter(torch.randn(num_dense, dim) / dim**0.5) if num_dense else None
        )
        self.num_tokens = len(self.token_names) + num_dense

    def _project(self, name: str, x: torch.Tensor) -> torch.Tensor:
        return self.projections[name](x) if name in self.projections else x

    def forward(
        self, batch: Batch
    ) -> tuple[torch.Tensor, dict[str, tuple[torch.Tensor, torch.Tensor]]]:
        """-> (tokens `[B, F, dim]`, `{sequence: (values [T, dim], offsets [B+1])}` if kept)."""
        pooled, sequences = self.embedding(batch.sparse)
        jagged = {}
        for name, (values, offsets) in sequences.items():
            if self.keep_sequences:
                jagged[name] = (self._project(name, values), offsets)
            else:
                pooled[name] = segment_pool(values, offsets[1:] - offsets[:-1], "mean")
        tokens = [self._project(name, pooled[name]) for name in self.token_names]
        stacked = (
            torch.stack(tokens, 1) if tokens else batch.dense.new_zeros(len(batch), 0, self.dim)
        )
        if self.dense_vectors is not None:
            stacked = torch.cat([stacked, batch.dense[:, :, None] * self.dense_vectors], 1)
        return stacked, jagged


def sequence_targets(schema: Schema, overrides: dict[str, str], model: str) -> dict[str, str]:
    """Sequence feature -> the sparse feature that is its candidate (target).

    By default the first sparse feature on the sequence's table (`item_id` for a `history` on
    table item_id); `overrides` names another.
    """
    sequence_names = [f.name for f in schema.sequence_features]
    sparse_names = [f.name for f in schema.sparse_features]
    for sequence, target in overrides.items():
        if sequence not in sequence_names:
            raise ValueError(
                f"targets: {sequence!r} is not a sequence feature; sequence features are "
                f"{sequence_names}"
            )
        if target not in sparse_names:
            raise ValueError(
                f"targets[{sequence!r}]: {target!r} is not a sparse feature; sparse features are "
                f"{sparse_names}"
            )
    targets = {}
    for sequence in schema.sequence_features:
        on_table = [f.name for f in schema.sparse_features if f.table_name == sequence.table_name]
        if sequence.name not in overrides and not on_table:
            raise ValueError(
                f"{model}: sequence feature {sequence.name!r} has no sparse feature on its table "
                f"{sequence.table_name!r} to attend from; pass targets={{{sequence.name!r}: "
                f"<one of {sparse_names}>}}"
            )
        targets[sequence.name] = overrides.get(sequence.name) or on_table[0]
    return targets


def require_sequences(schema: Schema, model: str) -> None:
    """A sequence model on a schema without a sequence feature is a configuration error."""
    if not schema.sequence_features:
        raise ValueError(
            f"{model}: needs a sequence feature (kind: sequence, e.g. the user's history); "
            f"the schema has only {[f.name for f in schema.features]}"
        )


class Tokenizer(nn.Module):
    """RankMixer tokenisation: a flat feature vector cut into `tokens` contiguous chunks (sizes
    differing by at most one), each projected to `dim` by its own Linear -> `[B, tokens, dim]`."""

    def __init__(self, in_dim: int, tokens: int, dim: int, model: str) -> None:
        super().__init__()
        if in_dim < tokens:
            raise ValueError(
                f"{model}: tokens={tokens} is more than the {in_dim} feature values to split "
                "into tokens; lower tokens"
            )
        self.sizes = [len(chunk) for chunk in torch.arange(in_dim).tensor_split(tokens)]
        self.projections = nn.ModuleList(nn.Linear(size, dim) for size in self.sizes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        chunks = x.split(self.sizes, 1)
        return torch.stack([p(c) for p, c in zip(self.projections, chunks, strict=True)], 1)


def token_mixing(x: torch.Tensor) -> torch.Tensor:
    """RankMixer's parameter-free mixing: each of T tokens is cut into T heads and new token h is
    head h of every token, concatenated; `[B, T, D]` -> `[B, T, D]` (needs D % T == 0)."""
    batch, tokens, dim = x.shape
    return x.view(batch, tokens, tokens, dim // tokens).transpose(1, 2).reshape(batch, tokens, dim)


class PerTokenFFN(nn.Module):
    """A separate two-layer GELU FFN per token; with `experts` > 0, per token a sparse MoE whose
    experts are mixed by ReLU routing (a gate that is exactly zero for the experts it switches
    off, instead of a softmax top-k)."""

    def __init__(self, tokens: int, dim: int, hidden: int, experts: int = 0) -> None:
        super().__init__()
        self.experts = experts
        shape = (tokens, experts) if experts else (tokens,)
        self.w_in = nn.Parameter(torch.randn(*shape, dim, hidden) / dim**0.5)
        self.b_in = nn.Parameter(torch.zeros(*shape, hidden))
        self.w_out = nn.Parameter(torch.randn(*shape, hidden, dim) / hidden**0.5)
        self.b_out = nn.Parameter(torch.zeros(*shape, dim))
        self.router = (
            nn.Parameter(torch.randn(tokens, dim, experts) / dim**0.5) if experts else None
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.router is None:
            h = F.gelu(torch.einsum("btd,tdh->bth", x, self.w_in) + self.b_in)
            return torch.einsum("bth,thd->btd", h, self.w_out) + self.b_out
        gates = F.relu(torch.einsum("btd,tde->bte", x, self.router))
        h = F.gelu(torch.einsum("btd,tedh->bteh", x, self.w_in) + self.b_in)
        out = torch.einsum("bteh,tehd->bted", h, self.w_out) + self.b_out
        return (gates.unsqueeze(-1) * out).sum(2)


class RankMixerBlock(nn.Module):
    """x = LN(x + TokenMixing(x)); x = LN(x + PerTokenFFN(x)) (Zhu et al. 2025, RankMixer)."""

    def __init__(self, tokens: int, dim: int, ffn_ratio: int, experts: int = 0) -> None:
        super().__init__()
        self.mix_norm = nn.LayerNorm(dim)
        self.ffn = PerTokenFFN(tokens, dim, ffn_ratio * dim, experts)
        self.ffn_norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.mix_norm(x + token_mixing(x))
        return self.ffn_norm(x + self.ffn(x))


class RankMixerHparams(BaseHparams):
    """Hyperparameters shared by the RankMixer backbone and the models built on it."""

    tokens: PositiveInt = 4
    token_dim: PositiveInt = 32
    layers: PositiveInt = 2
    ffn_ratio: PositiveInt = 2
    experts: int = Field(default=0, ge=0)
    field_dim: PositiveInt | None = None

    @model_validator(mode="after")
    def _heads_split_tokens(self) -> RankMixerHparams:
        # Token mixing cuts each token into `tokens` heads, so the width must divide evenly.
        if self.token_dim % self.tokens:
            raise ValueError(
                f"token_dim={self.token_dim} must be a multiple of tokens={self.tokens} "
                "(token mixing cuts each token into one head per token)"
            )
        return self
