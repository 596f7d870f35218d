"""The RecSim presets (LongTermSatisfaction, InterestEvolution) in the harness: independent users.

No creators, so nothing is shared but the policies' pooled tallies: a shard is a vectorised env
over its users, each seeded by its id, and a day is `world.steps_per_day` steps. A user whose
episode ends (InterestEvolution's time budget, LongTermSatisfaction's 60 steps) counts as churned
from then on; the env's autoreset of its slot is ignored.
"""

from __future__ import annotations

from typing import Any

import gymnasium as gym
import numpy as np

from recray.abtest.config import ExperimentConfig, world_params
from recray.abtest.policies import (
    KeyedRng,
    add_increments,
    build_policy,
    increments,
    snapshot,
)
from recray.simulators.streams import child_keys, keys_from_seeds

_USER_SEEDS = 1_000_003  # seeds of different experiments' users never overlap below 1M users


def _rows(tree: Any, rows: np.ndarray) -> Any:
    if isinstance(tree, dict):
        return {k: _rows(v, rows) for k, v in tree.items()}
    return tree[rows]


class RecSimShard:
    def __init__(self, cfg: ExperimentConfig, seed: int, user_ids: np.ndarray,
                 assignment: Any) -> None:
        self.cfg, self.user_ids = cfg, user_ids
        self.env = gym.make_vec(cfg.world.env, num_envs=len(user_ids),
                                vectorization_mode="vector_entry_point", **world_params(cfg))
        self.obs, self.info = self.env.reset(seed=[int(seed * _USER_SEEDS + u) for u in user_ids])
        self.policy_keys = child_keys(keys_from_seeds(np.array([seed]))[0], user_ids)
        local_arm = assignment.user_arm[user_ids]
        self.members = [np.flatnonzero(local_arm == a) for a in range(len(cfg.arms))]
        self.pre = [build_policy(cfg.arms[0], cfg) for _ in cfg.arms]
        self.live = [build_policy(arm, cfg) for arm in cfg.arms]
        self.churned = np.zeros(len(user_ids), bool)
        self.step_count = 0
        self.slate_size = int(self.env.single_action_space.shape[0])
        self._day_reset()

    def _day_reset(self) -> None:
        n = len(self.user_ids)
        self.active = (~self.churned).astype(np.int64)
        self.counts = {k: np.zeros(n, np.int64) for k in ("sessions", "impressions", "clicks")}
        self.minutes = np.zeros(n)

    def play_round(self, state: dict[str, Any], pooled: list | None,
                   creator_count: int) -> dict[str, Any]:
        day = self.step_count // self.cfg.world.steps_per_day
        policies = self.pre if day < self.cfg.pre_days else self.live
        for arm, policy in enumerate(policies):
            if pooled is not None:
                add_increments(policy, self.before[arm], pooled[arm])
        self.before = [snapshot(policy) for policy in policies]
        actions = np.tile(np.arange(self.slate_size), (len(self.user_ids), 1))
        for arm, policy in enumerate(policies):
            batch = self.members[arm]
            if len(batch):
                rng = KeyedRng(self.policy_keys[batch], self.step_count)
                actions[batch] = policy.act(_rows(self.obs, batch), rng, _rows(self.info, batch))
        obs, reward, terminated, truncated, info = self.env.step(actions)
        live = ~self.churned
        response = obs["response"]
        self.counts["sessions"] += live
        self.counts["impressions"] += live * self.slate_size
        self.counts["clicks"] += live * response["click"].sum(axis=1)
        self.minutes += np.where(live, reward, 0.0)
        done = terminated | truncated
        for arm, policy in enumerate(policies):
            batch = self.members[arm]
            if len(batch):
                policy.update(_rows(self.obs, batch), actions[batch], reward[batch],
                              _rows(obs, batch), done[batch])
        self.churned |= done
        self.obs, self.info = obs, info
        self.step_count += 1
        result = {"stats": None, "failures": [],
                  "pooled": [increments(p, b) for p, b in zip(policies, self.before, strict=True)]}
        if self.step_count % self.cfg.world.steps_per_day == 0:
            result["users"] = {"user": self.user_ids, "active": self.active, **self.counts,
                               "watch_minutes": self.minutes,
                               "churned": self.churned.astype(np.int64)}
            self._day_reset()
        return result


class RecSimHub:
    """Nothing shared but the clock; creator rows are zeros (these worlds have no creators)."""

    def __init__(self, cfg: ExperimentConfig) -> None:
        self.cfg, self.rows_per_day, self.round = cfg, cfg.world.steps_per_day, 0
        self.day = 0
        self.rows: list[dict[str, Any]] = []

    @property
    def rounds_per_day(self) -> int:
        return self.rows_per_day

    def state(self) -> dict[str, Any]:
        return {}

    def creator_count(self) -> int:
        return 0

    def summary(self) -> str:
        return "no creators"

    def apply(self, results: list[dict[str, Any]]) -> None:
        self.round += 1
        if self.round == self.rows_per_day:
            self.rows.extend({"arm": arm, "day": self.day - self.cfg.pre_days,
                              "active_creators": 0, "exits": 0, "exposure_gini": 0.0,
                              "coverage": 0.0, "novelty": 0.0} for arm in self.cfg.arm_names)
            self.round, self.day = 0, self.day + 1
