"""Taobao UserBehavior -> next-click CTR samples: each click with its click history, plus negatives
drawn from what other users clicked just before it. Streamed: memory holds one CSV chunk, one
bucket of users and a compact time index of all clicks, never the samples whole."""

from __future__ import annotations

import math
import shutil
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pcsv
from tqdm import tqdm

from recray.data.loaders.common import (
    DROPPED,
    ROW_KEY,
    SplitWriter,
    csv_chunks,
    fixed_split,
    history,
    list_array,
    need_file,
)
from recray.data.loaders.vocab import ValueCounts, check_min_count, frequent_values, vocabulary_ids
from recray.data.schema import Feature, Schema

COLUMNS = ["user_id", "item_id", "category_id", "behavior_type", "timestamp"]
BLOCK_BYTES = 4 << 20  # CSV bytes per chunk: ~120k rows
MAX_DRAWS = 32  # rejection rounds before a positive without a usable negative is left out
# CSV bytes per user bucket when the bucket count is chosen from the file's size: ~1M lines of
# ~32 bytes, ~150 MB of columns once read back and sorted (~150 bytes per click).
BUCKET_BYTES = 32 << 20
# Clicks per history batch within a bucket (whole users): each click can carry max_history
# events in two list columns per sample, so this bounds the samples built at once.
GROUP_CLICKS = 16_384
_CLICK_SCHEMA = pa.schema(
    [(c, pa.int64()) for c in ("user_id", "item_id", "category_id", "timestamp", ROW_KEY, "click")]
)


@dataclass
class ClickIndex:
    """Every click sorted by (time, line), as three int32 columns: 12 bytes per click (16 when the
    clicks span more than 2^31 s). `time` is seconds since `t0`; `item` and `user` are positions
    in the sorted distinct items and users."""

    t0: int
    time: np.ndarray
    item: np.ndarray
    user: np.ndarray

    def offsets(self, time: np.ndarray) -> np.ndarray:
        """`time` as this index's offsets, in its dtype: searchsorted would otherwise copy the index
        to a common dtype on every call."""
        info = np.iinfo(self.time.dtype)
        return np.clip(np.asarray(time, np.int64) - self.t0, info.min, info.max).astype(
            self.time.dtype
        )


def draw_negatives(
    index: ClickIndex,
    user: np.ndarray,
    item: np.ndarray,
    time: np.ndarray,
    keys: np.ndarray,
    negatives: int,
    window_s: int,
    seed: int,
) -> tuple[np.ndarray, np.ndarray]:
    """For each positive (user and item positions as in `index`, raw time), `negatives` item
    positions from the clicks other users made in the `window_s` seconds before it (strictly
    earlier), each click equally likely. The draws of a positive depend only on (`seed`, its
    `key`, the index): the same whichever other positives are drawn alongside.

    Returns ([n_positives, negatives] item positions, -1 where none was found; mask of positives
    that got all of theirs).
    """
    end = np.searchsorted(index.time, index.offsets(time), side="left")  # first click at or after t
    start = np.searchsorted(index.time, index.offsets(np.asarray(time) - window_s), side="left")
    width = end - start
    drawn = np.full((len(keys), negatives), -1, dtype=np.int64)
    found = np.zeros((len(keys), negatives), dtype=bool)
    keys = np.asarray(keys, np.int64)
    # rejection sampling, vectorised: redraw only the slots whose click was the user's own or
    # the positive's item
    for draw in range(MAX_DRAWS):
        row, slot = np.nonzero(~found & (width > 0)[:, None])
        if not len(row):
            break
        u = _uniform(seed, keys[row], slot, draw)
        candidate = start[row] + np.minimum((u * width[row]).astype(np.int64), width[row] - 1)
        ok = (index.user[candidate] != user[row]) & (index.item[candidate] != item[row])
        drawn[row[ok], slot[ok]] = index.item[candidate[ok]]
        found[row[ok], slot[ok]] = True
    return drawn, found.all(axis=1)


def sample_negatives(
    user: np.ndarray,
    item: np.ndarray,
    time: np.ndarray,
    positives: np.ndarray,
    negatives: int,
    window_s: int,
    seed: int,
    keys: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """For each click index in `positives`, `negatives` items from the clicks other users made in
    the `window_s` seconds before it (strictly earlier), each click equally likely: what was
    being clicked at that moment, popularity as of then, never from the future. A short window
    keeps an item's negatives close in time to its positives, so item ids alone tell them apart
    no better than chance. A positive's draws are keyed on `keys` (default: its index).

    Returns ([n_positives, negatives] item ids, mask of positives that got all of theirs): a click
    whose window holds no other user's click of another item gets none.
    """
    items, item_pos = np.unique(item, return_inverse=True)
    _, user_pos = np.unique(user, return_inverse=True)
    order = np.lexsort((np.arange(len(time)), time))
    t0 = int(time.min(initial=0))
    index = ClickIndex(t0, np.asarray(time, np.int64)[order] - t0, item_pos[order], user_pos[order])
    positives = np.asarray(positives, np.int64)
    drawn, complete = draw_negatives(
        index, user_pos[positives], item_pos[positives], time[positives],
        positives if keys is None else keys, negatives, window_s, seed,
    )
    if not len(items):
        return np.zeros_like(drawn), complete
    return np.where(drawn >= 0, items[drawn], 0), complete


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
    buckets: int | None = None,
) -> Path:
    """`src` is UserBehavior.csv or its directory.

    A positive is a `pv` event with at least `min_history` earlier clicks of the same user. Each
    gets `negatives` items (see `sample_negatives`) clicked by others in the `negative_window_s`
    seconds before it; a negative shares the positive's user, history and time, so it also lands
    in the same split. User, item and category ids come from vocabularies of the values clicked
    at least `min_count` times in train: 0 missing, 1 rarer or unseen, 2.. the vocabulary's.

    Streamed in passes: the CSV in chunks into `buckets` files of users (default: one per
    BUCKET_BYTES of input) and a time index of all clicks; then, bucket by bucket, train counts
    for the vocabularies; then, bucket by bucket and whole users at a time, histories, negatives
    and Parquet row groups. Samples come grouped by user, in time order within a user.

    Memory holds one CSV chunk, the distinct items and users, the `ClickIndex` (12 bytes per
    click; ~28 while it is sorted), one bucket (~150 bytes per click in it) and one batch of
    GROUP_CLICKS clicks' samples. With `split_files`, the keys of every click (32 bytes each, and
    `fixed_split`'s working copies) are held while the files are matched.
    """
    if not 0 <= min_history <= max_history:
        raise ValueError(
            f"taobao: min_history={min_history}, expected 0 <= min_history <= max_history={max_history}"
        )
    if negative_window_s < 1:
        raise ValueError(f"taobao: negative_window_s={negative_window_s}, expected at least 1")
    if buckets is not None and buckets < 1:
        raise ValueError(f"taobao: buckets={buckets}, expected at least 1")
    check_min_count(min_count, "taobao")
    src = Path(src)
    path = need_file(src / "UserBehavior.csv" if src.is_dir() else src, "taobao")
    buckets = buckets or max(1, math.ceil(path.stat().st_size / BUCKET_BYTES))
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    temp = Path(tempfile.mkdtemp(prefix=".taobao-buckets-", dir=out))
    try:
        return _prepare(
            path, out, temp, buckets, block_size, split_files, allow_partial_split, seed,
            max_history, min_history, negatives, negative_window_s, min_count, embedding_dim,
        )
    finally:
        shutil.rmtree(temp, ignore_errors=True)


def _prepare(
    path: Path, out: Path, temp: Path, buckets: int, block_size: int,
    split_files: Sequence[Path] | None, allow_partial_split: bool, seed: int, max_history: int,
    min_history: int, negatives: int, negative_window_s: int, min_count: int, embedding_dim: int,
) -> Path:
    files, items, item_categories, users, span = _bucket_clicks(path, temp, buckets, block_size)
    index = _click_index(files, items, users, *span)
    n = len(index.time)

    if split_files is None:  # time quantiles as np.quantile(time, ..., method="lower") finds them
        cut = np.floor(np.array([0.8, 0.9]) * (n - 1)).astype(np.int64) if n else None
        bounds = index.time[cut].astype(np.int64) + index.t0 if n else np.zeros(2, np.int64)
        fixed = None
    else:  # the keys of every click, in bucket order; a key's copies stay in line order
        keys = pa.concat_tables(_read(f, ["user_id", "item_id", "timestamp", ROW_KEY, "click"])
                                for f in files)
        fixed = np.empty(n, dtype=np.int8)
        fixed[keys.column("click").to_numpy()] = fixed_split(
            split_files, keys.drop_columns(["click"]), allow_partial_split
        )
        del keys

    def codes_of(bucket: pa.Table) -> np.ndarray:
        if fixed is not None:
            return fixed[bucket.column("click").to_numpy()]
        if not n:
            return np.zeros(0, dtype=np.int8)
        return np.searchsorted(bounds, bucket.column("timestamp").to_numpy(), side="left").astype(
            np.int8
        )

    counts = {name: ValueCounts() for name in ("user_id", "item_id", "category_id")}
    for f in tqdm(files, desc="taobao: counting train values", unit="bucket"):
        bucket = _read(f, ["user_id", "item_id", "category_id", "timestamp", "click"])
        train = pa.array(codes_of(bucket) == 0)
        for name, counter in counts.items():
            counter.add(bucket.column(name).filter(train))
    vocab = {name: frequent_values(c.table(), min_count) for name, c in counts.items()}
    del counts
    # ids per distinct item, once: samples then look ids up by position (pyarrow's index_in
    # would rebuild its hash table of the vocabulary on every call)
    item_ids = vocabulary_ids(vocab["item_id"], pa.array(items))
    item_category_ids = vocabulary_ids(vocab["category_id"], pa.array(item_categories))

    dim = embedding_dim
    size = {name: len(values) + 2 for name, values in vocab.items()}
    schema = Schema(
        features=[
            Feature(name=name, kind="sparse", vocab_size=size[name],
                    vocabulary=vocab[name].to_pylist(), embedding_dim=dim)
            for name in ("user_id", "item_id", "category_id")
        ]
        + [
            Feature(name="history", kind="sequence", vocab_size=size["item_id"],
                    embedding_dim=dim, table="item_id"),
            Feature(name="history_category", kind="sequence", vocab_size=size["category_id"],
                    embedding_dim=dim, table="category_id"),
        ]
    )
    writer = SplitWriter(out, schema)
    named_short = left_out = positives = 0
    for f in tqdm(files, desc=f"taobao: writing {out}", unit="bucket"):
        bucket = _read(f, [c.name for c in _CLICK_SCHEMA])
        order = np.lexsort(
            [bucket.column(c).to_numpy() for c in (ROW_KEY, "timestamp", "user_id")]
        )  # by user, then time, then line
        user = bucket.column("user_id").to_numpy()[order]
        item_pos = np.searchsorted(items, bucket.column("item_id").to_numpy()[order])
        clicks = {
            "user": user,
            "user_pos": np.searchsorted(users, user),
            "user_id": vocabulary_ids(vocab["user_id"], pa.array(user)),
            "item_pos": item_pos,
            "item_id": item_ids[item_pos],
            "category_id": vocabulary_ids(
                vocab["category_id"], pa.array(bucket.column("category_id").to_numpy()[order])
            ),
            "time": bucket.column("timestamp").to_numpy()[order],
            "row": bucket.column(ROW_KEY).to_numpy()[order],
            "code": codes_of(bucket)[order],
        }
        del bucket, order
        for lo, hi in _user_groups(user, GROUP_CLICKS):
            group = {name: values[lo:hi] for name, values in clicks.items()}
            table, codes, short, candidates, kept = _samples(
                group, index, item_ids, item_category_ids, max_history, min_history, negatives,
                negative_window_s, seed,
            )
            writer.write(table, codes)
            named_short += short
            positives += candidates
            left_out += candidates - kept
    if not n:  # no clicks: empty split files all the same
        writer.write(_samples(_no_clicks(), index, item_ids, item_category_ids, max_history,
                              min_history, negatives, negative_window_s, seed)[0],
                     np.zeros(0, np.int8))
    if split_files is not None:  # rows the files name that cannot be samples: say how many
        print(
            f"taobao: {named_short} clicks named by split_files have fewer than "
            f"min_history={min_history} earlier clicks and are left out",
            file=sys.stderr,
        )
    if negatives and left_out:
        print(
            f"taobao: {left_out} of {positives} positives are left out: no other user's click "
            f"of another item in the {negative_window_s} s before them",
            file=sys.stderr,
        )
    return writer.close()


def _bucket_clicks(
    path: Path, temp: Path, buckets: int, block_size: int
) -> tuple[list[Path], np.ndarray, np.ndarray, np.ndarray, tuple[int, int, int]]:
    """Pass 1: the `pv` events (user, item, category, timestamp, row = 0-based line, click =
    0-based click number) into Arrow files by hash of user, in line order within each file.
    Returns the files, every item (sorted) with its category (from every behaviour; the last line
    wins if an item has several), every clicking user (sorted), and (clicks, first and last
    click time)."""
    files = [temp / f"bucket-{b:05d}.arrow" for b in range(buckets)]
    writers = [pa.ipc.new_file(f, _CLICK_SCHEMA) for f in files]
    item_category, clicking = _Latest(), _Latest()
    start = clicked = 0
    t0, t1 = np.iinfo(np.int64).max, np.iinfo(np.int64).min
    chunks = csv_chunks(
        path,
        pcsv.ReadOptions(column_names=COLUMNS, block_size=block_size),
        pcsv.ParseOptions(),
        pcsv.ConvertOptions(
            column_types=dict.fromkeys(COLUMNS, pa.int64()) | {"behavior_type": pa.string()}
        ),
    )
    try:
        for chunk in tqdm(chunks, desc="taobao: reading clicks", unit="chunk"):
            item_category.add(chunk.column("item_id").to_numpy(),
                              chunk.column("category_id").to_numpy())
            is_click = pc.equal(chunk.column("behavior_type"), "pv").to_numpy()
            columns = {
                c: chunk.column(c).to_numpy()[is_click]
                for c in ("user_id", "item_id", "category_id", "timestamp")
            }
            columns[ROW_KEY] = np.arange(start, start + chunk.num_rows)[is_click]
            columns["click"] = np.arange(clicked, clicked + len(columns[ROW_KEY]))
            start += chunk.num_rows
            clicked += len(columns["click"])
            clicking.add(columns["user_id"])
            if len(columns["timestamp"]):
                t0 = min(t0, int(columns["timestamp"].min()))
                t1 = max(t1, int(columns["timestamp"].max()))
            bucket = _bucket_of(columns["user_id"], buckets)
            order = np.argsort(bucket, kind="stable")  # line order kept within a bucket
            ends = np.cumsum(np.bincount(bucket, minlength=buckets))
            for b, (lo, hi) in enumerate(zip(np.r_[0, ends[:-1]], ends, strict=True)):
                if hi > lo:
                    take = order[lo:hi]
                    writers[b].write_batch(pa.record_batch(
                        [pa.array(columns[c.name][take]) for c in _CLICK_SCHEMA],
                        schema=_CLICK_SCHEMA,
                    ))
    finally:
        for w in writers:
            w.close()
    items, categories = item_category.result()
    return files, items, categories, clicking.result()[0], (clicked, t0, t1)


def _click_index(
    files: list[Path], items: np.ndarray, users: np.ndarray, n: int, t0: int, t1: int
) -> ClickIndex:
    """Pass 2: the `ClickIndex` from the bucket files. Sorting it holds ~28 bytes per click for a
    moment (the permutation and one column's copy beside the three columns)."""
    t0 = t0 if n else 0
    dtype = np.int32 if t1 - t0 < 2**31 else np.int64
    time = np.empty(n, dtype=dtype)
    item = np.empty(n, dtype=np.int32)
    user = np.empty(n, dtype=np.int32)
    for f in tqdm(files, desc="taobao: indexing clicks by time", unit="bucket"):
        bucket = _read(f, ["click", "timestamp", "item_id", "user_id"])
        click = bucket.column("click").to_numpy()
        time[click] = bucket.column("timestamp").to_numpy() - t0
        item[click] = np.searchsorted(items, bucket.column("item_id").to_numpy())
        user[click] = np.searchsorted(users, bucket.column("user_id").to_numpy())
    order = np.argsort(time, kind="stable")  # ties in time stay in line order
    time = time[order]  # one column's copy at a time
    item = item[order]
    user = user[order]
    return ClickIndex(t0, time, item, user)


def _samples(
    clicks: dict[str, np.ndarray],
    index: ClickIndex,
    item_ids: np.ndarray,
    item_category_ids: np.ndarray,
    max_history: int,
    min_history: int,
    negatives: int,
    window_s: int,
    seed: int,
) -> tuple[pa.Table, np.ndarray, int, int, int]:
    """The samples of whole users' clicks sorted by (user, time, line): each kept positive
    followed by its negatives. Returns (table, split codes, clicks named by a split but with too
    short a history, positives with a long enough history, positives that got their negatives)."""
    user, time, code = clicks["user"], clicks["time"], clicks["code"]
    offsets, events = history(user, time, user, time, max_history)
    short = np.diff(offsets) < min_history
    candidates = np.flatnonzero(~short & (code != DROPPED))
    drawn, complete = draw_negatives(
        index, clicks["user_pos"][candidates], clicks["item_pos"][candidates], time[candidates],
        clicks["row"][candidates], negatives, window_s, seed,
    )
    kept, drawn = candidates[complete], drawn[complete]

    group = 1 + negatives
    sample = np.repeat(kept, group)
    sample_item = clicks["item_pos"][sample]
    is_negative = np.tile(np.arange(group) > 0, len(kept))
    sample_item[is_negative] = drawn.ravel()
    sample_offsets = np.concatenate([[0], np.cumsum(np.diff(offsets)[sample])])
    sample_events = events[_ranges(offsets[sample], offsets[sample + 1])]
    table = pa.table(
        {
            "user_id": clicks["user_id"][sample],
            "item_id": item_ids[sample_item],
            "category_id": item_category_ids[sample_item],
            "history": list_array(sample_offsets, clicks["item_id"][sample_events]),
            "history_category": list_array(sample_offsets, clicks["category_id"][sample_events]),
            "label": (~is_negative).astype(np.float32),
            "timestamp": time[sample],
            ROW_KEY: clicks["row"][sample],
        }
    )
    named_short = int((short & (code != DROPPED)).sum())
    return table, code[sample], named_short, len(candidates), len(kept)


def _no_clicks() -> dict[str, np.ndarray]:
    return {name: np.zeros(0, np.int64) for name in
            ("user", "user_pos", "user_id", "item_pos", "item_id", "category_id", "time", "row")} | {
        "code": np.zeros(0, np.int8)}


def _user_groups(user: np.ndarray, size: int) -> list[tuple[int, int]]:
    """[lo, hi) slices of `user` (sorted) of about `size` rows each, cut only where the user
    changes, so that a user's history lies within its slice."""
    if not len(user):
        return []
    starts = np.flatnonzero(np.r_[True, user[1:] != user[:-1]])
    first = np.searchsorted(starts, np.arange(0, len(user), size))  # first user start >= target
    cuts = np.unique(starts[first[first < len(starts)]])
    return list(zip(cuts.tolist(), [*cuts[1:].tolist(), len(user)], strict=True))


class _Latest:
    """Each distinct key (sorted) with the value of its latest `add`, over chunks fed one at a
    time; memory ~ distinct keys. Chunks wait until they hold as many keys as the merged arrays,
    then merge, so the merges cost amortised O(1) per key (merging every chunk into millions of
    items would sort them all each time)."""

    def __init__(self) -> None:
        self._keys: list[np.ndarray] = []  # newest first; [-1] is the merged part
        self._values: list[np.ndarray] = []
        self._merged = self._pending = 0

    def add(self, keys: np.ndarray, values: np.ndarray | None = None) -> None:
        self._keys.insert(0, keys[::-1])  # newest lines first: np.unique keeps each key's first
        self._values.insert(0, (keys if values is None else values)[::-1])
        self._pending += len(keys)
        if self._pending >= max(self._merged, 1 << 16):
            self._merge()

    def _merge(self) -> None:
        keys, first = np.unique(np.concatenate(self._keys or [np.zeros(0, np.int64)]),
                                return_index=True)
        values = np.concatenate(self._values or [np.zeros(0, np.int64)])[first]
        self._keys, self._values = [keys], [values]
        self._merged, self._pending = len(keys), 0

    def result(self) -> tuple[np.ndarray, np.ndarray]:
        self._merge()
        return self._keys[0], self._values[0]


def _bucket_of(user: np.ndarray, buckets: int) -> np.ndarray:
    return (_mix(user.astype(np.uint64)) % np.uint64(buckets)).astype(np.int64)


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser, elementwise on uint64 (wrapping): numpy's generators draw one
    stream at a time, while a positive's draws must depend on its own key alone."""
    with np.errstate(over="ignore"):
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31))


def _uniform(seed: int, key: np.ndarray, slot: np.ndarray, draw: int) -> np.ndarray:
    """A uniform [0, 1) number per (seed, key, slot, draw), from a chain of splitmix64 mixes."""
    golden = np.uint64(0x9E3779B97F4A7C15)
    with np.errstate(over="ignore"):
        h = _mix(np.full(len(key), seed % 2**64, dtype=np.uint64) + golden)
        h = _mix((h ^ key.astype(np.uint64)) + golden)
        h = _mix((h ^ ((slot.astype(np.uint64) << np.uint64(32)) | np.uint64(draw))) + golden)
    return (h >> np.uint64(11)).astype(np.float64) * 2.0**-53


def _read(path: Path, columns: list[str]) -> pa.Table:
    # memory-mapped, not read: the columns left unselected are never loaded
    return pa.ipc.open_file(pa.memory_map(str(path))).read_all().select(columns)


def _ranges(starts: np.ndarray, ends: np.ndarray) -> np.ndarray:
    """Concatenation of arange(start, end) over the pairs, without a Python loop."""
    lengths = ends - starts
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    return np.repeat(starts - offsets[:-1], lengths) + np.arange(offsets[-1])
