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


def peak_rss(rows: int, workdir: Path) -> dict:
    """The benchmark script in a subprocess: it measures the loader in a child of its own."""
    out = workdir / "result.json"
    code = (
        f"import sys; sys.path.insert(0, {str(ROOT / 'benchmarks')!r}); import loader_memory as m; "
        f"import json; print(json.dumps(m.measure({rows}, __import__('pathlib').Path({str(workdir)!r}), "
        f"{1 << 20}, distinct=2000)))"
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
