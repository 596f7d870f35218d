"""Loader memory benchmark: peak RSS and rows/s of `recray data prepare criteo|taobao` on a generated file.

The criteo file has Criteo's format (tab-separated label, I1..I13, C1..C26, empty fields for
missing values); the taobao file UserBehavior.csv's (user,item,category,behavior,timestamp, lines
grouped by user). Both are written in chunks. The loader runs in a child process, so its peak RSS
is the child's alone (resource.getrusage(RUSAGE_CHILDREN) after it exits).

    python benchmarks/loader_memory.py --rows 5000000 --out benchmarks/results/loader_memory.json
    python benchmarks/loader_memory.py --data-set taobao --rows 5000000 \
        --out benchmarks/results/loader_memory_taobao.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pcsv

DENSE = [f"I{i}" for i in range(1, 14)]
CATEGORICAL = [f"C{i}" for i in range(1, 27)]
CHUNK_ROWS = 200_000
# Distinct values per categorical column grow with the rows, as in the real data (Criteo's
# largest columns hold millions of values): about one new value per 20 rows, long-tailed.
ROWS_PER_VALUE = 20


def write_criteo_like(path: Path, rows: int, seed: int = 0, distinct: int | None = None) -> int:
    """Write `rows` Criteo-format lines to `path` (`distinct` values per categorical column at
    most, default rows / ROWS_PER_VALUE); returns the file's size in bytes."""
    rng = np.random.default_rng(seed)
    distinct = distinct or max(rows // ROWS_PER_VALUE, 10)
    options = pcsv.WriteOptions(include_header=False, delimiter="\t", quoting_style="none")
    schema = pa.schema(
        [("label", pa.int64())]
        + [(c, pa.int64()) for c in DENSE]
        + [(c, pa.string()) for c in CATEGORICAL]
    )
    # each column's values: distinct 8-digit hex strings, formatted once
    pools = [
        pa.array(np.char.mod("%08x", (np.arange(distinct) * 2654435761 + k) % (1 << 32)))
        for k in range(len(CATEGORICAL))
    ]
    with pcsv.CSVWriter(path, schema, write_options=options) as writer:
        for start in range(0, rows, CHUNK_ROWS):
            n = min(CHUNK_ROWS, rows - start)
            columns = {"label": pa.array((rng.random(n) < 0.25).astype(np.int64))}
            for name in DENSE:
                columns[name] = pa.array(rng.geometric(0.05, n) - 1, mask=rng.random(n) < 0.2)
            for name, pool in zip(CATEGORICAL, pools, strict=True):
                # Zipf ranks folded into the column's pool: a few frequent values, a long tail
                rank = (rng.zipf(1.2, n) - 1) % distinct
                values = pool.take(pa.array(rank))
                columns[name] = pc.if_else(pa.array(rng.random(n) < 0.05), None, values)
            writer.write_table(pa.table(columns, schema=schema))
    return path.stat().st_size


# UserBehavior.csv's proportions: ~100 lines per user, ~25 lines per item, 9 days, 89% `pv`
TAOBAO_LINES_PER_USER = 100
TAOBAO_LINES_PER_ITEM = 25
TAOBAO_CATEGORIES = 9_439
TAOBAO_SPAN_S = 9 * 86_400
TAOBAO_START = 1_511_539_200  # 2017-11-25
BEHAVIORS = np.array(["pv", "cart", "fav", "buy"])
BEHAVIOR_P = [0.895, 0.055, 0.03, 0.02]


def write_taobao_like(path: Path, rows: int, seed: int = 0, items: int | None = None) -> int:
    """Write `rows` UserBehavior.csv lines to `path`: users in disjoint id ranges per chunk, their
    lines together and in time order; long-tailed item popularity over `items` items (default
    rows / TAOBAO_LINES_PER_ITEM); each item one category except 1% of lines naming another (the
    real file has items in several). Returns the file's size in bytes."""
    rng = np.random.default_rng(seed)
    items = items or max(rows // TAOBAO_LINES_PER_ITEM, 10)
    options = pcsv.WriteOptions(include_header=False, quoting_style="none")
    schema = pa.schema([("user_id", pa.int64()), ("item_id", pa.int64()),
                        ("category_id", pa.int64()), ("behavior_type", pa.string()),
                        ("timestamp", pa.int64())])
    first_user = 1
    with pcsv.CSVWriter(path, schema, write_options=options) as writer:
        for start in range(0, rows, CHUNK_ROWS):
            n = min(CHUNK_ROWS, rows - start)
            users = max(n // TAOBAO_LINES_PER_USER, 1)
            user = first_user + rng.integers(0, users, n)
            first_user += users
            time = TAOBAO_START + rng.integers(0, TAOBAO_SPAN_S, n)
            order = np.lexsort((time, user))
            rank = (rng.zipf(1.3, n) - 1) % items
            item = (rank * 2654435761 + 17) % 5_000_000 + 1  # ranks spread over the id space
            category = item % TAOBAO_CATEGORIES + 1
            other = rng.random(n) < 0.01
            category[other] = rng.integers(1, TAOBAO_CATEGORIES + 1, int(other.sum()))
            behavior = BEHAVIORS[rng.choice(len(BEHAVIORS), n, p=BEHAVIOR_P)]
            writer.write_table(pa.table(
                [user[order], item[order], category[order], pa.array(behavior[order]),
                 time[order]], schema=schema,
            ))
    return path.stat().st_size


def measure(
    rows: int, workdir: Path, block_size: int, seed: int = 0, distinct: int | None = None,
    data_set: str = "criteo", options: dict[str, object] | None = None,
) -> dict[str, object]:
    """Generate the file, prepare it in a child process; peak RSS and throughput of the child.
    `distinct` is the values per categorical column (criteo) or the items (taobao); `options`
    are the loader's keyword arguments."""
    if data_set == "criteo":
        src = workdir / "train.txt"
        size = write_criteo_like(src, rows, seed, distinct)
    else:
        src = workdir / "UserBehavior.csv"
        size = write_taobao_like(src, rows, seed, distinct)
    options = {"block_size": block_size} | (options or {})
    child = (
        "import sys; from recray.data.loaders import prepare; "
        f"prepare({data_set!r}, {str(src)!r}, {str(workdir / 'out')!r}, **{options!r})"
    )
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", child], check=True, stderr=subprocess.DEVNULL)
    seconds = time.perf_counter() - start
    # ru_maxrss is in KiB on Linux; the largest of the waited-for children: only the loader here
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
    result: dict[str, object] = {} if data_set == "criteo" else {"data_set": data_set}
    return result | {
        "rows": rows,
        "peak_rss_bytes": int(peak),
        "rows_per_s": rows / seconds,
        "seconds": seconds,
        "input_bytes": size,
        "block_size": block_size,
    } | ({} if data_set == "criteo" else {"options": options, "output_rows": _output_rows(workdir / "out")})


def _output_rows(out: Path) -> dict[str, int]:
    import pyarrow.parquet as pq

    return {split: pq.ParquetFile(out / f"{split}.parquet").metadata.num_rows
            for split in ("train", "valid", "test")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-set", choices=["criteo", "taobao"], default="criteo")
    parser.add_argument("--rows", type=int, default=5_000_000)
    parser.add_argument("--block-size", type=int, default=4 << 20, help="CSV bytes per chunk")
    parser.add_argument("--workdir", type=Path, help="where the file goes (default: a temp dir)")
    parser.add_argument("--note", default="", help="machine conditions, stored in the JSON")
    parser.add_argument("--out", type=Path, help="default: benchmarks/results/loader_memory.json, "
                        "loader_memory_taobao.json for taobao")
    args = parser.parse_args()
    args.out = args.out or Path("benchmarks/results") / (
        "loader_memory.json" if args.data_set == "criteo" else f"loader_memory_{args.data_set}.json"
    )
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        result = measure(args.rows, Path(tmp), args.block_size, data_set=args.data_set)
    result |= {
        "note": args.note,
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}",
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
