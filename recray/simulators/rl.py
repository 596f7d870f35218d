"""REINFORCE with a baseline, in plain torch, for slate policies on the vectorised envs.

The policy scores each candidate with a small MLP over the candidate's public features and the
user's last response, and draws a slate by Plackett-Luce (Gumbel top-k): the slate's log
probability is the sum of the sequential softmax log probabilities of its picks. Return-to-go
minus the per-step mean over users is the advantage, so no critic is needed: every user of the
batch starts an episode together.
"""

from __future__ import annotations

from typing import Any

import gymnasium as gym
import numpy as np
import torch
from torch import nn

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


def plackett_luce_log_prob(scores: torch.Tensor, slates: torch.Tensor) -> torch.Tensor:
    """`[N]` log probability of drawing `slates` `[N, k]` in order, without replacement."""
    remaining = scores.clone()
    log_prob = torch.zeros(len(scores))
    rows = torch.arange(len(scores))
    for slot in range(slates.shape[1]):
        picked = slates[:, slot]
        log_prob = log_prob + remaining[rows, picked] - torch.logsumexp(remaining, dim=1)
        remaining = remaining.index_put((rows, picked), torch.tensor(-torch.inf))
    return log_prob


class ReinforcePolicy(Policy):
    """An MLP candidate scorer; `act` is greedy (top-k), `sample` draws a Plackett-Luce slate."""

    def __init__(self, num_features: int, slate_size: int, hidden: int = 16, seed: int = 0) -> None:
        super().__init__(slate_size)
        torch.manual_seed(seed)
        self.net = nn.Sequential(nn.Linear(num_features, hidden), nn.Tanh(), nn.Linear(hidden, 1))

    def logits(self, obs: dict) -> torch.Tensor:
        return self.net(candidate_features(obs)).squeeze(-1)

    def scores(self, obs: dict, rng: np.random.Generator, info: dict | None) -> np.ndarray:
        with torch.no_grad():
            return self.logits(obs).double().numpy()

    def sample(self, obs: dict, rng: np.random.Generator) -> tuple[np.ndarray, torch.Tensor]:
        """A slate per user and its log probability (with gradient)."""
        logits = self.logits(obs)
        gumbel = -np.log(-np.log(rng.random(tuple(logits.shape))))
        slates = np.argsort(-(logits.detach().double().numpy() + gumbel), axis=1)[:, :self.slate_size]
        return slates.astype(np.int64), plackett_luce_log_prob(logits, torch.from_numpy(slates))


def train_reinforce(env_id: str, num_users: int = 256, iterations: int = 30, lr: float = 0.05,
                    seed: int = 0, hidden: int = 16, **params: Any) -> tuple[ReinforcePolicy, list]:
    """Train on first episodes of `num_users` fresh users per iteration; returns mean return each."""
    env = gym.make_vec(env_id, num_envs=num_users, vectorization_mode="vector_entry_point",
                       **params)
    obs, _ = env.reset(seed=seed)
    policy = ReinforcePolicy(candidate_features(obs).shape[2], env.single_action_space.shape[0],
                             hidden=hidden, seed=seed)
    optimiser = torch.optim.Adam(policy.net.parameters(), lr=lr)
    rng = np.random.default_rng(seed)
    history = []
    for iteration in range(iterations):
        obs, _ = env.reset(seed=seed + 1 + iteration * num_users)
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
