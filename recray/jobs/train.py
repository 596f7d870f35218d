"""`recray train CONFIG` / `python -m recray.jobs.train --config FILE`: one training run on Ray Train."""

from __future__ import annotations

import argparse
import json
import sys

from recray.jobs import main_for
from recray.platform.config import ConfigError, load_train_config


def parse_overrides(pairs: list[str]) -> dict[str, object]:
    """`--set train.epochs=3` pairs -> {"train.epochs": 3} (values parsed as YAML scalars)."""
    import yaml

    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise ConfigError(f"--set {pair!r}: expected KEY=VALUE, e.g. train.epochs=3")
        out[key] = yaml.safe_load(value)
    return out


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", nargs="?", help="YAML experiment config")
    parser.add_argument("--config", dest="config_opt", help="same as the positional CONFIG")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config field, e.g. --set train.epochs=3")
    parser.add_argument("--resume", metavar="RUN",
                        help="continue RUN (a folder under storage_path, or its path) from its "
                             "last checkpoint; without it every run starts in a new folder")


def run(args: argparse.Namespace) -> int:
    from recray.platform.train import fit

    path = args.config_opt or args.config
    if not path:
        raise ConfigError("give a config file: recray train CONFIG")
    overrides = parse_overrides(args.set) | ({"resume": args.resume} if args.resume else {})
    cfg = load_train_config(path, overrides)
    result = fit(cfg)
    print(json.dumps(result, indent=2, default=str))
    return 0


def main(argv: list[str] | None = None) -> int:
    return main_for(sys.modules[__name__], argv)


if __name__ == "__main__":
    sys.exit(main())
