"""`recray plan`: TorchRec's plan for the Criteo-1TB DLRM on 8 and 64 GPUs, computed on this CPU."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from recray.cli import main

CONFIG = Path(__file__).parents[1] / "configs" / "criteo-1tb-dlrm.yaml"
SCHEMA = CONFIG.parent / "criteo-1tb" / "schema.yaml"
HBM = 80 * 2**30


def _tables() -> dict[str, tuple[int, int]]:
    features = yaml.safe_load(SCHEMA.read_text())["features"]
    return {f["name"]: (f["hash_buckets"], f["embedding_dim"]) for f in features if f["kind"] == "sparse"}


def test_the_schema_is_criteo_1tb_sized():
    tables = _tables()
    assert len(tables) == 26 and max(rows for rows, _ in tables.values()) == 40_000_000
    assert {dim for _, dim in tables.values()} == {128}


@pytest.mark.parametrize("world", [8, 64])
def test_plan_places_every_table_within_each_gpu(world, tmp_path, capsys):
    """Every table is placed, whole or in pieces; each rank's weights plus row-wise Adagrad state
    (recomputed here from the shapes: 4 bytes x rows x (dim + 1)) stay under its 80 GiB."""
    out = tmp_path / "plan.json"
    assert main(["plan", str(CONFIG), "--world-size", str(world), "--device", "cuda",
                 "--hbm-gb", "80", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert f"on {world} x cuda (80 GiB HBM each" in printed
    plan = json.loads(out.read_text())
    placed = {name.rsplit(".", 1)[-1]: entry for name, entry in plan["tables"].items()}
    tables = _tables()
    assert set(placed) == set(tables)
    held = [0.0] * world
    for name, (rows, dim) in tables.items():
        ranks = placed[name]["ranks"]
        assert ranks and all(0 <= r < world for r in ranks)
        kind = placed[name]["sharding_type"]
        # The table's bytes, spread evenly over its ranks (row- and column-wise cuts are even
        # up to a remainder); data_parallel copies it to every rank.
        share = 4 * rows * (dim + 1) / (1 if kind == "data_parallel" else len(ranks))
        for r in ranks:
            held[r] += share
    assert max(held) < HBM
    assert len(plan["per_rank"]) == world
    # 80 GiB GPUs hold it all: nothing spills to host memory.
    assert all(r["hbm_bytes"] < HBM and r["ddr_bytes"] == 0 for r in plan["per_rank"])
    assert printed.count("  rank ") == world


def test_a_cluster_too_small_is_refused_naming_the_table(capsys):
    """97 GiB of tables cannot fit 2 GPUs of 16 GiB with 16 GiB of host memory each to spill to
    (UVM): refused with the largest table and the budget."""
    assert main(["plan", str(CONFIG), "--world-size", "2", "--device", "cuda", "--hbm-gb", "16",
                 "--host-gb", "16"]) == 2
    err = capsys.readouterr().err
    assert "2 workers x 16 GiB of HBM" in err and "table 'C1' (40,000,000 x 128)" in err


def test_hbm_on_a_cpu_plan_is_refused(capsys):
    assert main(["plan", str(CONFIG), "--world-size", "2", "--device", "cpu", "--hbm-gb", "16"]) == 2
    assert "--hbm-gb: a CPU worker has no HBM" in capsys.readouterr().err
