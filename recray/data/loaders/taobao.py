"""Taobao UserBehavior -> next-click CTR samples: each click with its click history, plus negatives
drawn from what other users clicked just before it. Streamed: memory holds one CSV chunk, one
bucket of users or one span of time, never the samples whole."""

from __future__ import annotations

import math
import shutil
import sys
import tempfile
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
# Clicks per time partition for drawing negatives: each partition is sorted whole with the
# clicks of the window before it (~40 bytes per click).
PARTITION_CLICKS = 1 << 21
# Click times kept from the first pass to choose the time partitions' bounds.
TIME_SAMPLE = 1 << 16
# Clicks per history batch within a bucket (whole users): each click can carry max_history
# events in two list columns per sample, so this bounds the samples built at once.
GROUP_CLICKS = 16_384
_CLICK_SCHEMA = pa.schema(
    [(c, pa.int64()) for c in ("user_id", "item_id", "category_id", "timestamp", ROW_KEY, "click")]
)


def draw_negatives(
    pool_time: np.ndarray,
    pool_item: np.ndarray,
    pool_user: np.ndarray,
    user: np.ndarray,
    item: np.ndarray,
    time: np.ndarray,
    keys: np.ndarray,
    negatives: int,
    window_s: int,
    seed: int,
) -> tuple[np.ndarray, np.ndarray]:
    """For each positive (`user`, `item`, `time`), `negatives` items from the clicks other users
    made in the `window_s` seconds before it (strictly earlier), each click equally likely.
    `pool_*` are clicks sorted by (time, line) holding every click of each positive's window.
    The draws of a positive depend only on (`seed`, its `key`, its window's clicks): the same
    whichever other positives are drawn alongside, and whatever else the pool holds.

    Returns ([n_positives, negatives] items, 0 where none was found; mask of positives that got
    all of theirs).
    """
    time = np.asarray(time, np.int64)
    end = np.searchsorted(pool_time, time, side="left")  # first click at or after t
    start = np.searchsorted(pool_time, time - window_s, side="left")
    width = end - start
    drawn = np.zeros((len(keys), negatives), dtype=np.int64)
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
        ok = (pool_user[candidate] != user[row]) & (pool_item[candidate] != item[row])
        drawn[row[ok], slot[ok]] = pool_item[candidate[ok]]
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
    order = np.lexsort((np.arange(len(time)), time))
    positives = np.asarray(positives, np.int64)
    return draw_negatives(
        np.asarray(time, np.int64)[order], item[order], user[order], user[positives],
        item[positives], time[positives], positives if keys is None else keys, negatives,
        window_s, seed,
    )


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

    Streamed in passes over temporary Arrow files in `out` (deleted at the end): the CSV in
    chunks into `buckets` files of users (default: one per BUCKET_BYTES of input); the buckets
    into files of time spans (PARTITION_CLICKS clicks each); span by span in time order, with
    the clicks of the window before it, every click's negatives, into files by user bucket
    again; bucket by bucket, train counts for the vocabularies; then, bucket by bucket and whole
    users at a time, histories and Parquet row groups. Samples come grouped by user, in time
    order within a user.

    Memory holds one CSV chunk, the distinct items, one bucket (~150 bytes per click in it) or
    one time span, and one batch of GROUP_CLICKS clicks' samples: it does not grow with the
    file. With `split_files`, the keys of every click (32 bytes each, and `fixed_split`'s
    working copies) are held while the files are matched, and a split code per click after.
    Disk holds ~100 bytes per click (plus 8 per negative) until the end.
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
    files, items, item_categories, n, times = _bucket_clicks(path, temp, buckets, block_size)
    spans = _time_partitions(files, temp, times, n)
    # time quantiles as np.quantile(time, ..., method="lower") finds them
    cut = np.floor(np.array([0.8, 0.9]) * (n - 1)).astype(np.int64)
    bounds, drawn_files = _negatives(spans, temp, buckets, cut, negatives, negative_window_s, seed)

    fixed = None
    if split_files is not None:  # the keys of every click, in bucket order; copies in line order
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
    for b, f in enumerate(tqdm(files, desc=f"taobao: writing {out}", unit="bucket")):
        bucket = _read(f, [c.name for c in _CLICK_SCHEMA])
        order = np.lexsort(
            [bucket.column(c).to_numpy() for c in (ROW_KEY, "timestamp", "user_id")]
        )  # by user, then time, then line
        item_pos = np.searchsorted(items, bucket.column("item_id").to_numpy()[order])
        clicks = {
            "user": bucket.column("user_id").to_numpy()[order],
            "item_pos": item_pos,
            "item_id": item_ids[item_pos],
            "category_id": vocabulary_ids(
                vocab["category_id"], pa.array(bucket.column("category_id").to_numpy()[order])
            ),
            "time": bucket.column("timestamp").to_numpy()[order],
            "row": bucket.column(ROW_KEY).to_numpy()[order],
            "code": codes_of(bucket)[order],
        }
        clicks["user_id"] = vocabulary_ids(vocab["user_id"], pa.array(clicks["user"]))
        del bucket, order, item_pos
        drawn = _drawn_of(drawn_files[b] if drawn_files else None, clicks["row"], items, negatives)
        for lo, hi in _user_groups(clicks["user"], GROUP_CLICKS):
            table, codes, short, candidates, kept = _samples(
                {name: values[lo:hi] for name, values in clicks.items()},
                tuple(values[lo:hi] for values in drawn), item_ids, item_category_ids,
                max_history, min_history, negatives,
            )
            writer.write(table, codes)
            named_short += short
            positives += candidates
            left_out += candidates - kept
    if not n:  # no clicks: empty split files all the same
        empty = _drawn_of(None, np.zeros(0, np.int64), items, negatives)
        writer.write(*_samples(_no_clicks(), empty, item_ids, item_category_ids, max_history,
                               min_history, negatives)[:2])
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
) -> tuple[list[Path], np.ndarray, np.ndarray, int, np.ndarray]:
    """Pass 1: the `pv` events (user, item, category, timestamp, row = 0-based line, click =
    0-based click number) into Arrow files by hash of user, in line order within each file.
    Returns the files, every item (sorted) with its category (from every behaviour; the last line
    wins if an item has several), the number of clicks, and the times of up to 2 * TIME_SAMPLE
    clicks spread evenly over them (every stride-th click, the stride doubling as they come)."""
    files = [temp / f"bucket-{b:05d}.arrow" for b in range(buckets)]
    writers = [pa.ipc.new_file(f, _CLICK_SCHEMA) for f in files]
    item_category = _Latest()
    start = clicked = 0
    sample: list[np.ndarray] = []
    sampled, stride = 0, 1
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
            every = columns["click"] % stride == 0
            sample.append(np.stack([columns["click"][every], columns["timestamp"][every]]))
            sampled += int(every.sum())
            if sampled > 2 * TIME_SAMPLE:
                stride *= 2
                kept = np.concatenate(sample, axis=1)
                sample = [kept[:, kept[0] % stride == 0]]
                sampled = sample[0].shape[1]
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
    times = np.concatenate(sample, axis=1)[1] if sample else np.zeros(0, np.int64)
    return files, items, categories, clicked, times


_SPAN_SCHEMA = pa.schema([(c, pa.int64()) for c in ("timestamp", "item_id", "user_id", ROW_KEY)])


def _time_partitions(files: list[Path], temp: Path, times: np.ndarray, n: int) -> list[Path]:
    """Pass 2: the clicks of the user buckets into files of consecutive time spans of about
    PARTITION_CLICKS clicks (bounds from the sampled `times`), in time order."""
    parts = max(1, math.ceil(n / PARTITION_CLICKS))
    bounds = (np.unique(np.quantile(times, np.arange(1, parts) / parts, method="lower"))
              if len(times) else np.zeros(0, np.int64))
    spans = [temp / f"span-{k:05d}.arrow" for k in range(len(bounds) + 1)]
    writers = [pa.ipc.new_file(f, _SPAN_SCHEMA) for f in spans]
    try:
        for f in tqdm(files, desc="taobao: spreading clicks over time spans", unit="bucket"):
            bucket = _read(f, _SPAN_SCHEMA.names)
            span = np.searchsorted(bounds, bucket.column("timestamp").to_numpy(), side="right")
            for k in np.unique(span):
                writers[k].write_table(bucket.filter(pa.array(span == k)))
    finally:
        for w in writers:
            w.close()
    return spans


_DRAWN_ROW = "row"


def _negatives(
    spans: list[Path], temp: Path, buckets: int, cut: np.ndarray, negatives: int, window_s: int,
    seed: int,
) -> tuple[np.ndarray, list[Path]]:
    """Pass 3: span by span in time order, each click's negatives drawn from its span and the
    clicks of the window before it, into files by user bucket (row, complete, items). Returns
    the times at positions `cut` of all clicks sorted by time, and the files (none without
    negatives)."""
    schema = pa.schema([(_DRAWN_ROW, pa.int64()), ("complete", pa.bool_())]
                       + [(f"negative{k}", pa.int64()) for k in range(negatives)])
    files = [temp / f"negatives-{b:05d}.arrow" for b in range(buckets)] if negatives else []
    writers = [pa.ipc.new_file(f, schema) for f in files]
    bounds = np.zeros(len(cut), np.int64)
    tail = {c: np.zeros(0, np.int64) for c in _SPAN_SCHEMA.names}
    seen = 0
    try:
        for f in tqdm(spans, desc="taobao: drawing negatives", unit="span"):
            table = _read(f, _SPAN_SCHEMA.names)
            if not table.num_rows:
                continue
            span = {c: table.column(c).to_numpy() for c in _SPAN_SCHEMA.names}
            del table
            order = np.lexsort((span[ROW_KEY], span["timestamp"]))
            span = {c: v[order] for c, v in span.items()}
            time = span["timestamp"]
            hit = (cut >= seen) & (cut < seen + len(time))
            bounds[hit] = time[cut[hit] - seen]
            seen += len(time)
            # every earlier span's clicks that can be in a window of this span's: all earlier
            keep = tail["timestamp"] >= time[0] - window_s
            pool = {c: np.concatenate([tail[c][keep], span[c]]) for c in _SPAN_SCHEMA.names}
            if negatives:
                drawn, complete = draw_negatives(
                    pool["timestamp"], pool["item_id"], pool["user_id"], span["user_id"],
                    span["item_id"], time, span[ROW_KEY], negatives, window_s, seed,
                )
                bucket = _bucket_of(span["user_id"], buckets)
                for b in np.unique(bucket):
                    at = bucket == b
                    writers[b].write_batch(pa.record_batch(
                        [pa.array(span[ROW_KEY][at]), pa.array(complete[at])]
                        + [pa.array(drawn[at, k]) for k in range(negatives)],
                        schema=schema,
                    ))
            tail = pool
    finally:
        for w in writers:
            w.close()
    return bounds, files


def _drawn_of(
    path: Path | None, rows: np.ndarray, items: np.ndarray, negatives: int
) -> tuple[np.ndarray, np.ndarray]:
    """The negatives (item positions in `items`, [len(rows), negatives]) and completeness drawn
    for each of `rows`, from a user bucket's negatives file."""
    if path is None:  # no negatives: every positive has all of its none
        return np.zeros((len(rows), 0), np.int64), np.ones(len(rows), dtype=bool)
    table = _read(path, [_DRAWN_ROW, "complete", *(f"negative{k}" for k in range(negatives))])
    drawn_rows = table.column(_DRAWN_ROW).to_numpy()
    by_row = np.argsort(drawn_rows)
    at = by_row[np.searchsorted(drawn_rows, rows, sorter=by_row)]
    drawn = np.stack([table.column(f"negative{k}").to_numpy()[at] for k in range(negatives)],
                     axis=1)
    return np.searchsorted(items, drawn), table.column("complete").to_numpy()[at]


def _samples(
    clicks: dict[str, np.ndarray],
    drawn: tuple[np.ndarray, np.ndarray],
    item_ids: np.ndarray,
    item_category_ids: np.ndarray,
    max_history: int,
    min_history: int,
    negatives: int,
) -> tuple[pa.Table, np.ndarray, int, int, int]:
    """The samples of whole users' clicks sorted by (user, time, line), with each click's drawn
    negatives (item positions) and whether it got all: each kept positive followed by its
    negatives. Returns (table, split codes, clicks named by a split but with too short a
    history, positives with a long enough history, positives that got their negatives)."""
    user, time, code = clicks["user"], clicks["time"], clicks["code"]
    offsets, events = history(user, time, user, time, max_history)
    short = np.diff(offsets) < min_history
    candidates = np.flatnonzero(~short & (code != DROPPED))
    kept = candidates[drawn[1][candidates]]

    group = 1 + negatives
    sample = np.repeat(kept, group)
    sample_item = clicks["item_pos"][sample]
    is_negative = np.tile(np.arange(group) > 0, len(kept))
    sample_item[is_negative] = drawn[0][kept].ravel()
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
            ("user", "user_id", "item_pos", "item_id", "category_id", "time", "row")} | {
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
