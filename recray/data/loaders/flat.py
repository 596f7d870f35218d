"""Flat impression logs (Criteo, Avazu): streamed in chunks, vocabularies from train, Parquet as it goes."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
from tqdm import tqdm

from recray.data.loaders.common import ROW_KEY, SplitWriter, fixed_split, random_split
from recray.data.loaders.vocab import ValueCounts, frequent_values, vocabulary_ids
from recray.data.schema import Feature, Schema

# A chunk's own columns (dense features, label, derived ids), computed from the raw chunk.
Columns = Callable[[pa.Table], dict[str, np.ndarray | pa.Array]]
# Ids of one categorical column when the data set hashes instead of keeping a vocabulary.
Hashed = Callable[[pa.Array | pa.ChunkedArray, str], np.ndarray]


def prepare_flat(
    data_set: str,
    chunks: Callable[[], Iterator[pa.Table]],
    out: str | Path,
    *,
    categorical: Sequence[str],
    columns: Columns,
    features: Sequence[Feature],
    split_files: Sequence[Path] | None,
    allow_partial_split: bool,
    seed: int,
    min_count: int,
    embedding_dim: int,
    hashed: tuple[int, Hashed] | None = None,
) -> Path:
    """Three streaming passes over `chunks()`: count rows (for the seeded 8:1:1 split), count the
    `categorical` values of train rows, then encode and write. `features` are the non-categorical
    features `columns` yields. With `hashed` = (buckets, ids), categorical ids are hashed
    instead and the counting pass is skipped.

    Memory holds one chunk, one int8 split code per row and the distinct values of each column.
    """
    n = 0
    for chunk in tqdm(chunks(), desc=f"{data_set}: counting rows", unit="chunk"):
        n += chunk.num_rows
    codes = (
        random_split(n, seed)
        if split_files is None  # no row-number column then: it would cost 8 bytes per row
        else fixed_split(split_files, pa.table({ROW_KEY: np.arange(n)}), allow_partial_split)
    )
    vocabularies: dict[str, pa.Array] = {}
    if hashed is None:
        counts = {name: ValueCounts() for name in categorical}
        start = 0
        for chunk in tqdm(chunks(), desc=f"{data_set}: counting train values", unit="chunk"):
            train = pa.array(codes[start : start + chunk.num_rows] == 0)
            start += chunk.num_rows
            for name in categorical:
                counts[name].add(chunk.column(name).filter(train))
        vocabularies = {
            name: frequent_values(counts.pop(name).table(), min_count) for name in categorical
        }  # popped: every distinct value's count is freed before the writing pass
        id_features = [
            Feature(
                name=name,
                kind="sparse",
                vocab_size=len(vocabularies[name]) + 2,
                vocabulary=vocabularies[name].to_pylist(),
                embedding_dim=embedding_dim,
            )
            for name in categorical
        ]
    else:
        buckets = hashed[0]
        id_features = [
            Feature(name=name, kind="sparse", hash_buckets=buckets, embedding_dim=embedding_dim)
            for name in categorical
        ]
    schema = Schema(features=[*features, *id_features])
    writer = SplitWriter(out, schema)
    start = 0
    for chunk in tqdm(chunks(), desc=f"{data_set}: writing {out}", unit="chunk"):
        table = columns(chunk)
        for name in categorical:
            table[name] = (
                vocabulary_ids(vocabularies[name], chunk.column(name))
                if hashed is None
                else hashed[1](chunk.column(name), name)
            )
        table[ROW_KEY] = np.arange(start, start + chunk.num_rows)
        writer.write(pa.table(table), codes[start : start + chunk.num_rows])
        start += chunk.num_rows
    return writer.close()
