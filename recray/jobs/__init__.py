"""Thin entrypoints, one module per verb: `python -m recray.jobs.<verb>` and `recray <verb>`."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType
from typing import TextIO


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


@contextmanager
def output_to_file(path: Path) -> Iterator[TextIO]:
    """Send everything this process and the processes it starts write to stdout/stderr (Ray's and
    Ray Data's logs, progress bars, workers' forwarded prints) to `path`; yield the terminal.

    It works on file descriptors 1 and 2, not on `sys.stdout`: Ray Data's bars, raylet and the
    worker processes write to the descriptors they inherit. A job's own progress lines go to the
    yielded stream. On an error the log's last lines reach the terminal too, so nothing is lost.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    saved = {fd: os.dup(fd) for fd in (1, 2)}
    terminal = os.fdopen(os.dup(saved[1]), "w", buffering=1)
    with open(path, "ab") as log:
        for fd in (1, 2):
            os.dup2(log.fileno(), fd)
        try:
            yield terminal
        except BaseException:
            sys.stdout.flush()
            sys.stderr.flush()
            tail = path.read_text(errors="replace").splitlines()[-40:]
            print("\n".join(["", f"--- last lines of {path} ---", *tail]), file=terminal)
            raise
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            for fd, copy in saved.items():
                os.dup2(copy, fd)
                os.close(copy)
            terminal.close()
