"""Behaviour of the gymnasium worlds, their vectorised forms, and the policies that drive them."""

from __future__ import annotations

import gymnasium as gym
import numpy as np
import pytest
from gymnasium.utils.env_checker import check_env, data_equivalence

import recray.simulators as sims
from recray.simulators import interest_evolution as ie
from recray.simulators import long_term_satisfaction as lts
from recray.simulators.evaluate import crossover_sensitivity, mean_return
from recray.simulators.policies import make_policy

SLATE_ENVS = [sims.LONG_TERM_SATISFACTION, sims.INTEREST_EVOLUTION]
# Short IE budgets so that episodes end (and autoreset) within a few dozen steps.
SMALL = {sims.LONG_TERM_SATISFACTION: {"time_budget": 8},
         sims.INTEREST_EVOLUTION: {"time_budget": 12.0}}


@pytest.mark.parametrize("env_id", SLATE_ENVS)
def test_env_passes_gymnasium_check_env(env_id):
    env = gym.make(env_id)
    check_env(env.unwrapped, skip_render_check=True)
    assert env.unwrapped.spec.vector_entry_point is not None
    assert isinstance(env.action_space, gym.spaces.MultiDiscrete)
    # Sampled slates never repeat a candidate, so random agents never hit the duplicate error.
    assert all(len(set(env.action_space.sample().tolist())) == 2 for _ in range(200))


@pytest.mark.parametrize("env_id", SLATE_ENVS)
def test_native_vector_env_equals_sync_vector_env_over_scalar_envs(env_id):
    # User i of the native env seeded s is the scalar env seeded s + i, across autoresets too.
    num_users = 37  # not a power of two, so numpy's SIMD tails are exercised
    sync = gym.make_vec(env_id, num_envs=num_users, vectorization_mode="sync", **SMALL[env_id])
    native = gym.make_vec(env_id, num_envs=num_users, vectorization_mode="vector_entry_point",
                          **SMALL[env_id])
    assert isinstance(native, gym.vector.VectorEnv) and not isinstance(native, gym.vector.SyncVectorEnv)
    obs_sync, info_sync = sync.reset(seed=11)
    obs_native, info_native = native.reset(seed=11)
    assert data_equivalence(obs_sync, obs_native, exact=True)
    rng = np.random.default_rng(0)
    policy = make_policy("random", env_id, slate_size=2)
    resets = 0
    for _ in range(40):
        actions = policy.act(obs_native, rng)
        got_sync, got_native = sync.step(actions), native.step(actions)
        for a, b in zip(got_sync[:4], got_native[:4], strict=True):
            assert data_equivalence(a, b, exact=True)
        assert sorted(got_sync[4]) == sorted(got_native[4])
        for key, value in got_sync[4].items():
            np.testing.assert_array_equal(value, got_native[4][key], err_msg=key)
        obs_native = got_native[0]
        resets += int((got_native[2] | got_native[3]).sum())
    assert resets > num_users  # every user went through at least one autoreset


@pytest.mark.parametrize("env_id", SLATE_ENVS)
@pytest.mark.parametrize("action, message", [
    ([0, 0], "repeats a candidate"),
    ([0, 10], "expected a candidate index in"),
    ([-1, 3], "expected a candidate index in"),
    ([0, 1, 2], "slate_size=2"),
    ([0.5, 1], "integer"),
])
def test_bad_slates_raise_a_clear_error(env_id, action, message):
    env = gym.make(env_id).unwrapped
    env.reset(seed=0)
    with pytest.raises(ValueError, match=message):
        env.step(np.array(action))
    vec = gym.make_vec(env_id, num_envs=3, vectorization_mode="vector_entry_point")
    vec.reset(seed=0)
    with pytest.raises(ValueError, match=message):
        vec.step(np.array([[1, 2][: len(action)] + [3] * (len(action) - 2), action, action]))


def test_privileged_truth_is_in_info_not_in_the_observation():
    env = gym.make(sims.INTEREST_EVOLUTION).unwrapped
    obs, info = env.reset(seed=0)
    assert set(obs) == {"user", "doc", "response"}
    assert set(obs["response"]) == {"click", "watch_time"}
    assert info["quality"].shape == (10,)
    obs, info = gym.make(sims.LONG_TERM_SATISFACTION).unwrapped.reset(seed=0)
    assert set(obs) == {"doc", "response"} and "satisfaction" in info


def test_lts_follows_recsim_code_semantics():
    model = lts.LongTermSatisfaction(sensitivity=0.5, innovation_stddev=0.0, choc_stddev=0.0,
                                     kale_stddev=0.0, time_budget=3)
    env = lts.make_env(**{k: getattr(model, k) for k in ("sensitivity", "innovation_stddev",
                                                          "choc_stddev", "kale_stddev",
                                                          "time_budget")})
    obs, info = env.reset(seed=5)
    assert abs(info["net_positive_exposure"]) <= 0.5 / (1 - 0.7)
    c = float(obs["doc"][3, 0])
    obs, reward, terminated, _, new_info = env.step(np.array([3, 0]))
    # Engagement uses the satisfaction before the update; the update subtracts 2 (c - 0.5).
    assert reward == pytest.approx(np.exp((c * 5.0 + (1 - c) * 4.0) * info["satisfaction"]))
    assert new_info["net_positive_exposure"] == pytest.approx(
        0.7 * info["net_positive_exposure"] - 2.0 * (c - 0.5))
    assert obs["response"]["click"].tolist() == [1, 0]
    assert not terminated
    env.step(np.array([0, 1]))
    assert env.step(np.array([0, 1]))[3]  # exactly time_budget steps


@pytest.mark.parametrize("env_id, time_limit", [(sims.LONG_TERM_SATISFACTION, True),
                                                 (sims.INTEREST_EVOLUTION, False)])
def test_a_time_limit_truncates_and_a_spent_budget_terminates(env_id, time_limit):
    # LTS stops after a fixed number of steps whatever the user does: gymnasium's `truncated`.
    # IE's budget is the user's state (watching spends it): running out is `terminated`.
    params = SMALL[env_id]
    env = gym.make(env_id, **params).unwrapped
    env.reset(seed=3)
    steps, done = 0, (False, False)
    while not any(done):
        _, _, *done, _ = env.step(np.array([0, 1]))
        steps += 1
    assert done == [not time_limit, time_limit]
    if time_limit:
        assert steps == params["time_budget"]
    vec = gym.make_vec(env_id, num_envs=5, vectorization_mode="vector_entry_point", **params)
    vec.reset(seed=3)
    ended = np.zeros((2, 5), dtype=bool)
    for _ in range(60):
        _, _, terminated, truncated, _ = vec.step(np.tile([0, 1], (5, 1)))
        ended |= np.array([terminated, truncated])
    assert ended[1 if time_limit else 0].all() and not ended[0 if time_limit else 1].any()


def test_ie_choice_and_interest_update_follow_recsim():
    probs = ie.choice_probabilities(np.array([[1.0, -1.0]]), no_click_mass=1.0, min_normalizer=-1.0)
    np.testing.assert_allclose(probs, [[2 / 4, 0.0, 2 / 4]])
    np.testing.assert_allclose(ie.cluster_quality_means(20, -3, 3)[[0, 13, 14, 19]], [-3, 0, 0, 3])
    # Towards the video when the flip is under (interest + 1) / 2, away otherwise.
    assert ie.evolve_interest(np.array([0.0]), np.array([0.1]), 1.0, 0.3)[0] == pytest.approx(0.3)
    assert ie.evolve_interest(np.array([0.0]), np.array([0.9]), 1.0, 0.3)[0] == pytest.approx(-0.3)
    budget = ie.spend_budget(np.array([10.0, 10.0]), np.array([True, False]), np.array([4.0, 0.0]),
                             np.array([3.0, 0.0]), 0.9 / 3.4, 0.5)
    np.testing.assert_allclose(budget, [10 - 4 + 0.9 / 3.4 * 4 * 3, 9.5])


@pytest.mark.parametrize("env_id, names", [
    (sims.LONG_TERM_SATISFACTION, ["random", "myopic", "kale", "popularity", "thompson"]),
    (sims.INTEREST_EVOLUTION, ["random", "myopic", "quality", "popularity", "thompson"]),
])
def test_every_policy_returns_valid_slates_for_a_batch(env_id, names):
    env = gym.make_vec(env_id, num_envs=16, vectorization_mode="vector_entry_point", slate_size=3)
    obs, info = env.reset(seed=0)
    rng = np.random.default_rng(0)
    for name in names:
        policy = make_policy(name, env_id, slate_size=3)
        for _ in range(3):
            actions = policy.act(obs, rng, info)
            sims.validate_slates(actions, 10, 3)
            next_obs, reward, terminated, truncated, info = env.step(actions)
            policy.update(obs, actions, reward, next_obs, terminated | truncated)
            obs = next_obs


def test_lts_myopic_wins_at_low_sensitivity_and_loses_at_high():
    env = sims.LONG_TERM_SATISFACTION
    assert mean_return(env, "myopic", 300, sensitivity=0.01) > mean_return(env, "kale", 300,
                                                                             sensitivity=0.01)
    assert mean_return(env, "myopic", 300, sensitivity=0.5) < mean_return(env, "kale", 300,
                                                                            sensitivity=0.5)


def test_lts_crossover_sensitivity_is_near_the_steady_state_prediction():
    # Steady state: npe -> -/+ 2 (E[max or min of 10 uniforms] - 0.5) / (1 - 0.7) = -/+ 2.73 and
    # engagement ~ exp(loc + 1/2), so 4.909 sigmoid(-2.73 s) = 4.091 sigmoid(2.73 s) at s ~ 0.067.
    crossover = crossover_sensitivity(low=0.01, high=0.5, num_users=300, tolerance=0.05)
    assert 0.05 < crossover < 0.09


def test_ie_quality_aware_greedy_beats_click_myopic_greedy():
    env = sims.INTEREST_EVOLUTION
    assert mean_return(env, "quality", 200) > 1.3 * mean_return(env, "myopic", 200)


# --- CreatorEcosystem ---------------------------------------------------------------------------
TINY_WORLD = {"num_creators": 8, "horizon_days": 3, "num_candidates": 6}


def test_creator_ecosystem_passes_check_env():
    env = gym.make(sims.CREATOR_ECOSYSTEM, num_users=30, **TINY_WORLD)
    check_env(env.unwrapped, skip_render_check=True)


def test_creator_vector_env_serves_the_same_sessions_as_the_scalar_env():
    # The scalar env serves the active users of each round one by one, in index order.
    num_users = 23
    vec = gym.make_vec(sims.CREATOR_ECOSYSTEM, num_envs=num_users,
                       vectorization_mode="vector_entry_point", **TINY_WORLD)
    scalar = gym.make(sims.CREATOR_ECOSYSTEM, num_users=num_users, **TINY_WORLD).unwrapped
    obs, _ = vec.reset(seed=4)
    scalar_obs, scalar_info = scalar.reset(seed=4)
    policy, rng = make_policy("random", sims.CREATOR_ECOSYSTEM, 2), np.random.default_rng(0)
    sessions = 0
    while True:
        actions = policy.act(obs, rng)
        next_obs, reward, _, truncated, _ = vec.step(actions)
        for user in np.flatnonzero(obs["active"][:, 0]):
            assert scalar_info["user"] == user
            row = {k: ({a: b[user] for a, b in v.items()} if isinstance(v, dict) else v[user])
                   for k, v in obs.items()}
            assert data_equivalence(row, scalar_obs, exact=True)
            scalar_obs, scalar_reward, _, scalar_truncated, scalar_info = scalar.step(actions[user])
            assert scalar_reward == reward[user]
            sessions += 1
        obs = next_obs
        if truncated.all():
            break
    assert scalar_truncated and sessions > 2 * num_users


def test_creator_bad_slates_raise_for_active_users_only():
    vec = gym.make_vec(sims.CREATOR_ECOSYSTEM, num_envs=5, vectorization_mode="vector_entry_point",
                       **TINY_WORLD)
    obs, _ = vec.reset(seed=0)
    actions = np.tile([0, 1], (5, 1))
    actions[int(np.flatnonzero(obs["active"][:, 0])[0])] = [2, 2]
    with pytest.raises(ValueError, match="repeats a candidate"):
        vec.step(actions)


@pytest.fixture(scope="module")
def thirty_days():
    from recray.simulators.evaluate import ecosystem_days

    return {name: ecosystem_days(name, days=30, num_users=1000, num_creators=100)
            for name in ("popularity", "myopic", "exposure_aware", "clickbait", "kale")}


def test_popularity_and_myopic_ranking_lose_more_creators_and_diversity(thirty_days):
    fair = thirty_days["exposure_aware"]
    for name in ("popularity", "myopic"):
        assert thirty_days[name]["creator_exits"] > fair["creator_exits"], name
        assert thirty_days[name]["catalog_diversity"] < fair["catalog_diversity"], name


def test_clickbait_leads_kale_at_first_and_trails_later(thirty_days):
    from recray.simulators.evaluate import crossing_day, ecosystem_days

    # Mean daily engagement over three worlds: one world's crossing day ranges from 1 to 21.
    clickbait, kale = (thirty_days[name]["daily_engagement"] + sum(
        ecosystem_days(name, days=30, num_users=1000, num_creators=100, seed=seed)[
            "daily_engagement"] for seed in (1, 2)) for name in ("clickbait", "kale"))
    assert clickbait[0] > kale[0]
    day = crossing_day(clickbait, kale)
    assert day is not None and 1 <= day < 30


# --- RL and logged data -------------------------------------------------------------------------
def test_reinforce_learns_to_beat_myopic_at_high_sensitivity():
    from recray.simulators.evaluate import episode_returns
    from recray.simulators.rl import reinforce_training_seeds, train_reinforce

    env = sims.LONG_TERM_SATISFACTION
    agent, history = train_reinforce(env, num_users=128, iterations=10, sensitivity=0.5)
    assert history[-1] > history[0]
    # Evaluated on 300 users it never trained on (user i of `seed=s` has seed s + i).
    trained = reinforce_training_seeds(num_users=128, iterations=10)
    seed = trained.stop
    assert not set(range(seed, seed + 300)) & set(trained)
    learned = episode_returns(env, agent, 300, seed=seed, sensitivity=0.5).mean()
    assert learned > 2 * mean_return(env, "myopic", 300, seed=seed, sensitivity=0.5)


def test_creator_log_follows_the_data_schema_with_propensities_and_truth():
    import pyarrow as pa

    from recray.simulators.logging_policy import (
        LogConfig,
        oracle_click_auc,
        schema_for_log,
        simulate_creator_log,
    )

    table = simulate_creator_log(LogConfig(num_users=200, days=2, world={"num_creators": 20}))
    schema = schema_for_log(table)
    assert table.schema.field("history").type == pa.list_(pa.int64())
    for feature in schema.features:
        assert feature.name in table.column_names
    for label in schema.labels + ["p_click", "propensity"]:
        assert table.schema.field(label).type == pa.float32()
    propensity = table.column("propensity").to_numpy()
    assert ((propensity > 0) & (propensity <= 1)).all()
    assert 0.5 < oracle_click_auc(table) < 1.0
