"""Arrow -> KJT conversion: zero-copy, round trips of random jagged columns, slices, nulls, bad input."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
import torch

from recray.data.jagged import list_column_to_jagged, to_batch
from recray.data.schema import Feature, Schema, SchemaError


def _schema(**overrides) -> Schema:
    features = [
        Feature(name="user_id", kind="sparse", vocab_size=100),
        Feature(name="tags", kind="sparse", vocab_size=20, pooling="mean"),
        Feature(name="history", kind="sequence", vocab_size=50, table="item_id"),
        Feature(name="item_id", kind="sparse", vocab_size=50),
        Feature(name="age", kind="dense"),
    ]
    return Schema(features=overrides.get("features", features), labels=["label_click", "label_like"])


def _random_list_column(rng: np.random.Generator, rows: int, vocab: int, max_len: int) -> list:
    return [rng.integers(vocab, size=rng.integers(0, max_len + 1)).tolist() for _ in range(rows)]


def _record_batch(rng: np.random.Generator, rows: int, max_len: int = 6) -> pa.RecordBatch:
    return pa.RecordBatch.from_pydict({
        "user_id": pa.array(rng.integers(100, size=rows), pa.int64()),
        "tags": pa.array(_random_list_column(rng, rows, 20, max_len), pa.list_(pa.int64())),
        "history": pa.array(_random_list_column(rng, rows, 50, max_len), pa.list_(pa.int64())),
        "item_id": pa.array(rng.integers(50, size=rows), pa.int64()),
        "age": pa.array(rng.random(rows), pa.float32()),
        "label_click": pa.array(rng.integers(2, size=rows), pa.float32()),
        "label_like": pa.array(rng.integers(2, size=rows), pa.float32()),
    })


def _assert_matches(batch, rb: pa.RecordBatch, schema: Schema) -> None:
    per_key = batch.sparse.to_dict()
    assert list(per_key) == [f.name for f in schema.id_features]
    for f in schema.id_features:
        expected = rb.column(f.name).to_pylist()
        expected = [[x] if isinstance(x, int) else (x or []) for x in expected]
        jt = per_key[f.name]
        assert jt.lengths().tolist() == [len(x) for x in expected]
        assert jt.values().tolist() == [v for x in expected for v in x]
    assert batch.dense[:, 0].tolist() == pytest.approx(rb.column("age").to_pylist())
    assert batch.labels.shape == (rb.num_rows, 2)
    assert batch.labels[:, 1].tolist() == rb.column("label_like").to_pylist()


def test_list_column_values_share_arrow_memory():
    arr = pa.array([[1, 2], [], [3, 4, 5], [6]], pa.list_(pa.int64()))
    values, lengths = list_column_to_jagged(arr)
    assert values.data_ptr() == arr.values.buffers()[1].address
    assert lengths.tolist() == [2, 0, 3, 1]
    # A slice views the same buffer, shifted by the slice's first offset (3 int64 = 24 bytes).
    sliced_values, sliced_lengths = list_column_to_jagged(arr.slice(2, 2))
    assert sliced_values.data_ptr() == arr.values.buffers()[1].address + 2 * 8
    assert sliced_values.tolist() == [3, 4, 5, 6]
    assert sliced_lengths.tolist() == [3, 1]


def test_scalar_id_column_is_not_copied():
    rb = _record_batch(np.random.default_rng(0), 8)
    batch = to_batch(rb, _schema())
    # The KJT concatenates all features once; the per-column step before it is a view.
    from recray.data.jagged import _id_column

    values, lengths = _id_column(rb.column("user_id"), _schema().feature("user_id"), "t")
    assert values.ctypes.data == rb.column("user_id").buffers()[1].address and lengths is None
    assert batch.sparse.values().numel() == sum(
        len(x) if isinstance(x, list) else 1 for f in ("user_id", "tags", "history", "item_id")
        for x in rb.column(f).to_pylist()
    )


@pytest.mark.parametrize("seed", range(5))
def test_random_jagged_columns_round_trip(seed):
    rng = np.random.default_rng(seed)
    schema = _schema()
    rb = _record_batch(rng, int(rng.integers(1, 40)))
    _assert_matches(to_batch(rb, schema), rb, schema)


@pytest.mark.parametrize("start,length", [(0, 5), (3, 7), (19, 1)])
def test_sliced_batches_round_trip(start, length):
    schema = _schema()
    rb = _record_batch(np.random.default_rng(1), 20).slice(start, length)
    batch = to_batch(rb, schema)
    assert len(batch) == length
    _assert_matches(batch, rb, schema)


def test_all_empty_lists_and_empty_batch():
    schema = _schema()
    rb = _record_batch(np.random.default_rng(2), 6, max_len=0)
    batch = to_batch(rb, schema)
    assert batch.sparse["history"].values().numel() == 0
    _assert_matches(batch, rb, schema)
    # TorchRec cannot split a zero-row KJT per key, so a zero-row batch is only checked whole.
    empty = to_batch(rb.slice(3, 0), schema)
    assert len(empty) == 0 and empty.sparse.values().numel() == 0
    assert empty.sparse.keys() == [f.name for f in schema.id_features]


def test_table_with_several_chunks_converts():
    schema = _schema()
    rng = np.random.default_rng(3)
    table = pa.Table.from_batches([_record_batch(rng, 4), _record_batch(rng, 5)])
    batch = to_batch(table, schema)
    _assert_matches(batch, table.combine_chunks().to_batches()[0], schema)


def test_null_list_is_empty_even_when_it_covers_values():
    # Build a list array whose null slot still spans values [9, 9]: they must not leak through.
    offsets = pa.array([0, 1, 3, 4], pa.int32())
    values = pa.array([1, 9, 9, 2], pa.int64())
    arr = pa.ListArray.from_arrays(offsets, values, mask=pa.array([False, True, False]))
    got_values, got_lengths = list_column_to_jagged(arr)
    assert got_lengths.tolist() == [1, 0, 1]
    assert got_values.tolist() == [1, 2]


def test_null_in_scalar_id_column_is_rejected():
    schema = _schema()
    rb = _record_batch(np.random.default_rng(4), 3)
    rb = rb.set_column(0, "user_id", pa.array([1, None, 2], pa.int64()))
    with pytest.raises(SchemaError, match="'user_id' has 1 nulls"):
        to_batch(rb, schema)


def test_out_of_vocab_and_negative_ids_are_rejected_with_column_and_value():
    schema = _schema()
    rb = _record_batch(np.random.default_rng(5), 3)
    with pytest.raises(SchemaError, match=r"'item_id' has id 50 outside \[0, 50\)"):
        to_batch(rb.set_column(3, "item_id", pa.array([0, 50, 1], pa.int64())), schema)
    with pytest.raises(SchemaError, match=r"'history' has id -3"):
        to_batch(rb.set_column(2, "history", pa.array([[-3], [], [1]], pa.list_(pa.int64()))), schema)


def test_hash_buckets_map_any_id_into_range():
    schema = Schema(features=[Feature(name="c", kind="sparse", hash_buckets=7)])
    rb = pa.RecordBatch.from_pydict({
        "c": pa.array([-1, 7, 13, 2**40], pa.int64()), "label": pa.array([0, 1, 0, 1], pa.float32())})
    values = to_batch(rb, schema).sparse.values()
    assert values.tolist() == [6, 0, 6, (2**40) % 7]
    assert values.min() >= 0 and values.max() < 7


def test_missing_and_mistyped_columns_are_named_with_expected_type():
    schema = _schema()
    rb = _record_batch(np.random.default_rng(6), 3)
    with pytest.raises(SchemaError, match="missing column 'tags'"):
        to_batch(rb.drop_columns(["tags"]), schema)
    with pytest.raises(SchemaError, match="'history' is int64, expected list<int64>"):
        to_batch(rb.set_column(2, "history", pa.array([1, 2, 3], pa.int64())), schema)
    with pytest.raises(SchemaError, match="'user_id' is string, expected int64 or list<int64>"):
        to_batch(rb.set_column(0, "user_id", pa.array(["a", "b", "c"])), schema)
    with pytest.raises(SchemaError, match="missing label column 'label_like'"):
        to_batch(rb.drop_columns(["label_like"]), schema)


def test_dense_and_labels_are_float32_tensors():
    batch = to_batch(_record_batch(np.random.default_rng(7), 5), _schema())
    assert batch.dense.dtype == torch.float32 and batch.dense.shape == (5, 1)
    assert batch.labels.dtype == torch.float32
