"""One scalar env and one vectorised env, both driven by the same batched `SlateModel` dynamics.

A `SlateModel` holds the parameters of a world and pure functions over batches of users (every
array has a leading user axis). The scalar env runs it on a batch of one; the vectorised env on
N users at once. Neither adds dynamics of its own, so the two cannot drift apart.

Randomness: each user has a key (see `streams`) and a step counter. `reset(seed=s)` gives the
scalar env the key of seed `s` and user i of the vectorised env the key of seed `s + i`; later
episodes chain keys (`next_episode_keys`). Hence the native vectorised env returns exactly what
`gym.make_vec(id, N, vectorization_mode="sync")` returns, with next-step autoreset.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, ClassVar

import gymnasium as gym
import numpy as np
from gymnasium.vector import AutoresetMode, VectorEnv
from gymnasium.vector.utils import batch_space

from recray.simulators.streams import keys_from_seeds, next_episode_keys

State = dict[str, np.ndarray]


def validate_slates(actions: Any, num_candidates: int, slate_size: int) -> np.ndarray:
    """`actions` as an int64 `[N, slate_size]` array, or a ValueError that names what is wrong."""
    slates = np.asarray(actions)
    if slates.ndim != 2 or slates.shape[1] != slate_size:
        raise ValueError(
            f"action: expected shape [num_users, slate_size={slate_size}] (or [{slate_size}] for one "
            f"user), got shape {list(slates.shape)}"
        )
    if slates.dtype.kind not in "iu":
        if slates.dtype.kind != "f" or not np.all(slates == np.round(slates)):
            raise ValueError(f"action: expected integer candidate indices, got dtype {slates.dtype}")
    slates = slates.astype(np.int64, copy=False)
    bad = (slates < 0) | (slates >= num_candidates)
    if bad.any():
        user, slot = np.argwhere(bad)[0]
        raise ValueError(
            f"action: user {user} slot {slot} is {slates[user, slot]}, expected a candidate index in "
            f"[0, {num_candidates})"
        )
    if slate_size > 1:
        if slate_size <= 8:
            # Pairwise column compares: a row-wise sort costs ~1 us per user, these ~1 ns.
            repeated = np.zeros(len(slates), dtype=bool)
            for i in range(slate_size):
                for j in range(i + 1, slate_size):
                    repeated |= slates[:, i] == slates[:, j]
        else:
            ordered = np.sort(slates, axis=1)
            repeated = (ordered[:, 1:] == ordered[:, :-1]).any(axis=1)
        if repeated.any():
            user = int(np.flatnonzero(repeated)[0])
            raise ValueError(
                f"action: user {user} slate {slates[user].tolist()} repeats a candidate; a slate "
                f"holds {slate_size} distinct indices"
            )
    return slates


class SlateSpace(gym.spaces.MultiDiscrete):
    """`MultiDiscrete([num_candidates] * slate_size)` whose samples and members repeat no index.

    A plain MultiDiscrete samples duplicates (10% of the time for 2 of 10), which the envs refuse.
    """

    def __init__(self, num_candidates: int, slate_size: int, seed: int | None = None) -> None:
        super().__init__([num_candidates] * slate_size, dtype=np.int64, seed=seed)
        self.num_candidates, self.slate_size = num_candidates, slate_size

    def sample(self, mask: Any = None, probability: Any = None) -> np.ndarray:
        if mask is not None or probability is not None:
            raise NotImplementedError("SlateSpace.sample: masks and probabilities are not supported")
        return self.np_random.choice(self.num_candidates, self.slate_size, replace=False).astype(
            self.dtype)

    def contains(self, x: Any) -> bool:
        return bool(super().contains(x) and len(np.unique(np.asarray(x))) == self.slate_size)


class SlateModel(ABC):
    """Parameters and batched pure dynamics of one slate world."""

    num_candidates: int
    slate_size: int
    time_budget: float
    # How an episode ends when `step` says so: a time limit is `truncated` (the user would go on,
    # the rest is not observed); otherwise the user reached a terminal state (`terminated`).
    time_limit: ClassVar[bool] = False

    @property
    @abstractmethod
    def observation_space(self) -> gym.spaces.Dict:
        """The observation space of one user."""

    @property
    def action_space(self) -> SlateSpace:
        return SlateSpace(self.num_candidates, self.slate_size)

    @abstractmethod
    def new_users(self, keys: np.ndarray) -> State:
        """Fresh user state for each key."""

    @abstractmethod
    def sample_docs(self, keys: np.ndarray, steps: np.ndarray) -> State:
        """This step's candidates for each user, arrays `[N, num_candidates, ...]`."""

    @abstractmethod
    def step(
        self, state: State, docs: State, slates: np.ndarray, keys: np.ndarray, steps: np.ndarray
    ) -> tuple[State, State, np.ndarray, np.ndarray]:
        """(next state, response, reward `[N]` float64, episode ended `[N]` bool) for shown slates."""

    @abstractmethod
    def empty_response(self, num_users: int) -> State:
        """The response part of the first observation, before anything is shown."""

    @abstractmethod
    def observe(self, state: State, docs: State, response: State) -> dict[str, Any]:
        """The batched observation: only what the platform may see."""

    @abstractmethod
    def info(self, state: State, docs: State) -> State:
        """Privileged ground truth for oracle baselines and analysis, batched."""


def _take_rows(tree: Any, rows: Any) -> Any:
    if isinstance(tree, dict):
        return {k: _take_rows(v, rows) for k, v in tree.items()}
    return tree[rows]


def _put_rows(tree: Any, rows: np.ndarray, values: Any) -> None:
    if isinstance(tree, dict):
        for k in tree:
            _put_rows(tree[k], rows, values[k])
    else:
        tree[rows] = values


def _episode_keys(seed: int | list[int] | None, num_users: int, previous: np.ndarray | None,
                  rng_draw: Any) -> np.ndarray:
    if seed is not None:
        seeds = np.arange(num_users) + seed if np.ndim(seed) == 0 else np.asarray(seed)
        if len(seeds) != num_users:
            raise ValueError(f"seed: expected an int or {num_users} ints, got {len(seeds)}")
        return keys_from_seeds(seeds)
    if previous is not None:
        return next_episode_keys(previous)
    # Never seeded: the first keys come from the env's own np_random, seeded by gymnasium.
    return rng_draw(num_users)


class SlateEnv(gym.Env):
    """The scalar env: one user, a `Dict` observation, a `MultiDiscrete` slate action."""

    metadata = {"render_modes": []}

    def __init__(self, model: SlateModel, render_mode: str | None = None) -> None:
        self.model = model
        self.render_mode = render_mode
        self.observation_space = model.observation_space
        self.action_space = model.action_space
        self._key: np.ndarray | None = None

    def reset(self, *, seed: int | None = None, options: dict | None = None) -> tuple[dict, dict]:
        super().reset(seed=seed)
        self._key = _episode_keys(seed, 1, self._key, self._draw_keys)
        self._steps = np.zeros(1, dtype=np.int64)
        self._state = self.model.new_users(self._key)
        self._docs = self.model.sample_docs(self._key, self._steps)
        obs = self.model.observe(self._state, self._docs, self.model.empty_response(1))
        return _take_rows(obs, 0), _take_rows(self.model.info(self._state, self._docs), 0)

    def _draw_keys(self, n: int) -> np.ndarray:
        return self.np_random.integers(0, 2**63, size=n, dtype=np.int64).astype(np.uint64)

    def step(self, action: Any) -> tuple[dict, float, bool, bool, dict]:
        if self._key is None:
            raise RuntimeError("step() before reset()")
        slates = validate_slates(np.asarray(action)[None], self.model.num_candidates,
                                 self.model.slate_size)
        self._state, response, reward, ended = self.model.step(
            self._state, self._docs, slates, self._key, self._steps)
        self._steps = self._steps + 1
        self._docs = self.model.sample_docs(self._key, self._steps)
        obs = self.model.observe(self._state, self._docs, response)
        info = self.model.info(self._state, self._docs)
        end = bool(ended[0])
        return (_take_rows(obs, 0), float(reward[0]), end and not self.model.time_limit,
                end and self.model.time_limit, _take_rows(info, 0))


class SlateVectorEnv(VectorEnv):
    """N independent users in batched numpy, with gymnasium's next-step autoreset."""

    metadata = {"render_modes": [], "autoreset_mode": AutoresetMode.NEXT_STEP}

    def __init__(self, model: SlateModel, num_envs: int, render_mode: str | None = None) -> None:
        if num_envs < 1:
            raise ValueError(f"num_envs: expected >= 1, got {num_envs}")
        self.model = model
        self.num_envs = num_envs
        self.render_mode = render_mode
        self.single_observation_space = model.observation_space
        self.single_action_space = model.action_space
        self.observation_space = batch_space(self.single_observation_space, num_envs)
        self.action_space = batch_space(self.single_action_space, num_envs)
        self._keys: np.ndarray | None = None
        # A placeholder slate for users whose action is ignored (they are being autoreset).
        self._noop_slate = np.arange(model.slate_size, dtype=np.int64)

    def _draw_keys(self, n: int) -> np.ndarray:
        return self.np_random.integers(0, 2**63, size=n, dtype=np.int64).astype(np.uint64)

    def reset(self, *, seed: int | list[int] | None = None,
              options: dict | None = None) -> tuple[dict, dict]:
        super().reset(seed=None if seed is None or np.ndim(seed) else seed)
        self._keys = _episode_keys(seed, self.num_envs, self._keys, self._draw_keys)
        self._steps = np.zeros(self.num_envs, dtype=np.int64)
        self._state = self.model.new_users(self._keys)
        self._docs = self.model.sample_docs(self._keys, self._steps)
        self._autoreset = np.zeros(self.num_envs, dtype=bool)
        obs = self.model.observe(self._state, self._docs, self.model.empty_response(self.num_envs))
        return obs, self._batched_info()

    def step(self, actions: Any) -> tuple[dict, np.ndarray, np.ndarray, np.ndarray, dict]:
        if self._keys is None:
            raise RuntimeError("step() before reset()")
        actions = np.asarray(actions)
        if actions.ndim != 2 or actions.shape[0] != self.num_envs:
            raise ValueError(
                f"action: expected shape [num_envs={self.num_envs}, slate_size="
                f"{self.model.slate_size}], got shape {list(actions.shape)}"
            )
        resetting = np.flatnonzero(self._autoreset)
        if len(resetting) and actions.shape[1] == self.model.slate_size:
            # Like SyncVectorEnv, the action of a user being autoreset is ignored, not validated.
            actions = actions.copy()
            actions[resetting] = self._noop_slate
        slates = validate_slates(actions, self.model.num_candidates, self.model.slate_size)
        self._state, response, reward, ended = self.model.step(
            self._state, self._docs, slates, self._keys, self._steps)
        self._steps += 1
        if len(resetting):
            self._keys[resetting] = next_episode_keys(self._keys[resetting])
            self._steps[resetting] = 0
            _put_rows(self._state, resetting, self.model.new_users(self._keys[resetting]))
            _put_rows(response, resetting, self.model.empty_response(len(resetting)))
            reward[resetting] = 0.0
            ended[resetting] = False
        self._docs = self.model.sample_docs(self._keys, self._steps)
        obs = self.model.observe(self._state, self._docs, response)
        self._autoreset = ended.copy()
        never = np.zeros(self.num_envs, dtype=bool)
        if self.model.time_limit:
            return obs, reward, never, ended, self._batched_info()
        return obs, reward, ended, never, self._batched_info()

    def _batched_info(self) -> dict:
        info: dict[str, np.ndarray] = dict(self.model.info(self._state, self._docs))
        mask = np.ones(self.num_envs, dtype=bool)
        for key in list(info):
            info[f"_{key}"] = mask
        return info
