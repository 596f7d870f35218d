"""`recray plan CONFIG`: TorchRec's sharding plan and per-rank memory for a cluster, planned on this machine.

Only the config and its data folder's schema.yaml are read: the model is built on the meta
device and TorchRec's planner runs over a Topology of the cluster (world size, device, memory per
rank), with no process group and no accelerator. A plan that does not fit is refused, naming the
largest table and the budget, exactly as `recray train` refuses it before starting workers.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from recray.jobs import main_for
from recray.jobs.train import parse_overrides
from recray.platform.config import ConfigError, load_train_config


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="YAML train config (its data.path needs only schema.yaml)")
    parser.add_argument("--world-size", type=int,
                        help="ranks (one per GPU or CPU worker); default scaling.num_workers")
    parser.add_argument("--device", choices=["cpu", "cuda"], help="default sharding.device")
    parser.add_argument("--hbm-gb", type=float,
                        help="HBM per GPU in GiB (--device cuda); default sharding.memory_per_worker")
    parser.add_argument("--memory-gb", type=float,
                        help="memory per CPU worker in GiB (--device cpu)")
    parser.add_argument("--host-gb", type=float,
                        help="host memory per GPU in GiB that tables may spill to behind an HBM "
                             "cache (UVM kernels; --device cuda); default TorchRec's 128")
    parser.add_argument("--local-world-size", type=int, default=8,
                        help="ranks per node: NVLink inside a node, network between (default 8)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config field, e.g. --set train.batch_size=4096")
    parser.add_argument("--json", type=Path, help="also write the plan and memory here")


def run(args: argparse.Namespace) -> int:
    import torch

    from recray import models
    from recray.data.schema import Schema
    from recray.platform.sharding import (
        MemoryBudgetError,
        describe_plan,
        embedding_optimizer_for,
        embedding_tables,
        plan_within_budget,
        rank_memory,
    )

    cfg = load_train_config(args.config, parse_overrides(args.set))
    device = args.device or cfg.sharding.device
    world = args.world_size or max(cfg.scaling.num_workers, 1)
    if world < 1:
        raise ConfigError(f"--world-size: {world}, expected at least 1")
    gib = args.hbm_gb if device == "cuda" else args.memory_gb
    if device == "cpu" and args.hbm_gb is not None:
        raise ConfigError("--hbm-gb: a CPU worker has no HBM; give --memory-gb, or --device cuda")
    if device == "cuda" and args.memory_gb is not None:
        raise ConfigError("--memory-gb: the planner places tables in a GPU's HBM; give --hbm-gb")
    memory = int(gib * 2**30) if gib is not None else cfg.sharding.memory_per_worker
    sharding = cfg.sharding.model_copy(update={"device": device, "memory_per_worker": memory})
    schema = Schema.load(cfg.data.path)
    with torch.device("meta"):
        model = models.build(cfg.model.name, schema, **cfg.model.hparams)
    optimizer = embedding_optimizer_for(sharding, cfg.train, device, world)
    local = min(args.local_world_size, world)
    started = time.perf_counter()
    try:
        planner, plan = plan_within_budget(
            model, sharding, optimizer.name, world, batch_size=cfg.train.batch_size,
            local_world_size=local,
            host_memory_per_worker=int(args.host_gb * 2**30) if args.host_gb else None)
    except MemoryBudgetError as e:
        raise ConfigError(str(e)) from None
    seconds = time.perf_counter() - started
    sizes = embedding_tables(model)
    per_rank = rank_memory(planner, world)
    kind = "HBM" if device == "cuda" else "DDR"
    budget = f"{memory / 2**30:.3g} GiB {kind} each" if memory else f"TorchRec's default {kind}"
    print(f"{cfg.model.name}: {len(sizes)} tables, {4 * sum(sizes.values()) / 2**30:.1f} GiB of "
          f"fp32 weights, on {world} x {device} ({budget}, {local} per node), batch "
          f"{cfg.train.batch_size} per rank; {optimizer}; planned in {seconds:.1f} s")
    print(describe_plan(plan, world, sizes, per_rank=False))
    print("per-rank memory (TorchRec's estimate: weights, optimizer state, input/output buffers):")
    for rank, used in enumerate(per_rank):
        host = f", host {used['ddr_bytes'] / 2**30:.2f} GiB" if device == "cuda" else ""
        device_bytes = used["hbm_bytes" if device == "cuda" else "ddr_bytes"]
        print(f"  rank {rank}: {kind} {device_bytes / 2**30:.2f} GiB{host}")
    for key, name in (("hbm_bytes", "HBM"), ("ddr_bytes", "host")):
        if any(u[key] for u in per_rank):
            print(f"  {name}: heaviest rank {max(u[key] for u in per_rank) / 2**30:.2f} GiB, all "
                  f"ranks {sum(u[key] for u in per_rank) / 2**30:.1f} GiB")
    if args.json:
        tables = {f"{path}.{table}": {"sharding_type": p.sharding_type, "ranks": p.ranks}
                  for path, params in plan.plan.items() for table, p in params.items()}
        args.json.write_text(json.dumps({"world_size": world, "device": device,
                                         "memory_per_rank_bytes": memory, "tables": tables,
                                         "per_rank": per_rank}, indent=2))
    return 0


def main(argv: list[str] | None = None) -> int:
    return main_for(sys.modules[__name__], argv)


if __name__ == "__main__":
    sys.exit(main())
