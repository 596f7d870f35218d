"""TorchRec sharding inside a Ray Train worker: plan the tables, wrap the model in DMP, build optimizers.

Ray Train starts and supervises the workers and their process group; it does not shard models.
As in Ray's own recsys release benchmark, the train function builds TorchRec's
`DistributedModelParallel` itself: embedding tables are placed by TorchRec's planner (with the
per-table sharding types the config asks for), the dense part is replicated with DDP.
"""

from __future__ import annotations

import warnings
import zlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

if TYPE_CHECKING:
    from recray.data.schema import Schema
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


def table_configs(model: nn.Module) -> list[tuple[str, Any]]:
    """(module path, TorchRec table config) over every EmbeddingBag/EmbeddingCollection."""
    from torchrec.modules.embedding_modules import EmbeddingBagCollection, EmbeddingCollection

    out = []
    for path, module in model.named_modules():
        if isinstance(module, EmbeddingBagCollection):
            out += [(path, c) for c in module.embedding_bag_configs()]
        elif isinstance(module, EmbeddingCollection):
            out += [(path, c) for c in module.embedding_configs()]
    return out


def embedding_tables(model: nn.Module) -> dict[tuple[str, str], int]:
    """(module path, table name) -> rows x dim, over every EmbeddingBag/EmbeddingCollection."""
    return {(path, c.name): c.num_embeddings * c.embedding_dim for path, c in table_configs(model)}


def _embedding_modules() -> tuple[type, type]:
    from torchrec.modules.embedding_modules import EmbeddingBagCollection, EmbeddingCollection

    return EmbeddingBagCollection, EmbeddingCollection


def _embedding_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [
        p
        for module in model.modules()
        if isinstance(module, _embedding_modules())
        for p in module.parameters()
    ]


def _embedding_optimizer(name: str) -> type[torch.optim.Optimizer]:
    from torchrec.optim import RowWiseAdagrad

    return {"adagrad": torch.optim.Adagrad, "rowwise_adagrad": RowWiseAdagrad,
            "sgd": torch.optim.SGD, "adam": torch.optim.Adam}[name]


# --- building without whole tables ---------------------------------------------------------------
def _one_row_tables(schema: Schema) -> Schema:
    from recray.data.schema import Schema

    def one_row(feature):
        if not feature.is_id:
            return feature
        return feature.model_copy(update={"vocab_size": 1} if feature.vocab_size else {"hash_buckets": 1})

    return Schema(features=[one_row(f) for f in schema.features], labels=list(schema.labels))


def _dense_shapes(model: nn.Module) -> dict[str, tuple[int, ...]]:
    tables = {id(p) for p in _embedding_parameters(model)}
    named = [*model.named_parameters(), *model.named_buffers()]
    return {name: tuple(t.shape) for name, t in named if id(t) not in tables}


def build_for_sharding(name: str, schema: Schema, hparams: dict[str, Any], seed: int) -> nn.Module:
    """The model with its embedding tables on the meta device and its dense part seeded on the CPU.

    No process holds a whole table: DMP allocates each rank's shards and `shard` fills them with
    `initial_rows`. The dense part comes from a twin with one-row tables built under the seed,
    so it is the same whatever the tables' sizes. A model whose dense shapes follow a table's
    rows (MDL sizes a layer by its scenario count) is built whole instead, as before.
    """
    from recray import models

    with torch.device("meta"):
        full = models.build(name, schema, **hparams)
    torch.manual_seed(seed)
    twin = models.build(name, _one_row_tables(schema), **hparams)
    if _dense_shapes(twin) != _dense_shapes(full):
        torch.manual_seed(seed)
        return models.build(name, schema, **hparams)
    for path, module in list(twin.named_modules()):
        if path and isinstance(module, _embedding_modules()):
            parent, _, attr = path.rpartition(".")
            setattr(twin.get_submodule(parent), attr, _on_meta(full.get_submodule(path)))
    return twin


def _on_meta(module: nn.Module) -> nn.Module:
    """The same TorchRec collection built with device="meta", which its sharder reads to skip
    copying weights in (a module merely created under a meta device context still says cpu)."""
    bag_collection, collection = _embedding_modules()
    meta = torch.device("meta")
    if isinstance(module, bag_collection):
        return bag_collection(module.embedding_bag_configs(), is_weighted=module.is_weighted(),
                              device=meta)
    return collection(module.embedding_configs(), device=meta, need_indices=module.need_indices())


# Rows are drawn in chunks of this many, each from its own stream.
ROW_CHUNK = 1 << 14


def initial_rows(
    seed: int, table: str, num_embeddings: int, dim: int, rows: tuple[int, int],
    cols: tuple[int, int] = (0, -1), scale_rows: int | None = None,
) -> torch.Tensor:
    """Rows [start, stop) x columns [start, stop) of a table's initial weights.

    TorchRec's default distribution, U(-sqrt(1/n), +sqrt(1/n)) with n = num_embeddings (capped
    at scale_rows if given), but every chunk of ROW_CHUNK rows comes from its own stream keyed
    on (seed, table, chunk): a shard gets the same values under any plan (table-, column-wise,
    any world size) without any rank drawing the whole table, which DMP's own per-shard draws
    cannot promise. Row r's values depend on n only through the scale.
    """
    scale = min(num_embeddings, scale_rows or num_embeddings) ** -0.5
    first, stop = rows
    col_stop = dim if cols[1] < 0 else cols[1]
    out = torch.empty(stop - first, col_stop - cols[0])
    table_key = zlib.crc32(table.encode())  # str hash() is salted per process
    for chunk in range(first // ROW_CHUNK, -(-stop // ROW_CHUNK)):
        state = np.random.SeedSequence(seed, spawn_key=(table_key, chunk)).generate_state(2)
        generator = torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))
        block = torch.rand(ROW_CHUNK, dim, generator=generator).mul_(2 * scale).sub_(scale)
        lo, hi = max(first, chunk * ROW_CHUNK), min(stop, (chunk + 1) * ROW_CHUNK)
        out[lo - first : hi - first] = block[lo - chunk * ROW_CHUNK : hi - chunk * ROW_CHUNK,
                                             cols[0] : col_stop]
    return out


# --- planning ------------------------------------------------------------------------------------
# TorchRec's default share of a device the planner keeps back for the dense part, inputs and margin.
DEFAULT_RESERVED_FRACTION = 0.15


class MemoryBudgetError(ValueError):
    """No plan fits the embedding tables in the workers' memory; names the table and the budget."""


def table_constraints(
    tables, default_type: str, table_types: dict[str, str], device_type: str = "cpu"
) -> dict[str, Any]:
    """The planner's per-table constraints: the sharding type the config asks for, if any.

    On CPU, where row-wise is not offered, column-wise is the only way to split a table bigger
    than a worker: min_partition lets it split small dims (TorchRec's default is 32 columns).
    """
    from torchrec.distributed.planner import ParameterConstraints

    constraints = {}
    for _, table in tables:
        kind = table_types.get(table, default_type)
        types = None if kind == "auto" else [kind]
        if types or device_type == "cpu":
            constraints[table] = ParameterConstraints(sharding_types=types, min_partition=4)
    return constraints


def make_planner(
    model: nn.Module,
    world: int,
    device_type: str,
    *,
    memory_per_worker: int | None = None,
    reserved_fraction: float = DEFAULT_RESERVED_FRACTION,
    local_world_size: int | None = None,
    batch_size: int = 512,
    constraints: dict[str, Any] | None = None,
    host_memory_per_worker: int | None = None,
):
    """TorchRec's planner over `world` ranks whose memory (HBM on CUDA, DDR on CPU) is the budget.

    On CUDA the planner may also keep tables in host memory behind an HBM cache (UVM kernels):
    host_memory_per_worker bounds that (default TorchRec's 128 GiB).
    """
    from torchrec.distributed.planner import EmbeddingShardingPlanner
    from torchrec.distributed.planner.storage_reservations import HeuristicalStorageReservation
    from torchrec.distributed.planner.types import KernelConfig, TopologyFactory, TrainerConfig

    memory = {}
    if memory_per_worker is not None:
        memory = {"hbm_cap_bytes" if device_type == "cuda" else "ddr_cap_bytes": memory_per_worker}
    if host_memory_per_worker is not None and device_type == "cuda":
        memory["ddr_cap_bytes"] = host_memory_per_worker
    topology = TopologyFactory.create_topology(
        TrainerConfig(world_size=world, local_world_size=local_world_size or world, **memory),
        kernel_config=KernelConfig(compute_device=device_type),
    )
    # TorchRec's own heuristic (6 x the dense parameters: weights, gradients, optimizer state,
    # DDP buckets), computed from the shapes: its own count warns on (and misjudges) meta tensors.
    tables = {id(p) for p in _embedding_parameters(model)}
    dense_bytes = sum(p.numel() * p.element_size() for p in model.parameters() if id(p) not in tables)
    with warnings.catch_warnings():
        # It warns on every construction that a dry run misjudges dense sizes without an
        # estimate; this one passes the estimate.
        warnings.simplefilter("ignore", FutureWarning)
        reservation = HeuristicalStorageReservation(
            percentage=reserved_fraction, dense_tensor_estimate=6 * dense_bytes
        )
    return EmbeddingShardingPlanner(
        topology=topology, batch_size=batch_size, constraints=constraints,
        storage_reservation=reservation,
    )


def _state_per_weight(optimizer: str, dim: int) -> float:
    """Optimizer state per table element, as TorchRec's planner counts it."""
    return {"sgd": 0.0, "adam": 2.0, "rowwise_adagrad": 1 / dim}.get(optimizer, 1.0)


def plan_within_budget(
    model: nn.Module,
    sharding: ShardingSection,
    embedding_optimizer: str,
    world: int,
    *,
    batch_size: int = 512,
    local_world_size: int | None = None,
    host_memory_per_worker: int | None = None,
):
    """-> (planner, plan) for `world` ranks of sharding.memory_per_worker, with no process group.

    The model may live on the meta device. Raises MemoryBudgetError naming the largest table
    and the budget when no plan fits.
    """
    from torchrec.distributed.model_parallel import get_default_sharders
    from torchrec.distributed.planner.types import PlannerError
    from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward

    # The planner counts a table's optimizer state from the optimizer attached to its weights.
    apply_optimizer_in_backward(_embedding_optimizer(embedding_optimizer),
                                _embedding_parameters(model), {"lr": 0.01})
    sizes = embedding_tables(model)
    planner = make_planner(
        model, world, sharding.device, memory_per_worker=sharding.memory_per_worker,
        reserved_fraction=sharding.memory_reserved_fraction, local_world_size=local_world_size,
        batch_size=batch_size, host_memory_per_worker=host_memory_per_worker,
        constraints=table_constraints(sizes, sharding.default_type, sharding.tables,
                                      sharding.device),
    )
    try:
        return planner, planner.plan(model, get_default_sharders())
    except PlannerError as e:
        raise MemoryBudgetError(
            shortfall(model, sharding, embedding_optimizer, world, str(e).splitlines()[0])
        ) from None


def shortfall(model: nn.Module, sharding: ShardingSection, optimizer: str, world: int,
              planner_says: str) -> str:
    """Why no plan fits: the tables' bytes (with optimizer state) against the workers' budget."""
    needs = {
        c.name: (c.num_embeddings, c.embedding_dim, 4 * c.num_embeddings * c.embedding_dim
                 * (1 + _state_per_weight(optimizer, c.embedding_dim)))
        for _, c in table_configs(model)
    }
    largest = max(needs, key=lambda name: needs[name][2])
    rows, dim, largest_bytes = needs[largest]
    budget = sharding.memory_per_worker or 0
    usable = budget * (1 - sharding.memory_reserved_fraction)
    device_memory = "HBM" if sharding.device == "cuda" else "memory"
    return (
        f"sharding.memory_per_worker: no sharding plan fits the embedding tables in {world} "
        f"worker{'s' if world > 1 else ''} x {_gib(budget)} of {device_memory} ({_gib(usable)} each "
        f"for tables after sharding.memory_reserved_fraction {sharding.memory_reserved_fraction:g}): "
        f"the tables need {_gib(sum(n[2] for n in needs.values()))} with {optimizer} state, "
        f"the largest, table {largest!r} ({rows:,} x {dim}), {_gib(largest_bytes)}. Raise "
        f"sharding.memory_per_worker or scaling.num_workers, or shrink {largest!r}. "
        f"TorchRec's planner: {planner_says}"
    )


def _gib(value: float) -> str:
    return f"{value / 2**30:.3g} GiB"


def rank_memory(planner, world: int) -> list[dict[str, int]]:
    """Per rank, the planner's estimate of the bytes its shards take (weights, optimizer state,
    input/output buffers) in HBM and DDR. The public ShardingPlan holds placements only; the
    planner keeps the estimates of the plan it chose in `_best_plan` (torchrec 1.8)."""
    per_rank = [{"hbm_bytes": 0, "ddr_bytes": 0} for _ in range(world)]
    for option in planner._best_plan or []:
        for shard_ in option.shards:
            per_rank[shard_.rank]["hbm_bytes"] += shard_.storage.hbm
            per_rank[shard_.rank]["ddr_bytes"] += shard_.storage.ddr
    return per_rank


def shard(
    model: nn.Module,
    *,
    default_type: str,
    table_types: dict[str, str],
    embedding_optimizer: str,
    embedding_lr: float,
    dense_optimizer,
    device: torch.device,
    seed: int = 0,
    init_scale_rows: int | None = None,
    memory_per_worker: int | None = None,
    reserved_fraction: float = DEFAULT_RESERVED_FRACTION,
    batch_size: int = 512,
) -> tuple[nn.Module, torch.optim.Optimizer, str]:
    """-> (DMP-wrapped model, combined optimizer, a printable plan). Collective: all ranks call it.

    Tables on the meta device (`build_for_sharding`) are filled shard by shard with
    `initial_rows`; tables with weights are copied in, so either way the plan changes placement,
    never the starting point.
    """
    import torch.distributed as dist
    from torchrec.distributed.model_parallel import DistributedModelParallel, get_default_sharders
    from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward
    from torchrec.optim.keyed import CombinedOptimizer, KeyedOptimizerWrapper
    from torchrec.optim.optimizers import in_backward_optimizer_filter

    # Embedding rows are updated inside the backward by fbgemm (fused), never as dense tensors.
    apply_optimizer_in_backward(
        _embedding_optimizer(embedding_optimizer), _embedding_parameters(model), {"lr": embedding_lr}
    )
    world = dist.get_world_size()
    sizes = embedding_tables(model)
    planner = make_planner(
        model, world, device.type, memory_per_worker=memory_per_worker,
        reserved_fraction=reserved_fraction, batch_size=batch_size,
        constraints=table_constraints(sizes, default_type, table_types, device.type),
    )
    sharders = get_default_sharders()
    plan = planner.collective_plan(model, sharders, dist.GroupMember.WORLD)
    initial = {key: value.detach().clone() for key, value in model.state_dict().items()}
    dmp = DistributedModelParallel(model, device=device, plan=plan, sharders=sharders)
    _initialise(dmp, initial, seed, init_scale_rows)
    dense = KeyedOptimizerWrapper(
        dict(in_backward_optimizer_filter(dmp.named_parameters())), dense_optimizer
    )
    return dmp, CombinedOptimizer([dmp.fused_optimizer, dense]), describe_plan(plan, world, sizes)


@torch.no_grad()
def _initialise(
    dmp: nn.Module, full: dict[str, torch.Tensor], seed: int, scale_rows: int | None
) -> None:
    """Give every shard its slice of the unsharded starting weights.

    TorchRec initialises each shard with its own random draw, so the same seed would give
    different models under different plans. A table still on the meta device gets its slice of
    `initial_rows` (drawn for this shard only); any other tensor is copied from the built model.
    """
    from torch.distributed._shard.sharded_tensor import ShardedTensor

    for key, value in dmp.state_dict().items():
        source = full[key]
        table = key.rsplit(".", 2)[-2]  # ...embedding_bags.<table>.weight
        if isinstance(value, ShardedTensor):
            pieces = [(s.tensor, s.metadata.shard_offsets) for s in value.local_shards()]
        else:
            pieces = [(value, (0, 0))]
        for target, (row, col) in pieces:
            if not source.is_meta:
                whole = target.shape == source.shape  # dense weights, a replica, a one-rank table
                target.copy_(source if whole else source[row : row + target.shape[0],
                                                         col : col + target.shape[1]])
                continue
            height, width = target.shape
            # A chunk at a time: a whole shard's draw would double the shard's memory at its peak.
            for lo in range(row, row + height, ROW_CHUNK):
                hi = min(row + height, (lo // ROW_CHUNK + 1) * ROW_CHUNK)
                target[lo - row : hi - row].copy_(initial_rows(
                    seed, table, source.shape[0], source.shape[1], (lo, hi), (col, col + width),
                    scale_rows))


def describe_plan(plan, world: int, sizes: dict[tuple[str, str], int], per_rank: bool = True) -> str:
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
                         f"({sharding.compute_kernel}) on ranks {_ranges({r for r, _ in shards})}")
    if per_rank:
        lines += [f"  rank {r}: {b / 2**20:.3f} MiB of embeddings" for r, b in enumerate(bytes_per_rank)]
    return "sharding plan:\n" + "\n".join(lines)


def _ranges(ranks: set[int]) -> str:
    """{0, 1, 2, 3, 7} -> '[0-3, 7]': a 64-rank replica stays one short line."""
    runs: list[list[int]] = []
    for rank in sorted(ranks):
        if runs and rank == runs[-1][1] + 1:
            runs[-1][1] = rank
        else:
            runs.append([rank, rank])
    return "[" + ", ".join(f"{a}" if a == b else f"{a}-{b}" for a, b in runs) + "]"
