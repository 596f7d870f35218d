"""`recray submit VERB CONFIG --address URL`: run a recray job on a Ray cluster and follow its logs."""

from __future__ import annotations

import argparse
import sys

from recray.jobs import main_for

SUBMITTABLE = ("train", "tune", "serve", "rl")  # grows with the verbs that take --config (abtest)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    # `job`, not `verb`: the `recray` CLI keeps its own sub-command in `verb`, which an argument
    # of the same name here would overwrite (`recray submit train` then ran `recray train`)
    parser.add_argument("job", metavar="VERB", choices=SUBMITTABLE,
                        help="the job to run on the cluster")
    parser.add_argument("config", help="YAML config, a path inside the working directory; for "
                                       "serve a serve config listing variants, or a run folder "
                                       "(an absolute path is read on the cluster's nodes)")
    parser.add_argument("--address", required=True,
                        help="the cluster's dashboard address, e.g. http://127.0.0.1:8265")
    parser.add_argument("--working-dir", default=".", help="uploaded as the job's working dir")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config field for the job, e.g. --set data.path=s3://b/sim")


def run(args: argparse.Namespace) -> int:
    from recray.jobs.train import parse_overrides
    from recray.platform.submit import submit

    # the config and its data are checked against the upload here, not on the cluster
    job_id, status = submit(args.job, args.config, args.address, working_dir=args.working_dir,
                            overrides=parse_overrides(args.set))
    print(f"job {job_id} {status}")
    return 0 if status == "SUCCEEDED" else 1


def main(argv: list[str] | None = None) -> int:
    return main_for(sys.modules[__name__], argv)


if __name__ == "__main__":
    sys.exit(main())
