"""A frontier model and a multi-task head trained end to end by `recray.platform.train.fit`
(local mode) on the CreatorEcosystem log's three labels."""

from __future__ import annotations

import math

import pytest

from recray.platform.config import TrainConfig
from recray.platform.train import fit
from recray.simulators.logging_policy import LogConfig, write_creator_log


@pytest.fixture(scope="module")
def creator_log(tmp_path_factory):
    out = tmp_path_factory.mktemp("creator_log")
    write_creator_log(out, LogConfig(num_users=300, days=4, seed=1))
    return out


@pytest.mark.ray
@pytest.mark.parametrize("name", ["hyformer", "ple"])
def test_model_trains_on_the_multi_task_log(creator_log, tmp_path, ray_local, name):
    cfg = TrainConfig.model_validate({
        "name": name, "data": {"path": str(creator_log)}, "model": {"name": name},
        "train": {"epochs": 2, "batch_size": 256, "lr": 0.003},
        "scaling": {"num_workers": 0}, "storage_path": str(tmp_path / "runs"),
    })  # fmt: skip
    metrics = fit(cfg)["metrics"]
    for task in ("click", "long_view", "return"):
        assert math.isfinite(metrics[f"test_logloss_{task}"]), metrics
    print(name, {k: round(v, 4) for k, v in metrics.items() if k.startswith("test_auc")})
    assert metrics["test_auc_click"] > 0.55, metrics
