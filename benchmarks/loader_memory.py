"""Loader memory benchmark: peak RSS and rows/s of `recray data prepare criteo` on a generated file.

The file has Criteo's format (tab-separated label, I1..I13, C1..C26, empty fields for missing
values) and is written in chunks. The loader runs in a child process, so its peak RSS is the
child's alone (resource.getrusage(RUSAGE_CHILDREN) after it exits).

    python benchmarks/loader_memory.py --rows 5000000 --out benchmarks/results/loader_memory.json
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


def measure(
    rows: int, workdir: Path, block_size: int, seed: int = 0, distinct: int | None = None
) -> dict[str, object]:
    """Generate the file, prepare it in a child process; peak RSS and throughput of the child."""
    src = workdir / "train.txt"
    size = write_criteo_like(src, rows, seed, distinct)
    child = (
        "import sys; from recray.data.loaders import prepare; "
        f"prepare('criteo', {str(src)!r}, {str(workdir / 'out')!r}, block_size={block_size})"
    )
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", child], check=True, stderr=subprocess.DEVNULL)
    seconds = time.perf_counter() - start
    # ru_maxrss is in KiB on Linux; the largest of the waited-for children: only the loader here
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
    return {
        "rows": rows,
        "peak_rss_bytes": int(peak),
        "rows_per_s": rows / seconds,
        "seconds": seconds,
        "input_bytes": size,
        "block_size": block_size,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=5_000_000)
    parser.add_argument("--block-size", type=int, default=4 << 20, help="CSV bytes per chunk")
    parser.add_argument("--workdir", type=Path, help="where the file goes (default: a temp dir)")
    parser.add_argument("--note", default="", help="machine conditions, stored in the JSON")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/loader_memory.json"))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        result = measure(args.rows, Path(tmp), args.block_size)
    result |= {
        "note": args.note,
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}",
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
