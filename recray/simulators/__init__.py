"""Gymnasium worlds of users and creators, their policies and an RL agent; numpy/torch, never Ray.

Importing this package registers `recray/LongTermSatisfaction-v0`, `recray/InterestEvolution-v0`
and `recray/CreatorEcosystem-v0`, each with a native vectorised form (`gym.make_vec(id,
num_envs=N, vectorization_mode="vector_entry_point")`).
"""

from __future__ import annotations

import gymnasium as gym

from recray.simulators.interest_evolution import InterestEvolution
from recray.simulators.long_term_satisfaction import LongTermSatisfaction
from recray.simulators.slate_env import SlateEnv, SlateVectorEnv, validate_slates

LONG_TERM_SATISFACTION = "recray/LongTermSatisfaction-v0"
INTEREST_EVOLUTION = "recray/InterestEvolution-v0"
CREATOR_ECOSYSTEM = "recray/CreatorEcosystem-v0"

_ENTRY_POINTS = {
    LONG_TERM_SATISFACTION: "recray.simulators.long_term_satisfaction",
    INTEREST_EVOLUTION: "recray.simulators.interest_evolution",
    CREATOR_ECOSYSTEM: "recray.simulators.creator_ecosystem",
}


def _register() -> None:
    for env_id, module in _ENTRY_POINTS.items():
        if env_id not in gym.registry:
            gym.register(env_id, entry_point=f"{module}:make_env",
                         vector_entry_point=f"{module}:make_vector_env")


_register()

__all__ = [
    "CREATOR_ECOSYSTEM",
    "INTEREST_EVOLUTION",
    "LONG_TERM_SATISFACTION",
    "InterestEvolution",
    "LongTermSatisfaction",
    "SlateEnv",
    "SlateVectorEnv",
    "validate_slates",
]
