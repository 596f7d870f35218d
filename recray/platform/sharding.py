"""TorchRec sharding inside a Ray Train worker: plan the tables, wrap the model in DMP, build optimizers.

Ray Train starts and supervises the workers and their process group; it does not shard models.
As in Ray's own recsys release benchmark, the train function builds TorchRec's
`DistributedModelParallel` itself: embedding tables are placed by TorchRec's planner (with the
per-table sharding types the config asks for), the dense part is replicated with DDP.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:
    from recray.platform.config import OptimSection, ShardingSection

# What TorchRec's sharders offer per compute device (row-wise needs CUDA/MTIA kernels).
SHARDING_TYPES = ("data_parallel", "table_wise", "column_wise", "row_wise", "table_row_wise",
                  "table_column_wise", "grid_shard")
CPU_SHARDING_TYPES = ("data_parallel", "table_wise", "column_wise", "table_column_wise")
# Fused (in-backward) embedding optimizers the CPU TBE kernels implement; Adam is CUDA-only.
CPU_EMBEDDING_OPTIMIZERS = ("adagrad", "rowwise_adagrad", "sgd")


# Fused embedding optimizers per compute device (fbgemm's TBE kernels).
FUSED_EMBEDDING_OPTIMIZERS = {"cpu": CPU_EMBEDDING_OPTIMIZERS, "cuda": (*CPU_EMBEDDING_OPTIMIZERS, "adam")}


@dataclass(frozen=True)
class EmbeddingOptimizer:
    """The fused optimizer a sharded run gives its embedding tables, and why."""

    name: str
    lr: float
    reason: str

    def __str__(self) -> str:
        return f"embeddings: fused {self.name}, lr {self.lr:g} ({self.reason})"


def embedding_optimizer_for(
    sharding: ShardingSection, train: OptimSection, device: str, world: int
) -> EmbeddingOptimizer:
    """By default the embeddings train with train.optimizer, as in an unsharded run.

    Where the device has no fused kernel for it (Adam on CPU) they fall back to Adagrad, and the
    reason says so. TorchRec sums embedding gradients over ranks while DDP averages the dense
    ones: Adagrad and Adam do not care, SGD needs lr / world to take the unsharded step.
    """
    if sharding.embedding_optimizer is not None:
        name, reason = sharding.embedding_optimizer, "sharding.embedding_optimizer"
    elif train.optimizer in FUSED_EMBEDDING_OPTIMIZERS[device]:
        name, reason = train.optimizer, "train.optimizer, as in an unsharded run"
    else:
        name = "adagrad"
        reason = (f"train.optimizer {train.optimizer!r} has no fused {device} kernel in fbgemm, so "
                  f"unlike an unsharded run the embeddings do not train with {train.optimizer}")
    lr = sharding.embedding_lr
    if lr is None:
        lr = train.lr / world if name == "sgd" else train.lr
        reason += "; lr = train.lr / workers for summed gradients" if name == "sgd" else ""
    if train.weight_decay:
        reason += "; train.weight_decay applies to the dense part only"
    return EmbeddingOptimizer(name, lr, reason)


def embedding_tables(model: nn.Module) -> dict[tuple[str, str], int]:
    """(module path, table name) -> rows x dim, over every EmbeddingBag/EmbeddingCollection."""
    from torchrec.modules.embedding_modules import EmbeddingBagCollection, EmbeddingCollection

    tables: dict[tuple[str, str], int] = {}
    for path, module in model.named_modules():
        if isinstance(module, EmbeddingBagCollection):
            configs = module.embedding_bag_configs()
        elif isinstance(module, EmbeddingCollection):
            configs = module.embedding_configs()
        else:
            continue
        for c in configs:
            tables[(path, c.name)] = c.num_embeddings * c.embedding_dim
    return tables


def _embedding_parameters(model: nn.Module) -> list[nn.Parameter]:
    from torchrec.modules.embedding_modules import EmbeddingBagCollection, EmbeddingCollection

    return [
        p
        for module in model.modules()
        if isinstance(module, EmbeddingBagCollection | EmbeddingCollection)
        for p in module.parameters()
    ]


def _embedding_optimizer(name: str) -> type[torch.optim.Optimizer]:
    from torchrec.optim import RowWiseAdagrad

    return {"adagrad": torch.optim.Adagrad, "rowwise_adagrad": RowWiseAdagrad,
            "sgd": torch.optim.SGD, "adam": torch.optim.Adam}[name]


def shard(
    model: nn.Module,
    *,
    default_type: str,
    table_types: dict[str, str],
    embedding_optimizer: str,
    embedding_lr: float,
    dense_optimizer,
    device: torch.device,
) -> tuple[nn.Module, torch.optim.Optimizer, str]:
    """-> (DMP-wrapped model, combined optimizer, a printable plan). Collective: all ranks call it."""
    import torch.distributed as dist
    from torchrec.distributed.model_parallel import DistributedModelParallel, get_default_sharders
    from torchrec.distributed.planner import (
        EmbeddingShardingPlanner,
        ParameterConstraints,
        Topology,
    )
    from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward
    from torchrec.optim.keyed import CombinedOptimizer, KeyedOptimizerWrapper
    from torchrec.optim.optimizers import in_backward_optimizer_filter

    # Embedding rows are updated inside the backward by fbgemm (fused), never as dense tensors.
    apply_optimizer_in_backward(
        _embedding_optimizer(embedding_optimizer), _embedding_parameters(model), {"lr": embedding_lr}
    )
    world = dist.get_world_size()
    sizes = embedding_tables(model)
    constraints = {}
    for _, table in sizes:
        kind = table_types.get(table, default_type)
        if kind != "auto":
            # min_partition lets column-wise split small dims (TorchRec's default is 32 columns).
            constraints[table] = ParameterConstraints(sharding_types=[kind], min_partition=4)
    planner = EmbeddingShardingPlanner(
        topology=Topology(world_size=world, compute_device=device.type, local_world_size=world),
        constraints=constraints,
    )
    sharders = get_default_sharders()
    plan = planner.collective_plan(model, sharders, dist.GroupMember.WORLD)
    initial = {key: value.detach().clone() for key, value in model.state_dict().items()}
    dmp = DistributedModelParallel(model, device=device, plan=plan, sharders=sharders)
    _copy_full_weights(dmp, initial)
    dense = KeyedOptimizerWrapper(
        dict(in_backward_optimizer_filter(dmp.named_parameters())), dense_optimizer
    )
    return dmp, CombinedOptimizer([dmp.fused_optimizer, dense]), describe_plan(plan, world, sizes)


@torch.no_grad()
def _copy_full_weights(dmp: nn.Module, full: dict[str, torch.Tensor]) -> None:
    """Give every shard its slice of the seeded unsharded weights.

    TorchRec initialises each shard with its own random draw, so the same seed would give
    different models under different plans; copying the built model's weights in makes the
    plan change placement only, never the starting point.
    """
    from torch.distributed._shard.sharded_tensor import ShardedTensor

    for key, value in dmp.state_dict().items():
        source = full[key]
        if isinstance(value, ShardedTensor):
            for shard_ in value.local_shards():
                rows, cols = shard_.metadata.shard_offsets
                height, width = shard_.metadata.shard_sizes
                shard_.tensor.copy_(source[rows : rows + height, cols : cols + width])
        else:
            value.copy_(source)


def describe_plan(plan, world: int, sizes: dict[tuple[str, str], int]) -> str:
    """Which table sits on which rank, how, and the embedding bytes each rank holds (fp32)."""
    lines, bytes_per_rank = [], [0] * world
    for module_path, params in plan.plan.items():
        for table, sharding in params.items():
            spec = sharding.sharding_spec
            if spec is None:  # data_parallel: a full replica on every rank
                shards = [(rank, sizes.get((module_path, table), 0)) for rank in range(world)]
            else:
                shards = [(m.placement.rank(), m.shard_sizes[0] * m.shard_sizes[1])
                          for m in spec.shards]
            for rank, elements in shards:
                bytes_per_rank[rank] += 4 * elements
            lines.append(f"  {module_path}.{table}: {sharding.sharding_type} "
                         f"({sharding.compute_kernel}) on ranks {sorted({r for r, _ in shards})}")
    lines += [f"  rank {r}: {b / 2**20:.3f} MiB of embeddings" for r, b in enumerate(bytes_per_rank)]
    return "sharding plan:\n" + "\n".join(lines)
