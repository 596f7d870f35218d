"""Submit a recray job to a Ray cluster through Ray's JobSubmissionClient, stream its logs, return its status."""

from __future__ import annotations

import asyncio
import json
import os
import posixpath
import shlex
import sys
import tempfile
import time
from pathlib import Path
from typing import Any
from zipfile import ZipFile

from recray.data import SPLITS
from recray.platform.config import ConfigError, load_train_config, load_yaml

# The working directory travels to the cluster; these never should (the venv alone is GBs). Ray
# reads them as .gitignore patterns, which match at any depth unless anchored: a bare `data` would
# also leave `recray/data` out of the upload.
EXCLUDES = [".venv", ".git", "**/__pycache__", "/data", "/runs", "/demo-output", "/benchmarks/results"]
DATA_FILES = ("schema.yaml", *(f"{split}.parquet" for split in SPLITS))
ON_A_CLUSTER = (
    "data reaches a cluster as a URI every node reads (--set data.path=s3://BUCKET/sim) or as a "
    "path on the nodes themselves (--set data.path=/mnt/shared/sim); a relative path must lie in "
    "the uploaded working directory"
)


def entrypoint(verb: str, config: str | Path, overrides: dict[str, Any] | None = None) -> str:
    """The same command `ray job submit -- ...` would run: `python -m recray.jobs.<verb> --config`.

    For `serve`, `config` is a serve config (YAML listing the variants) or a run folder, and the
    job deploys and leaves (`--detach`): the Serve app lives on in Serve's detached controller.
    """
    if verb == "serve":
        if overrides:
            raise ConfigError(f"--set {sorted(overrides)}: serve takes no overrides; put them in "
                              "the serve config")
        target = ["--config", str(config)] if is_yaml(config) else [str(config)]
        return shlex.join(["python", "-m", "recray.jobs.serve", *target, "--detach"])
    args = ["python", "-m", f"recray.jobs.{verb}", "--config", str(config)]
    for key, value in (overrides or {}).items():
        args += ["--set", f"{key}={json.dumps(value)}"]  # JSON scalars read back as the same YAML
    return shlex.join(args)


def package(working_dir: str | Path, target: Path) -> list[str]:
    """Zip `working_dir` into `target` as Ray uploads it; return the names of the files in it.

    Ray's own packaging function, with Ray's default excludes, `EXCLUDES` and the directory's
    `.gitignore` / `.rayignore` files (unless RAY_RUNTIME_ENV_IGNORE_GITIGNORE=1, as in Ray).
    """
    from ray._private import ray_constants
    from ray._private.runtime_env.packaging import create_package

    include_gitignore = os.environ.get(ray_constants.RAY_RUNTIME_ENV_IGNORE_GITIGNORE, "0") != "1"
    excludes = ray_constants.get_runtime_env_default_excludes() + EXCLUDES
    create_package(str(working_dir), target, include_gitignore=include_gitignore, excludes=excludes)
    with ZipFile(target) as zipped:
        return zipped.namelist()


def check_config(
    config: str, working_dir: Path, uploaded: set[str], overrides: dict[str, Any] | None = None
) -> None:
    """Refuse, before submitting, a config the job would not find, or whose data it would not find.

    The job runs in the uploaded copy of `working_dir`: a relative `config` or `data.path` must be
    in that upload, not just on this machine. A URI or an absolute path is read on the cluster's
    nodes as given and cannot be checked from here.
    """
    if posixpath.normpath(config) not in uploaded:
        raise ConfigError(
            f"config: {config} is not in the job's upload of {working_dir} (missing there, or left "
            "out by Ray's excludes, a .gitignore or a .rayignore)"
        )
    # a tune config is a train config plus its search: section, checked as such
    from recray.platform.tune import load_tune_config

    raw = load_yaml(working_dir / config)
    if "env" in raw:  # an RL config (`recray rl`): a simulator, no data to upload
        from recray.platform.rl import load_rl_config

        load_rl_config(working_dir / config, overrides)
        return
    load = load_tune_config if "search" in raw else load_train_config
    data_path = load(working_dir / config, overrides).data.path
    if "://" in data_path or posixpath.isabs(data_path) or data_path.startswith("~"):
        return
    missing = [f for f in DATA_FILES if posixpath.normpath(f"{data_path}/{f}") not in uploaded]
    if not missing:
        return
    local = [f for f in missing if (working_dir / data_path / f).is_file()]
    why = (
        f"{', '.join(local)} are here in {working_dir / data_path} but left out of the job's "
        f"upload (by recray's excludes {EXCLUDES}, Ray's, a .gitignore or a .rayignore)"
        if local
        else f"{', '.join(missing)} not found in the working directory {working_dir}"
    )
    raise ConfigError(f"data.path: {data_path!r} on the cluster: {why}; {ON_A_CLUSTER}")


def is_yaml(path: str | Path) -> bool:
    return str(path).endswith((".yaml", ".yml"))


def check_serve(target: str, working_dir: Path, uploaded: set[str]) -> None:
    """Refuse, before submitting, a serve job whose config or run folders the job would not find.

    `target` is a serve config or a run folder. A relative path is read in the job's upload of
    `working_dir` (where `runs/` is never uploaded); an absolute one on the cluster's nodes, and is
    loaded here only when this machine has it too.
    """
    from recray.platform.run_folder import load_run_folder
    from recray.platform.serve import load_serve_config

    def local(path: str) -> Path:
        return Path(path) if posixpath.isabs(path) else working_dir / path

    def in_upload(path: str, what: str) -> None:
        if not posixpath.isabs(path) and posixpath.normpath(path) not in uploaded:
            raise ConfigError(f"{what}: {path} is not in the job's upload of {working_dir} "
                              f"(missing there, or left out by recray's excludes {EXCLUDES}, "
                              "Ray's, a .gitignore or a .rayignore); give a path the cluster's "
                              "nodes read, e.g. an absolute path on shared storage")

    if is_yaml(target):
        in_upload(target, "config")
        run_dirs = [v.get("run_dir", "") for v in load_yaml(local(target)).get("variants") or []]
        if not run_dirs:
            raise ConfigError(f"{target}: variants: none given; `recray submit serve` takes a "
                              "serve config listing variants (name, run_dir) or a run folder")
        load_serve_config(local(target), working_dir)  # every field checked here
    else:
        run_dirs = [target]
    for run_dir in run_dirs:
        in_upload(posixpath.join(run_dir, "config.yaml"), "run_dir")
        if local(run_dir).is_dir() or not posixpath.isabs(run_dir):
            load_run_folder(local(run_dir))


def submit(
    verb: str,
    config: str | Path,
    address: str,
    *,
    working_dir: str | Path = ".",
    overrides: dict[str, Any] | None = None,
    stream=sys.stdout,
    timeout_s: float | None = None,
) -> tuple[str, str]:
    """Check, submit, stream the logs until the job ends; return (submission id, final status).

    `config` is a path inside `working_dir`; `overrides` are `--set` fields for the job. The
    upload is the package the check read, so what is checked is what the job gets.
    """
    from ray.job_submission import JobStatus, JobSubmissionClient

    working_dir = Path(working_dir).resolve()
    if not working_dir.is_dir():
        raise FileNotFoundError(f"working_dir: not a directory: {working_dir}")
    config = Path(config)
    if config.is_absolute() and verb != "serve":  # serve reads an absolute path on the nodes
        if not config.resolve().is_relative_to(working_dir):
            raise ConfigError(f"config: {config} is outside the working directory {working_dir}")
        config = config.resolve().relative_to(working_dir)
    config = config.as_posix()
    headers = {"Authorization": f"Bearer {os.environ['RAY_AUTH_TOKEN']}"} if os.environ.get(
        "RAY_AUTH_TOKEN") else None
    with tempfile.TemporaryDirectory(prefix="recray-submit-") as scratch:
        zipped = Path(scratch) / "working_dir.zip"
        uploaded = set(package(working_dir, zipped))
        if verb == "serve":
            check_serve(config, working_dir, uploaded)
        else:
            check_config(config, working_dir, uploaded, overrides)
        command = entrypoint(verb, config, overrides)
        client = JobSubmissionClient(address, headers=headers)
        job_id = client.submit_job(entrypoint=command, runtime_env={"working_dir": str(zipped)})
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
