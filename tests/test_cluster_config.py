"""cluster.yaml passes Ray's own autoscaler validation and keeps the safety settings it promises."""

from __future__ import annotations

import copy
import shutil
import subprocess
from pathlib import Path

import jsonschema
import pytest
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

CLUSTER_YAML = Path(__file__).resolve().parents[1] / "cluster.yaml"


@pytest.fixture(scope="module")
def cluster() -> dict:
    return yaml.safe_load(CLUSTER_YAML.read_text())


def test_ray_validates_the_cluster_config(cluster):
    full = prepare_config(copy.deepcopy(cluster))
    validate_config(full)
    assert set(full["available_node_types"]) == {"head.cpu", "worker.gpu", "worker.cpu"}


def test_gpu_workers_autoscale_from_zero_and_head_runs_no_work(cluster):
    types = cluster["available_node_types"]
    assert types["worker.gpu"]["min_workers"] == 0 and types["worker.gpu"]["max_workers"] >= 1
    assert types["worker.gpu"]["node_config"]["InstanceType"].startswith(("g", "p"))
    assert types["head.cpu"]["resources"] == {"CPU": 0}


def test_dashboard_on_localhost_and_auth_not_disabled(cluster):
    text = CLUSTER_YAML.read_text()
    assert "--dashboard-host=127.0.0.1" in " ".join(cluster["head_start_ray_commands"])
    assert "0.0.0.0" not in text and "RAY_AUTH_MODE=disabled" not in text


def test_setup_installs_recray_with_pinned_torch(cluster):
    setup = " ".join(cluster["setup_commands"])
    assert "torch==2.13.0" in setup and "-e ." in setup and "--no-deps torchrec==1.8.0" in setup


def test_validation_catches_a_broken_config(cluster):
    broken = prepare_config(copy.deepcopy(cluster))
    broken["available_node_types"]["worker.gpu"]["min_workers"] = "zero"
    with pytest.raises(jsonschema.ValidationError):
        validate_config(broken)


@pytest.mark.skipif(shutil.which("rsync") is None, reason="needs the rsync binary that `ray up` uses")
def test_rsync_to_the_head_keeps_recray_data_and_leaves_out_top_level_data(cluster, tmp_path):
    # the arguments Ray's own command runner gives rsync, on a directory as `ray up` syncs it
    from ray.autoscaler._private.command_runner import SSHCommandRunner

    source, target = tmp_path / "repo", tmp_path / "head"
    files = ["recray/data/schema.py", "recray/runs.py", "configs/data/x.yaml",
             "data/sim/train.parquet", "runs/old/metrics.json", ".venv/bin/python"]
    for f in files:
        (source / f).parent.mkdir(parents=True, exist_ok=True)
        (source / f).write_text("x")
    args = SSHCommandRunner._create_rsync_filter_args(None, cluster)
    subprocess.run(["rsync", "-a", *args, f"{source}/", f"{target}/"], check=True)
    copied = {p.relative_to(target).as_posix() for p in target.rglob("*") if p.is_file()}
    assert copied == {"recray/data/schema.py", "recray/runs.py", "configs/data/x.yaml"}
