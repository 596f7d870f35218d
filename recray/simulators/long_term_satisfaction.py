"""RecSim's long-term satisfaction ("choc vs kale") world, as google-research/recsim 0.2.4's code runs.

Fidelity (see DESIGN.md): the user always consumes slot 0; engagement is drawn with the
satisfaction *before* this step's exposure update (RecSim simulates the response, then updates the
state); the exposure update subtracts 2*(clickbait - 0.5); the reward is the unclipped engagement,
only the observed engagement is clipped at 100; an episode is exactly `time_budget` steps, a time
limit, so gymnasium's `truncated` ends it (RecSim's user would go on; it is only no longer observed).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import gymnasium as gym
import numpy as np

from recray.simulators.slate_env import SlateEnv, SlateModel, SlateVectorEnv, State
from recray.simulators.streams import normals, uniforms

MAX_ENGAGEMENT = 100.0  # RecSim's LTSResponse.MAX_ENGAGEMENT_MAGNITUDE: clips the observation only
_INIT, _DOCS, _RESPONSE = 0, 1, 2  # independent random streams within a user's step


def sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def initial_exposure(u: np.ndarray, memory_discount: float) -> np.ndarray:
    """RecSim's starting net positive exposure from a U[0,1) draw."""
    return (u - 0.5) / (1.0 - memory_discount)


def engagement(clickbait: np.ndarray, satisfaction: np.ndarray, z: np.ndarray, choc_mean: float,
               choc_stddev: float, kale_mean: float, kale_stddev: float) -> np.ndarray:
    """Log-normal engagement: satisfaction scales the location of the log-engagement."""
    loc = (clickbait * choc_mean + (1.0 - clickbait) * kale_mean) * satisfaction
    scale = clickbait * choc_stddev + (1.0 - clickbait) * kale_stddev
    return np.exp(loc + scale * z)


def update_exposure(exposure: np.ndarray, clickbait: np.ndarray, z: np.ndarray,
                    memory_discount: float, innovation_stddev: float) -> np.ndarray:
    """Net positive exposure after consuming an item: clickbait lowers it (RecSim's code sign)."""
    return memory_discount * exposure - 2.0 * (clickbait - 0.5) + innovation_stddev * z


@dataclass(frozen=True)
class LongTermSatisfaction(SlateModel):
    """Parameters use RecSim's names; every user shares them (RecSim's static user sampler)."""

    memory_discount: float = 0.7
    sensitivity: float = 0.01
    innovation_stddev: float = 0.05
    choc_mean: float = 5.0
    choc_stddev: float = 1.0
    kale_mean: float = 4.0
    kale_stddev: float = 1.0
    time_budget: int = 60
    num_candidates: int = 10
    slate_size: int = 2
    time_limit: ClassVar[bool] = True

    def __post_init__(self) -> None:
        if not 0.0 <= self.memory_discount < 1.0:
            raise ValueError(f"memory_discount: expected in [0, 1), got {self.memory_discount}")
        if self.time_budget < 1:
            raise ValueError(f"time_budget: expected >= 1 step, got {self.time_budget}")
        if not 1 <= self.slate_size <= self.num_candidates:
            raise ValueError(f"slate_size: expected in [1, num_candidates={self.num_candidates}], "
                             f"got {self.slate_size}")
        if min(self.innovation_stddev, self.choc_stddev, self.kale_stddev) < 0:
            raise ValueError("innovation_stddev, choc_stddev, kale_stddev: expected >= 0")

    @property
    def observation_space(self) -> gym.spaces.Dict:
        return gym.spaces.Dict({
            "doc": gym.spaces.Box(0.0, 1.0, (self.num_candidates, 1), np.float32),
            "response": gym.spaces.Dict({
                "click": gym.spaces.MultiBinary(self.slate_size),
                "engagement": gym.spaces.Box(0.0, MAX_ENGAGEMENT, (self.slate_size,), np.float32),
            }),
        })

    def new_users(self, keys: np.ndarray) -> State:
        steps = np.zeros(len(keys), dtype=np.int64)
        exposure = initial_exposure(uniforms(keys, steps, _INIT, 1)[:, 0], self.memory_discount)
        return {"net_positive_exposure": exposure,
                "satisfaction": sigmoid(self.sensitivity * exposure),
                "time_budget": np.full(len(keys), self.time_budget, dtype=np.int64)}

    def sample_docs(self, keys: np.ndarray, steps: np.ndarray) -> State:
        # float32 is what the policy observes; the dynamics use exactly that value.
        return {"clickbait": uniforms(keys, steps, _DOCS, self.num_candidates).astype(np.float32)}

    def step(self, state: State, docs: State, slates: np.ndarray, keys: np.ndarray,
             steps: np.ndarray) -> tuple[State, State, np.ndarray, np.ndarray]:
        users = np.arange(len(slates))
        clickbait = docs["clickbait"][users, slates[:, 0]].astype(np.float64)
        z = normals(keys, steps, _RESPONSE, 2)
        reward = engagement(clickbait, state["satisfaction"], z[:, 0], self.choc_mean,
                            self.choc_stddev, self.kale_mean, self.kale_stddev)
        exposure = update_exposure(state["net_positive_exposure"], clickbait, z[:, 1],
                                   self.memory_discount, self.innovation_stddev)
        budget = state["time_budget"] - 1
        next_state = {"net_positive_exposure": exposure,
                      "satisfaction": sigmoid(self.sensitivity * exposure),
                      "time_budget": budget}
        response = self.empty_response(len(slates))
        response["click"][:, 0] = 1
        response["engagement"][:, 0] = np.minimum(reward, MAX_ENGAGEMENT)
        return next_state, response, reward, budget <= 0

    def empty_response(self, num_users: int) -> State:
        return {"click": np.zeros((num_users, self.slate_size), dtype=np.int8),
                "engagement": np.zeros((num_users, self.slate_size), dtype=np.float32)}

    def observe(self, state: State, docs: State, response: State) -> dict:
        return {"doc": docs["clickbait"][:, :, None], "response": response}

    def info(self, state: State, docs: State) -> State:
        return {"net_positive_exposure": state["net_positive_exposure"],
                "satisfaction": state["satisfaction"],
                "time_budget": state["time_budget"]}


def make_env(render_mode: str | None = None, **params: float) -> SlateEnv:
    """`gym.make("recray/LongTermSatisfaction-v0", **params)` entry point."""
    return SlateEnv(LongTermSatisfaction(**params), render_mode=render_mode)


def make_vector_env(num_envs: int = 1, render_mode: str | None = None,
                    **params: float) -> SlateVectorEnv:
    """`gym.make_vec(..., vectorization_mode="vector_entry_point")` entry point."""
    return SlateVectorEnv(LongTermSatisfaction(**params), num_envs, render_mode=render_mode)
