"""RLlib PPO on the simulators: Plackett-Luce slates, runs on each env, checkpoints as policies, bad input."""

from __future__ import annotations

import itertools
import math

import gymnasium as gym
import numpy as np
import pytest
import torch
import yaml

import recray.simulators as sims
from recray.platform.config import ConfigError
from recray.simulators.learned_policy import (
    LearnedPolicy,
    SlateScorer,
    export_policy,
    gumbel_top_k,
    observation_features,
    plackett_luce_entropy,
    plackett_luce_log_prob,
)
from recray.simulators.slate_env import validate_slates


def _path(text):
    from pathlib import Path

    return Path(text)


def _tensors(obs):
    if isinstance(obs, dict):
        return {k: _tensors(v) for k, v in obs.items()}
    return torch.as_tensor(np.asarray(obs))


# --- Plackett-Luce against brute force (fast, no Ray) ---------------------------------------------
def _product_formula(scores: np.ndarray, slate: tuple[int, ...]) -> float:
    """P(slate) = prod_t exp(s[a_t]) / sum of exp(s) over the candidates not yet picked."""
    left, probability = list(range(len(scores))), 1.0
    for pick in slate:
        probability *= math.exp(scores[pick]) / sum(math.exp(scores[j]) for j in left)
        left.remove(pick)
    return probability


def test_plackett_luce_log_prob_matches_brute_force_enumeration():
    rng = np.random.default_rng(0)
    scores = rng.normal(0, 1.5, size=(3, 5))
    slates = list(itertools.permutations(range(5), 3))  # every ordered slate of 3 from 5
    batch = torch.tensor(slates)
    for row in scores:
        log_prob = plackett_luce_log_prob(torch.tensor(row).expand(len(slates), -1), batch)
        expected = np.array([_product_formula(row, slate) for slate in slates])
        np.testing.assert_allclose(log_prob.exp().numpy(), expected, rtol=1e-10)
        assert log_prob.exp().sum().item() == pytest.approx(1.0, abs=1e-12)


def test_gumbel_top_k_draws_plackett_luce_slates_and_the_entropy_estimate_is_unbiased():
    scores = torch.tensor([[1.0, 0.2, -0.5, 0.7]], dtype=torch.float64)
    slates = list(itertools.permutations(range(4), 2))
    exact = np.array([_product_formula(scores[0].numpy(), s) for s in slates])
    draws = 40_000
    generator = torch.Generator().manual_seed(1)
    sampled = gumbel_top_k(scores.expand(draws, -1), 2, generator)
    assert (sampled[:, 0] != sampled[:, 1]).all()
    counts = np.array([((sampled[:, 0] == a) & (sampled[:, 1] == b)).sum().item()
                       for a, b in slates])
    # 4 standard errors of a binomial frequency: a sampler off by a few percent fails.
    np.testing.assert_array_less(np.abs(counts / draws - exact),
                                 4 * np.sqrt(exact * (1 - exact) / draws) + 1e-4)
    entropy = plackett_luce_entropy(scores.expand(draws, -1), 2, generator).mean().item()
    assert entropy == pytest.approx(-(exact * np.log(exact)).sum(), abs=0.01)


# --- bad input, before any actor -------------------------------------------------------------------
def _write(path, data):
    path.write_text(yaml.safe_dump(data))
    return path


def test_bad_configs_are_refused_naming_the_field(tmp_path):
    from recray.platform.rl import load_rl_config

    base = {"name": "x", "env": {"id": "lts"}}
    cases = [
        ({"env": {"id": "recray/Nope-v0"}}, "unknown env 'recray/Nope-v0'"),
        ({"ppo": {"learning_rate": 0.1}}, "learning_rate"),
        ({"algorithm": "DQN"}, "algorithm"),
        ({"env": {"id": "iev", "params": {"num_candidates": 3, "slate_size": 5}}},
         "slate_size: expected in [1, num_candidates=3], got 5"),
        ({"env": {"id": "lts", "params": {"sensitvity": 0.5}}}, "sensitvity"),
        ({"env": {"id": "lts", "retention_bonus": 1.0}}, "env.retention_bonus"),
        ({"env": {"id": "creator", "num_envs_per_env_runner": 50,
                  "params": {"num_users": 40}}}, "num_users"),
    ]
    for change, message in cases:
        with pytest.raises(ConfigError) as caught:
            load_rl_config(_write(tmp_path / "c.yaml", {**base, **change}))
        assert message in str(caught.value), (change, str(caught.value))


def test_submit_checks_an_rl_config_before_submitting(tmp_path):
    from recray.platform.submit import check_config, entrypoint

    _write(tmp_path / "rl.yaml", {"name": "x", "env": {"id": "iev"}})
    check_config("rl.yaml", tmp_path, {"rl.yaml"}, {"num_env_runners": 4})
    with pytest.raises(ConfigError, match="slate_size"):
        check_config("rl.yaml", tmp_path, {"rl.yaml"}, {"env.params.slate_size": 11})
    assert entrypoint("rl", "rl.yaml", {"iterations": 3}) == (
        "python -m recray.jobs.rl --config rl.yaml --set iterations=3")


def test_a_checkpoint_of_another_env_is_refused(tmp_path):
    from recray.platform.rl import RLConfig, run_folder

    run = tmp_path / "lts-run"
    (run / "checkpoints" / "iter_00002").mkdir(parents=True)
    _write(run / "config.yaml", {"name": "lts-run", "env": {"id": sims.LONG_TERM_SATISFACTION}})
    cfg = RLConfig.model_validate({"name": "x", "env": {"id": "iev"},
                                   "storage_path": str(tmp_path)})
    with pytest.raises(ConfigError, match="trained on recray/LongTermSatisfaction-v0"):
        run_folder(cfg, str(run))
    path = export_policy(tmp_path / "policy.pt", SlateScorer(4), sims.LONG_TERM_SATISFACTION, {},
                         num_candidates=10, slate_size=2)
    with pytest.raises(ValueError, match="trained on recray/LongTermSatisfaction-v0, not "):
        LearnedPolicy.load(path, env_id=sims.INTEREST_EVOLUTION)
    # The same file as an A/B arm's `policy:` (make_policy takes a path to an exported policy).
    from recray.simulators.policies import make_policy

    assert isinstance(make_policy(str(path), sims.LONG_TERM_SATISFACTION, 2), LearnedPolicy)
    with pytest.raises(ValueError, match="trained on recray/LongTermSatisfaction-v0, not "):
        make_policy(str(path), sims.INTEREST_EVOLUTION, 2)
    with pytest.raises(ValueError, match="slate_size"):
        make_policy(str(path), sims.LONG_TERM_SATISFACTION, 3)


# --- PPO on env runner actors ----------------------------------------------------------------------
SMALL_PPO = {"train_batch_size": 256, "minibatch_size": 128, "num_epochs": 1}
RUNS = {
    "lts": {"id": "lts", "num_envs_per_env_runner": 8, "reward_scale": 0.01},
    "iev": {"id": "iev", "num_envs_per_env_runner": 8, "reward_scale": 0.05},
    "creator": {"id": "creator", "num_envs_per_env_runner": 40, "retention_bonus": 1.0,
                "params": {"num_creators": 10, "num_candidates": 10, "horizon_days": 2}},
}


@pytest.fixture(scope="module")
def ppo_runs(ray_local, tmp_path_factory):
    from recray.platform.rl import RLConfig, train

    storage = tmp_path_factory.mktemp("rl")
    runs = {}

    def run(name):
        if name not in runs:
            cfg = RLConfig.model_validate({"name": name, "env": RUNS[name], "ppo": SMALL_PPO,
                                           "iterations": 2, "num_env_runners": 1,
                                           "storage_path": str(storage)})
            runs[name] = (cfg, train(cfg))
        return runs[name]

    return run


@pytest.mark.ray
@pytest.mark.parametrize("name", list(RUNS))
def test_ppo_runs_two_iterations_with_one_env_runner_and_samples_valid_slates(ppo_runs, name):
    from ray.rllib.core.rl_module import RLModule

    from recray.platform.rl import latest_checkpoint

    cfg, result = ppo_runs(name)
    assert [line["iteration"] for line in result["history"]] == [1, 2]
    assert all(line["env_steps"] >= SMALL_PPO["train_batch_size"] for line in result["history"])
    assert result["history"][1]["env_steps"] > result["history"][0]["env_steps"]
    # The env refuses a repeated index, so two iterations of sampling already exercised it; here
    # the trained module's own draws on a fresh observation are checked too.
    module = RLModule.from_checkpoint(latest_checkpoint(_path(result["run_dir"])) / "learner_group"
                                      / "learner" / "rl_module" / "default_policy")
    from recray.platform.rl import make_env

    env = make_env(cfg.env.id, cfg.env.params, cfg.env.num_envs_per_env_runner)
    obs, _ = env.reset(seed=5)
    logits = module.forward_exploration({"obs": _tensors(obs)})["action_dist_inputs"]
    dist = module.get_exploration_action_dist_cls().from_logits(logits)
    slates = dist.sample()
    validate_slates(slates.numpy(), env.single_action_space.nvec[0], env.single_action_space.shape[0])
    assert torch.isfinite(dist.logp(slates)).all()


@pytest.mark.ray
def test_checkpoint_round_trips_into_a_policy_and_resume_continues(ppo_runs):
    from ray.rllib.core.rl_module import RLModule

    from recray.platform.rl import latest_checkpoint, load_rl_config, train
    from recray.simulators.evaluate import episode_returns

    cfg, result = ppo_runs("iev")
    checkpoint = latest_checkpoint(_path(result["run_dir"]))
    module = RLModule.from_checkpoint(checkpoint / "learner_group" / "learner" / "rl_module"
                                      / "default_policy")
    policy = LearnedPolicy.load(checkpoint / "policy.pt", env_id=sims.INTEREST_EVOLUTION)
    env = gym.make_vec(sims.INTEREST_EVOLUTION, num_envs=64, vectorization_mode="vector_entry_point")
    obs, _ = env.reset(seed=11)
    with torch.no_grad():
        out = module.forward_inference({"obs": _tensors(obs)})
    logits = out["action_dist_inputs"]
    greedy = module.get_inference_action_dist_cls().from_logits(logits).to_deterministic().sample()
    rng = np.random.default_rng(0)
    np.testing.assert_allclose(policy.scores(obs, rng, None), logits.double().numpy(), rtol=1e-6)
    np.testing.assert_array_equal(policy.act(obs, rng), greedy.numpy())
    returns = episode_returns(sims.INTEREST_EVOLUTION, policy, 16, seed=3)
    assert returns.shape == (16,) and np.isfinite(returns).all()

    # --resume RUN: the counters and weights come back, the iterations continue from 3.
    _write(_path(result["run_dir"]) / "more.yaml",
           {**cfg.model_dump(mode="json", by_alias=True), "iterations": 1})
    more = load_rl_config(_path(result["run_dir"]) / "more.yaml")
    resumed = train(more, resume=result["run_dir"])
    assert resumed["run_dir"] == result["run_dir"]
    assert [line["iteration"] for line in resumed["history"]] == [3]
    assert resumed["history"][0]["env_steps"] > result["history"][-1]["env_steps"]


def test_observation_features_are_the_same_for_numpy_and_torch_batches():
    env = gym.make_vec(sims.CREATOR_ECOSYSTEM, num_envs=20, vectorization_mode="vector_entry_point",
                       num_creators=10, num_candidates=10)
    obs, _ = env.reset(seed=0)
    np.testing.assert_array_equal(observation_features(obs).numpy(),
                                  observation_features(_tensors(obs)).numpy())
