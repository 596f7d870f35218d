"""The `recray` command line: one sub-command per job module in `recray.jobs`."""

from __future__ import annotations

import argparse
import importlib
import sys

from recray.jobs import run_job

VERBS = {
    "data": "prepare a raw data set or simulate a log",
    "train": "train a model on Ray Train from a YAML config",
    "plan": "TorchRec's sharding plan and per-rank memory of a config on a cluster, planned here",
    "demo": "the embedded default: simulate, train, evaluate, report",
    "submit": "submit a job to a Ray cluster (JobSubmissionClient) and follow it",
    "simulate": "simulator tools: calibrate a world to a real log",
    "serve": "serve a trained run folder on Ray Serve (/v1/rank, A/B variants, autoscaling)",
    "tune": "search architectures on Ray Tune: AUC vs serving latency, Pareto front, best/ export",
    "rl": "train a slate policy with RLlib PPO on a simulator (env runner actors, checkpoints)",
    "abtest": "an online A/B test on the simulated world (Ray shards), with its GTE and report",
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="recray", description=__doc__)
    verbs = parser.add_subparsers(dest="verb", required=True)
    for verb, help_text in VERBS.items():
        job = importlib.import_module(f"recray.jobs.{verb}")
        job.add_arguments(verbs.add_parser(verb, help=help_text, description=job.__doc__))
    args = parser.parse_args(argv)
    return run_job(importlib.import_module(f"recray.jobs.{args.verb}"), args)


if __name__ == "__main__":
    sys.exit(main())
