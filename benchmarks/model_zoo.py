"""Quality benchmark: every zoo model on one prepared data set with the same budget, test AUC/logloss.

    python benchmarks/model_zoo.py --config configs/movielens-100k.yaml \
        --out benchmarks/results/model_zoo_movielens-100k.json

Each model runs through `recray.platform.train.fit` (Ray Train), so the figures are the product's.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

from recray import models
from recray.platform.config import load_train_config
from recray.platform.train import fit


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="a train config; model.name is replaced")
    parser.add_argument("--models", nargs="+", default=models.available())
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()

    rows = []
    for name in args.models:
        for seed in args.seeds:
            cfg = load_train_config(args.config, {"model.name": name, "model.hparams": {},
                                                  "seed": seed, "name": f"zoo-{name}-{seed}"})
            started = time.perf_counter()
            metrics = fit(cfg)["metrics"]
            rows.append({"model": name, "seed": seed, "seconds": time.perf_counter() - started,
                         **{k: v for k, v in metrics.items() if k.startswith(("test_", "valid_"))}})
            print(json.dumps(rows[-1]), flush=True)
    result = {"benchmark": "model_zoo", "config": str(args.config), "budget": cfg.train.model_dump(),
              "machine": platform.machine(), "results": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(f"\n{'model':<8} {'seed':>4} {'test AUC':>9} {'logloss':>8}")
    for r in rows:
        print(f"{r['model']:<8} {r['seed']:>4} {r['test_auc']:>9.4f} {r['test_logloss']:>8.4f}")


if __name__ == "__main__":
    main()
