"""The CreatorEcosystem log: item propensities that match what the logging policy does, and slates
that can be rebuilt from `session_id` and `slot` after the rows are shuffled."""

from __future__ import annotations

import gymnasium as gym
import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

import recray.simulators as sims
from recray.data.jagged import to_batch
from recray.simulators.logging_policy import (
    LogConfig,
    SoftmaxLoggingPolicy,
    inclusion_probabilities,
    schema_for_log,
    simulate_creator_log,
    write_creator_log,
)

DRAWS = 40_000
SMALL = LogConfig(num_users=200, days=2, world={"num_creators": 20})


@pytest.fixture(scope="module")
def log():
    return simulate_creator_log(SMALL)


@pytest.mark.parametrize("slate_size", [2, 3])
def test_logged_propensities_match_monte_carlo_frequencies(slate_size):
    env = gym.make_vec(sims.CREATOR_ECOSYSTEM, num_envs=3, vectorization_mode="vector_entry_point",
                       num_creators=10, num_candidates=6, slate_size=slate_size)
    obs, _ = env.reset(seed=2)
    # The same three sessions, offered DRAWS times each.
    many = {k: np.repeat(v, DRAWS, axis=0) for k, v in obs.items() if not isinstance(v, dict)}
    policy = SoftmaxLoggingPolicy(slate_size, temperature=0.5)
    slates, slot_propensity, propensity = policy.act(many, np.random.default_rng(0))
    session = np.repeat(np.arange(3), DRAWS)
    for s in range(3):
        rows = session == s
        shown = np.zeros(6)
        np.add.at(shown, slates[rows].ravel(), 1.0)
        frequency = shown / DRAWS
        # The logged per-item propensity of each candidate (the same whenever it is shown).
        logged = np.full(6, np.nan)
        logged[slates[rows].ravel()] = propensity[rows].ravel()
        sd = np.sqrt(logged * (1 - logged) / DRAWS)
        assert (np.abs(frequency - logged) < 5 * sd + 1e-4).all(), (frequency, logged)
        assert logged.sum() == pytest.approx(slate_size)
        # A slate's probability is the product of its slots' propensities.
        keys, counts = np.unique(slates[rows], axis=0, return_counts=True)
        top = np.argmax(counts)
        first = np.flatnonzero((slates[rows] == keys[top]).all(axis=1))[0]
        p_slate = np.prod(slot_propensity[rows][first])
        assert abs(counts[top] / DRAWS - p_slate) < 5 * np.sqrt(p_slate * (1 - p_slate) / DRAWS)


def test_inclusion_probabilities_of_a_slate_too_large_to_enumerate_are_refused():
    with pytest.raises(ValueError, match="slate_size: 6 of 20 candidates"):
        inclusion_probabilities(np.ones((1, 20)), 6)


def test_shuffled_rows_rebuild_each_slate_from_session_id_and_slot(log):
    k = 2
    shuffled = log.take(np.random.default_rng(0).permutation(log.num_rows))
    session = shuffled.column("session_id").to_numpy()
    order = np.lexsort((shuffled.column("slot").to_numpy(), session))
    rebuilt = shuffled.take(order)
    assert rebuilt.column("item_id").equals(log.column("item_id"))
    sessions = rebuilt.column("session_id").to_numpy().reshape(-1, k)
    assert (sessions == sessions[:, :1]).all() and len(np.unique(sessions[:, 0])) == len(sessions)
    np.testing.assert_array_equal(rebuilt.column("slot").to_numpy().reshape(-1, k),
                                  np.tile(np.arange(k), (len(sessions), 1)))
    for column in ("user_id", "day"):
        values = rebuilt.column(column).to_numpy().reshape(-1, k)
        assert (values == values[:, :1]).all(), column
    items = rebuilt.column("item_id").to_numpy().reshape(-1, k)
    assert (items[:, 0] != items[:, 1]).all()
    # Slot 0's pick is also its item's first chance to be shown: its propensity is at least that.
    first = rebuilt.column("slot_propensity").to_numpy().reshape(-1, k)[:, 0]
    assert (rebuilt.column("propensity").to_numpy().reshape(-1, k)[:, 0] >= first - 1e-6).all()


def test_session_slot_and_propensity_columns_are_not_features(log):
    schema = schema_for_log(log)
    names = {f.name for f in schema.features} | set(schema.labels)
    assert not names & {"session_id", "slot", "propensity", "slot_propensity", "p_click"}
    batch = to_batch(log, schema)
    assert batch.labels.shape == (log.num_rows, 3)
    assert pc.min(log.column("propensity")).as_py() > 0


def test_written_splits_keep_each_slate_whole(tmp_path, log):
    write_creator_log(tmp_path, SMALL)
    sessions = [pq.read_table(tmp_path / f"{name}.parquet").column("session_id").to_numpy()
                for name in ("train", "valid", "test")]
    # Time order (the rows are logged in session order), and no session in two splits.
    assert sessions[0].max() < sessions[1].min() and sessions[1].max() < sessions[2].min()
    sizes = np.array([len(s) for s in sessions])
    assert sizes.sum() == log.num_rows
    assert (np.abs(sizes - np.array([0.8, 0.1, 0.1]) * log.num_rows) <= 2).all()


@pytest.mark.parametrize("config, field", [({"days": 0}, "days"), ({"temperature": 0.0}, "temperature"),
                                           ({"world": {"horizon_days": 3}}, "world.horizon_days"),
                                           ({"world": {"num_users": 3}}, "world.num_users")])
def test_a_bad_log_config_names_its_field(config, field):
    with pytest.raises(ValueError, match=field):
        LogConfig(**config)
