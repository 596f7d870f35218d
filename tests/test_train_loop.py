"""The epoch loop: early stopping keeps the best epoch, LR schedules, clipping, weight decay per group."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from sklearn.metrics import roc_auc_score

from recray import models
from recray.data.jagged import to_batch
from recray.data.schema import Schema
from recray.platform.config import ConfigError, EarlyStopping, LRSchedule, TrainConfig
from recray.platform.train import (
    dense_parameters,
    fit,
    lr_scheduler,
    parameter_groups,
    steps_per_epoch,
    validate,
)

LR = 0.01


def _config(sim_dir, tmp_path, **train) -> TrainConfig:
    return TrainConfig.model_validate({
        "name": "loop", "data": {"path": str(sim_dir)}, "model": {"name": "dcnv2"},
        "train": {"epochs": 2, "batch_size": 256, "lr": LR} | train,
        "scaling": {"num_workers": 0}, "storage_path": str(tmp_path / "runs"),
    })


def _trajectory(schedule: LRSchedule, epochs: int, steps: int) -> list[float]:
    weight = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([weight], lr=LR)
    scheduler = lr_scheduler(optimizer, schedule, LR, epochs, steps)
    seen = []
    for _ in range(epochs * steps):
        seen.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return seen


def test_warmup_then_cosine_follows_the_closed_form():
    epochs, steps, factor, floor = 5, 8, 0.1, 0.05
    seen = _trajectory(LRSchedule(warmup_epochs=1, warmup_start_factor=factor, decay="cosine",
                                  min_lr_factor=floor), epochs, steps)
    warmup, span = steps, (epochs - 1) * steps
    expected = [LR * (factor + (1 - factor) * t / warmup) if t < warmup else
                LR * floor + (LR - LR * floor) * (1 + math.cos(math.pi * (t - warmup) / span)) / 2
                for t in range(epochs * steps)]
    np.testing.assert_allclose(seen, expected, rtol=1e-6)


def test_warmup_then_step_decay_follows_the_closed_form():
    seen = _trajectory(LRSchedule(warmup_epochs=0.5, decay="step", step_epochs=1, gamma=0.5), 4, 10)
    expected = [LR * (0.1 + 0.9 * t / 5) if t < 5 else LR * 0.5 ** ((t - 5) // 10)
                for t in range(40)]
    np.testing.assert_allclose(seen, expected, rtol=1e-6)


def test_no_schedule_means_no_scheduler_and_constant_keeps_the_lr():
    weight = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([weight], lr=LR)
    assert lr_scheduler(optimizer, None, LR, 3, 5) is None
    assert set(_trajectory(LRSchedule(), 3, 5)) == {LR}


def test_scheduler_state_in_json_continues_the_trajectory():
    schedule, epochs, steps = LRSchedule(warmup_epochs=1, decay="cosine"), 4, 6
    uninterrupted = _trajectory(schedule, epochs, steps)
    weight = torch.nn.Parameter(torch.zeros(1))
    first = torch.optim.SGD([weight], lr=LR)
    scheduler = lr_scheduler(first, schedule, LR, epochs, steps)
    for _ in range(2 * steps):
        first.step()
        scheduler.step()
    saved = json.loads(json.dumps(scheduler.state_dict()))  # what epoch.json holds
    second = torch.optim.SGD([weight], lr=LR)
    resumed = lr_scheduler(second, schedule, LR, epochs, steps)
    resumed.load_state_dict(saved)
    second.param_groups[0]["lr"] = resumed.get_last_lr()[0]
    tail = []
    for _ in range(2 * steps):
        tail.append(second.param_groups[0]["lr"])
        second.step()
        resumed.step()
    np.testing.assert_allclose(tail, uninterrupted[2 * steps:], rtol=1e-6)


def test_improvement_respects_the_direction_and_min_delta():
    auc = EarlyStopping(metric="auc", min_delta=0.01)
    assert auc.improved(0.7, None) and auc.improved(0.72, 0.7)
    assert not auc.improved(0.705, 0.7) and not auc.improved(float("nan"), 0.7)
    loss = EarlyStopping(metric="logloss")
    assert loss.improved(0.3, 0.4) and not loss.improved(0.5, 0.4)
    assert EarlyStopping(label="click").key(["click", "like"]) == "valid_auc_click"
    assert EarlyStopping(label="click").key(["label"]) == "valid_auc"


def test_tables_get_their_own_weight_decay(sim_dir, tmp_path):
    cfg = _config(sim_dir, tmp_path, weight_decay=0.0, embedding_weight_decay=1.0)
    schema = Schema.load(sim_dir / "schema.yaml")
    model = models.build("dcnv2", schema)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    optimizer = torch.optim.SGD(parameter_groups(model, cfg), lr=0.1, weight_decay=0.0)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    optimizer.step()  # a zero gradient: only weight decay moves a weight (p -= lr * decay * p)
    for name, p in model.named_parameters():
        table = "embedding" in name
        np.testing.assert_allclose(p.detach(), before[name] * (0.9 if table else 1.0), rtol=1e-6,
                                   err_msg=name)
    assert any("embedding" in n for n, _ in model.named_parameters())


def test_clipping_bounds_the_dense_gradient_and_leaves_tables_alone():
    schema = Schema.model_validate({"features": [
        {"name": "a", "kind": "sparse", "vocab_size": 10, "embedding_dim": 4},
        {"name": "x", "kind": "dense"}]})
    model = models.build("dcnv2", schema)
    for p in model.parameters():
        p.grad = torch.full_like(p, 3.0)
    clipped = dense_parameters(model, sharded=False)
    tables = [p for n, p in model.named_parameters() if "embedding" in n]
    assert tables and not {id(p) for p in tables} & {id(p) for p in clipped}
    torch.nn.utils.clip_grad_norm_(clipped, 1.0)
    norm = np.sqrt(sum(float((p.grad.double() ** 2).sum()) for p in clipped))
    assert norm == pytest.approx(1.0, rel=1e-5)
    assert all(bool((p.grad == 3.0).all()) for p in tables)


def test_unknown_early_stopping_label_and_sharded_table_decay_are_refused(sim_dir, tmp_path):
    with pytest.raises(ConfigError, match=r"train\.early_stopping\.label: 'likes' is not a task"):
        validate(_config(sim_dir, tmp_path, early_stopping={"label": "likes"}))
    with pytest.raises(ValueError, match=r"train\.embedding_weight_decay: 0\.1 is not supported"):
        TrainConfig.model_validate({"data": {"path": "x"}, "model": {"name": "dcnv2"},
                                    "train": {"embedding_weight_decay": 0.1},
                                    "sharding": {"enabled": True}})


def _test_auc_of(weights: dict[str, torch.Tensor], sim_dir) -> float:
    """Score test.parquet with these weights, outside Ray and the train loop."""
    schema = Schema.load(sim_dir / "schema.yaml")
    model = models.build("dcnv2", schema)
    model.load_state_dict(weights)
    model.eval()
    batch = to_batch(pq.read_table(sim_dir / "test.parquet"), schema)
    with torch.no_grad():
        scores = torch.sigmoid(model(batch))[:, 0].numpy()
    return float(roc_auc_score(batch.labels[:, 0].numpy(), scores))


@pytest.mark.ray
def test_best_epoch_survives_a_resume_and_gives_the_test_metrics_and_run_folder(
    sim_dir, tmp_path, ray_local
):
    # min_delta 0.5 makes epoch 0 the best for good: no AUC gains 0.5, so later epochs never count.
    stopping = {"patience": 5, "min_delta": 0.5}
    schedule = {"warmup_epochs": 1, "decay": "step", "step_epochs": 1, "gamma": 0.5}
    first = fit(_config(sim_dir, tmp_path, epochs=2, early_stopping=stopping, schedule=schedule))
    run = first["run_dir"]
    assert first["metrics"]["best_epoch"] == 0 and not first["metrics"]["stopped_early"]
    # the run continues with less patience: epoch 2 is the second without gain, so it stops there
    cfg = _config(sim_dir, tmp_path, epochs=6, early_stopping=stopping | {"patience": 2},
                  schedule=schedule)
    cfg.resume = run
    metrics = fit(cfg)["metrics"]
    assert (metrics["best_epoch"], metrics["epochs_run"], metrics["stopped_early"]) == (0, 3, True)

    run = Path(run)
    best = torch.load(run / "checkpoint_epoch_0000" / "state.pt", weights_only=True)["model"]
    last = torch.load(run / "checkpoint_epoch_0002" / "state.pt", weights_only=True)["model"]
    assert metrics["test_auc"] == pytest.approx(_test_auc_of(best, sim_dir), abs=1e-6)
    assert metrics["test_auc"] != pytest.approx(_test_auc_of(last, sim_dir), abs=1e-6)
    served = torch.load(run / "model" / "weights.pt", weights_only=True)
    assert all(torch.equal(served[k], best[k]) for k in best)
    assert json.loads((run / "metrics.json").read_text())["best_epoch"] == 0
    # the scheduler resumed mid-trajectory: epoch 2 runs at lr x 0.5 (warmup was epoch 0)
    steps = steps_per_epoch(cfg)
    assert metrics["train_lr_curve"] == pytest.approx([LR * 0.5] * steps)
    with pytest.raises(ConfigError, match="stopped early at epoch 2"):
        fit(cfg)


@pytest.mark.ray
def test_two_sharded_workers_stop_early_and_serve_the_best_epoch(sim_dir, tmp_path, ray_local):
    from recray.platform.run_folder import _load_dcp, load_run_folder
    from recray.platform.train import latest_checkpoint

    cfg = _config(sim_dir, tmp_path, early_stopping={"patience": 1, "min_delta": 0.5},
                  grad_clip_norm=1.0, schedule={"warmup_epochs": 0.5, "decay": "cosine"})
    cfg.scaling.num_workers, cfg.scaling.cpus_per_worker = 2, 0.5
    cfg.sharding.enabled, cfg.sharding.default_type = True, "column_wise"
    result = fit(cfg)
    metrics = result["metrics"]
    assert (metrics["best_epoch"], metrics["epochs_run"], metrics["stopped_early"]) == (0, 2, True)
    served = load_run_folder(result["run_dir"]).model
    assert metrics["test_auc"] == pytest.approx(_test_auc_of(served.state_dict(), sim_dir), abs=1e-6)
    _, last_checkpoint = latest_checkpoint(Path(result["run_dir"]))
    last = models.build("dcnv2", Schema.load(sim_dir / "schema.yaml"))
    _load_dcp(last, last_checkpoint / "dcp")
    assert metrics["test_auc"] != pytest.approx(_test_auc_of(last.state_dict(), sim_dir), abs=1e-6)


def test_a_single_named_task_gets_the_overall_metrics_early_stopping_watches():
    from sklearn.metrics import roc_auc_score

    from recray.platform.config import EarlyStopping
    from recray.platform.train import task_metrics

    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, (200, 1)).astype(float)
    probs = np.clip(labels * 0.3 + rng.random((200, 1)) * 0.7, 0, 1)
    out = task_metrics("valid", ["click"], labels, probs)  # a schema whose one label is label_click
    assert out["valid_auc"] == out["valid_auc_click"] == roc_auc_score(labels[:, 0], probs[:, 0])
    assert EarlyStopping(metric="auc").key(["click"]) in out
