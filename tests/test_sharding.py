"""TorchRec sharding inside Ray Train: configs refused before workers start; same math as one worker."""

from __future__ import annotations

import time

import numpy as np
import pytest

from recray.data.simulate import WorldConfig, simulate
from recray.platform.config import ConfigError, TrainConfig, parse
from recray.platform.train import check_cluster_fits, fit, validate

WORLD = WorldConfig(num_users=200, num_items=100, num_impressions=4096, seed=5)


@pytest.fixture(scope="module")
def sim_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("sim")
    simulate(out, WORLD)
    return out


def _cfg(sim_dir, tmp_path, **sections) -> dict:
    cfg = {
        "name": "shard",
        "data": {"path": str(sim_dir)},
        "model": {"name": "dcnv2"},
        "train": {"epochs": 1, "batch_size": 256, "lr": 0.003},
        "scaling": {"num_workers": 2, "cpus_per_worker": 0.5},
        "sharding": {"enabled": True},
        "storage_path": str(tmp_path / "runs"),
    }
    for key, value in sections.items():
        cfg[key] = {**cfg.get(key, {}), **value}
    return cfg


@pytest.mark.parametrize(
    "sharding,pattern",
    [
        ({"default_type": "row_wise"}, r"default_type: 'row_wise' is refused by TorchRec on CPU"),
        ({"tables": {"item_id": "grid_shard"}}, r"tables\.item_id: 'grid_shard' is refused"),
        ({"embedding_optimizer": "adam"}, r"embedding_optimizer: 'adam' has no fused CPU kernel"),
        ({"default_type": "diagonal"}, r"cfg.yaml: sharding\.default_type: Input should be .*\(got 'diagonal'\)"),
    ],
)
def test_sharding_not_offered_on_cpu_fails_before_any_worker(sim_dir, tmp_path, sharding, pattern):
    with pytest.raises(ConfigError, match=pattern):
        parse(TrainConfig, _cfg(sim_dir, tmp_path, sharding=sharding), "cfg.yaml")


def test_unknown_table_is_named(sim_dir, tmp_path):
    cfg = TrainConfig.model_validate(_cfg(sim_dir, tmp_path, sharding={"tables": {"itme_id": "table_wise"}}))
    with pytest.raises(ConfigError, match=r"sharding\.tables: 'itme_id' is not an embedding table of dcnv2"):
        validate(cfg)


def test_more_workers_than_cpus_fails_fast(sim_dir, tmp_path, ray_local):
    cfg = TrainConfig.model_validate(_cfg(sim_dir, tmp_path, scaling={"num_workers": 4, "cpus_per_worker": 1}))
    started = time.perf_counter()
    with pytest.raises(ConfigError, match=r"scaling\.num_workers: 4 workers x 1 CPU need 4 CPUs and Ray Data needs 1 more; the cluster has 2"):
        check_cluster_fits(cfg)
    assert time.perf_counter() - started < 1.0


@pytest.mark.ray
def test_two_sharded_workers_follow_the_one_worker_loss_curve(sim_dir, tmp_path, ray_local):
    """Same global batches (global_batches: each worker takes its half), same seed: sharding moves
    tables, not math. Embedding gradients are summed over ranks while dense ones are averaged;
    Adagrad's update is invariant to that factor, so the curves agree to float round-off."""
    one = fit(TrainConfig.model_validate(_cfg(
        sim_dir, tmp_path, train={"batch_size": 512, "global_batches": True},
        scaling={"num_workers": 1, "cpus_per_worker": 1},
        sharding={"default_type": "table_wise"}) | {"name": "one"}))["metrics"]
    two = fit(TrainConfig.model_validate(_cfg(
        sim_dir, tmp_path, train={"batch_size": 256, "global_batches": True},
        sharding={"default_type": "column_wise"}) | {"name": "two"}))["metrics"]
    a, b = np.array(one["train_loss_curve"]), np.array(two["train_loss_curve"])
    assert len(a) == len(b) == 3200 // 512  # the short last global batch is dropped
    np.testing.assert_allclose(a, b, atol=2e-4)
    assert abs(one["test_auc"] - two["test_auc"]) < 2e-3
