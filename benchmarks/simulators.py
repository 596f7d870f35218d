"""User-steps per second of each simulator: the native vectorised env beside the scalar env.

    python benchmarks/simulators.py [--seconds 2] [--out benchmarks/results/simulators.json]

A user-step is one user answering one slate (CreatorEcosystem: one served session; users idle
in a round are not counted). Actions are a fixed valid slate, so the figure is the env's own
cost, not a policy's.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np

import recray.simulators as sims


def _timed(step: Any, users_per_call: int, seconds: float) -> float:
    step()  # warm-up: first-touch allocations
    calls, start = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - start) < seconds:
        step()
        calls += 1
    return calls * users_per_call / elapsed


def vector_rate(env_id: str, num_envs: int, seconds: float, **params: Any) -> float:
    env = gym.make_vec(env_id, num_envs=num_envs, vectorization_mode="vector_entry_point",
                       **params)
    obs, _ = env.reset(seed=0)
    slate = np.tile(np.arange(env.single_action_space.shape[0]), (num_envs, 1))
    obs = env.step(slate)[0]  # warm-up: first-touch allocations
    served, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        # CreatorEcosystem users without a session this round do not count as user-steps.
        served += int(obs["active"].sum()) if "active" in obs else num_envs
        obs = env.step(slate)[0]
    return served / (time.perf_counter() - start)


def scalar_rate(env_id: str, seconds: float, **params: Any) -> float:
    env = gym.make(env_id, disable_env_checker=True, **params)
    env.reset(seed=0)
    slate = np.arange(env.action_space.shape[0])

    def step() -> None:
        _, _, terminated, truncated, _ = env.step(slate)
        if terminated or truncated:
            env.reset()

    return _timed(step, 1, seconds)


CASES: list[dict[str, Any]] = [
    {"env_id": sims.LONG_TERM_SATISFACTION, "num_envs": 65536, "params": {}},
    {"env_id": sims.INTEREST_EVOLUTION, "num_envs": 16384, "params": {}},
    # The scalar CreatorEcosystem env still simulates the whole world (one session per step).
    {"env_id": sims.CREATOR_ECOSYSTEM, "num_envs": 10_000,
     "params": {"num_creators": 1_000, "horizon_days": 10_000}},
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=2.0)
    parser.add_argument("--out", default="benchmarks/results/simulators.json")
    args = parser.parse_args()
    results = []
    for case in CASES:
        env_id, params = case["env_id"], case["params"]
        vec = vector_rate(env_id, case["num_envs"], args.seconds, **params)
        scalar_params = dict(params)
        if env_id == sims.CREATOR_ECOSYSTEM:
            scalar_params["num_users"] = case["num_envs"]
        scalar = scalar_rate(env_id, args.seconds, **scalar_params)
        row = {"env": env_id, "num_envs": case["num_envs"], "params": params,
               "vector_user_steps_per_s": round(vec), "scalar_user_steps_per_s": round(scalar),
               "speedup": round(vec / scalar, 1)}
        print(json.dumps(row))
        results.append(row)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "benchmark": "simulators", "cpu_count": os.cpu_count(), "machine": platform.machine(),
        "numpy": np.__version__, "seconds_per_case": args.seconds, "results": results,
    }, indent=2))


if __name__ == "__main__":
    main()
