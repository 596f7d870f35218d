"""Tuning benchmark on MovieLens-100K: the tuned best's test AUC beside the model zoo's defaults.

    recray data prepare movielens-100k --src ../shared/data/movielens-100k --out data/ml100k
    RAY_AUTH_MODE=disabled python benchmarks/tune_movielens.py --data data/ml100k \
        --out benchmarks/results/tune_movielens.json

Runs `recray tune configs/tune-movielens.yaml` (the zoo's epochs and batch size) and writes the
search's counts and wall time, the chosen trial and, beside it, each zoo model's test AUC with
its default hparams (mean over the seeds in benchmarks/results/model_zoo_movielens-100k.json).
On a shared machine the seconds and p99 latencies are upper bounds (the load is recorded).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import numpy as np
import yaml

from recray.platform.tune import load_tune_config, tune_search

REPO = Path(__file__).resolve().parents[1]


def zoo_test_auc(path: Path) -> dict[str, dict[str, float]]:
    """Each zoo model's mean and range of test AUC over its seeds."""
    by_model: dict[str, list[float]] = {}
    for row in json.loads(path.read_text())["results"]:
        by_model.setdefault(row["model"], []).append(row["test_auc"])
    return {m: {"mean": float(np.mean(v)), "min": min(v), "max": max(v), "seeds": len(v)}
            for m, v in by_model.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=REPO / "configs" / "tune-movielens.yaml")
    parser.add_argument("--data", type=Path, required=True, help="prepared movielens-100k folder")
    parser.add_argument("--zoo", type=Path,
                        default=REPO / "benchmarks" / "results" / "model_zoo_movielens-100k.json")
    parser.add_argument("--samples", type=int, help="trials per family (default: the config's)")
    parser.add_argument("--work", type=Path, default=Path("benchmark-tune-movielens"),
                        help="folder for the tune folder")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()

    load_before = os.getloadavg()
    overrides = {"data.path": str(args.data.resolve()), "storage_path": str(args.work.resolve())}
    if args.samples:
        overrides["search.num_samples"] = args.samples
    cfg = load_tune_config(args.config, overrides)
    started = time.perf_counter()
    summary = tune_search(cfg)
    seconds = time.perf_counter() - started
    best = summary["best"]
    best_train = yaml.safe_load((Path(best["exported"]) / "train.yaml").read_text())
    zoo = zoo_test_auc(args.zoo)
    result = {
        "benchmark": "tune_movielens",
        "config": str(args.config),
        "epochs": cfg.train.epochs,
        "batch_size": cfg.train.batch_size,
        "trials": summary["trials"],
        "finished": summary["finished"],
        "stopped_early": summary["stopped_early"],
        "failed": summary["failed"],
        "seconds": seconds,
        "placement_groups_left": summary["placement_groups_left"],
        "best": {"trial": best["trial"], "family": best["family"], "test_auc": best["test_auc"],
                 "valid_auc": best["valid_auc"], "p99_ms": best["p99_ms"],
                 "config": {"model": best_train["model"], "train": best_train["train"]},
                 # The searched values, data settings (embedding dim, history cap) included.
                 "searched": best["params"]},
        "zoo_default_test_auc": zoo,
        "best_minus_best_zoo_default": best["test_auc"] - max(z["mean"] for z in zoo.values()),
        "best_minus_zoo_default_of_its_family": (
            best["test_auc"] - zoo[best["family"]]["mean"] if best["family"] in zoo else None),
        "pareto": summary["pareto"],
        "machine": {"cpus": os.cpu_count(), "arch": platform.machine(),
                    "load_avg_1_5_15_before": load_before,
                    "load_avg_1_5_15_after": os.getloadavg(),
                    "loaded": max(load_before[0], os.getloadavg()[0]) > (os.cpu_count() or 1)},
        "tune_folder": summary["folder"],
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(json.dumps({k: v for k, v in result.items() if k != "pareto"}, indent=2))


if __name__ == "__main__":
    main()
