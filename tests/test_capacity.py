"""Tables bigger than a worker: a memory budget the planner must respect, meta-built models, row init."""

from __future__ import annotations

import importlib.util
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from scipy import stats

from recray import models
from recray.data.jagged import to_batch
from recray.data.schema import Schema
from recray.data.simulate import WorldConfig, simulate
from recray.platform.config import ConfigError, TrainConfig
from recray.platform.sharding import (
    ROW_CHUNK,
    build_for_sharding,
    embedding_tables,
    initial_rows,
    shard,
)
from recray.platform.train import _ensure_process_group, fit, validate

WORLD = WorldConfig(num_users=200, num_items=100, num_impressions=4109, seed=5)
# 1.2 GiB of fp32 dim-16 rows: half of it per worker must stand out of a worker's ~0.7 GB.
BIG_ROWS = {"user_id": 10_000_000, "item_id": 10_000_000}  # each 0.9x the budget
BENCH = Path(__file__).parents[1] / "benchmarks" / "embedding_capacity.py"


def _bench():
    spec = importlib.util.spec_from_file_location("embedding_capacity", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def worlds(tmp_path_factory):
    small = tmp_path_factory.mktemp("small")
    simulate(small, WORLD)
    return small, _bench().enlarge_tables(small, tmp_path_factory.mktemp("big"), BIG_ROWS)


def _table_bytes(data: Path) -> int:
    schema = Schema.load(data)
    with torch.device("meta"):
        model = models.build("dcnv2", schema)
    return 4 * sum(embedding_tables(model).values())


def _cfg(data: Path, workers: int, budget: int | None, tmp_path: Path) -> TrainConfig:
    return _bench().capacity_config(data, str(tmp_path), workers, budget, epochs=1,
                                    batch_size=256, scale_rows=WORLD.num_items, name="cap")


def test_initial_rows_do_not_depend_on_the_cut(tmp_path):
    """Any shard (rows across chunk borders, a column slice) is that slice of the whole table,
    and the whole table is U(-a, a) with TorchRec's a = sqrt(1/rows) (KS test against scipy)."""
    rows, dim = 3 * ROW_CHUNK + 17, 8
    whole = initial_rows(3, "user_id", rows, dim, (0, rows))
    part = initial_rows(3, "user_id", rows, dim, (ROW_CHUNK - 5, 2 * ROW_CHUNK + 9), (2, 6))
    torch.testing.assert_close(part, whole[ROW_CHUNK - 5 : 2 * ROW_CHUNK + 9, 2:6], rtol=0, atol=0)
    scale = rows ** -0.5
    assert stats.kstest(whole.flatten().numpy(), stats.uniform(-scale, 2 * scale).cdf).pvalue > 1e-3
    other_table = initial_rows(3, "item_id", rows, dim, (0, 100))
    assert not torch.equal(other_table, whole[:100])
    # A bigger table shares its first rows' values, up to the scale (capped: identical).
    bigger = initial_rows(3, "user_id", 10 * rows, dim, (0, 100), scale_rows=rows)
    torch.testing.assert_close(bigger, whole[:100], rtol=0, atol=0)


def test_meta_built_sharded_model_is_the_plain_model_with_those_rows(worlds):
    """build_for_sharding + shard (one rank) computes what a plain model computes with the same
    dense weights and the tables set to initial_rows; the dense part does not depend on the
    tables' sizes, and no table is allocated before DMP places it."""
    import torch.distributed as dist

    small, big = worlds
    schema = Schema.load(small)
    meta = build_for_sharding("dcnv2", Schema.load(big), {}, seed=7)
    assert all(p.is_meta for p in meta.embedding.parameters())
    twin = build_for_sharding("dcnv2", schema, {}, seed=7)
    dense = {k: v for k, v in twin.state_dict().items() if "embedding" not in k}
    for key, value in dense.items():
        torch.testing.assert_close(meta.state_dict()[key], value, rtol=0, atol=0)

    plain = models.build("dcnv2", schema)
    state = plain.state_dict()
    for key in state:
        if key in dense:
            state[key] = dense[key]
        else:  # ...<table>.weight
            rows, dim = state[key].shape
            state[key] = initial_rows(7, key.rsplit(".", 2)[-2], rows, dim, (0, rows))
    plain.load_state_dict(state)
    batch = to_batch(pq.read_table(small / "test.parquet"), schema)
    _ensure_process_group()
    try:
        sharded, _, plan = shard(
            twin, default_type="table_wise", table_types={}, embedding_optimizer="sgd",
            embedding_lr=0.1, dense_optimizer=lambda p: torch.optim.SGD(p, lr=0.1),
            device=torch.device("cpu"), seed=7)
        with torch.no_grad():
            torch.testing.assert_close(sharded(batch), plain(batch), rtol=1e-5, atol=1e-6)
    finally:
        dist.destroy_process_group()
    assert "table_wise" in plan


def test_one_worker_with_the_budget_is_refused_naming_table_and_budget(worlds, tmp_path):
    """Tables 1.8x one worker's budget: refused on one worker before anything starts (the planner
    runs in the driver on the meta model), planned on two."""
    _, big = worlds
    table_bytes = _table_bytes(big)
    budget = int(table_bytes / 1.8)
    started = time.perf_counter()
    with pytest.raises(ConfigError) as refused:
        validate(_cfg(big, 1, budget, tmp_path))
    message = str(refused.value)
    assert time.perf_counter() - started < 30
    assert "sharding.memory_per_worker" in message and "1 worker x" in message
    assert "table 'user_id' (10,000,000 x 16)" in message
    assert f"{budget / 2**30:.3g} GiB" in message
    validate(_cfg(big, 2, budget, tmp_path))  # two workers hold it


def test_memory_budget_is_parsed_with_units():
    cfg = TrainConfig.model_validate({"data": {"path": "x"}, "model": {"name": "dcnv2"},
                                      "sharding": {"enabled": True, "memory_per_worker": "1.5GiB"}})
    assert cfg.sharding.memory_per_worker == int(1.5 * 2**30)
    with pytest.raises(ValueError, match="memory_per_worker"):
        TrainConfig.model_validate({"data": {"path": "x"}, "model": {"name": "dcnv2"},
                                    "sharding": {"memory_per_worker": "lots"}})


@pytest.mark.ray
def test_tables_bigger_than_one_worker_train_on_two(worlds, tmp_path, ray_local):
    """Each of the two workers holds about half the tables: its peak RSS (the kernel's VmHWM)
    exceeds that of the same run with the world's small tables by 0.4-0.6x the tables (a worker
    holding every table would exceed it by 1x), and the model learns what the small-table model
    learns (every used row starts from the same values)."""
    small, big = worlds
    bench = _bench()
    table_bytes = _table_bytes(big)
    with bench.WorkerPeakRSS(interval_s=0.1) as rss:
        metrics = fit(_cfg(big, 2, int(table_bytes / 1.8), tmp_path))["metrics"]
    with bench.WorkerPeakRSS(interval_s=0.1) as small_rss:
        reference = fit(_cfg(small, 2, None, tmp_path))["metrics"]
    peaks, footprint = list(rss.peaks.values()), max(small_rss.peaks.values())
    assert len(peaks) == 2
    held = [(peak - footprint) / table_bytes for peak in peaks]
    assert all(0.4 < share < 0.6 for share in held), held
    assert abs(metrics["test_auc"] - reference["test_auc"]) < 0.002
    # One epoch of 3200 rows with SGD embeddings: above chance, not much more (0.54 measured).
    assert np.isfinite(metrics["test_auc"]) and metrics["test_auc"] > 0.5
