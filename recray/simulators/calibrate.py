"""Calibrate a simple world to a real interaction log: item popularity skew and user activity.

The fitted world is the smallest generator that reproduces the two marginals every recommender
log has: how many events each user makes and how they spread over items. Each user draws an
activity count from a shifted lognormal; each event draws an item from fixed item weights, either
a Zipf law over popularity ranks (one exponent) or lognormal weights (one log-scale spread).
CreatorEcosystem retrieves candidates uniformly from the recent catalog, so it has no popularity
knob to set; these fitted figures are what a world of the log's size needs.

The report gives the fitted parameters and the two-sample Kolmogorov-Smirnov distance between the
simulated world and the log for events per item and events per user (0: identical distributions).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import pyarrow.csv as pacsv
from scipy import optimize, stats

LogFormat = Literal["movielens", "kuairand"]
Popularity = Literal["zipf", "lognormal"]
FORMATS: tuple[str, ...] = ("movielens", "kuairand")
POPULARITY_MODELS: tuple[str, ...] = ("zipf", "lognormal")
MAX_ZIPF_EXPONENT = 5.0


@dataclass(frozen=True)
class InteractionLog:
    """One row per event: who interacted with what (ids as in the source file)."""

    user_id: np.ndarray
    item_id: np.ndarray


@dataclass(frozen=True)
class FittedWorld:
    """A world of the log's size: item weights by `popularity`, shifted-lognormal user activity."""

    num_users: int
    num_items: int
    zipf_exponent: float
    item_sigma: float
    activity_loc: float
    activity_sigma: float
    activity_scale: float
    popularity: Popularity = "zipf"

    def item_weights(self, rng: np.random.Generator) -> np.ndarray:
        """Unnormalised event weights of the items, most popular first."""
        if self.popularity == "zipf":
            return np.arange(1, self.num_items + 1, dtype=np.float64) ** -self.zipf_exponent
        if self.popularity == "lognormal":
            return np.sort(np.exp(self.item_sigma * rng.standard_normal(self.num_items)))[::-1]
        raise ValueError(f"popularity: expected one of {POPULARITY_MODELS}, got {self.popularity!r}")


def read_log(src: str | Path, fmt: LogFormat) -> InteractionLog:
    """MovieLens `u.data` (tab-separated user, item, rating, timestamp; no header) or a KuaiRand
    CSV (a header with `user_id`, `video_id`, `time_ms`)."""
    src = Path(src)
    if not src.is_file():
        raise FileNotFoundError(f"--src: file not found: {src}")
    if fmt == "movielens":
        table = pacsv.read_csv(
            src,
            read_options=pacsv.ReadOptions(column_names=["user_id", "item_id", "rating", "timestamp"]),
            parse_options=pacsv.ParseOptions(delimiter="\t"),
        )
        return InteractionLog(table.column("user_id").to_numpy(), table.column("item_id").to_numpy())
    if fmt == "kuairand":
        header = pacsv.read_csv(src, read_options=pacsv.ReadOptions(block_size=1 << 16)).column_names
        missing = [c for c in ("user_id", "video_id", "time_ms") if c not in header]
        if missing:
            raise ValueError(f"--src: {src} is not a KuaiRand log: columns {missing} missing "
                             f"(found {header})")
        table = pacsv.read_csv(src, convert_options=pacsv.ConvertOptions(
            include_columns=["user_id", "video_id"]))
        return InteractionLog(table.column("user_id").to_numpy(), table.column("video_id").to_numpy())
    raise ValueError(f"--format: expected one of {FORMATS}, got {fmt!r}")


def events_per_item(log: InteractionLog) -> np.ndarray:
    """Event counts of the items that occur, most popular first."""
    return np.sort(np.unique(log.item_id, return_counts=True)[1])[::-1]


def events_per_user(log: InteractionLog) -> np.ndarray:
    return np.unique(log.user_id, return_counts=True)[1]


def fit_zipf_exponent(counts_by_rank: np.ndarray) -> float:
    """Maximum-likelihood exponent s of p(rank r) ~ r^-s over the observed ranks.

    Least squares on log rank-frequency is the common shortcut, but it weighs the many noisy tail
    ranks as much as the head and is biased (Clauset, Shalizi & Newman 2009); the likelihood
    weighs each rank by its events.
    """
    counts = np.sort(np.asarray(counts_by_rank, dtype=np.float64))[::-1]
    if len(counts) < 2 or counts.sum() == 0:
        raise ValueError(f"counts_by_rank: need at least 2 items with events, got {len(counts)}")
    log_rank = np.log(np.arange(1, len(counts) + 1))
    weighted_log_rank, total = counts @ log_rank, counts.sum()

    def negative_log_likelihood(s: float) -> float:
        return s * weighted_log_rank + total * float(np.logaddexp.reduce(-s * log_rank))

    result = optimize.minimize_scalar(negative_log_likelihood, bounds=(0.0, MAX_ZIPF_EXPONENT),
                                      method="bounded", options={"xatol": 1e-6})
    return float(result.x)


def fit_activity(counts: np.ndarray) -> tuple[float, float, float]:
    """`(loc, sigma, scale)` of a lognormal fitted by MLE to `counts - loc`.

    `loc` is one below the smallest count, since logs like MovieLens keep only users with at least
    20 events: a lognormal from zero would put mass where the log has none by construction.
    """
    counts = np.asarray(counts, dtype=np.float64)
    loc = float(counts.min() - 1)
    sigma, _, scale = stats.lognorm.fit(counts, floc=loc)
    return loc, float(sigma), float(scale)


def fit_item_sigma(counts: np.ndarray) -> float:
    """Log-scale spread of a lognormal fitted by MLE to the events per item.

    The counts carry Poisson noise on top of the weights, so this slightly overstates the spread
    of the weights; at the tens of events per item of real logs the excess is small.
    """
    sigma, _, _ = stats.lognorm.fit(np.asarray(counts, dtype=np.float64), floc=0.0)
    return float(sigma)


def fit_world(log: InteractionLog, popularity: Popularity = "zipf") -> FittedWorld:
    items, users = events_per_item(log), events_per_user(log)
    loc, sigma, scale = fit_activity(users)
    return FittedWorld(num_users=len(users), num_items=len(items),
                       zipf_exponent=fit_zipf_exponent(items), item_sigma=fit_item_sigma(items),
                       activity_loc=loc, activity_sigma=sigma, activity_scale=scale,
                       popularity=popularity)


def simulate_world(world: FittedWorld, seed: int = 0) -> InteractionLog:
    """An event log of the fitted world: per-user activity draws, then Zipf item draws per event."""
    rng = np.random.default_rng(seed)
    activity = world.activity_loc + stats.lognorm.rvs(world.activity_sigma, scale=world.activity_scale,
                                                      size=world.num_users, random_state=rng)
    # Counts are whole events: round up, so the smallest user keeps the log's minimum.
    activity = np.ceil(activity).astype(np.int64)
    user_id = np.repeat(np.arange(world.num_users), activity)
    weights = world.item_weights(rng)
    item_id = rng.choice(world.num_items, size=len(user_id), p=weights / weights.sum())
    return InteractionLog(user_id, item_id)


def ks_distances(real: InteractionLog, simulated: InteractionLog) -> dict[str, float]:
    """Two-sample KS statistic of events per item and of events per user."""
    return {
        "item_popularity": float(stats.ks_2samp(events_per_item(real), events_per_item(simulated)).statistic),
        "user_activity": float(stats.ks_2samp(events_per_user(real), events_per_user(simulated)).statistic),
    }


def calibrate(src: str | Path, fmt: LogFormat, seed: int = 0) -> dict:
    """Fit both popularity models to the log at `src`, simulate each, report the fits and KS."""
    log = read_log(src, fmt)
    report: dict = {"src": str(src), "format": fmt, "events": int(len(log.user_id))}
    for popularity in POPULARITY_MODELS:
        world = fit_world(log, popularity)
        report["world"] = {k: v for k, v in asdict(world).items() if k != "popularity"}
        report[popularity] = ks_distances(log, simulate_world(world, seed))
    report["best_popularity"] = min(POPULARITY_MODELS,
                                    key=lambda name: report[name]["item_popularity"])
    return report
