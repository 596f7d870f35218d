"""Taobao UserBehavior -> next-click CTR samples: each click with its click history, plus sampled negatives."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pcsv

from recray.data.loaders.common import (
    DROPPED,
    ROW_KEY,
    encode,
    history,
    list_array,
    need_file,
    split_codes,
    time_split,
    write_dataset,
)
from recray.data.schema import Feature, Schema

COLUMNS = ["user_id", "item_id", "category_id", "behavior_type", "timestamp"]


def prepare_taobao(
    src: str | Path,
    out: str | Path,
    *,
    split_files: Sequence[Path] | None = None,
    allow_partial_split: bool = False,
    seed: int = 0,
    max_history: int = 50,
    min_history: int = 1,
    negatives: int = 1,
    embedding_dim: int = 16,
) -> Path:
    """`src` is UserBehavior.csv or its directory.

    A positive is a `pv` event with at least `min_history` earlier clicks of the same user. Each
    gets `negatives` items drawn uniformly (seeded) from the clicked items other than itself; a
    negative shares the positive's user, history and time, so it also lands in the same split.
    Ids are re-indexed densely (1..n in sorted raw order, 0 unused).
    """
    if not 0 <= min_history <= max_history:
        raise ValueError(
            f"taobao: min_history={min_history}, expected 0 <= min_history <= max_history={max_history}"
        )
    src = Path(src)
    path = need_file(src / "UserBehavior.csv" if src.is_dir() else src, "taobao")
    raw = pcsv.read_csv(
        path,
        read_options=pcsv.ReadOptions(column_names=COLUMNS),
        convert_options=pcsv.ConvertOptions(
            column_types=dict.fromkeys(COLUMNS, pa.int64()) | {"behavior_type": pa.string()}
        ),
    )
    user, user_vocab = encode(raw.column("user_id"))
    item, item_vocab = encode(raw.column("item_id"))
    category, category_vocab = encode(raw.column("category_id"))
    category_of_item = np.zeros(item_vocab, dtype=np.int64)
    category_of_item[item] = category  # an item's category is fixed; the last row wins if not

    is_click = pc.equal(raw.column("behavior_type"), "pv").to_numpy()
    clicks = np.flatnonzero(is_click)
    user, item, category = user[clicks], item[clicks], category[clicks]
    time = raw.column("timestamp").to_numpy()[clicks]
    offsets, events = history(user, time, user, time, max_history)
    keys = pa.table(
        {
            "user_id": raw.column("user_id").take(clicks),
            "item_id": raw.column("item_id").take(clicks),
            "timestamp": time,
            ROW_KEY: clicks,
        }
    )
    codes = split_codes(keys, split_files, time_split(time), allow_partial_split)
    short = np.diff(offsets) < min_history
    kept = np.nonzero(~short & (codes != DROPPED))[0]
    if split_files is not None:  # rows the files name that cannot be samples: say how many
        print(
            f"taobao: {int((short & (codes != DROPPED)).sum())} clicks named by split_files have "
            f"fewer than min_history={min_history} earlier clicks and are left out",
            file=sys.stderr,
        )
    positives = pa.table(
        {
            "user_id": user,
            "item_id": item,
            "category_id": category,
            "history": list_array(offsets, item[events]),
            "history_category": list_array(offsets, category[events]),
            "timestamp": time,
            ROW_KEY: clicks,
        }
    ).take(kept)

    # each positive is followed by its negatives
    group = 1 + negatives
    rows = np.repeat(np.arange(len(kept)), group)
    is_negative = np.tile(np.arange(group) > 0, len(kept))
    samples = positives.take(rows)
    sample_item = item[kept][rows]
    sample_item[is_negative] = _sample_negatives(item, item[kept], negatives, seed).ravel()
    samples = samples.set_column(1, "item_id", pa.array(sample_item))
    samples = samples.set_column(2, "category_id", pa.array(category_of_item[sample_item]))
    samples = samples.append_column("label", pa.array((~is_negative).astype(np.float32)))

    dim = embedding_dim
    schema = Schema(
        features=[
            Feature(name="user_id", kind="sparse", vocab_size=user_vocab, embedding_dim=dim),
            Feature(name="item_id", kind="sparse", vocab_size=item_vocab, embedding_dim=dim),
            Feature(
                name="category_id", kind="sparse", vocab_size=category_vocab, embedding_dim=dim
            ),
            Feature(
                name="history",
                kind="sequence",
                vocab_size=item_vocab,
                embedding_dim=dim,
                table="item_id",
            ),
            Feature(
                name="history_category",
                kind="sequence",
                vocab_size=category_vocab,
                embedding_dim=dim,
                table="category_id",
            ),
        ]
    )
    return write_dataset(out, schema, samples, codes[kept][rows])


def _sample_negatives(
    clicked: np.ndarray, positives: np.ndarray, negatives: int, seed: int
) -> np.ndarray:
    """[n_positives, negatives] items drawn uniformly from the clicked items, never the positive."""
    pool = np.unique(clicked)
    if negatives and len(positives) and len(pool) < 2:
        raise ValueError(
            f"taobao: negatives={negatives} needs at least 2 clicked items, found {len(pool)}"
        )
    # draw from the pool minus one slot, then step over the positive's own slot
    draws = np.random.default_rng(seed).integers(
        0, max(len(pool) - 1, 1), size=(len(positives), negatives)
    )
    draws += draws >= np.searchsorted(pool, positives)[:, None]
    return pool[draws]
