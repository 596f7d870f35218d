"""Calibration recovers a known world from its log, and the creator log trains as written."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pyarrow.parquet as pq
import pytest

from recray.data.jagged import to_batch
from recray.data.schema import Schema
from recray.simulators.calibrate import (
    FittedWorld,
    InteractionLog,
    calibrate,
    events_per_item,
    fit_world,
    ks_distances,
    read_log,
    simulate_world,
)

TRUE_WORLD = FittedWorld(num_users=800, num_items=1000, zipf_exponent=1.1, item_sigma=1.0,
                         activity_loc=19.0, activity_sigma=1.0, activity_scale=60.0)


def write_u_data(path, log: InteractionLog) -> None:
    # u.data ids start at 1; rating and timestamp are unused by calibration but part of the format.
    rows = np.stack([log.user_id + 1, log.item_id + 1, np.full(len(log.user_id), 3),
                     np.arange(len(log.user_id)) + 880_000_000], axis=1)
    np.savetxt(path, rows, fmt="%d", delimiter="\t")


@pytest.fixture(scope="module")
def zipf_u_data(tmp_path_factory):
    path = tmp_path_factory.mktemp("ml") / "u.data"
    write_u_data(path, simulate_world(TRUE_WORLD, seed=1))
    return path


def test_zipf_fit_recovers_known_exponent_from_u_data(zipf_u_data):
    log = read_log(zipf_u_data, "movielens")
    world = fit_world(log)
    # At ~80k events over 1000 items the MLE's spread over seeds is about 0.002 (measured at
    # exponents 0.6, 1.0 and 1.3); 0.02 leaves room without letting a biased estimator through.
    assert world.zipf_exponent == pytest.approx(TRUE_WORLD.zipf_exponent, abs=0.02)
    assert world.activity_loc == pytest.approx(TRUE_WORLD.activity_loc, abs=1.0)
    assert world.activity_sigma == pytest.approx(TRUE_WORLD.activity_sigma, rel=0.15)
    assert world.num_users == TRUE_WORLD.num_users


def test_ks_distance_small_for_fitted_world_large_for_mismatched(zipf_u_data):
    log = read_log(zipf_u_data, "movielens")
    fitted = ks_distances(log, simulate_world(fit_world(log), seed=2))
    assert fitted["item_popularity"] < 0.1 and fitted["user_activity"] < 0.1
    flat_and_busy = replace(TRUE_WORLD, zipf_exponent=0.3, activity_scale=300.0)
    mismatched = ks_distances(log, simulate_world(flat_and_busy, seed=2))
    assert mismatched["item_popularity"] > 0.3 and mismatched["user_activity"] > 0.3


def test_kuairand_csv_reads_video_ids_and_names_missing_columns(tmp_path):
    log = simulate_world(replace(TRUE_WORLD, num_users=50), seed=3)
    good = tmp_path / "log.csv"
    lines = ["user_id,video_id,time_ms,is_click"] + [
        f"{u},{v},{1_650_000_000_000 + i},1"
        for i, (u, v) in enumerate(zip(log.user_id, log.item_id, strict=True))]
    good.write_text("\n".join(lines) + "\n")
    read = read_log(good, "kuairand")
    np.testing.assert_array_equal(events_per_item(read), events_per_item(log))
    bad = tmp_path / "bad.csv"
    bad.write_text("user_id,item_id\n1,2\n")
    with pytest.raises(ValueError, match=r"video_id.*time_ms"):
        read_log(bad, "kuairand")


def test_simulate_calibrate_job_writes_report(zipf_u_data, tmp_path, capsys):
    from recray.cli import main

    out = tmp_path / "report.json"
    assert main(["simulate", "calibrate", "--src", str(zipf_u_data), "--format", "movielens",
                 "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["world"]["zipf_exponent"] == pytest.approx(1.1, abs=0.02)
    assert report["best_popularity"] == "zipf"
    assert main(["simulate", "calibrate", "--src", str(tmp_path / "absent"),
                 "--format", "movielens"]) == 2
    assert "file not found" in capsys.readouterr().err


def test_movielens_100k_calibration(shared_data):
    src = shared_data / "movielens-100k" / "u.data"
    if not src.exists():
        pytest.skip(f"{src} is absent")
    report = calibrate(src, "movielens")
    print(json.dumps(report, indent=2))
    assert report["events"] == 100_000 and report["world"]["num_users"] == 943
    # MovieLens keeps users with >= 20 ratings: the shifted lognormal starts there.
    assert report["world"]["activity_loc"] == 19.0
    assert report["lognormal"]["user_activity"] < 0.2
    assert report[report["best_popularity"]]["item_popularity"] < 0.2


def test_creator_log_splits_convert_and_validate_for_din(tmp_path, capsys):
    from recray.jobs.data import main
    from recray.platform.config import TrainConfig
    from recray.platform.train import validate

    assert main(["simulate", "--world", "creator", "--out", str(tmp_path), "--users", "150",
                 "--days", "3", "--creators", "20", "--seed", "3"]) == 0
    assert "oracle click AUC" in capsys.readouterr().out
    schema = Schema.load(tmp_path)
    days = {}
    for split in ("train", "valid", "test"):
        table = pq.read_table(tmp_path / f"{split}.parquet")
        batch = to_batch(table, schema, source=split)
        assert len(batch) == table.num_rows > 0
        days[split] = table.column("day").to_numpy()
    # Time-ordered: nothing validated or tested on is older than what was trained on.
    assert days["train"].max() <= days["valid"].min() and days["valid"].max() <= days["test"].min()
    oracle = json.loads((tmp_path / "oracle.json").read_text())["oracle"]
    assert 0.5 < oracle["test"]["auc"] < 1.0
    cfg = TrainConfig.model_validate({"data": {"path": str(tmp_path)}, "model": {"name": "din"}})
    assert validate(cfg).labels == ["label_click", "label_long_view", "label_return"]
