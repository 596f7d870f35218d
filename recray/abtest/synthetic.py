"""Synthetic experiments with a known effect: user-day frames drawn with numpy, for testing the statistics.

The harness runs the real worlds; this generator exists so the statistics can be checked where
the truth is set by hand (a fixed lift, a decaying lift, none at all) and drawn thousands of
times in seconds, which no simulated world allows.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

from recray.abtest.assignment import assign_arms
from recray.abtest.result import CREATOR_COLUMNS, USER_COLUMNS, ExperimentResult

IMPRESSIONS_PER_SESSION = 10
BASE_CTR = 0.1


def synthetic_experiment(
    users: int = 2000,
    days: int = 14,
    pre_days: int = 7,
    lift: float | Sequence[float] = 0.0,
    arms: Sequence[str] = ("control", "treatment"),
    shares: Sequence[float] = (0.5, 0.5),
    user_sd: float = 0.5,
    churn_hazard: float = 0.002,
    cluster_size: int = 1,
    seed: int = 0,
    salt: str = "synthetic",
) -> ExperimentResult:
    """Users with persistent propensities (sd `user_sd` on the log scale) and daily noise.

    Every non-control arm multiplies the click probability on experiment day d by 1 + lift[d]
    (a scalar lift is the same every day); clicks, CTR and watch minutes carry that relative
    lift in expectation. Units are users, or blocks of `cluster_size` consecutive users.
    """
    rng = np.random.default_rng(seed)
    lift_per_day = np.broadcast_to(np.asarray(lift, dtype=float), (days,))
    total_days = pre_days + days
    unit_of_user = np.arange(users) // cluster_size
    arm_of_unit = assign_arms(np.unique(unit_of_user), f"{salt}:{seed}", shares)
    arm_index = arm_of_unit[unit_of_user]

    propensity = rng.normal(0.0, user_sd, size=users)
    p_active = 1 / (1 + np.exp(-(0.8 + propensity)))
    session_rate = 1.5 * np.exp(propensity / 2)
    ctr = np.clip(BASE_CTR * np.exp(propensity / 3), 0.0, 0.5)

    churn_day = rng.geometric(churn_hazard, size=users) if churn_hazard > 0 else np.full(users, 10**9)
    day_index = np.arange(total_days)
    churned = (day_index[None, :] >= churn_day[:, None]).astype(np.int64)

    active = (rng.random((users, total_days)) < p_active[:, None]).astype(np.int64) * (1 - churned)
    sessions = active * (1 + rng.poisson(session_rate[:, None], size=(users, total_days)))
    impressions = sessions * IMPRESSIONS_PER_SESSION
    multiplier = np.ones((users, total_days))
    treated = arm_index > 0
    multiplier[np.ix_(treated, np.arange(pre_days, total_days))] += lift_per_day
    clicks = rng.binomial(impressions, np.clip(ctr[:, None] * multiplier, 0.0, 1.0))
    watch_minutes = rng.gamma(np.maximum(clicks, 1e-12) * 2.0, 1.5) * (clicks > 0)

    arm_names = np.asarray(arms, dtype=object)
    frame = pd.DataFrame({
        "user": np.repeat(np.arange(users, dtype=np.int64), total_days),
        "unit": np.repeat(unit_of_user.astype(np.int64), total_days),
        "arm": np.repeat(arm_names[arm_index], total_days),
        "day": np.tile(day_index - pre_days, users).astype(np.int64),
        "active": active.ravel(), "sessions": sessions.ravel(), "impressions": impressions.ravel(),
        "clicks": clicks.ravel(), "watch_minutes": watch_minutes.ravel(), "churned": churned.ravel(),
    }).astype(USER_COLUMNS)
    creators = pd.DataFrame({
        "arm": np.repeat(arm_names, days), "day": np.tile(np.arange(days), len(arms)),
        "active_creators": 100, "exits": 0, "exposure_gini": 0.5, "coverage": 0.5, "novelty": 0.0,
    }).astype(CREATOR_COLUMNS)
    design = "user" if cluster_size == 1 else "cluster"
    return ExperimentResult(users=frame, creators=creators, arms=list(arms), shares=list(shares),
                            design=design, meta={"source": "synthetic", "lift": lift_per_day.tolist(),
                                                 "aa": bool(np.all(lift_per_day == 0)), "seed": seed})
