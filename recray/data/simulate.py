"""A synthetic impression log with a known ground-truth click model, so the Bayes-optimal AUC is known.

The world: users and items have latent interest vectors; items belong to tags whose centres pull
their vectors together; item popularity is Zipf-skewed. Each user has a jagged pre-log history
drawn from their own taste. The logging policy shows items by popularity (and, mildly, by taste)
at a slot position; a click happens with

    p = sigmoid(affinity * <u, v_item> + popularity * log_pop_item - position_bias * slot + bias)

The true `p_click` is kept as a column (not a feature), so the oracle AUC of any split is the AUC
of `p_click` against the sampled labels: no model can beat it on that sample except by chance.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from sklearn.metrics import log_loss, roc_auc_score

from recray.data.schema import Feature, Schema


@dataclass(frozen=True)
class WorldConfig:
    num_users: int = 1000
    num_items: int = 500
    num_tags: int = 20
    latent_dim: int = 4
    num_impressions: int = 300_000
    mean_history: float = 30.0
    max_history: int = 100
    zipf_exponent: float = 1.0
    affinity: float = 2.0
    popularity: float = 0.3
    position_bias: float = 0.4
    num_positions: int = 5
    bias: float = -1.0
    num_segments: int = 20
    tag_spread: float = 0.15
    user_spread: float = 0.15
    taste_in_history: float = 3.0
    seed: int = 0


def _unit_rows(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _sample_rows(weights: np.ndarray, rows: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """For each entry of `rows`, draw a column from that row of `weights` (vectorised inverse CDF)."""
    cdf = np.cumsum(weights, axis=1)
    cdf /= cdf[:, -1:]
    # Row r's CDF lives in (r, r+1]: one flat searchsorted serves every row at once.
    flat = (cdf + np.arange(len(cdf))[:, None]).ravel()
    picks = np.searchsorted(flat, rows + rng.random(len(rows)))
    return np.clip(picks - rows * weights.shape[1], 0, weights.shape[1] - 1)


def schema_for(cfg: WorldConfig, embedding_dim: int = 16) -> Schema:
    return Schema(
        features=[
            Feature(name="user_id", kind="sparse", vocab_size=cfg.num_users, embedding_dim=embedding_dim),
            Feature(name="user_segment", kind="sparse", vocab_size=cfg.num_segments,
                    embedding_dim=embedding_dim),
            Feature(name="item_id", kind="sparse", vocab_size=cfg.num_items, embedding_dim=embedding_dim),
            Feature(name="item_tags", kind="sparse", vocab_size=cfg.num_tags, embedding_dim=embedding_dim,
                    pooling="mean"),
            Feature(name="history", kind="sequence", vocab_size=cfg.num_items,
                    embedding_dim=embedding_dim, table="item_id"),
            Feature(name="position", kind="dense"),
        ],
        labels=["label"],
    )


def simulate_log(cfg: WorldConfig) -> pa.Table:
    """The impression log as one Arrow table: features, `label`, and the true `p_click`."""
    rng = np.random.default_rng(cfg.seed)
    # Interests cluster: items around the centres of their tags, users around their segment's.
    # Both groupings are observed features, so most of the taste is learnable from shared
    # structure; the rest (the spreads) only from per-id data and histories.
    tag_centres = _unit_rows(rng.normal(size=(cfg.num_tags, cfg.latent_dim)))
    item_tag = rng.integers(cfg.num_tags, size=cfg.num_items)
    # A second tag for half the items, so item_tags is a genuinely multi-id (jagged) feature.
    second_tag = np.where(rng.random(cfg.num_items) < 0.5, rng.integers(cfg.num_tags, size=cfg.num_items), -1)
    tag_mix = tag_centres[item_tag] + np.where(second_tag[:, None] >= 0, tag_centres[second_tag], 0.0)
    items = _unit_rows(_unit_rows(tag_mix) + cfg.tag_spread * rng.normal(size=(cfg.num_items, cfg.latent_dim)))
    segment_centres = _unit_rows(rng.normal(size=(cfg.num_segments, cfg.latent_dim)))
    user_segment = rng.integers(cfg.num_segments, size=cfg.num_users)
    users = _unit_rows(segment_centres[user_segment]
                       + cfg.user_spread * rng.normal(size=(cfg.num_users, cfg.latent_dim)))
    popularity = 1.0 / np.arange(1, cfg.num_items + 1) ** cfg.zipf_exponent
    popularity = popularity[rng.permutation(cfg.num_items)]
    log_pop = np.log(popularity / popularity.mean())

    # Pre-log histories: each user's items drawn by popularity x taste; lengths geometric-like.
    taste = popularity[None, :] * np.exp(cfg.taste_in_history * users @ items.T)
    lengths = np.minimum(rng.poisson(rng.exponential(cfg.mean_history, cfg.num_users)), cfg.max_history)
    history_users = np.repeat(np.arange(cfg.num_users), lengths)
    history_items = _sample_rows(taste, history_users, rng)
    history_offsets = np.concatenate([[0], np.cumsum(lengths)])

    # Impressions: logged policy shows items by popularity, mildly tilted to taste.
    imp_users = rng.integers(cfg.num_users, size=cfg.num_impressions)
    shown = popularity[None, :] * np.exp(0.5 * users @ items.T)
    imp_items = _sample_rows(shown, imp_users, rng)
    slot = rng.integers(cfg.num_positions, size=cfg.num_impressions)
    logit = (cfg.affinity * np.einsum("nd,nd->n", users[imp_users], items[imp_items])
             + cfg.popularity * log_pop[imp_items] - cfg.position_bias * slot + cfg.bias)
    p_click = 1.0 / (1.0 + np.exp(-logit))
    label = (rng.random(cfg.num_impressions) < p_click).astype(np.float32)

    # Jagged columns built from offsets: row n's history is its user's slice of history_items.
    row_hist_len = lengths[imp_users]
    row_hist_start = history_offsets[imp_users]
    hist_offsets = np.concatenate([[0], np.cumsum(row_hist_len)]).astype(np.int32)
    gather = np.repeat(row_hist_start - hist_offsets[:-1], row_hist_len) + np.arange(hist_offsets[-1])
    tags_len = 1 + (second_tag[imp_items] >= 0)
    tag_offsets = np.concatenate([[0], np.cumsum(tags_len)]).astype(np.int32)
    tag_values = np.stack([item_tag[imp_items], second_tag[imp_items]], axis=1).ravel()
    tag_values = tag_values[tag_values >= 0]
    return pa.table({
        "user_id": pa.array(imp_users, pa.int64()),
        "user_segment": pa.array(user_segment[imp_users], pa.int64()),
        "item_id": pa.array(imp_items, pa.int64()),
        "item_tags": pa.ListArray.from_arrays(pa.array(tag_offsets), pa.array(tag_values, pa.int64())),
        "history": pa.ListArray.from_arrays(pa.array(hist_offsets), pa.array(history_items[gather], pa.int64())),
        "position": pa.array(slot / max(cfg.num_positions - 1, 1), pa.float32()),
        "label": pa.array(label),
        "p_click": pa.array(p_click.astype(np.float32)),
    })


def oracle_metrics(table: pa.Table) -> dict[str, float]:
    """AUC and logloss of the true click probability on this sample: the Bayes-optimal figures."""
    labels = table.column("label").to_numpy()
    p = table.column("p_click").to_numpy().astype(np.float64)
    return {"auc": float(roc_auc_score(labels, p)), "logloss": float(log_loss(labels, p, labels=[0, 1]))}


def simulate(out: str | Path, cfg: WorldConfig = WorldConfig()) -> dict[str, dict[str, float]]:
    """Write train/valid/test Parquet (random 8:1:1), schema.yaml and oracle.json; return the oracle."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    table = simulate_log(cfg)
    split = np.random.default_rng(cfg.seed + 1).permutation(table.num_rows)
    n_train, n_valid = int(0.8 * table.num_rows), int(0.9 * table.num_rows)
    parts = {"train": split[:n_train], "valid": split[n_train:n_valid], "test": split[n_valid:]}
    oracle = {}
    for name, rows in parts.items():
        part = table.take(np.sort(rows))
        pq.write_table(part, out / f"{name}.parquet")
        oracle[name] = oracle_metrics(part)
    schema_for(cfg).save(out)
    (out / "oracle.json").write_text(json.dumps({"oracle": oracle, "world": asdict(cfg)}, indent=2))
    return oracle
