"""The experiment config (YAML -> pydantic) and every check that must pass before a shard starts."""

from __future__ import annotations

import json
import math
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Literal

import numpy as np
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from recray.abtest.assignment import assign_arms
from recray.simulators import CREATOR_ECOSYSTEM, INTEREST_EVOLUTION, LONG_TERM_SATISFACTION

WORLDS = (CREATOR_ECOSYSTEM, LONG_TERM_SATISFACTION, INTEREST_EVOLUTION)
# Per-user-day metrics (columns of ExperimentResult.users) and per-arm-day creator metrics.
USER_METRICS = ("active", "sessions", "impressions", "clicks", "watch_minutes", "churned")
CREATOR_METRICS = ("active_creators", "exits", "exposure_gini", "coverage", "novelty")


class ExperimentConfigError(ValueError):
    """An experiment that cannot run; the message names the field and the value."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class World(_Strict):
    env: Literal[WORLDS] = CREATOR_ECOSYSTEM  # type: ignore[valid-type]
    params: dict[str, Any] = Field(default_factory=dict,
                                   description="gym.make keyword arguments (num_users: see users)")
    steps_per_day: int = Field(default=1, ge=1, description="RecSim presets: sessions per day")


class ModelArm(_Strict):
    run_dir: str = Field(description="a `recray train` run folder (config.yaml, schema.yaml, model/)")
    label: str = "label_click"


class HttpArm(_Strict):
    url: str = Field(description="base URL of a `recray serve` endpoint, e.g. http://127.0.0.1:8000")
    variant: str = Field(description="the endpoint's variant that ranks for this arm")
    timeout_s: float = Field(default=10.0, gt=0)
    concurrency: int = Field(default=8, ge=1, description="requests in flight per shard")


class Arm(_Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    share: float = Field(ge=0, le=1)
    policy: str | None = Field(default=None, description="a built-in policy of the world")
    params: dict[str, Any] = Field(default_factory=dict, description="built-in policy parameters")
    model: ModelArm | None = None
    http: HttpArm | None = None

    @model_validator(mode="after")
    def _one_kind(self) -> Arm:
        kinds = [k for k in ("policy", "model", "http") if getattr(self, k) is not None]
        if len(kinds) != 1:
            raise ValueError(f"arm {self.name!r}: give exactly one of policy, model, http "
                             f"(got {kinds or 'none'})")
        return self


class ExperimentConfig(_Strict):
    name: str = "abtest"
    world: World = Field(default_factory=World)
    users: int = Field(default=1000, gt=0)
    arms: list[Arm] = Field(min_length=2, description="control first")
    design: Literal["user", "creator", "cluster"] = "user"
    pre_days: int = Field(default=0, ge=0, description="days before the experiment, all on control")
    days: int = Field(default=14, ge=1)
    seeds: list[int] = Field(default_factory=lambda: [0], min_length=1)
    salt: str | None = Field(default=None, description="assignment salt; default: the name")
    shards: int = Field(default=1, ge=1, description="user shards (Ray actors)")
    analysis: dict[str, Any] = Field(default_factory=dict,
                                     description="recray.abtest.stats.AnalysisConfig fields")
    gte: bool = Field(default=True, description="also run the world all-control and all-treatment")

    @model_validator(mode="after")
    def _consistent(self) -> ExperimentConfig:
        names = [arm.name for arm in self.arms]
        if len(set(names)) != len(names):
            raise ValueError(f"arms: names must be distinct, got {names}")
        total = sum(arm.share for arm in self.arms)
        if not math.isclose(total, 1.0, abs_tol=1e-9):
            raise ValueError(f"arms[].share: shares must sum to 1, got "
                             f"{' + '.join(str(a.share) for a in self.arms)} = {total:g}")
        if self.shards > self.users:
            raise ValueError(f"shards: {self.shards} shards for {self.users} users")
        if self.design != "user" and self.world.env != CREATOR_ECOSYSTEM:
            raise ValueError(f"design: {self.design!r} needs creators; {self.world.env} has none")
        if self.design == "cluster" and int(self.world.params.get("markets", 1)) < 2:
            raise ValueError("design: 'cluster' randomises markets; set world.params.markets >= 2")
        if "num_users" in self.world.params:
            raise ValueError("world.params.num_users: set the experiment's `users` instead")
        return self

    @property
    def arm_names(self) -> list[str]:
        return [arm.name for arm in self.arms]

    @property
    def shares(self) -> list[float]:
        return [arm.share for arm in self.arms]

    @property
    def assignment_salt(self) -> str:
        return self.salt or self.name

    @property
    def total_days(self) -> int:
        return self.pre_days + self.days


def _describe(e: ValidationError) -> str:
    return "; ".join(f"{'.'.join(str(p) for p in err['loc']) or 'config'}: "
                     f"{err['msg'].removeprefix('Value error, ')}" for err in e.errors())


def parse_config(data: dict[str, Any], source: str = "experiment") -> ExperimentConfig:
    try:
        return ExperimentConfig.model_validate(data)
    except ValidationError as e:
        raise ExperimentConfigError(f"{source}: {_describe(e)}") from None


def load_config(path: str | Path) -> ExperimentConfig:
    path = Path(path)
    if not path.is_file():
        raise ExperimentConfigError(f"config file not found: {path}")
    data = yaml.safe_load(path.read_text())
    if not isinstance(data, dict):
        raise ExperimentConfigError(f"{path}: expected a mapping at the top level")
    return parse_config(data, str(path))


# --- checks that read the world, the run folders and the endpoints --------------------------------
def world_params(cfg: ExperimentConfig) -> dict[str, Any]:
    """The world's gym.make parameters, horizon covering the pre-period and the experiment."""
    params = dict(cfg.world.params)
    if cfg.world.env == CREATOR_ECOSYSTEM:
        params["num_users"] = cfg.users
        params["horizon_days"] = max(cfg.total_days, params.get("horizon_days", 1))
    return params


def slate_size(cfg: ExperimentConfig) -> int:
    return int(cfg.world.params.get("slate_size", 2))


def check_world(cfg: ExperimentConfig) -> None:
    import gymnasium as gym

    try:
        if cfg.world.env == CREATOR_ECOSYSTEM:
            from recray.simulators.creator_ecosystem import CreatorEcosystem

            CreatorEcosystem(**world_params(cfg))
        else:
            gym.make(cfg.world.env, **world_params(cfg)).close()
    except (TypeError, ValueError) as e:
        raise ExperimentConfigError(f"world.params: {e}") from None


def check_policies(cfg: ExperimentConfig) -> None:
    from recray.simulators.policies import make_policy

    for i, arm in enumerate(cfg.arms):
        if arm.policy is not None:
            try:
                make_policy(arm.policy, cfg.world.env, slate_size(cfg), **arm.params)
            except (TypeError, ValueError) as e:
                raise ExperimentConfigError(f"arms[{i}].policy ({arm.name}): {e}") from None
        elif arm.model is not None:
            if cfg.world.env != CREATOR_ECOSYSTEM:
                raise ExperimentConfigError(f"arms[{i}].model ({arm.name}): a trained model scores "
                                            f"CreatorEcosystem candidates only")
            folder = Path(arm.model.run_dir)
            for part in ("config.yaml", "schema.yaml"):
                if not (folder / part).is_file():
                    raise ExperimentConfigError(f"arms[{i}].model.run_dir ({arm.name}): "
                                                f"{folder / part} not found (not a run folder)")
        elif cfg.world.env != CREATOR_ECOSYSTEM:
            raise ExperimentConfigError(f"arms[{i}].http ({arm.name}): an endpoint ranks "
                                        f"CreatorEcosystem candidates only")


def _get_json(url: str, timeout_s: float) -> Any:
    with urllib.request.urlopen(url, timeout=timeout_s) as response:
        return json.loads(response.read())


def check_endpoints(cfg: ExperimentConfig) -> None:
    """Every HTTP arm's endpoint answers /healthz and serves the arm's variant."""
    for i, arm in enumerate(cfg.arms):
        if arm.http is None:
            continue
        base = arm.http.url.rstrip("/")
        try:
            _get_json(f"{base}/healthz", arm.http.timeout_s)
            models = _get_json(f"{base}/v1/models", arm.http.timeout_s)
        except (urllib.error.URLError, OSError, ValueError) as e:
            raise ExperimentConfigError(f"arms[{i}].http.url ({arm.name}): {base} is unreachable "
                                        f"({e})") from None
        variants = _variant_names(models)
        if arm.http.variant not in variants:
            raise ExperimentConfigError(f"arms[{i}].http.variant ({arm.name}): "
                                        f"{arm.http.variant!r} is not served at {base}; "
                                        f"variants are {sorted(variants)}")


def _variant_names(models: Any) -> set[str]:
    """Variant names from a /v1/models answer (a list of variants or a mapping by name)."""
    entries = models.get("variants", models) if isinstance(models, dict) else models
    if isinstance(entries, dict):
        return set(entries)
    return {entry["name"] if isinstance(entry, dict) else str(entry) for entry in entries}


def unit_ids(cfg: ExperimentConfig) -> np.ndarray:
    """The randomisation units whose arms are drawn: users, or the markets of the cluster design
    (creators come and go, so the creator design draws arms for creator ids as they appear)."""
    markets = int(cfg.world.params.get("markets", 1))
    return np.arange(markets if cfg.design == "cluster" else cfg.users)


def check_arm_sizes(cfg: ExperimentConfig) -> np.ndarray:
    """Arm index per unit; every arm must get at least one unit (creator design: one user-side
    check is impossible before creators exist, so the first creators are drawn here)."""
    units = np.arange(_initial_creators(cfg)) if cfg.design == "creator" else unit_ids(cfg)
    arms = assign_arms(units, cfg.assignment_salt, cfg.shares)
    counts = np.bincount(arms, minlength=len(cfg.arms))
    for i, (arm, count) in enumerate(zip(cfg.arms, counts, strict=True)):
        if count == 0:
            unit = {"user": "users", "creator": "creators", "cluster": "clusters"}[cfg.design]
            raise ExperimentConfigError(f"arms[{i}].share ({arm.name}): share {arm.share} gives "
                                        f"this arm 0 of {len(units)} {unit}")
    return arms


def _initial_creators(cfg: ExperimentConfig) -> int:
    from recray.simulators.creator_ecosystem import CreatorEcosystem

    return CreatorEcosystem(**world_params(cfg)).num_creators


def check_analysis(cfg: ExperimentConfig) -> Any:
    """The `analysis:` section as the statistics read it (metric names, alpha, ...)."""
    from recray.abtest.stats import AnalysisConfig

    try:
        return AnalysisConfig.model_validate(cfg.analysis)
    except ValidationError as e:
        raise ExperimentConfigError(f"analysis.{_describe(e)}") from None


def validate(cfg: ExperimentConfig, probe_endpoints: bool = True) -> None:
    """Everything that can be checked before a shard starts, in order of cost."""
    check_analysis(cfg)
    check_world(cfg)
    check_policies(cfg)
    check_arm_sizes(cfg)
    if probe_endpoints:
        check_endpoints(cfg)
