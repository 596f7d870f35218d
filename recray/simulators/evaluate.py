"""Run policies on the vectorised envs: per-user episode returns and the choc/kale crossover scan."""

from __future__ import annotations

from typing import Any

import gymnasium as gym
import numpy as np

from recray.simulators import LONG_TERM_SATISFACTION
from recray.simulators.policies import Policy, make_policy


def episode_returns(env_id: str, policy: Policy, num_users: int, seed: int = 0,
                    **params: Any) -> np.ndarray:
    """`[num_users]` undiscounted return of each user's first episode under `policy`."""
    env = gym.make_vec(env_id, num_envs=num_users, vectorization_mode="vector_entry_point",
                       **params)
    obs, info = env.reset(seed=seed)
    rng = np.random.default_rng(seed)
    returns = np.zeros(num_users)
    finished = np.zeros(num_users, dtype=bool)
    while not finished.all():
        actions = policy.act(obs, rng, info)
        next_obs, reward, terminated, truncated, info = env.step(actions)
        done = terminated | truncated
        policy.update(obs, actions, reward, next_obs, done)
        returns += np.where(finished, 0.0, reward)
        finished |= done
        obs = next_obs
    env.close()
    return returns


def mean_return(env_id: str, name: str, num_users: int, seed: int = 0, slate_size: int = 2,
                **params: Any) -> float:
    """Mean first-episode return of the named policy (see `policies.make_policy`)."""
    policy = make_policy(name, env_id, slate_size)
    return float(episode_returns(env_id, policy, num_users, seed, slate_size=slate_size,
                                 **params).mean())


def choc_kale_scan(sensitivities: np.ndarray, num_users: int = 2000, seed: int = 0,
                   **params: Any) -> dict[str, np.ndarray]:
    """Mean return of `myopic` (most clickbait) and `kale` (least) at each sensitivity."""
    myopic = [mean_return(LONG_TERM_SATISFACTION, "myopic", num_users, seed,
                          sensitivity=float(s), **params) for s in sensitivities]
    kale = [mean_return(LONG_TERM_SATISFACTION, "kale", num_users, seed,
                        sensitivity=float(s), **params) for s in sensitivities]
    return {"sensitivity": np.asarray(sensitivities, dtype=float),
            "myopic": np.asarray(myopic), "kale": np.asarray(kale)}


def crossover_sensitivity(low: float = 0.01, high: float = 1.0, num_users: int = 2000,
                          seed: int = 0, tolerance: float = 0.01, **params: Any) -> float:
    """The sensitivity where kale starts to beat myopic, by bisection on a log scale.

    Both policies see the same users and draws at each sensitivity (common random numbers), so
    the sign of the difference is stable and bisection converges on a clean figure.
    """

    def kale_advantage(s: float) -> float:
        scan = choc_kale_scan(np.array([s]), num_users, seed, **params)
        return float(scan["kale"][0] - scan["myopic"][0])

    if kale_advantage(low) >= 0 or kale_advantage(high) <= 0:
        raise ValueError(f"low, high: myopic must win at {low} and kale at {high} to bracket "
                         f"the crossover")
    while np.log(high / low) > tolerance:
        mid = float(np.sqrt(low * high))
        if kale_advantage(mid) > 0:
            high = mid
        else:
            low = mid
    return float(np.sqrt(low * high))


def ecosystem_days(name: str | Policy, days: int = 30, num_users: int = 1000,
                   num_creators: int = 100, seed: int = 0, **params: Any) -> dict[str, Any]:
    """Run CreatorEcosystem under a policy (or a named one): daily engagement and world metrics.

    `daily_active_users` in the result is the count on the morning after the last day, i.e.
    the users retained at day `days`.
    """
    from recray.simulators import CREATOR_ECOSYSTEM

    env = gym.make_vec(CREATOR_ECOSYSTEM, num_envs=num_users,
                       vectorization_mode="vector_entry_point", num_creators=num_creators,
                       horizon_days=days, **params)
    policy = name if isinstance(name, Policy) else make_policy(
        name, CREATOR_ECOSYSTEM, env.single_action_space.shape[0])
    obs, info = env.reset(seed=seed)
    rng = np.random.default_rng(seed)
    daily = np.zeros(days)
    while True:
        day = env.world.day
        actions = policy.act(obs, rng, info)
        next_obs, reward, terminated, truncated, info = env.step(actions)
        policy.update(obs, actions, reward, next_obs, terminated | truncated)
        daily[day] += reward.sum()
        obs = next_obs
        if truncated.all():
            break
    return {"daily_engagement": daily, **env.world.metrics()}


def crossing_day(first: np.ndarray, second: np.ndarray) -> int | None:
    """The first day from which `second` stays ahead of `first` (None if it never does)."""
    behind = np.asarray(second) > np.asarray(first)
    for day in range(len(behind)):
        if behind[day:].all():
            return day
    return None
