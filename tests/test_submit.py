"""Jobs on a real local head node: `recray submit` and plain JobSubmissionClient, success and bad config."""

from __future__ import annotations

import io
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from recray.data.simulate import WorldConfig, simulate
from recray.platform.submit import entrypoint, submit

REPO = Path(__file__).resolve().parents[1]


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


@pytest.fixture(scope="module")
def head_node(tmp_path_factory):
    """`ray start --head --block` as our own child process; ended by us, never by `ray stop`."""
    gcs, dashboard, client_port, agent, agent_grpc, runtime_env_agent, metrics = _free_ports(7)
    temp_dir = tmp_path_factory.mktemp("rayhead")
    # The job's `python` must be this venv's, as for a user who activated it.
    bin_dir = str(Path(sys.executable).parent)
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    proc = subprocess.Popen(
        [f"{bin_dir}/ray", "start", "--head", "--block",
         f"--port={gcs}", f"--dashboard-port={dashboard}", "--dashboard-host=127.0.0.1",
         f"--ray-client-server-port={client_port}", f"--dashboard-agent-listen-port={agent}",
         f"--dashboard-agent-grpc-port={agent_grpc}", f"--runtime-env-agent-port={runtime_env_agent}",
         f"--metrics-export-port={metrics}", "--num-cpus=2", "--include-dashboard=true",
         f"--temp-dir={temp_dir}", "--disable-usage-stats"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    address = f"http://127.0.0.1:{dashboard}"
    from ray.job_submission import JobSubmissionClient

    deadline = time.monotonic() + 90
    while True:
        try:
            JobSubmissionClient(address).list_jobs()
            break
        except Exception:
            if time.monotonic() > deadline or proc.poll() is not None:
                proc.kill()
                pytest.fail("the local Ray head node did not come up in 90 s")
            time.sleep(1)
    yield address
    proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, 9)


@pytest.fixture(scope="module")
def job_dir(tmp_path_factory):
    """A working directory for the job: a tiny simulated data set and two configs."""
    root = tmp_path_factory.mktemp("jobdir")
    simulate(root / "sim", WorldConfig(num_users=100, num_items=50, num_impressions=3000, seed=1))
    good = {"name": "job", "data": {"path": "sim"}, "model": {"name": "lr"},
            "train": {"epochs": 1, "batch_size": 512}, "storage_path": str(root / "runs")}
    (root / "good.yaml").write_text(yaml.safe_dump(good))
    (root / "bad.yaml").write_text(yaml.safe_dump({**good, "model": {"name": "no-such-model"}}))
    return root


def test_entrypoint_is_the_plain_ray_job_submit_command():
    assert entrypoint("train", "configs/x.yaml") == "python -m recray.jobs.train --config configs/x.yaml"


@pytest.mark.ray
def test_submitted_training_job_succeeds_and_reports_metrics(head_node, job_dir, monkeypatch):
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    logs = io.StringIO()
    job_id, status = submit("train", "good.yaml", head_node, working_dir=job_dir, stream=logs,
                            timeout_s=300)
    assert status == "SUCCEEDED", logs.getvalue()[-3000:]
    assert '"test_auc"' in logs.getvalue()


@pytest.mark.ray
def test_job_with_bad_config_fails_naming_the_field(head_node, job_dir, monkeypatch):
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    logs = io.StringIO()
    _, status = submit("train", "bad.yaml", head_node, working_dir=job_dir, stream=logs,
                       timeout_s=120)
    assert status == "FAILED"
    assert "model.name: unknown model 'no-such-model'" in logs.getvalue()
