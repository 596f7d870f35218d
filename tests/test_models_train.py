"""Every model in the zoo trains one epoch through `recray.platform.train.fit` (Ray Train local
mode, what `recray train` runs) on the CreatorEcosystem log's three labels (click, long_view,
return), and learns click better than chance, judged against a scikit-learn reference."""

from __future__ import annotations

import math
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score

from recray import models
from recray.data.schema import Schema
from recray.platform.config import TrainConfig, load_train_config
from recray.platform.train import fit, validate
from recray.simulators.logging_policy import LogConfig, write_creator_log

TASKS = ("click", "long_view", "return")
# Linear models move each weight by about one lr per Adam step: with the log's unscaled dense
# columns they need a larger step to find click's signal in one short epoch (40 steps).
LR = {"lr": 0.05, "fm": 0.03}


@pytest.fixture(scope="module")
def creator_log(tmp_path_factory):
    """~10k train / 1.3k test impressions with a history sequence: every model can use it."""
    out = tmp_path_factory.mktemp("creator_log")
    write_creator_log(out, LogConfig(num_users=1000, days=4, seed=1))
    return out


@pytest.fixture(scope="module")
def reference(creator_log) -> dict[str, float]:
    """The click AUC that chance exceeds once in ~30,000 test sets (4 standard errors of the
    Mann-Whitney statistic under no signal), and scikit-learn's logistic regression on the dense
    columns, fitted to convergence: it shows the log holds that much signal."""
    schema = Schema.load(creator_log)
    dense = [f.name for f in schema.dense_features]
    train = pq.read_table(creator_log / "train.parquet").to_pandas()
    test = pq.read_table(creator_log / "test.parquet").to_pandas()
    positives = int(test["label_click"].sum())
    negatives = len(test) - positives
    chance_se = math.sqrt((positives + negatives + 1) / (12 * positives * negatives))
    sk = LogisticRegression(max_iter=1000).fit(train[dense], train["label_click"])
    return {
        "auc_bar": 0.5 + 4 * chance_se,
        "sklearn_auc_click": roc_auc_score(test["label_click"], sk.predict_proba(test[dense])[:, 1]),
        "test_rows": len(test),
    }


@pytest.mark.ray
@pytest.mark.parametrize("name", models.available())
def test_model_trains_one_epoch_through_fit(creator_log, reference, tmp_path, ray_local, name):
    cfg = TrainConfig.model_validate({
        "name": name, "data": {"path": str(creator_log)}, "model": {"name": name},
        "train": {"epochs": 1, "batch_size": 256, "lr": LR.get(name, 0.01)},
        "scaling": {"num_workers": 0}, "storage_path": str(tmp_path / "runs"),
    })  # fmt: skip
    metrics = fit(cfg)["metrics"]
    assert metrics["test_rows"] == reference["test_rows"]
    for task in TASKS:
        assert math.isfinite(metrics[f"test_logloss_{task}"]), metrics
        assert math.isfinite(metrics[f"test_auc_{task}"]), metrics
    assert all(math.isfinite(x) for x in metrics["train_loss_curve"])
    print(name, {k: round(v, 4) for k, v in metrics.items() if k.startswith("test_auc")},
          "ref", {k: round(v, 4) for k, v in reference.items()})
    assert reference["sklearn_auc_click"] > reference["auc_bar"] + 0.05  # the bar is reachable
    assert metrics["test_auc_click"] > reference["auc_bar"], metrics


CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def test_every_model_has_a_config_that_trains_on_the_simulated_world(creator_log):
    """configs/*.yaml reading data/sim (what `recray data simulate --out data/sim` writes: the
    CreatorEcosystem log) name every model; each validates against such a log, model included."""
    by_model: dict[str, list[Path]] = {}
    for path in sorted(CONFIGS.glob("*.yaml")):
        data = yaml.safe_load(path.read_text())
        is_train = isinstance(data, dict) and "search" not in data  # tune configs search
        if is_train and data.get("data", {}).get("path") == "data/sim":
            by_model.setdefault(data["model"]["name"], []).append(path)
    assert sorted(by_model) == models.available()
    for paths in by_model.values():
        for path in paths:
            cfg = load_train_config(path, {"data.path": str(creator_log)})
            validate(cfg)  # raises ConfigError naming the field
