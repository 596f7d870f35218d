"""Learned slate policies without Ray: the candidate scorer, Plackett-Luce slates, exported weights.

`recray.platform.rl` trains `SlateScorer` inside an RLlib RLModule and, at every checkpoint,
exports its state dict and settings to a plain `policy.pt` (tensors, strings and numbers only, so
`torch.load(weights_only=True)` reads it). `LearnedPolicy.load` turns that file back into a
`recray.simulators.policies.Policy` for `recray.simulators.evaluate` and A/B arms; this module never
imports Ray.

Plackett-Luce: a slate (a_1..a_k) of distinct candidates with scores s has probability
prod_t exp(s[a_t]) / sum_{j not in a_<t} exp(s[j]); Gumbel top-k draws exactly such a slate
(Yellott 1977), so sampling needs one sort and never repeats an index.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from recray.simulators.policies import Policy

EXPORT_FORMAT = "recray-slate-policy-v1"


def _float(value: Any) -> torch.Tensor:
    return torch.as_tensor(np.asarray(value) if not torch.is_tensor(value) else value).float()


def observation_features(obs: Mapping[str, Any]) -> torch.Tensor:
    """`[N, C, F]`: every candidate's public doc features beside the user's context.

    The context is the last response (log1p of each field, so engagement minutes and clicks share a
    scale), the user vector and `active` where the world observes them, and the user's affinity to
    the candidate (user vector . the candidate's leading doc columns: topic interest in
    InterestEvolution, click share of the topic in CreatorEcosystem). Ids (`item_id`,
    `creator_id`) are not features: they keep arriving and carry no meaning across worlds.
    Keys are read in sorted order, as RLlib's batching of nested observations orders them.
    """
    doc = _float(obs["doc"])
    num_users, num_candidates = doc.shape[:2]
    context = [torch.log1p(_float(obs["response"][key]).clamp_min(0.0)).reshape(num_users, -1)
               for key in sorted(obs.get("response", {}))]
    if "active" in obs:
        context.append(_float(obs["active"]).reshape(num_users, -1))
    columns = [doc]
    if "user" in obs:
        user = _float(obs["user"]).reshape(num_users, -1)
        context.append(user)
        affinity = torch.einsum("nd,ncd->nc", user, doc[:, :, :user.shape[1]])
        columns.append(affinity[:, :, None])
    if context:
        columns.append(torch.cat(context, dim=1)[:, None, :].expand(-1, num_candidates, -1))
    return torch.cat(columns, dim=2)


def plackett_luce_log_prob(scores: torch.Tensor, slates: torch.Tensor) -> torch.Tensor:
    """`[N]` log probability of drawing `slates` `[N, k]` in this order, without replacement."""
    slates = slates.long()
    picked = scores.gather(1, slates)  # [N, k]
    # Before slot t the slots < t are gone: log sum over the rest = logsumexp of all scores with
    # those masked out, one masked copy per slot.
    taken = torch.zeros(slates.shape[1], *scores.shape, dtype=torch.bool, device=scores.device)
    for slot in range(1, slates.shape[1]):
        taken[slot] = taken[slot - 1].scatter(1, slates[:, slot - 1:slot], True)
    remaining = scores.unsqueeze(0).masked_fill(taken, -torch.inf)
    return (picked - torch.logsumexp(remaining, dim=2).T).sum(dim=1)


def gumbel_top_k(scores: torch.Tensor, k: int, generator: torch.Generator | None = None
                 ) -> torch.Tensor:
    """`[N, k]` int64: one Plackett-Luce slate per row (top-k of scores + Gumbel noise)."""
    uniform = torch.rand(scores.shape, generator=generator, dtype=torch.float64)
    uniform = uniform.to(scores.device).clamp_min(torch.finfo(torch.float64).tiny)
    noisy = scores.detach().double() - torch.log(-torch.log(uniform))
    return noisy.topk(k, dim=1).indices


def plackett_luce_entropy(scores: torch.Tensor, k: int,
                          generator: torch.Generator | None = None) -> torch.Tensor:
    """`[N]` one-sample estimate of the slate entropy, unbiased.

    By the chain rule H(a_1..a_k) = sum_t E[H(a_t | a_<t)]; each term is the exact entropy of the
    softmax over the candidates left after a sampled slate's first t - 1 picks. The exact entropy
    sums over C!/(C-k)! slates, too many for a loss term.
    """
    slate = gumbel_top_k(scores, k, generator)
    remaining, entropy = scores, torch.zeros(len(scores), device=scores.device)
    for slot in range(k):
        log_p = torch.log_softmax(remaining, dim=1)
        entropy = entropy - (log_p.exp() * log_p.nan_to_num(neginf=0.0)).sum(dim=1)
        remaining = remaining.scatter(1, slate[:, slot:slot + 1], -torch.inf)
    return entropy


class SlateScorer(nn.Module):
    """One network shared by every candidate scores it from its (user, candidate) features.

    The value (expected return of the state, for the critic) has its own trunk, pooled over
    candidates by mean and max: returns are large where engagement is, and a shared trunk would let
    the value loss swamp the policy's gradient.
    """

    def __init__(self, num_features: int, hidden: int = 64) -> None:
        super().__init__()
        self.num_features, self.hidden = num_features, hidden
        self.scorer = nn.Sequential(nn.Linear(num_features, hidden), nn.Tanh(),
                                    nn.Linear(hidden, hidden), nn.Tanh(), nn.Linear(hidden, 1))
        self.critic_trunk = nn.Sequential(nn.Linear(num_features, hidden), nn.Tanh())
        self.critic_head = nn.Sequential(nn.Linear(2 * hidden, hidden), nn.Tanh(),
                                         nn.Linear(hidden, 1))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """`[N, C]` candidate scores (the Plackett-Luce logits)."""
        return self.scorer(features).squeeze(-1)

    def value(self, features: torch.Tensor) -> torch.Tensor:
        """`[N]` state values."""
        trunk = self.critic_trunk(features)
        return self.critic_head(torch.cat([trunk.mean(dim=1), trunk.amax(dim=1)], dim=1)).squeeze(-1)


def export_policy(path: str | Path, scorer: SlateScorer, env_id: str, env_params: dict[str, Any],
                  num_candidates: int, slate_size: int) -> Path:
    """Write `scorer`'s weights and what it was trained on to `path` (weights_only-loadable)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({
        "format": EXPORT_FORMAT,
        "state_dict": {k: v.detach().cpu().clone() for k, v in scorer.state_dict().items()},
        "num_features": scorer.num_features, "hidden": scorer.hidden,
        "env_id": env_id, "env_params": dict(env_params),
        "num_candidates": num_candidates, "slate_size": slate_size,
    }, path)
    return path


class LearnedPolicy(Policy):
    """A trained `SlateScorer` as a policy: top-k slates (or Plackett-Luce draws with `explore`)."""

    def __init__(self, scorer: SlateScorer, slate_size: int, env_id: str,
                 env_params: dict[str, Any] | None = None, explore: bool = False) -> None:
        super().__init__(slate_size)
        self.scorer = scorer.eval()
        self.env_id, self.env_params, self.explore = env_id, dict(env_params or {}), explore

    @classmethod
    def load(cls, path: str | Path, env_id: str | None = None, explore: bool = False
             ) -> LearnedPolicy:
        """The policy exported to `path`; `env_id`, when given, must be the env it was trained on."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"policy: no exported policy at {path}")
        saved = torch.load(path, weights_only=True)
        if not isinstance(saved, dict) or saved.get("format") != EXPORT_FORMAT:
            raise ValueError(f"policy: {path} is not a recray slate policy ({EXPORT_FORMAT})")
        if env_id is not None and env_id != saved["env_id"]:
            raise ValueError(f"policy: {path} was trained on {saved['env_id']}, not {env_id}")
        scorer = SlateScorer(saved["num_features"], saved["hidden"])
        scorer.load_state_dict(saved["state_dict"])
        policy = cls(scorer, saved["slate_size"], saved["env_id"], saved["env_params"], explore)
        policy.num_candidates = saved["num_candidates"]
        return policy

    def scores(self, obs: dict, rng: np.random.Generator, info: dict | None) -> np.ndarray:
        with torch.no_grad():
            return self.scorer(observation_features(obs)).double().numpy()

    def act(self, obs: dict, rng: np.random.Generator, info: dict | None = None) -> np.ndarray:
        scores = self.scores(obs, rng, info)
        if not self.explore:
            return _top_k_stable(scores, self.slate_size)
        gumbel = -np.log(-np.log(rng.random(scores.shape)))
        return _top_k_stable(scores + gumbel, self.slate_size)


def _top_k_stable(scores: np.ndarray, k: int) -> np.ndarray:
    """The k best per row, best first; equal scores in index order, as `torch.topk` on CPU."""
    return np.argsort(-scores, axis=1, kind="stable")[:, :k].astype(np.int64)
