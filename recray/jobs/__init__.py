"""Thin entrypoints, one module per verb: `python -m recray.jobs.<verb>` and `recray <verb>`."""

from __future__ import annotations

import argparse
import sys
from types import ModuleType


def run_job(job: ModuleType, args: argparse.Namespace) -> int:
    """Run a parsed job; a bad input (ValueError: ConfigError, SchemaError) exits 2 with its message,
    a diverged training run (FloatingPointError: TrainingDiverged) 1."""
    try:
        return job.run(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except FloatingPointError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


def main_for(job: ModuleType, argv: list[str] | None = None) -> int:
    """`python -m recray.jobs.<verb>`: the job's own arguments, then `run_job`."""
    parser = argparse.ArgumentParser(prog=f"python -m {job.__name__}", description=job.__doc__)
    job.add_arguments(parser)
    return run_job(job, parser.parse_args(argv))
