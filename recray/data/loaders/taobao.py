"""Taobao UserBehavior -> next-click CTR samples: each click with its click history, plus negatives
drawn from what other users clicked just before it."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pcsv
from tqdm import tqdm

from recray.data.loaders.common import (
    DROPPED,
    ROW_KEY,
    csv_chunks,
    history,
    list_array,
    need_file,
    split_codes,
    time_split,
    write_dataset,
)
from recray.data.loaders.vocab import check_min_count, frequent_values, vocabulary_ids
from recray.data.schema import Feature, Schema

COLUMNS = ["user_id", "item_id", "category_id", "behavior_type", "timestamp"]
BLOCK_BYTES = 4 << 20  # CSV bytes per chunk: ~120k rows
MAX_DRAWS = 32  # rejection rounds before a positive without a usable negative is left out


def read_clicks(
    path: Path, block_size: int = BLOCK_BYTES
) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray]:
    """The `pv` events (user, item, category, timestamp, row = 0-based line) read in chunks, and
    every item (sorted) with its category (from every behaviour; the last line wins if an item
    has several)."""
    parts: list[dict[str, np.ndarray]] = []
    items, categories = np.zeros(0, np.int64), np.zeros(0, np.int64)
    start = 0
    chunks = csv_chunks(
        path,
        pcsv.ReadOptions(column_names=COLUMNS, block_size=block_size),
        pcsv.ParseOptions(),
        pcsv.ConvertOptions(
            column_types=dict.fromkeys(COLUMNS, pa.int64()) | {"behavior_type": pa.string()}
        ),
    )
    for chunk in tqdm(chunks, desc="taobao: reading clicks", unit="chunk"):
        is_click = pc.equal(chunk.column("behavior_type"), "pv").to_numpy()
        columns = {c: chunk.column(c).to_numpy() for c in ("user_id", "item_id", "category_id",
                                                          "timestamp")}
        columns[ROW_KEY] = np.arange(start, start + chunk.num_rows)
        parts.append({c: v[is_click] for c, v in columns.items()})
        start += chunk.num_rows
        # later lines win: the newest pairs first, then np.unique keeps each item's first
        both_items = np.concatenate([columns["item_id"][::-1], items])
        both_categories = np.concatenate([columns["category_id"][::-1], categories])
        items, first = np.unique(both_items, return_index=True)
        categories = both_categories[first]
    clicks = {
        c: np.concatenate([p[c] for p in parts]) if parts else np.zeros(0, np.int64)
        for c in ("user_id", "item_id", "category_id", "timestamp", ROW_KEY)
    }
    return clicks, items, categories


def sample_negatives(
    user: np.ndarray,
    item: np.ndarray,
    time: np.ndarray,
    positives: np.ndarray,
    negatives: int,
    window_s: int,
    seed: int,
) -> tuple[np.ndarray, np.ndarray]:
    """For each click index in `positives`, `negatives` items from the clicks other users made in
    the `window_s` seconds before it (strictly earlier), each click equally likely: what was
    being clicked at that moment, popularity as of then, never from the future. A short window
    keeps an item's negatives close in time to its positives, so item ids alone tell them apart
    no better than chance.

    Returns ([n_positives, negatives] item ids, mask of positives that got all of theirs): a click
    whose window holds no other user's click of another item gets none.
    """
    order = np.lexsort((np.arange(len(time)), time))
    sorted_time = time[order]
    end = np.searchsorted(sorted_time, time[positives], side="left")  # first click at or after t
    start = np.searchsorted(sorted_time, time[positives] - window_s, side="left")
    width = end - start
    drawn = np.zeros((len(positives), negatives), dtype=np.int64)
    found = np.zeros((len(positives), negatives), dtype=bool)
    rng = np.random.default_rng(seed)
    # rejection sampling, vectorised: redraw only the slots whose click was the user's own or
    # the positive's item
    for _ in range(MAX_DRAWS):
        row, slot = np.nonzero(~found & (width > 0)[:, None])
        if not len(row):
            break
        candidate = order[start[row] + (rng.random(len(row)) * width[row]).astype(np.int64)]
        ok = (user[candidate] != user[positives[row]]) & (item[candidate] != item[positives[row]])
        drawn[row[ok], slot[ok]] = item[candidate[ok]]
        found[row[ok], slot[ok]] = True
    return drawn, found.all(axis=1)


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
    negative_window_s: int = 3600,
    min_count: int = 2,
    embedding_dim: int = 16,
    block_size: int = BLOCK_BYTES,
) -> Path:
    """`src` is UserBehavior.csv or its directory.

    A positive is a `pv` event with at least `min_history` earlier clicks of the same user. Each
    gets `negatives` items (see `sample_negatives`) clicked by others in the `negative_window_s`
    seconds before it; a
    negative shares the positive's user, history and time, so it also lands in the same split.
    User, item and category ids come from vocabularies of the values clicked at least
    `min_count` times in train: 0 missing, 1 rarer or unseen, 2.. the vocabulary's.
    """
    if not 0 <= min_history <= max_history:
        raise ValueError(
            f"taobao: min_history={min_history}, expected 0 <= min_history <= max_history={max_history}"
        )
    if negative_window_s < 1:
        raise ValueError(f"taobao: negative_window_s={negative_window_s}, expected at least 1")
    check_min_count(min_count, "taobao")
    src = Path(src)
    path = need_file(src / "UserBehavior.csv" if src.is_dir() else src, "taobao")
    clicks, all_items, item_categories = read_clicks(path, block_size)
    user, item, category = clicks["user_id"], clicks["item_id"], clicks["category_id"]
    time, rows = clicks["timestamp"], clicks[ROW_KEY]

    offsets, events = history(user, time, user, time, max_history)
    keys = pa.table({"user_id": user, "item_id": item, "timestamp": time, ROW_KEY: rows})
    codes = split_codes(keys, split_files, time_split(time), allow_partial_split)
    short = np.diff(offsets) < min_history
    if split_files is not None:  # rows the files name that cannot be samples: say how many
        print(
            f"taobao: {int((short & (codes != DROPPED)).sum())} clicks named by split_files have "
            f"fewer than min_history={min_history} earlier clicks and are left out",
            file=sys.stderr,
        )
    candidates = np.flatnonzero(~short & (codes != DROPPED))
    drawn, complete = sample_negatives(
        user, item, time, candidates, negatives, negative_window_s, seed
    )
    if negatives and not complete.all():
        print(
            f"taobao: {int((~complete).sum())} of {len(candidates)} positives are left out: no "
            f"other user's click of another item in the {negative_window_s} s before them",
            file=sys.stderr,
        )
    kept, drawn = candidates[complete], drawn[complete]

    train = codes == 0
    vocab = {
        name: frequent_values(_counts(values[train]), min_count)
        for name, values in (("user_id", user), ("item_id", item), ("category_id", category))
    }

    # each positive is followed by its negatives
    group = 1 + negatives
    sample = np.repeat(kept, group)
    sample_item = item[sample]
    is_negative = np.tile(np.arange(group) > 0, len(kept))
    sample_item[is_negative] = drawn.ravel()
    sample_category = item_categories[np.searchsorted(all_items, sample_item)]
    sample_offsets = np.concatenate([[0], np.cumsum(np.diff(offsets)[sample])])
    sample_events = events[_ranges(offsets[sample], offsets[sample + 1])]

    def ids(name: str, values: np.ndarray) -> np.ndarray:
        return vocabulary_ids(vocab[name], pa.array(values))

    samples = pa.table(
        {
            "user_id": ids("user_id", user[sample]),
            "item_id": ids("item_id", sample_item),
            "category_id": ids("category_id", sample_category),
            "history": list_array(sample_offsets, ids("item_id", item[sample_events])),
            "history_category": list_array(
                sample_offsets, ids("category_id", category[sample_events])
            ),
            "label": (~is_negative).astype(np.float32),
            "timestamp": time[sample],
            ROW_KEY: rows[sample],
        }
    )

    dim = embedding_dim
    size = {name: len(values) + 2 for name, values in vocab.items()}
    schema = Schema(
        features=[
            Feature(
                name=name,
                kind="sparse",
                vocab_size=size[name],
                vocabulary=vocab[name].to_pylist(),
                embedding_dim=dim,
            )
            for name in ("user_id", "item_id", "category_id")
        ]
        + [
            Feature(
                name="history",
                kind="sequence",
                vocab_size=size["item_id"],
                embedding_dim=dim,
                table="item_id",
            ),
            Feature(
                name="history_category",
                kind="sequence",
                vocab_size=size["category_id"],
                embedding_dim=dim,
                table="category_id",
            ),
        ]
    )
    return write_dataset(out, schema, samples, codes[sample])


def _counts(values: np.ndarray) -> pa.Table:
    distinct, counts = np.unique(values, return_counts=True)
    return pa.table({"value": distinct, "count": counts})


def _ranges(starts: np.ndarray, ends: np.ndarray) -> np.ndarray:
    """Concatenation of arange(start, end) over the pairs, without a Python loop."""
    lengths = ends - starts
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    return np.repeat(starts - offsets[:-1], lengths) + np.arange(offsets[-1])
