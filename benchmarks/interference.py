"""How far each randomisation design's A/B estimate lands from the global treatment effect (GTE).

    python benchmarks/interference.py [--users 3000] [--days 21] [--replicates 4]
                                      [--out benchmarks/results/interference.json]

The world: CreatorEcosystem split into 10 markets (a session retrieves only its market's items),
where popularity ranking (control) starves most creators, who exit, and exposure-aware ranking
(treatment) keeps them. Under user randomisation both arms share the creators, so the treatment
arm cannot keep them alive alone and the control arm free-rides on the ones it keeps: the
estimate is biased toward zero. Creator-side randomisation gives each creator one arm's ranking
for its items; cluster randomisation gives whole markets (users and creators) one arm.

Each replicate is a new world seed and a new assignment salt; per design the figure is the mean
estimate over replicates with a t interval across them (the estimator's expectation, which is
what a bias is about), and for replicate 0 the single experiment's estimate and 95% CI from
`recray.abtest.stats` (tea-tasting, delta method at the randomisation unit). The GTE is the
same world run all-treatment minus all-control, same seeds. Experiments run as Ray tasks
(`run_many`); measured on the loaded 2-core machine, the figures do not depend on load.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import scipy.stats

from recray.abtest.config import ExperimentConfig, parse_config

USER_METRIC = "watch_minutes"     # per user-day: the long-term effect through creators' exits
CREATOR_METRIC = "active_creators"


def experiment(design: str, users: int, days: int, seed: int) -> ExperimentConfig:
    return parse_config({
        "name": f"interference-{design}", "salt": f"interference-{seed}", "users": users,
        "days": days, "design": design, "gte": design == "user", "seeds": [seed],
        "world": {"params": {"num_creators": 200, "markets": 10}},
        "arms": [{"name": "control", "share": 0.5, "policy": "popularity"},
                 {"name": "treatment", "share": 0.5, "policy": "exposure_aware"}]})


def user_estimate(result: Any) -> float:
    users = result.users[result.users["day"] >= 0]
    means = users.groupby("arm")[USER_METRIC].mean()
    return float(means["treatment"] - means["control"])


def creator_estimate(result: Any) -> float:
    creators = result.creators[result.creators["day"] >= 0]
    means = creators.groupby("arm")[CREATOR_METRIC].mean()
    return float(means["treatment"] - means["control"])


def single_run_ci(result: Any) -> dict[str, float] | None:
    """The one experiment's estimate and CI as a report shows it (recray.abtest.stats)."""
    try:
        from recray.abtest.stats import AnalysisConfig, analyze
    except ImportError:
        return None
    analysis = analyze(result, AnalysisConfig(metrics=[USER_METRIC], with_power=False,
                                              cuped=False))
    decision = analysis["comparisons"][0]["metrics"][USER_METRIC]["decision"]
    return {k: float(decision[k]) for k in ("effect", "ci_low", "ci_high")}


def interval(values: list[float]) -> tuple[float, float, float]:
    x = np.asarray(values, float)
    mean = float(x.mean())
    if len(x) < 2:
        return mean, mean, mean
    half = float(scipy.stats.t.ppf(0.975, len(x) - 1) * x.std(ddof=1) / np.sqrt(len(x)))
    return mean, mean - half, mean + half


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--users", type=int, default=3000)
    parser.add_argument("--days", type=int, default=21)
    parser.add_argument("--replicates", type=int, default=4)
    parser.add_argument("--local", action="store_true",
                        help="run the experiments one by one in this process, without Ray "
                             "(same numbers: the harness is Ray-free)")
    parser.add_argument("--out", default="benchmarks/results/interference.json")
    args = parser.parse_args()
    started = time.perf_counter()
    designs = ("user", "creator", "cluster")
    configs = [experiment(d, args.users, args.days, seed) for seed in range(args.replicates)
               for d in designs]
    if args.local:
        from recray.abtest.harness import run_experiment

        results = [run_experiment(cfg, cfg.seeds[0]) for cfg in configs]
    else:
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
        import ray

        from recray.platform.abtest import run_many

        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
        results = run_many(configs, seeds=[cfg.seeds[0] for cfg in configs])
        ray.shutdown()
    by = {(cfg.design, cfg.seeds[0]): r for cfg, r in zip(configs, results, strict=True)}
    seeds = range(args.replicates)
    gte = {m: interval([by["user", s].gte[m] for s in seeds]) for m in (USER_METRIC,
                                                                        CREATOR_METRIC)}

    def rows(metric: str, estimate: Any, applicable: tuple[str, ...]) -> list[dict[str, Any]]:
        out = []
        for design in applicable:
            values = [estimate(by[design, s]) for s in seeds]
            mean, low, high = interval(values)
            row = {"design": design, "estimate": mean, "ci_low": low, "ci_high": high,
                   "bias": mean - gte[metric][0], "replicates": values}
            if metric == USER_METRIC:
                row["single_run"] = single_run_ci(by[design, 0])
            out.append(row)
        return out

    result = {
        "world": {"env": "recray/CreatorEcosystem-v0", "num_creators": 200, "markets": 10,
                  "users": args.users, "days": args.days, "control": "popularity",
                  "treatment": "exposure_aware", "replicates": args.replicates},
        "metric": USER_METRIC,
        # creator-side randomisation leaves every user's slate mixed: no user-side estimate
        "designs": rows(USER_METRIC, user_estimate, ("user", "cluster")),
        "gte": gte[USER_METRIC][0],
        "gte_ci": list(gte[USER_METRIC][1:]),
        "creator_side": {"metric": CREATOR_METRIC,
                         "designs": rows(CREATOR_METRIC, creator_estimate, designs),
                         "gte": gte[CREATOR_METRIC][0], "gte_ci": list(gte[CREATOR_METRIC][1:])},
        "seconds": round(time.perf_counter() - started, 1),
        "ran_on": "one process (--local)" if args.local else "Ray tasks (run_many)",
        "load_average_at_start": round(os.getloadavg()[0], 2),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "creator_side"}, indent=1))
    print(json.dumps(result["creator_side"], indent=1))


if __name__ == "__main__":
    main()
