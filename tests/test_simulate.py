"""The simulated log: deterministic, jagged, well-typed, and its printed oracle is the true click model's."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from recray.data.jagged import to_batch
from recray.data.schema import Schema
from recray.data.simulate import WorldConfig, oracle_metrics, simulate, simulate_log

SMALL = WorldConfig(num_users=200, num_items=100, num_impressions=4000, seed=7)


def test_same_seed_same_log_other_seed_other_log():
    a, b = simulate_log(SMALL), simulate_log(SMALL)
    assert a.equals(b)
    c = simulate_log(WorldConfig(**{**SMALL.__dict__, "seed": 8}))
    assert not a.column("label").equals(c.column("label"))


def test_histories_are_jagged_per_user_and_in_range():
    table = simulate_log(SMALL)
    lengths = pc.list_value_length(table.column("history")).to_numpy()
    assert lengths.min() == 0 or lengths.min() < lengths.max()  # genuinely jagged
    assert lengths.max() <= SMALL.max_history
    users = table.column("user_id").to_numpy()
    history = table.column("history").to_pylist()
    first_row_of = {}
    for row, user in enumerate(users):  # every impression of a user carries that user's history
        assert history[row] == history[first_row_of.setdefault(user, row)]
    flat = pc.list_flatten(table.column("history")).to_numpy()
    assert flat.min() >= 0 and flat.max() < SMALL.num_items


def test_written_splits_convert_and_oracle_matches_p_click(tmp_path):
    oracle = simulate(tmp_path, SMALL)
    schema = Schema.load(tmp_path)
    sizes = {s: pq.read_metadata(tmp_path / f"{s}.parquet").num_rows for s in ("train", "valid", "test")}
    assert sizes == {"train": 3200, "valid": 400, "test": 400}
    test = pq.read_table(tmp_path / "test.parquet")
    batch = to_batch(test, schema)
    assert batch.labels.shape == (400, 1)
    assert oracle["test"] == pytest.approx(oracle_metrics(test))
    assert json.loads((tmp_path / "oracle.json").read_text())["oracle"]["test"]["auc"] == oracle["test"]["auc"]
    # The oracle is informative and calibrated: clicks follow p_click.
    assert 0.6 < oracle["test"]["auc"] < 0.95
    p, y = test.column("p_click").to_numpy(), test.column("label").to_numpy()
    assert abs(p.mean() - y.mean()) < 0.05


def test_oracle_beats_any_single_feature_ranking(tmp_path):
    table = simulate_log(SMALL)
    from sklearn.metrics import roc_auc_score

    y = table.column("label").to_numpy()
    oracle_auc = oracle_metrics(table)["auc"]
    for column in ("position", "item_id", "user_id"):
        x = table.column(column).to_numpy().astype(np.float64)
        assert max(roc_auc_score(y, x), roc_auc_score(y, -x)) < oracle_auc


@pytest.mark.parametrize("argv, flag", [(["--items", "50"], "--items"),
                                        (["--impressions", "900"], "--impressions"),
                                        (["--world", "parametric", "--days", "3"], "--days"),
                                        (["--world", "parametric", "--creators", "5"], "--creators")])
def test_simulate_refuses_a_flag_of_the_other_world(tmp_path, capsys, argv, flag):
    from recray.jobs import data

    assert data.main(["simulate", "--out", str(tmp_path), *argv]) == 2
    assert flag in capsys.readouterr().err
    assert not (tmp_path / "train.parquet").exists()


def test_simulate_honours_the_parametric_world_flags(tmp_path):
    from recray.jobs import data

    argv = ["simulate", "--out", str(tmp_path), "--world", "parametric", "--users", "50",
            "--items", "30", "--impressions", "1000"]
    assert data.main(argv) == 0
    table = pq.read_table([tmp_path / f"{s}.parquet" for s in ("train", "valid", "test")])
    assert table.num_rows == 1000
    assert pc.max(table.column("item_id")).as_py() < 30
    assert pc.max(table.column("user_id")).as_py() < 50
