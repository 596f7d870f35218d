"""End-to-end seconds of one A/B experiment on CreatorEcosystem through Ray, beside one process.

    python benchmarks/abtest_speed.py [--users 100000] [--days 30] [--shards 2]
                                      [--out benchmarks/results/abtest_speed.json]

The experiment: popularity (control) vs exposure-aware ranking (treatment), user randomised,
built-in policies, no pre-period, no GTE worlds (those are two more runs of the same world).
`seconds` runs the users on `shards` Ray actors around the driver's creator hub and counts from
the experiment's start (actors included, `ray.init` not) to the finished result frames;
`single_process_seconds` is the same experiment unsharded in this process (no Ray). Both give
the same frames (checked when --check is given: it doubles the time).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

from recray.abtest.config import ExperimentConfig, parse_config


def experiment(users: int, days: int, shards: int, creators: int) -> ExperimentConfig:
    return parse_config({
        "name": "abtest-speed", "users": users, "days": days, "shards": shards, "gte": False,
        "world": {"params": {"num_creators": creators}},
        "arms": [{"name": "control", "share": 0.5, "policy": "popularity"},
                 {"name": "treatment", "share": 0.5, "policy": "exposure_aware"}]})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--users", type=int, default=100_000)
    parser.add_argument("--days", type=int, default=30)
    parser.add_argument("--shards", type=int, default=2)
    parser.add_argument("--creators", type=int, default=1000)
    parser.add_argument("--check", action="store_true", help="assert the two runs' frames agree")
    parser.add_argument("--out", default="benchmarks/results/abtest_speed.json")
    args = parser.parse_args()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    import pandas as pd
    import ray

    from recray.abtest.harness import run_world
    from recray.platform.abtest import run_world_on_ray
    from recray.platform.ray_init import init_local_ray

    cfg = experiment(args.users, args.days, args.shards, args.creators)
    load_before = os.getloadavg()[0]
    start = time.perf_counter()
    init_local_ray(num_cpus=2, include_dashboard=False, log_to_driver=False)
    ray_init_seconds = time.perf_counter() - start
    start = time.perf_counter()
    sharded = run_world_on_ray(cfg, cfg.seeds[0])
    seconds = time.perf_counter() - start
    ray.shutdown()
    start = time.perf_counter()
    single = run_world(cfg, cfg.seeds[0], shards=1)
    single_seconds = time.perf_counter() - start
    if args.check:
        pd.testing.assert_frame_equal(sharded.users, single.users)
    result = {
        "users": args.users, "days": args.days, "arms": len(cfg.arms), "shards": args.shards,
        "seconds": round(seconds, 2), "single_process_seconds": round(single_seconds, 2),
        "ray_init_seconds": round(ray_init_seconds, 2),
        "world": {"env": cfg.world.env, "num_creators": args.creators},
        "user_days_per_second": round(args.users * args.days / seconds),
        "frames_checked_equal": bool(args.check),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                    "load_average_at_start": round(load_before, 2),
                    "note": "loaded shared machine: an upper bound" if load_before > 1.5 else
                    "quiet"},
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
