"""A/A battery: the false-positive rate of the fixed-horizon and the daily-peeked sequential tests, and power.

Rerun with one command (2 cores: ~10 min for 200 harness experiments of 1000 users x 14 days):

    RAY_AUTH_MODE=disabled .venv/bin/python benchmarks/aa_battery.py --out benchmarks/results/aa_battery.json

`--source harness` (default): every experiment is a real CreatorEcosystem A/A run (both arms the
same built-in policy, its own seed and assignment salt) fanned out as Ray tasks by
`recray.platform.abtest.run_many`. `--source synthetic`: the numpy user-day generator
(`recray.abtest.synthetic`), seconds instead of minutes.

Power: the same A/A results with a known effect injected, every treatment user's watch minutes
on experiment days times (1 + effect), so the true relative lift is exactly `effect`; the
measured rejection rate of the plain fixed-horizon test is set beside statsmodels' t-test power
for that effect at the injected experiments' mean pooled per-unit sd and arm sizes. The effect
is chosen where the A/A data predict a power of about 0.6, where a mismatch would show most.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
from statsmodels.stats.power import TTestIndPower

from recray.abtest.result import ExperimentResult
from recray.abtest.stats import AnalysisConfig, analyze, unit_arms, unit_day_sums, unit_table
from recray.platform.ray_init import init_local_ray

PRIMARY = "watch_minutes"
ANALYSIS = AnalysisConfig(metrics=[PRIMARY], primary=PRIMARY, with_power=False)


def harness_results(n: int, users: int, days: int, pre_days: int, policy: str) -> list:
    import ray

    from recray.abtest.config import parse_config
    from recray.platform.abtest import run_many

    configs = [parse_config({
        "name": f"aa-{i}", "users": users, "days": days, "pre_days": pre_days, "gte": False,
        "arms": [{"name": "control", "share": 0.5, "policy": policy},
                 {"name": "treatment", "share": 0.5, "policy": policy}],
    }) for i in range(n)]
    init_local_ray(attempts=5, num_cpus=os.cpu_count(), include_dashboard=False,
                   log_to_driver=False)
    try:
        results = run_many(configs, seeds=list(range(n)))
    finally:
        ray.shutdown()
    for result in results:
        result.meta["aa"] = True
    return results


def synthetic_results(n: int, users: int, days: int, pre_days: int) -> list:
    from recray.abtest.synthetic import synthetic_experiment

    return [synthetic_experiment(users=users, days=days, pre_days=pre_days, lift=0.0, seed=i)
            for i in range(n)]


def inject_lift(result: ExperimentResult, effect: float) -> ExperimentResult:
    """The same experiment with every treatment user's experiment-day watch minutes x (1 + effect)."""
    users = result.users.copy()
    treated = (users["arm"] != result.control) & (users["day"] >= 0)
    users.loc[treated, PRIMARY] *= 1 + effect
    return ExperimentResult(users, result.creators, result.arms, result.shares, result.design,
                            meta=dict(result.meta))


def per_unit_moments(result: ExperimentResult) -> tuple[float, float, int, int]:
    """Control mean, pooled within-arm sd of the per-unit primary metric, and the arm sizes."""
    table = unit_table(unit_day_sums(result.users), unit_arms(result.users))
    value = table[PRIMARY] / table["user_days"]
    control = table["arm"] == result.control
    sd = np.sqrt((value[control].var(ddof=1) + value[~control].var(ddof=1)) / 2)
    return float(value[control].mean()), float(sd), int(control.sum()), int((~control).sum())


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--experiments", type=int, default=200)
    parser.add_argument("--source", choices=["harness", "synthetic"], default="harness")
    parser.add_argument("--users", type=int, default=1000)
    parser.add_argument("--days", type=int, default=14)
    parser.add_argument("--pre-days", type=int, default=7)
    parser.add_argument("--policy", default="popularity", help="both arms' built-in policy")
    parser.add_argument("--alpha", type=float, default=0.05)
    parser.add_argument("--target-power", type=float, default=0.6)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/aa_battery.json"))
    args = parser.parse_args(argv)
    config = ANALYSIS.model_copy(update={"alpha": args.alpha})

    start = time.perf_counter()
    print(f"running {args.experiments} A/A experiments ({args.source})", flush=True)
    if args.source == "harness":
        results = harness_results(args.experiments, args.users, args.days, args.pre_days,
                                  args.policy)
    else:
        results = synthetic_results(args.experiments, args.users, args.days, args.pre_days)
    simulate_seconds = time.perf_counter() - start

    print("analysing the A/A experiments", flush=True)
    rejected = {"fixed": 0, "fixed_plain": 0, "sequential": 0, "sequential_msprt": 0,
                "naive_daily_peeks": 0, "srm": 0}
    moments = []
    for result in results:
        entry = analyze(result, config)
        metric = entry["comparisons"][0]["metrics"][PRIMARY]
        rejected["fixed"] += metric["decision"]["pvalue"] < args.alpha
        rejected["fixed_plain"] += metric["plain"]["pvalue"] < args.alpha
        rejected["sequential"] += metric["sequential"]["rejected"]
        rejected["sequential_msprt"] += metric["msprt"]["rejected"]
        cumulative = metric["cumulative"]
        rejected["naive_daily_peeks"] += any(lo > 0 or hi < 0 for lo, hi in zip(
            cumulative["ci_low"], cumulative["ci_high"], strict=True))
        rejected["srm"] += entry["srm"]["mismatch"]
        moments.append(per_unit_moments(result))

    mean, sd, n_control, n_treatment = (float(np.mean(col)) for col in zip(*moments, strict=True))
    analysis = TTestIndPower()
    d = analysis.solve_power(nobs1=n_control, ratio=n_treatment / n_control, alpha=args.alpha,
                             power=args.target_power)
    effect = d * sd / mean
    print(f"power: injecting a {100 * effect:.2f}% lift on {PRIMARY}", flush=True)
    powered, injected_moments = 0, []
    for result in results:
        injected = inject_lift(result, effect)
        metric = analyze(injected, config)["comparisons"][0]["metrics"][PRIMARY]
        powered += metric["plain"]["pvalue"] < args.alpha
        injected_moments.append(per_unit_moments(injected))
    # the prediction sees the injected experiments' own sd: a multiplicative lift also widens the
    # treatment arm's spread by (1 + effect), which lowers the power of the same mean shift
    _, sd_injected, _, _ = (float(np.mean(col)) for col in zip(*injected_moments, strict=True))
    predicted = analysis.power(effect_size=effect * mean / sd_injected, nobs1=n_control,
                               ratio=n_treatment / n_control, alpha=args.alpha)

    n = len(results)
    report = {
        "experiments": n, "alpha": args.alpha, "source": args.source,
        "world": "recray/CreatorEcosystem-v0" if args.source == "harness" else "synthetic user-days",
        "users": args.users, "days": args.days, "pre_days": args.pre_days,
        "policy": args.policy if args.source == "harness" else None, "metric": PRIMARY,
        "false_positive_rate": {
            "fixed": rejected["fixed"] / n,
            "sequential": rejected["sequential"] / n,
            "fixed_plain": rejected["fixed_plain"] / n,
            "sequential_msprt": rejected["sequential_msprt"] / n,
            "naive_daily_peeks": rejected["naive_daily_peeks"] / n,
        },
        "false_positive_rate_se": float(np.sqrt(args.alpha * (1 - args.alpha) / n)),
        "srm_flags": rejected["srm"],
        "notes": {
            "fixed": "tea-tasting Welch test on the per-unit ratio, CUPED with the pre-period",
            "sequential": "O'Brien-Fleming alpha spending over daily peeks of the cumulative lift",
            "sequential_msprt": "normal-mixture SPRT, always valid, conservative by design",
            "naive_daily_peeks": "a 95% CI checked every day, rejecting at the first exclusion of 0",
            "power": "treatment watch minutes x (1 + effect) on the A/A results; plain Welch test; "
                     "predicted by statsmodels TTestIndPower at the injected experiments' mean "
                     "pooled per-unit sd and arm sizes",
        },
        "power": {"measured": powered / n, "predicted": float(predicted), "effect": float(effect),
                  "effect_kind": "relative lift of watch minutes per user-day"},
        "seconds": {"simulate": simulate_seconds, "total": time.perf_counter() - start,
                    "note": "2-core machine shared with other work: loaded, upper bound"},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    fpr = report["false_positive_rate"]
    print(f"false positives at alpha {args.alpha}: fixed {fpr['fixed']:.3f}, sequential "
          f"{fpr['sequential']:.3f} (mSPRT {fpr['sequential_msprt']:.3f}, naive daily peeks "
          f"{fpr['naive_daily_peeks']:.3f}); power {report['power']['measured']:.3f} measured vs "
          f"{report['power']['predicted']:.3f} predicted -> {args.out}", flush=True)
    return report


if __name__ == "__main__":
    sys.exit(main() and 0)
