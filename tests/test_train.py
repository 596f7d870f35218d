"""Training on Ray Train: configs fail fast naming the field; real local-mode and 2-worker runs."""

from __future__ import annotations

import json
import math
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import torch
import yaml
from scipy.stats import spearmanr

from recray.platform.config import ConfigError, TrainConfig, load_train_config
from recray.platform.train import (
    TrainingDiverged,
    derived_seed,
    epoch_batches,
    fit,
    latest_checkpoint,
    split_datasets,
    validate,
)

REPO = Path(__file__).resolve().parents[1]
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


def test_storage_path_resolves_against_the_working_directory(sim_dir, tmp_path, monkeypatch):
    """Ray Train refuses a relative storage path ("URI has empty scheme"): the default included."""
    monkeypatch.chdir(tmp_path)
    cfg = _config(sim_dir, tmp_path)
    del cfg["storage_path"]
    assert TrainConfig.model_validate(cfg).storage_path == str(tmp_path / "runs")
    cfg["storage_path"] = "out/../elsewhere"
    assert TrainConfig.model_validate(cfg).storage_path == str(tmp_path / "elsewhere")
    cfg |= {"storage_path": "s3://bucket/runs", "scaling": {"num_workers": 1}}
    assert TrainConfig.model_validate(cfg).storage_path == "s3://bucket/runs"
    cfg["scaling"] = {"num_workers": 0}
    with pytest.raises(ValueError, match=r"storage_path: 's3://bucket/runs' is a URI, which needs "
                                         r"scaling\.num_workers >= 1"):
        TrainConfig.model_validate(cfg)


def test_seed_streams_of_ranks_and_epochs_never_collide():
    seeds = [derived_seed(0, stream, rank, epoch)
             for stream in range(3) for rank in range(8) for epoch in range(8)]
    assert len(set(seeds)) == len(seeds)  # seed + rank + epoch gave 15 distinct values of 64
    assert derived_seed(0, 0, 1, 0) != derived_seed(0, 0, 0, 1)
    assert derived_seed(0, 0, 1, 0) != derived_seed(1, 0, 0, 0)


@pytest.fixture(scope="module")
def ordered_dir(tmp_path_factory):
    """A train split whose rows are numbered in file order (as a time-ordered log is)."""
    out = tmp_path_factory.mktemp("ordered")
    rows = 5000
    for split in ("train", "valid", "test"):
        pq.write_table(pa.table({"row": np.arange(rows)}), out / f"{split}.parquet")
    return out, rows


@pytest.mark.ray
def test_epochs_are_shuffled_seeded_and_differ(ordered_dir, tmp_path, ray_local):
    """Default config: each epoch is a permutation of the train rows, far from file order,
    different from the other epochs, the same for the same seed; with global_batches the two
    ranks slice the same global batches, in the order one worker sees."""
    folder, rows = ordered_dir
    world = 2
    cfg = TrainConfig.model_validate({
        "data": {"path": str(folder)}, "model": {"name": "lr"},
        "train": {"batch_size": 100, "global_batches": True},
        "storage_path": str(tmp_path),
    })
    # Materialised once: the epochs differ by the seeded buffer, not by re-reading the file.
    train = split_datasets(cfg)["train"].materialize()

    def order(epoch: int, seed: int = 0) -> np.ndarray:
        seeded = cfg.model_copy(update={"seed": seed})
        per_rank = [[t.column("row").to_numpy() for t in epoch_batches(train, seeded, r, world, epoch)]
                    for r in range(world)]
        # Interleave the ranks' slices step by step: the global batch sequence.
        return np.concatenate([part for step in zip(*per_rank, strict=True) for part in step])

    first, second = order(0), order(1)
    np.testing.assert_array_equal(np.sort(first), np.arange(rows))  # 5000 = 25 global batches
    assert abs(spearmanr(first, np.arange(rows)).statistic) < 0.1
    assert not np.array_equal(first, second)
    np.testing.assert_array_equal(first, order(0))
    assert not np.array_equal(first, order(0, seed=1))
    one_worker = cfg.model_copy(update={"train": cfg.train.model_copy(
        update={"batch_size": cfg.train.batch_size * world})})
    np.testing.assert_array_equal(first, np.concatenate(
        [t.column("row").to_numpy() for t in epoch_batches(train, one_worker, 0, 1, 0)]))
    unshuffled = cfg.model_copy(update={"train": cfg.train.model_copy(update={"shuffle": False})})
    in_file_order = np.concatenate([t.column("row").to_numpy()
                                    for t in epoch_batches(train, unshuffled, 0, 1, 0)])
    np.testing.assert_array_equal(in_file_order, np.arange(rows))


def _mean_over_ranks_worker(rank: int, init_file: str, losses: list, out: str) -> None:
    import torch.distributed as dist

    from recray.platform.train import _mean_over_ranks

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    curve = _mean_over_ranks([torch.tensor(v) for v in losses[rank]])
    if rank == 0:
        Path(out).write_text(json.dumps([repr(v) for v in curve]))
    dist.destroy_process_group()


def test_nan_loss_on_every_rank_shows_in_the_curve(tmp_path):
    """Two real gloo processes: NaN and inf losses stay NaN and inf; uneven step counts average
    over the ranks that ran the step."""
    losses = [[1.0, float("nan"), 3.0, float("inf")], [2.0, float("nan"), 5.0]]
    out = tmp_path / "curve.json"
    # fork: the children inherit the imports instead of paying them again
    torch.multiprocessing.start_processes(_mean_over_ranks_worker, nprocs=2, start_method="fork",
                                          args=(str(tmp_path / "init"), losses, str(out)))
    curve = [float(v) for v in json.loads(out.read_text())]
    assert curve[0] == 1.5 and math.isnan(curve[1]) and curve[2] == 4.0 and curve[3] == math.inf


def test_resume_refuses_a_missing_or_finished_run(sim_dir, tmp_path):
    run = tmp_path / "runs" / "t-20260101-000000"
    (run / "checkpoint_epoch_0001").mkdir(parents=True)
    (run / "checkpoint_epoch_0001" / "epoch.json").write_text('{"epoch": 1}')
    (run / "checkpoint_epoch_0000").mkdir()
    (run / "checkpoint_epoch_0000" / "epoch.json").write_text('{"epoch": 0}')
    assert latest_checkpoint(run) == (1, run / "checkpoint_epoch_0001")
    missing = TrainConfig.model_validate(_config(sim_dir, tmp_path, resume="t-20250101-000000"))
    with pytest.raises(ConfigError, match=r"resume: no run folder .*t-20250101-000000.*"
                                          r"runs of 't' there: \['t-20260101-000000'\]"):
        fit(missing)
    done = TrainConfig.model_validate(_config(sim_dir, tmp_path, resume=run.name, train__epochs=2))
    with pytest.raises(ConfigError, match=r"resume: run 't-20260101-000000' already closed epoch 1 "
                                          r"of train\.epochs=2; raise train\.epochs"):
        fit(done)


def _optimizer_lr(checkpoint: str | Path) -> float:
    state = torch.load(Path(checkpoint) / "state.pt", weights_only=True)
    return state["optimizer"]["param_groups"][0]["lr"]


@pytest.mark.ray
def test_local_mode_run_learns_checkpoints_and_resumes_only_when_asked(sim_dir, tmp_path, ray_local):
    cfg = _config(sim_dir, tmp_path, model__name="din", train__epochs=2)
    result = fit(TrainConfig.model_validate(cfg))
    metrics = result["metrics"]
    assert metrics["epoch"] == 1
    assert 0.6 < metrics["test_auc"] <= 1.0, metrics
    assert metrics["valid_logloss"] < 0.69, metrics
    assert Path(result["run_dir"]).parent == tmp_path / "runs" and result["checkpoint"]
    # Asked to resume with more epochs and another lr: one more epoch, at the new lr.
    resumed = fit(TrainConfig.model_validate(
        cfg | {"resume": result["run_dir"], "train": cfg["train"] | {"epochs": 3, "lr": 0.002}}))
    assert resumed["run_dir"] == result["run_dir"]
    assert (resumed["metrics"]["resumed_from_epoch"], resumed["metrics"]["epoch"]) == (1, 2)
    assert _optimizer_lr(resumed["checkpoint"]) == 0.002 and _optimizer_lr(result["checkpoint"]) == 0.01
    # The same config again, not asked to resume: a new run folder, trained from scratch (a
    # resumed run would find nothing left to train and hand back the first run's metrics).
    again = fit(TrainConfig.model_validate(cfg | {"train": cfg["train"] | {"epochs": 1}}))
    assert again["run_dir"] != result["run_dir"]
    assert (again["metrics"]["epoch"], again["metrics"]["resumed_from_epoch"]) == (0, -1)


@pytest.mark.ray
def test_nan_in_the_data_stops_the_run_naming_epoch_and_step(sim_dir, tmp_path, ray_local):
    bad = tmp_path / "bad"
    bad.mkdir()
    for split in ("train", "valid", "test"):
        shutil.copy(sim_dir / f"{split}.parquet", bad / f"{split}.parquet")
    shutil.copy(sim_dir / "schema.yaml", bad / "schema.yaml")
    table = pq.read_table(sim_dir / "train.parquet")
    position = pc.if_else(pa.array(np.arange(table.num_rows) % 7 == 0),
                          pa.scalar(float("nan"), table.schema.field("position").type),
                          table.column("position"))
    pq.write_table(table.set_column(table.schema.get_field_index("position"), "position", position),
                   bad / "train.parquet")
    cfg = TrainConfig.model_validate(_config(bad, tmp_path, data__path=str(bad)))
    with pytest.raises(TrainingDiverged, match=r"the train loss is nan at epoch 0 step 0; stopped "
                                               r"\(train\.stop_on_nonfinite_loss\)\. Lower train\.lr"):
        fit(cfg)


@pytest.mark.ray
def test_readme_training_commands_run_as_written(tmp_path):
    """The README's `recray data simulate` and `recray train` lines, run as written in a copy of
    the repo's configs/ (2 cores)."""
    verbs = (REPO / "README.md").read_text().split("## Verbs", 1)[1]
    lines = [line.split("#")[0].strip() for line in verbs.splitlines()]
    simulate_line = next(line for line in lines if line.startswith("recray data simulate"))
    train_line = next(line for line in lines if line.startswith("recray train configs/sim-dcnv2"))
    shutil.copytree(REPO / "configs", tmp_path / "configs")
    recray = str(Path(sys.executable).with_name("recray"))

    def run(line: str) -> str:
        proc = subprocess.run([recray, *shlex.split(line)[1:]], cwd=tmp_path, capture_output=True,
                              text=True, timeout=600)
        assert proc.returncode == 0, (line, proc.stdout[-3000:], proc.stderr[-3000:])
        return proc.stdout

    run(simulate_line)
    first = _last_json(run(train_line))
    epochs = int(train_line.split("train.epochs=")[1].split()[0])
    assert Path(first["run_dir"]).parent == tmp_path / "runs"
    assert (first["metrics"]["epoch"], first["metrics"]["resumed_from_epoch"]) == (epochs - 1, -1)
    assert first["metrics"]["test_auc"] > 0.55
    # That the same command again trains afresh in a new folder is checked in local mode
    # (test_local_mode_run_learns_checkpoints_and_resumes_only_when_asked): a second process
    # here would cost another Ray start and worker group.


def _last_json(stdout: str) -> dict:
    """The result `recray train` prints last, a JSON object starting on its own line."""
    start = stdout.rindex("\n{") + 1 if "\n{" in stdout else stdout.index("{")
    return json.loads(stdout[start:])


@pytest.mark.ray
def test_two_worker_ddp_run_scores_every_row_once_and_resumes_with_the_new_lr(
        sim_dir, tmp_path, ray_local):
    """2 workers, 601 valid/test rows: every row is scored exactly once. Resumed with another lr
    and more epochs (the issue's case), the run continues from its checkpoint at the new lr."""
    cfg = _config(sim_dir, tmp_path, scaling__num_workers=2, scaling__cpus_per_worker=0.5)
    result = fit(TrainConfig.model_validate(cfg))
    metrics = result["metrics"]
    assert metrics["test_auc"] > 0.55, metrics
    assert metrics["train_rows_per_s"] > 0
    for split in ("valid", "test"):
        assert metrics[f"{split}_rows"] == pq.ParquetFile(sim_dir / f"{split}.parquet").metadata.num_rows
    resumed = fit(TrainConfig.model_validate(
        cfg | {"resume": result["run_dir"], "train": cfg["train"] | {"epochs": 2, "lr": 0.5}}))
    assert (resumed["metrics"]["resumed_from_epoch"], resumed["metrics"]["epoch"]) == (0, 1)
    assert _optimizer_lr(resumed["checkpoint"]) == 0.5


def test_fault_injection_needs_a_worker_process(sim_dir, tmp_path):
    with pytest.raises(Exception, match="fault_injection: needs scaling.num_workers >= 1"):
        TrainConfig.model_validate(_config(sim_dir, tmp_path, fault_injection={"epoch": 0, "step": 1}))


@pytest.mark.ray
def test_killed_worker_resumes_from_checkpoint_with_the_same_losses(sim_dir, tmp_path, ray_local):
    """A sharded worker process exits mid-epoch 2; Ray restarts both from the epoch-1 checkpoint.

    Checkpoint interval = 1 epoch (DCP, every rank writes its shards), so at most the steps of
    the interrupted epoch are redone and none are skipped. The model has dropout: each epoch
    draws from its own (seed, rank, epoch) stream, so the redone epoch draws the same masks, and
    `global_batches` with the seeded shuffle fixes the data order: the redone epoch's loss curve
    equals the uninterrupted one's.
    """
    base = _config(sim_dir, tmp_path, train__epochs=2, train__global_batches=True,
                   scaling__num_workers=2, scaling__cpus_per_worker=0.5, max_failures=1,
                   model__hparams={"dropout": 0.3})
    base["sharding"] = {"enabled": True, "default_type": "table_wise"}
    clean = fit(TrainConfig.model_validate({**base, "name": "clean"}))["metrics"]
    failed_run = fit(TrainConfig.model_validate(
        {**base, "name": "faulty", "fault_injection": {"epoch": 1, "step": 3, "rank": 1}}))
    failed = failed_run["metrics"]
    assert (Path(failed_run["run_dir"]) / "fault_injected").exists()
    assert failed["resumed_from_epoch"] == 0 and clean["resumed_from_epoch"] == -1
    np.testing.assert_allclose(failed["train_loss_curve"], clean["train_loss_curve"], rtol=1e-5)
    assert abs(failed["test_auc"] - clean["test_auc"]) < 1e-4, (clean, failed)
