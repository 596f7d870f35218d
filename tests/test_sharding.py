"""TorchRec sharding inside Ray Train: configs refused before workers start; same math as one worker."""

from __future__ import annotations

import time

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from recray import models
from recray.data.jagged import to_batch
from recray.data.schema import Schema
from recray.data.simulate import WorldConfig, simulate
from recray.platform.config import ConfigError, TrainConfig, parse
from recray.platform.sharding import embedding_optimizer_for, shard
from recray.platform.train import _ensure_process_group, check_cluster_fits, fit, validate

# 4109 impressions split 8:1:1 leave 411 valid and 411 test rows: odd, so two workers hold
# uneven parts and the sharded (collective) evaluation must still score each row once.
WORLD = WorldConfig(num_users=200, num_items=100, num_impressions=4109, seed=5)


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
    for split in ("valid", "test"):
        rows = pq.ParquetFile(sim_dir / f"{split}.parquet").metadata.num_rows
        assert one[f"{split}_rows"] == two[f"{split}_rows"] == rows


def test_sharded_embeddings_default_to_the_unsharded_optimizer(sim_dir, tmp_path):
    """train.optimizer sgd: a one-rank DMP model whose embeddings get the default fused optimizer
    takes the same steps as the unsharded model under torch.optim.SGD (it used fused Adagrad).
    Adam has no fused CPU kernel: there the embeddings fall back to Adagrad, and the plan says so."""
    import torch.distributed as dist

    cfg = TrainConfig.model_validate(_cfg(sim_dir, tmp_path, train={"optimizer": "sgd", "lr": 0.3}))
    schema = Schema.load(sim_dir)
    table = pq.read_table(sim_dir / "train.parquet")
    batches = [to_batch(table.slice(i * 256, 256), schema) for i in range(6)]

    def losses(model, optimizer) -> list[float]:
        out = []
        for batch in batches:
            loss = torch.nn.functional.binary_cross_entropy_with_logits(model(batch), batch.labels)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            out.append(loss.item())
        return out

    torch.manual_seed(0)
    plain = models.build("dcnv2", schema)
    expected = losses(plain, torch.optim.SGD(plain.parameters(), lr=0.3))
    choice = embedding_optimizer_for(cfg.sharding, cfg.train, "cpu", world=1)
    assert (choice.name, choice.lr) == ("sgd", 0.3)
    _ensure_process_group()
    try:
        torch.manual_seed(0)
        sharded, optimizer, _ = shard(
            models.build("dcnv2", schema), default_type="table_wise", table_types={},
            embedding_optimizer=choice.name, embedding_lr=choice.lr,
            dense_optimizer=lambda params: torch.optim.SGD(params, lr=0.3), device=torch.device("cpu"))
        got = losses(sharded, optimizer)
    finally:
        dist.destroy_process_group()
    np.testing.assert_allclose(got, expected, atol=1e-5)
    assert expected[-1] < expected[0]  # it trains at all

    adam = TrainConfig.model_validate(_cfg(sim_dir, tmp_path))
    fallback = embedding_optimizer_for(adam.sharding, adam.train, "cpu", world=2)
    assert fallback.name == "adagrad"
    assert "train.optimizer 'adam' has no fused cpu kernel" in str(fallback)
    assert embedding_optimizer_for(adam.sharding, adam.train, "cuda", world=2).name == "adam"
    sgd_on_two = embedding_optimizer_for(cfg.sharding, cfg.train, "cpu", world=2)
    assert sgd_on_two.lr == 0.15 and "lr = train.lr / workers" in str(sgd_on_two)


def _hyformer_cfg(sim_dir, tmp_path, name: str, batch_size: int, workers: int,
                  table_type: str) -> TrainConfig:
    return TrainConfig.model_validate({
        "name": name, "data": {"path": str(sim_dir)},
        "model": {"name": "hyformer", "hparams": {"structure": "hybrid"}},
        "train": {"epochs": 1, "batch_size": batch_size, "lr": 0.003, "global_batches": True},
        "scaling": {"num_workers": workers, "cpus_per_worker": 0.5 if workers > 1 else 1},
        "sharding": {"enabled": True, "default_type": table_type},
        "storage_path": str(tmp_path / "runs"),
    })  # fmt: skip


@pytest.mark.ray
def test_sharded_hyformer_on_two_workers_follows_one_worker(sim_dir, tmp_path, ray_local):
    """A frontier model: HyFormer (pooled tables for its feature tokens, an unpooled
    EmbeddingCollection for the jagged history it decodes) on 2 gloo workers with column-wise
    tables follows the loss curve of 1 worker with table-wise tables.

    Same global batches (each worker trains on its half of every 512 rows), same seed.
    Dense gradients are averaged by DDP, embedding ones summed over ranks; the embeddings' fused
    Adagrad (Adam has no fused CPU kernel) is invariant to that factor, so the curves agree up to
    float round-off: sharding moves the tables, not the math."""
    one = fit(_hyformer_cfg(sim_dir, tmp_path, "one", 512, 1, "table_wise"))["metrics"]
    two = fit(_hyformer_cfg(sim_dir, tmp_path, "two", 256, 2, "column_wise"))["metrics"]
    a, b = np.array(one["train_loss_curve"]), np.array(two["train_loss_curve"])
    train_rows = pq.ParquetFile(sim_dir / "train.parquet").metadata.num_rows
    assert len(a) == len(b) == train_rows // 512  # the short last global batch is dropped
    assert a[-3:].mean() < a[:3].mean()  # it learns at all
    print("max |one - two| loss", float(np.abs(a - b).max()),
          "test AUC", one["test_auc"], two["test_auc"])
    np.testing.assert_allclose(a, b, atol=5e-4)
    assert abs(one["test_auc"] - two["test_auc"]) < 3e-3
    for split in ("valid", "test"):
        rows = pq.ParquetFile(sim_dir / f"{split}.parquet").metadata.num_rows
        assert one[f"{split}_rows"] == two[f"{split}_rows"] == rows
