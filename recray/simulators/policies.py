"""Slate policies with one interface, batched over users: `act(obs, rng, info) -> [N, slate_size]`.

`obs` is a batched observation of a vectorised env (every array has a leading user axis); `info`
is its batched info, read only by oracle baselines (`quality`), never by the others. Learning
policies also take `update(obs, actions, reward, next_obs, done)` after every step.

What a policy may read differs by world; `make_policy(name, env_id, slate_size)` wires each
named policy to the right columns:

- `random`: a uniformly random slate.
- `popularity`: candidates ranked by how often their arm (topic cluster, clickbait decile,
  creator) was clicked so far, across all users.
- `myopic`: greedy on expected immediate engagement (LongTermSatisfaction: the most clickbait;
  InterestEvolution: the highest click probability from the observed interests).
- `kale` (LongTermSatisfaction only): the least clickbait.
- `quality`: quality-aware greedy, an oracle that ranks by the privileged `info["quality"]`.
- `thompson`: a Gaussian Thompson-sampling slate bandit over arms, per user, learning from the
  observed engagement.
- `exposure_aware`: a base score minus a penalty that grows with the exposure its creator already
  got, so that starved creators get shown (CreatorEcosystem).
- a path ending in `.pt`: a slate policy `recray rl` exported (`learned_policy.LearnedPolicy`).
- `ModelPolicy` / `model_policy(...)`: a `recray.models` model scoring CreatorEcosystem
  candidates from the columns of the logged data only (built from a schema and a model, so it
  is not a `make_policy` name).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import pyarrow as pa
    from torch import nn

    from recray.data.schema import Schema

Scores = Callable[[dict, dict | None], np.ndarray]
Arms = Callable[[dict], np.ndarray]
Feedback = Callable[[dict], np.ndarray]


def served_rows(obs: dict) -> np.ndarray:
    """Users whose slate was really shown this step (CreatorEcosystem marks idle users inactive)."""
    if "active" in obs:
        return np.flatnonzero(obs["active"][:, 0])
    return np.arange(len(obs["doc"]))


def top_k(scores: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """Indices of the k best candidates per row, best first; ties broken at random."""
    # Ranking by (score, random key) breaks ties uniformly without perturbing distinct scores.
    tiebreak = rng.random(scores.shape)
    order = np.lexsort((tiebreak, -scores), axis=-1)
    return order[:, :k].astype(np.int64)


class Policy:
    """A slate policy over a batch of users."""

    def __init__(self, slate_size: int) -> None:
        if slate_size < 1:
            raise ValueError(f"slate_size: expected >= 1, got {slate_size}")
        self.slate_size = slate_size

    def scores(self, obs: dict, rng: np.random.Generator, info: dict | None) -> np.ndarray:
        """`[N, num_candidates]` scores; higher is shown first."""
        raise NotImplementedError

    def act(self, obs: dict, rng: np.random.Generator, info: dict | None = None) -> np.ndarray:
        """`[N, slate_size]` int64 candidate indices, distinct within each row."""
        return top_k(self.scores(obs, rng, info), self.slate_size, rng)

    def update(self, obs: dict, actions: np.ndarray, reward: np.ndarray, next_obs: dict,
               done: np.ndarray) -> None:
        """Learn from one logged step (what was shown, and the response in `next_obs`)."""


class RandomPolicy(Policy):
    def scores(self, obs: dict, rng: np.random.Generator, info: dict | None) -> np.ndarray:
        return rng.random(obs["doc"].shape[:2])


class GreedyPolicy(Policy):
    """Top-k by a fixed scoring function of the observation (and, for oracles, the info)."""

    def __init__(self, slate_size: int, score: Scores, needs_info: bool = False) -> None:
        super().__init__(slate_size)
        self.score = score
        self.needs_info = needs_info

    def scores(self, obs: dict, rng: np.random.Generator, info: dict | None) -> np.ndarray:
        if self.needs_info and info is None:
            raise ValueError("info: this oracle policy reads privileged truth from info; pass it")
        return self.score(obs, info)


class PopularityPolicy(Policy):
    """Ranks candidates by the click count of their arm, pooled over all users."""

    def __init__(self, slate_size: int, arm: Arms, num_arms: int, feedback: Feedback) -> None:
        super().__init__(slate_size)
        self.arm, self.feedback = arm, feedback
        self.clicks = np.zeros(num_arms)

    def scores(self, obs: dict, rng: np.random.Generator, info: dict | None) -> np.ndarray:
        return self.clicks[self.arm(obs)]

    def update(self, obs: dict, actions: np.ndarray, reward: np.ndarray, next_obs: dict,
               done: np.ndarray) -> None:
        rows = served_rows(obs)
        shown = np.take_along_axis(self.arm(obs)[rows], actions[rows], axis=1)
        np.add.at(self.clicks, shown.ravel(), (self.feedback(next_obs)[rows] > 0).ravel())


class ThompsonSamplingPolicy(Policy):
    """Gaussian Thompson sampling per (user, arm): a slate of the k best sampled means.

    The posterior of an arm's mean feedback is Normal(sum / (n + prior_count), noise^2 /
    (n + prior_count)) around a prior mean; rows are forgotten when a user's episode ends.
    `learn_slots` limits learning to the top slots (LongTermSatisfaction consumes slot 0 only).
    """

    def __init__(self, slate_size: int, arm: Arms, num_arms: int, feedback: Feedback,
                 prior_mean: float = 0.0, prior_count: float = 1.0, noise: float = 1.0,
                 learn_slots: int | None = None) -> None:
        super().__init__(slate_size)
        self.arm, self.feedback, self.num_arms = arm, feedback, num_arms
        self.prior_mean, self.prior_count, self.noise = prior_mean, prior_count, noise
        self.learn_slots = learn_slots or slate_size
        self.counts: np.ndarray | None = None
        self.sums: np.ndarray | None = None

    def _ensure(self, num_users: int) -> None:
        if self.counts is None or len(self.counts) != num_users:
            self.counts = np.zeros((num_users, self.num_arms))
            self.sums = np.zeros((num_users, self.num_arms))

    def scores(self, obs: dict, rng: np.random.Generator, info: dict | None) -> np.ndarray:
        arms = self.arm(obs)
        self._ensure(len(arms))
        n = self.counts + self.prior_count
        mean = (self.sums + self.prior_count * self.prior_mean) / n
        sampled = mean + self.noise / np.sqrt(n) * rng.standard_normal(n.shape)
        return np.take_along_axis(sampled, arms, axis=1)

    def update(self, obs: dict, actions: np.ndarray, reward: np.ndarray, next_obs: dict,
               done: np.ndarray) -> None:
        arms = self.arm(obs)
        self._ensure(len(arms))
        rows = served_rows(obs)
        shown = np.take_along_axis(arms[rows], actions[rows], axis=1)[:, :self.learn_slots]
        feedback = self.feedback(next_obs)[rows, :self.learn_slots]
        users = np.broadcast_to(rows[:, None], shown.shape)
        np.add.at(self.counts, (users, shown), 1.0)
        np.add.at(self.sums, (users, shown), feedback)
        self.counts[done] = 0.0
        self.sums[done] = 0.0


class ExposureAwarePolicy(Policy):
    """Re-ranks a base score by the exposure each candidate's creator has had so far.

    score = base - strength * log1p(exposure of the creator / mean exposure): a creator shown
    less than average gets a boost, one shown more a penalty, so exposure spreads without ignoring
    relevance. Exposure is counted from this policy's own slates (logged data only).
    """

    def __init__(self, slate_size: int, base: Policy, group: Arms, num_groups: int,
                 strength: float = 1.0) -> None:
        super().__init__(slate_size)
        self.base, self.group, self.strength = base, group, strength
        self.exposure = np.zeros(num_groups)

    def scores(self, obs: dict, rng: np.random.Generator, info: dict | None) -> np.ndarray:
        base = self.base.scores(obs, rng, info)
        groups = self.group(obs)
        if len(self.exposure) <= groups.max(initial=-1):
            self.exposure = np.pad(self.exposure, (0, groups.max() + 1 - len(self.exposure)))
        relative = self.exposure / max(self.exposure.mean(), 1.0)
        return base - self.strength * np.log1p(relative[groups])

    def update(self, obs: dict, actions: np.ndarray, reward: np.ndarray, next_obs: dict,
               done: np.ndarray) -> None:
        self.base.update(obs, actions, reward, next_obs, done)
        rows = served_rows(obs)
        shown = np.take_along_axis(self.group(obs)[rows], actions[rows], axis=1).ravel()
        if len(self.exposure) <= shown.max(initial=-1):
            # Group ids (creators) keep arriving: grow the tally rather than cap it.
            self.exposure = np.pad(self.exposure, (0, shown.max() + 1 - len(self.exposure)))
        np.add.at(self.exposure, shown, 1.0)


# --- wiring per world -------------------------------------------------------------------------
def _lts_clickbait(obs: dict, info: dict | None = None) -> np.ndarray:
    return obs["doc"][:, :, 0].astype(np.float64)


def _lts_kale(obs: dict, info: dict | None = None) -> np.ndarray:
    return -_lts_clickbait(obs)


def _lts_decile(obs: dict) -> np.ndarray:
    return np.minimum((obs["doc"][:, :, 0] * 10).astype(np.int64), 9)


def _lts_engagement(obs: dict) -> np.ndarray:
    return obs["response"]["engagement"].astype(np.float64)


def _ie_click_score(obs: dict, info: dict | None = None) -> np.ndarray:
    # Proportional choice: P(click) grows with interest . topic; the no-click mass is shared.
    return np.einsum("nd,ncd->nc", obs["user"], obs["doc"]).astype(np.float64)


def _ie_quality(obs: dict, info: dict | None = None) -> np.ndarray:
    return np.asarray(info["quality"], dtype=np.float64)


def _ie_cluster(obs: dict) -> np.ndarray:
    return obs["doc"].argmax(axis=2)


def _ie_watch_time(obs: dict) -> np.ndarray:
    return obs["response"]["watch_time"].astype(np.float64)


def make_policy(name: str, env_id: str, slate_size: int, **kwargs: Any) -> Policy:
    """A named policy wired to the observation of `env_id` (see the module docstring)."""
    from recray.simulators import (
        CREATOR_ECOSYSTEM,
        INTEREST_EVOLUTION,
        LONG_TERM_SATISFACTION,
    )

    if name == "random":
        return RandomPolicy(slate_size)
    if name.endswith(".pt"):
        # A policy `recray rl` exported (runs/<run>/policy.pt); refused if trained on another env.
        from recray.simulators.learned_policy import LearnedPolicy

        learned = LearnedPolicy.load(name, env_id=env_id, explore=bool(kwargs.get("explore")))
        if learned.slate_size != slate_size:
            raise ValueError(f"slate_size: {name} fills slates of {learned.slate_size}, the world "
                             f"asks for {slate_size}")
        return learned
    if env_id == LONG_TERM_SATISFACTION:
        wiring = {
            "myopic": lambda: GreedyPolicy(slate_size, _lts_clickbait),
            "kale": lambda: GreedyPolicy(slate_size, _lts_kale),
            "popularity": lambda: PopularityPolicy(slate_size, _lts_decile, 10, _lts_engagement),
            "thompson": lambda: ThompsonSamplingPolicy(
                slate_size, _lts_decile, 10, _lts_engagement, **{
                    "prior_mean": 20.0, "noise": 20.0, "learn_slots": 1, **kwargs}),
        }
    elif env_id == INTEREST_EVOLUTION:
        wiring = {
            "myopic": lambda: GreedyPolicy(slate_size, _ie_click_score),
            "quality": lambda: GreedyPolicy(slate_size, _ie_quality, needs_info=True),
            "popularity": lambda: PopularityPolicy(slate_size, _ie_cluster,
                                                   kwargs.get("num_clusters", 20), _ie_watch_time),
            "thompson": lambda: ThompsonSamplingPolicy(
                slate_size, _ie_cluster, kwargs.get("num_clusters", 20), _ie_watch_time,
                prior_mean=2.0, noise=2.0),
        }
    elif env_id == CREATOR_ECOSYSTEM:
        from recray.simulators.creator_ecosystem import policy_wiring

        wiring = policy_wiring(slate_size, **kwargs)
    else:
        raise ValueError(f"env_id: no policy wiring for {env_id!r}")
    if name not in wiring:
        raise ValueError(f"name: {name!r} is not a policy for {env_id}; choose from "
                         f"{['random', *sorted(wiring)]}")
    return wiring[name]()


class ModelPolicy(Policy):
    """Ranks CreatorEcosystem candidates by a `recray.models` model's logit for one label.

    Each (user, candidate) pair becomes one row of the columns `simulate_creator_log` writes
    (ids, item topic, the public doc features, position 0, the user's click history), so a model
    trained on that log scores candidates from logged features only. The history is what this
    policy has logged itself from its own `update` calls: the observation carries only a topic
    histogram, and the simulator's latent state is off limits.
    """

    def __init__(self, slate_size: int, schema: Schema, model: nn.Module, label: str = "label_click",
                 num_topics: int = 10, history_length: int = 20) -> None:
        super().__init__(slate_size)
        if label not in schema.labels:
            raise ValueError(f"label: {label!r} is not a label of the schema; choose from "
                             f"{schema.labels}")
        self.schema, self.model = schema, model.eval()
        self.label_index = schema.labels.index(label)
        self.num_topics, self.history_length = num_topics, history_length
        self.history: np.ndarray | None = None  # [users, history_length] item ids, -1 = empty

    def _ensure(self, num_users: int) -> None:
        if self.history is None or len(self.history) != num_users:
            self.history = np.full((num_users, self.history_length), -1, dtype=np.int64)

    def _in_vocab(self, name: str, ids: np.ndarray) -> np.ndarray:
        """Ids of feature `name` mapped into its embedding table.

        Items, creators and users keep arriving after the log a model was trained on, so their
        ids run past the vocabulary; a non-negative modulo shares trained rows among the new ids
        (as `hash_buckets` features do) where the data loader would reject them.
        """
        return np.mod(ids, self.schema.feature(name).num_embeddings)

    def rows(self, obs: dict) -> pa.Table:
        """The `[N * num_candidates]` feature table of every (user, candidate) pair."""
        import pyarrow as pa

        users, candidates = obs["item_id"].shape
        self._ensure(users)
        doc = obs["doc"].reshape(users * candidates, -1)
        history = np.repeat(self.history, candidates, axis=0)
        mask = history >= 0
        offsets = np.concatenate([[0], np.cumsum(mask.sum(axis=1))]).astype(np.int32)
        ids = {
            "user_id": np.repeat(np.arange(users), candidates),
            "item_id": obs["item_id"].ravel(),
            "creator_id": obs["creator_id"].ravel(),
            "item_topic": doc[:, :self.num_topics].argmax(axis=1),
        }
        columns: dict[str, Any] = {}
        for feature in self.schema.features:
            name = feature.name
            if name in ids:
                columns[name] = pa.array(self._in_vocab(name, ids[name]), pa.int64())
            elif name == "history":
                values = self._in_vocab(feature.table or name, history[mask])
                columns[name] = pa.ListArray.from_arrays(pa.array(offsets),
                                                         pa.array(values, pa.int64()))
            elif name == "position":
                columns[name] = pa.array(np.zeros(len(doc), np.float32))
            elif name in ("clickbait", "log_clicks", "ctr", "age"):
                i = ("clickbait", "log_clicks", "ctr", "age").index(name)
                columns[name] = pa.array(doc[:, self.num_topics + i].astype(np.float32))
            else:
                raise ValueError(f"schema: feature {name!r} is not a logged CreatorEcosystem "
                                 f"column this policy can build")
        for label in self.schema.labels:  # the batch format carries labels; scoring ignores them
            columns[label] = pa.array(np.zeros(len(doc), np.float32))
        return pa.table(columns)

    def scores(self, obs: dict, rng: np.random.Generator, info: dict | None) -> np.ndarray:
        import torch

        from recray.data.jagged import to_batch

        batch = to_batch(self.rows(obs), self.schema, source="ModelPolicy")
        with torch.no_grad():
            logits = self.model(batch)[:, self.label_index]
        return logits.double().numpy().reshape(obs["item_id"].shape)

    def update(self, obs: dict, actions: np.ndarray, reward: np.ndarray, next_obs: dict,
               done: np.ndarray) -> None:
        self._ensure(len(actions))
        rows = served_rows(obs)
        click = next_obs["response"]["click"][rows].astype(bool)
        shown = np.take_along_axis(obs["item_id"][rows], actions[rows], axis=1)
        clicked_rows, slots = np.nonzero(click)
        users = rows[clicked_rows]
        # At most one click per session, so one shift per user keeps the newest item last.
        self.history[users] = np.concatenate(
            [self.history[users, 1:], shown[clicked_rows, slots][:, None]], axis=1)
        self.history[done] = -1


def model_policy(slate_size: int, schema: Schema, model_name: str, checkpoint: str | None = None,
                 label: str = "label_click", **hparams: Any) -> ModelPolicy:
    """A `ModelPolicy` over `recray.models.build(model_name, schema, **hparams)`.

    `checkpoint` is a recray checkpoint's `state.pt`, whose `"model"` entry is the state dict.
    """
    import torch

    from recray.models import build

    model = build(model_name, schema, **hparams)
    if checkpoint is not None:
        model.load_state_dict(torch.load(checkpoint, weights_only=True)["model"])
    return ModelPolicy(slate_size, schema, model, label=label)
