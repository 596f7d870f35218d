"""CreatorEcosystem's world as its docstrings state it: independent attributes, distinct candidates,
items owned by creators, lifetimes, the seeded catalog, interests, and how episodes end."""

from __future__ import annotations

import gymnasium as gym
import numpy as np
import pytest
from scipy import stats

import recray.simulators as sims
from recray.simulators.creator_ecosystem import CreatorEcosystem, CreatorWorld
from recray.simulators.policies import make_policy
from recray.simulators.streams import keys_from_seeds

# Significance for the statistical checks: the draws are seeded, so a pass is reproducible, and
# under the model's independence a p-value this small would be a one-in-a-thousand draw.
ALPHA = 1e-3


def world(seed: int = 0, **params) -> CreatorWorld:
    return CreatorWorld(CreatorEcosystem(**{"num_users": 1, **params}), keys_from_seeds(
        np.array([seed])))


def run_days(num_users: int, seed: int = 0, **params):
    """(observation, info, actions, next observation, reward, terminated, truncated, next info)
    per step of a random policy, over the whole horizon."""
    env = gym.make_vec(sims.CREATOR_ECOSYSTEM, num_envs=num_users,
                       vectorization_mode="vector_entry_point", **params)
    obs, info = env.reset(seed=seed)
    policy, rng = make_policy("random", sims.CREATOR_ECOSYSTEM, 2), np.random.default_rng(seed)
    while True:
        actions = policy.act(obs, rng)
        step = env.step(actions)
        yield env, obs, info, actions, *step
        obs, info = step[0], step[4]
        if step[3].all():
            return


def quintiles(x: np.ndarray) -> np.ndarray:
    return np.searchsorted(np.quantile(x, [0.2, 0.4, 0.6, 0.8]), x)


def test_public_creator_and_item_features_are_independent_of_hidden_quality():
    w = world(num_creators=20_000)
    clickbait, quality = w.creator_clickbait, w.creator_quality
    n = len(quality)
    # Pearson's r of independent variables is ~ N(0, 1/n); 4 standard errors.
    assert abs(np.corrcoef(clickbait, np.abs(quality))[0, 1]) < 4 / np.sqrt(n)
    # The range of quality does not depend on the clickbait style (it did: |q| < 0.45 above 0.9).
    assert stats.ks_2samp(np.abs(quality[clickbait > 0.9]),
                          np.abs(quality[clickbait < 0.1])).pvalue > ALPHA
    assert stats.kruskal(*[quality[w.topic_mix.argmax(axis=1) == t]
                           for t in range(w.p.num_topics)]).pvalue > ALPHA
    # Items: quality = creator quality + noise; clickbait = creator style + offset; the topic is
    # drawn from the creator's mix. Noise, offset and topic are mutually independent.
    stored = np.flatnonzero(w.item_uid >= 0)
    owner = w.item_slot[stored]
    noise = w.item_quality[stored] - quality[owner]
    offset = w.item_clickbait[stored] - clickbait[owner]
    unclipped = (w.item_clickbait[stored] > 0) & (w.item_clickbait[stored] < 1)
    table = np.zeros((5, 5))
    np.add.at(table, (quintiles(noise[unclipped]), quintiles(offset[unclipped])), 1)
    assert stats.chi2_contingency(table).pvalue > ALPHA
    # The topic against the quality noise, among creators' main topics only (enough items each).
    main = w.item_topic[stored] == w.topic_mix[owner].argmax(axis=1)
    table = np.zeros((w.p.num_topics, 5))
    np.add.at(table, (w.item_topic[stored][main], quintiles(noise[main])), 1)
    assert stats.chi2_contingency(table).pvalue > ALPHA


def test_day0_interests_are_squared_uniforms_over_minus_one_to_one():
    interests = world(num_users=5000).interests.ravel()
    assert interests.min() >= -1.0 and interests.max() <= 1.0
    # 2 U^2 - 1 has CDF sqrt((x + 1) / 2) on [-1, 1].
    assert stats.kstest(interests, lambda x: np.sqrt((np.clip(x, -1, 1) + 1) / 2)).pvalue > ALPHA


def test_candidates_are_distinct_items():
    for _, obs, *_ in run_days(500, num_creators=100, horizon_days=10):
        ids = np.sort(obs["item_id"][obs["active"][:, 0] > 0], axis=1)
        assert (ids[:, 1:] != ids[:, :-1]).all()


# 10 creators: 50 recent items, so nearly every draw of 20 repeats one and is redrawn; 200
# creators: 1000 items, so most draws are kept as drawn.
@pytest.mark.parametrize("num_creators", [10, 200])
def test_candidates_are_a_uniform_sample_of_the_recent_catalog(num_creators):
    env = gym.make_vec(sims.CREATOR_ECOSYSTEM, num_envs=20_000,
                       vectorization_mode="vector_entry_point", num_creators=num_creators)
    obs, _ = env.reset(seed=0)
    pool = np.sort(env.unwrapped.world.item_uid[env.unwrapped.world.pool])
    ids = obs["item_id"]
    assert np.isin(ids, pool).all()
    # Every recent item is equally likely to be retrieved, and to come first.
    counts = np.bincount(np.searchsorted(pool, ids.ravel()), minlength=len(pool))
    assert stats.chisquare(counts).pvalue > ALPHA
    first = np.bincount(np.searchsorted(pool, ids[:, 0]), minlength=len(pool))
    assert stats.chisquare(first).pvalue > ALPHA


def test_items_keep_their_creators_id_when_the_slot_changes_hands():
    # No creator can reach a satisfaction of 0.9 from 0.5 in a day, so every creator leaves each
    # evening and a newcomer takes its slot: slots change hands daily.
    owner_of: dict[int, int] = {}
    orphans_shown = 0
    for env, obs, _, actions, _, _, _, _, _ in run_days(
            300, num_creators=10, horizon_days=8, exit_satisfaction=0.9, entry_prob=1.0,
            num_candidates=10):
        w = env.unwrapped.world
        served = np.flatnonzero(obs["active"][:, 0])
        for item, creator in zip(obs["item_id"][served].ravel(), obs["creator_id"][served].ravel(),
                                 strict=True):
            assert owner_of.setdefault(int(item), int(creator)) == creator, item
        shown = np.take_along_axis(obs["creator_id"][served], actions[served], axis=1).ravel()
        orphans_shown += int((~np.isin(shown, w.creator_id[w.creator_alive])).sum())
    assert w.exits >= 7 * 10 and orphans_shown > 0


def test_a_creators_exposure_counts_the_impressions_of_its_own_items():
    tally: dict[int, int] = {}
    for env, obs, _, actions, *_ in run_days(
            300, num_creators=10, horizon_days=8, exit_satisfaction=0.9, entry_prob=1.0,
            num_candidates=10):
        w = env.unwrapped.world
        if w.round == 0:
            tally = {}  # the step closed a day, and the day's statistics start afresh
            continue
        served = np.flatnonzero(obs["active"][:, 0])
        shown = np.take_along_axis(obs["creator_id"][served], actions[served], axis=1).ravel()
        for creator in shown.tolist():
            tally[creator] = tally.get(creator, 0) + 1
        # Slots change hands only at day ends, so each slot holds today's creator.
        np.testing.assert_array_equal(w.exposure_today, [tally.get(c, 0) for c in w.creator_id])


def test_items_are_shown_from_the_day_after_upload_for_exactly_their_lifetime():
    # A one-day lifetime: every candidate from day 1 on is one of last evening's uploads.
    for _, obs, info, *_ in run_days(200, num_creators=50, horizon_days=4, item_lifetime_days=1):
        if info["day"][0] > 0:
            ages = obs["doc"][..., -1][obs["active"][:, 0] > 0]  # (day - upload day) / lifetime
            np.testing.assert_array_equal(ages, 1.0)
    # Seven seeded items per creator and a seven-day lifetime: all of them are recent on day 0.
    env = gym.make_vec(sims.CREATOR_ECOSYSTEM, num_envs=2000,
                       vectorization_mode="vector_entry_point", num_creators=20, initial_items=7)
    obs, _ = env.reset(seed=0)
    assert set(np.unique(obs["item_id"])) == set(range(20 * 7))
    assert set(np.unique(np.round(obs["doc"][..., -1] * 7))) == set(range(1, 8))


def test_a_seeded_catalog_longer_than_the_lifetime_has_no_clones():
    w = world(num_creators=30, initial_items=10, item_lifetime_days=3)
    stored = w.item_uid >= 0
    assert stored.sum() == 300
    assert len(np.unique(w.item_quality[stored])) == 300


def test_a_user_who_churns_is_terminated_once_and_then_idle():
    terminated_at: dict[int, int] = {}
    churned = np.zeros(300, dtype=bool)
    for step, (_, _, info, _, next_obs, reward, terminated, _, next_info) in enumerate(run_days(
            300, num_creators=20, horizon_days=12, return_bias=-1.0, churn_after_days=2)):
        # Terminated exactly when the churn flag (privileged info) turns on.
        np.testing.assert_array_equal(terminated, next_info["churned"] & ~info["churned"])
        for user in np.flatnonzero(terminated):
            assert user not in terminated_at
            terminated_at[int(user)] = step
        assert (reward[churned] == 0).all() and (next_obs["active"][churned, 0] == 0).all()
        churned |= terminated
    assert 0 < len(terminated_at) == int(next_info["churned"].sum())


@pytest.mark.parametrize("params, field", [({"num_candidates": 30, "num_creators": 5}, "num_candidates"),
                                            ({"initial_items": 0}, "num_candidates")])
def test_a_catalog_smaller_than_the_candidate_list_is_refused(params, field):
    with pytest.raises(ValueError, match=field):
        CreatorEcosystem(**params)
