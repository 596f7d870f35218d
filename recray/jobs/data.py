"""`recray data prepare|simulate`: raw data sets or a simulated log -> Parquet splits + schema.yaml."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from recray.data.simulate import WorldConfig
from recray.jobs import main_for
from recray.simulators.logging_policy import LogConfig


def add_arguments(parser: argparse.ArgumentParser) -> None:
    verbs = parser.add_subparsers(dest="data_verb", required=True)
    prepare = verbs.add_parser("prepare", help="convert a raw data set (its original files)")
    prepare.add_argument("name", help="movielens-100k, criteo, taobao or kuairand")
    prepare.add_argument("--src", required=True, help="the raw file or folder")
    prepare.add_argument("--out", required=True, help="output folder")
    prepare.add_argument("--split-files", nargs=3, type=Path, metavar=("TRAIN", "VALID", "TEST"),
                         help="CSV files of rows (user_id,item_id,timestamp) pinning the split")
    prepare.add_argument("--seed", type=int, default=0)
    simulate = verbs.add_parser("simulate", help="a synthetic log with a known click model")
    simulate.add_argument("--out", required=True, help="output folder")
    simulate.add_argument("--users", type=int, default=WorldConfig.num_users)
    simulate.add_argument("--items", type=int, default=WorldConfig.num_items)
    simulate.add_argument("--impressions", type=int, default=WorldConfig.num_impressions)
    simulate.add_argument("--seed", type=int, default=0)
    simulate.add_argument("--world", choices=("creator", "parametric"), default="creator",
                          help="creator: a CreatorEcosystem log under a logging policy with "
                               "propensities (the simulated world); parametric: the latent-factor "
                               "click model the demo uses")
    simulate.add_argument("--days", type=int, default=LogConfig.days, help="creator world only")
    simulate.add_argument("--creators", type=int, default=100, help="creator world only")


def run(args: argparse.Namespace) -> int:
    if args.data_verb == "prepare":
        from recray.data.loaders import prepare

        out = prepare(args.name, args.src, args.out, split_files=args.split_files, seed=args.seed)
        print(f"wrote {out}")
        return 0
    if args.world == "creator":
        from recray.simulators.logging_policy import write_creator_log

        cfg = LogConfig(num_users=args.users, days=args.days, seed=args.seed,
                        world={"num_creators": args.creators})
        oracle = write_creator_log(args.out, cfg)
        print(f"wrote {args.out}; oracle click AUC (true click model): {json.dumps(oracle)}")
        return 0
    from recray.data.simulate import simulate

    world = WorldConfig(num_users=args.users, num_items=args.items,
                        num_impressions=args.impressions, seed=args.seed)
    oracle = simulate(args.out, world)
    print(f"wrote {args.out}; oracle (Bayes-optimal) metrics: {json.dumps(oracle)}")
    return 0


def main(argv: list[str] | None = None) -> int:
    return main_for(sys.modules[__name__], argv)


if __name__ == "__main__":
    sys.exit(main())
