"""Parquet files -> `Batch`es, with id ranges proven once from the row-group statistics, not per batch."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pyarrow.parquet as pq

from recray.data.jagged import Batch, to_batch
from recray.data.schema import Schema


def ids_in_range(path: str | Path, schema: Schema) -> bool:
    """True when every row group's min/max shows every `vocab_size` id column inside its vocab.

    Parquet writers store these statistics per column chunk (list columns under
    `<name>.list.element`); a file without them, or with any id out of range, returns False and
    the per-batch check in `to_batch` then runs (and names the offending value).
    """
    metadata = pq.ParquetFile(path).metadata
    bounds = {f.name: f.vocab_size for f in schema.id_features if f.vocab_size is not None}
    for group in range(metadata.num_row_groups):
        row_group = metadata.row_group(group)
        seen = set()
        for i in range(row_group.num_columns):
            column = row_group.column(i)
            name = column.path_in_schema.split(".")[0]
            if name not in bounds:
                continue
            stats = column.statistics
            if stats is None or not stats.has_min_max or stats.min < 0 or stats.max >= bounds[name]:
                return False
            seen.add(name)
        if seen != set(bounds) and row_group.num_rows:
            return False
    return True


def read_batches(path: str | Path, schema: Schema, batch_size: int = 8192) -> Iterator[Batch]:
    """Stream a Parquet file as `Batch`es (single-threaded decode; one core per reader)."""
    checked = ids_in_range(path, schema)
    file = pq.ParquetFile(path)
    for record_batch in file.iter_batches(batch_size=batch_size, use_threads=False):
        yield to_batch(record_batch, schema, source=str(path), ids_checked=checked)
