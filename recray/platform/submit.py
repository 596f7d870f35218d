"""Submit a recray job to a Ray cluster through Ray's JobSubmissionClient, stream its logs, return its status."""

from __future__ import annotations

import asyncio
import os
import shlex
import sys
import time
from pathlib import Path

# The working directory travels to the cluster; these never should (the venv alone is GBs).
EXCLUDES = [".venv", ".git", "data", "runs", "demo-output", "**/__pycache__", "benchmarks/results"]


def entrypoint(verb: str, config: str | Path, extra: list[str] | None = None) -> str:
    """The same command `ray job submit -- ...` would run: `python -m recray.jobs.<verb> --config`."""
    args = ["python", "-m", f"recray.jobs.{verb}", "--config", str(config), *(extra or [])]
    return shlex.join(args)


def submit(
    verb: str,
    config: str | Path,
    address: str,
    *,
    working_dir: str | Path = ".",
    extra: list[str] | None = None,
    stream=sys.stdout,
    timeout_s: float | None = None,
) -> tuple[str, str]:
    """Submit, stream the logs until the job ends, and return (submission id, final status)."""
    from ray.job_submission import JobStatus, JobSubmissionClient

    headers = {"Authorization": f"Bearer {os.environ['RAY_AUTH_TOKEN']}"} if os.environ.get(
        "RAY_AUTH_TOKEN") else None
    client = JobSubmissionClient(address, headers=headers)
    job_id = client.submit_job(
        entrypoint=entrypoint(verb, config, extra),
        runtime_env={"working_dir": str(working_dir), "excludes": EXCLUDES},
    )
    print(f"submitted {job_id} to {address}", file=stream, flush=True)

    async def tail() -> None:
        async for lines in client.tail_job_logs(job_id):
            stream.write(lines)
            stream.flush()

    try:
        asyncio.run(asyncio.wait_for(tail(), timeout_s))
    except TimeoutError:
        client.stop_job(job_id)
    deadline = time.monotonic() + 30
    status = client.get_job_status(job_id)
    while not status.is_terminal() and time.monotonic() < deadline:
        time.sleep(0.5)
        status = client.get_job_status(job_id)
    return job_id, str(status.value if isinstance(status, JobStatus) else status)
