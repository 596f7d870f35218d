"""`recray rl`: RLlib PPO on the simulators, with a Plackett-Luce slate RLModule and exported policies.

Env runners are Ray actors (`num_env_runners`); each steps recray's native vectorised env
(`gym.make_vec(id, num_envs, vectorization_mode="vector_entry_point")`, which RLlib calls when
`gym_env_vectorize_mode` is `vector_entry_point`). The RLModule scores every candidate with one
network shared over (user, candidate) features (`recray.simulators.learned_policy.SlateScorer`) and
samples slates without replacement from the Plackett-Luce distribution of those scores; PPO's ratio
uses that distribution's exact log-probability. Every checkpoint also exports the scorer to
`policy.pt`, which `recray.simulators.learned_policy.LearnedPolicy` loads without Ray.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Literal

import gymnasium as gym
import numpy as np
import yaml
from pydantic import Field, field_validator

from recray.platform.config import ConfigError, _Strict, load_yaml, parse
from recray.platform.ray_init import init_local_ray
from recray.platform.run_folder import new_run_folder
from recray.simulators import CREATOR_ECOSYSTEM, INTEREST_EVOLUTION, LONG_TERM_SATISFACTION
from recray.simulators.learned_policy import (
    LearnedPolicy,
    SlateScorer,
    export_policy,
    gumbel_top_k,
    observation_features,
    plackett_luce_entropy,
    plackett_luce_log_prob,
)

ENVS = {"lts": LONG_TERM_SATISFACTION, "iev": INTEREST_EVOLUTION, "creator": CREATOR_ECOSYSTEM}
CHECKPOINTS = "checkpoints"
POLICY_FILE = "policy.pt"
RLLIB_ENV = "recray-slate-env"  # the name `rllib_env` is registered under with Ray Tune


# --- config --------------------------------------------------------------------------------------
class EnvSection(_Strict):
    id: str = Field(description="a gymnasium id (recray/LongTermSatisfaction-v0, ...) or lts | iev "
                                "| creator")
    params: dict[str, Any] = Field(default_factory=dict,
                                   description="gym.make keyword arguments (RecSim's names)")
    num_envs_per_env_runner: int = Field(default=64, ge=1, description="users per vectorised env; "
                                         "CreatorEcosystem: the users of one world")
    reward_scale: float = Field(default=1.0, gt=0, description="rewards are multiplied by this for "
                                "learning (returns of thousands upset the critic); progress lines "
                                "report env units")
    retention_bonus: float = Field(default=0.0, ge=0, description="CreatorEcosystem: reward added "
                                   "when a served user comes back the next morning")

    @field_validator("id")
    @classmethod
    def _known(cls, value: str) -> str:
        value = ENVS.get(value, value)
        if value not in ENVS.values():
            raise ValueError(f"unknown env {value!r}; choose from {sorted(ENVS.values())} or "
                             f"{sorted(ENVS)}")
        return value


class PPOSection(_Strict):
    """The PPO settings recray exposes; RLlib's names."""

    lr: float = Field(default=3e-4, gt=0)
    gamma: float = Field(default=0.99, gt=0, le=1)
    lambda_: float = Field(default=0.95, ge=0, le=1, alias="lambda")
    clip_param: float = Field(default=0.2, gt=0)
    entropy_coeff: float = Field(default=0.0, ge=0)
    vf_loss_coeff: float = Field(default=0.5, ge=0)
    train_batch_size: int = Field(default=4000, ge=1, description="env steps per iteration")
    minibatch_size: int = Field(default=500, ge=1)
    num_epochs: int = Field(default=5, ge=1)
    grad_clip: float | None = Field(default=0.5, gt=0)


class ModuleSection(_Strict):
    hidden: int = Field(default=64, ge=1, description="width of the shared candidate scorer")


class RLConfig(_Strict):
    name: str
    algorithm: Literal["PPO"] = "PPO"
    env: EnvSection
    ppo: PPOSection = Field(default_factory=PPOSection)
    module: ModuleSection = Field(default_factory=ModuleSection)
    num_env_runners: int = Field(default=1, ge=0, description="env runner actors (0: sample in "
                                 "the driver)")
    cpus_per_env_runner: float = Field(default=1.0, gt=0)
    iterations: int = Field(default=20, ge=1)
    checkpoint_every: int = Field(default=5, ge=1, description="iterations between checkpoints "
                                  "(the last iteration always checkpoints)")
    seed: int = 0
    storage_path: str = "runs"


def load_rl_config(path: str | Path, overrides: dict[str, Any] | None = None) -> RLConfig:
    """The config at `path` with `--set` overrides, checked down to the env it builds."""
    data = load_yaml(path)
    for dotted, value in (overrides or {}).items():
        node = data
        *parents, leaf = dotted.split(".")
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = value
    cfg = parse(RLConfig, data, str(path))
    check_env(cfg, str(path))
    return cfg


def check_env(cfg: RLConfig, source: str) -> tuple[gym.spaces.Space, gym.spaces.Space]:
    """Build one small env of the config in this process: a bad parameter fails here, named."""
    if cfg.env.retention_bonus and cfg.env.id != CREATOR_ECOSYSTEM:
        raise ConfigError(f"{source}: env.retention_bonus: only {CREATOR_ECOSYSTEM} has users who "
                          f"come back; {cfg.env.id} has none")
    if cfg.ppo.minibatch_size > cfg.ppo.train_batch_size:
        raise ConfigError(f"{source}: ppo.minibatch_size: {cfg.ppo.minibatch_size} is larger than "
                          f"ppo.train_batch_size {cfg.ppo.train_batch_size}")
    try:
        env = make_env(cfg.env.id, cfg.env.params, cfg.env.num_envs_per_env_runner)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{source}: env.params: {e}") from None
    spaces = env.single_observation_space, env.single_action_space
    env.close()
    return spaces


def make_env(env_id: str, params: dict[str, Any], num_envs: int) -> gym.vector.VectorEnv:
    """recray's native vectorised env (never N copies of the scalar one)."""
    params = dict(params)
    if env_id == CREATOR_ECOSYSTEM and params.get("num_users", num_envs) != num_envs:
        raise ValueError(f"num_users: CreatorEcosystem has one env slot per user, so num_users "
                         f"({params['num_users']}) must equal env.num_envs_per_env_runner "
                         f"({num_envs})")
    return gym.make_vec(env_id, num_envs=num_envs, vectorization_mode="vector_entry_point",
                        **params)


class ShapedReward(gym.vector.VectorWrapper):
    """Rewards for learning: plus `retention_bonus` when a served user is back the next morning,
    all times `reward_scale`. The bonus reads the next observation's `active` flag and the day in
    `info`, both logged signals (`label_return` in the logs), never the users' latent state."""

    def __init__(self, env: gym.vector.VectorEnv, reward_scale: float = 1.0,
                 retention_bonus: float = 0.0) -> None:
        super().__init__(env)
        self.reward_scale, self.retention_bonus = reward_scale, retention_bonus
        self._day: np.ndarray | None = None

    def reset(self, **kwargs: Any) -> tuple[Any, dict]:
        obs, info = self.env.reset(**kwargs)
        self._day = np.asarray(info["day"]) if "day" in info else None
        return obs, info

    def step(self, actions: Any) -> tuple[Any, np.ndarray, np.ndarray, np.ndarray, dict]:
        obs, reward, terminated, truncated, info = self.env.step(actions)
        reward = np.asarray(reward, dtype=np.float64)
        if self.retention_bonus and self._day is not None:
            day = np.asarray(info["day"])
            came_back = (obs["active"][:, 0] > 0) & (day == self._day + 1)
            reward = reward + self.retention_bonus * came_back
            self._day = day
        return obs, reward * self.reward_scale, terminated, truncated, info


def rllib_env(env_config: dict[str, Any]) -> gym.Env | gym.vector.VectorEnv:
    """RLlib's env creator: with `num_envs` (the vectorised path) the native vector env, shaped."""
    import recray.simulators  # noqa: F401  (registers the ids in the env runner's process)

    env_id, params = env_config["env_id"], dict(env_config.get("params", {}))
    if "num_envs" not in env_config:
        return gym.make(env_id, **params)
    env = make_env(env_id, params, int(env_config["num_envs"]))
    return ShapedReward(env, env_config.get("reward_scale", 1.0),
                        env_config.get("retention_bonus", 0.0))


# --- the slate distribution and the RLModule -----------------------------------------------------
def _rllib_classes() -> tuple[type, type, type]:
    """PlackettLuce, TopKSlate and SlateRLModule, built on first use so that importing this module
    (config checks, `recray submit`) does not import RLlib."""
    global _CLASSES
    if _CLASSES is not None:
        return _CLASSES
    import torch
    from ray.rllib.core.columns import Columns
    from ray.rllib.core.distribution.distribution import Distribution
    from ray.rllib.core.rl_module.apis.value_function_api import ValueFunctionAPI
    from ray.rllib.core.rl_module.torch import TorchRLModule

    class PlackettLuce(Distribution):
        """Slates without replacement: Gumbel top-k draws, their exact log-probability."""

        def __init__(self, logits: torch.Tensor, slate_size: int) -> None:
            super().__init__()
            self.logits, self.slate_size = logits, slate_size

        def logp(self, value: torch.Tensor, **kwargs: Any) -> torch.Tensor:
            return plackett_luce_log_prob(self.logits, value)

        def sample(self, *, sample_shape: Any = None, **kwargs: Any) -> torch.Tensor:
            if sample_shape:
                raise NotImplementedError("PlackettLuce.sample: one slate per row")
            return gumbel_top_k(self.logits, self.slate_size)

        def rsample(self, *, sample_shape: Any = None, **kwargs: Any) -> torch.Tensor:
            raise NotImplementedError("PlackettLuce: a slate has no reparameterised sample")

        def entropy(self) -> torch.Tensor:
            return plackett_luce_entropy(self.logits, self.slate_size)

        def kl(self, other: Distribution) -> torch.Tensor:
            raise NotImplementedError("PlackettLuce.kl: recray's PPO runs with use_kl_loss=False "
                                      "(the clipped ratio only)")

        @staticmethod
        def required_input_dim(space: gym.Space, **kwargs: Any) -> int:
            return int(space.nvec[0])

        @classmethod
        def from_logits(cls, logits: torch.Tensor, slate_size: int = 1, **kwargs: Any
                        ) -> PlackettLuce:
            return cls(logits, slate_size)

        def to_deterministic(self) -> TopKSlate:
            return TopKSlate(self.logits, self.slate_size)

    class TopKSlate(PlackettLuce):
        """The greedy slate: the k best scores (RLlib's explore=False)."""

        def sample(self, *, sample_shape: Any = None, **kwargs: Any) -> torch.Tensor:
            # A stable sort, so equal scores (two candidates with the same features) rank in
            # index order, as `LearnedPolicy` ranks them: the exported policy acts the same.
            order = torch.sort(self.logits.detach(), dim=1, descending=True, stable=True).indices
            return order[:, :self.slate_size]

        def to_deterministic(self) -> TopKSlate:
            return self

    class SlateRLModule(TorchRLModule, ValueFunctionAPI):
        """A `SlateScorer` behind RLlib's RLModule API; `model_config`: {"hidden": int}."""

        def setup(self) -> None:
            self.slate_size = int(self.action_space.shape[0])
            zeros = _zeros_like_space(self.observation_space)
            self.scorer = SlateScorer(observation_features(zeros).shape[2],
                                      int(self.model_config.get("hidden", 64)))

        def _forward(self, batch: dict[str, Any], **kwargs: Any) -> dict[str, Any]:
            return {Columns.ACTION_DIST_INPUTS: self.scorer(observation_features(batch[Columns.OBS]))}

        def compute_values(self, batch: dict[str, Any], embeddings: Any = None) -> torch.Tensor:
            return self.scorer.value(observation_features(batch[Columns.OBS]))

        def get_exploration_action_dist_cls(self) -> type:
            return PlackettLuce.get_partial_dist_cls(slate_size=self.slate_size)

        get_train_action_dist_cls = get_exploration_action_dist_cls
        get_inference_action_dist_cls = get_exploration_action_dist_cls

    _CLASSES = (PlackettLuce, TopKSlate, SlateRLModule)
    return _CLASSES


_CLASSES: tuple[type, type, type] | None = None


def _zeros_like_space(space: gym.Space) -> Any:
    """A batch of one all-zero observation of `space` (spaces with inf bounds cannot sample)."""
    if isinstance(space, gym.spaces.Dict):
        return {key: _zeros_like_space(sub) for key, sub in space.spaces.items()}
    return np.zeros((1, *space.shape), dtype=space.dtype)


def slate_module_spec(hidden: int) -> Any:
    from ray.rllib.core.rl_module.rl_module import RLModuleSpec

    return RLModuleSpec(module_class=_rllib_classes()[2], model_config={"hidden": hidden})


def algorithm_config(cfg: RLConfig) -> Any:
    """The PPOConfig (new API stack) of a recray RL config."""
    from ray.rllib.algorithms.ppo import PPOConfig
    from ray.tune.registry import register_env

    register_env(RLLIB_ENV, rllib_env)
    ppo = cfg.ppo
    return (
        PPOConfig()
        .api_stack(enable_rl_module_and_learner=True, enable_env_runner_and_connector_v2=True)
        .environment(env=RLLIB_ENV, env_config={
            "env_id": cfg.env.id, "params": cfg.env.params, "reward_scale": cfg.env.reward_scale,
            "retention_bonus": cfg.env.retention_bonus}, disable_env_checking=True)
        .env_runners(num_env_runners=cfg.num_env_runners,
                     num_envs_per_env_runner=cfg.env.num_envs_per_env_runner,
                     num_cpus_per_env_runner=cfg.cpus_per_env_runner,
                     gym_env_vectorize_mode="vector_entry_point", rollout_fragment_length="auto")
        .training(lr=ppo.lr, gamma=ppo.gamma, lambda_=ppo.lambda_, clip_param=ppo.clip_param,
                  entropy_coeff=ppo.entropy_coeff, vf_loss_coeff=ppo.vf_loss_coeff,
                  vf_clip_param=math.inf, use_kl_loss=False, kl_coeff=0.0,
                  train_batch_size_per_learner=ppo.train_batch_size,
                  minibatch_size=ppo.minibatch_size, num_epochs=ppo.num_epochs,
                  grad_clip=ppo.grad_clip)
        .rl_module(rl_module_spec=slate_module_spec(cfg.module.hidden))
        .learners(num_learners=0)
        .debugging(seed=cfg.seed, log_level="WARN")
    )


# --- the run -------------------------------------------------------------------------------------
def run_folder(cfg: RLConfig, resume: str | None) -> tuple[Path, Path | None]:
    """(folder, checkpoint to restore): a new `<name>-<timestamp>` folder, or RUN's last checkpoint.

    A run resumed with another env than it was trained on is refused here, before any actor.
    """
    root = Path(cfg.storage_path)
    if resume is None:
        return new_run_folder(root, cfg.name), None
    given = Path(resume).expanduser()
    folder = given if given.is_dir() else root / resume
    checkpoint = latest_checkpoint(folder)
    saved = yaml.safe_load((folder / "config.yaml").read_text())
    trained_on = ENVS.get(saved["env"]["id"], saved["env"]["id"])
    if trained_on != cfg.env.id:
        raise ConfigError(f"--resume: {folder} was trained on {trained_on}, the config asks for "
                          f"{cfg.env.id}; a checkpoint continues on the env it was trained on")
    return folder, checkpoint


def latest_checkpoint(folder: Path) -> Path:
    """The newest `checkpoints/iter_NNNNN` of a run folder (or a ConfigError naming what lacks)."""
    found = sorted((folder / CHECKPOINTS).glob("iter_*")) if folder.is_dir() else []
    if not found:
        raise ConfigError(f"--resume: {folder} holds no {CHECKPOINTS}/iter_* checkpoint of recray rl")
    return found[-1]


def check_policy(path: str | Path, env_id: str) -> LearnedPolicy:
    """An exported policy, refused unless trained on `env_id` (the check before an A/B arm runs)."""
    return LearnedPolicy.load(path, env_id=env_id)


def iteration_line(iteration: int, result: dict[str, Any], reward_scale: float) -> dict[str, float]:
    """The figures of one training iteration: mean return (env units), episode length, steps/s."""
    runners = result.get("env_runners", {})
    # Rollout throughput: this iteration's sampled steps over the time the driver waited for the
    # env runners (RLlib's timer), so the learner's update does not count against the env runners.
    sampling_s = result.get("timers", {}).get("env_runner_sampling_timer", float("nan"))
    return {
        "iteration": iteration,
        "episode_return_mean": runners.get("episode_return_mean", float("nan")) / reward_scale,
        "episode_len_mean": runners.get("episode_len_mean", float("nan")),
        "env_steps_per_s": float(runners.get("num_env_steps_sampled", 0)) / sampling_s,
        "env_steps": int(result.get("num_env_steps_sampled_lifetime", 0)),
        "time_s": float(result.get("time_this_iter_s", float("nan"))),
    }


def export_module(algo: Any, cfg: RLConfig, path: Path) -> Path:
    """The learner's RLModule scorer as a Ray-free `policy.pt`."""
    module = algo.get_module()
    spaces = module.observation_space, module.action_space
    return export_policy(path, module.scorer, cfg.env.id, cfg.env.params,
                         num_candidates=int(spaces[1].nvec[0]), slate_size=int(spaces[1].shape[0]))


def train(cfg: RLConfig, resume: str | None = None, out: Any = None,
          run: tuple[Path, Path | None] | None = None) -> dict[str, Any]:
    """Train PPO for `cfg.iterations` (more) iterations; returns the run folder and the history.

    Progress is one line per iteration on `out` (default stdout); checkpoints go to
    `<run>/checkpoints/iter_NNNNN/` (RLlib's, with the exported `policy.pt` beside them), the last
    one's policy also to `<run>/policy.pt`; the history to `<run>/progress.jsonl`. `run` is
    `run_folder(cfg, resume)` when the caller made the folder already (to log into it).
    """
    import sys

    import ray

    out = out or sys.stdout
    folder, checkpoint = run or run_folder(cfg, resume)
    check_env(cfg, "config")
    if checkpoint is None:
        (folder / "config.yaml").write_text(
            yaml.safe_dump(cfg.model_dump(mode="json", by_alias=True), sort_keys=False))
    if not ray.is_initialized():
        if "RAY_ADDRESS" in os.environ:
            ray.init(address=os.environ["RAY_ADDRESS"], log_to_driver=False,
                     logging_level="WARNING")
        else:
            init_local_ray(log_to_driver=False, logging_level="WARNING")
    needed = cfg.num_env_runners * cfg.cpus_per_env_runner
    cpus = ray.cluster_resources().get("CPU", 0)
    if needed > cpus:
        raise ConfigError(f"num_env_runners: {cfg.num_env_runners} x {cfg.cpus_per_env_runner:g} "
                          f"CPU need {needed:g} CPUs; the cluster has {cpus:g}")
    algo = algorithm_config(cfg).build_algo()
    start = 0
    if checkpoint is not None:
        algo.restore_from_path(str(checkpoint.resolve()))
        start = int(checkpoint.name.split("_")[1])
        print(f"resumed {folder} from {checkpoint.name}", file=out, flush=True)
    history = []
    try:
        for iteration in range(start + 1, start + cfg.iterations + 1):
            line = iteration_line(iteration, algo.train(), cfg.env.reward_scale)
            history.append(line)
            with open(folder / "progress.jsonl", "a") as log:
                log.write(json.dumps(line) + "\n")
            print(f"iter {iteration:4d}  return {line['episode_return_mean']:10.2f}  "
                  f"episode length {line['episode_len_mean']:6.1f}  "
                  f"{line['env_steps_per_s']:8.0f} env steps/s  ({line['env_steps']} steps)",
                  file=out, flush=True)
            if iteration % cfg.checkpoint_every == 0 or iteration == start + cfg.iterations:
                target = folder / CHECKPOINTS / f"iter_{iteration:05d}"
                algo.save_to_path(str(target.resolve()))
                export_module(algo, cfg, target / POLICY_FILE)
                export_module(algo, cfg, folder / POLICY_FILE)
    finally:
        algo.stop()
    print(f"run folder {folder}; policy {folder / POLICY_FILE}", file=out, flush=True)
    return {"run_dir": str(folder), "policy": str(folder / POLICY_FILE), "history": history}
