"""Training throughput of one model: plain single-process torch loop vs Ray Train 1 worker vs 2 sharded workers.

    python benchmarks/train_throughput.py --out benchmarks/results/train_throughput.json

All read the same simulated Parquet split, convert with `to_batch` (Ray runs: inside Ray Data's
collate step, in its prefetch threads), and train the same model with the same batch size;
samples/s counts the training rows of the last epoch over its time (start-up and the first
epoch's pipeline warm-up excluded; the whole run is reported as wall_seconds). Small splits are
materialised in the object store once (train.py's MATERIALIZE_SHARE); one run turns that off to
show what it buys. `startup` splits a run's fixed cost: ray.init, validation, reading the splits
into the object store, and an empty TorchTrainer (worker group, process group, teardown). The
machine's load average is recorded: figures from a loaded machine are upper bounds.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import pyarrow.parquet as pq
import ray
import ray.train
import torch

from recray import models
from recray.data.jagged import to_batch
from recray.data.schema import Schema
from recray.data.simulate import WorldConfig, simulate
from recray.platform import train as train_module
from recray.platform.config import TrainConfig
from recray.platform.train import fit, split_datasets, validate


def plain_loop(data: Path, model_name: str, batch_size: int, epochs: int, lr: float) -> dict:
    # As many threads as a Ray worker gets (Ray sets OMP_NUM_THREADS to its CPU count).
    torch.set_num_threads(max((os.cpu_count() or 2) - 1, 1))
    schema = Schema.load(data)
    torch.manual_seed(0)
    model = models.build(model_name, schema)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    loss_fn = torch.nn.BCEWithLogitsLoss()
    wall_started = time.perf_counter()
    for _ in range(epochs):  # like Ray's metrics, the figure is the last epoch's
        rows, started = 0, time.perf_counter()
        for rb in pq.ParquetFile(data / "train.parquet").iter_batches(batch_size=batch_size):
            batch = to_batch(rb, schema)
            loss = loss_fn(model(batch), batch.labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            rows += len(batch)
    seconds = time.perf_counter() - started
    return {"samples_per_s": rows / seconds, "train_seconds": seconds,
            "wall_seconds": time.perf_counter() - wall_started}


def bench_config(data: Path, storage: str, model_name: str, batch_size: int, epochs: int,
                 lr: float, workers: int, cpus: float, sharded: bool, shuffle: bool = True):
    return TrainConfig.model_validate({
        "name": f"bench-{workers}-{sharded}", "data": {"path": str(data)},
        "model": {"name": model_name},
        "train": {"epochs": epochs, "batch_size": batch_size, "lr": lr, "shuffle": shuffle},
        "scaling": {"num_workers": workers, "cpus_per_worker": cpus},
        "sharding": {"enabled": sharded, "default_type": "table_wise"}, "storage_path": storage,
    })


def ray_run(*args, materialize: bool = True, **kwargs) -> dict:
    share = train_module.MATERIALIZE_SHARE
    train_module.MATERIALIZE_SHARE = share if materialize else 0.0
    try:
        metrics = fit(bench_config(*args, **kwargs))["metrics"]
    finally:
        train_module.MATERIALIZE_SHARE = share
    return {"samples_per_s": metrics["train_rows_per_s"], "train_seconds": metrics["train_seconds"],
            "wall_seconds": metrics["wall_seconds"], "test_auc": metrics["test_auc"]}


def startup_costs(cfg: TrainConfig, ray_init_seconds: float) -> dict:
    """Seconds of each fixed cost of a run, measured alone."""
    from ray.train.torch import TorchConfig, TorchTrainer

    costs = {"ray_init": ray_init_seconds}
    started = time.perf_counter()
    validate(cfg)
    costs["validate_config_data_model"] = time.perf_counter() - started
    started = time.perf_counter()
    split_datasets(cfg)
    costs["read_splits_into_object_store"] = time.perf_counter() - started
    for workers in (1, 2):
        trainer = TorchTrainer(
            lambda: None, torch_config=TorchConfig(backend="gloo"),
            scaling_config=ray.train.ScalingConfig(num_workers=workers,
                                                   resources_per_worker={"CPU": 0.5}),
            run_config=ray.train.RunConfig(storage_path=cfg.storage_path,
                                           name=f"empty-{workers}-{time.time_ns()}"),
        )
        started = time.perf_counter()
        trainer.fit()
        costs[f"empty_torch_trainer_{workers}_worker"] = time.perf_counter() - started
    return costs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="dcnv2")
    parser.add_argument("--impressions", type=int, default=300_000)
    parser.add_argument("--batch-size", type=int, default=1024)
    parser.add_argument("--epochs", type=int, default=3,
                        help="samples/s is the last epoch's (Ray Data's start-up is in wall_seconds)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/train_throughput.json"))
    args = parser.parse_args()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    load_before = os.getloadavg()[0]

    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "sim"
        simulate(data, WorldConfig(num_impressions=args.impressions))
        common = (args.model, args.batch_size, args.epochs, 3e-3)
        results = {"plain_torch_loop": plain_loop(data, *common)}
        started = time.perf_counter()
        ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
        ray_init_seconds = time.perf_counter() - started
        try:
            # One CPU stays free for Ray Data's read tasks (workers holding all CPUs starve them).
            worker_cpus = max(os.cpu_count() - 1, 1)
            results["ray_train_1_worker"] = ray_run(data, tmp, *common, workers=1,
                                                    cpus=worker_cpus, sharded=False)
            # The plain loop reads in file order: this run shows what the default shuffle costs.
            results["ray_train_1_worker_unshuffled"] = ray_run(
                data, tmp, *common, workers=1, cpus=worker_cpus, sharded=False, shuffle=False)
            # Re-reading Parquet every epoch instead of the materialised blocks.
            results["ray_train_1_worker_streamed"] = ray_run(
                data, tmp, *common, workers=1, cpus=worker_cpus, sharded=False, materialize=False)
            results["ray_train_2_sharded_workers"] = ray_run(data, tmp, *common, workers=2,
                                                             cpus=worker_cpus / 2, sharded=True)
            startup = startup_costs(bench_config(data, tmp, *common, workers=1, cpus=worker_cpus,
                                                 sharded=False), ray_init_seconds)
        finally:
            ray.shutdown()
    plain = results["plain_torch_loop"]["samples_per_s"]
    report = {
        "benchmark": "train_throughput", "model": args.model, "batch_size": args.batch_size,
        "epochs": args.epochs, "train_rows": int(args.impressions * 0.8), "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(), "results": results,
        "ratios_vs_plain": {k: v["samples_per_s"] / plain for k, v in results.items()},
        "wall_seconds": {k: v["wall_seconds"] for k, v in results.items()},
        "startup_seconds": startup,
        "load_average": {"before": load_before, "after": os.getloadavg()[0]},
        "goal": "ray_train_1_worker >= 0.9 x plain_torch_loop; 2 sharded workers >= 1 worker",
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(json.dumps({k: round(v["samples_per_s"]) for k, v in results.items()}),
          json.dumps({k: round(v, 3) for k, v in report["ratios_vs_plain"].items()}))


if __name__ == "__main__":
    main()
