"""A/B experiments on Ray: user shards as actors around the creator hub, experiments as tasks."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import ray

from recray.abtest.config import ExperimentConfig, validate
from recray.abtest.harness import (
    drive,
    global_treatment_effect,
    make_assignment,
    make_hub,
    make_shard,
    shard_ranges,
)
from recray.abtest.result import ExperimentResult


@ray.remote(num_cpus=0)
class ShardActor:
    """One user shard in its own process. It holds no CPU reservation: a day is bulk-synchronous
    (the driver waits for every shard each round), so shards never compete with other tasks for
    long, and N shards must fit beside the driver on a small machine."""

    def __init__(self, cfg: ExperimentConfig, seed: int, user_ids: np.ndarray,
                 assignment: Any) -> None:
        self.shard = make_shard(cfg, seed, user_ids, assignment)

    def play_round(self, *args: Any) -> dict[str, Any]:
        return self.shard.play_round(*args)


def run_world_on_ray(cfg: ExperimentConfig, seed: int, forced: int | None = None,
                     shards: int | None = None,
                     progress: Callable[[str], None] | None = None) -> ExperimentResult:
    """One world with its users sharded over `shards` actors; the driver is the creator hub."""
    shards = shards or cfg.shards
    assignment = make_assignment(cfg, forced)
    actors = [ShardActor.remote(cfg, seed, ids, assignment)
              for ids in shard_ranges(cfg.users, shards)]

    def call(method: str, args: list[tuple]) -> list[Any]:
        # One put per round for the shared state: every shard reads the same object.
        shared = [ray.put(a) for a in args[0]] if len({id(a) for a in args}) == 1 else None
        refs = [getattr(actor, method).remote(*(shared or a)) for actor, a in zip(
            actors, args, strict=True)]
        return ray.get(refs)

    try:
        return drive(cfg, seed, assignment, call, shards, progress, make_hub(cfg, seed, assignment))
    finally:
        for actor in actors:
            ray.kill(actor)


def run_experiment_on_ray(cfg: ExperimentConfig, seed: int | None = None,
                          progress: Callable[[str], None] | None = None,
                          check: bool = True) -> ExperimentResult:
    """Validate, run the experiment on shard actors, and the two GTE worlds as parallel tasks."""
    if check:
        validate(cfg)
    seed = cfg.seeds[0] if seed is None else seed
    gte_refs = start_gte_worlds(cfg, seed) if cfg.gte else []
    result = run_world_on_ray(cfg, seed, progress=progress)
    if gte_refs:
        control, treatment = ray.get(gte_refs)
        result.gte = global_treatment_effect(control, treatment)
    return result


def start_gte_worlds(cfg: ExperimentConfig, seed: int) -> list[Any]:
    """The world all on control and all on treatment (same seed) as two Ray tasks; `ray.get` them
    for `recray.abtest.harness.global_treatment_effect`."""
    return [_world_task.remote(cfg, seed, arm) for arm in (0, 1)]


@ray.remote(num_cpus=1)
def _world_task(cfg: ExperimentConfig, seed: int, forced: int | None) -> ExperimentResult:
    from recray.abtest.harness import run_world

    return run_world(cfg, seed, forced=forced, shards=1)


@ray.remote(num_cpus=1)
def _experiment_task(cfg: ExperimentConfig, seed: int) -> ExperimentResult:
    from recray.abtest.harness import run_experiment

    return run_experiment(cfg, seed, shards=1, check=False)


def run_many(configs: list[ExperimentConfig], seeds: list[int] | None = None,
             check: bool = True) -> list[ExperimentResult]:
    """Many experiments (A/A batteries, seeds) as Ray tasks, one process each, unsharded.

    Every config is validated before any task starts; `seeds[i]` (default: the config's first
    seed) is experiment i's seed. Results come back in the order of `configs`.
    """
    seeds = seeds or [cfg.seeds[0] for cfg in configs]
    if len(seeds) != len(configs):
        raise ValueError(f"seeds: expected one per config ({len(configs)}), got {len(seeds)}")
    if check:
        for cfg in configs:
            validate(cfg)
    return ray.get([_experiment_task.remote(cfg, seed) for cfg, seed in zip(
        configs, seeds, strict=True)])
