"""A `recray.models` model trained on the creator log ranks candidates in the live CreatorEcosystem."""

from __future__ import annotations

import gymnasium as gym
import numpy as np
import pytest
import torch

import recray.simulators as sims
from recray.simulators.logging_policy import LogConfig, schema_for_log, simulate_creator_log
from recray.simulators.policies import model_policy

WORLD = {"num_creators": 20}
NUM_USERS = 200


@pytest.fixture(scope="module")
def schema():
    return schema_for_log(simulate_creator_log(LogConfig(num_users=NUM_USERS, days=2,
                                                         world=WORLD)))


@pytest.mark.parametrize("model_name", ["dnn", "din"])
def test_model_policy_serves_valid_slates_on_items_unseen_in_the_log(schema, model_name, tmp_path):
    torch.manual_seed(0)
    checkpoint = tmp_path / "state.pt"
    trained = model_policy(2, schema, model_name).model
    torch.save({"model": trained.state_dict()}, checkpoint)
    policy = model_policy(2, schema, model_name, checkpoint=str(checkpoint))

    env = gym.make_vec(sims.CREATOR_ECOSYSTEM, num_envs=NUM_USERS,
                       vectorization_mode="vector_entry_point", horizon_days=5, **WORLD)
    obs, info = env.reset(seed=1)
    rng = np.random.default_rng(0)
    item_vocab = schema.feature("item_id").vocab_size
    unseen = 0
    for _ in range(12):  # four days: items uploaded after the logged days are new to the model
        unseen += int((obs["item_id"] >= item_vocab).sum())
        actions = policy.act(obs, rng, info)
        assert actions.shape == (NUM_USERS, 2)
        assert ((actions >= 0) & (actions < obs["item_id"].shape[1])).all()
        assert (actions[:, 0] != actions[:, 1]).all()
        next_obs, reward, terminated, truncated, info = env.step(actions)
        policy.update(obs, actions, reward, next_obs, terminated | truncated)
        obs = next_obs
    assert unseen > 0
    assert (policy.history >= 0).any()  # histories come from the policy's own logged clicks


def test_model_policy_rejects_a_label_the_schema_lacks(schema):
    with pytest.raises(ValueError, match="label"):
        model_policy(2, schema, "dnn", label="label_dwell")
