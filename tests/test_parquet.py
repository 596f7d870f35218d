"""Parquet -> Batch: id ranges proven from row-group statistics, and the per-batch check as fallback."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from recray.data.parquet import ids_in_range, read_batches
from recray.data.schema import Feature, Schema, SchemaError

SCHEMA = Schema(features=[
    Feature(name="user_id", kind="sparse", vocab_size=10),
    Feature(name="history", kind="sequence", vocab_size=5),
    Feature(name="c", kind="sparse", hash_buckets=3),
])


def _write(path, users, histories, hashed=(7, 8, 9)):
    table = pa.table({
        "user_id": pa.array(users, pa.int64()),
        "history": pa.array(histories, pa.list_(pa.int64())),
        "c": pa.array(hashed, pa.int64()),
        "label": pa.array([0.0, 1.0, 0.0], pa.float32()),
    })
    pq.write_table(table, path, row_group_size=2)
    return path


def test_statistics_prove_ranges_and_batches_round_trip(tmp_path):
    path = _write(tmp_path / "ok.parquet", [1, 9, 0], [[4, 0], [], [3]])
    assert ids_in_range(path, SCHEMA)
    batches = list(read_batches(path, SCHEMA, batch_size=2))
    assert [len(b) for b in batches] == [2, 1]
    assert batches[0].sparse["history"].values().tolist() == [4, 0]
    assert batches[1].sparse["c"].values().tolist() == [0]  # hash_buckets still applied: 9 % 3


@pytest.mark.parametrize("users,histories", [([1, 10, 0], [[1], [], []]), ([1, 2, 0], [[1], [], [5]])])
def test_out_of_range_file_is_not_trusted_and_the_batch_check_names_it(tmp_path, users, histories):
    path = _write(tmp_path / "bad.parquet", users, histories)
    assert not ids_in_range(path, SCHEMA)
    with pytest.raises(SchemaError, match="outside"):
        list(read_batches(path, SCHEMA))


def test_file_without_statistics_falls_back_to_the_batch_check(tmp_path):
    path = tmp_path / "nostats.parquet"
    table = pq.read_table(_write(tmp_path / "src.parquet", [1, 2, 3], [[1], [2], [3]]))
    pq.write_table(table, path, write_statistics=False)
    assert not ids_in_range(path, SCHEMA)
    assert sum(len(b) for b in read_batches(path, SCHEMA)) == 3
