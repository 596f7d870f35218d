"""Frequency-thresholded vocabularies: count values in a streaming pass, keep the frequent, map to ids."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from recray.data.schema import FIRST_VOCABULARY_ID, MISSING_ID, OOV_ID

# Per-chunk counts wait in a list until they hold as many (value, count) rows as the merged table
# (at least MERGE_ROWS), then merge into it: merging after every chunk would cost O(distinct
# values) per chunk, and a fixed large batch would hold that many rows per column while waiting
# (100k rows made Criteo's 26 columns hold ~50 MB of pending counts, growing with the file up to
# that size). Waiting for the merged table's size keeps the merges amortised O(1) per count.
MERGE_ROWS = 16_384


class ValueCounts:
    """How often each non-null value occurs, over chunks fed one at a time; memory ~ distinct values.

    Written here rather than taken from pyarrow because pyarrow's `value_counts` and `group_by`
    see one table at a time: a streaming pass needs their partial results merged.
    """

    def __init__(self) -> None:
        self._merged: pa.Table | None = None
        self._pending: list[pa.Table] = []
        self._pending_rows = 0

    def add(self, values: pa.Array | pa.ChunkedArray) -> None:
        counted = pc.value_counts(values.drop_null())
        if isinstance(counted, pa.ChunkedArray):
            counted = counted.combine_chunks()
        table = pa.table(
            {"value": counted.field("values"), "count": counted.field("counts").cast(pa.int64())}
        )
        self._pending.append(table)
        self._pending_rows += table.num_rows
        merged_rows = 0 if self._merged is None else self._merged.num_rows
        if self._pending_rows >= max(MERGE_ROWS, merged_rows):
            self._merge()

    def _merge(self) -> None:
        parts = ([self._merged] if self._merged is not None else []) + self._pending
        if parts:
            summed = pa.concat_tables(parts).group_by("value").aggregate([("count", "sum")])
            self._merged = summed.rename_columns(["value", "count"]).select(["value", "count"])
        self._pending, self._pending_rows = [], 0

    def table(self) -> pa.Table:
        """Columns `value` (each distinct value once) and `count`."""
        self._merge()
        if self._merged is None:
            return pa.table({"value": pa.array([], pa.int64()), "count": pa.array([], pa.int64())})
        return self._merged


def frequent_values(counts: pa.Table, min_count: int) -> pa.Array:
    """The values counted at least `min_count` times, sorted: the vocabulary, in id order."""
    kept = counts.filter(pc.greater_equal(counts.column("count"), min_count)).column("value")
    kept = kept.combine_chunks() if isinstance(kept, pa.ChunkedArray) else kept
    return kept.take(pc.sort_indices(kept))


def vocabulary_ids(vocabulary: pa.Array, values: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """Raw values -> ids: null -> MISSING_ID, absent from `vocabulary` -> OOV_ID, else 2 + position."""
    if isinstance(values, pa.ChunkedArray):
        values = values.combine_chunks()
    if len(vocabulary) and values.type != vocabulary.type:
        values = values.cast(vocabulary.type)
    position = pc.index_in(values, value_set=vocabulary) if len(vocabulary) else pa.nulls(
        len(values), pa.int32()
    )
    ids = np.asarray(pc.fill_null(position, -1).to_numpy(zero_copy_only=False), dtype=np.int64)
    ids = np.where(ids < 0, OOV_ID, ids + FIRST_VOCABULARY_ID)
    missing = np.asarray(values.is_null().to_numpy(zero_copy_only=False), dtype=bool)
    ids[missing] = MISSING_ID
    return ids


def check_min_count(min_count: int, data_set: str) -> None:
    if min_count < 1:
        raise ValueError(
            f"{data_set}: min_count={min_count}, expected at least 1 (1 keeps every value seen "
            "in train)"
        )
