"""Quality benchmark: zoo models over several seeds on one prepared data set, against the peers' figures.

    python benchmarks/model_zoo.py --config configs/movielens-100k.yaml \
        --out benchmarks/results/model_zoo_movielens-100k.json

Every model runs through `recray.platform.train.fit` (Ray Train) under the config's budget (on
MovieLens-100K: RecBole's CTR protocol, early stopping on valid AUC), so the figures are the
product's. A scikit-learn logistic regression runs on the same split in the same run: the baseline
a user tries first, which every deep model must beat. The JSON keeps one row per model and seed
(test_auc, valid_auc, best_epoch, epochs_run) plus the baseline's row; the table prints mean ± std.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import scipy.sparse as sp
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import log_loss, roc_auc_score

from recray import models
from recray.data.schema import Schema
from recray.platform.config import ConfigError, load_train_config
from recray.platform.train import fit

# RecBole 1.2.1's test AUC on MovieLens-100K under the same protocol (its defaults), by recray name.
RECBOLE_TEST_AUC = {"lr": 0.825, "fm": 0.849, "widedeep": 0.843, "deepfm": 0.851, "dcnv2": 0.841,
                    "autoint": 0.852, "xdeepfm": 0.845}
BASELINE = "sklearn-lr"
MIN_ID_COUNT = 2  # ids seen fewer times in train get no column (they cannot be learned)
L2_GRID = (0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0, 30.0)  # LogisticRegression C = 1 / L2 strength


# --- the scikit-learn baseline -------------------------------------------------------------------
def _id_lists(table, feature) -> tuple[np.ndarray, np.ndarray]:
    """(offsets, ids) of an id column: a list column as is, a single id as a list of one."""
    column = table.column(feature.name).combine_chunks()
    if hasattr(column, "offsets"):
        offsets = column.offsets.to_numpy()
        return offsets - offsets[0], column.flatten().to_numpy()
    return np.arange(len(column) + 1), column.to_numpy()


def baseline_design(tables: dict, schema: Schema) -> dict[str, sp.csr_matrix]:
    """One sparse design matrix per split, with columns fitted on train.

    Dense features: log1p of the non-negative part, standardised with train's mean and std. Each
    id feature: one-hot (a list feature: a bag, weights 1/length) over the ids seen at least
    MIN_ID_COUNT times in train; the rest have no column.
    """
    blocks: dict[str, list[sp.csr_matrix]] = {split: [] for split in tables}
    for feature in schema.dense_features:
        logged = {s: np.log1p(np.maximum(t.column(feature.name).to_numpy(zero_copy_only=False), 0))
                  for s, t in tables.items()}
        mean, std = logged["train"].mean(), logged["train"].std() or 1.0
        for split, values in logged.items():
            blocks[split].append(sp.csr_matrix(((values - mean) / std)[:, None]))
    for feature in schema.id_features:
        ids, counts = np.unique(_id_lists(tables["train"], feature)[1], return_counts=True)
        kept = ids[counts >= MIN_ID_COUNT]
        for split, table in tables.items():
            offsets, values = _id_lists(table, feature)
            lengths = np.diff(offsets)
            rows = np.repeat(np.arange(len(lengths)), lengths)
            position = np.searchsorted(kept, values).clip(0, max(len(kept) - 1, 0))
            known = (kept[position] == values) if len(kept) else np.zeros(len(values), bool)
            weights = 1.0 / np.maximum(lengths, 1)[rows]
            blocks[split].append(sp.csr_matrix(
                (weights[known], (rows[known], position[known])), shape=(len(lengths), len(kept))))
    return {split: sp.hstack(parts, format="csr") for split, parts in blocks.items()}


def sklearn_baseline(data_dir: Path, schema: Schema) -> dict:
    """Logistic regression on the same split, its L2 strength chosen by valid AUC."""
    started = time.perf_counter()
    tables = {s: pq.read_table(data_dir / f"{s}.parquet") for s in ("train", "valid", "test")}
    x = baseline_design(tables, schema)
    y = {s: t.column(schema.labels[0]).to_numpy(zero_copy_only=False) for s, t in tables.items()}
    best = None
    for c in L2_GRID:
        model = LogisticRegression(C=c, max_iter=2000).fit(x["train"], y["train"])
        valid_auc = roc_auc_score(y["valid"], model.predict_proba(x["valid"])[:, 1])
        if best is None or valid_auc > best[0]:
            best = (valid_auc, c, model)
    valid_auc, c, model = best
    probs = model.predict_proba(x["test"])[:, 1]
    return {"model": BASELINE, "seed": None, "C": c, "features": x["train"].shape[1],
            "valid_auc": float(valid_auc), "test_auc": float(roc_auc_score(y["test"], probs)),
            "test_logloss": float(log_loss(y["test"], probs)), "best_epoch": None,
            "epochs_run": None, "seconds": time.perf_counter() - started}


# --- the recray models -----------------------------------------------------------------------------
def run_model(config: Path, name: str, seed: int) -> dict:
    cfg = load_train_config(config, {"model.name": name, "seed": seed, "name": f"zoo-{name}-{seed}"})
    started = time.perf_counter()
    metrics = fit(cfg)["metrics"]
    return {"model": name, "seed": seed, "seconds": time.perf_counter() - started,
            "best_epoch": metrics.get("best_epoch"), "epochs_run": metrics.get("epochs_run"),
            **{k: v for k, v in metrics.items() if k.startswith(("test_", "valid_"))}}


def summary(rows: list[dict]) -> list[dict]:
    """Per model: test AUC mean and std over seeds, the epochs run and won, the peer's figure."""
    out = []
    measured = [r for r in rows if "error" not in r]
    for name in dict.fromkeys(r["model"] for r in measured):
        mine = [r for r in measured if r["model"] == name]
        auc = np.array([r["test_auc"] for r in mine])
        epochs = [r["epochs_run"] for r in mine if r["epochs_run"] is not None]
        best = [r["best_epoch"] for r in mine if r["best_epoch"] is not None]
        out.append({"model": name, "seeds": len(mine), "test_auc_mean": float(auc.mean()),
                    "test_auc_std": float(auc.std(ddof=1)) if len(auc) > 1 else 0.0,
                    "epochs_run_mean": float(np.mean(epochs)) if epochs else None,
                    "best_epoch_mean": float(np.mean(best)) if best else None,
                    "recbole_test_auc": RECBOLE_TEST_AUC.get(name.removeprefix("sklearn-"))})
    return out


def table(rows: list[dict]) -> str:
    """The README's quality table (markdown)."""
    lines = ["| model | test AUC (mean ± std) | seeds | epochs run (best epoch, from 1) | RecBole 1.2.1 |",
             "|---|---|---:|---|---:|"]
    for s in sorted(rows, key=lambda s: -s["test_auc_mean"]):
        epochs = ("-" if s["epochs_run_mean"] is None
                  else f"{s['epochs_run_mean']:.1f} ({s['best_epoch_mean'] + 1:.1f})")
        peer = "-" if s["recbole_test_auc"] is None else f"{s['recbole_test_auc']:.3f}"
        lines.append(f"| {s['model']} | {s['test_auc_mean']:.4f} ± {s['test_auc_std']:.4f} | "
                     f"{s['seeds']} | {epochs} | {peer} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=Path("configs/movielens-100k.yaml"),
                        help="a train config; model.name and seed are replaced")
    parser.add_argument("--models", nargs="+", default=models.available())
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--no-baseline", action="store_true", help="skip the scikit-learn baseline")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()

    cfg = load_train_config(args.config)
    data_dir = Path(cfg.data.path)
    oracle_file = data_dir / "oracle.json"
    oracle = (json.loads(oracle_file.read_text())["oracle"]["test"]["auc"]
              if oracle_file.is_file() else None)
    rows = [] if args.no_baseline else [sklearn_baseline(data_dir, Schema.load(data_dir / "schema.yaml"))]
    for row in rows:
        print(json.dumps(row), flush=True)

    def write() -> None:  # after every run: a long benchmark stopped half-way keeps what it measured
        result = {"benchmark": "model_zoo", "config": str(args.config),
                  "budget": cfg.train.model_dump(mode="json"), "machine": platform.machine(),
                  "results": rows, "summary": summary(rows)}
        if oracle is not None:  # a simulated world: the true click probability's test AUC
            result["oracle_test_auc"] = oracle
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2))

    write()
    for name in args.models:
        for seed in args.seeds:
            try:
                rows.append(run_model(args.config, name, seed))
            except ConfigError as e:  # a model this data cannot feed (no sequence, one task)
                rows.append({"model": name, "seed": seed, "error": str(e)})
            print(json.dumps(rows[-1]), flush=True)
            write()
    print("\n" + table(summary(rows)))
    if oracle is not None:
        print(f"oracle test AUC (the world's true click probability): {oracle:.4f}")


if __name__ == "__main__":
    main()
