"""`recray data prepare|simulate`: raw data sets or a simulated log -> Parquet splits + schema.yaml."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from recray.data.simulate import WorldConfig
from recray.jobs import main_for
from recray.simulators.logging_policy import LogConfig

# Flags that only one `simulate --world` uses, with their defaults.
WORLD_FLAGS = {"creator": {"days": LogConfig.days, "creators": 100},
               "parametric": {"items": WorldConfig.num_items,
                              "impressions": WorldConfig.num_impressions}}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    verbs = parser.add_subparsers(dest="data_verb", required=True)
    prepare = verbs.add_parser("prepare", help="convert a raw data set (its original files)")
    prepare.add_argument("name", help="movielens-100k, criteo, avazu, taobao or kuairand")
    prepare.add_argument("--src", required=True, help="the raw file or folder")
    prepare.add_argument("--out", required=True, help="output folder")
    prepare.add_argument("--split-files", nargs=3, type=Path, metavar=("TRAIN", "VALID", "TEST"),
                         help="CSV files naming rows (user_id,item_id,timestamp, or row), one "
                              "line per row, pinning the split")
    prepare.add_argument("--allow-partial-split", action="store_true",
                         help="drop the rows no split file names instead of failing")
    prepare.add_argument("--seed", type=int, default=0)
    prepare.add_argument("--min-count", type=int,
                         help="ids seen fewer times in train share one out-of-vocabulary id "
                              "(default 2)")
    simulate = verbs.add_parser("simulate", help="a synthetic log with a known click model")
    simulate.add_argument("--out", required=True, help="output folder")
    simulate.add_argument("--users", type=int, default=WorldConfig.num_users)
    simulate.add_argument("--seed", type=int, default=0)
    simulate.add_argument("--world", choices=("creator", "parametric"), default="creator",
                          help="creator: a CreatorEcosystem log under a logging policy with "
                               "propensities (the simulated world); parametric: the latent-factor "
                               "click model the demo uses")
    # World-specific flags default to None so that one given for the other world is refused.
    for world, flags in WORLD_FLAGS.items():
        for flag, default in flags.items():
            simulate.add_argument(f"--{flag}", type=int,
                                  help=f"{world} world only (default {default})")


def _world_flags(args: argparse.Namespace) -> dict[str, int]:
    """The chosen world's flags with defaults filled in; a flag of the other world is an error."""
    for world, flags in WORLD_FLAGS.items():
        given = [f"--{flag}" for flag in flags if getattr(args, flag) is not None]
        if world != args.world and given:
            raise ValueError(f"{', '.join(given)}: applies to --world {world} only, not to "
                             f"--world {args.world}")
    return {flag: default if getattr(args, flag) is None else getattr(args, flag)
            for flag, default in WORLD_FLAGS[args.world].items()}


def run(args: argparse.Namespace) -> int:
    if args.data_verb == "prepare":
        from recray.data.loaders import prepare

        options = {} if args.min_count is None else {"min_count": args.min_count}
        out = prepare(args.name, args.src, args.out, split_files=args.split_files,
                      allow_partial_split=args.allow_partial_split, seed=args.seed, **options)
        print(f"wrote {out}")
        return 0
    flags = _world_flags(args)
    if args.world == "creator":
        from recray.simulators.logging_policy import write_creator_log

        cfg = LogConfig(num_users=args.users, days=flags["days"], seed=args.seed,
                        world={"num_creators": flags["creators"]})
        oracle = write_creator_log(args.out, cfg)
        print(f"wrote {args.out}; oracle click AUC (true click model): {json.dumps(oracle)}")
        return 0
    from recray.data.simulate import simulate

    world = WorldConfig(num_users=args.users, num_items=flags["items"],
                        num_impressions=flags["impressions"], seed=args.seed)
    oracle = simulate(args.out, world)
    print(f"wrote {args.out}; oracle (Bayes-optimal) metrics: {json.dumps(oracle)}")
    return 0


def main(argv: list[str] | None = None) -> int:
    return main_for(sys.modules[__name__], argv)


if __name__ == "__main__":
    sys.exit(main())
