"""Logged impressions from CreatorEcosystem under a stochastic logging policy, in the data schema.

One row per shown item per session, in the foundation's Parquet conventions (recray/data): int64
ids, a jagged `list<int64>` user history (item ids clicked before this session, oldest first),
float32 dense features, float32 binary labels `label_click`, `label_long_view` (watched at least
LONG_VIEW_MINUTES) and `label_return` (the user came back the next day), the int64 `day` of the
impression (rows are in time order), the float32 `engagement_minutes`, plus columns that are not
features: the int64 `session_id` (one per served session, i.e. per slate) and `slot` (the row's
place in that slate, 0 first), the truth `p_click` (the true click probability of that slot in
that slate), `propensity` (the logging policy's probability that the item is shown anywhere in the
slate, for item-level inverse propensity weighting) and `slot_propensity` (its probability of
taking that slot given the slots above it: a session's product is the slate's probability).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from sklearn.metrics import roc_auc_score

from recray.data.schema import Feature, Schema
from recray.simulators import CREATOR_ECOSYSTEM
from recray.simulators.creator_ecosystem import CreatorEcosystem, _expected_engagement

DENSE = ("position", "clickbait", "log_clicks", "ctr", "age")
# Engagement is logged as minutes and, as a task, binarised like KuaiRand's long_view: every
# task of the zoo is a binary one trained with BCE and judged by AUC.
LONG_VIEW_MINUTES = 3.0


@dataclass(frozen=True)
class LogConfig:
    num_users: int = 1000
    days: int = 7
    temperature: float = 1.0
    seed: int = 0
    world: dict[str, Any] = field(default_factory=lambda: {"num_creators": 100})

    def __post_init__(self) -> None:
        if self.days < 1:
            raise ValueError(f"days: expected >= 1 logged day, got {self.days}")
        if self.temperature <= 0:
            raise ValueError(f"temperature: expected > 0, got {self.temperature}")
        # The log sets these itself: users are the vector env's slots, the horizon is days + 1.
        for name, owner in (("num_users", "num_users"), ("horizon_days", "days")):
            if name in self.world:
                raise ValueError(f"world.{name}: set by LogConfig.{owner}, not in world")


# Exact inclusion probabilities enumerate the ordered prefixes of a slate: C^(k-1) of them.
MAX_PREFIXES = 100_000


def inclusion_probabilities(weights: np.ndarray, slate_size: int) -> np.ndarray:
    """`[N, C]` probability that each candidate is in a Plackett-Luce slate of `slate_size`.

    Exact: the sum, over the ordered prefixes that leave a candidate out, of the prefix's
    probability times the candidate's share of the weight that remains.
    """
    num_candidates = weights.shape[1]
    if num_candidates ** (slate_size - 1) > MAX_PREFIXES:
        raise ValueError(f"slate_size: {slate_size} of {num_candidates} candidates has more than "
                         f"{MAX_PREFIXES} ordered prefixes to sum over; expected a smaller slate")
    inclusion = np.zeros_like(weights)

    def visit(prefix_prob: np.ndarray, left: np.ndarray, depth: int) -> None:
        pick = prefix_prob[:, None] * left / left.sum(axis=1, keepdims=True)
        inclusion[...] += pick
        if depth + 1 < slate_size:
            for j in range(num_candidates):
                rest = left.copy()
                rest[:, j] = 0.0
                visit(pick[:, j], rest, depth + 1)

    visit(np.ones(len(weights)), weights.astype(np.float64), 0)
    return inclusion


class SoftmaxLoggingPolicy:
    """Plackett-Luce over `score / temperature`: every candidate has a known, non-zero propensity."""

    def __init__(self, slate_size: int, temperature: float = 1.0) -> None:
        self.slate_size, self.temperature = slate_size, temperature

    def act(self, obs: dict, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Slates `[N, k]`, each pick's conditional propensity `[N, k]` (given the slots above)
        and each shown item's probability of being in the slate at all `[N, k]`."""
        logits = _expected_engagement(obs) / self.temperature
        gumbel = -np.log(-np.log(rng.random(logits.shape)))
        slates = np.argsort(-(logits + gumbel), axis=1)[:, :self.slate_size]
        weights = np.exp(logits - logits.max(axis=1, keepdims=True))
        shown = np.take_along_axis(inclusion_probabilities(weights, self.slate_size), slates,
                                   axis=1)
        rows = np.arange(len(logits))
        slot_propensity = np.empty(slates.shape)
        for slot in range(self.slate_size):
            picked = slates[:, slot]
            slot_propensity[:, slot] = weights[rows, picked] / weights.sum(axis=1)
            weights[rows, picked] = 0.0
        return slates.astype(np.int64), slot_propensity, shown


def simulate_creator_log(cfg: LogConfig = LogConfig()) -> pa.Table:
    """Run the world for `cfg.days` days under the logging policy; return the impression table."""
    env = gym.make_vec(CREATOR_ECOSYSTEM, num_envs=cfg.num_users,
                       vectorization_mode="vector_entry_point", horizon_days=cfg.days + 1,
                       **cfg.world)
    obs, _ = env.reset(seed=cfg.seed)
    world = env.world
    policy = SoftmaxLoggingPolicy(env.single_action_space.shape[0], cfg.temperature)
    rng = np.random.default_rng(cfg.seed)
    parts: list[dict[str, Any]] = []
    active_by_day = [world.active_today.copy()]
    sessions = 0
    while world.day < cfg.days:
        users = np.flatnonzero(obs["active"][:, 0])
        slates, slot_propensity, propensity = policy.act(obs, rng)
        history = world.history[users]
        day = world.day
        next_obs, reward, _, _, info = env.step(slates)
        response = next_obs["response"]
        k = slates.shape[1]
        pick = np.take_along_axis
        parts.append({
            "session_id": np.repeat(sessions + np.arange(len(users)), k),
            "user_id": np.repeat(users, k), "day": np.full(len(users) * k, day),
            "item_id": pick(obs["item_id"][users], slates[users], axis=1).ravel(),
            "creator_id": pick(obs["creator_id"][users], slates[users], axis=1).ravel(),
            "doc": pick(obs["doc"][users], slates[users][:, :, None], axis=1).reshape(
                len(users) * k, -1),
            "history": np.repeat(history, k, axis=0),
            "position": np.tile(np.arange(k), len(users)),
            "label_click": response["click"][users].ravel(),
            "engagement": response["engagement"][users].ravel(),
            "p_click": info["p_click"][users].ravel(),
            "propensity": propensity[users].ravel(),
            "slot_propensity": slot_propensity[users].ravel(),
        })
        sessions += len(users)
        if world.day != day:
            active_by_day.append(world.active_today.copy())
        obs = next_obs
    rows = {key: np.concatenate([part[key] for part in parts]) for key in parts[0]}
    returned = np.array(active_by_day)[rows["day"] + 1, rows["user_id"]]
    num_topics = world.p.num_topics
    doc = rows["doc"]
    mask = rows["history"] >= 0
    offsets = np.concatenate([[0], np.cumsum(mask.sum(axis=1))]).astype(np.int32)
    columns: dict[str, pa.Array] = {
        "session_id": pa.array(rows["session_id"], pa.int64()),
        "slot": pa.array(rows["position"], pa.int64()),
        "user_id": pa.array(rows["user_id"], pa.int64()),
        "day": pa.array(rows["day"], pa.int64()),
        "item_id": pa.array(rows["item_id"], pa.int64()),
        "creator_id": pa.array(rows["creator_id"], pa.int64()),
        "item_topic": pa.array(doc[:, :num_topics].argmax(axis=1), pa.int64()),
        "history": pa.ListArray.from_arrays(pa.array(offsets),
                                            pa.array(rows["history"][mask], pa.int64())),
        "position": pa.array(rows["position"].astype(np.float32)),
    }
    for i, name in enumerate(DENSE[1:]):
        columns[name] = pa.array(doc[:, num_topics + i].astype(np.float32))
    columns.update({
        "label_click": pa.array(rows["label_click"].astype(np.float32)),
        "label_long_view": pa.array(
            (rows["engagement"] >= LONG_VIEW_MINUTES).astype(np.float32)),
        "label_return": pa.array(returned.astype(np.float32)),
        "engagement_minutes": pa.array(rows["engagement"].astype(np.float32)),
        "p_click": pa.array(rows["p_click"].astype(np.float32)),
        "propensity": pa.array(rows["propensity"].astype(np.float32)),
        "slot_propensity": pa.array(rows["slot_propensity"].astype(np.float32)),
    })
    return pa.table(columns)


def schema_for_log(table: pa.Table, num_topics: int = 10, embedding_dim: int = 16) -> Schema:
    """The feature schema of a `simulate_creator_log` table (id vocabularies from the data)."""

    def vocab(column: str) -> int:
        return int(pc.max(table.column(column)).as_py()) + 1

    history_items = pc.list_flatten(table.column("history")).to_numpy()
    items = max(vocab("item_id"), int(history_items.max(initial=-1)) + 1)
    return Schema(
        features=[
            Feature(name="user_id", kind="sparse", vocab_size=vocab("user_id"),
                    embedding_dim=embedding_dim),
            Feature(name="item_id", kind="sparse", vocab_size=items, embedding_dim=embedding_dim),
            Feature(name="creator_id", kind="sparse", vocab_size=vocab("creator_id"),
                    embedding_dim=embedding_dim),
            Feature(name="item_topic", kind="sparse", vocab_size=num_topics,
                    embedding_dim=embedding_dim),
            Feature(name="history", kind="sequence", vocab_size=items,
                    embedding_dim=embedding_dim, table="item_id"),
            *[Feature(name=name, kind="dense") for name in DENSE],
        ],
        labels=["label_click", "label_long_view", "label_return"],
    )


def oracle_click_auc(table: pa.Table) -> float:
    """AUC of the true click probability against the logged clicks: the Bayes-optimal AUC."""
    return float(roc_auc_score(table.column("label_click").to_numpy(),
                               table.column("p_click").to_numpy()))


def write_creator_log(out: str | Path, cfg: LogConfig = LogConfig()) -> dict[str, dict[str, float]]:
    """Write train/valid/test Parquet, schema.yaml and oracle.json; return the oracle click AUCs.

    The split is time-ordered 8:1:1 over the rows, which are logged in (day, session) order: a
    model is validated and tested on later days than it trained on, as it would be deployed. Each
    cut moves to the next session boundary, so a slate never straddles two splits.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    table = simulate_creator_log(cfg)
    session = table.column("session_id").to_numpy()
    n_train, n_valid = (int(np.searchsorted(session, session[int(share * table.num_rows)]))
                        for share in (0.8, 0.9))
    bounds = {"train": (0, n_train), "valid": (n_train, n_valid), "test": (n_valid, table.num_rows)}
    oracle = {}
    for name, (start, stop) in bounds.items():
        part = table.slice(start, stop - start)
        pq.write_table(part, out / f"{name}.parquet")
        oracle[name] = {"auc": oracle_click_auc(part)}
    num_topics = cfg.world.get("num_topics", CreatorEcosystem.num_topics)
    schema_for_log(table, num_topics=num_topics).save(out)
    (out / "oracle.json").write_text(json.dumps({"oracle": oracle, "world": asdict(cfg)}, indent=2))
    return oracle
