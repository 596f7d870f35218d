"""A/B statistics against independent computations: scipy, statsmodels, the delta method by hand, Monte-Carlo."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import scipy.stats
import statsmodels.api as sm
from statsmodels.stats.multitest import multipletests
from statsmodels.stats.power import TTestIndPower

from recray.abtest.result import ExperimentResult
from recray.abtest.stats import (
    AnalysisConfig,
    analyze,
    daily_lift,
    group_sequential_bounds,
    group_sequential_test,
    minimum_detectable_effect,
    msprt_test,
    unit_arms,
    unit_day_sums,
    unit_table,
)
from recray.abtest.synthetic import synthetic_experiment

FAST = AnalysisConfig(with_power=False)


@pytest.fixture(scope="module")
def experiment() -> ExperimentResult:
    return synthetic_experiment(users=3000, days=10, pre_days=5, lift=0.05, seed=11)


@pytest.fixture(scope="module")
def analysis(experiment) -> dict:
    return analyze(experiment)


@pytest.fixture(scope="module")
def units(experiment) -> pd.DataFrame:
    return unit_table(unit_day_sums(experiment.users), unit_arms(experiment.users))


def test_plain_lift_matches_scipy_welch(analysis, units):
    per_user = units["watch_minutes"] / units["user_days"]
    control, treatment = per_user[units["arm"] == "control"], per_user[units["arm"] == "treatment"]
    welch = scipy.stats.ttest_ind(treatment, control, equal_var=False)
    ci = welch.confidence_interval(0.95)
    got = analysis["comparisons"][0]["metrics"]["watch_minutes"]["plain"]
    assert got["effect"] == pytest.approx(treatment.mean() - control.mean(), rel=1e-9)
    assert got["ci_low"] == pytest.approx(ci.low, rel=1e-7)
    assert got["ci_high"] == pytest.approx(ci.high, rel=1e-7)
    assert got["pvalue"] == pytest.approx(welch.pvalue, rel=1e-6)


def _delta_ratio_variance(numer: np.ndarray, denom: np.ndarray) -> float:
    """Var of mean(N)/mean(D) by the textbook delta formula (Deng et al. 2018, eq. 3)."""
    n, mn, md = len(numer), numer.mean(), denom.mean()
    cov = np.cov(numer, denom, ddof=1)
    return (cov[0, 0] / md**2 - 2 * mn * cov[0, 1] / md**3 + mn**2 * cov[1, 1] / md**4) / n


def test_ctr_by_the_delta_method_at_the_unit_by_hand(analysis, units):
    arms = {a: units[units["arm"] == a] for a in ("control", "treatment")}
    ratio = {a: f["clicks"].sum() / f["impressions"].sum() for a, f in arms.items()}
    var = sum(_delta_ratio_variance(f["clicks"].to_numpy(), f["impressions"].to_numpy())
              for f in arms.values())
    got = analysis["comparisons"][0]["metrics"]["ctr"]["plain"]
    assert got["effect"] == pytest.approx(ratio["treatment"] - ratio["control"], rel=1e-9)
    assert got["se"] == pytest.approx(np.sqrt(var), rel=1e-6)


def test_vectorised_daily_lift_agrees_with_tea_tasting_under_clusters():
    clustered = synthetic_experiment(users=2000, days=6, pre_days=0, lift=0.1, cluster_size=5, seed=4)
    result = analyze(clustered, FAST)
    metrics = result["comparisons"][0]["metrics"]
    assert result["units"]["control"] + result["units"]["treatment"] == 400
    for name in ("watch_minutes", "ctr"):
        whole_period = {k: v[-1] for k, v in metrics[name]["cumulative"].items()}
        assert whole_period["effect"] == pytest.approx(metrics[name]["plain"]["effect"], rel=1e-9)
        assert np.sqrt(whole_period["var"]) == pytest.approx(metrics[name]["plain"]["se"], rel=1e-9)


def test_cuped_theta_is_the_pooled_ols_slope(analysis, units):
    y = units["watch_minutes"] / units["user_days"]
    x = units["pre_watch_minutes"] / units["pre_user_days"]
    theta = sm.OLS(y.to_numpy(), sm.add_constant(x.to_numpy())).fit().params[1]
    treated = units["arm"] == "treatment"
    adjusted = (y[treated].mean() - y[~treated].mean()) - theta * (x[treated].mean() - x[~treated].mean())
    cuped = analysis["comparisons"][0]["metrics"]["watch_minutes"]["cuped"]
    assert cuped["effect"] == pytest.approx(adjusted, rel=1e-9)
    # with one covariate the variance falls by about the squared correlation
    assert cuped["variance_reduction"] == pytest.approx(np.corrcoef(x, y)[0, 1] ** 2, abs=0.02)
    assert cuped["variance_reduction"] > 0.1


def test_srm_matches_scipy_chisquare(experiment, analysis):
    counts = analysis["srm"]["counts"]
    observed = [counts["control"], counts["treatment"]]
    assert analysis["srm"]["pvalue"] == pytest.approx(scipy.stats.chisquare(observed).pvalue, rel=1e-9)
    assert not analysis["srm"]["mismatch"]
    wrong_shares = ExperimentResult(experiment.users, experiment.creators, experiment.arms,
                                    [0.4, 0.6], experiment.design)
    skewed = analyze(wrong_shares, AnalysisConfig(with_power=False, metrics=["active"], primary="active"))
    expected = np.array([0.4, 0.6]) * sum(observed)
    assert skewed["srm"]["pvalue"] == pytest.approx(scipy.stats.chisquare(observed, expected).pvalue,
                                                    rel=1e-6)
    assert skewed["srm"]["mismatch"]


def test_mde_matches_statsmodels_power(units):
    mde = minimum_detectable_effect(units, "watch_minutes", ratio=1.0, alpha=0.05, power=0.8)
    sd = (units["watch_minutes"] / units["user_days"]).std(ddof=1)
    d = TTestIndPower().solve_power(nobs1=len(units) / 2, ratio=1.0, alpha=0.05, power=0.8)
    assert mde["mde"] == pytest.approx(d * sd, rel=0.01)


def test_fdr_correction_matches_statsmodels_bh(analysis):
    metrics = analysis["comparisons"][0]["metrics"]
    raw = [m["cuped"]["pvalue"] for m in metrics.values()]
    adjusted = multipletests(raw, method="fdr_bh")[1]
    assert [m["cuped"]["pvalue_adj"] for m in metrics.values()] == pytest.approx(adjusted, rel=1e-9)


def test_injected_lift_is_found_and_covered(analysis):
    watch = analysis["comparisons"][0]["metrics"]["watch_minutes"]["decision"]
    assert watch["rel_ci_low"] < 0.05 < watch["rel_ci_high"]
    assert analysis["comparisons"][0]["metrics"]["ctr"]["significant"]


def test_alpha_spending_bounds_match_the_published_table():
    """Lan-DeMets O'Brien-Fleming bounds, 5 equally spaced looks, two-sided alpha 0.05 (0.025 a
    side), as R's ldbounds prints them (`bounds(seq(0.2, 1, 0.2), iuse=c(1, 1))`)."""
    bounds = group_sequential_bounds(np.linspace(0.2, 1.0, 5), alpha=0.05)
    assert bounds == pytest.approx([4.8769, 3.3569, 2.6803, 2.2898, 2.0310], abs=5e-4)


def test_daily_peeks_keep_their_false_positive_rate_monte_carlo():
    """A/A, 10 daily peeks at cumulative means: naive repeated tests inflate the false-positive
    rate, the alpha-spending test keeps it at alpha and the mSPRT below it."""
    rng = np.random.default_rng(0)
    sims, units, days, alpha = 600, 200, 10, 0.05
    rejected = {"naive": 0, "fixed": 0, "gst": 0, "msprt": 0}
    for _ in range(sims):
        values = rng.normal(0.0, 0.3, size=(units, 1)) + rng.normal(size=(units, days))
        treated = rng.random(units) < 0.5
        lift = daily_lift(values, np.ones_like(values), treated, alpha, cumulative=True)
        outside = (lift["ci_low"] > 0) | (lift["ci_high"] < 0)
        rejected["naive"] += bool(outside.any())
        rejected["fixed"] += bool(outside[-1])
        rejected["gst"] += group_sequential_test(lift["effect"], lift["var"], alpha)["rejected"]
        rejected["msprt"] += msprt_test(lift["effect"], lift["var"], alpha, 2.0)["rejected"]
    rate = {k: v / sims for k, v in rejected.items()}
    slack = 3 * np.sqrt(alpha * (1 - alpha) / sims)
    assert rate["naive"] > alpha + 2 * slack
    assert abs(rate["fixed"] - alpha) < slack
    assert abs(rate["gst"] - alpha) < slack
    assert rate["msprt"] < alpha + slack


def test_sequential_test_stops_early_on_a_large_effect():
    strong = analyze(synthetic_experiment(users=3000, days=10, pre_days=0, lift=0.3, seed=2), FAST)
    ctr = strong["comparisons"][0]["metrics"]["ctr"]
    assert ctr["sequential"]["rejected"] and ctr["sequential"]["first_day"] < 9
    assert ctr["msprt"]["rejected"]


def test_novelty_flags_a_decaying_effect_and_not_a_flat_one():
    decaying = np.linspace(0.4, -0.15, 12)
    novel = analyze(synthetic_experiment(users=4000, days=12, pre_days=0, lift=decaying, seed=5), FAST)
    flag = novel["comparisons"][0]["metrics"]["ctr"]["novelty"]
    assert flag["flag"] == "novelty" and flag["sign_flip"]
    assert flag["first_day_effect"] > 0 > flag["late_effect"]
    flat = analyze(synthetic_experiment(users=4000, days=12, pre_days=0, lift=0.1, seed=5), FAST)
    assert flat["comparisons"][0]["metrics"]["ctr"]["novelty"]["flag"] == "stable"
    growing = analyze(synthetic_experiment(users=4000, days=12, pre_days=0, lift=decaying[::-1], seed=6),
                      FAST)
    assert growing["comparisons"][0]["metrics"]["ctr"]["novelty"]["flag"] == "primacy"


def test_projection_follows_a_log_trend_to_the_last_day():
    days = np.arange(21)
    true_lift = 0.3 - 0.08 * np.log1p(days)  # relative lift on the click probability
    result = analyze(synthetic_experiment(users=6000, days=21, pre_days=0, lift=true_lift,
                                          churn_hazard=0.0, seed=8), AnalysisConfig(
        with_power=False, metrics=["ctr"], primary="ctr", projection_days=7))
    metric = result["comparisons"][0]["metrics"]["ctr"]
    projection = metric["projection"]
    assert projection["first_k"] == 7
    assert projection["error"] == pytest.approx(projection["projected"] - metric["daily"]["effect"][-1])
    # the relative lift at day 20 is about 0.3 - 0.08 log 21 = 0.056, far below the first week's
    control = metric["daily"]["control"][-1]
    assert projection["projected"] / control == pytest.approx(true_lift[-1], abs=0.04)
    assert projection["projected_ci_low"] < metric["daily"]["effect"][-1] < projection["projected_ci_high"]


def test_aa_mode_analyses_identical_arms():
    aa = analyze(synthetic_experiment(users=2000, days=7, pre_days=3, lift=0.0, seed=9), FAST)
    assert aa["aa"]
    assert not aa["srm"]["mismatch"]
    for metric in aa["comparisons"][0]["metrics"].values():
        assert metric["decision"]["ci_low"] < metric["decision"]["ci_high"]
        assert np.isfinite(metric["decision"]["pvalue"])


def test_estimate_bias_against_the_gte(experiment):
    with_gte = ExperimentResult(experiment.users, experiment.creators, experiment.arms,
                                experiment.shares, experiment.design, gte={"watch_minutes": 0.2})
    got = analyze(with_gte, FAST)["comparisons"][0]["metrics"]["watch_minutes"]["gte"]
    assert got["gte"] == 0.2
    assert got["bias"] == pytest.approx(got["estimate"] - 0.2)


def test_bad_input_is_refused_by_name(experiment):
    with pytest.raises(ValueError, match="unknown metrics \\['dwell'\\]"):
        AnalysisConfig(metrics=["ctr", "dwell"])
    with pytest.raises(ValueError, match="primary 'ctr'"):
        analyze(experiment, AnalysisConfig(metrics=["active"], primary="ctr"))
    only_control = experiment.users.assign(arm="control")
    with pytest.raises(ValueError, match="zero units in arm\\(s\\) \\['treatment'\\]"):
        analyze(ExperimentResult(only_control, experiment.creators, experiment.arms,
                                 experiment.shares, "user"), FAST)
    flipped = experiment.users.copy()
    first = flipped.index[(flipped["unit"] == 0) & (flipped["day"] == 0)]
    flipped.loc[first, "arm"] = "treatment" if flipped.loc[first[0], "arm"] == "control" else "control"
    with pytest.raises(ValueError, match="units \\[0\\] appear in more than one arm"):
        analyze(ExperimentResult(flipped, experiment.creators, experiment.arms, experiment.shares,
                                 "user"), FAST)


def test_clickbait_vs_kale_on_long_term_satisfaction_is_flagged_as_novelty():
    """The real harness world: clickbait wins the first day, then users' satisfaction sinks
    (slow memory, sensitive users) and it loses every later day; the rule flags it."""
    from recray.abtest.config import parse_config
    from recray.abtest.harness import run_experiment

    cfg = parse_config({
        "name": "clickbait-vs-kale", "users": 600, "days": 10, "gte": False,
        "world": {"env": "recray/LongTermSatisfaction-v0", "steps_per_day": 3,
                  "params": {"memory_discount": 0.97, "sensitivity": 0.15}},
        "arms": [{"name": "kale", "share": 0.5, "policy": "kale"},
                 {"name": "clickbait", "share": 0.5, "policy": "myopic"}]})
    result = analyze(run_experiment(cfg), AnalysisConfig(with_power=False, metrics=["watch_minutes"],
                                                         primary="watch_minutes"))
    watch = result["comparisons"][0]["metrics"]["watch_minutes"]
    assert watch["daily"]["rel_effect"][0] > 0 > watch["daily"]["rel_effect"][-1]
    assert watch["novelty"]["flag"] == "novelty" and watch["novelty"]["sign_flip"]


def test_few_units_and_flat_metrics_are_handled():
    """Two markets an arm, no churn: the MDE of the flat metric is null, not a crash; a single
    unit in an arm is refused by name."""
    few = analyze(synthetic_experiment(users=40, days=3, pre_days=2, cluster_size=10,
                                       churn_hazard=0.0, seed=1))
    churned = few["comparisons"][0]["metrics"]["churned"]
    assert few["units"] == {"control": 2, "treatment": 2}
    assert churned["power"]["mde"] is None and "no minimum detectable effect" in churned["power"]["reason"]
    lonely = next(r for r in (synthetic_experiment(users=40, days=3, pre_days=2, cluster_size=10,
                                                   seed=s) for s in range(20))
                  if r.users.groupby("arm")["unit"].nunique().min() == 1)
    with pytest.raises(ValueError, match="single randomisation unit \\(cluster design\\)"):
        analyze(lonely, FAST)
