"""Multi-task heads (MMoE, PLE, MDL) against one single-task DNN per label, on the CreatorEcosystem log.

    RAY_AUTH_MODE=disabled python benchmarks/multitask.py --out benchmarks/results/multitask.json

Every run goes through `recray.platform.train.fit` (Ray Train local mode) under one budget: the
same epochs cap, early stopping on valid AUC (the mean over tasks for a multi-task head, its own
label for a single-task DNN), batch size and lr. A single-task run reads the same Parquet splits
through a schema that names one label. The JSON keeps one row per (model, seed) with per-task
test AUC and log loss, the mean ± std per model and task, and for each head the labels on which
its mean test AUC beats the per-task DNNs'.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from recray import models
from recray.data import SPLITS
from recray.data.schema import Schema
from recray.platform.config import TrainConfig
from recray.platform.train import fit
from recray.simulators.logging_policy import LogConfig, write_creator_log

HEADS = {"mmoe": {"experts": 4}, "ple": {"levels": 2}, "mdl": {}}  # as in configs/<name>.yaml
SINGLE = "dnn"


def single_task_folder(log: Path, task: str) -> Path:
    """The log's splits with `label_<task>` copied to `label`, under a schema whose only label is
    `label`. (A lone `label_<task>` would do, but fit names one task's metrics `valid_auc_<task>`
    while early stopping watches `valid_auc`: the run stops with a ConfigError.)"""
    schema = Schema.load(log)
    folder = log.parent / f"{log.name}-{task}"
    folder.mkdir(exist_ok=True)
    for split in SPLITS:
        table = pq.read_table(log / f"{split}.parquet")
        (folder / f"{split}.parquet").unlink(missing_ok=True)  # never write through an old link
        pq.write_table(table.append_column("label", table.column(f"label_{task}")),
                       folder / f"{split}.parquet")
    schema.model_copy(update={"labels": ["label"]}).save(folder / "schema.yaml")
    return folder


def run(data: Path, name: str, hparams: dict, seed: int, args, storage: Path) -> dict:
    cfg = TrainConfig.model_validate({
        "name": f"mt-{name}", "seed": seed, "data": {"path": str(data)},
        "model": {"name": name, "hparams": hparams},
        "train": {"epochs": args.epochs, "batch_size": args.batch_size, "lr": args.lr,
                  "early_stopping": {"metric": "auc", "patience": args.patience}},
        "scaling": {"num_workers": 0}, "storage_path": str(storage),
    })  # fmt: skip
    return fit(cfg)["metrics"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="benchmarks/results/multitask.json")
    parser.add_argument("--work", default="/tmp/recray-multitask", help="log and run folders")
    parser.add_argument("--users", type=int, default=3000)
    parser.add_argument("--days", type=int, default=7)
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--patience", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=512)
    parser.add_argument("--lr", type=float, default=0.003)
    args = parser.parse_args()

    from recray.platform.ray_init import init_local_ray

    init_local_ray(num_cpus=2, include_dashboard=False, log_to_driver=False)
    load_at_start = os.getloadavg()
    work = Path(args.work)
    log = work / f"creator-{args.users}u-{args.days}d"
    if not (log / "schema.yaml").exists():
        write_creator_log(log, LogConfig(num_users=args.users, days=args.days, seed=0))
    schema = Schema.load(log)
    tasks = schema.tasks
    rows = {s: pq.ParquetFile(log / f"{s}.parquet").metadata.num_rows for s in SPLITS}
    rates = {t: float(np.mean(pq.read_table(log / "train.parquet", columns=[f"label_{t}"])
                              .column(0).to_numpy())) for t in tasks}
    folders = {t: single_task_folder(log, t) for t in tasks}

    results, started = [], time.perf_counter()
    for seed in range(args.seeds):
        for name, hparams in HEADS.items():
            m = run(log, name, hparams, seed, args, work / "runs")
            results.append({"model": name, "seed": seed, "epochs_run": m["epochs_run"],
                            "best_epoch": m["best_epoch"], "wall_seconds": round(m["wall_seconds"], 1),
                            **{f"test_auc_{t}": m[f"test_auc_{t}"] for t in tasks},
                            **{f"test_logloss_{t}": m[f"test_logloss_{t}"] for t in tasks}})
            print(name, seed, {k: round(v, 4) for k, v in results[-1].items() if "auc" in k}, flush=True)
        for task, folder in folders.items():
            m = run(folder, SINGLE, {}, seed, args, work / "runs")
            results.append({"model": f"{SINGLE}-per-task", "task": task, "seed": seed,
                            "epochs_run": m["epochs_run"], "best_epoch": m["best_epoch"],
                            "wall_seconds": round(m["wall_seconds"], 1),
                            f"test_auc_{task}": m["test_auc"], f"test_logloss_{task}": m["test_logloss"]})
            print(SINGLE, task, seed, round(m["test_auc"], 4), flush=True)
    total_seconds = time.perf_counter() - started

    names = [*HEADS, f"{SINGLE}-per-task"]
    summary: dict[str, dict[str, dict[str, float]]] = {}
    for name in names:
        summary[name] = {}
        for task in tasks:
            aucs = [r[f"test_auc_{task}"] for r in results if r["model"] == name and f"test_auc_{task}" in r]
            summary[name][task] = {"test_auc_mean": float(np.mean(aucs)),
                                   "test_auc_std": float(np.std(aucs, ddof=1)) if len(aucs) > 1 else 0.0,
                                   "seeds": len(aucs)}
    per_task = summary[f"{SINGLE}-per-task"]
    beats = {head: [t for t in tasks if summary[head][t]["test_auc_mean"] > per_task[t]["test_auc_mean"]]
             for head in HEADS}
    params = {name: sum(p.numel() for p in models.build(name, schema, **hp).parameters())
              for name, hp in HEADS.items()}
    params[f"{SINGLE}-per-task"] = len(tasks) * sum(
        p.numel() for p in models.build(SINGLE, Schema.load(folders[tasks[0]])).parameters())

    load_at_end = os.getloadavg()
    out = {
        "benchmark": "multitask",
        "log": {"users": args.users, "days": args.days, "rows": rows, "train_label_rates": rates},
        "budget": {"epochs": args.epochs, "early_stopping": f"valid auc, patience {args.patience}",
                   "batch_size": args.batch_size, "lr": args.lr, "optimizer": "adam"},
        "heads": HEADS, "single_task_model": SINGLE, "parameters": params,
        "summary": summary,
        "beats_per_task_on": {h: {"labels": v, "count": len(v), "of": len(tasks)} for h, v in beats.items()},
        "runs": results,
        "total_seconds": round(total_seconds, 1),
        "machine": {"python": platform.python_version(), "cpus": os.cpu_count()},
        "note": f"2-core machine shared with other work; load average (1, 5, 15 min) "
                f"{tuple(round(x, 2) for x in load_at_start)} at start, "
                f"{tuple(round(x, 2) for x in load_at_end)} at the end: wall times are upper bounds",
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")

    print(f"\n| model | {' | '.join(f'test AUC {t}' for t in tasks)} | params |")
    print("|---|" + "---|" * (len(tasks) + 1))
    for name in names:
        cells = [f"{summary[name][t]['test_auc_mean']:.4f} ± {summary[name][t]['test_auc_std']:.4f}" for t in tasks]
        print(f"| {name} | {' | '.join(cells)} | {params[name]:,} |")
    for head, labels in beats.items():
        print(f"{head} beats the per-task DNNs on {len(labels)} of {len(tasks)} labels: {labels}")
    print(f"{args.seeds} seeds, {total_seconds:.0f} s; {out['note']}")


if __name__ == "__main__":
    main()
