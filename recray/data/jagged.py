"""Arrow record batches -> (dense tensor, TorchRec KeyedJaggedTensor, labels), zero-copy, never padded.

An Arrow list column already is a jagged tensor: an offsets buffer and a values buffer. We view
both as tensors with `torch.from_numpy` over the Arrow buffers (no copy), and build the KJT with
a single concatenation of all id features' values per batch. No per-row Python work anywhere.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from recray.data.schema import Feature, Schema, SchemaError

# Arrow buffers are immutable, so numpy views of them are read-only and torch warns on every
# from_numpy; we never write into these tensors (hashing and concatenation make new ones).
warnings.filterwarnings("ignore", message="The given NumPy array is not writable")


@dataclass
class Batch:
    """One mini-batch in the shared data model."""

    dense: torch.Tensor  # [B, n_dense] float32
    sparse: KeyedJaggedTensor  # one key per id feature, schema order
    labels: torch.Tensor  # [B, n_tasks] float32

    def __len__(self) -> int:
        return self.labels.shape[0]

    def to(self, device: torch.device | str, non_blocking: bool = False) -> Batch:
        return Batch(
            self.dense.to(device, non_blocking=non_blocking),
            self.sparse.to(torch.device(device), non_blocking=non_blocking),
            self.labels.to(device, non_blocking=non_blocking),
        )


def _is_list_of_int64(t: pa.DataType) -> bool:
    return (pa.types.is_list(t) or pa.types.is_large_list(t)) and pa.types.is_int64(t.value_type)


def _numeric(t: pa.DataType) -> bool:
    return pa.types.is_floating(t) or pa.types.is_integer(t) or pa.types.is_boolean(t)


def check_columns(schema_or_batch: pa.Schema, schema: Schema, source: str = "batch") -> None:
    """Every feature and label column exists with a usable Arrow type, else name the column."""
    names = set(schema_or_batch.names)
    for f in schema.features:
        if f.name not in names:
            raise SchemaError(f"{source}: missing column {f.name!r} (feature of kind {f.kind})")
        t = schema_or_batch.field(f.name).type
        if f.kind == "dense" and not _numeric(t):
            raise SchemaError(f"{source}: column {f.name!r} is {t}, expected float32 (dense)")
        if f.kind == "sparse" and not (pa.types.is_int64(t) or _is_list_of_int64(t)):
            raise SchemaError(
                f"{source}: column {f.name!r} is {t}, expected int64 or list<int64> (sparse)"
            )
        if f.kind == "sequence" and not _is_list_of_int64(t):
            raise SchemaError(f"{source}: column {f.name!r} is {t}, expected list<int64> (sequence)")
    for label in schema.labels:
        if label not in names:
            raise SchemaError(f"{source}: missing label column {label!r}")
        t = schema_or_batch.field(label).type
        if not _numeric(t):
            raise SchemaError(f"{source}: label column {label!r} is {t}, expected float32")


def _numpy_view(arr: pa.Array) -> np.ndarray:
    return arr.to_numpy(zero_copy_only=True, writable=False)


def _list_column(arr: pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """A `list<int64>` Arrow array -> (values, lengths) numpy arrays; `values` views Arrow memory.

    Offsets are read from the (possibly sliced) offsets, never from `arr.values`, which ignores
    the slice. A null list is an empty list; when nulls exist, `flatten()` drops any values
    they still cover (a copy, only then).
    """
    offsets = _numpy_view(arr.offsets)
    lengths = np.diff(offsets).astype(np.int32, copy=False)
    if arr.null_count:
        lengths = np.where(arr.is_null().to_numpy(zero_copy_only=False), 0, lengths)
        return _numpy_view(arr.flatten()), lengths.astype(np.int32, copy=False)
    start, end = int(offsets[0]), int(offsets[-1])
    return _numpy_view(arr.values.slice(start, end - start)), lengths


def list_column_to_jagged(arr: pa.Array) -> tuple[torch.Tensor, torch.Tensor]:
    """A `list<int64>` Arrow array -> (values, lengths) tensors; `values` views Arrow memory."""
    values, lengths = _list_column(arr)
    return torch.from_numpy(values), torch.from_numpy(lengths)


def _id_column(arr: pa.Array, feature: Feature, source: str) -> tuple[np.ndarray, np.ndarray | None]:
    """(values, lengths) of one id column; lengths None means one id per row."""
    if pa.types.is_integer(arr.type):
        if arr.null_count:
            raise SchemaError(
                f"{source}: column {feature.name!r} has {arr.null_count} nulls; an id column "
                "must be filled by its loader (or be a list column, where null = empty)"
            )
        values, lengths = _numpy_view(arr), None
    else:
        values, lengths = _list_column(arr)
    return _ids_in_range(values, feature, source), lengths


def _ids_in_range(values: np.ndarray, feature: Feature, source: str) -> np.ndarray:
    if values.size == 0:
        return values
    lo, hi = int(values.min()), int(values.max())
    if feature.hash_buckets is not None:
        if lo < 0 or hi >= feature.hash_buckets:
            return np.mod(values, feature.hash_buckets)  # numpy's mod is non-negative
        return values
    if lo < 0 or hi >= feature.num_embeddings:
        bad = lo if lo < 0 else hi
        raise SchemaError(
            f"{source}: column {feature.name!r} has id {bad} outside [0, {feature.vocab_size}) "
            "(vocab_size); declare hash_buckets to hash such ids into range instead"
        )
    return values


def _float_column(arr: pa.Array, name: str, source: str) -> np.ndarray:
    if arr.null_count:
        raise SchemaError(f"{source}: column {name!r} has {arr.null_count} nulls (float expected)")
    return arr.to_numpy(zero_copy_only=False)


def to_batch(data: pa.RecordBatch | pa.Table, schema: Schema, source: str = "batch") -> Batch:
    """Convert one Arrow record batch (or single-chunk table) into a `Batch`."""
    if isinstance(data, pa.Table):  # a single-chunk table converts without copying
        chunks = data.combine_chunks().to_batches()
        data = chunks[0] if chunks else pa.RecordBatch.from_pylist([], schema=data.schema)
    check_columns(data.schema, schema, source)
    rows = data.num_rows

    dense_cols = [_float_column(data.column(f.name), f.name, source) for f in schema.dense_features]
    dense = (
        torch.from_numpy(np.stack(dense_cols, axis=1).astype(np.float32, copy=False))
        if dense_cols
        else torch.zeros(rows, 0)
    )
    label_cols = [_float_column(data.column(lab), lab, source) for lab in schema.labels]
    labels = torch.from_numpy(np.stack(label_cols, axis=1).astype(np.float32, copy=False))

    id_features = schema.id_features
    parts = [_id_column(data.column(f.name), f, source) for f in id_features]
    # One concatenation of all features' ids per batch; lengths start as ones (single ids) and
    # list features overwrite their segment.
    lengths = np.ones(len(id_features) * rows, dtype=np.int32)
    for i, (_, feature_lengths) in enumerate(parts):
        if feature_lengths is not None:
            lengths[i * rows : (i + 1) * rows] = feature_lengths
    values = np.concatenate([v for v, _ in parts]) if parts else np.zeros(0, np.int64)
    sparse = KeyedJaggedTensor(
        keys=[f.name for f in id_features],
        values=torch.from_numpy(values),
        lengths=torch.from_numpy(lengths),
        stride=rows,
    )
    return Batch(dense=dense, sparse=sparse, labels=labels)
