"""RLlib PPO on the three simulators against fixed policies, and env-runner throughput beside REINFORCE.

    RAY_AUTH_MODE=disabled python benchmarks/rl.py --out benchmarks/results/rl.json

Trains `configs/rl-lts.yaml`, `configs/rl-iev.yaml` and `configs/rl-creator.yaml` (iterations as in
the configs unless `--iterations` scales them), evaluates each exported policy with
`recray.simulators.evaluate` on users / a world seed no training episode used, and writes the
JSON (`lts`, `iev`, `creator`, `throughput`), the LongTermSatisfaction learning curve
(`rl_lts_curve.png` beside the JSON) and the run folders under `--runs`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
EVAL_SEED = 100_000      # LTS/IEV users 100000.. ; training users are keyed from seeds 1..runners
CREATOR_EVAL_SEED = 1000  # the evaluation world; training worlds start from seeds 1..runners


def _train(config: str, runs: Path, overrides: dict, log) -> dict:
    from recray.platform.rl import load_rl_config, train

    cfg = load_rl_config(ROOT / config, {"storage_path": str(runs), **overrides})
    start = time.perf_counter()
    result = train(cfg, out=log)
    result["train_s"] = time.perf_counter() - start
    result["cfg"] = cfg
    return result


def _finished(run_dir: str) -> dict:
    """A finished run folder as `_train` returns it (to evaluate it again without training)."""
    from recray.platform.rl import load_rl_config

    folder = Path(run_dir)
    history = [json.loads(line) for line in (folder / "progress.jsonl").read_text().splitlines()]
    return {"run_dir": str(folder), "policy": str(folder / "policy.pt"), "history": history,
            "cfg": load_rl_config(folder / "config.yaml"), "train_s": float("nan")}


def lts(runs: Path, iterations: int | None, users: int, log, run_dir: str | None = None
        ) -> tuple[dict, dict]:
    from recray.simulators import LONG_TERM_SATISFACTION
    from recray.simulators.evaluate import episode_returns, mean_return
    from recray.simulators.learned_policy import LearnedPolicy

    over = {"iterations": iterations} if iterations else {}
    result = _finished(run_dir) if run_dir else _train("configs/rl-lts.yaml", runs, over, log)
    sensitivity = result["cfg"].env.params["sensitivity"]

    def greedy(path: Path) -> float:
        policy = LearnedPolicy.load(path, env_id=LONG_TERM_SATISFACTION)
        return float(episode_returns(LONG_TERM_SATISFACTION, policy, users, seed=EVAL_SEED,
                                     sensitivity=sensitivity).mean())

    figures = {
        "sensitivity": sensitivity,
        "ppo": greedy(Path(result["policy"])),
        "kale": mean_return(LONG_TERM_SATISFACTION, "kale", users, EVAL_SEED, sensitivity=sensitivity),
        "myopic": mean_return(LONG_TERM_SATISFACTION, "myopic", users, EVAL_SEED,
                              sensitivity=sensitivity),
        # The greedy policy of every checkpoint on the unseen users: the curve's other half.
        "checkpoints": checkpoint_returns(result, greedy),
    }
    return figures, result


def checkpoint_returns(result: dict, evaluate) -> list[dict]:
    steps = {x["iteration"]: x["env_steps"] for x in result["history"]}
    found = sorted((Path(result["run_dir"]) / "checkpoints").glob("iter_*/policy.pt"))
    return [{"iteration": int(p.parent.name.split("_")[1]),
             "env_steps": steps.get(int(p.parent.name.split("_")[1])),
             "greedy_return": evaluate(p)} for p in found]


def iev(runs: Path, iterations: int | None, users: int, log) -> tuple[dict, dict]:
    from recray.simulators import INTEREST_EVOLUTION
    from recray.simulators.evaluate import episode_returns, mean_return
    from recray.simulators.learned_policy import LearnedPolicy

    over = {"iterations": iterations} if iterations else {}
    result = _train("configs/rl-iev.yaml", runs, over, log)
    policy = LearnedPolicy.load(result["policy"], env_id=INTEREST_EVOLUTION)
    return {
        "ppo": float(episode_returns(INTEREST_EVOLUTION, policy, users, seed=EVAL_SEED).mean()),
        "myopic": mean_return(INTEREST_EVOLUTION, "myopic", users, EVAL_SEED),
    }, result


def creator(runs: Path, iterations: int | None, log) -> tuple[dict, dict]:
    from recray.simulators import CREATOR_ECOSYSTEM
    from recray.simulators.evaluate import ecosystem_days
    from recray.simulators.learned_policy import LearnedPolicy

    over = {"iterations": iterations} if iterations else {}
    result = _train("configs/rl-creator.yaml", runs, over, log)
    cfg = result["cfg"]
    world = {"num_users": cfg.env.num_envs_per_env_runner,
             "num_creators": cfg.env.params["num_creators"]}
    policy = LearnedPolicy.load(result["policy"], env_id=CREATOR_ECOSYSTEM)
    ppo = ecosystem_days(policy, days=30, seed=CREATOR_EVAL_SEED, **world)
    myopic = ecosystem_days("myopic", days=30, seed=CREATOR_EVAL_SEED, **world)
    return {
        "ppo_day30_active": ppo["daily_active_users"],
        "myopic_day30_active": myopic["daily_active_users"],
        "engagement_ratio": float(ppo["daily_engagement"].sum() / myopic["daily_engagement"].sum()),
        "ppo_exits": ppo["creator_exits"],
        "myopic_exits": myopic["creator_exits"],
        "ppo_retained": ppo["retained_users"],
        "myopic_retained": myopic["retained_users"],
        "eval_world_seed": CREATOR_EVAL_SEED,
        "days": 30,
        **world,
    }, result


def throughput(runs: Path, iterations: int, log) -> dict:
    """Env steps/s of PPO's rollouts with 1 and 2 env runners, and of REINFORCE in one process,
    all on LongTermSatisfaction at 64 users per vector env."""
    import torch

    from recray.simulators import LONG_TERM_SATISFACTION
    from recray.simulators.rl import train_reinforce

    figures = {}
    for runners in (1, 2):
        result = _train("configs/rl-lts.yaml", runs, {
            "name": f"rl-throughput-{runners}", "num_env_runners": runners,
            "iterations": iterations, "checkpoint_every": 1000}, log)
        # The first iteration includes the env runners' start: leave it out.
        lines = result["history"][1:] or result["history"]
        figures[f"env_runners_{runners}"] = float(np.median([x["env_steps_per_s"] for x in lines]))
    reinforce_iterations, users = 5, 64
    start = time.perf_counter()
    torch.set_num_threads(1)
    train_reinforce(LONG_TERM_SATISFACTION, num_users=users, iterations=reinforce_iterations,
                    sensitivity=0.5)
    # Each iteration is one 60-step episode of every user (LongTermSatisfaction's fixed budget);
    # the time includes REINFORCE's own update, which PPO's rollout figure leaves out.
    figures["reinforce"] = reinforce_iterations * users * 60 / (time.perf_counter() - start)
    return figures


def curve_png(result: dict, figures: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [x["env_steps"] for x in result["history"]]
    returns = [x["episode_return_mean"] for x in result["history"]]
    fig, ax = plt.subplots(figsize=(6.4, 4))
    ax.plot(steps, returns, marker="o", label="PPO (training episodes, explore)")
    ax.axhline(figures["kale"], color="green", ls="--", label="kale (least clickbait)")
    ax.axhline(figures["myopic"], color="red", ls="--", label="myopic (most clickbait)")
    points = [c for c in figures["checkpoints"] if c["env_steps"] is not None]
    ax.plot([c["env_steps"] for c in points], [c["greedy_return"] for c in points], "s",
            color="C1", ms=8, label="PPO checkpoint, greedy, unseen users")
    ax.set_xlabel("env steps")
    ax.set_ylabel("mean episode return")
    ax.set_title(f"LongTermSatisfaction, sensitivity {figures['sensitivity']}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/results/rl.json")
    parser.add_argument("--runs", default="runs/bench-rl", help="where the run folders go")
    parser.add_argument("--parts", default="lts,iev,creator,throughput")
    parser.add_argument("--lts-iterations", type=int, help="default: the config's")
    parser.add_argument("--iev-iterations", type=int)
    parser.add_argument("--creator-iterations", type=int)
    parser.add_argument("--lts-run", help="evaluate this finished rl-lts run folder again "
                        "instead of training one")
    parser.add_argument("--throughput-iterations", type=int, default=4)
    parser.add_argument("--eval-users", type=int, default=1000)
    parser.add_argument("--note", default="", help="recorded in the JSON (e.g. machine load)")
    args = parser.parse_args(argv)

    import ray

    out, runs = Path(args.out), Path(args.runs)
    out.parent.mkdir(parents=True, exist_ok=True)
    # rl.json keeps the shape exactly; how each figure was made goes beside it.
    details_path = out.with_name(out.stem + "_details.json")
    results = json.loads(out.read_text()) if out.exists() else {}
    details = json.loads(details_path.read_text()) if details_path.exists() else {}
    details["meta"] = {"cpus": os.cpu_count(), "load_at_start": os.getloadavg()[0],
                       "note": args.note, "command": " ".join(["python", *sys.argv])}
    log = sys.stdout
    keys = {"lts": ("sensitivity", "ppo", "kale", "myopic"), "iev": ("ppo", "myopic"),
            "creator": ("ppo_day30_active", "myopic_day30_active", "engagement_ratio",
                        "ppo_exits", "myopic_exits"),
            "throughput": ("env_runners_1", "env_runners_2", "reinforce")}
    for part in args.parts.split(","):
        start, load_at_start = time.perf_counter(), os.getloadavg()[0]
        if not ray.is_initialized() and not (part == "lts" and args.lts_run):
            ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
                     logging_level="WARNING")
        if part == "lts":
            figures, result = lts(runs, args.lts_iterations, args.eval_users, log, args.lts_run)
            curve_png(result, figures, out.with_name("rl_lts_curve.png"))
        elif part == "iev":
            figures, result = iev(runs, args.iev_iterations, args.eval_users, log)
        elif part == "creator":
            figures, result = creator(runs, args.creator_iterations, log)
        elif part == "throughput":
            figures, result = throughput(runs, args.throughput_iterations, log), None
        else:
            raise SystemExit(f"--parts: unknown part {part!r}")
        extra = {k: v for k, v in figures.items() if k not in keys[part]}
        if result is not None:
            extra.update(train_s=result["train_s"], run_dir=result["run_dir"],
                         history=result["history"])
        extra.update(wall_s=time.perf_counter() - start, load_at_start=load_at_start,
                     load_at_end=os.getloadavg()[0], eval_users=args.eval_users,
                     command=details["meta"]["command"], note=args.note)
        results[part] = {k: figures[k] for k in keys[part]}
        details[part] = extra
        out.write_text(json.dumps(results, indent=2, default=float) + "\n")
        details_path.write_text(json.dumps(details, indent=2, default=float) + "\n")
        print(part, json.dumps(results[part], default=float), flush=True)
    if ray.is_initialized():
        ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
