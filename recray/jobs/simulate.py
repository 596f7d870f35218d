"""`recray simulate calibrate`: fit a simple world to a real log and report its KS distance to it."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from recray.jobs import main_for


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from recray.simulators.calibrate import FORMATS

    verbs = parser.add_subparsers(dest="simulate_verb", required=True)
    calibrate = verbs.add_parser(
        "calibrate", help="fit item popularity skew and user activity to a log; report KS distances")
    calibrate.add_argument("--src", required=True, type=Path,
                           help="MovieLens u.data or a KuaiRand CSV (user_id, video_id, time_ms)")
    calibrate.add_argument("--format", required=True, choices=FORMATS, dest="log_format")
    calibrate.add_argument("--out", type=Path, help="write the report as JSON here")
    calibrate.add_argument("--seed", type=int, default=0)


def run(args: argparse.Namespace) -> int:
    from recray.simulators.calibrate import calibrate

    report = calibrate(args.src, args.log_format, seed=args.seed)
    text = json.dumps(report, indent=2)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    print(text)
    return 0


def main(argv: list[str] | None = None) -> int:
    return main_for(sys.modules[__name__], argv)


if __name__ == "__main__":
    sys.exit(main())
