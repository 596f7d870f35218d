"""`recray tune CONFIG` / `python -m recray.jobs.tune --config FILE`: architecture search on Ray Tune."""

from __future__ import annotations

import argparse
import sys

from recray.jobs import main_for, output_to_file
from recray.jobs.train import parse_overrides
from recray.platform.config import ConfigError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", nargs="?", help="YAML train config with a search: section")
    parser.add_argument("--config", dest="config_opt", help="same as the positional CONFIG")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config field, e.g. --set search.num_samples=2")
    parser.add_argument("--resume", nargs="?", const="latest", metavar="RUN",
                        help="continue a search after its driver died (Tuner.restore): the "
                             "newest tune folder of this config, or RUN (a folder name or path)")
    parser.add_argument("--max-latency-ms", type=float, metavar="MS",
                        help="export the best trial whose p99 serving latency is within MS")


def run(args: argparse.Namespace) -> int:
    from recray.platform.tune import load_tune_config, tune_search

    path = args.config_opt or args.config
    if not path:
        raise ConfigError("give a config file: recray tune CONFIG")
    overrides = parse_overrides(args.set)
    if args.max_latency_ms is not None:
        overrides["search.max_latency_ms"] = args.max_latency_ms
    tune_search(load_tune_config(path, overrides), resume=args.resume, log_to=output_to_file)
    return 0


def main(argv: list[str] | None = None) -> int:
    return main_for(sys.modules[__name__], argv)


if __name__ == "__main__":
    sys.exit(main())
