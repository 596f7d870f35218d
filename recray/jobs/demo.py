"""`recray demo`: the embedded default. Simulate a world, log it, train DCN-v2 and DIN on Ray Train,
evaluate on the held-out split, and print a table beside the oracle (Bayes-optimal) AUC."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from recray.data.simulate import WorldConfig
from recray.jobs import main_for

DEMO_MODELS = ("lr", "dcnv2", "din")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="demo-output", help="folder for data, runs and report")
    parser.add_argument("--impressions", type=int, default=WorldConfig.num_impressions)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--workers", type=int, default=0,
                        help="Ray Train workers per run (0 = local mode, fastest on 2 cores)")
    parser.add_argument("--models", nargs="+", default=list(DEMO_MODELS))
    parser.add_argument("--seed", type=int, default=0)


def format_table(rows: list[dict], oracle: dict) -> str:
    head = f"{'model':<8} {'test AUC':>9} {'logloss':>8} {'oracle AUC':>11} {'gap':>7} {'seconds':>8}"
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(
            f"{r['model']:<8} {r['test_auc']:>9.4f} {r['test_logloss']:>8.4f} "
            f"{oracle['auc']:>11.4f} {oracle['auc'] - r['test_auc']:>7.4f} {r['seconds']:>8.1f}"
        )
    lines.append(f"{'oracle':<8} {oracle['auc']:>9.4f} {oracle['logloss']:>8.4f}")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    from recray.data.simulate import WorldConfig, simulate
    from recray.platform.config import TrainConfig
    from recray.platform.train import fit

    out = Path(args.out).resolve()
    started = time.perf_counter()
    print(f"[1/{len(args.models) + 1}] simulating {args.impressions} impressions -> {out / 'data'}", flush=True)
    oracle = simulate(out / "data", WorldConfig(num_impressions=args.impressions, seed=args.seed))
    print(f"      oracle test AUC {oracle['test']['auc']:.4f}", flush=True)

    rows = []
    for step, name in enumerate(args.models, start=2):
        print(f"[{step}/{len(args.models) + 1}] training {name} on Ray Train", flush=True)
        cfg = TrainConfig.model_validate({
            "name": f"demo-{name}",
            "seed": args.seed,
            "data": {"path": str(out / "data")},
            "model": {"name": name},
            "train": {"epochs": args.epochs, "batch_size": 512, "lr": 3e-3},
            "scaling": {"num_workers": args.workers},
            "storage_path": str(out / "runs"),
        })
        run_started = time.perf_counter()
        result = fit(cfg)
        metrics = result["metrics"]
        rows.append({"model": name, "test_auc": metrics["test_auc"],
                     "test_logloss": metrics["test_logloss"], "valid_auc": metrics["valid_auc"],
                     "seconds": time.perf_counter() - run_started, "run_dir": result["run_dir"]})

    table = format_table(rows, oracle["test"])
    report = {"oracle": oracle, "models": rows, "seconds": time.perf_counter() - started}
    (out / "report.json").write_text(json.dumps(report, indent=2))
    print(f"\n{table}\n\nreport: {out / 'report.json'} ({report['seconds']:.0f} s in all)")
    return 0


def main(argv: list[str] | None = None) -> int:
    return main_for(sys.modules[__name__], argv)


if __name__ == "__main__":
    sys.exit(main())
