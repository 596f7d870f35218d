"""Streaming loaders: output independent of the chunk size, peak memory that does not grow with rows."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from recray.data.loaders import prepare
from recray.data.loaders.vocab import ValueCounts
from recray.data.schema import Schema

SPLITS = ("train", "valid", "test")
ROOT = Path(__file__).resolve().parents[1]


def load_benchmark():
    spec = importlib.util.spec_from_file_location("loader_memory", ROOT / "benchmarks" / "loader_memory.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def same_output(a: Path, b: Path) -> None:
    for split in SPLITS:
        left, right = pq.read_table(a / f"{split}.parquet"), pq.read_table(b / f"{split}.parquet")
        assert left.equals(right), split
    assert Schema.load(a) == Schema.load(b)


def test_criteo_output_does_not_depend_on_the_chunk_size(tmp_path):
    src = tmp_path / "train.txt"
    load_benchmark().write_criteo_like(src, 3000, seed=1, distinct=300)
    # ~2 KiB chunks: about 200 chunks, every counter merged across them; vs the file in one chunk
    small = prepare("criteo", src, tmp_path / "small", block_size=1 << 11, min_count=3)
    whole = prepare("criteo", src, tmp_path / "whole", block_size=1 << 26, min_count=3)
    assert pq.ParquetFile(small / "train.parquet").num_row_groups > 50
    same_output(small, whole)
    hashed_small = prepare("criteo", src, tmp_path / "hs", block_size=1 << 11, hash_buckets=97)
    hashed_whole = prepare("criteo", src, tmp_path / "hw", block_size=1 << 26, hash_buckets=97)
    same_output(hashed_small, hashed_whole)


def test_criteo_vocabulary_is_the_train_values_seen_min_count_times(tmp_path):
    import pandas as pd

    src = tmp_path / "train.txt"
    load_benchmark().write_criteo_like(src, 2000, seed=2, distinct=200)
    out = prepare("criteo", src, tmp_path / "out", block_size=1 << 12, min_count=3, seed=5)
    frame = pd.read_csv(src, sep="\t", header=None, dtype=str, keep_default_na=False)
    schema = Schema.load(out)
    train = pq.read_table(out / "train.parquet")
    train_rows = train.column("row").to_numpy()
    for c in (1, 7, 26):
        raw = frame[13 + c].to_numpy()  # column 0 is the label, then I1..I13
        counts = pd.Series(raw[train_rows][raw[train_rows] != ""]).value_counts()
        kept = sorted(counts.index[counts >= 3])
        assert schema.feature(f"C{c}").vocabulary == kept
        assert schema.feature(f"C{c}").vocab_size == len(kept) + 2
        index = {v: 2 + i for i, v in enumerate(kept)}
        for split in SPLITS:
            table = pq.read_table(out / f"{split}.parquet")
            rows = table.column("row").to_numpy()
            expected = [0 if v == "" else index.get(v, 1) for v in raw[rows]]
            assert table.column(f"C{c}").to_pylist() == expected
    assert 0 < len(schema.feature("C1").vocabulary) < frame[14].nunique()


def test_value_counts_merge_across_chunks_like_one_count(monkeypatch):
    from collections import Counter

    import pyarrow as pa

    import recray.data.loaders.vocab as vocab

    monkeypatch.setattr(vocab, "MERGE_ROWS", 5)  # merge many times along the way
    rng = np.random.default_rng(0)
    chunks = [rng.integers(0, 50, rng.integers(0, 40)) for _ in range(30)]
    counter = ValueCounts()
    for chunk in chunks:
        counter.add(pa.array(chunk))
    table = counter.table()
    got = dict(zip(table.column("value").to_pylist(), table.column("count").to_pylist(), strict=True))
    assert got == dict(Counter(np.concatenate(chunks).tolist()))


def peak_rss(rows: int, workdir: Path, data_set: str = "criteo", options: dict | None = None) -> dict:
    """The benchmark script in a subprocess: it measures the loader in a child of its own."""
    out = workdir / "result.json"
    code = (
        f"import sys; sys.path.insert(0, {str(ROOT / 'benchmarks')!r}); import loader_memory as m; "
        f"import json; print(json.dumps(m.measure({rows}, __import__('pathlib').Path({str(workdir)!r}), "
        f"{1 << 20}, distinct=2000, data_set={data_set!r}, options={options!r})))"
    )
    result = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
    out.write_text(result.stdout)
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.timeout(900)
def test_criteo_peak_memory_does_not_grow_with_the_rows(tmp_path):
    # 1 MiB chunks and a fixed pool of values: only per-row state could grow. Holding the data
    # whole would add ~160 MB at 4x (about 200 bytes per row parsed); streaming adds a byte of
    # split code and eight of the split's permutation per row.
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    small = peak_rss(100_000, tmp_path / "a")
    large = peak_rss(400_000, tmp_path / "b")
    print("peak RSS 100k rows:", small, "400k rows:", large)
    assert large["peak_rss_bytes"] < small["peak_rss_bytes"] + 60 * 2**20


# --- Taobao ---------------------------------------------------------------------------------------
def write_taobao_ties(path: Path, n: int = 3000, seed: int = 0) -> None:
    """UserBehavior.csv lines grouped by user, times on a 10-minute grid (ties within and across
    users), a long tail of items, 2% of lines naming another category for their item."""
    rng = np.random.default_rng(seed)
    user = np.sort(rng.integers(1, 61, n))
    item = (rng.zipf(1.3, n) % 400) + 7000
    category = item % 13 + 100
    other = rng.random(n) < 0.02
    category[other] = rng.integers(100, 113, int(other.sum()))
    behavior = rng.choice(np.array(["pv"] * 9 + ["buy", "cart", "fav"]), n)
    time = 1_511_539_200 + rng.integers(0, 9 * 24 * 6, n) * 600
    path.write_text("".join(
        f"{u},{i},{c},{b},{t}\n" for u, i, c, b, t in zip(user, item, category, behavior, time,
                                                           strict=True)
    ))


def reference_taobao(path: Path, negatives: int, max_history: int, min_count: int,
                     window_s: int = 3600, seed: int = 0) -> dict[str, list[dict]]:
    """The samples computed over the whole file at once, histories by brute force (pandas reads
    the file; the negatives come from `sample_negatives`, whose draws are keyed on the line)."""
    import pandas as pd

    from recray.data.loaders.taobao import sample_negatives

    frame = pd.read_csv(path, header=None, names=["user", "item", "category", "behavior", "time"])
    category_of = frame.groupby("item")["category"].last()  # the last line wins
    clicks = frame[frame["behavior"] == "pv"]
    user, item, category, time = (clicks[c].to_numpy() for c in ("user", "item", "category", "time"))
    rows = clicks.index.to_numpy()
    bounds = np.quantile(time, [0.8, 0.9], method="lower")
    code = (time > bounds[0]).astype(int) + (time > bounds[1])
    ids = {}
    for name, values in (("user_id", user), ("item_id", item), ("category_id", category)):
        counts = pd.Series(values[code == 0]).value_counts()
        kept = sorted(counts.index[counts >= min_count])
        ids[name] = {v: 2 + i for i, v in enumerate(kept)}
    histories = []
    for u, t in zip(user, time, strict=True):
        earlier = np.flatnonzero((user == u) & (time < t))
        earlier = earlier[np.lexsort((rows[earlier], time[earlier]))][-max_history:]
        histories.append(earlier)
    candidates = np.array([i for i, h in enumerate(histories) if len(h)], dtype=np.int64)
    drawn, complete = sample_negatives(user, item, time, candidates, negatives, window_s, seed,
                                       keys=rows[candidates])
    out: dict[str, list[dict]] = {split: [] for split in SPLITS}
    for c, items, ok in zip(candidates, drawn, complete, strict=True):
        if not ok:
            continue
        h = histories[c]
        for label, it in [(1.0, item[c])] + [(0.0, x) for x in items]:
            out[SPLITS[code[c]]].append({
                "user_id": ids["user_id"].get(user[c], 1),
                "item_id": ids["item_id"].get(it, 1),
                "category_id": ids["category_id"].get(category_of[it], 1),
                "history": [ids["item_id"].get(x, 1) for x in item[h]],
                "history_category": [ids["category_id"].get(x, 1) for x in category[h]],
                "label": label,
                "timestamp": int(time[c]),
                "row": int(rows[c]),
            })
    return out


def by_line(table) -> list[dict]:
    """Rows ordered by line, each positive before its negatives (sort_by is stable)."""
    return table.sort_by([("row", "ascending"), ("label", "descending")]).to_pylist()


def test_taobao_streams_the_whole_file_computation_whatever_the_chunks_and_buckets(
    tmp_path, monkeypatch
):
    import recray.data.loaders.taobao as taobao

    src = tmp_path / "UserBehavior.csv"
    write_taobao_ties(src)
    options = {"negatives": 2, "max_history": 6, "min_count": 2}
    one = prepare("taobao", src, tmp_path / "one", block_size=1 << 26, buckets=1, **options)
    monkeypatch.setattr(taobao, "GROUP_CLICKS", 50)  # many history batches per bucket
    monkeypatch.setattr(taobao, "PARTITION_CLICKS", 40)  # many time spans, windows across them
    monkeypatch.setattr(taobao, "TIME_SAMPLE", 16)  # spans from a sample thinned many times
    many = prepare("taobao", src, tmp_path / "many", block_size=1 << 11, buckets=7, **options)
    assert pq.ParquetFile(many / "train.parquet").num_row_groups > 20
    assert not list(many.glob(".taobao-buckets-*"))  # the bucket files are gone
    expected = reference_taobao(src, 2, 6, 2)
    for split in SPLITS:
        got = by_line(pq.read_table(many / f"{split}.parquet"))
        assert got == expected[split], split
        assert by_line(pq.read_table(one / f"{split}.parquet")) == got, split
        assert len(got) > 100
    assert Schema.load(one) == Schema.load(many)


def loader_peak_rss(data_set: str, src: Path, out: Path, options: dict) -> int:
    """Peak RSS in bytes of a fresh process preparing `src`, as that process reports it."""
    code = (
        "import resource; from recray.data.loaders import prepare; "
        f"prepare({data_set!r}, {str(src)!r}, {str(out)!r}, **{options!r}); "
        "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)"
    )
    result = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
    return int(result.stdout.strip().splitlines()[-1])


def test_taobao_peak_memory_does_not_grow_with_the_rows(tmp_path):
    # One bucket per 20k lines, as the default has one per BUCKET_BYTES of input, and 64 KiB
    # chunks (both files read in several): nothing is held per click of the whole file, so
    # only allocator noise may grow (+5 to +25 MB measured). Holding the samples whole, as the
    # loader did, added ~1.6 GB from 100k to 400k lines (~4.5 kB per click at max_history=50):
    # ~240 MB here.
    peaks, train_rows = [], []
    for rows in (20_000, 80_000):
        src = tmp_path / f"{rows}.csv"
        load_benchmark().write_taobao_like(src, rows, seed=1, items=2000)
        out = tmp_path / f"out{rows}"
        peaks.append(loader_peak_rss("taobao", src, out,
                                     {"block_size": 1 << 16, "buckets": rows // 20_000}))
        train_rows.append(pq.ParquetFile(out / "train.parquet").metadata.num_rows)
    print("taobao peak RSS 20k rows:", peaks[0], "80k rows:", peaks[1])
    assert train_rows[1] > 3 * train_rows[0]
    assert peaks[1] < peaks[0] + 60 * 2**20
