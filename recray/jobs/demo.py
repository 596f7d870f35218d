"""`recray demo`: the platform's whole job on the embedded world, in a few minutes on 2 cores.

1. simulate a CreatorEcosystem log under a logging policy (the truth is known);
2. train the production model and two candidates on Ray Train, one of them TorchRec-sharded on
   2 workers;
3. run a small architecture search on Ray Tune (AUC against serving latency);
4. serve the winner beside production as two variants of one Ray Serve endpoint;
5. A/B test them through that endpoint on the live simulated world for some days, with the
   global treatment effect beside the estimate;
6. write report.html / report.json.

Ray's and Ray Data's logs go to `<out>/logs/ray.log`; the terminal gets one line per stage and a
final table.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any, TextIO

from recray.jobs import main_for, output_to_file

PRODUCTION = "dnn"                # the incumbent the winner has to beat online
CANDIDATES = ("deepfm", "dcnv2")  # dcnv2 trains TorchRec-sharded on 2 workers
STAGES = 6


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="demo-output", help="folder for data, runs and report")
    parser.add_argument("--users", type=int, default=1000, help="users of the logged world")
    parser.add_argument("--log-days", type=int, default=7, help="days of logged impressions")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--trials", type=int, default=2,
                        help="trials of the small search (split over DNN and DCN-v2)")
    parser.add_argument("--ab-users", type=int, default=1000, help="users in the online A/B test")
    parser.add_argument("--ab-days", type=int, default=4, help="experiment days of the A/B test")
    parser.add_argument("--seed", type=int, default=0)


class Stages:
    """One progress line per stage on the terminal, with the stage's wall time."""

    def __init__(self, terminal: TextIO) -> None:
        self.terminal, self.step, self.started = terminal, 0, time.perf_counter()
        self.stage_started = self.started

    def begin(self, text: str) -> None:
        self.step += 1
        self.stage_started = time.perf_counter()
        print(f"[{self.step}/{STAGES}] {text}", file=self.terminal, flush=True)

    def done(self, text: str) -> None:
        print(f"      {text} ({time.perf_counter() - self.stage_started:.0f} s)",
              file=self.terminal, flush=True)


def _train_config(args: argparse.Namespace, out: Path, model: str, sharded: bool) -> Any:
    from recray.platform.config import TrainConfig

    return TrainConfig.model_validate({
        "name": f"demo-{model}",
        "seed": args.seed,
        "data": {"path": str(out / "data")},
        "model": {"name": model},
        "train": {"epochs": args.epochs, "batch_size": 512, "lr": 3e-3},
        # local mode is the fastest on 2 cores; the sharded run shows the real thing
        "scaling": {"num_workers": 2, "cpus_per_worker": 0.5} if sharded else {"num_workers": 0},
        "sharding": {"enabled": sharded},
        "storage_path": str(out / "runs"),
    })


def train_stage(args: argparse.Namespace, out: Path) -> list[dict[str, Any]]:
    from recray.platform.train import fit

    rows = []
    for model in (PRODUCTION, *CANDIDATES):
        sharded = model == "dcnv2"
        started = time.perf_counter()
        result = fit(_train_config(args, out, model, sharded))
        metrics = result["metrics"]
        rows.append({"model": model, "source": "sharded x2" if sharded else "local",
                     "valid_auc": metrics["valid_auc"], "test_auc": metrics["test_auc"],
                     "test_auc_click": metrics.get("test_auc_click", metrics["test_auc"]),
                     "seconds": time.perf_counter() - started, "run_dir": result["run_dir"]})
    return rows


def tune_stage(args: argparse.Namespace, out: Path) -> dict[str, Any]:
    from recray.platform.tune import TuneConfig, tune_search

    base = _train_config(args, out, "dnn", sharded=False).model_dump(mode="json")
    cfg = TuneConfig.model_validate(base | {
        "name": "demo-tune",
        "scaling": {"num_workers": 1, "cpus_per_worker": 0.5},
        "search": {
            "num_samples": max(1, args.trials // 2),
            "max_concurrent_trials": 1,
            "scheduler": {"name": "asha", "options": {"grace_period": 1, "reduction_factor": 2}},
            "space": {"train.lr": {"loguniform": [1e-3, 1e-2]}},
            "models": {"dnn": {"hidden": {"choice": [[64], [128, 64]]}},
                       "dcnv2": {"cross_layers": {"randint": [1, 3]}}},
            "latency": {"candidates": 100, "repeats": 50, "warmup": 5},
        },
    })
    return tune_search(cfg)


def pick_winner(trained: list[dict[str, Any]], tuned: dict[str, Any]) -> dict[str, Any]:
    """The challenger: the best validation AUC among the candidates and the search's best."""
    entries = [r for r in trained if r["model"] != PRODUCTION]
    best = tuned.get("best")
    if best:
        entries.append({"model": f"tune:{best['family']}", "valid_auc": best["valid_auc"],
                        "test_auc": best["test_auc"], "run_dir": best["exported"] + "/model"})
    return max(entries, key=lambda r: r["valid_auc"])


def serve_stage(production: dict[str, Any], winner: dict[str, Any]) -> str:
    from recray.platform.run_folder import load_run_folder
    from recray.platform.serve import check_same_schema, deploy, load_serve_config

    cfg = load_serve_config(None, variants=[
        {"name": "production", "run_dir": production["run_dir"], "share": 0.5},
        {"name": "challenger", "run_dir": winner["run_dir"], "share": 0.5}],
        num_replicas=1, port=8000)
    check_same_schema({v.name: load_run_folder(v.run_dir) for v in cfg.variants})
    return deploy(cfg)


def abtest_stage(args: argparse.Namespace, url: str, production: dict[str, Any],
                 winner: dict[str, Any], folder: Path, say: Any) -> dict[str, Any]:
    import ray

    from recray.abtest.config import parse_config, validate
    from recray.abtest.harness import global_treatment_effect
    from recray.abtest.report import write_report
    from recray.abtest.stats import AnalysisConfig, analyze
    from recray.platform.abtest import run_experiment_on_ray, start_gte_worlds

    arms = [("production", production), ("challenger", winner)]
    experiment = {
        "name": "demo-abtest",
        "world": {"params": {"num_creators": 100}},  # the logged world's creators
        "users": args.ab_users,
        "arms": [{"name": name, "share": 0.5, "http": {"url": url, "variant": name}}
                 for name, _ in arms],
        "pre_days": 1, "days": args.ab_days, "seeds": [args.seed], "shards": 2, "gte": False,
        "analysis": {"alpha": 0.05, "primary": "watch_minutes",
                     "metrics": ["watch_minutes", "ctr", "active"]},
    }
    cfg = parse_config(experiment, "demo")
    validate(cfg)
    # The GTE worlds (everyone on one arm, same seed) score in-process from the same run
    # folders: a model arm ranks exactly as its HTTP arm does (tests/test_abtest_harness.py), and
    # two more worlds through the endpoint would triple the demo's HTTP traffic. They run as Ray
    # tasks beside the experiment.
    truth = parse_config(experiment | {"arms": [
        {"name": name, "share": 0.5, "model": {"run_dir": row["run_dir"]}} for name, row in arms]},
        "demo GTE")
    worlds = start_gte_worlds(truth, args.seed)
    result = run_experiment_on_ray(cfg, args.seed, progress=say, check=False)
    result.gte = global_treatment_effect(*ray.get(worlds))
    folder.mkdir(parents=True, exist_ok=True)
    analysis = analyze(result, AnalysisConfig.model_validate(cfg.analysis))
    write_report(result, analysis, folder)
    return analysis


def summary_table(production: dict[str, Any], winner: dict[str, Any], analysis: dict[str, Any],
                  oracle_click_auc: float) -> str:
    """Offline AUC of both variants, then the A/B lift with its CI beside the GTE per metric."""
    lines = [f"{'variant':<12} {'model':<14} {'valid AUC':>9} {'test AUC':>9} {'click AUC':>9}"
             f" (oracle {oracle_click_auc:.4f})"]
    for name, row in (("production", production), ("challenger", winner)):
        click = row.get("test_auc_click")
        lines.append(f"{name:<12} {row['model']:<14} {row['valid_auc']:>9.4f} "
                     f"{row['test_auc']:>9.4f} {'-' if click is None else f'{click:.4f}':>9}")
    comparison = analysis["comparisons"][0]
    lines += ["", f"{'A/B metric':<14} {'lift':>9} {'95% CI':>21} {'GTE':>9} {'bias':>9}"]
    for metric, entry in comparison["metrics"].items():
        d, g = entry["decision"], entry.get("gte", {})
        ci = f"[{d['ci_low']:+.4f}, {d['ci_high']:+.4f}]"
        gte = f"{g['gte']:+9.4f} {g['bias']:+9.4f}" if g else f"{'-':>9} {'-':>9}"
        lines.append(f"{metric:<14} {d['effect']:>+9.4f} {ci:>21} {gte}")
    exits = analysis["creator_effects"].get("exits", {})
    if exits:
        per_arm = ", ".join(f"{arm} {value:.2f}" for arm, value in exits["per_arm"].items())
        gte = f"; GTE {exits['gte']:+.2f}" if "gte" in exits else ""
        lines.append(f"creator exits per day: {per_arm}{gte}")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    with output_to_file(out / "logs" / "ray.log") as terminal:
        return _run(args, out, terminal)


def _run(args: argparse.Namespace, out: Path, terminal: TextIO) -> int:
    import ray
    from ray import serve

    from recray.simulators.logging_policy import LogConfig, write_creator_log

    stages = Stages(terminal)
    stages.begin(f"simulating {args.users} users x {args.log_days} days of CreatorEcosystem "
                 f"-> {out / 'data'}")
    oracle = write_creator_log(out / "data", LogConfig(num_users=args.users, days=args.log_days,
                                                       seed=args.seed))
    stages.done(f"oracle click AUC on the test days {oracle['test']['auc']:.4f}")

    from recray.platform.tune import start_ray

    owns_ray = not ray.is_initialized()  # inside a Ray job or a test session: use that Ray
    if owns_ray:
        start_ray()  # Tune's start: stopped trials' placement groups are cleaned up (see there)
    try:
        stages.begin(f"training {PRODUCTION} (production) and {', '.join(CANDIDATES)} on Ray "
                     "Train (dcnv2 sharded on 2 workers)")
        trained = train_stage(args, out)
        stages.done(", ".join(f"{r['model']} valid AUC {r['valid_auc']:.4f}" for r in trained))

        stages.begin(f"searching {args.trials} trials on Ray Tune (AUC vs serving latency)")
        tuned = tune_stage(args, out)
        best = tuned.get("best") or {}
        stages.done(f"{tuned['trials']} trials, {tuned['stopped_early']} stopped early, "
                    f"{len(tuned['pareto'])} on the Pareto front; best {best.get('family')} "
                    f"valid AUC {best.get('valid_auc', float('nan')):.4f}")

        production = next(r for r in trained if r["model"] == PRODUCTION)
        winner = pick_winner(trained, tuned)
        stages.begin(f"serving production ({PRODUCTION}) and challenger ({winner['model']}) as "
                     "two variants of one Ray Serve endpoint")
        url = serve_stage(production, winner)
        stages.done(f"{url}/v1/rank")

        stages.begin(f"A/B test through the endpoint: {args.ab_users} users, 1 pre-period + "
                     f"{args.ab_days} days; the GTE worlds beside it")
        analysis = abtest_stage(args, url, production, winner, out / "abtest",
                                lambda line: print(f"      {line}", file=terminal, flush=True))
        stages.done("report written")
    finally:
        serve.shutdown()
        if owns_ray:
            ray.shutdown()

    stages.begin("report")
    report = {"oracle": oracle, "models": trained, "tune": {k: v for k, v in tuned.items()
                                                            if k != "trial_rows"},
              "production": production, "challenger": winner,
              "abtest": {"report": str(out / "abtest" / "report.json"),
                         "comparison": analysis["comparisons"][0]["metrics"]
                         and {m: {k: e["decision"][k] for k in ("effect", "ci_low", "ci_high")}
                              | ({"gte": e["gte"]["gte"]} if "gte" in e else {})
                              for m, e in analysis["comparisons"][0]["metrics"].items()}},
              "seconds": time.perf_counter() - stages.started}
    (out / "report.json").write_text(json.dumps(report, indent=2, default=str))
    stages.done(str(out / "report.json"))
    print(f"\n{summary_table(production, winner, analysis, oracle['test']['auc'])}\n\n"
          f"report: {out / 'abtest' / 'report.html'} ({report['seconds']:.0f} s in all; "
          f"Ray's logs: {out / 'logs' / 'ray.log'})", file=terminal, flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    return main_for(sys.modules[__name__], argv)


if __name__ == "__main__":
    sys.exit(main())
