"""Users and creators together over days: retention and churn on one side, exits and entry on the other.

A day has up to `sessions_per_day` rounds. Each morning a user returns with a probability set by
yesterday's satisfaction (absent `churn_after_days` days in a row, a user has churned for good)
and has 1 to `sessions_per_day` sessions. In each session the platform ranks `num_candidates`
distinct items retrieved uniformly from the recent catalog; the user picks at most one slot by a
multinomial logit over latent interest, satiation, clickbait lure and position; a click yields
watch minutes driven by latent quality. Each evening creators see only their own statistics:
satisfaction follows their engagement, their topic mix moves toward what earned engagement, they
exit after `exit_after_dry_uploads` consecutive uploads without a click or when their satisfaction
is low, and empty creator slots fill with new entrants; then everybody uploads.

Information asymmetry: a policy sees public item features (topic, clickbait, logged clicks,
impressions, age), item and creator ids, and the user's own logged click history, never latent
interests, satiation, satisfaction or quality (those are in `info` / `world` for analysis).

Two forms share one `CreatorWorld`: the vectorised env serves every active user's session of a
round in one batched step (`num_envs` = users; inactive users' actions are ignored); the scalar env
serves one session per step, users in index order. World-level updates happen at round and day
ends only and randomness is keyed per user, creator and round, so both forms produce the same
sessions, responses and rewards for the same seed.

How episodes end. The horizon (`horizon_days`) truncates every episode: the world goes on, it is
only no longer observed. In the vectorised env a user who churns is `terminated` on the step
whose day-end made the churn final (a churned user never comes back, so nothing more can be
earned: the state is absorbing). All users share one world, so a churned user is not reset on
its own: it stays idle (inactive, zero reward, actions ignored) until the horizon, when the whole
world autoresets; `info["churned"]` marks it meanwhile. The scalar env's episode is the whole
world, so it is never terminated, only truncated at the horizon.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import gymnasium as gym
import numpy as np
from gymnasium.vector import AutoresetMode, VectorEnv
from gymnasium.vector.utils import batch_space

from recray.simulators.slate_env import SlateSpace, validate_slates
from recray.simulators.streams import (
    child_keys,
    keys_from_seeds,
    next_episode_keys,
    normals,
    uniforms,
)

# Streams, one per attribute so that no two attributes share a draw (a shared uniform would tie
# public features to hidden ones): per user per round, per user per day, per user, per creator,
# per creator per day, per item (keyed on its creator and upload step).
_CANDIDATES, _CANDIDATE_REDRAW, _CANDIDATE_ORDER, _CHOICE, _WATCH = 1, 2, 3, 4, 5
_RETURN, _SESSIONS, _DRIFT = 6, 7, 8
_INTERESTS, _ACTIVITY = 9, 10
_CREATOR_TOPICS, _CREATOR_CLICKBAIT, _CREATOR_QUALITY = 11, 12, 13
_ENTRY, _UPLOAD = 14, 15
_ITEM_TOPIC, _ITEM_CLICKBAIT, _ITEM_QUALITY = 16, 17, 18
MAX_UPLOADS_PER_DAY = 3
MAX_ENGAGEMENT = 1000.0


@dataclass(frozen=True)
class CreatorEcosystem:
    """World parameters; the defaults are small enough for tests."""

    num_users: int = 1000
    num_creators: int = 100
    num_topics: int = 10
    num_candidates: int = 20
    slate_size: int = 2
    sessions_per_day: int = 3
    horizon_days: int = 30
    item_lifetime_days: int = 7
    history_length: int = 20
    # users
    interest_scale: float = 1.0
    interest_drift: float = 0.05
    satiation_gain: float = 0.5
    satiation_decay: float = 0.5
    clickbait_lure: float = 2.0
    clickbait_regret: float = 2.0
    position_bias: float = 0.5
    no_click_utility: float = 1.0
    satisfaction_rate: float = 0.3
    no_click_satisfaction: float = -0.2
    return_bias: float = 2.0
    return_weight: float = 2.0
    churn_after_days: int = 3
    # creators
    initial_items: int = 5
    upload_rate: float = 1.0
    creator_adaptation: float = 0.2
    creator_satisfaction_rate: float = 0.3
    exit_after_dry_uploads: int = 5
    exit_satisfaction: float = 0.05
    entry_prob: float = 0.01
    # markets: users and creator slots split into this many separate markets (user id and slot
    # modulo `markets`); a session retrieves only its own market's items. 1 = one market. The
    # cluster-randomised A/B design randomises whole markets.
    markets: int = 1

    def __post_init__(self) -> None:
        if not 1 <= self.slate_size <= self.num_candidates:
            raise ValueError(f"slate_size: expected in [1, num_candidates={self.num_candidates}], "
                             f"got {self.slate_size}")
        for name in ("num_users", "num_creators", "num_topics", "sessions_per_day",
                     "horizon_days", "item_lifetime_days", "exit_after_dry_uploads", "markets"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: expected >= 1, got {getattr(self, name)}")
        if not 0 <= self.upload_rate <= MAX_UPLOADS_PER_DAY:
            raise ValueError(f"upload_rate: expected in [0, {MAX_UPLOADS_PER_DAY}] per day, got "
                             f"{self.upload_rate}")
        # Candidates are distinct items, and the seeded catalog is the smallest one there is.
        if self.num_creators < self.markets:
            raise ValueError(f"markets: expected <= num_creators={self.num_creators}, got "
                             f"{self.markets}")
        seeded = self.num_creators // self.markets * self.initial_items
        if self.num_candidates > seeded:
            raise ValueError(f"num_candidates: expected <= num_creators // markets * initial_items "
                             f"= {seeded} (the seeded catalog of a market), got "
                             f"{self.num_candidates}")

    @property
    def max_items(self) -> int:
        """Catalog ring size: enough for every creator's uploads over an item lifetime, twice."""
        return 2 * self.num_creators * max(self.initial_items,
                                           MAX_UPLOADS_PER_DAY * self.item_lifetime_days)

    @property
    def doc_features(self) -> int:
        return self.num_topics + 4

    @property
    def observation_space(self) -> gym.spaces.Dict:
        ids = gym.spaces.Box(0, np.iinfo(np.int64).max, (self.num_candidates,), np.int64)
        return gym.spaces.Dict({
            "doc": gym.spaces.Box(0.0, np.inf, (self.num_candidates, self.doc_features),
                                  np.float32),
            "item_id": ids,
            "creator_id": ids,
            "user": gym.spaces.Box(0.0, 1.0, (self.num_topics,), np.float32),
            "active": gym.spaces.MultiBinary(1),
            "response": gym.spaces.Dict({
                "click": gym.spaces.MultiBinary(self.slate_size),
                "engagement": gym.spaces.Box(0.0, MAX_ENGAGEMENT, (self.slate_size,), np.float32),
            }),
        })

    @property
    def action_space(self) -> SlateSpace:
        return SlateSpace(self.num_candidates, self.slate_size)


# --- pure dynamics ------------------------------------------------------------------------------
def choice_probabilities(utility: np.ndarray, no_click_utility: float) -> np.ndarray:
    """`[n, slate + 1]` multinomial logit; the last column is no click."""
    logits = np.concatenate([utility, np.full((len(utility), 1), no_click_utility)], axis=1)
    logits -= logits.max(axis=1, keepdims=True)
    weights = np.exp(logits)
    return weights / weights.sum(axis=1, keepdims=True)


def click_utility(interest: np.ndarray, satiation: np.ndarray, clickbait: np.ndarray,
                  p: CreatorEcosystem) -> np.ndarray:
    """What draws a click: interest, less satiation (novelty seeking), clickbait lure, position."""
    position = p.position_bias * np.arange(interest.shape[1])
    return p.interest_scale * interest - satiation + p.clickbait_lure * clickbait - position


def experienced_utility(interest: np.ndarray, quality: np.ndarray,
                        clickbait: np.ndarray, p: CreatorEcosystem) -> np.ndarray:
    """What a watched item is worth to the user afterwards: clickbait disappoints."""
    return 1.0 + quality + interest - p.clickbait_regret * clickbait


def return_probability(satisfaction: np.ndarray, p: CreatorEcosystem) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-(p.return_bias + p.return_weight * satisfaction)))


def effective_number(weights: np.ndarray) -> float:
    """exp(entropy) of a distribution given by non-negative weights: 1 .. len(weights)."""
    total = weights.sum()
    if total <= 0:
        return 0.0
    share = weights[weights > 0] / total
    return float(np.exp(-(share * np.log(share)).sum()))


def sample_without_replacement(picks: np.ndarray, order: np.ndarray, population: int) -> np.ndarray:
    """`[n, k]` distinct indices in [0, population) per row from two `[n, k]` uniform arrays.

    Floyd's algorithm (Bentley & Floyd 1987) draws a uniform k-subset with k draws and no
    rejection; sorting by the `order` uniforms then puts the subset in a uniform random order.
    """
    n, k = picks.shape
    chosen = np.empty((n, k), dtype=np.int64)
    for slot, j in enumerate(range(population - k, population)):
        t = (picks[:, slot] * (j + 1)).astype(np.int64)
        taken = (chosen[:, :slot] == t[:, None]).any(axis=1)
        chosen[:, slot] = np.where(taken, j, t)
    return np.take_along_axis(chosen, np.argsort(order, axis=1), axis=1)


def _categorical(weights: np.ndarray, u: np.ndarray) -> np.ndarray:
    """Row-wise inverse-CDF draws: `u` `[n, k]` uniforms -> `[n, k]` column indices of `weights`."""
    cdf = np.cumsum(weights, axis=1)
    cdf /= cdf[:, -1:]
    return np.minimum((u[:, :, None] > cdf[:, None, :]).sum(axis=2), weights.shape[1] - 1)


class CreatorWorld:
    """The state of one world and its updates; both env forms drive it the same way."""

    def __init__(self, params: CreatorEcosystem, key: np.ndarray,
                 user_ids: np.ndarray | None = None) -> None:
        """`user_ids` (default: all `num_users`) are the users this copy simulates: an A/B shard
        holds a slice of them, and since each user's draws are keyed on its id, the union of the
        shards' users behaves exactly like one world's (see `round_statistics`)."""
        p = self.p = params
        self.key = key
        self.day, self.round = 0, 0
        self.user_ids = np.arange(p.num_users) if user_ids is None else np.asarray(user_ids,
                                                                                 np.int64)
        num_users = len(self.user_ids)
        self.user_keys = child_keys(key[0], self.user_ids)
        zero = np.zeros(num_users, dtype=np.int64)
        # A few strong tastes per user: squared uniforms spread interests over [-1, 1], the range
        # the daily drift is clipped to.
        self.interests = 2.0 * uniforms(self.user_keys, zero, _INTERESTS, p.num_topics) ** 2 - 1.0
        self.activity = uniforms(self.user_keys, zero, _ACTIVITY, 1)[:, 0]
        self.satiation = np.zeros((num_users, p.num_topics))
        self.satisfaction = np.zeros(num_users)
        self.absent_days = np.zeros(num_users, dtype=np.int64)
        self.churned = np.zeros(num_users, dtype=bool)
        self.active_today = np.ones(num_users, dtype=bool)
        self.sessions_today = np.zeros(num_users, dtype=np.int64)
        # Logged per user: topic histogram of clicks, the last clicked items, the last response.
        self.topic_clicks = np.zeros((num_users, p.num_topics))
        self.history = np.full((num_users, p.history_length), -1, dtype=np.int64)
        self.last_click = np.zeros((num_users, p.slate_size), dtype=np.int8)
        self.last_engagement = np.zeros((num_users, p.slate_size), dtype=np.float32)

        m = p.num_creators
        self.creator_alive = np.zeros(m, dtype=bool)
        self.creator_id = np.full(m, -1, dtype=np.int64)
        self.creator_keys = np.zeros(m, dtype=np.uint64)
        self.topic_mix = np.zeros((m, p.num_topics))
        self.creator_quality = np.zeros(m)
        self.creator_clickbait = np.zeros(m)
        self.creator_satisfaction = np.zeros(m)
        self.dry_uploads = np.zeros(m, dtype=np.int64)
        self.exposure_today = np.zeros(m)
        self.exposure_yesterday = np.zeros(m)
        self.engagement_today = np.zeros(m)
        self.engagement_by_topic = np.zeros((m, p.num_topics))
        self.next_creator_id = 0
        self.exits = 0
        self.entries = 0

        # An item keeps its creator's id for life; the slot is where that creator's statistics
        # live while it stays (a newcomer in the slot is another creator).
        n = p.max_items
        self.item_slot = np.full(n, -1, dtype=np.int64)
        self.item_creator_id = np.full(n, -1, dtype=np.int64)
        self.item_topic = np.zeros(n, dtype=np.int64)
        self.item_quality = np.zeros(n)
        self.item_clickbait = np.zeros(n)
        self.item_day = np.full(n, -(10**9), dtype=np.int64)
        self.item_clicks = np.zeros(n)
        self.item_impressions = np.zeros(n)
        self.item_uid = np.full(n, -1, dtype=np.int64)
        self.next_item = 0
        self.next_uid = 0  # item ids are never reused, so logs can key on them

        self._enter(np.arange(m))
        # The seeded catalog: item `age` of each creator was uploaded on the evening of day
        # -1 - age % lifetime; negative draw steps keep its draws apart from daily uploads'.
        age = np.tile(np.arange(p.initial_items), m)
        self._upload(np.repeat(np.arange(m), p.initial_items), -1 - age % p.item_lifetime_days,
                     -1 - age)
        self._start_day()

    # --- creators ---------------------------------------------------------------------------
    def _enter(self, slots: np.ndarray) -> None:
        """New creators in `slots`: a topic niche, a quality, a clickbait style."""
        p = self.p
        gen = self.next_creator_id + np.arange(len(slots))
        keys = self.creator_keys[slots] = child_keys(self.key[0] ^ np.uint64(0xC0FFEE), gen)
        zero = np.zeros(len(slots), np.int64)
        mix = uniforms(keys, zero, _CREATOR_TOPICS, p.num_topics) ** 4  # one or two main topics
        self.topic_mix[slots] = mix / mix.sum(axis=1, keepdims=True)
        self.creator_quality[slots] = normals(keys, zero, _CREATOR_QUALITY, 1)[:, 0]
        self.creator_clickbait[slots] = uniforms(keys, zero, _CREATOR_CLICKBAIT, 1)[:, 0]
        self.creator_alive[slots] = True
        self.creator_id[slots] = gen
        self.creator_satisfaction[slots] = 0.5
        self.dry_uploads[slots] = 0
        self.next_creator_id += len(slots)
        self.entries += len(slots)

    def _upload(self, owners: np.ndarray, days: np.ndarray, steps: np.ndarray) -> None:
        """One item per entry of `owners` (slots), uploaded on `days`, drawn at creator `steps`."""
        if len(owners) == 0:
            return
        keys = self.creator_keys[owners]
        where = (self.next_item + np.arange(len(owners))) % self.p.max_items
        self.next_item = int((self.next_item + len(owners)) % self.p.max_items)
        self.item_slot[where] = owners
        self.item_creator_id[where] = self.creator_id[owners]
        self.item_uid[where] = self.next_uid + np.arange(len(owners))
        self.next_uid += len(owners)
        self.item_topic[where] = _categorical(self.topic_mix[owners],
                                              uniforms(keys, steps, _ITEM_TOPIC, 1))[:, 0]
        self.item_quality[where] = self.creator_quality[owners] + 0.5 * normals(
            keys, steps, _ITEM_QUALITY, 1)[:, 0]
        offset = uniforms(keys, steps, _ITEM_CLICKBAIT, 1)[:, 0] - 0.5
        self.item_clickbait[where] = np.clip(self.creator_clickbait[owners] + 0.2 * offset, 0.0, 1.0)
        self.item_day[where] = days
        self.item_clicks[where] = 0.0
        self.item_impressions[where] = 0.0

    def _creators_end_day(self) -> None:
        p = self.p
        alive = np.flatnonzero(self.creator_alive)
        # Dry uploads: items uploaded yesterday that nobody clicked by tonight.
        fresh = np.flatnonzero((self.item_day == self.day - 1) & self._owner_present())
        owner = self.item_slot[fresh]
        dry = np.bincount(owner, weights=self.item_clicks[fresh] == 0, minlength=p.num_creators)
        wet = np.bincount(owner, weights=self.item_clicks[fresh] > 0, minlength=p.num_creators)
        self.dry_uploads = np.where(wet > 0, 0, self.dry_uploads + dry.astype(np.int64))
        # Satisfaction: engagement relative to a creator's uploads, smoothed over days.
        reward = 1.0 - np.exp(-self.engagement_today / 10.0)
        rate = p.creator_satisfaction_rate
        self.creator_satisfaction = (1 - rate) * self.creator_satisfaction + rate * reward
        # Topic adaptation toward what earned engagement today.
        earned = self.engagement_by_topic[alive]
        total = earned.sum(axis=1, keepdims=True)
        target = np.where(total > 0, earned / np.maximum(total, 1e-12), self.topic_mix[alive])
        self.topic_mix[alive] = (1 - p.creator_adaptation) * self.topic_mix[alive] + (
            p.creator_adaptation * target)
        # Exits, then entry into empty slots, then uploads.
        leaving = self.creator_alive & ((self.dry_uploads >= p.exit_after_dry_uploads)
                                        | (self.creator_satisfaction < p.exit_satisfaction))
        self.creator_alive &= ~leaving
        self.exits += int(leaving.sum())
        empty = np.flatnonzero(~self.creator_alive)
        if len(empty):
            entry_u = uniforms(child_keys(self.key[0] ^ np.uint64(0xE7), empty),
                               np.full(len(empty), self.day, np.int64), _ENTRY, 1)[:, 0]
            self._enter(empty[entry_u < p.entry_prob])
        alive = np.flatnonzero(self.creator_alive)
        keys, steps = self.creator_keys[alive], np.full(len(alive), self.day, np.int64)
        u = uniforms(keys, steps, _UPLOAD, MAX_UPLOADS_PER_DAY)
        counts = (u < p.upload_rate / MAX_UPLOADS_PER_DAY).sum(axis=1)
        nth = np.arange(counts.sum()) - np.repeat(np.cumsum(counts) - counts, counts)
        self._upload(np.repeat(alive, counts), np.full(len(nth), self.day),
                     self.day * MAX_UPLOADS_PER_DAY + nth)
        self.exposure_yesterday = self.exposure_today.copy()
        self.exposure_today[:] = 0.0
        self.engagement_today[:] = 0.0
        self.engagement_by_topic[:] = 0.0

    # --- users ------------------------------------------------------------------------------
    def _start_day(self) -> None:
        p = self.p
        steps = np.full(len(self.user_ids), self.day, np.int64)
        if self.day > 0:
            back = uniforms(self.user_keys, steps, _RETURN, 1)[:, 0] < return_probability(
                self.satisfaction, p)
            self.active_today = back & ~self.churned
            self.absent_days = np.where(self.active_today, 0, self.absent_days + 1)
            self.churned |= self.absent_days >= p.churn_after_days
            self.interests += p.interest_drift * normals(self.user_keys, steps, _DRIFT,
                                                         p.num_topics)
            np.clip(self.interests, -1.0, 1.0, out=self.interests)
            self.satiation *= p.satiation_decay
        extra = uniforms(self.user_keys, steps, _SESSIONS, max(p.sessions_per_day - 1, 1))
        extra = (extra[:, :p.sessions_per_day - 1] < self.activity[:, None]).sum(axis=1)
        self.sessions_today = np.where(self.active_today, 1 + extra, 0)
        # An upload of the evening of day d is shown on days d + 1 .. d + lifetime.
        stored = self.item_uid >= 0
        recent = stored & (self.day - self.item_day <= p.item_lifetime_days)
        self.pools = [self._market_pool(stored, recent, m) for m in range(p.markets)]
        self.pool = self.pools[0] if p.markets == 1 else np.sort(np.concatenate(self.pools))

    def _market_pool(self, stored: np.ndarray, recent: np.ndarray, market: int) -> np.ndarray:
        if self.p.markets > 1:
            here = self.item_slot % self.p.markets == market
            stored, recent = stored & here, recent & here
        pool = np.flatnonzero(recent)
        if len(pool) < self.p.num_candidates:
            # A catalog never runs dry: short of recent uploads, the newest stored items serve.
            newest = np.flatnonzero(stored)[np.argsort(self.item_uid[stored])]
            pool = newest[-self.p.num_candidates:]
        return pool

    def round_users(self) -> np.ndarray:
        """Users with a session in the current round, in index order."""
        return np.flatnonzero(self.sessions_today > self.round)

    @property
    def counter(self) -> int:
        return self.day * self.p.sessions_per_day + self.round

    def candidates(self, users: np.ndarray) -> np.ndarray:
        """`[n, num_candidates]` distinct catalog rows retrieved uniformly for each user's session.

        A draw with replacement that repeats no row is a uniform subset in a uniform order; the
        few sessions whose draw repeats one are redrawn without replacement from fresh streams,
        so the mixture is uniform too, and most sessions cost one vectorised draw.
        """
        keys, steps = self.user_keys[users], np.full(len(users), self.counter, np.int64)
        if self.p.markets == 1:
            return self._retrieve(keys, steps, self.pool)
        market = self.user_ids[users] % self.p.markets
        rows = np.empty((len(users), self.p.num_candidates), np.int64)
        for m, pool in enumerate(self.pools):
            here = market == m
            rows[here] = self._retrieve(keys[here], steps[here], pool)
        return rows

    def _retrieve(self, keys: np.ndarray, steps: np.ndarray, pool: np.ndarray) -> np.ndarray:
        k, size = self.p.num_candidates, len(pool)
        picks = (uniforms(keys, steps, _CANDIDATES, k) * size).astype(np.int64)
        ordered = np.sort(picks, axis=1)
        again = np.flatnonzero((ordered[:, 1:] == ordered[:, :-1]).any(axis=1))
        if len(again):
            keys, steps = keys[again], steps[again]
            picks[again] = sample_without_replacement(
                uniforms(keys, steps, _CANDIDATE_REDRAW, k),
                uniforms(keys, steps, _CANDIDATE_ORDER, k), size)
        return pool[picks]

    def observe(self, users: np.ndarray, rows: np.ndarray) -> dict[str, Any]:
        """The public view of each user's candidates and the user's own logged history."""
        p = self.p
        if rows.size > p.max_items:
            # Many sessions (the A/B harness, large vector envs): every catalog row's features
            # once, then one gather of whole rows; the same values, several times faster.
            doc = self._public_features(np.arange(p.max_items))[rows]
        else:
            doc = self._public_features(rows)
        history = self.topic_clicks[users]
        return {
            "doc": doc,
            "item_id": self.item_uid[rows],
            "creator_id": self.item_creator_id[rows],
            "user": (history / np.maximum(history.sum(axis=1, keepdims=True), 1.0)).astype(
                np.float32),
            "active": (self.sessions_today[users] > self.round).astype(np.int8)[:, None],
            "response": {"click": self.last_click[users].copy(),
                         "engagement": self.last_engagement[users].copy()},
        }

    def _public_features(self, rows: np.ndarray) -> np.ndarray:
        """`[..., num_topics + 4]` float32: topic one-hot, clickbait, log1p(clicks), smoothed
        CTR, age in lifetimes, for catalog `rows` of any shape."""
        p = self.p
        doc = np.empty((*rows.shape, p.num_topics + 4), dtype=np.float32)
        doc[..., :p.num_topics] = np.eye(p.num_topics, dtype=np.float32)[self.item_topic[rows]]
        clicks, shown = self.item_clicks[rows], self.item_impressions[rows]
        doc[..., p.num_topics] = self.item_clickbait[rows]
        doc[..., p.num_topics + 1] = np.log1p(clicks)
        doc[..., p.num_topics + 2] = (clicks + 1) / (shown + 10)
        doc[..., p.num_topics + 3] = (self.day - self.item_day[rows]) / p.item_lifetime_days
        return doc

    def serve(self, users: np.ndarray, rows: np.ndarray, slates: np.ndarray) -> dict[str, np.ndarray]:
        """One session for each of `users`: choice, watch, and the user's own state updates."""
        p = self.p
        n = len(users)
        steps = np.full(n, self.counter, np.int64)
        keys = self.user_keys[users]
        shown = np.take_along_axis(rows, slates, axis=1)
        topic = self.item_topic[shown]
        interest = np.take_along_axis(self.interests[users], topic, axis=1)
        satiation = np.take_along_axis(self.satiation[users], topic, axis=1)
        probs = choice_probabilities(
            click_utility(interest, satiation, self.item_clickbait[shown], p), p.no_click_utility)
        u = uniforms(keys, steps, _CHOICE, 1)
        choice = (u > np.cumsum(probs, axis=1)[:, :-1]).sum(axis=1)
        clicked = choice < p.slate_size
        slot = np.minimum(choice, p.slate_size - 1)
        who = np.arange(n)
        item = shown[who, slot]
        z = normals(keys, steps, _WATCH, 1)[:, 0]
        minutes = np.exp(1.0 + 0.5 * self.item_quality[item] + 0.5 * interest[who, slot]
                         + 0.3 * z)
        engagement = np.where(clicked, np.minimum(minutes, MAX_ENGAGEMENT), 0.0)
        utility = np.where(clicked, experienced_utility(interest[who, slot], self.item_quality[item],
                                                        self.item_clickbait[item], p),
                           p.no_click_satisfaction)
        rate = p.satisfaction_rate
        self.satisfaction[users] = (1 - rate) * self.satisfaction[users] + rate * utility
        c_users, c_topic = users[clicked], topic[who, slot][clicked]
        self.satiation[c_users, c_topic] += p.satiation_gain
        self.topic_clicks[c_users, c_topic] += 1.0
        self.history[c_users] = np.concatenate(
            [self.history[c_users, 1:], self.item_uid[item[clicked]][:, None]], axis=1)
        click = np.zeros((n, p.slate_size), dtype=np.int8)
        click[who[clicked], slot[clicked]] = 1
        self.last_click[users] = click
        self.last_engagement[users] = click * engagement[:, None].astype(np.float32)
        return {"users": users, "shown": shown, "click": click, "engagement": engagement,
                "p_click": probs[:, :-1]}

    def end_round(self, log: dict[str, np.ndarray]) -> None:
        """World-level updates from every session of the round: public counts, creator stats."""
        self.apply_round(self.round_statistics(log))

    # The catalog arrays a user-side copy of the world reads (candidates, observation, choice).
    ITEM_FIELDS = ("item_slot", "item_creator_id", "item_topic", "item_quality", "item_clickbait",
                   "item_day", "item_clicks", "item_impressions", "item_uid")

    def round_statistics(self, log: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """What a round's sessions tell the shared world: impressions and clicks per catalog row
        (integer counts, so sums over shards are exact in any order) and every click's row and
        watch minutes in the log's user order (float sums depend on order, so shards' lists are
        concatenated in user order, never pre-summed: see `merge_round_statistics`)."""
        shown, click = log["shown"].ravel(), log["click"].ravel().astype(bool)
        n = self.p.max_items
        return {"impressions": np.bincount(shown, minlength=n),
                "clicks": np.bincount(shown[click], minlength=n),
                "clicked_rows": shown[click],
                "watched": np.repeat(log["engagement"], self.p.slate_size)[click]}

    @staticmethod
    def merge_round_statistics(parts: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
        """One round's statistics from shards holding consecutive user ranges, in user order."""
        return {"impressions": sum(part["impressions"] for part in parts),
                "clicks": sum(part["clicks"] for part in parts),
                "clicked_rows": np.concatenate([part["clicked_rows"] for part in parts]),
                "watched": np.concatenate([part["watched"] for part in parts])}

    def apply_round(self, stats: dict[str, np.ndarray]) -> None:
        """Public counts and creator statistics from a round's (merged) statistics, then the next
        round, and at a day's end the creators' evening (exits, entry, uploads)."""
        self.item_impressions += stats["impressions"]
        self.item_clicks += stats["clicks"]
        # A departed creator's items stay in the catalog, but its statistics leave with it.
        shown = np.flatnonzero(stats["impressions"])
        shown = shown[self._owner_present(shown)]
        np.add.at(self.exposure_today, self.item_slot[shown],
                  stats["impressions"][shown].astype(float))
        clicked = stats["clicked_rows"]
        credited = self._owner_present(clicked)
        clicked, watched = clicked[credited], stats["watched"][credited]
        owner = self.item_slot[clicked]
        np.add.at(self.engagement_today, owner, watched)
        np.add.at(self.engagement_by_topic, (owner, self.item_topic[clicked]), watched)
        self.round += 1
        if self.round == self.p.sessions_per_day:
            self._creators_end_day()
            self._next_day()

    def _next_day(self) -> None:
        self.round = 0
        self.day += 1
        self._start_day()

    def shared_state(self) -> dict[str, Any]:
        """The catalog as the shared world holds it after `apply_round`, for user-side copies."""
        return {"day": self.day, "round": self.round,
                **{name: getattr(self, name) for name in self.ITEM_FIELDS}}

    def load_shared_state(self, state: dict[str, Any]) -> None:
        """A user-side copy takes the shared catalog, then starts its users' day if one began.

        Users never write the catalog, so the arrays are read, not copied."""
        for name in self.ITEM_FIELDS:
            setattr(self, name, state[name])
        if state["day"] != self.day:
            self._next_day()
        else:
            self.round = state["round"]

    def _owner_present(self, rows: np.ndarray | slice = slice(None)) -> np.ndarray:
        """Whether each catalog row's creator still holds the slot it uploaded from."""
        slot = self.item_slot[rows]
        return (slot >= 0) & (self.creator_id[slot] == self.item_creator_id[rows])

    @property
    def done(self) -> bool:
        return self.day >= self.p.horizon_days

    def metrics(self) -> dict[str, float]:
        """Ecosystem health for analysis (privileged: an A/B harness may read it, a policy not)."""
        return {
            "day": self.day,
            "active_creators": int(self.creator_alive.sum()),
            "creator_exits": self.exits,
            "creator_entries": self.entries - self.p.num_creators,
            # The effective number of creators behind the recent catalog (independent sources).
            "catalog_diversity": effective_number(np.unique(
                self.item_creator_id[self.pool], return_counts=True)[1].astype(float)),
            # Supply by topic: the effective number of topics the living creators produce.
            "topic_diversity": effective_number(self.topic_mix[self.creator_alive].sum(axis=0)),
            # Demand side: the effective number of creators sharing yesterday's exposure.
            "exposure_diversity": effective_number(self.exposure_yesterday),
            "daily_active_users": int(self.active_today.sum()),
            "retained_users": int((~self.churned).sum()),
            "mean_user_satisfaction": float(self.satisfaction.mean()),
        }

    def info(self, users: np.ndarray) -> dict[str, np.ndarray]:
        return {"satisfaction": self.satisfaction[users].copy(),
                "churned": self.churned[users].copy()}


def _empty_log(p: CreatorEcosystem) -> dict[str, np.ndarray]:
    return {"users": np.zeros(0, np.int64), "shown": np.zeros((0, p.slate_size), np.int64),
            "click": np.zeros((0, p.slate_size), np.int8), "engagement": np.zeros(0),
            "p_click": np.zeros((0, p.slate_size))}


def _concat_logs(logs: list[dict[str, np.ndarray]], p: CreatorEcosystem) -> dict[str, np.ndarray]:
    if not logs:
        return _empty_log(p)
    return {k: np.concatenate([log[k] for log in logs]) for k in logs[0]}


def _world_key(seed: int | None, previous: np.ndarray | None, draw: Any) -> np.ndarray:
    if seed is not None:
        return keys_from_seeds(np.array([seed]))
    if previous is not None:
        return next_episode_keys(previous)
    return draw()


class CreatorEcosystemEnv(gym.Env):
    """The scalar env: one step serves one session; users take turns in index order each round."""

    metadata = {"render_modes": []}

    def __init__(self, render_mode: str | None = None, **params: Any) -> None:
        self.params = CreatorEcosystem(**params)
        self.render_mode = render_mode
        self.observation_space = self.params.observation_space
        self.action_space = self.params.action_space
        self._key: np.ndarray | None = None
        self.world: CreatorWorld | None = None

    def reset(self, *, seed: int | None = None, options: dict | None = None) -> tuple[dict, dict]:
        super().reset(seed=seed)
        self._key = _world_key(seed, self._key, lambda: self.np_random.integers(
            0, 2**63, size=1, dtype=np.int64).astype(np.uint64))
        self.world = CreatorWorld(self.params, self._key)
        self._logs: list[dict[str, np.ndarray]] = []
        self._queue = self.world.round_users()
        self._advance()
        return self._observe()

    def _advance(self) -> None:
        """Close rounds until one has a user waiting (or the horizon is reached)."""
        world = self.world
        while len(self._queue) == 0 and not world.done:
            world.end_round(_concat_logs(self._logs, self.params))
            self._logs = []
            self._queue = world.round_users()
        if len(self._queue):
            self._user = self._queue[:1]
            self._rows = world.candidates(self._user)

    def _observe(self) -> tuple[dict, dict]:
        obs = self.world.observe(self._user, self._rows)
        info = self.world.info(self._user)
        return ({k: (v[0] if not isinstance(v, dict) else {a: b[0] for a, b in v.items()})
                 for k, v in obs.items()},
                {"user": int(self._user[0]), "day": self.world.day,
                 **{k: v[0] for k, v in info.items()}})

    def step(self, action: Any) -> tuple[dict, float, bool, bool, dict]:
        if self.world is None:
            raise RuntimeError("step() before reset()")
        if self.world.done:
            raise RuntimeError("step() after the horizon: call reset()")
        slates = validate_slates(np.asarray(action)[None], self.params.num_candidates,
                                 self.params.slate_size)
        log = self.world.serve(self._user, self._rows, slates)
        self._logs.append(log)
        self._queue = self._queue[1:]
        self._advance()
        obs, info = self._observe()
        info["p_click"] = log["p_click"][0]
        return obs, float(log["engagement"][0]), False, self.world.done, info


class CreatorEcosystemVectorEnv(VectorEnv):
    """One world, `num_envs` users: a step serves every active user's session of one round."""

    metadata = {"render_modes": [], "autoreset_mode": AutoresetMode.NEXT_STEP}

    def __init__(self, num_envs: int = 1000, render_mode: str | None = None,
                 **params: Any) -> None:
        params.setdefault("num_users", num_envs)
        if params["num_users"] != num_envs:
            raise ValueError(f"num_users: the vectorised env has one slot per user, so num_users "
                             f"({params['num_users']}) must equal num_envs ({num_envs})")
        self.params = CreatorEcosystem(**params)
        self.num_envs = num_envs
        self.render_mode = render_mode
        self.single_observation_space = self.params.observation_space
        self.single_action_space = self.params.action_space
        self.observation_space = batch_space(self.single_observation_space, num_envs)
        self.action_space = batch_space(self.single_action_space, num_envs)
        self._key: np.ndarray | None = None
        self.world: CreatorWorld | None = None
        self._everyone = np.arange(num_envs)

    def reset(self, *, seed: int | None = None, options: dict | None = None) -> tuple[dict, dict]:
        super().reset(seed=seed)
        self._key = _world_key(seed, self._key, lambda: self.np_random.integers(
            0, 2**63, size=1, dtype=np.int64).astype(np.uint64))
        self.world = CreatorWorld(self.params, self._key)
        self._truncated = False
        return self._observe()

    def _observe(self) -> tuple[dict, dict]:
        self._rows = self.world.candidates(self._everyone)
        info = self.world.info(self._everyone)
        info["day"] = np.full(self.num_envs, self.world.day)
        for key in list(info):
            info[f"_{key}"] = np.ones(self.num_envs, dtype=bool)
        return self.world.observe(self._everyone, self._rows), info

    def step(self, actions: Any) -> tuple[dict, np.ndarray, np.ndarray, np.ndarray, dict]:
        if self.world is None:
            raise RuntimeError("step() before reset()")
        if self._truncated:
            # Next-step autoreset: the horizon ended every user's episode; a new world starts.
            obs, info = self.reset()
            zeros = np.zeros(self.num_envs, dtype=bool)
            return obs, np.zeros(self.num_envs), zeros, zeros.copy(), info
        actions = np.asarray(actions)
        if actions.ndim != 2 or actions.shape[0] != self.num_envs:
            raise ValueError(f"action: expected shape [num_envs={self.num_envs}, slate_size="
                             f"{self.params.slate_size}], got shape {list(actions.shape)}")
        users = self.world.round_users()
        # Inactive users' actions are ignored, as an autoresetting sub-env's would be.
        slates = validate_slates(actions[users], self.params.num_candidates, self.params.slate_size)
        log = self.world.serve(users, self._rows[users], slates)
        churned_before = self.world.churned.copy()
        self.world.end_round(log)
        reward = np.zeros(self.num_envs)
        reward[users] = log["engagement"]
        self._truncated = self.world.done
        obs, info = self._observe()
        p_click = np.zeros((self.num_envs, self.params.slate_size))
        p_click[users] = log["p_click"]
        info["p_click"], info["_p_click"] = p_click, np.ones(self.num_envs, dtype=bool)
        terminated = self.world.churned & ~churned_before
        return obs, reward, terminated, np.full(self.num_envs, self._truncated), info


def make_env(render_mode: str | None = None, **params: Any) -> CreatorEcosystemEnv:
    """`gym.make("recray/CreatorEcosystem-v0", **params)` entry point."""
    return CreatorEcosystemEnv(render_mode=render_mode, **params)


def make_vector_env(num_envs: int = 1000, render_mode: str | None = None,
                    **params: Any) -> CreatorEcosystemVectorEnv:
    """`gym.make_vec(..., vectorization_mode="vector_entry_point")` entry point."""
    return CreatorEcosystemVectorEnv(num_envs=num_envs, render_mode=render_mode, **params)


# --- policy wiring (public features only) ---------------------------------------------------------
def _popularity(obs: dict, info: dict | None = None) -> np.ndarray:
    return obs["doc"][:, :, -3].astype(np.float64)  # log1p(logged clicks)


def _expected_engagement(obs: dict, info: dict | None = None) -> np.ndarray:
    """Smoothed logged CTR, tilted to the topics this user clicked before."""
    topics = obs["doc"][:, :, : obs["user"].shape[1]]
    affinity = np.einsum("nd,ncd->nc", obs["user"], topics)
    return np.log(obs["doc"][:, :, -2].astype(np.float64)) + np.log(0.2 + affinity)


def _topic(obs: dict) -> np.ndarray:
    return obs["doc"][:, :, : obs["user"].shape[1]].argmax(axis=2)


def _creator(obs: dict) -> np.ndarray:
    return obs["creator_id"]


def _engagement(obs: dict) -> np.ndarray:
    return obs["response"]["engagement"].astype(np.float64)


def _tilted(weight: float) -> Any:
    """Expected engagement tilted toward (weight > 0) or away from (< 0) clickbait."""

    def score(obs: dict, info: dict | None = None) -> np.ndarray:
        return _expected_engagement(obs) + weight * obs["doc"][:, :, -4].astype(np.float64)

    return score


def policy_wiring(slate_size: int, num_topics: int = 10, strength: float = 1.0,
                  clickbait_weight: float = 2.0, **_: Any) -> dict[str, Any]:
    """Named policies for CreatorEcosystem, reading public features and logged data only.

    `clickbait` and `kale` are `myopic` tilted by +/- `clickbait_weight` times the clickbait score,
    so that they differ in clickbait, not in relevance.
    """
    from recray.simulators import policies as pol

    return {
        "myopic": lambda: pol.GreedyPolicy(slate_size, _expected_engagement),
        "popularity": lambda: pol.GreedyPolicy(slate_size, _popularity),
        "clickbait": lambda: pol.GreedyPolicy(slate_size, _tilted(clickbait_weight)),
        "kale": lambda: pol.GreedyPolicy(slate_size, _tilted(-clickbait_weight)),
        "thompson": lambda: pol.ThompsonSamplingPolicy(slate_size, _topic, num_topics,
                                                       _engagement, prior_mean=2.0, noise=2.0),
        "exposure_aware": lambda: pol.ExposureAwarePolicy(
            slate_size, pol.GreedyPolicy(slate_size, _expected_engagement), _creator, 1,
            strength=strength),
    }
