"""`recray rl CONFIG` / `python -m recray.jobs.rl --config FILE`: RLlib PPO on a simulator, one line per iteration."""

from __future__ import annotations

import argparse
import sys

from recray.jobs import main_for, output_to_file
from recray.jobs.train import parse_overrides
from recray.platform.config import ConfigError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", nargs="?", help="YAML RL config (configs/rl-*.yaml)")
    parser.add_argument("--config", dest="config_opt", help="same as the positional CONFIG")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config field, e.g. --set iterations=5")
    parser.add_argument("--resume", metavar="RUN",
                        help="continue RUN (a folder under storage_path, or its path) from its last "
                             "checkpoint for another `iterations` iterations")


def run(args: argparse.Namespace) -> int:
    from recray.platform.rl import load_rl_config, run_folder, train

    path = args.config_opt or args.config
    if not path:
        raise ConfigError("give a config file: recray rl CONFIG")
    cfg = load_rl_config(path, parse_overrides(args.set))
    folder, checkpoint = run_folder(cfg, args.resume)  # every check before Ray starts
    print(f"run folder {folder} (Ray's logs in {folder / 'ray.log'})", flush=True)
    with output_to_file(folder / "ray.log") as terminal:
        result = train(cfg, args.resume, out=terminal, run=(folder, checkpoint))
    last = result["history"][-1]
    print(f"done: mean return {last['episode_return_mean']:.2f} over the last iteration's "
          f"episodes; policy {result['policy']}")
    return 0


def main(argv: list[str] | None = None) -> int:
    return main_for(sys.modules[__name__], argv)


if __name__ == "__main__":
    sys.exit(main())
