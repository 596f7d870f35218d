"""Avazu CTR (CSV `id,click,hour,...`) -> impressions with hour-of-day, weekday and vocabulary ids."""

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

CATEGORICAL = [
    "C1", "banner_pos", "site_id", "site_domain", "site_category", "app_id", "app_domain",
    "app_category", "device_id", "device_ip", "device_model", "device_type", "device_conn_type",
    *(f"C{i}" for i in range(14, 22)),
]
COLUMNS = ["id", "click", "hour", *CATEGORICAL]
BLOCK_BYTES = 4 << 20  # CSV bytes per chunk: ~25k Avazu rows


def hour_features(hour: pa.Array | pa.ChunkedArray) -> dict[str, np.ndarray]:
    """`YYMMDDHH` text -> `hour_of_day` id (hour + 1), `weekday` id (Monday 1 .. Sunday 7) and
    `timestamp` (unix seconds, UTC: the file gives no zone)."""
    try:
        when = pc.strptime(hour, format="%y%m%d%H", unit="s")
    except pa.ArrowInvalid as e:
        raise ValueError(f"avazu: column 'hour': {e}; expected YYMMDDHH") from None
    return {
        "hour_of_day": pc.hour(when).to_numpy().astype(np.int64) + 1,
        "weekday": pc.day_of_week(when).to_numpy().astype(np.int64) + 1,
        "timestamp": when.cast(pa.int64()).to_numpy(),
    }


def prepare_avazu(
    src: str | Path,
    out: str | Path,
    *,
    split_files: Sequence[Path] | None = None,
    allow_partial_split: bool = False,
    seed: int = 0,
    min_count: int = 2,
    embedding_dim: int = 16,
    block_size: int = BLOCK_BYTES,
) -> Path:
    """`src` is the CSV (with its header) or a directory holding `train.csv` or `train`.

    Every categorical column keeps a vocabulary of its values seen at least `min_count` times in
    train, read as text: id 0 for an empty field, 1 for any other value, 2.. for the vocabulary's.
    The split is random 8:1:1 (seeded) unless `split_files` name rows by `row` (0-based data line).
    """
    check_min_count(min_count, "avazu")
    src = Path(src)
    if src.is_dir():
        src = next((src / n for n in ("train.csv", "train") if (src / n).is_file()), src / "train.csv")
    path = need_file(src, "avazu")
    with open(path) as fh:
        header = fh.readline().strip().split(",")
    missing = [c for c in COLUMNS if c not in header]
    if missing:
        raise ValueError(f"avazu: {path} lacks columns {missing}; its header is {header}")

    def chunks() -> Iterator[pa.Table]:
        return csv_chunks(
            path,
            pcsv.ReadOptions(block_size=block_size),
            pcsv.ParseOptions(),
            pcsv.ConvertOptions(
                include_columns=COLUMNS,
                # `id` exceeds int64; every id column is kept as its text, so serving matches it
                column_types={"click": pa.float32()}
                | dict.fromkeys(["id", "hour", *CATEGORICAL], pa.string()),
                strings_can_be_null=True,
            ),
        )

    def columns(raw: pa.Table) -> dict[str, np.ndarray | pa.Array]:
        if raw.column("click").null_count:
            raise ValueError(
                f"avazu: {path}: column 'click' is empty in {raw.column('click').null_count} rows"
            )
        return hour_features(raw.column("hour")) | {"label": raw.column("click").to_numpy()}

    return prepare_flat(
        "avazu",
        chunks,
        out,
        categorical=CATEGORICAL,
        columns=columns,
        features=[
            Feature(name="hour_of_day", kind="sparse", vocab_size=25, embedding_dim=embedding_dim),
            Feature(name="weekday", kind="sparse", vocab_size=8, embedding_dim=embedding_dim),
        ],
        split_files=split_files,
        allow_partial_split=allow_partial_split,
        seed=seed,
        min_count=min_count,
        embedding_dim=embedding_dim,
    )
