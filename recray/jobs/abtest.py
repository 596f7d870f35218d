"""`recray abtest CONFIG [--out DIR]` / `python -m recray.jobs.abtest --config FILE`: an online
A/B experiment on the simulated world, users sharded over Ray actors, with its report."""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from recray.jobs import main_for


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", nargs="?", help="YAML experiment config (configs/abtest.yaml)")
    parser.add_argument("--config", dest="config_opt", help="same as the positional CONFIG")
    parser.add_argument("--out", help="output folder (default runs/abtest/<name>-<time>); "
                                      "must not exist")
    parser.add_argument("--shards", type=int, help="user shards (Ray actors); default: config")
    parser.add_argument("--address", default="local", help="Ray address (default: a local Ray)")


def _ray_logs_to(path: Path) -> None:
    """Ray's driver-side logger writes to `path`; workers' output stays in Ray's session logs."""
    logger = logging.getLogger("ray")
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
    logger.addHandler(logging.FileHandler(path))
    logger.propagate = False


def write_raw(result: Any, folder: Path) -> None:
    """The frames as Parquet and everything else as JSON: what the analysis reads."""
    result.users.to_parquet(folder / "users.parquet", index=False)
    result.creators.to_parquet(folder / "creators.parquet", index=False)
    (folder / "result.json").write_text(json.dumps({
        "arms": result.arms, "shares": result.shares, "design": result.design,
        "meta": result.meta, "gte": result.gte, "failures": result.failures,
    }, indent=1, default=str) + "\n")


def report(result: Any, cfg: Any, folder: Path) -> dict[str, Any] | None:
    """The statistics and report.html, when `recray.abtest.stats` / `.report` are installed."""
    try:
        from recray.abtest.report import write_report
        from recray.abtest.stats import AnalysisConfig, analyze
    except ImportError:
        return None
    analysis = analyze(result, AnalysisConfig.model_validate(cfg.analysis))
    write_report(result, analysis, folder)
    return analysis


def run_one(cfg: Any, seed: int, folder: Path, say: Any) -> None:
    from recray.platform.abtest import run_experiment_on_ray

    started = time.perf_counter()
    say(f"experiment {cfg.name} seed {seed}: {cfg.users} users, {cfg.shards} shards, "
        f"{cfg.pre_days} pre-period + {cfg.days} days, design {cfg.design}, "
        f"arms {', '.join(f'{a.name} {a.share:g}' for a in cfg.arms)}")
    result = run_experiment_on_ray(cfg, seed, progress=say, check=False)
    write_raw(result, folder)
    analysis = report(result, cfg, folder)
    for failure in result.failures:
        say(f"FAILED: arm {failure['arm']} day {failure['day']}: {failure['users']} users "
            f"affected ({failure['error']})")
    for arm, load in result.meta.get("endpoints", {}).items():
        say(f"arm {arm}: {load['scores']} candidates scored through its endpoint, "
            f"{load['scores_per_second']:.0f} scores/s")
    gte = result.gte.get("watch_minutes")
    say(f"done in {time.perf_counter() - started:.0f} s"
        + (f"; GTE watch minutes/user-day {gte:+.3f}" if gte is not None else "")
        + ("" if analysis is not None else "; statistics not installed: raw frames only"))


def run(args: argparse.Namespace) -> int:
    from recray.abtest.config import ExperimentConfigError, load_config, validate

    path = args.config_opt or args.config
    if not path:
        raise ExperimentConfigError("give a config file: recray abtest CONFIG")
    cfg = load_config(path)
    if args.shards is not None:
        cfg = cfg.model_copy(update={"shards": args.shards})
    validate(cfg)  # everything, endpoints included, before Ray starts
    out = Path(args.out or f"runs/abtest/{cfg.name}-{time.strftime('%Y%m%d-%H%M%S')}")
    if out.exists():
        raise ExperimentConfigError(f"--out: {out} exists; choose a new folder")
    # Written under a hidden temporary name and renamed at the end, so that an interrupted run
    # never leaves a folder that looks like a result.
    partial = out.parent / f".{out.name}.partial"
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    import ray

    _ray_logs_to(partial / "ray.log")
    owns_ray = not ray.is_initialized()  # inside a Ray job (or a test session): use that Ray
    if owns_ray:
        ray.init(address=args.address, log_to_driver=False, configure_logging=False,
                 include_dashboard=False)

    def say(line: str) -> None:
        print(line, flush=True)

    try:
        for seed in cfg.seeds:
            folder = partial if len(cfg.seeds) == 1 else partial / f"seed-{seed}"
            folder.mkdir(exist_ok=True)
            run_one(cfg, seed, folder, say)
    finally:
        if owns_ray:
            ray.shutdown()
    partial.rename(out)
    html = sorted(out.rglob("report.html"))
    say(f"results: {out}" + (f" (report: {html[0]})" if html else ""))
    return 0


def main(argv: list[str] | None = None) -> int:
    return main_for(sys.modules[__name__], argv)


if __name__ == "__main__":
    sys.exit(main())
