"""Training on Ray Train: configs fail fast naming the field; real local-mode and 2-worker runs."""

from __future__ import annotations

import subprocess
import sys
import time

import pyarrow.parquet as pq
import pytest
import yaml

from recray.data.simulate import WorldConfig, simulate
from recray.platform.config import ConfigError, TrainConfig, load_train_config
from recray.platform.train import fit, validate

SMALL_WORLD = WorldConfig(num_users=300, num_items=200, num_impressions=6000, seed=3)


@pytest.fixture(scope="module")
def sim_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("sim")
    simulate(out, SMALL_WORLD)
    return out


def _config(sim_dir, tmp_path, **changes) -> dict:
    cfg = {
        "name": "t",
        "data": {"path": str(sim_dir)},
        "model": {"name": "dcnv2"},
        "train": {"epochs": 1, "batch_size": 256, "lr": 0.01},
        "scaling": {"num_workers": 0},
        "storage_path": str(tmp_path / "runs"),
    }
    for dotted, value in changes.items():
        node = cfg
        *parents, leaf = dotted.split("__")
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = value
    return cfg


def _write(tmp_path, cfg: dict):
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.mark.parametrize(
    "changes,pattern",
    [
        ({"model__name": "transformer9"}, r"model\.name: unknown model 'transformer9'; available: \["),
        ({"model__hparams": {"no_such_knob": 3}}, r"model\.hparams: .*no_such_knob"),
        ({"train__epochs": 0}, r"train\.epochs: .*greater than 0 \(got 0\)"),
        ({"train__optimizer": "lbfgs"}, r"train\.optimizer: .*got 'lbfgs'"),
        ({"scaling__num_workers": -1}, r"scaling\.num_workers: .*got -1"),
        ({"trian": {"epochs": 1}}, r"trian: Extra inputs are not permitted"),
        ({"data__path": "/nonexistent/dir"}, r"data\.path: directory not found"),
    ],
)
def test_bad_config_fails_fast_naming_the_field(sim_dir, tmp_path, changes, pattern):
    path = _write(tmp_path, _config(sim_dir, tmp_path, **changes))
    started = time.perf_counter()
    with pytest.raises(ConfigError, match=pattern):
        validate(load_train_config(path))
    assert time.perf_counter() - started < 1.0


def test_data_with_missing_column_or_corrupt_file_is_named(sim_dir, tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    for split in ("train", "valid", "test"):
        table = pq.read_table(sim_dir / f"{split}.parquet")
        pq.write_table(table.drop_columns(["history"]) if split == "valid" else table,
                       broken / f"{split}.parquet")
    (broken / "schema.yaml").write_text((sim_dir / "schema.yaml").read_text())
    cfg = TrainConfig.model_validate(_config(broken, tmp_path, data__path=str(broken)))
    with pytest.raises(ConfigError, match=r"valid\.parquet: missing column 'history'"):
        validate(cfg)
    (broken / "test.parquet").write_bytes(b"not parquet at all")
    (broken / "valid.parquet").write_bytes((sim_dir / "valid.parquet").read_bytes())
    cfg = TrainConfig.model_validate(_config(broken, tmp_path, data__path=str(broken)))
    with pytest.raises(ConfigError, match=r"test\.parquet is not a readable Parquet file"):
        validate(cfg)


def test_cli_bad_config_exits_2_with_field_named(sim_dir, tmp_path):
    path = _write(tmp_path, _config(sim_dir, tmp_path, train__batch_size="big"))
    proc = subprocess.run([sys.executable, "-m", "recray.jobs.train", "--config", str(path)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "train.batch_size" in proc.stderr and "'big'" in proc.stderr


def test_overrides_reach_nested_fields(sim_dir, tmp_path):
    path = _write(tmp_path, _config(sim_dir, tmp_path))
    cfg = load_train_config(path, {"train.epochs": 4, "model.hparams.dropout": 0.1})
    assert cfg.train.epochs == 4 and cfg.model.hparams == {"dropout": 0.1}


@pytest.mark.ray
def test_local_mode_run_learns_and_checkpoints(sim_dir, tmp_path, ray_local):
    cfg = TrainConfig.model_validate(_config(sim_dir, tmp_path, model__name="din", train__epochs=2))
    result = fit(cfg)
    metrics = result["metrics"]
    assert metrics["epoch"] == 1
    assert 0.6 < metrics["test_auc"] <= 1.0, metrics
    assert metrics["valid_logloss"] < 0.69, metrics
    assert (tmp_path / "runs").exists() and result["checkpoint"]


@pytest.mark.ray
def test_two_worker_ddp_run_over_gloo(sim_dir, tmp_path, ray_local):
    cfg = TrainConfig.model_validate(
        _config(sim_dir, tmp_path, scaling__num_workers=2, scaling__cpus_per_worker=0.5)
    )
    metrics = fit(cfg)["metrics"]
    assert metrics["test_auc"] > 0.55, metrics
    assert metrics["train_rows_per_s"] > 0


def test_fault_injection_needs_a_worker_process(sim_dir, tmp_path):
    with pytest.raises(Exception, match="fault_injection: needs scaling.num_workers >= 1"):
        TrainConfig.model_validate(_config(sim_dir, tmp_path, fault_injection={"epoch": 0, "step": 1}))


@pytest.mark.ray
def test_killed_worker_resumes_from_checkpoint_with_the_same_auc(sim_dir, tmp_path, ray_local):
    """A sharded worker process exits mid-epoch 2; Ray restarts both from the epoch-1 checkpoint.

    Checkpoint interval = 1 epoch (DCP, every rank writes its shards), so at most the steps of
    the interrupted epoch are redone and none are skipped: the final model equals the
    uninterrupted one's. `global_batches` fixes the data order across restarts.
    """
    base = _config(sim_dir, tmp_path, train__epochs=2, train__global_batches=True,
                   scaling__num_workers=2, scaling__cpus_per_worker=0.5, max_failures=1)
    base["sharding"] = {"enabled": True, "default_type": "table_wise"}
    clean = fit(TrainConfig.model_validate({**base, "name": "clean"}))["metrics"]
    failed = fit(TrainConfig.model_validate(
        {**base, "name": "faulty", "fault_injection": {"epoch": 1, "step": 3, "rank": 1}}))["metrics"]
    assert (tmp_path / "runs" / "faulty" / "fault_injected").exists()
    assert failed["resumed_from_epoch"] == 0 and clean["resumed_from_epoch"] == -1
    assert abs(failed["test_auc"] - clean["test_auc"]) < 0.001, (clean, failed)
