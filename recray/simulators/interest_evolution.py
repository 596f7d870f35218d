"""RecSim's interest-evolution world as `interest_evolution.create_environment` wires it (recsim 0.2.4).

That is `UtilityModelVideoSampler` + `UtilityModelUserSampler` + the *proportional* choice model
(not the `IEv*Sampler` classes of the same file): 20 one-hot topic clusters; quality ~
Normal(cluster mean, 0.1) with cluster means concat(linspace(-3, 0, 14), linspace(0, 3, 6)); fixed
video length 4; a time budget of 200 minutes that a watch spends and quality refunds; a no-click
step penalty of 0.5; choice probabilities proportional to (interest - min_normalizer) with the
no-click option scored no_click_mass - min_normalizer = 2; interests move only in the clicked
cluster, towards the video or (with probability 1 - (interest + 1)/2) away from it. A spent budget
is the user's own state (watching spends it, quality refunds it), so it ends the episode as
`terminated`, not as a time limit.

RecSim puts each shown video's quality in the response; here quality is privileged truth and goes
to `info` only, so a policy sees interests, topics, clicks and watch time, as DESIGN.md asks.
"""

from __future__ import annotations

from dataclasses import dataclass

import gymnasium as gym
import numpy as np

from recray.simulators.slate_env import SlateEnv, SlateModel, SlateVectorEnv, State
from recray.simulators.streams import normals, uniforms

_INIT, _DOCS, _QUALITY, _CHOICE = 0, 1, 2, 3  # independent random streams within a user's step


def cluster_quality_means(num_clusters: int, min_utility: float, max_utility: float) -> np.ndarray:
    """RecSim's trashy-to-nutritious ladder: 70% of clusters below zero, 30% above."""
    trashy = np.linspace(min_utility, 0.0, int(num_clusters * 0.7))
    nutritious = np.linspace(0.0, max_utility, int(num_clusters * 0.3))
    return np.concatenate([trashy, nutritious])


def choice_probabilities(slate_interests: np.ndarray, no_click_mass: float,
                         min_normalizer: float) -> np.ndarray:
    """`[N, slate + 1]` multinomial proportional choice; the last column is no click."""
    scores = np.concatenate(
        [slate_interests, np.full((len(slate_interests), 1), no_click_mass)], axis=1)
    scores = scores - min_normalizer
    return scores / scores.sum(axis=1, keepdims=True)


def evolve_interest(interest: np.ndarray, flip: np.ndarray, alpha_x_intercept: float,
                    alpha_y_intercept: float) -> np.ndarray:
    """The clicked cluster's interest after a watch; RecSim's step shrinks where interest is strong."""
    alpha = (-alpha_y_intercept / alpha_x_intercept) * np.abs(interest) + alpha_y_intercept
    update = alpha * (1.0 - interest)
    toward = flip < (interest + 1.0) / 2.0
    return np.clip(np.where(toward, interest + update, interest - update), -1.0, 1.0)


def spend_budget(budget: np.ndarray, clicked: np.ndarray, watch_time: np.ndarray,
                 received_utility: np.ndarray, user_update_alpha: float,
                 step_penalty: float) -> np.ndarray:
    """A watch spends its length and refunds alpha * length * utility; no click costs the penalty."""
    watched = budget - watch_time + user_update_alpha * watch_time * received_utility
    return np.where(clicked, watched, budget - step_penalty)


@dataclass(frozen=True)
class InterestEvolution(SlateModel):
    """Parameters use RecSim's names where RecSim has them."""

    num_candidates: int = 10
    slate_size: int = 2
    num_clusters: int = 20
    time_budget: float = 200.0
    video_length: float = 4.0
    min_utility: float = -3.0
    max_utility: float = 3.0
    quality_stddev: float = 0.1  # RecSim calls it `quality_variance` but passes it as the scale
    no_click_mass: float = 1.0
    min_normalizer: float = -1.0
    step_penalty: float = 0.5
    user_quality_factor: float = 0.0
    document_quality_factor: float = 1.0
    user_update_alpha: float = 0.9 / 3.4
    alpha_x_intercept: float = 1.0
    alpha_y_intercept: float = 0.3

    def __post_init__(self) -> None:
        if not 1 <= self.slate_size <= self.num_candidates:
            raise ValueError(f"slate_size: expected in [1, num_candidates={self.num_candidates}], "
                             f"got {self.slate_size}")
        if len(self.quality_means) != self.num_clusters:
            raise ValueError(f"num_clusters: {self.num_clusters} does not split into RecSim's 70/30 "
                             f"trashy/nutritious ladder (try a multiple of 10)")
        if self.min_normalizer > -1.0 or self.no_click_mass - self.min_normalizer <= 0:
            raise ValueError(f"min_normalizer: expected <= -1 and < no_click_mass so every choice "
                             f"score is positive, got {self.min_normalizer}")

    @property
    def quality_means(self) -> np.ndarray:
        return cluster_quality_means(self.num_clusters, self.min_utility, self.max_utility)

    @property
    def observation_space(self) -> gym.spaces.Dict:
        return gym.spaces.Dict({
            "user": gym.spaces.Box(-1.0, 1.0, (self.num_clusters,), np.float32),
            "doc": gym.spaces.Box(0.0, 1.0, (self.num_candidates, self.num_clusters), np.float32),
            "response": gym.spaces.Dict({
                "click": gym.spaces.MultiBinary(self.slate_size),
                "watch_time": gym.spaces.Box(0.0, self.video_length, (self.slate_size,),
                                             np.float32),
            }),
        })

    def new_users(self, keys: np.ndarray) -> State:
        steps = np.zeros(len(keys), dtype=np.int64)
        return {"interests": 2.0 * uniforms(keys, steps, _INIT, self.num_clusters) - 1.0,
                "time_budget": np.full(len(keys), float(self.time_budget))}

    def sample_docs(self, keys: np.ndarray, steps: np.ndarray) -> State:
        cluster = (uniforms(keys, steps, _DOCS, self.num_candidates) * self.num_clusters).astype(
            np.int64)
        quality = self.quality_means[cluster] + self.quality_stddev * normals(
            keys, steps, _QUALITY, self.num_candidates)
        return {"cluster": cluster, "quality": quality}

    def step(self, state: State, docs: State, slates: np.ndarray, keys: np.ndarray,
             steps: np.ndarray) -> tuple[State, State, np.ndarray, np.ndarray]:
        users = np.arange(len(slates))
        slate_cluster = docs["cluster"][users[:, None], slates]
        interests = state["interests"]
        probs = choice_probabilities(interests[users[:, None], slate_cluster],
                                     self.no_click_mass, self.min_normalizer)
        u = uniforms(keys, steps, _CHOICE, 2)
        # Inverse-CDF choice; index slate_size means no click.
        choice = (u[:, :1] > np.cumsum(probs, axis=1)[:, :-1]).sum(axis=1)
        clicked = choice < self.slate_size
        slot = np.minimum(choice, self.slate_size - 1)
        cluster = slate_cluster[users, slot]
        budget = state["time_budget"]
        watch_time = np.where(clicked, np.minimum(budget, self.video_length), 0.0)
        interest = interests[users, cluster]
        received_utility = (self.user_quality_factor * (interest - self.min_normalizer)
                            + self.document_quality_factor * docs["quality"][users, slates[users, slot]])
        next_interests = interests.copy()
        next_interests[users, cluster] = np.where(
            clicked, evolve_interest(interest, u[:, 1], self.alpha_x_intercept,
                                     self.alpha_y_intercept), interest)
        next_budget = spend_budget(budget, clicked, watch_time, received_utility,
                                   self.user_update_alpha, self.step_penalty)
        response = self.empty_response(len(slates))
        response["click"][users[clicked], slot[clicked]] = 1
        response["watch_time"][users[clicked], slot[clicked]] = watch_time[clicked]
        return ({"interests": next_interests, "time_budget": next_budget}, response, watch_time,
                next_budget <= 0)

    def empty_response(self, num_users: int) -> State:
        return {"click": np.zeros((num_users, self.slate_size), dtype=np.int8),
                "watch_time": np.zeros((num_users, self.slate_size), dtype=np.float32)}

    def observe(self, state: State, docs: State, response: State) -> dict:
        one_hot = np.zeros((*docs["cluster"].shape, self.num_clusters), dtype=np.float32)
        np.put_along_axis(one_hot, docs["cluster"][:, :, None], 1.0, axis=2)
        return {"user": state["interests"].astype(np.float32), "doc": one_hot,
                "response": response}

    def info(self, state: State, docs: State) -> State:
        return {"quality": docs["quality"], "cluster": docs["cluster"],
                "time_budget": state["time_budget"]}


def make_env(render_mode: str | None = None, **params: float) -> SlateEnv:
    """`gym.make("recray/InterestEvolution-v0", **params)` entry point."""
    return SlateEnv(InterestEvolution(**params), render_mode=render_mode)


def make_vector_env(num_envs: int = 1, render_mode: str | None = None,
                    **params: float) -> SlateVectorEnv:
    """`gym.make_vec(..., vectorization_mode="vector_entry_point")` entry point."""
    return SlateVectorEnv(InterestEvolution(**params), num_envs, render_mode=render_mode)
