"""An arm's slate policy in the harness: built-in, trained run folder or HTTP endpoint, drawing
randomness per user so that a user's slates never depend on which shard serves it."""

from __future__ import annotations

from typing import Any

import numpy as np

from recray.abtest.config import Arm, ExperimentConfig, slate_size
from recray.simulators.policies import (
    ExposureAwarePolicy,
    ModelPolicy,
    Policy,
    PopularityPolicy,
    ThompsonSamplingPolicy,
    make_policy,
    top_k,
)
from recray.simulators.streams import normals, uniforms

_POLICY_STREAM = 1000  # above the worlds' own stream numbers


class KeyedRng:
    """The part of `np.random.Generator` the policies use, keyed on (user, round, call).

    A shared generator's draws for user i depend on how many users came before it in the batch,
    so a user's tie-breaks (and Thompson samples) would change with the sharding; counter-based
    streams make them a function of the user's own key only.
    """

    def __init__(self, keys: np.ndarray, step: int) -> None:
        self.keys, self.steps, self.calls = keys, np.full(len(keys), step, np.int64), 0

    def _draw(self, size: Any, draw: Any) -> np.ndarray:
        size = tuple(np.atleast_1d(size))
        if size[0] != len(self.keys):
            raise ValueError(f"KeyedRng: draws come one row per user ({len(self.keys)}), "
                             f"got shape {size}")
        self.calls += 1
        width = int(np.prod(size[1:], dtype=np.int64))
        return draw(self.keys, self.steps, _POLICY_STREAM + self.calls, max(width, 1))[
            :, :width].reshape(size)

    def random(self, size: Any = None) -> np.ndarray:
        return self._draw(size, uniforms)

    def standard_normal(self, size: Any = None) -> np.ndarray:
        return self._draw(size, normals)


def build_policy(arm: Arm, cfg: ExperimentConfig) -> Policy:
    """The arm's policy, fresh (one per shard, per arm, per period)."""
    size = slate_size(cfg)
    if arm.policy is not None:
        return make_policy(arm.policy, cfg.world.env, size, **arm.params)
    if arm.model is not None:
        # A run folder is loaded by the platform's loader (torch only, no Ray): the one way a
        # trained model is read, shared with `recray serve`.
        from recray.platform.run_folder import load_run_folder

        run = load_run_folder(arm.model.run_dir)
        return ModelPolicy(size, run.schema, run.model, label=arm.model.label,
                           num_topics=int(cfg.world.params.get("num_topics", 10)))
    from recray.abtest.http_policy import HttpPolicy

    return HttpPolicy(size, arm.http)


def has_user_state(policy: Policy) -> bool:
    """Policies that keep a row per user (by batch position) must see all their users every
    round; the others are shown only the users with a session, which is much cheaper (a model
    policy's history is lent row by row instead: `UserShard._user_rows`)."""
    if isinstance(policy, ExposureAwarePolicy):
        return has_user_state(policy.base)
    if isinstance(policy, CreatorSplitPolicy):
        return any(has_user_state(p) for p in policy.policies)
    return isinstance(policy, ThompsonSamplingPolicy)


def pooled_arrays(policy: Policy) -> list[tuple[Any, str]]:
    """(object, attribute) of the state a policy pools over all its users: synchronised between
    shards after every round, like the creators' statistics (they are click and exposure counts,
    so summing the shards' increments is exact in any order)."""
    found: list[tuple[Any, str]] = []
    if isinstance(policy, PopularityPolicy):
        found.append((policy, "clicks"))
    if isinstance(policy, ExposureAwarePolicy):
        found.append((policy, "exposure"))
        found.extend(pooled_arrays(policy.base))
    if isinstance(policy, CreatorSplitPolicy):
        for part in policy.policies:
            found.extend(pooled_arrays(part))
    return found


def pad_pooled(policy: Policy, length: int) -> None:
    """Grow creator-indexed tallies to `length` (every creator id so far) before scoring: the
    exposure-aware score divides by the tally's mean, which must not depend on which creators a
    shard's users happened to see."""
    for owner, name in pooled_arrays(policy):
        if isinstance(owner, ExposureAwarePolicy) and name == "exposure":
            values = getattr(owner, name)
            if len(values) < length:
                setattr(owner, name, np.pad(values, (0, length - len(values))))


def snapshot(policy: Policy) -> list[np.ndarray]:
    return [getattr(owner, name).copy() for owner, name in pooled_arrays(policy)]


def increments(policy: Policy, before: list[np.ndarray]) -> list[np.ndarray]:
    now = [getattr(owner, name) for owner, name in pooled_arrays(policy)]
    return [value - np.pad(old, (0, len(value) - len(old))) for value, old in zip(now, before,
                                                                                    strict=True)]


def add_increments(policy: Policy, before: list[np.ndarray], total: list[np.ndarray]) -> None:
    """Pooled state = the state before the round + every shard's increments."""
    for (owner, name), old, inc in zip(pooled_arrays(policy), before, total, strict=True):
        length = max(len(old), len(inc))
        setattr(owner, name, np.pad(old, (0, length - len(old))) + np.pad(inc, (0, length - len(inc))))


def sum_increments(parts: list[list[np.ndarray]]) -> list[np.ndarray]:
    total: list[np.ndarray] = []
    for arrays in zip(*parts, strict=True):
        length = max(len(a) for a in arrays)
        total.append(sum(np.pad(a, (0, length - len(a))) for a in arrays))
    return total


class CreatorSplitPolicy(Policy):
    """Creator-side randomisation: each candidate is ranked by the policy of its creator's arm.

    Scores of different policies are on different scales, so each policy's scores are turned
    into within-session ranks (0 = worst, 1 = best) before a candidate takes its creator arm's.
    """

    def __init__(self, slate_size: int, policies: list[Policy], creator_arm: Any) -> None:
        super().__init__(slate_size)
        self.policies, self.creator_arm = policies, creator_arm

    def scores(self, obs: dict, rng: Any, info: dict | None) -> np.ndarray:
        arm = self.creator_arm(obs["creator_id"])
        mixed = np.zeros(arm.shape)
        width = max(arm.shape[1] - 1, 1)
        for i, policy in enumerate(self.policies):
            rank = np.argsort(np.argsort(policy.scores(obs, rng, info), axis=1), axis=1) / width
            mixed = np.where(arm == i, rank, mixed)
        return mixed

    def act(self, obs: dict, rng: Any, info: dict | None = None) -> np.ndarray:
        return top_k(self.scores(obs, rng, info), self.slate_size, rng)

    def update(self, obs: dict, actions: np.ndarray, reward: np.ndarray, next_obs: dict,
               done: np.ndarray) -> None:
        for policy in self.policies:
            policy.update(obs, actions, reward, next_obs, done)
