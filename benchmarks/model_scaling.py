"""Scaling: RankMixer and HyFormer at three sizes on a simulated log: parameters vs test AUC, FLOPs per sample.

    RAY_AUTH_MODE=disabled python benchmarks/model_scaling.py \
        --out benchmarks/results/model_scaling.json --plot benchmarks/results/model_scaling.png

The log is the parametric simulated world (`recray.data.simulate`): its true click probability
is known, so the oracle test AUC (the ceiling no model can pass but by chance) sits beside the
curve. Sizes grow tokens, token width and layers together (dense parameters ~6-7x a step); the
embedding tables stay the same, so the curve measures the dense backbone. Every run goes through
`recray.platform.train.fit` (Ray Train local mode) with the same budget: an epoch cap with early
stopping on valid AUC, batch size, lr, seed.

FLOPs per sample: `torch.utils.flop_counter.FlopCounterMode` over one forward of one batch,
divided by its rows. It counts matrix products (every Linear) but not HyFormer's jagged target
attention, whose CPU reference gathers (query, key) pairs and multiplies elementwise; that part is
added from its shape: per decoding layer, T query tokens x the history length x 4 x token_dim
(q.k and the weighted sum of values, a multiply-add counted as 2 FLOPs).
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
import torch
from torch.utils.flop_counter import FlopCounterMode

from recray import models
from recray.data import SPLITS
from recray.data.jagged import to_batch
from recray.data.schema import Schema
from recray.data.simulate import WorldConfig, simulate
from recray.platform.config import TrainConfig
from recray.platform.train import fit

MODELS = ("rankmixer", "hyformer")
SIZES = {
    "S": {"tokens": 4, "token_dim": 16, "layers": 1},
    "M": {"tokens": 4, "token_dim": 32, "layers": 2},
    "L": {"tokens": 8, "token_dim": 64, "layers": 2},
}
FLOP_BATCH = 512


def parameter_counts(model: torch.nn.Module) -> dict[str, int]:
    """Embedding-table weights (TorchRec collections) and everything else (the dense part)."""
    tables = {
        id(p)
        for module in model.modules()
        if type(module).__name__ in ("EmbeddingBagCollection", "EmbeddingCollection")
        for p in module.parameters()
    }
    embedding = sum(p.numel() for p in model.parameters() if id(p) in tables)
    dense = sum(p.numel() for p in model.parameters() if id(p) not in tables)
    return {"dense": dense, "embedding": embedding}


def flops_per_sample(name: str, hparams: dict, model: torch.nn.Module, data: Path, schema: Schema) -> dict:
    table = pq.read_table(data / "train.parquet").slice(0, FLOP_BATCH)
    batch = to_batch(table, schema)
    model.eval()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(batch)
    counted = counter.get_total_flops() / table.num_rows
    attention = 0.0
    if name == "hyformer":
        decoders = len(model.decoders)  # every layer (hybrid) or the first only (decoupled)
        history = sum(
            float(np.mean([len(x) for x in table.column(f.name).to_pylist()]))
            for f in schema.sequence_features
        )
        attention = decoders * hparams["tokens"] * history * 4 * hparams["token_dim"]
    return {"counted_matmul": counted, "target_attention": attention, "total": counted + attention}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="benchmarks/results/model_scaling.json")
    parser.add_argument("--plot", default="benchmarks/results/model_scaling.png")
    parser.add_argument("--work", default="/tmp/recray-scaling")
    parser.add_argument("--users", type=int, default=2000)
    parser.add_argument("--items", type=int, default=1000)
    parser.add_argument("--impressions", type=int, default=60_000)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--patience", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=512)
    parser.add_argument("--lr", type=float, default=0.003)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    from recray.platform.ray_init import init_local_ray

    init_local_ray(num_cpus=2, include_dashboard=False, log_to_driver=False)
    load_at_start = os.getloadavg()
    world = WorldConfig(num_users=args.users, num_items=args.items,
                        num_impressions=args.impressions, seed=args.seed)
    data = Path(args.work) / f"world-{args.users}u-{args.items}i-{args.impressions}"
    oracle = (json.loads((data / "oracle.json").read_text())["oracle"]
              if (data / "oracle.json").exists() else simulate(data, world))
    schema = Schema.load(data)
    rows = {s: pq.ParquetFile(data / f"{s}.parquet").metadata.num_rows for s in SPLITS}

    results, started = [], time.perf_counter()
    for name in MODELS:
        for size, hparams in SIZES.items():
            torch.manual_seed(args.seed)
            model = models.build(name, schema, **hparams)
            cfg = TrainConfig.model_validate({
                "name": f"scaling-{name}-{size}", "seed": args.seed, "data": {"path": str(data)},
                "model": {"name": name, "hparams": hparams},
                "train": {"epochs": args.epochs, "batch_size": args.batch_size, "lr": args.lr,
                          "early_stopping": {"metric": "auc", "patience": args.patience}},
                "scaling": {"num_workers": 0}, "storage_path": str(Path(args.work) / "runs"),
            })  # fmt: skip
            m = fit(cfg)["metrics"]
            results.append({
                "model": name, "size": size, "hparams": hparams,
                "parameters": parameter_counts(model),
                "flops_per_sample": flops_per_sample(name, hparams, model, data, schema),
                "test_auc": m["test_auc"], "test_logloss": m["test_logloss"], "valid_auc": m["valid_auc"],
                "best_epoch": m["best_epoch"], "epochs_run": m["epochs_run"],
                "train_rows_per_s": round(m["train_rows_per_s"], 1),
                "wall_seconds": round(m["wall_seconds"], 1),
            })  # fmt: skip
            print(name, size, results[-1]["parameters"], round(m["test_auc"], 4),
                  f"{results[-1]['flops_per_sample']['total']:.3g} FLOPs/sample", flush=True)
    total_seconds = time.perf_counter() - started

    auc_by_size = {name: [r["test_auc"] for r in results if r["model"] == name] for name in MODELS}
    rises = {name: bool(np.all(np.diff(aucs) > 0)) for name, aucs in auc_by_size.items()}
    load_at_end = os.getloadavg()
    out = {
        "benchmark": "model_scaling",
        "world": {"users": args.users, "items": args.items, "impressions": args.impressions,
                  "seed": args.seed, "rows": rows},
        "oracle_test_auc": oracle["test"]["auc"],
        "budget": {"epochs": args.epochs, "early_stopping": f"valid auc, patience {args.patience}",
                   "batch_size": args.batch_size, "lr": args.lr, "optimizer": "adam"},
        "sizes": SIZES,
        "results": results,
        "test_auc_rises_with_size": rises,
        "total_seconds": round(total_seconds, 1),
        "machine": {"python": platform.python_version(), "torch": torch.__version__,
                    "cpus": os.cpu_count()},
        "note": f"one seed; 2-core machine shared with other work; load average (1, 5, 15 min) "
                f"{tuple(round(x, 2) for x in load_at_start)} at start, "
                f"{tuple(round(x, 2) for x in load_at_end)} at the end: wall times are upper bounds",
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    plot(out, Path(args.plot))

    print("\n| model | size | dense params | embedding params | FLOPs/sample | test AUC | epochs |")
    print("|---|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['model']} | {r['size']} | {r['parameters']['dense']:,} | "
              f"{r['parameters']['embedding']:,} | {r['flops_per_sample']['total']:.3g} | "
              f"{r['test_auc']:.4f} | {r['epochs_run']} |")
    print(f"oracle test AUC {out['oracle_test_auc']:.4f}; rises with size: {rises}; "
          f"{total_seconds:.0f} s; {out['note']}")


def plot(out: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for place, name in enumerate(MODELS):
        rows = [r for r in out["results"] if r["model"] == name]
        ax.plot([r["parameters"]["dense"] for r in rows], [r["test_auc"] for r in rows],
                marker="o", label=name)
        for r in rows:
            ax.annotate(f"{r['size']} {r['flops_per_sample']['total'] / 1e3:.0f}k FLOPs",
                        (r["parameters"]["dense"], r["test_auc"]), fontsize=7,
                        textcoords="offset points", xytext=(4, 6 if place == 0 else -12))
    ax.axhline(out["oracle_test_auc"], color="grey", linestyle="--", label="oracle (true p_click)")
    ax.set_xscale("log")
    ax.set_xlabel("dense parameters (embedding tables fixed)")
    ax.set_ylabel("test AUC")
    ax.set_title(f"Scaling on the simulated world ({out['world']['impressions']:,} impressions)")
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
