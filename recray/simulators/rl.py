"""REINFORCE with a baseline, in plain torch and one process: the dependency-free baseline agent.

recray's RL runs on RLlib (`recray rl`, `recray.platform.rl`: PPO on env runner actors). This agent
stays because it earns two places that RLlib cannot take: it is the single-process baseline that
`benchmarks/rl.py` sets RLlib's env-runner throughput beside, and it lets the simulators' own
tests show that their worlds reward long-term policies (`test_simulators*.py`) without Ray, which
`recray.simulators` never imports.

The policy scores each candidate with a small MLP over the candidate's public features and the
user's last response, and draws a slate by Plackett-Luce (Gumbel top-k): the slate's log
probability is the sum of the sequential softmax log probabilities of its picks
(`learned_policy.plackett_luce_log_prob`, shared with the RLlib module). Return-to-go minus the
per-step mean over users is the advantage, so no critic is needed: every user of the batch starts
an episode together. `train_reinforce` maximises the env's own return; `train_ecosystem` trains on
CreatorEcosystem with a reward shaped toward next-day returns.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import gymnasium as gym
import numpy as np
import torch
from torch import nn

from recray.simulators.learned_policy import plackett_luce_log_prob
from recray.simulators.policies import Policy


def candidate_features(obs: dict) -> torch.Tensor:
    """`[N, C, F]`: each candidate's doc features beside the user's context (broadcast)."""
    doc = torch.as_tensor(np.asarray(obs["doc"], dtype=np.float32))
    context = [torch.log1p(torch.as_tensor(np.asarray(v, dtype=np.float32)))
               for v in obs.get("response", {}).values()]
    if "user" in obs:
        context.append(torch.as_tensor(np.asarray(obs["user"], dtype=np.float32)))
    if not context:
        return doc
    user = torch.cat(context, dim=1)[:, None, :].expand(-1, doc.shape[1], -1)
    return torch.cat([doc, user], dim=2)


def ecosystem_features(obs: dict) -> torch.Tensor:
    """CreatorEcosystem candidates: `candidate_features` plus the user's affinity to each topic.

    The affinity (the user's click share of the candidate's topic) is the product of two inputs;
    giving it explicitly spares a small MLP from learning that interaction from few episodes.
    """
    base = candidate_features(obs)
    num_topics = obs["user"].shape[1]
    topics = torch.as_tensor(np.asarray(obs["doc"][:, :, :num_topics], dtype=np.float32))
    user = torch.as_tensor(np.asarray(obs["user"], dtype=np.float32))
    affinity = torch.einsum("nd,ncd->nc", user, topics)[:, :, None]
    return torch.cat([base, affinity], dim=2)


class ReinforcePolicy(Policy):
    """An MLP candidate scorer; `act` is greedy (top-k), `sample` draws a Plackett-Luce slate."""

    def __init__(self, num_features: int, slate_size: int, hidden: int = 16, seed: int = 0,
                 features: Callable[[dict], torch.Tensor] = candidate_features) -> None:
        super().__init__(slate_size)
        torch.manual_seed(seed)
        self.features = features
        self.net = nn.Sequential(nn.Linear(num_features, hidden), nn.Tanh(), nn.Linear(hidden, 1))

    def logits(self, obs: dict) -> torch.Tensor:
        return self.net(self.features(obs)).squeeze(-1)

    def scores(self, obs: dict, rng: np.random.Generator, info: dict | None) -> np.ndarray:
        with torch.no_grad():
            return self.logits(obs).double().numpy()

    def sample(self, obs: dict, rng: np.random.Generator) -> tuple[np.ndarray, torch.Tensor]:
        """A slate per user and its log probability (with gradient)."""
        logits = self.logits(obs)
        gumbel = -np.log(-np.log(rng.random(tuple(logits.shape))))
        slates = np.argsort(-(logits.detach().double().numpy() + gumbel), axis=1)[:, :self.slate_size]
        return slates.astype(np.int64), plackett_luce_log_prob(logits, torch.from_numpy(slates))


def reinforce_training_seeds(num_users: int, iterations: int, seed: int = 0) -> range:
    """The user seeds `train_reinforce` trains on: evaluate on seeds outside this range."""
    return range(seed + 1, seed + 1 + iterations * num_users)


def ecosystem_training_seeds(iterations: int, seed: int = 0) -> range:
    """The world seeds `train_ecosystem` trains on: evaluate on a world seeded outside them."""
    return range(seed + 1, seed + 1 + iterations)


def train_reinforce(env_id: str, num_users: int = 256, iterations: int = 30, lr: float = 0.05,
                    seed: int = 0, hidden: int = 16, **params: Any) -> tuple[ReinforcePolicy, list]:
    """Train on first episodes of `num_users` fresh users per iteration; returns mean return each.

    Iteration i's users have seeds `seed + 1 + i * num_users` onwards (`reinforce_training_seeds`).
    """
    env = gym.make_vec(env_id, num_envs=num_users, vectorization_mode="vector_entry_point",
                       **params)
    obs, _ = env.reset(seed=seed)
    policy = ReinforcePolicy(candidate_features(obs).shape[2], env.single_action_space.shape[0],
                             hidden=hidden, seed=seed)
    optimiser = torch.optim.Adam(policy.net.parameters(), lr=lr)
    rng = np.random.default_rng(seed)
    history = []
    for iteration in range(iterations):
        obs, _ = env.reset(seed=reinforce_training_seeds(num_users, iterations, seed)[
            iteration * num_users])
        log_probs, rewards, alive = [], [], np.ones(num_users, dtype=bool)
        while alive.any():
            slates, log_prob = policy.sample(obs, rng)
            obs, reward, terminated, truncated, _ = env.step(slates)
            log_probs.append(log_prob * torch.from_numpy(alive.astype(np.float32)))
            rewards.append(np.where(alive, reward, 0.0))
            alive &= ~(terminated | truncated)
        reward_matrix = np.array(rewards)
        to_go = np.flip(np.cumsum(np.flip(reward_matrix, 0), 0), 0)
        # Baseline: the mean return-to-go over users at the same step; then a global scale.
        advantage = to_go - to_go.mean(axis=1, keepdims=True)
        advantage /= advantage.std() + 1e-8
        loss = -(torch.stack(log_probs) * torch.from_numpy(advantage.astype(np.float32))).sum(0).mean()
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        history.append(float(reward_matrix.sum(0).mean()))
    env.close()
    return policy, history


def train_ecosystem(num_users: int = 500, iterations: int = 60, horizon_days: int = 10,
                    return_bonus: float = 5.0, gamma: float = 0.9, lr: float = 0.02,
                    seed: int = 0, hidden: int = 16,
                    **params: Any) -> tuple[ReinforcePolicy, list[dict[str, float]]]:
    """REINFORCE on CreatorEcosystem with a reward shaped toward retention.

    Per-step reward of a user: the watch minutes of the session plus `return_bonus` when the step
    closes a day and the user comes back the next morning (`active` in the next observation: a
    logged signal, `label_return` in the logs). The return-to-go is discounted by `gamma` per
    round, so a slate is credited with the engagement and returns of the next few days rather
    than the noise of a whole month. Each iteration is one fresh world of `horizon_days` days
    (seeded by `ecosystem_training_seeds`); only served users' slates enter the gradient. The
    policy sees observations only, never `info`.
    Returns the policy and per-iteration figures (mean engagement and next-day returns per user).
    """
    from recray.simulators import CREATOR_ECOSYSTEM

    env = gym.make_vec(CREATOR_ECOSYSTEM, num_envs=num_users,
                       vectorization_mode="vector_entry_point", horizon_days=horizon_days,
                       **params)
    obs, _ = env.reset(seed=seed)
    policy = ReinforcePolicy(ecosystem_features(obs).shape[2], env.single_action_space.shape[0],
                             hidden=hidden, seed=seed, features=ecosystem_features)
    optimiser = torch.optim.Adam(policy.net.parameters(), lr=lr)
    rng = np.random.default_rng(seed)
    history = []
    for iteration in range(iterations):
        obs, info = env.reset(seed=ecosystem_training_seeds(iterations, seed)[iteration])
        log_probs, rewards, served = [], [], []
        engagement, returns = 0.0, 0.0
        while True:
            slates, log_prob = policy.sample(obs, rng)
            active = obs["active"][:, 0].astype(bool)
            day = info["day"][0]
            obs, reward, _, truncated, info = env.step(slates)
            came_back = (obs["active"][:, 0] > 0) & (info["day"][0] != day)
            engagement += float(reward.sum())
            returns += float(came_back.sum())
            log_probs.append(log_prob)
            rewards.append(reward + return_bonus * came_back)
            served.append(active)
            if truncated.all():
                break
        reward_matrix, mask = np.array(rewards), np.array(served)
        to_go = np.zeros_like(reward_matrix)
        running = np.zeros(num_users)
        for t in range(len(reward_matrix) - 1, -1, -1):
            running = reward_matrix[t] + gamma * running
            to_go[t] = running
        # Baseline: the mean return-to-go of the users served at the same step.
        counts = np.maximum(mask.sum(axis=1, keepdims=True), 1)
        baseline = (to_go * mask).sum(axis=1, keepdims=True) / counts
        advantage = np.where(mask, to_go - baseline, 0.0)
        advantage /= advantage[mask].std() + 1e-8
        weights = torch.from_numpy(advantage.astype(np.float32))
        loss = -(torch.stack(log_probs) * weights).sum() / max(int(mask.sum()), 1)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        history.append({"engagement": engagement / num_users, "returns": returns / num_users})
    env.close()
    return policy, history
