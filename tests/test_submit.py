"""Jobs: the uploaded working directory, configs checked against it, and jobs on a real local head node."""

from __future__ import annotations

import io
import os
import signal
import socket
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest
import yaml

from recray.data.simulate import WorldConfig, simulate
from recray.platform.config import ConfigError
from recray.platform.submit import EXCLUDES, check_config, entrypoint, package, submit

REPO = Path(__file__).resolve().parents[1]
RECRAY = Path(sys.executable).parent / "recray"  # the console script users call


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
    proc.send_signal(signal.SIGINT)  # `ray start --block` stops its processes in ~5 s (SIGTERM: >30 s)
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
    assert entrypoint("train", "x.yaml", {"data.path": "s3://b/sim", "train.epochs": 3}) == (
        "python -m recray.jobs.train --config x.yaml "
        "--set 'data.path=\"s3://b/sim\"' --set train.epochs=3"
    )


def _zip_names(working_dir: Path, tmp_path: Path) -> set[str]:
    """The files Ray's own working_dir packaging puts in the upload, with recray's excludes."""
    from ray._private.runtime_env.packaging import create_package

    tmp_path.mkdir(parents=True, exist_ok=True)
    target = tmp_path / "pkg.zip"
    create_package(str(working_dir), target, include_gitignore=True, excludes=EXCLUDES)
    with zipfile.ZipFile(target) as zipped:
        return set(zipped.namelist())


def test_upload_keeps_recray_data_and_leaves_out_top_level_data_and_runs(tmp_path):
    names = _zip_names(REPO, tmp_path / "repo")
    sources = {p.relative_to(REPO).as_posix() for p in (REPO / "recray" / "data").rglob("*.py")}
    assert sources and sources <= names, sorted(sources - names)
    assert not any(n.startswith((".venv/", ".git/")) for n in names)

    tree = tmp_path / "tree"  # a working dir holding all the folder names the excludes mention
    files = ["recray/data/schema.py", "recray/runs.py", "data/sim/train.parquet",
             "runs/old/metrics.json", "demo-output/report.json", "benchmarks/results/x.json",
             "benchmarks/data.py", "configs/data/x.yaml"]
    for f in files:
        (tree / f).parent.mkdir(parents=True, exist_ok=True)
        (tree / f).write_text("x")
    names = _zip_names(tree, tmp_path / "tree-pkg")
    assert names >= {"recray/data/schema.py", "recray/runs.py", "benchmarks/data.py",
                     "configs/data/x.yaml"}
    assert not any(n.startswith(("data/", "runs/", "demo-output/", "benchmarks/results/"))
                   for n in names)


def _working_dir(root: Path, data_at: str) -> Path:
    """A working dir with the README's config, its data prepared at `data_at` (files only)."""
    (root / "configs").mkdir(parents=True)
    (root / "configs" / "sim-dcnv2.yaml").write_text((REPO / "configs" / "sim-dcnv2.yaml").read_text())
    (root / data_at).mkdir(parents=True)
    for f in ("schema.yaml", "train.parquet", "valid.parquet", "test.parquet"):
        (root / data_at / f).write_text("x")
    return root


def test_cli_submit_refuses_data_that_the_upload_leaves_out(tmp_path):
    # configs/sim-dcnv2.yaml reads data/sim, which exists here but is never uploaded
    root = _working_dir(tmp_path / "wd", "data/sim")
    done = subprocess.run(
        [str(RECRAY), "submit", "train", "configs/sim-dcnv2.yaml", "--address", "http://127.0.0.1:9"],
        cwd=root, capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 2, done.stderr[-2000:]
    assert "error: data.path: 'data/sim' on the cluster:" in done.stderr
    assert "left out of the job's upload" in done.stderr and "s3://" in done.stderr


def test_config_check_reads_the_upload_not_the_local_disk(tmp_path):
    root = _working_dir(tmp_path / "wd", "sim")
    zipped = tmp_path / "pkg.zip"
    uploaded = set(package(root, zipped))
    check_config("configs/sim-dcnv2.yaml", root, uploaded, {"data.path": "sim"})
    check_config("configs/sim-dcnv2.yaml", root, uploaded, {"data.path": "./sim/"})
    # a URI or a path on the nodes is read there as given
    check_config("configs/sim-dcnv2.yaml", root, uploaded, {"data.path": "s3://bucket/sim"})
    check_config("configs/sim-dcnv2.yaml", root, uploaded, {"data.path": "/mnt/shared/sim"})
    check_config("configs/sim-dcnv2.yaml", root, uploaded, {"data.path": "~/sim"})
    with pytest.raises(ConfigError, match=r"data.path: 'nowhere' .*schema.yaml, train.parquet, "
                                          r"valid.parquet, test.parquet not found"):
        check_config("configs/sim-dcnv2.yaml", root, uploaded, {"data.path": "nowhere"})
    with pytest.raises(ConfigError, match=r"data.path: '../wd/sim'"):
        check_config("configs/sim-dcnv2.yaml", root, uploaded, {"data.path": "../wd/sim"})
    (root / ".gitignore").write_text("*.parquet\n")  # a user's own ignore file counts too
    uploaded = set(package(root, tmp_path / "pkg2.zip"))
    with pytest.raises(ConfigError, match=r"train.parquet, valid.parquet, test.parquet are here"):
        check_config("configs/sim-dcnv2.yaml", root, uploaded, {"data.path": "sim"})
    with pytest.raises(ConfigError, match=r"config: configs/other.yaml is not in the job's upload"):
        check_config("configs/other.yaml", root, uploaded)


def test_schema_of_a_data_uri_is_read_through_pyarrow(tmp_path):
    from recray.data.schema import Feature, Schema, SchemaError

    schema = Schema(features=[Feature(name="item", kind="sparse", vocab_size=7)])
    schema.save(tmp_path / "schema.yaml")
    assert Schema.load(f"file://{tmp_path}") == schema
    assert Schema.load(f"file://{tmp_path / 'schema.yaml'}") == schema
    with pytest.raises(SchemaError, match="schema file not readable: file://"):
        Schema.load(f"file://{tmp_path / 'nowhere'}")


@pytest.mark.ray
def test_recray_cli_submits_a_training_job_that_succeeds_reading_its_data_by_uri(head_node, job_dir):
    # through the console script, as the README calls it (one job: each costs ~1 min here)
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    done = subprocess.run(
        [str(RECRAY), "submit", "train", "good.yaml", "--address", head_node,
         "--set", f"data.path=file://{job_dir / 'sim'}"],
        cwd=job_dir, env=env, capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    assert '"test_auc"' in done.stdout and "SUCCEEDED" in done.stdout
    assert f"data.path=\"file://{job_dir / 'sim'}\"" in done.stdout  # the job got the override


@pytest.mark.ray
def test_job_with_bad_config_fails_naming_the_field(head_node, job_dir, monkeypatch):
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    logs = io.StringIO()
    _, status = submit("train", "bad.yaml", head_node, working_dir=job_dir, stream=logs,
                       timeout_s=120)
    assert status == "FAILED"
    assert "model.name: unknown model 'no-such-model'" in logs.getvalue()


@pytest.mark.ray
def test_submitted_serve_job_leaves_an_app_that_answers_after_the_job_ends(head_node, job_dir):
    import pyarrow.parquet as pq
    import requests
    import torch

    from recray import models
    from recray.data.jagged import to_batch
    from recray.data.schema import Schema
    from recray.platform.config import TrainConfig
    from recray.platform.run_folder import write_run_folder

    schema = Schema.load(job_dir / "sim")
    torch.manual_seed(0)
    model = models.build("dnn", schema).eval()
    cfg = TrainConfig.model_validate({"data": {"path": "sim"}, "model": {"name": "dnn"}})
    run_dir = job_dir.parent / "served-run"  # outside the upload: read on the node by its path
    write_run_folder(run_dir, cfg, schema, model.state_dict(), {})
    (port,) = _free_ports(1)
    (job_dir / "serve.yaml").write_text(yaml.safe_dump({
        "port": port, "num_replicas": 1, "cpus_per_replica": 0.5,
        "variants": [{"name": "default", "run_dir": str(run_dir)}]}))
    logs = io.StringIO()
    _, status = submit("serve", "serve.yaml", head_node, working_dir=job_dir, stream=logs,
                       timeout_s=240)
    assert status == "SUCCEEDED", logs.getvalue()[-3000:]
    assert f"127.0.0.1:{port}/v1/rank" in logs.getvalue()
    url = f"http://127.0.0.1:{port}"
    assert requests.get(f"{url}/healthz", timeout=30).json() == {"status": "ok"}
    rows = pq.read_table(job_dir / "sim" / "test.parquet").slice(0, 4)
    first = rows.to_pylist()[0]
    user_side = ("user_id", "user_segment", "history")
    body = {"user": {k: first[k] for k in user_side},
            "candidates": [{k: v for k, v in r.items() if k in ("item_id", "item_tags",
                                                                  "position")}
                           for r in rows.to_pylist()]}
    for name in user_side:  # offline: the same rows, each with the first row's user
        rows = rows.set_column(rows.schema.get_field_index(name), name,
                               rows.column(name).take([0] * 4))
    answer = requests.post(f"{url}/v1/rank", json=body, timeout=30)
    assert answer.status_code == 200, answer.text
    with torch.inference_mode():
        expected = torch.sigmoid(model(to_batch(rows, schema)))[:, 0]
    torch.testing.assert_close(torch.tensor(answer.json()["scores"]["label"]), expected,
                               rtol=0, atol=1e-6)

