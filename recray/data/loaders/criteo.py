"""Criteo display ads (tab-separated label, I1..I13, C1..C26) -> CTR impressions with hashed ids."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pcsv

from recray.data.loaders.common import csv_chunks, need_file
from recray.data.loaders.flat import prepare_flat
from recray.data.loaders.vocab import check_min_count
from recray.data.schema import Feature

DENSE = [f"I{i}" for i in range(1, 14)]
CATEGORICAL = [f"C{i}" for i in range(1, 27)]
HEX_WIDTH = 8
MISSING = -1  # what `hex_ids` gives an empty or null field: below every real value (>= 0)
BLOCK_BYTES = 4 << 20  # CSV bytes per chunk (~16k rows): 16 MB chunks raised peak RSS by 200 MB

# nibble value of each byte; 255 marks a byte that is not a hex digit
_NIBBLE = np.full(256, 255, dtype=np.uint8)
for _digits, _first in ((b"0123456789", 0), (b"abcdef", 10), (b"ABCDEF", 10)):
    _NIBBLE[np.frombuffer(_digits, dtype=np.uint8)] = np.arange(_first, _first + len(_digits))


def hex_ids(column: pa.Array | pa.ChunkedArray, name: str = "column") -> np.ndarray:
    """Hex strings of up to 8 digits -> int64 (= int(x, 16)); empty or null -> MISSING."""
    strings = pc.fill_null(column, "")
    if isinstance(strings, pa.ChunkedArray):
        strings = strings.combine_chunks()
    missing = pc.equal(pc.utf8_length(strings), 0).to_numpy(zero_copy_only=False)
    too_long = pc.greater(pc.utf8_length(strings), HEX_WIDTH)
    if pc.any(too_long).as_py():
        bad = strings.filter(too_long)[0].as_py()
        raise ValueError(
            f"criteo: column {name!r} has {bad!r}, expected at most {HEX_WIDTH} hex digits"
        )
    # left-padding with zeros makes every value exactly 8 bytes, so the bytes form a [n, 8] matrix
    fixed = pc.utf8_lpad(strings, width=HEX_WIDTH, padding="0").cast(pa.binary(HEX_WIDTH))
    data = np.frombuffer(fixed.buffers()[1], dtype=np.uint8)
    digits = data[fixed.offset * HEX_WIDTH : (fixed.offset + len(fixed)) * HEX_WIDTH].reshape(
        -1, HEX_WIDTH
    )
    nibbles = _NIBBLE[digits]
    if (nibbles == 255).any():
        bad = strings[int(np.nonzero((nibbles == 255).any(axis=1))[0][0])].as_py()
        raise ValueError(f"criteo: column {name!r} has {bad!r}, expected hex digits")
    values = nibbles.astype(np.int64) @ (16 ** np.arange(HEX_WIDTH - 1, -1, -1, dtype=np.int64))
    return np.where(missing, MISSING, values)


def bucket_ids(values: np.ndarray, hash_buckets: int) -> np.ndarray:
    """Ids in [0, hash_buckets): MISSING -> 0, a real value v -> 1 + v mod (hash_buckets - 1).

    A missing field gets a bucket of its own: as a raw 0 it shared one with every real value that
    is a multiple of the bucket count.
    """
    return np.where(values == MISSING, 0, 1 + values % (hash_buckets - 1))


def log_transform(values: np.ndarray) -> np.ndarray:
    """x -> log(1 + x) for x > 0; 0 and the rare negative counts (I2) stay as they are."""
    values = values.astype(np.float64)
    return np.where(values > 0, np.log1p(np.maximum(values, 0)), values).astype(np.float32)


def prepare_criteo(
    src: str | Path,
    out: str | Path,
    *,
    split_files: Sequence[Path] | None = None,
    allow_partial_split: bool = False,
    seed: int = 0,
    min_count: int = 2,
    hash_buckets: int | None = None,
    embedding_dim: int = 16,
    block_size: int = BLOCK_BYTES,
) -> Path:
    """`src` is the data file, or a directory holding `train.txt`; read in `block_size`-byte chunks.

    Each categorical column keeps a vocabulary of the values seen at least `min_count` times in
    train (FuxiCTR's `min_categr_count`): id 0 for a missing value, 1 for any other value, 2.. for
    the vocabulary's, so the table has as many rows as the data needs. With `hash_buckets`, ids
    are hashed instead (see `bucket_ids`) and `min_count` is not used.
    """
    check_min_count(min_count, "criteo")
    if hash_buckets is not None and hash_buckets < 2:
        raise ValueError(
            f"criteo: hash_buckets={hash_buckets}, expected at least 2 (id 0 is kept for a "
            "missing value)"
        )
    src = Path(src)
    path = need_file(src / "train.txt" if src.is_dir() else src, "criteo")

    def chunks() -> Iterator[pa.Table]:
        return csv_chunks(
            path,
            pcsv.ReadOptions(column_names=["label", *DENSE, *CATEGORICAL], block_size=block_size),
            pcsv.ParseOptions(delimiter="\t", quote_char=False),
            pcsv.ConvertOptions(
                column_types={"label": pa.float32()}
                | dict.fromkeys(DENSE, pa.int64())
                | dict.fromkeys(CATEGORICAL, pa.string()),
                strings_can_be_null=True,
            ),
        )

    def columns(raw: pa.Table) -> dict[str, np.ndarray | pa.Array]:
        if raw.column("label").null_count:
            raise ValueError(
                f"criteo: {path}: column 'label' is empty in {raw.column('label').null_count} rows"
            )
        dense = {name: log_transform(pc.fill_null(raw.column(name), 0).to_numpy()) for name in DENSE}
        return dense | {"label": raw.column("label").to_numpy()}

    return prepare_flat(
        "criteo",
        chunks,
        out,
        categorical=CATEGORICAL,
        columns=columns,
        features=[Feature(name=n, kind="dense") for n in DENSE],
        split_files=split_files,
        allow_partial_split=allow_partial_split,
        seed=seed,
        min_count=min_count,
        embedding_dim=embedding_dim,
        hashed=None
        if hash_buckets is None
        else (hash_buckets, lambda values, name: bucket_ids(hex_ids(values, name), hash_buckets)),
    )
