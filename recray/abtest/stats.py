"""The statistics of an A/B experiment: fixed-horizon lifts, CUPED, SRM, power, sequential and novelty.

Reads only an `ExperimentResult` (tidy user-day frame). Every metric is a ratio of sums over the
randomisation unit, `sum(numer) / sum(denom)`, aggregated to one row per unit first, so the delta
method (tea-tasting's `RatioOfMeans`) gives honest intervals under user, creator and cluster
randomisation alike: a per-user-day mean is the ratio with `user_days` as denominator (exactly
Welch's t when a unit is one user), CTR is clicks over impressions.

Fixed-horizon lifts, CUPED, the sample-ratio check, power and the FDR correction are tea-tasting's.
Written here, because no installed library does it: the daily and cumulative per-day lifts
(one vectorised delta-method pass over every day, which the A/A battery runs thousands of times),
the alpha-spending group-sequential test and the always-valid mSPRT for daily peeks (spotify-
confidence is not installed), the novelty rule and the long-term projection.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import numpy as np
import pandas as pd
import scipy.signal
import scipy.stats
import statsmodels.api as sm
import tea_tasting as tt
from pydantic import BaseModel, ConfigDict, Field, field_validator

from recray.abtest.result import ExperimentResult

# metric -> (numerator, denominator) columns of the per-unit table; sums over the unit's user-days.
METRICS: dict[str, tuple[str, str]] = {
    "active": ("active", "user_days"),             # DAU share of the population
    "sessions": ("sessions", "user_days"),         # per user per day
    "impressions": ("impressions", "user_days"),
    "clicks": ("clicks", "user_days"),
    "watch_minutes": ("watch_minutes", "user_days"),
    "churned": ("churned", "user_days"),           # share of user-days after churn; daily: churn by day d
    "ctr": ("clicks", "impressions"),
    "minutes_per_session": ("watch_minutes", "sessions"),
}
COUNT_COLUMNS = ["active", "sessions", "impressions", "clicks", "watch_minutes", "churned"]


class AnalysisConfig(BaseModel):
    """How an experiment is analysed (the `analysis:` section of an abtest config)."""

    model_config = ConfigDict(extra="forbid")

    alpha: float = Field(default=0.05, gt=0, lt=0.5, description="two-sided significance level")
    metrics: list[str] = Field(default_factory=lambda: list(METRICS), description="metrics to test")
    primary: str = Field(default="watch_minutes", description="the metric a decision rests on")
    srm_alpha: float = Field(
        default=0.001, gt=0, lt=0.5,
        description="sample-ratio mismatch threshold; strict, as is usual, because every report "
        "runs the check and a 5% threshold would cry wolf in one report out of twenty",
    )
    cuped: bool = Field(default=True, description="pre-period as covariate when there is one")
    power: float = Field(default=0.8, gt=0, lt=1, description="power of the reported MDE")
    with_power: bool = Field(default=True, description="compute the MDE (the A/A battery skips it)")
    msprt_tau_se: float = Field(
        default=2.0, gt=0,
        description="mSPRT mixing sd, in standard errors of the first daily peek",
    )
    novelty_days: int | None = Field(
        default=None, ge=1, description="days in each of the early and late windows; default days//4"
    )
    projection_days: int | None = Field(
        default=None, ge=3, description="first K days the long-term projection sees; default days//3"
    )

    @field_validator("metrics")
    @classmethod
    def _known_metrics(cls, names: list[str]) -> list[str]:
        unknown = sorted(set(names) - set(METRICS))
        if unknown or not names:
            raise ValueError(f"unknown metrics {unknown}; known: {sorted(METRICS)}")
        return names


# ---------------------------------------------------------------- data shaping


def unit_arms(users: pd.DataFrame) -> pd.Series:
    """The arm of every randomisation unit over the experiment days (refuses a unit in two arms)."""
    experiment = users[users["day"] >= 0]
    arms_per_unit = experiment.groupby("unit")["arm"].nunique()
    split = arms_per_unit[arms_per_unit > 1]
    if len(split):
        raise ValueError(f"units {split.index[:5].tolist()} appear in more than one arm")
    return experiment.groupby("unit")["arm"].first()


def unit_day_sums(users: pd.DataFrame) -> dict[str, pd.DataFrame]:
    """Per column, a [unit x day] table of sums over the unit's users (days >= 0 and < 0 alike)."""
    frame = users.assign(user_days=1)
    sums = frame.groupby(["unit", "day"])[[*COUNT_COLUMNS, "user_days"]].sum()
    return {col: sums[col].unstack("day", fill_value=0).sort_index(axis=1)
            for col in [*COUNT_COLUMNS, "user_days"]}


def unit_table(sums: dict[str, pd.DataFrame], arms: pd.Series) -> pd.DataFrame:
    """One row per unit: arm, experiment-period sums and `pre_` pre-period sums of every column."""
    table = pd.DataFrame({"arm": arms})
    for col, grid in sums.items():
        days = grid.columns.to_numpy()
        table[col] = grid.loc[arms.index, days >= 0].sum(axis=1).to_numpy(dtype=float)
        table[f"pre_{col}"] = grid.loc[arms.index, days < 0].sum(axis=1).to_numpy(dtype=float)
    return table


# ---------------------------------------------------------------- per-day delta method


def arm_ratio(numer: np.ndarray, denom: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Ratio of means over units (axis 0) and each unit's influence value (N - R D) / mean(D).

    The variance of the ratio is var(influence) / n: the delta method in its linearised form,
    which also gives the variance of contrasts (early minus late window) by subtracting influences.
    """
    mean_denom = denom.mean(axis=0)
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = numer.mean(axis=0) / mean_denom
        influence = (numer - ratio * denom) / mean_denom
    return ratio, influence


def two_arm_difference(numer: np.ndarray, denom: np.ndarray, treated: np.ndarray) -> dict[str, np.ndarray]:
    """Treatment minus control ratio, its delta-method variance and the relative lift, per column.

    `numer`, `denom`: [units, peeks]; `treated`: bool [units]. Vectorised over peeks because the
    daily view and the A/A battery ask it for every day of thousands of experiments.
    """
    out = {}
    for name, mask in (("control", ~treated), ("treatment", treated)):
        ratio, influence = arm_ratio(numer[mask], denom[mask])
        out[name] = ratio
        out[f"var_{name}"] = influence.var(axis=0, ddof=1) / mask.sum()
    out["effect"] = out["treatment"] - out["control"]
    out["var"] = out["var_control"] + out["var_treatment"]
    with np.errstate(divide="ignore", invalid="ignore"):
        out["rel_effect"] = out["effect"] / out["control"]
        out["var_rel"] = out["var"] / out["control"] ** 2
    return out


def daily_lift(numer: np.ndarray, denom: np.ndarray, treated: np.ndarray, alpha: float,
               cumulative: bool = False) -> dict[str, np.ndarray]:
    """Per experiment day (or per cumulative window up to that day): lift with normal CIs."""
    if cumulative:
        numer, denom = np.cumsum(numer, axis=1), np.cumsum(denom, axis=1)
    diff = two_arm_difference(numer, denom, treated)
    z = scipy.stats.norm.isf(alpha / 2)
    se, se_rel = np.sqrt(diff["var"]), np.sqrt(diff["var_rel"])
    return {
        "control": diff["control"], "treatment": diff["treatment"],
        "effect": diff["effect"], "ci_low": diff["effect"] - z * se, "ci_high": diff["effect"] + z * se,
        "rel_effect": diff["rel_effect"],
        "rel_ci_low": diff["rel_effect"] - z * se_rel, "rel_ci_high": diff["rel_effect"] + z * se_rel,
        "var": diff["var"],
    }


# ---------------------------------------------------------------- sequential: mSPRT


def msprt_pvalues(effect: np.ndarray, variance: np.ndarray, tau2: float) -> np.ndarray:
    """Always-valid p-values of the normal-mixture SPRT (Johari et al. 2017, Howard et al. 2021).

    At each peek the estimate is taken as N(theta, V); mixing theta ~ N(0, tau2) gives the
    likelihood ratio sqrt(V / (V + tau2)) exp(effect^2 tau2 / (2 V (V + tau2))), a martingale
    under H0 whenever the cumulative estimates have the canonical joint distribution (each later
    estimate's variance equals its covariance with earlier ones; true for cumulative means over a
    fixed population with persistent unit effects). Reject at the first peek where p <= alpha,
    however often one looks. Written here because spotify-confidence, the library that has
    group-sequential tests, is not installed (it pins heavy, conflicting dependencies) and its
    tests need the number of looks fixed in advance, which daily peeking does not have.
    """
    variance = np.asarray(variance, dtype=float)
    effect = np.asarray(effect, dtype=float)
    with np.errstate(divide="ignore", invalid="ignore"):
        log_lr = 0.5 * np.log(variance / (variance + tau2)) + effect**2 * tau2 / (
            2 * variance * (variance + tau2))
    log_lr = np.where(np.isfinite(log_lr), log_lr, 0.0)
    return np.minimum.accumulate(np.minimum(1.0, np.exp(-log_lr)), axis=-1)


def msprt_test(effect: np.ndarray, variance: np.ndarray, alpha: float, tau_se: float) -> dict[str, Any]:
    """mSPRT over daily peeks; the mixing sd is `tau_se` standard errors of the first peek."""
    finite = np.isfinite(variance) & (variance > 0)
    if not finite.any():
        return {"pvalues": [1.0] * len(effect), "pvalue": 1.0, "rejected": False, "first_day": None,
                "tau": None}
    tau2 = tau_se**2 * float(variance[finite][0])
    pvalues = msprt_pvalues(effect, variance, tau2)
    below = np.flatnonzero(pvalues <= alpha)
    return {"pvalues": pvalues.tolist(), "pvalue": float(pvalues[-1]), "rejected": bool(len(below)),
            "first_day": int(below[0]) if len(below) else None, "tau": math.sqrt(tau2)}


def obrien_fleming_spending(fraction: np.ndarray, alpha: float) -> np.ndarray:
    """Two-sided alpha spent by information fraction t, Lan-DeMets O'Brien-Fleming type on each
    side (alpha/2 per side: 2 - 2 Phi(z_(alpha/4) / sqrt t)), the convention of R's ldbounds,
    gsDesign and spotify-confidence, so boundaries agree with their published tables."""
    per_side = 2 * scipy.stats.norm.sf(scipy.stats.norm.isf(alpha / 4) / np.sqrt(fraction))
    return 2 * per_side


def group_sequential_bounds(fraction: np.ndarray, alpha: float, grid_step: float = 0.004) -> np.ndarray:
    """Two-sided z boundaries for looks at information fractions `fraction` (increasing, last 1).

    Numerical integration of the Brownian motion B(t) under H0 on a grid (Armitage, McPherson &
    Rowe 1969): the density of paths not yet stopped is cut at each look so that exactly the
    alpha spent between looks leaves, then convolved with the N(0, dt) increment. Written here
    because spotify-confidence (which computes the same boundaries) is not installed.
    """
    spent = np.diff(obrien_fleming_spending(fraction, alpha), prepend=0.0)
    grid = np.arange(-8.0, 8.0 + grid_step / 2, grid_step)
    density = scipy.stats.norm.pdf(grid, scale=math.sqrt(fraction[0])) * grid_step
    bounds, previous = [], fraction[0]
    for t, spend in zip(fraction, spent, strict=True):
        if t > previous:
            sd = math.sqrt(t - previous)
            half_width = math.ceil(8 * sd / grid_step)  # odd length: "same" stays centred
            kernel_x = np.arange(-half_width, half_width + 1) * grid_step
            kernel = scipy.stats.norm.pdf(kernel_x, scale=sd) * grid_step
            density = np.clip(scipy.signal.fftconvolve(density, kernel, mode="same"), 0.0, None)
            previous = t
        # tail mass beyond |x| >= x_i on the non-negative half of the symmetric grid (each point
        # standing for the cell around it), interpolated to where it equals the alpha to spend
        half = grid >= -grid_step / 2
        x = grid[half]
        tail = 2 * (np.cumsum(density[half][::-1])[::-1] - density[half] / 2)
        b = float(np.interp(-spend, -tail, x)) if spend > tail[-1] else float(x[-1])
        bounds.append(b / math.sqrt(t))
        # stopped paths leave; the cell that b cuts keeps the part of its mass below b
        density = density * np.clip((b - np.abs(grid)) / grid_step + 0.5, 0.0, 1.0)
    return np.asarray(bounds)


def group_sequential_test(effect: np.ndarray, variance: np.ndarray, alpha: float) -> dict[str, Any]:
    """Daily peeks against O'Brien-Fleming-type alpha-spending boundaries (what spotify-confidence
    does): the false-positive rate over all daily looks is alpha, not the ~alpha * looks / 3 of
    naive repeated tests, and unlike the mSPRT it spends all of alpha by the last day.

    The information fraction of day d is V_last / V_d (the cumulative estimate's variance): known
    here because the simulated experiment ran to its end; a live test would plan V_last.
    """
    ok = np.isfinite(variance) & (variance > 0) & np.isfinite(effect)
    if not ok.all():
        return {"z": [], "bounds": [], "rejected": False, "first_day": None, "fraction": []}
    information = np.maximum.accumulate(1.0 / variance)
    fraction = information / information[-1]
    bounds = group_sequential_bounds(fraction, alpha)
    z = effect / np.sqrt(variance)
    crossed = np.flatnonzero(np.abs(z) >= bounds)
    return {"z": z.tolist(), "bounds": bounds.tolist(), "fraction": fraction.tolist(),
            "rejected": bool(len(crossed)), "first_day": int(crossed[0]) if len(crossed) else None}


# ---------------------------------------------------------------- novelty and projection


def _window_lift(numer: np.ndarray, denom: np.ndarray, treated: np.ndarray,
                 cols: slice) -> tuple[float, np.ndarray, np.ndarray]:
    """Lift over a window of days and each arm's per-unit influence values (control, treatment)."""
    window_numer, window_denom = numer[:, cols].sum(axis=1), denom[:, cols].sum(axis=1)
    ratio_c, infl_c = arm_ratio(window_numer[~treated], window_denom[~treated])
    ratio_t, infl_t = arm_ratio(window_numer[treated], window_denom[treated])
    return float(ratio_t - ratio_c), infl_c, infl_t


def _se(infl_c: np.ndarray, infl_t: np.ndarray) -> float:
    return math.sqrt(np.var(infl_c, ddof=1) / len(infl_c) + np.var(infl_t, ddof=1) / len(infl_t))


def novelty_check(numer: np.ndarray, denom: np.ndarray, treated: np.ndarray, window: int,
                  alpha: float) -> dict[str, Any]:
    """Does the lift of the first `window` days differ from that of the last `window` days?

    Rule: z = (early lift - late lift) / se, where se comes from each unit's influence contrast
    (early minus late), so the correlation of a unit's early and late days is accounted for.
    |z| > z_(1-alpha/2): "novelty" when early > late (the effect wears off), "primacy" when early <
    late (users needed time to adapt); otherwise "stable". `sign_flip` when the first day's lift
    and the late window's are each significant and of opposite signs (ahead on day 1, behind
    later, or the reverse).
    """
    days = numer.shape[1]
    if days < 2:
        return {"flag": "too_short", "window": window, "sign_flip": False}
    window = max(1, min(window, days // 2))
    early, early_c, early_t = _window_lift(numer, denom, treated, slice(0, window))
    late, late_c, late_t = _window_lift(numer, denom, treated, slice(days - window, days))
    first, first_c, first_t = _window_lift(numer, denom, treated, slice(0, 1))
    difference = early - late
    se = _se(early_c - late_c, early_t - late_t)
    z_crit = scipy.stats.norm.isf(alpha / 2)
    z = difference / se if se > 0 else 0.0
    flag = "stable"
    if abs(z) > z_crit:
        flag = "novelty" if difference > 0 else "primacy"
    se_first, se_late = _se(first_c, first_t), _se(late_c, late_t)
    first_sig = abs(first) > z_crit * se_first
    late_sig = abs(late) > z_crit * se_late
    return {
        "flag": flag, "window": window, "first_day_effect": first, "first_day_se": se_first,
        "early_effect": early, "early_se": _se(early_c, early_t), "late_effect": late,
        "late_se": se_late, "difference": difference, "difference_se": se, "z": float(z),
        "pvalue": float(2 * scipy.stats.norm.sf(abs(z))),
        "sign_flip": bool(first_sig and late_sig and np.sign(first) != np.sign(late)),
    }


def project_lift(days: np.ndarray, effect: np.ndarray, variance: np.ndarray, first_k: int,
                 alpha: float) -> dict[str, Any]:
    """Fit lift = a + b log(1 + day) on the first K days (weights 1/var) and extrapolate it to the
    last day; the error is the projection minus the real last-day lift.

    log(1 + day) because novelty and learning effects change fast at first and then level off;
    a straight line in days would run away over a month.
    """
    first_k = min(first_k, len(days) - 1)
    if first_k < 3:
        return {"first_k": first_k, "projected": None, "reason": "fewer than 3 days to fit"}
    x = sm.add_constant(np.log1p(days[:first_k].astype(float)))
    with np.errstate(divide="ignore"):
        weights = np.where(variance[:first_k] > 0, 1.0 / variance[:first_k], 0.0)
    if np.count_nonzero(weights) < 3:
        return {"first_k": first_k, "projected": None, "reason": "no variance in the first days"}
    fit = sm.WLS(effect[:first_k], x, weights=weights).fit()
    last = np.array([[1.0, math.log1p(float(days[-1]))]])
    prediction = fit.get_prediction(last).summary_frame(alpha=alpha).iloc[0]
    actual = float(effect[-1])
    return {
        "first_k": int(first_k), "last_day": int(days[-1]), "intercept": float(fit.params[0]),
        "slope_log_day": float(fit.params[1]), "projected": float(prediction["mean"]),
        "projected_ci_low": float(prediction["mean_ci_lower"]),
        "projected_ci_high": float(prediction["mean_ci_upper"]),
        "actual_last_day": actual, "error": float(prediction["mean"]) - actual,
    }


# ---------------------------------------------------------------- fixed horizon (tea-tasting)


def srm_check(arms: pd.Series, names: list[str], shares: list[float], alpha: float) -> dict[str, Any]:
    """Sample-ratio mismatch: units per arm against the configured shares.

    Two arms: tea-tasting's SampleRatio with the normal approximation and no continuity correction,
    which is Pearson's chi-square with one degree of freedom. More arms: scipy's chi-square.
    """
    counts = arms.value_counts().reindex(names, fill_value=0)
    empty = counts[counts == 0]
    if len(empty):
        raise ValueError(f"zero units in arm(s) {empty.index.tolist()}: nothing to compare")
    expected = np.asarray(shares, dtype=float) / sum(shares)
    if len(names) == 2:
        frame = pd.DataFrame({"arm": arms.to_numpy()})
        check = tt.SampleRatio(dict(zip(names, shares, strict=True)), method="norm", correction=False)
        pvalue = check.analyze(frame, names[0], names[1], variant="arm").pvalue
    else:
        pvalue = scipy.stats.chisquare(counts.to_numpy(), expected * counts.sum()).pvalue
    return {"counts": {k: int(v) for k, v in counts.items()},
            "expected_shares": dict(zip(names, expected.tolist(), strict=True)),
            "pvalue": float(pvalue), "mismatch": bool(pvalue < alpha)}


def _tt_metric(name: str, table: pd.DataFrame, cuped: bool) -> tt.RatioOfMeans:
    numer, denom = METRICS[name]
    if cuped:
        return tt.RatioOfMeans(numer, denom, f"pre_{numer}", f"pre_{denom}")
    return tt.RatioOfMeans(numer, denom)


def fixed_horizon(table: pd.DataFrame, control: str, treatment: str, metrics: list[str],
                  cuped: bool, alpha: float) -> dict[str, dict[str, float]]:
    """tea-tasting's lift, CI and p-value per metric on the per-unit table (CUPED or plain)."""
    pair = table[table["arm"].isin([control, treatment])]
    # a metric constant in both arms (RecSim worlds have a fixed session count) has zero variance:
    # its CI is NaN (null in the report), which is the truth, so scipy's warning is noise
    with tt.config_context(confidence_level=1 - alpha, alpha=alpha), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        experiment = tt.Experiment({m: _tt_metric(m, pair, cuped) for m in metrics}, variant="arm")
        result = experiment.analyze(pair, control=control)
        adjusted = tt.adjust_fdr(result, alpha=alpha)
    rows = {}
    for row in adjusted.to_dicts():
        rows[row["metric"]] = {
            "control": row["control"], "treatment": row["treatment"], "effect": row["effect_size"],
            "ci_low": row["effect_size_ci_lower"], "ci_high": row["effect_size_ci_upper"],
            "rel_effect": row["rel_effect_size"], "rel_ci_low": row["rel_effect_size_ci_lower"],
            "rel_ci_high": row["rel_effect_size_ci_upper"], "pvalue": row["pvalue"],
            "pvalue_adj": row["pvalue_adj"], "se": row["effect_size"] / row["statistic"]
            if row["statistic"] else float("nan"),
        }
    return rows


def minimum_detectable_effect(table: pd.DataFrame, metric: str, ratio: float, alpha: float,
                              power: float) -> dict[str, float]:
    """tea-tasting's MDE (absolute and relative) at this many units and this variance."""
    numer, denom = METRICS[metric]
    spec = tt.RatioOfMeans(numer, denom, alpha=alpha, power=power, ratio=ratio)
    try:
        row = spec.solve_power(table, "effect_size").to_dicts()[0]
    except (ValueError, ZeroDivisionError, RuntimeError) as e:
        # a metric with no variance (no churn in a short world) or too few units has no MDE
        return {"mde": None, "mde_rel": None, "power": power, "units": len(table),
                "reason": f"no minimum detectable effect: {e}"}
    return {"mde": float(row["effect_size"]), "mde_rel": float(row["rel_effect_size"]),
            "power": power, "units": len(table)}


# ---------------------------------------------------------------- the whole analysis


def _compare(result: ExperimentResult, sums: dict[str, pd.DataFrame], table: pd.DataFrame,
             treatment: str, config: AnalysisConfig) -> dict[str, Any]:
    control, alpha = result.control, config.alpha
    has_pre = bool(table["pre_user_days"].sum() > 0)
    use_cuped = config.cuped and has_pre
    plain = fixed_horizon(table, control, treatment, config.metrics, cuped=False, alpha=alpha)
    cuped = (fixed_horizon(table, control, treatment, config.metrics, cuped=True, alpha=alpha)
             if use_cuped else {})
    pair = table[table["arm"].isin([control, treatment])]
    treated = (pair["arm"] == treatment).to_numpy()
    day_cols = [d for d in sums["user_days"].columns if d >= 0]
    days = np.asarray(day_cols)
    ratio = result.shares[result.arms.index(treatment)] / result.shares[0]
    out = {}
    for metric in config.metrics:
        numer_col, denom_col = METRICS[metric]
        numer = sums[numer_col].loc[pair.index, day_cols].to_numpy(dtype=float)
        denom = sums[denom_col].loc[pair.index, day_cols].to_numpy(dtype=float)
        daily = daily_lift(numer, denom, treated, alpha)
        cumulative = daily_lift(numer, denom, treated, alpha, cumulative=True)
        entry: dict[str, Any] = {"plain": plain[metric]}
        if use_cuped:
            entry["cuped"] = cuped[metric]
            entry["cuped"]["variance_reduction"] = 1 - (cuped[metric]["se"] / plain[metric]["se"]) ** 2
        entry["decision"] = entry["cuped" if use_cuped else "plain"]
        entry["significant"] = bool(entry["decision"]["pvalue_adj"] < alpha)
        entry["daily"] = {"day": days.tolist(), **{k: v.tolist() for k, v in daily.items()}}
        entry["cumulative"] = {"day": days.tolist(), **{k: v.tolist() for k, v in cumulative.items()}}
        entry["sequential"] = group_sequential_test(cumulative["effect"], cumulative["var"], alpha)
        entry["msprt"] = msprt_test(cumulative["effect"], cumulative["var"], alpha, config.msprt_tau_se)
        entry["novelty"] = novelty_check(numer, denom, treated,
                                         config.novelty_days or max(1, len(days) // 4), alpha)
        entry["projection"] = project_lift(days, daily["effect"], daily["var"],
                                           config.projection_days or max(3, len(days) // 3), alpha)
        if config.with_power:
            entry["power"] = minimum_detectable_effect(pair, metric, ratio, alpha, config.power)
        if metric in result.gte:
            gte = float(result.gte[metric])
            estimate = entry["decision"]["effect"]
            entry["gte"] = {"estimate": estimate, "ci_low": entry["decision"]["ci_low"],
                            "ci_high": entry["decision"]["ci_high"], "gte": gte, "bias": estimate - gte,
                            "covered": bool(entry["decision"]["ci_low"] <= gte <= entry["decision"]["ci_high"])}
        out[metric] = entry
    return {"treatment": treatment, "cuped": use_cuped, "metrics": out,
            "significant": [m for m in config.metrics if out[m]["significant"]]}


def per_arm_daily(sums: dict[str, pd.DataFrame], arms: pd.Series, order: list[str],
                  metrics: list[str]) -> dict[str, Any]:
    """Daily and cumulative value of each metric per arm (for the 'cumulative metric per arm' plot)."""
    out: dict[str, Any] = {}
    day_cols = [d for d in sums["user_days"].columns if d >= 0]
    for arm in order:  # control first, so every plot colours the arms alike
        units = arms.index[arms == arm]
        out[str(arm)] = {}
        for metric in metrics:
            numer_col, denom_col = METRICS[metric]
            numer = sums[numer_col].loc[units, day_cols].sum(axis=0).to_numpy(dtype=float)
            denom = sums[denom_col].loc[units, day_cols].sum(axis=0).to_numpy(dtype=float)
            with np.errstate(divide="ignore", invalid="ignore"):
                out[str(arm)][metric] = {"daily": (numer / denom).tolist(),
                                         "cumulative": (np.cumsum(numer) / np.cumsum(denom)).tolist()}
    return out


CREATOR_METRICS = ("active_creators", "exits", "exposure_gini", "coverage", "novelty")


def creator_effects(result: ExperimentResult) -> dict[str, dict[str, Any]]:
    """Per creator metric: each arm's mean over experiment days, the difference to control, and
    the GTE and bias where the harness computed it. No CI: there is one world per arm-day, and
    under user randomisation both arms share the creators, so this difference is often ~0 while
    the GTE is not (that gap is the interference the report shows)."""
    frame = result.creators[result.creators["day"] >= 0]
    means = frame.groupby("arm")[list(CREATOR_METRICS)].mean()
    out = {}
    for metric in CREATOR_METRICS:
        per_arm = {str(arm): float(means.loc[arm, metric]) for arm in means.index}
        entry: dict[str, Any] = {"per_arm": per_arm}
        for arm in result.arms[1:]:
            if arm in per_arm and result.control in per_arm:
                entry.setdefault("estimate", {})[arm] = per_arm[arm] - per_arm[result.control]
        if metric in result.gte and "estimate" in entry and len(result.arms) == 2:
            estimate = entry["estimate"][result.arms[1]]
            entry["gte"] = float(result.gte[metric])
            entry["bias"] = estimate - entry["gte"]
        out[metric] = entry
    return out


def analyze(result: ExperimentResult, config: AnalysisConfig | None = None) -> dict[str, Any]:
    """Every statistic of an experiment, control against each other arm, as a plain dict.

    Under the creator design every user's slates mix both arms' creators, so the user-day frame
    has no treatment arm: the analysis is then the creator metrics per arm beside the GTE (the
    user metrics' effect is only in the GTE), with no user-side comparison and no SRM on users.
    """
    config = config or AnalysisConfig()
    if config.primary not in config.metrics:
        raise ValueError(f"analysis.primary {config.primary!r} is not among metrics {config.metrics}")
    if not (result.users["day"] >= 0).any():
        raise ValueError("ExperimentResult.users has no experiment day (day >= 0)")
    sums = unit_day_sums(result.users)
    days = sorted(d for d in sums["user_days"].columns if d >= 0)
    users_per_arm = result.users[result.users["day"] >= 0].groupby("arm")["user"].nunique()
    out = {
        "arms": list(result.arms), "control": result.control, "shares": list(result.shares),
        "design": result.design, "aa": bool(result.meta.get("aa", False)), "alpha": config.alpha,
        "primary": config.primary, "config": config.model_dump(),
        "users": {k: int(v) for k, v in users_per_arm.items()},
        "days": len(days), "pre_days": int(sum(1 for d in sums["user_days"].columns if d < 0)),
        "creator_effects": creator_effects(result),
        "creators": {col: result.creators[col].tolist() for col in result.creators.columns},
        "gte": dict(result.gte), "failures": list(result.failures), "meta": dict(result.meta),
    }
    if result.design == "creator":
        return {**out, "units": {}, "srm": None, "comparisons": [], "per_arm": {}}
    arms = unit_arms(result.users)
    srm = srm_check(arms, result.arms, result.shares, config.srm_alpha)
    lonely = {arm: n for arm, n in srm["counts"].items() if n < 2}
    if lonely:
        raise ValueError(f"arms {lonely} have a single randomisation unit ({result.design} design): "
                         "a variance needs at least 2 units per arm (more clusters or markets)")
    table = unit_table(sums, arms)
    return {
        **out, "units": srm["counts"], "srm": srm,
        "comparisons": [_compare(result, sums, table, arm, config) for arm in result.arms[1:]],
        "per_arm": per_arm_daily(sums, arms, result.arms, config.metrics),
    }
