"""KuaiRand-Pure/1K/27K (interaction logs + user and video feature tables) -> multi-task impressions with history."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pcsv

from recray.data.loaders.common import (
    ROW_KEY,
    encode,
    history,
    list_array,
    lookup,
    need_file,
    split_codes,
    split_int_lists,
    take_lists,
    time_split,
    with_vocabularies,
    write_dataset,
)
from recray.data.loaders.vocab import check_min_count
from recray.data.schema import Feature, Schema

LABELS = {"label_click": "is_click", "label_long_view": "long_view", "label_like": "is_like"}
LOG_COLUMNS = ["user_id", "video_id", "time_ms", "tab", *LABELS.values()]
USER_CATEGORICAL = [
    "user_active_degree",
    "is_lowactive_period",
    "is_live_streamer",
    "is_video_author",
    "follow_user_num_range",
    "fans_user_num_range",
    "friend_user_num_range",
    "register_days_range",
    *(f"onehot_feat{i}" for i in range(18)),
]
VIDEO_CATEGORICAL = ["author_id", "video_type", "upload_type", "music_type"]
# The published releases name every file with their suffix (chongminggao/KuaiRand README):
# log_standard_4_08_to_4_21_pure.csv, user_features_1k.csv, log_random_4_22_to_5_08_27k.csv,
# log_standard_4_08_to_4_21_27k_part1.csv, video_features_basic_27k.csv, ...
VARIANTS = ("pure", "1k", "27k")


def _read(path: Path, columns: list[str], strings: Sequence[str] = ()) -> pa.Table:
    """Only `columns` of a headed CSV, in any order among others; `strings` stay text, empty = null."""
    with open(need_file(path, "kuairand"), encoding="utf-8-sig") as fh:
        header = [name.strip().strip('"') for name in fh.readline().split(",")]
    missing = [c for c in columns if c not in header]
    if missing:
        raise ValueError(f"kuairand: {path} lacks columns {missing}; it has {header}")
    return pcsv.read_csv(
        path,
        convert_options=pcsv.ConvertOptions(
            include_columns=columns,
            column_types=dict.fromkeys(strings, pa.string()),
            strings_can_be_null=True,
        ),
    )


def _log_files(src: Path, pattern: str) -> list[Path]:
    for folder in (src, src / "data"):
        found = sorted(folder.glob(pattern))
        if found:
            return found
    raise FileNotFoundError(
        f"kuairand: no log file matching {pattern!r} in {src} or {src / 'data'}"
    )


def find_variant(src: Path) -> str:
    """Which release `src` holds, by the suffix of its user feature file."""
    for variant in VARIANTS:
        if any((folder / f"user_features_{variant}.csv").is_file() for folder in (src, src / "data")):
            return variant
    raise FileNotFoundError(
        f"kuairand: no user_features_{{{','.join(VARIANTS)}}}.csv in {src} or {src / 'data'}: "
        "expected a KuaiRand-Pure, -1K or -27K folder"
    )


def _feature_file(src: Path, name: str) -> Path:
    for folder in (src, src / "data"):
        if (folder / name).is_file():
            return folder / name
    return src / name  # missing: the reader names it


def prepare_kuairand(
    src: str | Path,
    out: str | Path,
    *,
    split_files: Sequence[Path] | None = None,
    allow_partial_split: bool = False,
    seed: int = 0,
    max_history: int = 50,
    min_count: int = 2,
    embedding_dim: int = 16,
    variant: str | None = None,
    log_pattern: str | None = None,
) -> Path:
    """`src` is the KuaiRand directory (or its `data/`) of release `variant` (`pure`, `1k`,
    `27k`; found from the file names when None); every `log_pattern` file (default
    `log_*_<variant>*.csv`) is read.

    Labels `label_click`, `label_long_view`, `label_like`; the history is the user's earlier
    clicked videos. User and video ids come from vocabularies of the ids seen at least
    `min_count` times in train (0 missing, 1 rarer or unseen, 2.. the vocabulary's); the side
    features are re-indexed densely (1..n, 0 = unknown or missing). `seed` is unused: the split
    is by time.
    """
    check_min_count(min_count, "kuairand")
    src = Path(src)
    variant = variant or find_variant(src)
    if variant not in VARIANTS:
        raise ValueError(f"kuairand: variant={variant!r}, expected one of {VARIANTS}")
    log_pattern = log_pattern or f"log_*_{variant}*.csv"
    logs = [_read(path, LOG_COLUMNS, strings=["tab"]) for path in _log_files(src, log_pattern)]
    log = pa.concat_tables(
        [t.select(LOG_COLUMNS).cast(logs[0].select(LOG_COLUMNS).schema) for t in logs]
    )
    users = _read(
        _feature_file(src, f"user_features_{variant}.csv"),
        ["user_id", *USER_CATEGORICAL],
        strings=USER_CATEGORICAL,
    )
    videos = _read(
        _feature_file(src, f"video_features_basic_{variant}.csv"),
        ["video_id", *VIDEO_CATEGORICAL, "video_duration", "tag"],
        strings=[*VIDEO_CATEGORICAL, "tag"],
    )

    n = log.num_rows
    user_ids, user_vocab = encode(
        pa.chunked_array([log.column("user_id"), users.column("user_id")], pa.int64())
    )
    video_ids, video_vocab = encode(
        pa.chunked_array([log.column("video_id"), videos.column("video_id")], pa.int64())
    )
    user, user_key = user_ids[:n], user_ids[n:]
    video, video_key = video_ids[:n], video_ids[n:]
    time = log.column("time_ms").to_numpy()
    tab, tab_vocab = encode(log.column("tab"))

    # the raw ids, re-encoded through train vocabularies below; the dense ids index side tables
    columns: dict[str, np.ndarray | pa.Array] = {
        "user_id": log.column("user_id").to_numpy(),
        "video_id": log.column("video_id").to_numpy(),
        "tab": tab,
    }
    vocab = {"tab": tab_vocab}
    sides = (
        (users, user_key, USER_CATEGORICAL, user, user_vocab),
        (videos, video_key, VIDEO_CATEGORICAL, video, video_vocab),
    )
    for table, key, names, rows, key_vocab in sides:
        for name in names:
            ids, vocab[name] = encode(table.column(name))
            columns[name] = lookup(key, ids, key_vocab, rows)
    tags = split_int_lists(videos.column("tag"), shift=1)  # raw tags start at 0; 0 stays padding
    columns["tag"] = take_lists(video_key, tags, video_vocab, video)
    vocab["tag"] = int(pc.max(tags.flatten()).as_py() or 0) + 1
    # durations span 1 s to hours: the log keeps them on one scale
    duration = pc.fill_null(videos.column("video_duration"), 0).cast(pa.float64()).to_numpy()
    columns["video_duration"] = np.log1p(
        np.maximum(lookup(video_key, duration, video_vocab, video), 0)
    )

    clicked = pc.fill_null(log.column("is_click"), 0).to_numpy().astype(bool)
    offsets, events = history(user[clicked], time[clicked], user, time, max_history)
    columns["history"] = list_array(offsets, columns["video_id"][clicked][events])
    for label, source in LABELS.items():
        columns[label] = pc.fill_null(log.column(source), 0).to_numpy().astype(np.float32)
    columns["timestamp"] = time
    columns[ROW_KEY] = np.arange(n)

    keys = pa.table(
        {
            "user_id": log.column("user_id"),
            "item_id": log.column("video_id"),
            "timestamp": time,
            ROW_KEY: np.arange(n),
        }
    )
    codes = split_codes(keys, split_files, time_split(time), allow_partial_split)
    table, id_vocab = with_vocabularies(
        pa.table(columns), codes, ["user_id", "video_id"], min_count,
        shared={"history": "video_id"},
    )
    vocab |= {name: len(values) + 2 for name, values in id_vocab.items()}

    dim = embedding_dim
    sparse = ["user_id", "video_id", "tab", *USER_CATEGORICAL, *VIDEO_CATEGORICAL]
    schema = Schema(
        features=[
            Feature(
                name=name,
                kind="sparse",
                vocab_size=vocab[name],
                vocabulary=id_vocab[name].to_pylist() if name in id_vocab else None,
                embedding_dim=dim,
            )
            for name in sparse
        ]
        + [
            Feature(
                name="tag",
                kind="sparse",
                vocab_size=vocab["tag"],
                embedding_dim=dim,
                pooling="mean",
            ),
            Feature(name="video_duration", kind="dense"),
            Feature(
                name="history",
                kind="sequence",
                vocab_size=vocab["video_id"],
                embedding_dim=dim,
                table="video_id",
            ),
        ],
        labels=list(LABELS),
    )
    return write_dataset(out, schema, table, codes)
