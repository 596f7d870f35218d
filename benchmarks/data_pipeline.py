"""Data-path benchmark on one core: bare Parquet read vs our Parquet -> KJT vs Arrow -> KJT vs pandas/padded.

Shape: 26 single-id sparse columns + 1 `list<int64>` history of mean length 50 (lengths uniform in
[0, 100]) + a label. Every variant produces tensors a model could consume; throughput in rows/s.

    python benchmarks/data_pipeline.py --rows 300000 --out benchmarks/results/data_pipeline.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from recray.data.jagged import to_batch
from recray.data.schema import Feature, Schema

NUM_SPARSE = 26
VOCAB = 100_000


def make_table(rows: int, mean_history: int, seed: int = 0) -> pa.Table:
    rng = np.random.default_rng(seed)
    columns = {f"c{i}": pa.array(rng.integers(VOCAB, size=rows)) for i in range(NUM_SPARSE)}
    lengths = rng.integers(0, 2 * mean_history + 1, size=rows)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
    history = rng.integers(VOCAB, size=int(offsets[-1]))
    columns["history"] = pa.ListArray.from_arrays(pa.array(offsets), pa.array(history))
    columns["label"] = pa.array(rng.random(rows) < 0.3, pa.float32())
    return pa.table(columns)


def make_schema() -> Schema:
    features = [Feature(name=f"c{i}", kind="sparse", vocab_size=VOCAB) for i in range(NUM_SPARSE)]
    features.append(Feature(name="history", kind="sequence", vocab_size=VOCAB, table="c0"))
    return Schema(features=features, labels=["label"])


def best_seconds(variants: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Best-of-`repeats` seconds per variant, run round-robin so that drift in clock speed or
    cache state over the run cannot favour whichever variant happens to run first."""
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(repeats):
        for name, fn in variants.items():
            started = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - started)
    return {name: min(t) for name, t in times.items()}


def pandas_padded(table: pa.Table, batch_size: int) -> None:
    """The common baseline: to pandas, then pad the history to the batch's longest row."""
    frame = table.to_pandas()
    sparse_cols = [f"c{i}" for i in range(NUM_SPARSE)]
    for start in range(0, len(frame), batch_size):
        chunk = frame.iloc[start:start + batch_size]
        torch.as_tensor(chunk[sparse_cols].to_numpy())
        seqs = chunk["history"].tolist()
        padded = np.zeros((len(seqs), max((len(s) for s in seqs), default=0)), np.int64)
        for row, seq in enumerate(seqs):
            padded[row, : len(seq)] = seq
        torch.as_tensor(padded)
        torch.as_tensor(chunk["label"].to_numpy())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=300_000)
    parser.add_argument("--batch-size", type=int, default=8192)
    parser.add_argument("--mean-history", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/data_pipeline.json"))
    args = parser.parse_args()

    # One core for every variant: the comparison is per core.
    torch.set_num_threads(1)
    pa.set_cpu_count(1)
    pa.set_io_thread_count(1)
    schema = make_schema()
    table = make_table(args.rows, args.mean_history)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "bench.parquet")
        pq.write_table(table, path, row_group_size=args.batch_size * 8)
        in_memory = table.to_batches(max_chunksize=args.batch_size)

        def bare_read() -> None:
            for _ in pq.ParquetFile(path).iter_batches(batch_size=args.batch_size, use_threads=False):
                pass

        def parquet_to_kjt() -> None:
            for rb in pq.ParquetFile(path).iter_batches(batch_size=args.batch_size, use_threads=False):
                to_batch(rb, schema)

        def arrow_to_kjt() -> None:
            for rb in in_memory:
                to_batch(rb, schema)

        def read_table_then_kjt() -> None:
            for rb in pq.read_table(path, use_threads=False).to_batches(args.batch_size):
                to_batch(rb, schema)

        variants = {
            "parquet_bare_read": bare_read,
            "parquet_to_kjt": parquet_to_kjt,
            "parquet_read_table_to_kjt": read_table_then_kjt,
            "arrow_to_kjt": arrow_to_kjt,
            "pandas_padded": lambda: pandas_padded(table, args.batch_size),
        }
        arrow_to_kjt()  # warm-up: first TorchRec/KJT calls pay one-off costs
        seconds = best_seconds(variants, args.repeats)
    rows_per_s = {name: args.rows / s for name, s in seconds.items()}
    result = {
        "benchmark": "data_pipeline",
        "rows": args.rows,
        "batch_size": args.batch_size,
        "sparse_columns": NUM_SPARSE,
        "mean_history": args.mean_history,
        "threads": 1,
        "seconds_best_of": args.repeats,
        "rows_per_s": rows_per_s,
        "ratios": {
            "parquet_to_kjt_vs_bare_read": rows_per_s["parquet_to_kjt"] / rows_per_s["parquet_bare_read"],
            "arrow_to_kjt_vs_pandas_padded": rows_per_s["arrow_to_kjt"] / rows_per_s["pandas_padded"],
            "parquet_to_kjt_vs_pandas_padded": rows_per_s["parquet_to_kjt"] / rows_per_s["pandas_padded"],
        },
        "goals": {
            "parquet_to_kjt_vs_bare_read": ">= 0.9",
            "arrow_to_kjt_rows_per_s": ">= 3e6",
            "arrow_to_kjt_vs_pandas_padded": ">= 10",
        },
        "machine": {"cpu": platform.processor() or platform.machine(), "cores_visible": os.cpu_count(),
                    "torch": torch.__version__, "pyarrow": pa.__version__},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(json.dumps({"rows_per_s": {k: round(v) for k, v in rows_per_s.items()},
                      "ratios": {k: round(v, 2) for k, v in result["ratios"].items()}}, indent=2))


if __name__ == "__main__":
    main()
