"""Fault-tolerance figures: a sharded 2-worker run whose rank-1 process exits mid-epoch vs the same run uninterrupted.

    python benchmarks/fault_tolerance.py --out benchmarks/results/fault_tolerance.json

Reports the extra wall time the failure cost (restart + redone steps), the steps redone (the
interrupted epoch's steps before the exit; the checkpoint interval is one epoch), the difference
in final test AUC and the largest difference between the redone epoch's loss curve and the
uninterrupted one's (the model has dropout: each epoch draws from its own seeded stream).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path

from recray.data.simulate import WorldConfig, simulate
from recray.platform.config import TrainConfig
from recray.platform.train import fit


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--impressions", type=int, default=50_000)
    parser.add_argument("--fail-step", type=int, default=20)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/fault_tolerance.json"))
    args = parser.parse_args()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    import ray

    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    with tempfile.TemporaryDirectory() as tmp:
        simulate(Path(tmp) / "sim", WorldConfig(num_impressions=args.impressions))
        base = {
            "data": {"path": f"{tmp}/sim"}, "model": {"name": "dcnv2", "hparams": {"dropout": 0.2}},
            "train": {"epochs": 2, "batch_size": 512, "global_batches": True},
            "scaling": {"num_workers": 2, "cpus_per_worker": 0.5},
            "sharding": {"enabled": True, "default_type": "table_wise"},
            "storage_path": f"{tmp}/runs", "max_failures": 1,
        }
        clean = fit(TrainConfig.model_validate({**base, "name": "clean"}))["metrics"]
        faulty = fit(TrainConfig.model_validate({
            **base, "name": "faulty",
            "fault_injection": {"epoch": 1, "step": args.fail_step, "rank": 1}}))["metrics"]
    ray.shutdown()
    report = {
        "benchmark": "fault_tolerance",
        "setup": "2 sharded workers (table_wise, gloo), checkpoint every epoch (DCP), rank 1 "
                 f"exits with os._exit(1) at epoch 1 step {args.fail_step}",
        "steps_per_epoch": len(clean["train_loss_curve"]),
        "steps_redone": args.fail_step,
        "steps_skipped": 0,
        "resumed_from_epoch": faulty["resumed_from_epoch"],
        "clean_wall_seconds": clean["wall_seconds"],
        "faulty_wall_seconds": faulty["wall_seconds"],
        "recovery_seconds": faulty["wall_seconds"] - clean["wall_seconds"],
        "clean_test_auc": clean["test_auc"],
        "faulty_test_auc": faulty["test_auc"],
        "test_auc_difference": abs(faulty["test_auc"] - clean["test_auc"]),
        "redone_epoch_max_loss_difference": max(
            abs(a - b) for a, b in zip(faulty["train_loss_curve"], clean["train_loss_curve"], strict=True)),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
