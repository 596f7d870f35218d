"""Embedding tables bigger than a worker: 2 sharded workers train tables 1.8x one worker's budget.

    python benchmarks/embedding_capacity.py --out benchmarks/results/embedding_capacity.json

The simulated world's user_id and item_id tables are enlarged to --table-gib in all (the data and
its used ids stay the same; the extra rows are never looked up). With sharding.memory_per_worker
set to 1/1.8 of the tables, TorchRec's planner must split them over the two workers; the same
config on one worker is refused before training. Each worker's peak RSS is the kernel's
high-water mark (VmHWM in /proc) read while it runs. The same model with the world's small tables
trains beside it: both start every used row from the same values (sharding.init_scale_rows), so
the test AUCs must agree. The absolute bound (peak RSS < 0.6x the tables) needs tables well past
the ~0.7 GB a worker holds before any table (Python, torch, TorchRec, Ray): about 10 GiB.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import threading
import time
from pathlib import Path

import yaml

from recray.data.simulate import WorldConfig, simulate
from recray.platform.config import ConfigError, TrainConfig
from recray.platform.train import fit, validate

WORKER_TITLE = b"RayTrainWorker"
BYTES_PER_ROW = 16 * 4  # the simulated world's embedding dim, fp32


def enlarge_tables(src: Path, out: Path, rows: dict[str, int]) -> Path:
    """A data folder with src's Parquet files (linked) and a schema whose tables have `rows`."""
    out.mkdir(parents=True, exist_ok=True)
    for split in ("train", "valid", "test"):
        link = out / f"{split}.parquet"
        if not link.exists():
            link.symlink_to(src / f"{split}.parquet")
    schema = yaml.safe_load((src / "schema.yaml").read_text())
    for feature in schema["features"]:
        table = feature.get("table") or feature["name"]
        if table in rows:
            feature["vocab_size"] = rows[table]
    (out / "schema.yaml").write_text(yaml.safe_dump(schema, sort_keys=False))
    return out


def _descends_from(pid: int, ancestor: int) -> bool:
    """Whether `ancestor` is among pid's parents (a local Ray's raylet is a child of its driver)."""
    for _ in range(16):
        try:
            pid = int((Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            return False
        if pid == ancestor:
            return True
        if pid <= 1:
            return False
    return False


class WorkerPeakRSS:
    """Polls the VmHWM (the kernel's peak-RSS mark) of this process's Ray Train workers until stopped.

    Only workers descending from this driver count: other Ray clusters on the machine are not
    ours. VmHWM only grows, so the last reading of each worker is its peak up to that moment;
    what a worker adds in its last poll interval before exiting is missed.
    """

    def __init__(self, interval_s: float = 0.25) -> None:
        self.interval_s, self.peaks, self._stop = interval_s, {}, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> WorkerPeakRSS:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.is_set():
            for proc in Path("/proc").iterdir():
                if not proc.name.isdigit():
                    continue
                try:
                    if WORKER_TITLE not in (proc / "cmdline").read_bytes():
                        continue
                    if not _descends_from(int(proc.name), os.getpid()):
                        continue
                    status = (proc / "status").read_text()
                except OSError:  # the process ended between listing and reading
                    continue
                for line in status.splitlines():
                    if line.startswith("VmHWM:"):
                        peak = int(line.split()[1]) * 1024
                        self.peaks[int(proc.name)] = max(self.peaks.get(int(proc.name), 0), peak)
            self._stop.wait(self.interval_s)


def capacity_config(data: Path, storage: str, workers: int, budget: int | None, *,
                    epochs: int, batch_size: int, scale_rows: int, name: str) -> TrainConfig:
    # table_wise for every table in both runs: left to itself the planner replicates small tables
    # (data_parallel), which then train with the dense optimizer instead of the fused one.
    sharding = {"enabled": True, "default_type": "table_wise", "embedding_optimizer": "sgd",
                "embedding_lr": 0.05, "init_scale_rows": scale_rows}
    if budget is not None:
        # The whole budget holds tables: the dense part here is a few hundred kB.
        sharding |= {"memory_per_worker": budget, "memory_reserved_fraction": 0.0}
    return TrainConfig.model_validate({
        "name": name, "data": {"path": str(data)}, "model": {"name": "dcnv2"},
        "train": {"epochs": epochs, "batch_size": batch_size, "lr": 0.003},
        "scaling": {"num_workers": workers, "cpus_per_worker": 0.5},
        "sharding": sharding,
        # A URI storage path: no driver-side servable copy, which would merge every shard into one
        # process (exactly what tables bigger than a worker cannot afford).
        "storage_path": f"file://{storage}",
    })


def run(data: Path, storage: str, budget: int | None, **kwargs) -> dict:
    with WorkerPeakRSS() as rss:
        metrics = fit(capacity_config(data, storage, 2, budget, **kwargs))["metrics"]
    return {"test_auc": metrics["test_auc"], "wall_seconds": metrics["wall_seconds"],
            "peak_rss_bytes_per_worker": sorted(rss.peaks.values())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--table-gib", type=float, default=10.0,
                        help="all tables together (the enlarged user_id and item_id)")
    parser.add_argument("--impressions", type=int, default=100_000)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=1024)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/embedding_capacity.json"))
    args = parser.parse_args()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    import ray

    world = WorldConfig(num_impressions=args.impressions)
    rows = int(args.table_gib * 2**30 / BYTES_PER_ROW / 2)
    with tempfile.TemporaryDirectory() as tmp:
        small = Path(tmp) / "sim"
        simulate(small, world)
        big = enlarge_tables(small, Path(tmp) / "sim-big", {"user_id": rows, "item_id": rows})
        small_rows = (world.num_users + world.num_items + world.num_segments + world.num_tags)
        table_bytes = (2 * rows + world.num_segments + world.num_tags) * BYTES_PER_ROW
        budget = int(table_bytes / 1.8)
        common = {"epochs": args.epochs, "batch_size": args.batch_size,
                  # Every used row starts from the same values in both models.
                  "scale_rows": min(world.num_users, world.num_items)}
        started = time.perf_counter()
        try:
            validate(capacity_config(big, tmp, 1, budget, name="one", **common))
            refusal = "not refused"
        except ConfigError as e:
            refusal = str(e)
        refusal_seconds = time.perf_counter() - started
        print(f"1 worker: refused in {refusal_seconds:.1f} s: {refusal[:160]}...", flush=True)
        ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
        try:
            print(f"2 workers, tables {table_bytes / 2**30:.2f} GiB, budget {budget / 2**30:.2f} "
                  "GiB per worker", flush=True)
            big_run = run(big, tmp, budget, name="big", **common)
            print(f"  {big_run}\nsame model, small tables ({small_rows} rows)", flush=True)
            small_run = run(small, tmp, None, name="small", **common)
            print(f"  {small_run}", flush=True)
        finally:
            ray.shutdown()
    peaks = big_run["peak_rss_bytes_per_worker"]
    # A worker's RSS before any table: the same program with the small tables.
    base = max(small_run["peak_rss_bytes_per_worker"])
    report = {
        "benchmark": "embedding_capacity", "model": "dcnv2", "impressions": args.impressions,
        "epochs": args.epochs, "cores": os.cpu_count(),
        "table_bytes_total": table_bytes, "worker_budget_bytes": budget, "workers": 2,
        "peak_rss_bytes_per_worker": peaks,
        "peak_rss_over_table_bytes": [p / table_bytes for p in peaks],
        "small_table_peak_rss_bytes_per_worker": small_run["peak_rss_bytes_per_worker"],
        "rss_above_small_table_run_over_table_bytes": [(p - base) / table_bytes for p in peaks],
        "test_auc": big_run["test_auc"], "small_table_test_auc": small_run["test_auc"],
        "wall_seconds": {"big": big_run["wall_seconds"], "small": small_run["wall_seconds"]},
        "one_worker_refusal": refusal, "one_worker_refusal_seconds": refusal_seconds,
        "goal": "peak RSS per worker < 0.6 x table_bytes_total; |test_auc - small_table_test_auc| "
                "< 0.002; one worker refused before training",
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(json.dumps({k: report[k] for k in ("peak_rss_over_table_bytes", "test_auc",
                                             "small_table_test_auc")}))


if __name__ == "__main__":
    main()
