"""The A/B harness without Ray: user shards over one shared creator world, stepped bulk-synchronously.

A simulated day has `sessions_per_day` rounds. In a round every shard serves its users' sessions
with their arms' policies and returns the round's statistics: impressions and clicks per catalog
row (integer counts) and each click's row and watch minutes (in user order). The hub (the one
authoritative copy of creators and catalog) merges them, applies them, and at the day's end runs
the creators' evening (exits, entry, uploads); the new catalog goes back to the shards.

Why per round and not only per day: the policies rank by public item statistics (logged clicks,
impressions) that the unsharded world updates after every round. Freezing them per day would make
the harness's world differ from the gym env's; syncing per round costs a few small messages and
keeps one world's dynamics exactly. Creators still change state once per day, at the sync that
closes the day. Each user's randomness (world and policy) is keyed on its id, integer sums are
exact and float sums are taken in user order, so 1 shard and N shards give identical results.

`Experiment` drives shards through a `call(method, args_per_shard) -> results` function: a plain
loop here, Ray actors in `recray.platform.abtest`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from recray.abtest.assignment import assign_arms
from recray.abtest.config import (
    CREATOR_METRICS,
    USER_METRICS,
    ExperimentConfig,
    validate,
    world_params,
)
from recray.abtest.policies import (
    CreatorSplitPolicy,
    KeyedRng,
    add_increments,
    build_policy,
    has_user_state,
    increments,
    pad_pooled,
    snapshot,
    sum_increments,
)
from recray.abtest.result import ExperimentResult
from recray.simulators import CREATOR_ECOSYSTEM
from recray.simulators.creator_ecosystem import CreatorEcosystem, CreatorWorld, _empty_log
from recray.simulators.policies import ModelPolicy
from recray.simulators.slate_env import validate_slates
from recray.simulators.streams import child_keys, keys_from_seeds

_POLICY_KEY = np.uint64(0x5EED_AB7E_57)
Call = Callable[[str, list[tuple]], list[Any]]


def world_key(seed: int) -> np.ndarray:
    return keys_from_seeds(np.array([seed]))


def shard_ranges(users: int, shards: int) -> list[np.ndarray]:
    """Consecutive user-id ranges, as equal as possible (consecutive: merged in user order)."""
    return [np.asarray(part, np.int64) for part in np.array_split(np.arange(users), shards)]


@dataclass
class Assignment:
    """Who is in which arm: per user (experiment-period policy), and per creator where creators
    are randomised. `forced` runs the whole world under one arm (the GTE worlds)."""

    design: str
    user_arm: np.ndarray       # [users] arm index of each user's traffic
    user_unit: np.ndarray      # [users] randomisation unit id
    market_arm: np.ndarray | None
    salt: str
    shares: list[float]
    forced: int | None = None

    def creator_arm(self, creator_ids: np.ndarray, slots: np.ndarray | None = None) -> np.ndarray:
        """Arm of creators: by hash of the creator id (creator design), by market (cluster)."""
        if self.forced is not None:
            return np.full(np.shape(creator_ids), self.forced)
        if self.design == "cluster":
            return self.market_arm[np.asarray(slots) % len(self.market_arm)]
        flat = np.asarray(creator_ids).ravel()
        unique, inverse = np.unique(flat, return_inverse=True)
        return assign_arms(unique, self.salt, self.shares)[inverse].reshape(np.shape(creator_ids))


def make_assignment(cfg: ExperimentConfig, forced: int | None = None) -> Assignment:
    users = np.arange(cfg.users)
    market_arm = None
    if forced is not None:
        user_arm = np.full(cfg.users, forced)
    elif cfg.design == "user":
        user_arm = assign_arms(users, cfg.assignment_salt, cfg.shares)
    elif cfg.design == "cluster":
        market_arm = assign_arms(np.arange(markets(cfg)), cfg.assignment_salt, cfg.shares)
        user_arm = market_arm[users % markets(cfg)]
    else:  # creator design: every user sees every arm's creators; the rows carry control
        user_arm = np.zeros(cfg.users, np.int64)
    unit = users % markets(cfg) if cfg.design == "cluster" else users
    return Assignment(cfg.design, user_arm, unit, market_arm, cfg.assignment_salt, cfg.shares,
                      forced)


def markets(cfg: ExperimentConfig) -> int:
    return int(cfg.world.params.get("markets", 1))


# --- a shard ------------------------------------------------------------------------------------
class UserShard:
    """One slice of the users with their own state, a read-only copy of the shared catalog and
    one policy instance per arm (and per period: the pre-period runs the control policy)."""

    def __init__(self, cfg: ExperimentConfig, seed: int, user_ids: np.ndarray,
                 assignment: Assignment) -> None:
        self.cfg, self.assignment = cfg, assignment
        self.params = CreatorEcosystem(**world_params(cfg))
        key = world_key(seed)
        self.world = CreatorWorld(self.params, key, user_ids)
        self.policy_keys = child_keys(key[0] ^ _POLICY_KEY, user_ids)
        local_arm = assignment.user_arm[user_ids]
        self.members = [np.flatnonzero(local_arm == a) for a in range(len(cfg.arms))]
        self.pre = [build_policy(cfg.arms[0], cfg) for _ in cfg.arms]
        if cfg.design == "creator" and assignment.forced is None:
            split = CreatorSplitPolicy(self.params.slate_size,
                                       [build_policy(arm, cfg) for arm in cfg.arms],
                                       assignment.creator_arm)
            self.live = [split] + [build_policy(cfg.arms[0], cfg) for _ in cfg.arms[1:]]
        else:
            self.live = [build_policy(arm, cfg) for arm in cfg.arms]
        self._day_reset()

    def _day_reset(self) -> None:
        n = len(self.world.user_ids)
        self.day_counts = {name: np.zeros(n, np.int64)
                           for name in ("sessions", "impressions", "clicks")}
        self.day_minutes = np.zeros(n)

    def policies(self) -> list:
        return self.pre if self.world.day < self.cfg.pre_days else self.live

    def play_round(self, state: dict[str, Any], pooled: list[list[np.ndarray]] | None,
                   creator_count: int) -> dict[str, Any]:
        """Serve this round's sessions on the given catalog; return its statistics."""
        world = self.world
        world.load_shared_state(state)
        policies = self.policies()
        for arm, policy in enumerate(policies):
            if pooled is not None:
                add_increments(policy, self.before[arm], pooled[arm])
            pad_pooled(policy, creator_count)
        self.before = [snapshot(policy) for policy in policies]
        active = world.sessions_today > world.round
        logs, failures = [_empty_log(self.params)], []
        arm_impressions = np.zeros((len(policies), self.params.max_items), np.int64)
        for arm, policy in enumerate(policies):
            batch = self.members[arm] if has_user_state(policy) else self.members[arm][
                active[self.members[arm]]]
            if len(batch) == 0:
                continue
            log, error = self._serve(policy, batch, active[batch])
            logs.append(log)
            arm_impressions[arm] = np.bincount(log["shown"].ravel(),
                                               minlength=self.params.max_items)
            if error is not None:
                failures.append({"arm": self.cfg.arms[arm].name, "users": int(active[batch].sum()),
                                 "error": error})
        order = np.argsort(np.concatenate([log["users"] for log in logs]), kind="stable")
        log = {k: np.concatenate([part[k] for part in logs])[order] for k in logs[0]}
        self._count(log)
        result = {
            "stats": world.round_statistics(log),
            "pooled": [increments(policy, before) for policy, before in zip(
                policies, self.before, strict=True)],
            "arm_impressions": arm_impressions,
            "failures": failures,
        }
        if world.round == self.params.sessions_per_day - 1:
            result["users"] = self._day_rows()
            result["endpoints"] = self._endpoint_load()
        return result

    def _endpoint_load(self) -> dict[str, list[float]]:
        """Per HTTP arm: candidates scored through its endpoint so far and the seconds it took."""
        return {self.cfg.arms[arm].name: [policy.scored, policy.seconds]
                for arm, policy in enumerate(self.live) if hasattr(policy, "scored")}

    def _serve(self, policy: Any, batch: np.ndarray,
               active: np.ndarray) -> tuple[dict[str, np.ndarray], str | None]:
        world = self.world
        rows = world.candidates(batch)
        obs = world.observe(batch, rows)
        rng = KeyedRng(self.policy_keys[batch], world.counter)
        error = None
        self._user_rows(policy, batch)
        try:
            slates = validate_slates(policy.act(obs, rng, None), self.params.num_candidates,
                                     self.params.slate_size)
        except (OSError, ValueError, RuntimeError) as e:
            # An arm that cannot rank (an endpoint down mid-run): its users get the candidates in
            # retrieval order, and the failure is recorded with the day and the users affected.
            slates = np.tile(np.arange(self.params.slate_size), (len(batch), 1))
            error = f"{type(e).__name__}: {e}"
        log = world.serve(batch[active], rows[active], slates[active])
        click = np.zeros((len(batch), self.params.slate_size), np.int8)
        minutes = np.zeros((len(batch), self.params.slate_size), np.float32)
        click[active] = log["click"]
        minutes[active] = log["click"] * log["engagement"][:, None].astype(np.float32)
        next_obs = {"response": {"click": click, "engagement": minutes}}
        reward = np.zeros(len(batch))
        reward[active] = log["engagement"]
        if error is None:
            policy.update(obs, slates, reward, next_obs, np.zeros(len(batch), bool))
        self._user_rows(policy, batch, back=True)
        return log, error

    def _user_rows(self, policy: Any, batch: np.ndarray, back: bool = False) -> None:
        """A model policy's per-user click history, kept for all of the shard's users and lent to
        the policy for the users it serves now (it indexes its history by batch row)."""
        if not isinstance(policy, ModelPolicy):
            return
        if not hasattr(policy, "all_users_history"):
            policy.all_users_history = np.full((len(self.world.user_ids), policy.history_length),
                                               -1, np.int64)
        if back:
            policy.all_users_history[batch] = policy.history
        else:
            policy.history = policy.all_users_history[batch]

    def _count(self, log: dict[str, np.ndarray]) -> None:
        users = log["users"]
        self.day_counts["sessions"][users] += 1
        self.day_counts["impressions"][users] += self.params.slate_size
        self.day_counts["clicks"][users] += log["click"].sum(axis=1)
        self.day_minutes[users] += log["engagement"]

    def _day_rows(self) -> dict[str, np.ndarray]:
        world = self.world
        rows = {"user": world.user_ids, "active": world.active_today.astype(np.int64),
                **self.day_counts, "watch_minutes": self.day_minutes,
                "churned": world.churned.astype(np.int64)}
        self._day_reset()
        return rows


# --- the hub and the driver -----------------------------------------------------------------------
def gini(values: np.ndarray) -> float:
    """Gini coefficient of non-negative values (0 = equal, -> 1 = concentrated); 0 when empty."""
    x = np.sort(np.asarray(values, float))
    total = x.sum()
    if len(x) == 0 or total <= 0:
        return 0.0
    n = len(x)
    return float(2.0 * np.sum(np.arange(1, n + 1) * x) / (n * total) - (n + 1) / n)


class CreatorHub:
    """The authoritative creators and catalog: a world without users, fed merged statistics."""

    def __init__(self, cfg: ExperimentConfig, seed: int, assignment: Assignment) -> None:
        self.cfg, self.assignment = cfg, assignment
        self.params = CreatorEcosystem(**world_params(cfg))
        self.world = CreatorWorld(self.params, world_key(seed), np.zeros(0, np.int64))
        self.day_impressions = np.zeros((len(cfg.arms), self.params.max_items), np.int64)
        self.rows: list[dict[str, Any]] = []

    @property
    def rounds_per_day(self) -> int:
        return self.params.sessions_per_day

    def state(self) -> dict[str, Any]:
        return self.world.shared_state()

    def creator_count(self) -> int:
        """Every creator id so far (creator-indexed policy tallies are padded to it)."""
        return int(self.world.next_creator_id)

    def summary(self) -> str:
        return f"active creators {self.world.creator_alive.sum()}"

    def apply(self, results: list[dict[str, Any]]) -> None:
        world = self.world
        self.day_impressions += sum(r["arm_impressions"] for r in results)
        closing = world.round == self.params.sessions_per_day - 1
        if closing:
            day_rows = self._exposure_rows()
            alive_before, ids_before = world.creator_alive.copy(), world.creator_id.copy()
        world.apply_round(CreatorWorld.merge_round_statistics([r["stats"] for r in results]))
        if closing:
            exited = alive_before & ~(world.creator_alive & (world.creator_id == ids_before))
            self._creator_counts(day_rows, exited, ids_before)
            self.rows.extend(day_rows)
            self.day_impressions[:] = 0

    def _creator_arms(self, ids: np.ndarray) -> np.ndarray:
        """Arm of each creator slot's creator: all arms share every creator under user design."""
        if self.cfg.design == "user" or self.assignment.forced is not None:
            return np.full(len(ids), -1)
        return self.assignment.creator_arm(ids, np.arange(len(ids)))

    def _scale(self, arm: int) -> float:
        """Creator counts of an arm scaled to the whole world (its share of creators)."""
        if self.cfg.design == "user" or self.assignment.forced is not None:
            return 1.0
        if self.cfg.design == "cluster":
            return len(self.assignment.market_arm) / max((self.assignment.market_arm == arm).sum(), 1)
        return 1.0 / self.cfg.shares[arm]

    def _exposure_rows(self) -> list[dict[str, Any]]:
        """Exposure Gini, catalog coverage and novelty of the day's impressions, per arm."""
        world, p = self.world, self.params
        present = world._owner_present()
        slot_arm = self._creator_arms(world.creator_id)
        pool = world.pool
        freshness = np.clip(1.0 - (world.day - world.item_day - 1) / p.item_lifetime_days, 0, 1)
        rows = []
        for arm, name in enumerate(self.cfg.arm_names):
            if self.cfg.design == "creator" and self.assignment.forced is None:
                shown = self.day_impressions.sum(axis=0)   # every user sees every arm's creators
            else:
                shown = self.day_impressions[arm]
            mine = present & ((slot_arm[np.maximum(world.item_slot, 0)] == arm)
                              | (slot_arm[np.maximum(world.item_slot, 0)] == -1))
            creators = world.creator_alive & ((slot_arm == arm) | (slot_arm == -1))
            per_creator = np.bincount(world.item_slot[mine], weights=shown[mine],
                                      minlength=p.num_creators)
            live = pool[mine[pool]]
            counted = shown * mine
            rows.append({
                "arm": name, "day": world.day - self.cfg.pre_days,
                "exposure_gini": gini(per_creator[creators]),
                "coverage": float((shown[live] > 0).mean()) if len(live) else 0.0,
                "novelty": float((counted * freshness).sum() / counted.sum())
                if counted.sum() else 0.0,
            })
        return rows

    def _creator_counts(self, rows: list[dict[str, Any]], exited: np.ndarray,
                        ids_before: np.ndarray) -> None:
        world = self.world
        arm_before, arm_now = self._creator_arms(ids_before), self._creator_arms(world.creator_id)
        for arm, row in enumerate(rows):
            scale = self._scale(arm)
            alive = world.creator_alive & ((arm_now == arm) | (arm_now == -1))
            gone = exited & ((arm_before == arm) | (arm_before == -1))
            row["active_creators"] = int(round(alive.sum() * scale))
            row["exits"] = int(round(gone.sum() * scale))


def local_call(shards: list[UserShard]) -> Call:
    """The in-process executor: call a method on every shard in order."""
    def call(method: str, args: list[tuple]) -> list[Any]:
        return [getattr(shard, method)(*a) for shard, a in zip(shards, args, strict=True)]
    return call


def drive(cfg: ExperimentConfig, seed: int, assignment: Assignment, call: Call,
          num_shards: int, progress: Callable[[str], None] | None = None,
          hub: Any = None) -> ExperimentResult:
    """Run the days: every round, shards play on the hub's state, the hub applies the merge."""
    hub = hub or CreatorHub(cfg, seed, assignment)
    pooled = None
    day_frames: list[pd.DataFrame] = []
    failures: list[dict[str, Any]] = []
    for day in range(cfg.total_days):
        for round_ in range(hub.rounds_per_day):
            if round_ == 0 and day == cfg.pre_days:
                pooled = None  # the experiment's policies start fresh
            results = call("play_round", [(hub.state(), pooled, hub.creator_count())] * num_shards)
            pooled = [sum_increments([r["pooled"][arm] for r in results])
                      for arm in range(len(cfg.arms))]
            for r in results:
                failures.extend({"day": day - cfg.pre_days, **f} for f in r["failures"])
            hub.apply(results)
        day_frames.append(_user_frame(cfg, assignment, [r["users"] for r in results],
                                      day - cfg.pre_days))
        if progress is not None:
            row = day_frames[-1]
            progress(f"day {day - cfg.pre_days:>3}/{cfg.days - 1}: DAU {row['active'].sum()}, "
                     f"watch minutes {row['watch_minutes'].sum():.0f}, {hub.summary()}")
    endpoints: dict[str, Any] = {}
    for shard in results:
        for arm, (scored, seconds) in shard.get("endpoints", {}).items():
            entry = endpoints.setdefault(arm, {"scores": 0, "seconds": 0.0})
            entry["scores"] += scored
            entry["seconds"] = max(entry["seconds"], seconds)  # shards call in parallel
    for entry in endpoints.values():
        entry["scores_per_second"] = entry["scores"] / max(entry["seconds"], 1e-9)
    return ExperimentResult(
        users=pd.concat(day_frames, ignore_index=True),
        creators=pd.DataFrame(hub.rows)[["arm", "day", *CREATOR_METRICS]],
        arms=cfg.arm_names, shares=cfg.shares, design=cfg.design,
        meta={"seed": seed, "shards": num_shards, "users": cfg.users, "days": cfg.days,
              "pre_days": cfg.pre_days, "world": cfg.world.env,
              "world_params": world_params(cfg), "forced_arm": assignment.forced,
              "endpoints": endpoints},
        failures=_merge_failures(failures))


def _merge_failures(failures: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One record per (day, arm): users affected summed over shards and rounds."""
    merged: dict[tuple, dict[str, Any]] = {}
    for f in failures:
        key = (f["day"], f["arm"])
        entry = merged.setdefault(key, {"day": f["day"], "arm": f["arm"], "users": 0,
                                        "error": f["error"]})
        entry["users"] += f["users"]
    return list(merged.values())


def _user_frame(cfg: ExperimentConfig, assignment: Assignment, parts: list[dict[str, np.ndarray]],
                day: int) -> pd.DataFrame:
    columns = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    users = columns["user"]
    arm_names = np.array(cfg.arm_names, dtype=object)
    return pd.DataFrame({
        "user": users.astype(np.int64), "unit": assignment.user_unit[users].astype(np.int64),
        "arm": arm_names[assignment.user_arm[users]], "day": np.full(len(users), day, np.int64),
        **{k: columns[k].astype(np.int64) for k in ("active", "sessions", "impressions", "clicks")},
        "watch_minutes": columns["watch_minutes"].astype(np.float64),
        "churned": columns["churned"].astype(np.int64),
    })


# --- entry points -------------------------------------------------------------------------------
def run_world(cfg: ExperimentConfig, seed: int, forced: int | None = None, shards: int = 1,
              progress: Callable[[str], None] | None = None) -> ExperimentResult:
    """One world in this process (`forced`: every unit in that arm)."""
    assignment = make_assignment(cfg, forced)
    parts = [make_shard(cfg, seed, ids, assignment) for ids in shard_ranges(cfg.users, shards)]
    return drive(cfg, seed, assignment, local_call(parts), shards, progress,
                 make_hub(cfg, seed, assignment))


def make_shard(cfg: ExperimentConfig, seed: int, user_ids: np.ndarray,
               assignment: Assignment) -> Any:
    if cfg.world.env == CREATOR_ECOSYSTEM:
        return UserShard(cfg, seed, user_ids, assignment)
    from recray.abtest.recsim import RecSimShard

    return RecSimShard(cfg, seed, user_ids, assignment)


def make_hub(cfg: ExperimentConfig, seed: int, assignment: Assignment) -> Any:
    if cfg.world.env == CREATOR_ECOSYSTEM:
        return CreatorHub(cfg, seed, assignment)
    from recray.abtest.recsim import RecSimHub

    return RecSimHub(cfg)


def daily_means(result: ExperimentResult) -> dict[str, float]:
    """Per metric, the world's value over the experiment days: user metrics as the mean per
    user-day, ratios (CTR, minutes per session) as ratios of sums, as `recray.abtest.stats`
    estimates them; creator metrics as the mean of the daily values."""
    users = result.users[result.users["day"] >= 0]
    out = {m: float(users[m].mean()) for m in USER_METRICS}
    out["ctr"] = float(users["clicks"].sum() / max(users["impressions"].sum(), 1))
    out["minutes_per_session"] = float(users["watch_minutes"].sum() / max(users["sessions"].sum(),
                                                                         1))
    creators = result.creators[result.creators["day"] >= 0]
    out.update({m: float(creators[m].mean()) for m in CREATOR_METRICS})
    return out


def global_treatment_effect(control: ExperimentResult,
                            treatment: ExperimentResult) -> dict[str, float]:
    """GTE per metric: the all-treatment world's mean minus the all-control world's."""
    c, t = daily_means(control), daily_means(treatment)
    return {m: t[m] - c[m] for m in c}


def gte_worlds(cfg: ExperimentConfig, seed: int, treatment: int = 1,
               run: Callable[..., ExperimentResult] | None = None) -> dict[str, float]:
    """The same world entirely under control and entirely under `treatment`, same seed."""
    run = run or run_world
    return global_treatment_effect(run(cfg, seed, forced=0), run(cfg, seed, forced=treatment))


def run_experiment(cfg: ExperimentConfig, seed: int | None = None, shards: int | None = None,
                   progress: Callable[[str], None] | None = None,
                   check: bool = True) -> ExperimentResult:
    """The experiment in this process (no Ray): validate, run, add the GTE if asked."""
    if check:
        validate(cfg)
    seed = cfg.seeds[0] if seed is None else seed
    result = run_world(cfg, seed, shards=shards or cfg.shards, progress=progress)
    if cfg.gte:
        result.gte = gte_worlds(cfg, seed)
    return result
