"""Tuning benchmark: `recray tune configs/tune-sim.yaml` on the simulated world of `make demo`.

    RAY_AUTH_MODE=disabled python benchmarks/tune_sim.py --out benchmarks/results/tune_sim.json

Simulates the demo's world (its oracle test AUC is known), runs the search as the verb runs it
(real trials, ASHA, latency in each trial) and writes the trial counts, the wall time, the Pareto
front and the chosen trial beside the oracle. The machine's load is recorded too: on a shared
machine the time and the p99 latencies are upper bounds.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import yaml

from recray.data.simulate import WorldConfig, simulate
from recray.platform.tune import load_tune_config, tune_search

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=REPO / "configs" / "tune-sim.yaml")
    parser.add_argument("--impressions", type=int, default=WorldConfig.num_impressions)
    parser.add_argument("--samples", type=int, help="trials per family (default: the config's)")
    parser.add_argument("--epochs", type=int, help="train.epochs (default: the config's)")
    parser.add_argument("--work", type=Path, default=Path("benchmark-tune"),
                        help="folder for the world and the tune folder")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()

    work = args.work.resolve()
    load_before = os.getloadavg()
    oracle = simulate(work / "data", WorldConfig(num_impressions=args.impressions))
    overrides = {"data.path": str(work / "data"), "storage_path": str(work / "runs")}
    if args.samples:
        overrides["search.num_samples"] = args.samples
    if args.epochs:
        overrides["train.epochs"] = args.epochs
    cfg = load_tune_config(args.config, overrides)
    started = time.perf_counter()
    summary = tune_search(cfg)
    seconds = time.perf_counter() - started
    best = summary["best"]
    best_train = yaml.safe_load((Path(best["exported"]) / "train.yaml").read_text())
    result = {
        "benchmark": "tune_sim",
        "config": str(args.config),
        "impressions": args.impressions,
        "epochs": cfg.train.epochs,
        "trials": summary["trials"],
        "finished": summary["finished"],
        "stopped_early": summary["stopped_early"],
        "failed": summary["failed"],
        "seconds": seconds,
        # Placement groups of stopped trials still held after the search (0: all released).
        "placement_groups_left": summary["placement_groups_left"],
        "pareto": [{k: p[k] for k in ("trial", "family", "valid_auc", "p99_ms")}
                   for p in summary["pareto"]],
        "best": {"trial": best["trial"], "test_auc": best["test_auc"],
                 "valid_auc": best["valid_auc"], "p50_ms": best["p50_ms"],
                 "p99_ms": best["p99_ms"],
                 "config": {"model": best_train["model"], "train": best_train["train"]},
                 # The searched values, data settings (embedding dim, history cap) included.
                 "searched": best["params"]},
        "oracle_test_auc": oracle["test"]["auc"],
        "gap_to_oracle": oracle["test"]["auc"] - best["test_auc"],
        "machine": {"cpus": os.cpu_count(), "arch": platform.machine(),
                    "load_avg_1_5_15_before": load_before,
                    "load_avg_1_5_15_after": os.getloadavg(),
                    # Above one runnable process per core, seconds and p99s are upper bounds.
                    "loaded": max(load_before[0], os.getloadavg()[0]) > (os.cpu_count() or 1)},
        "tune_folder": summary["folder"],
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(json.dumps({k: v for k, v in result.items() if k != "pareto"}, indent=2))


if __name__ == "__main__":
    main()
