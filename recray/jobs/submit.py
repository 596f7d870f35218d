"""`recray submit VERB CONFIG --address URL`: run a recray job on a Ray cluster and follow its logs."""

from __future__ import annotations

import argparse
import sys

from recray.jobs import main_for
from recray.platform.config import load_yaml

SUBMITTABLE = ("train",)  # grows with the verbs that take --config (tune, serve, abtest)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("verb", choices=SUBMITTABLE, help="the job to run on the cluster")
    parser.add_argument("config", help="YAML config, a path inside the working directory")
    parser.add_argument("--address", required=True,
                        help="the cluster's dashboard address, e.g. http://127.0.0.1:8265")
    parser.add_argument("--working-dir", default=".", help="uploaded as the job's working dir")


def run(args: argparse.Namespace) -> int:
    from recray.platform.submit import submit

    load_yaml(args.config)  # a missing or unparsable file fails here, not on the cluster
    job_id, status = submit(args.verb, args.config, args.address, working_dir=args.working_dir)
    print(f"job {job_id} {status}")
    return 0 if status == "SUCCEEDED" else 1


def main(argv: list[str] | None = None) -> int:
    return main_for(sys.modules[__name__], argv)


if __name__ == "__main__":
    sys.exit(main())
