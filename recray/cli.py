"""The `recray` command line: one sub-command per job module in `recray.jobs`."""

from __future__ import annotations

import argparse
import importlib
import sys

VERBS = {
    "data": "prepare a raw data set or simulate a log",
    "train": "train a model on Ray Train from a YAML config",
    "demo": "the embedded default: simulate, train, evaluate, report",
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="recray", description=__doc__)
    verbs = parser.add_subparsers(dest="verb", required=True)
    for verb, help_text in VERBS.items():
        job = importlib.import_module(f"recray.jobs.{verb}")
        job.add_arguments(verbs.add_parser(verb, help=help_text, description=job.__doc__))
    args = parser.parse_args(argv)
    job = importlib.import_module(f"recray.jobs.{args.verb}")
    try:
        return job.run(args)
    except (ValueError, FileNotFoundError) as e:  # ConfigError and SchemaError are ValueErrors
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
