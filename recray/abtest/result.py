"""What an experiment hands to the statistics and the report: tidy per-unit-day and per-arm-day frames.

The contract between the harness (`recray.abtest.harness`, `recray.platform.abtest`) and the
analysis (`recray.abtest.stats`, `recray.abtest.report`): the harness fills it, the analysis reads
only it, so either side can be tested on frames built by hand.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pandas as pd

# One row per (user, day); days < 0 are the pre-period (every unit under control), day 0 is the
# first experiment day. A user absent that day has a row with active=0 and zero counts, so
# retention, DAU and churn are means over a fixed population and the unit count never drifts.
USER_COLUMNS = {
    "user": "int64",           # the user id (hash input of user randomisation)
    "unit": "int64",           # the randomisation unit: user, creator cluster or world cluster id
    "arm": "object",           # arm name
    "day": "int64",
    "active": "int64",         # 1 if the user came back that day (DAU numerator)
    "sessions": "int64",
    "impressions": "int64",
    "clicks": "int64",
    "watch_minutes": "float64",
    "churned": "int64",        # 1 once the user has churned for good
}

# One row per (arm, day): what the arm's traffic did to the creators and the catalog. Under user
# randomisation both arms share the creators, so `exits` and `active_creators` describe the shared
# world; `exposure_gini`, `coverage` and `novelty` are over the impressions this arm served.
CREATOR_COLUMNS = {
    "arm": "object",
    "day": "int64",
    "active_creators": "int64",
    "exits": "int64",
    "exposure_gini": "float64",
    "coverage": "float64",     # share of the live catalog this arm showed at least once that day
    "novelty": "float64",      # mean age-based or first-exposure novelty of what was shown
}


@dataclass
class ExperimentResult:
    """An experiment's raw outcome. `gte` holds, per metric, the global treatment effect
    (world all-treatment minus world all-control, same seeds) when it was computed."""

    users: pd.DataFrame
    creators: pd.DataFrame
    arms: list[str]                  # control first
    shares: list[float]
    design: str                      # "user" | "creator" | "cluster"
    meta: dict[str, Any] = field(default_factory=dict)
    gte: dict[str, float] = field(default_factory=dict)
    failures: list[dict[str, Any]] = field(default_factory=list)  # {day, arm, users, error}

    def __post_init__(self) -> None:
        for name, frame, columns in (("users", self.users, USER_COLUMNS),
                                     ("creators", self.creators, CREATOR_COLUMNS)):
            missing = sorted(set(columns) - set(frame.columns))
            if missing:
                raise ValueError(f"ExperimentResult.{name} lacks columns {missing}")
        unknown = sorted(set(self.users["arm"].unique()) - set(self.arms))
        if unknown:
            raise ValueError(f"ExperimentResult.users has arms {unknown} not in arms={self.arms}")
        if len(self.shares) != len(self.arms):
            raise ValueError(f"shares {self.shares} do not match arms {self.arms}")

    @property
    def control(self) -> str:
        return self.arms[0]
