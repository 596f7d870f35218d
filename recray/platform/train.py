"""Training on Ray Train: a TorchTrainer whose train function streams Parquet through Ray Data as KJTs."""

from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import ray.train
import torch
import yaml
from ray.data.collate_fn import ArrowBatchCollateFn
from sklearn.metrics import log_loss, roc_auc_score
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from recray.data import SPLITS
from recray.data.jagged import Batch, check_columns, to_batch
from recray.data.schema import Schema, SchemaError
from recray.platform.config import ConfigError, LRSchedule, TrainConfig
from recray.platform.sharding import (
    MemoryBudgetError,
    build_for_sharding,
    embedding_optimizer_for,
    embedding_tables,
    plan_within_budget,
    shard,
)

EVAL_SPLITS = ("valid", "test")


class TrainingDiverged(FloatingPointError):
    """The training loss became NaN or inf; the message names the run, epoch and step."""


# Random streams: one per (purpose, rank, epoch), drawn from the run's seed by numpy's
# SeedSequence. A sum like seed + rank + epoch gave rank 1 at epoch 0 the stream of rank 0 at
# epoch 1; spawn keys never collide.
TORCH_STREAM, DATA_STREAM, BLOCK_ORDER_STREAM = 0, 1, 2


def derived_seed(seed: int, stream: int, rank: int = 0, epoch: int = 0) -> int:
    """A 32-bit seed for one random stream of a run."""
    return int(np.random.SeedSequence(seed, spawn_key=(stream, rank, epoch)).generate_state(1)[0])


# --- validation: everything that can fail fails here, in the driver, before any worker ----------
def _is_uri(path: str) -> bool:
    return "://" in path


def validate(cfg: TrainConfig) -> Schema:
    """Check data, schema and model in the driver; return the schema. Raises ConfigError."""
    import pyarrow.parquet as pq

    from recray import models

    data_dir = cfg.data.path
    if not _is_uri(data_dir):
        data_dir = str(Path(data_dir).expanduser().resolve())
        if not Path(data_dir).is_dir():
            raise ConfigError(f"data.path: directory not found (got {cfg.data.path!r})")
        cfg.data.path = data_dir
    try:
        schema = Schema.load(f"{data_dir}/schema.yaml")
    except SchemaError as e:
        raise ConfigError(f"data.path: {e}") from None
    if not _is_uri(data_dir):
        for split in SPLITS:
            file = Path(data_dir) / f"{split}.parquet"
            if not file.exists():
                raise ConfigError(f"data.path: {file} is missing (need {', '.join(SPLITS)})")
            try:
                check_columns(pq.read_schema(file), schema, source=str(file))
            except SchemaError as e:
                raise ConfigError(f"data.path: {e}") from None
            except Exception as e:  # pyarrow raises ArrowInvalid and OSError for corrupt files
                raise ConfigError(
                    f"data.path: {file} is not a readable Parquet file: {e}"
                ) from None
    stopping = cfg.train.early_stopping
    if stopping and stopping.label and stopping.label not in schema.tasks:
        raise ConfigError(f"train.early_stopping.label: {stopping.label!r} is not a task of "
                          f"{data_dir}/schema.yaml; its tasks are {schema.tasks}")
    if cfg.model.name not in models.available():
        raise ConfigError(
            f"model.name: unknown model {cfg.model.name!r}; available: {models.available()}"
        )
    try:
        # A sharded model's tables may exceed this machine: build it on the meta device.
        with torch.device("meta") if cfg.sharding.enabled else contextlib.nullcontext():
            model = models.build(cfg.model.name, schema, **cfg.model.hparams)
    except (ValueError, TypeError) as e:
        raise ConfigError(f"model.hparams: {e}") from None
    tables = {name for _, name in embedding_tables(model)}
    for table in cfg.sharding.tables:
        if table not in tables:
            raise ConfigError(
                f"sharding.tables: {table!r} is not an embedding table of {cfg.model.name}; "
                f"its tables are {sorted(tables)}"
            )
    if cfg.sharding.enabled and cfg.sharding.memory_per_worker is not None:
        world = max(cfg.scaling.num_workers, 1)
        optimizer = embedding_optimizer_for(cfg.sharding, cfg.train, cfg.sharding.device, world)
        try:  # the workers' own planner, run here on the meta model: no process group needed
            plan_within_budget(model, cfg.sharding, optimizer.name, world,
                               batch_size=cfg.train.batch_size)
        except MemoryBudgetError as e:
            raise ConfigError(str(e)) from None
    return schema


def check_cluster_fits(cfg: TrainConfig) -> None:
    """More workers than the running cluster has CPUs would wait forever: refuse before starting."""
    import ray

    if cfg.scaling.allow_autoscale or cfg.scaling.num_workers == 0:
        return
    cpus = ray.cluster_resources().get("CPU", 0)
    needed = cfg.scaling.num_workers * cfg.scaling.cpus_per_worker
    # Ray Data's read tasks need CPUs too: workers holding every CPU wait forever for their data.
    if needed > cpus - 1:
        raise ConfigError(
            f"scaling.num_workers: {cfg.scaling.num_workers} workers x "
            f"{cfg.scaling.cpus_per_worker:g} CPU need {needed:g} CPUs and Ray Data needs 1 more; "
            f"the cluster has {cpus:g} (lower cpus_per_worker, or set scaling.allow_autoscale on "
            "an autoscaling cluster)"
        )


# --- run folders: a new run gets its own; only `resume` continues an old one -------------------
def _new_run_name(cfg: TrainConfig) -> str:
    """`<name>-<YYYYmmdd-HHMMSS>`, reserved by creating its folder (see `new_run_folder`)."""
    if _is_uri(cfg.storage_path):  # object stores have no exclusive create: the stamp must do
        return f"{cfg.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    from recray.platform.run_folder import new_run_folder

    return new_run_folder(cfg.storage_path, cfg.name).name


def latest_checkpoint(run_dir: Path) -> tuple[int, Path] | None:
    """(epoch, folder) of the newest checkpoint in a run folder, or None."""
    closed = [(int(json.loads(f.read_text())["epoch"]), f.parent) for f in run_dir.glob("*/epoch.json")]
    return max(closed) if closed else None


def _resume_point(cfg: TrainConfig) -> tuple[str, str, Path | None]:
    """(storage_path, run name, checkpoint folder) for `resume: RUN`; refuses what cannot resume."""
    given = Path(cfg.resume).expanduser()
    if _is_uri(cfg.storage_path):  # Ray Train finds the run's checkpoints in the store itself
        return cfg.storage_path, cfg.resume, None
    run_dir = given.resolve() if len(given.parts) > 1 else Path(cfg.storage_path) / cfg.resume
    if not run_dir.is_dir():
        runs = sorted(p.name for p in run_dir.parent.glob(f"{cfg.name}-*")) if run_dir.parent.is_dir() else []
        raise ConfigError(f"resume: no run folder {str(run_dir)!r}; runs of {cfg.name!r} there: {runs}")
    latest = latest_checkpoint(run_dir)
    if latest is None:
        raise ConfigError(f"resume: run {str(run_dir)!r} has no checkpoint (no */epoch.json)")
    epoch, folder = latest
    if json.loads((folder / "epoch.json").read_text()).get("stopped_early"):
        raise ConfigError(
            f"resume: run {run_dir.name!r} stopped early at epoch {epoch} "
            "(train.early_stopping); there is nothing left to resume"
        )
    if epoch >= cfg.train.epochs - 1:
        raise ConfigError(
            f"resume: run {run_dir.name!r} already closed epoch {epoch} of train.epochs="
            f"{cfg.train.epochs}; raise train.epochs to train it further"
        )
    _say_what_changed(run_dir / "config.yaml", cfg)
    return str(run_dir.parent), run_dir.name, folder


def _say_what_changed(old_config: Path, cfg: TrainConfig) -> None:
    """Print every setting a resumed run changes: the new config wins, optimizer state included."""
    if not old_config.is_file():
        return

    def flat(node: Any, prefix: str = "") -> dict[str, Any]:
        if not isinstance(node, dict):
            return {prefix: node}
        return {k: v for key, value in node.items() for k, v in flat(value, f"{prefix}{key}.").items()}

    before = flat(yaml.safe_load(old_config.read_text()))
    after = flat(cfg.model_dump(mode="json"))
    changed = [f"{k[:-1]} {before.get(k)!r} -> {after.get(k)!r}"
               for k in sorted(set(before) | set(after))
               if before.get(k) != after.get(k) and k not in ("resume.", "storage_path.")]
    if changed:
        print(f"resume: this config changes {', '.join(changed)}; the new values apply "
              "(the restored optimizer gets this config's lr and weight_decay)", file=sys.stderr)


# --- the train function (runs in each Ray Train worker) -----------------------------------------
def _optimizer(cfg: TrainConfig, params) -> torch.optim.Optimizer:
    """train.optimizer over parameters or groups (a group's own weight_decay wins)."""
    kinds = {"adam": torch.optim.Adam, "adagrad": torch.optim.Adagrad, "sgd": torch.optim.SGD}
    return kinds[cfg.train.optimizer](params, lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)


def _is_table(module: torch.nn.Module) -> bool:
    from torchrec.modules.embedding_modules import EmbeddingBagCollection, EmbeddingCollection

    return isinstance(module, EmbeddingBagCollection | EmbeddingCollection)


def parameter_groups(model: torch.nn.Module, cfg: TrainConfig) -> list[dict[str, Any]]:
    """An unsharded model's dense weights and embedding tables, each group with its weight decay."""
    tables = {id(p) for m in model.modules() if _is_table(m) for p in m.parameters()}
    decay = cfg.train.embedding_weight_decay
    groups = [
        {"name": "dense", "weight_decay": cfg.train.weight_decay,
         "params": [p for p in model.parameters() if id(p) not in tables]},
        {"name": "embedding", "weight_decay": cfg.train.weight_decay if decay is None else decay,
         "params": [p for p in model.parameters() if id(p) in tables]},
    ]
    return [g for g in groups if g["params"]]


def dense_parameters(model: torch.nn.Module, sharded: bool) -> list[torch.nn.Parameter]:
    """The parameters gradient clipping sees: everything but the embedding tables.

    A sharded model's tables are updated by fused optimizers inside backward, so their gradients
    never exist to clip; an unsharded run leaves its tables unclipped too, so both train alike.
    """
    if sharded:
        from torchrec.optim.optimizers import in_backward_optimizer_filter

        return [p for _, p in in_backward_optimizer_filter(model.named_parameters())]
    tables = {id(p) for m in model.modules() if _is_table(m) for p in m.parameters()}
    return [p for p in model.parameters() if id(p) not in tables]


def lr_scheduler(
    optimizer: torch.optim.Optimizer, schedule: LRSchedule | None, lr: float, epochs: int,
    steps_per_epoch: int,
) -> torch.optim.lr_scheduler.LRScheduler | None:
    """torch's schedulers, stepped once per optimizer step: LinearLR warmup, then the decay.

    Epoch lengths in the config become steps here; the cosine reaches lr x min_lr_factor at the
    end of train.epochs (the most epochs, with early stopping).
    """
    if schedule is None:
        return None
    sched = torch.optim.lr_scheduler
    warmup = round(schedule.warmup_epochs * steps_per_epoch)
    total = epochs * steps_per_epoch
    if schedule.decay == "cosine":
        decay = sched.CosineAnnealingLR(
            optimizer, T_max=max(total - warmup, 1), eta_min=lr * schedule.min_lr_factor
        )
    elif schedule.decay == "step":
        decay = sched.StepLR(
            optimizer, step_size=max(round(schedule.step_epochs * steps_per_epoch), 1),
            gamma=schedule.gamma,
        )
    else:
        decay = sched.ConstantLR(optimizer, factor=1.0, total_iters=0)
    if warmup == 0:
        return decay
    warm = sched.LinearLR(optimizer, start_factor=schedule.warmup_start_factor, end_factor=1.0,
                          total_iters=warmup)
    return sched.SequentialLR(optimizer, [warm, decay], milestones=[warmup])


def task_metrics(
    split: str, tasks: list[str], labels: np.ndarray, probs: np.ndarray
) -> dict[str, float]:
    """AUC and logloss per task; `label` is the single-task name, else `<split>_auc_<task>` too.

    Non-finite predictions (a diverged model) give NaN metrics rather than an exception.
    """
    out: dict[str, float] = {}
    for t, task in enumerate(tasks):
        y, p = labels[:, t], np.clip(probs[:, t], 1e-7, 1 - 1e-7)
        suffix = "" if task == "label" else f"_{task}"
        finite = bool(np.isfinite(p).all())
        out[f"{split}_auc{suffix}"] = (
            float(roc_auc_score(y, p)) if finite and 0 < y.sum() < len(y) else float("nan")
        )
        out[f"{split}_logloss{suffix}"] = float(log_loss(y, p, labels=[0, 1])) if finite else float("nan")
    if tasks != ["label"]:  # several tasks, or one named `label_<task>`: the overall figures too
        out[f"{split}_auc"] = float(np.nanmean([out[f"{split}_auc_{t}"] for t in tasks]))
        out[f"{split}_logloss"] = float(np.mean([out[f"{split}_logloss_{t}"] for t in tasks]))
    return out


def _placeholder_batch(schema: Schema) -> Batch:
    """One all-zero row (id 0 for single ids, empty sequences), scored and thrown away."""
    lengths = [0 if f.kind == "sequence" else 1 for f in schema.id_features]
    return Batch(
        dense=torch.zeros(1, len(schema.dense_features)),
        sparse=KeyedJaggedTensor(
            keys=[f.name for f in schema.id_features],
            values=torch.zeros(sum(lengths), dtype=torch.int64),
            lengths=torch.tensor(lengths, dtype=torch.int32),
            stride=1,
        ),
        labels=torch.zeros(1, len(schema.labels)),
    )


@torch.no_grad()
def evaluate(model, shard, schema: Schema, batch_size: int, split: str) -> dict[str, float]:
    """Score every row of this worker's part of a split once; gather all workers' scores.

    The eval splits are divided without dropping rows (see `ExactEvalSplits`), so workers can hold
    different numbers of batches. A sharded model's forward is a collective: workers step together
    and one that has run out scores a placeholder row until every worker is done.
    """
    import torch.distributed as dist

    if isinstance(model, torch.nn.parallel.DistributedDataParallel):
        model = model.module  # scoring needs no gradient sync
    model.eval()
    device = next(model.parameters()).device
    distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    batches = iter(shard.iter_torch_batches(batch_size=batch_size, collate_fn=ToBatch(schema, split)))
    labels, probs = [], []
    while True:
        scored = next(batches, None)
        if distributed:
            more = torch.tensor([scored is not None], dtype=torch.int32, device=device)
            dist.all_reduce(more, op=dist.ReduceOp.MAX)
            if not more.item():
                break
        elif scored is None:
            break
        batch = _placeholder_batch(schema) if scored is None else scored
        if device.type != "cpu":
            batch = batch.to(device, non_blocking=True)
        scores = torch.sigmoid(model(batch)).cpu().numpy()
        if scored is not None:
            labels.append(batch.labels.cpu().numpy())
            probs.append(scores)
    model.train()
    n_tasks = len(schema.labels)
    local = (
        np.concatenate(labels) if labels else np.zeros((0, n_tasks), np.float32),
        np.concatenate(probs) if probs else np.zeros((0, n_tasks), np.float32),
    )
    if distributed:
        gathered: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, local)
        local = (np.concatenate([g[0] for g in gathered]), np.concatenate([g[1] for g in gathered]))
    return task_metrics(split, schema.tasks, *local) | {f"{split}_rows": len(local[0])}


def _device(cfg: TrainConfig) -> torch.device:
    """This worker's accelerator (Ray assigns it) or the CPU."""
    import ray.train.torch

    return ray.train.torch.get_device() if cfg.sharding.device == "cuda" else torch.device("cpu")


def train_func(config: dict[str, Any]) -> dict[str, float]:
    """Ray Train's unit: build the model, stream this worker's shard, evaluate, checkpoint."""
    import ray.train.torch

    from recray import models

    cfg = TrainConfig.model_validate(config["cfg"])
    schema = Schema.model_validate(config["schema"])
    run_dir = config["run_dir"]
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    device = _device(cfg)
    torch.manual_seed(cfg.seed)
    if cfg.sharding.enabled:  # tables on the meta device: each rank allocates only its shards
        model = build_for_sharding(cfg.model.name, schema, cfg.model.hparams, cfg.seed)
    else:
        model = models.build(cfg.model.name, schema, **cfg.model.hparams)
    if cfg.sharding.enabled:
        _ensure_process_group()
        embedding_optimizer = embedding_optimizer_for(cfg.sharding, cfg.train, device.type, world)
        model, optimizer, plan = shard(
            model,
            default_type=cfg.sharding.default_type,
            table_types=cfg.sharding.tables,
            embedding_optimizer=embedding_optimizer.name,
            embedding_lr=embedding_optimizer.lr,
            dense_optimizer=lambda params: _optimizer(cfg, params),
            device=device,
            seed=cfg.seed,
            init_scale_rows=cfg.sharding.init_scale_rows,
            memory_per_worker=cfg.sharding.memory_per_worker,
            reserved_fraction=cfg.sharding.memory_reserved_fraction,
            batch_size=cfg.train.batch_size,
        )
        if rank == 0:
            print(f"{plan}\n  {embedding_optimizer}", flush=True)
    else:
        # Parameters move before the optimizer exists and before its state is restored:
        # Optimizer.load_state_dict casts the saved state to the device of the parameters it
        # holds, so state loaded while they were still on the CPU would stay there on CUDA.
        model.to(device)
        optimizer = _optimizer(cfg, parameter_groups(model, cfg))
    clipped = dense_parameters(model, cfg.sharding.enabled) if cfg.train.grad_clip_norm else []
    scheduler = lr_scheduler(optimizer, cfg.train.schedule, cfg.train.lr, cfg.train.epochs,
                             config.get("steps_per_epoch", 1))
    # Ray hands back the last checkpoint after a worker failure, or of a run resumed under its
    # name; local mode has no such memory, so the driver names the checkpoint of `resume` itself.
    checkpoint = ray.train.get_checkpoint() or (
        ray.train.Checkpoint.from_directory(config["resume_from"]) if config["resume_from"] else None
    )
    best = BestEpoch()
    if checkpoint:
        start_epoch = _restore(checkpoint, model, optimizer, cfg, rank, scheduler, best) + 1
    else:
        start_epoch = 0
    resumed_from = start_epoch - 1 if checkpoint else -1
    if world > 1 and not cfg.sharding.enabled:  # DMP already wraps the dense part in DDP
        model = ray.train.torch.prepare_model(model)
    loss_fn = torch.nn.BCEWithLogitsLoss()
    stopping = cfg.train.early_stopping
    watched = stopping.key(schema.tasks) if stopping else ""

    metrics: dict[str, Any] = {}
    for epoch in range(start_epoch, cfg.train.epochs):
        # Each epoch starts from its own stream, so a run resumed at epoch e draws the same
        # dropout masks as one that never stopped: the state at a checkpoint is (seed, rank, e).
        torch.manual_seed(derived_seed(cfg.seed, TORCH_STREAM, rank, epoch))
        started, rows, steps, compute_seconds = time.perf_counter(), 0, 0, 0.0
        train_shard = ray.train.get_dataset_shard("train")
        local_losses, lr_curve = [], []
        for batch in epoch_batches(train_shard, cfg, rank, world, epoch, schema):
            _maybe_fail(cfg, run_dir, rank, epoch, steps)
            step_started = time.perf_counter()
            if device.type != "cpu":
                batch = batch.to(device, non_blocking=True)
            if len(batch) == 0:
                continue
            loss = loss_fn(model(batch), batch.labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if clipped:
                torch.nn.utils.clip_grad_norm_(clipped, cfg.train.grad_clip_norm)
            lr_curve.append(optimizer.param_groups[0]["lr"])
            optimizer.step()
            if scheduler is not None:
                scheduler.step()
            local_losses.append(loss.detach())
            rows, steps = rows + len(batch), steps + 1
            compute_seconds += time.perf_counter() - step_started
        train_seconds = time.perf_counter() - started
        curve = _mean_over_ranks(local_losses)
        metrics = {
            "epoch": epoch,
            "resumed_from_epoch": resumed_from,
            "train_loss": float(np.mean(curve)) if curve else float("nan"),
            "train_loss_curve": curve,
            "train_lr_curve": lr_curve,
            "train_rows_per_s": rows * world / max(train_seconds, 1e-9),
            "train_seconds": train_seconds,
            # Time the loop spent waiting for Ray Data: near train_seconds means input-bound.
            "train_data_wait_seconds": train_seconds - compute_seconds,
        }
        # Every rank holds the same all-reduced curve, so every rank stops here together.
        diverged = [step for step, value in enumerate(curve) if not math.isfinite(value)]
        if diverged and cfg.train.stop_on_nonfinite_loss:
            metrics["diverged_at_step"] = diverged[0]
            ray.train.report(metrics)  # no checkpoint: the last one holds finite weights
            return metrics
        valid = evaluate(
            model, ray.train.get_dataset_shard("valid"), schema, cfg.train.eval_batch_size, "valid"
        )
        metrics |= valid
        stop = False
        if stopping:
            if watched not in valid:
                raise ConfigError(f"train.early_stopping: no metric {watched!r}; "
                                  f"valid has {sorted(valid)}")
            if stopping.improved(valid[watched], best.value):
                best.update(epoch, valid[watched], valid, _snapshot(model, cfg.sharding.enabled))
            else:
                best.epochs_without_gain += 1
            stop = best.epochs_without_gain >= stopping.patience
        if stop or epoch == cfg.train.epochs - 1:
            metrics |= _final_metrics(model, cfg, schema, best, epoch, stop)
        metrics["best_epoch"] = best.epoch if stopping else epoch
        _report(model, optimizer, epoch, metrics, rank, cfg, run_dir, scheduler, best)
        if stop:
            break
    return metrics


class BestEpoch:
    """The best epoch so far by the early-stopping metric: its number, value, valid metrics, weights.

    Everything but the weights goes into each checkpoint's epoch.json (the weights beside it), so
    the best so far survives a worker failure or a resume.
    """

    def __init__(self) -> None:
        self.epoch, self.value, self.valid, self.epochs_without_gain = -1, None, {}, 0
        self.weights: dict[str, Any] | None = None

    def update(self, epoch: int, value: float, valid: dict[str, float], weights) -> None:
        self.epoch, self.value, self.valid, self.epochs_without_gain = epoch, value, valid, 0
        self.weights = weights

    def to_json(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "value": self.value, "valid": self.valid,
                "epochs_without_gain": self.epochs_without_gain}

    def load_json(self, saved: dict[str, Any]) -> None:
        self.epoch, self.value = saved["epoch"], saved["value"]
        self.valid, self.epochs_without_gain = saved["valid"], saved["epochs_without_gain"]


def _weights_module(model, sharded: bool) -> torch.nn.Module:
    """The module whose state_dict is the model: a DMP itself (its shards), or inside DDP."""
    return model if sharded else getattr(model, "module", model)


def _snapshot(model, sharded: bool) -> dict[str, Any]:
    """A copy of the weights: on the CPU when unsharded, each rank's own shards when sharded."""
    state = _weights_module(model, sharded).state_dict()
    if sharded:  # ShardedTensor and DTensor copy their local shards and keep their layout
        return {name: copy.deepcopy(value) for name, value in state.items()}
    return {name: value.detach().to("cpu", copy=True) for name, value in state.items()}


def _final_metrics(model, cfg: TrainConfig, schema: Schema, best: BestEpoch, epoch: int,
                   stopped: bool) -> dict[str, Any]:
    """Test metrics of the weights the run keeps: the best epoch's under early stopping.

    The valid metrics become the best epoch's too, so the final report describes one model. The
    last epoch's weights go back in afterwards: the checkpoint continues from where training was.
    """
    test_shard = ray.train.get_dataset_shard("test")
    out: dict[str, Any] = {"epochs_run": epoch + 1, "stopped_early": stopped}
    if cfg.train.early_stopping is None or best.weights is None or best.epoch == epoch:
        return out | evaluate(model, test_shard, schema, cfg.train.eval_batch_size, "test")
    module = _weights_module(model, cfg.sharding.enabled)
    last = _snapshot(model, cfg.sharding.enabled)
    module.load_state_dict(best.weights)
    out |= best.valid | evaluate(model, test_shard, schema, cfg.train.eval_batch_size, "test")
    module.load_state_dict(last)
    return out


class ToBatch(ArrowBatchCollateFn):
    """Ray Data's collate step: an Arrow batch (or this rank's slice of it) -> a `Batch` of KJTs
    (without a schema, the Arrow slice itself).

    Ray runs collate functions in the iterator's prefetch threads, so the conversion overlaps
    the training step instead of running between steps.
    """

    def __init__(self, schema: Schema | None, source: str, rows: slice | None = None) -> None:
        super().__init__()
        self.schema, self.source, self.rows = schema, source, rows

    def __call__(self, table: pa.Table) -> Batch | pa.Table:
        if self.rows is not None:
            table = table.slice(self.rows.start, self.rows.stop - self.rows.start)
        return table if self.schema is None else to_batch(table, self.schema, source=self.source)


def epoch_batches(
    shard, cfg: TrainConfig, rank: int, world: int, epoch: int, schema: Schema | None = None
) -> Iterator[Batch | pa.Table]:
    """This rank's train batches for one epoch, shuffled by (seed, epoch) unless train.shuffle is off:
    `Batch`es of KJTs when given the schema, else Arrow tables.

    With global_batches every rank reads the same shuffled global batches (same seed on every
    rank) and trains on its slice, so the data order is that of one worker for any worker count.
    """
    shuffle_rows = cfg.train.shuffle_buffer_rows if cfg.train.shuffle else 0
    size = cfg.train.batch_size
    global_batch = size * (world if cfg.train.global_batches else 1)
    mine = slice(rank * size, (rank + 1) * size) if cfg.train.global_batches else None
    yield from shard.iter_torch_batches(
        batch_size=global_batch,
        collate_fn=ToBatch(schema, "train", mine),
        local_shuffle_buffer_size=shuffle_rows or None,
        local_shuffle_seed=derived_seed(cfg.seed, DATA_STREAM, 0, epoch),
        # At least one batch ahead: the collate (KJT conversion) runs in the prefetch threads.
        prefetch_batches=max(cfg.train.prefetch_batches, 1),
        # A short last global batch could leave a rank without rows while the others run a
        # collective forward (DMP's all-to-all): drop it so every rank steps together.
        drop_last=cfg.train.global_batches,
    )


def _mean_over_ranks(losses: list[torch.Tensor]) -> list[float]:
    """Per-step loss averaged over the workers that ran that step: one all-reduce per epoch.

    A NaN or inf loss on any worker stays NaN or inf in the mean, so divergence shows.
    """
    import torch.distributed as dist

    curve = torch.stack(losses).float() if losses else torch.zeros(0)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        # Ranks may run different step counts when shards are uneven: sum the losses and count
        # the ranks per step, over the longest rank's length.
        length = torch.tensor([curve.numel()], device=curve.device)
        dist.all_reduce(length, op=dist.ReduceOp.MAX)
        total = torch.zeros(int(length), device=curve.device)
        ranks_at_step = torch.zeros(int(length), device=curve.device)
        total[: curve.numel()] = curve
        ranks_at_step[: curve.numel()] = 1
        dist.all_reduce(total)
        dist.all_reduce(ranks_at_step)
        curve = total / ranks_at_step  # the longest rank ran every step, so no division by 0
    return curve.tolist()


def _maybe_fail(cfg: TrainConfig, run_dir: str, rank: int, epoch: int, step: int) -> None:
    """Fault injection for tests: exit this worker process once (a marker file remembers)."""
    fault = cfg.fault_injection
    if fault is None or (fault.rank, fault.epoch, fault.step) != (rank, epoch, step):
        return
    marker = Path(run_dir) / "fault_injected"
    if marker.exists():
        return
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.write_text(f"{time.time()}\n")
    # Ray Train's controller collects reports when it polls the workers (every 2 s by default):
    # a worker dying sooner after a report loses it, and with splits held in the object store
    # the next epoch reaches step 3 within that. Let one poll pass, so the test checks resuming
    # from the last collected checkpoint, not the race.
    time.sleep(2 * 2.0)
    os._exit(1)


def _ensure_process_group() -> None:
    """DMP needs a process group; Ray Train's local mode makes none, so make a 1-rank gloo one."""
    import socket

    import torch.distributed as dist

    if dist.is_initialized():
        return
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)


# Checkpoints: a sharded model is saved by every rank with torch.distributed.checkpoint (each
# writes its own shards; nothing is pickled); a replicated one by rank 0 with torch.save, loaded
# with weights_only=True. `epoch.json` says which epoch the checkpoint closes, and holds the LR
# scheduler's state and the best epoch so far; that epoch's weights lie beside it (BEST_WEIGHTS,
# or BEST_SHARDS when sharded). No RNG state is saved: every epoch reseeds from
# (seed, rank, epoch), which is all a checkpoint boundary needs.
BEST_WEIGHTS, BEST_SHARDS = "best_model.pt", "best_dcp"


def _restore(checkpoint, model, optimizer, cfg: TrainConfig, rank: int, scheduler=None,
             best: BestEpoch | None = None) -> int:
    """Load a checkpoint into model, optimizer, scheduler and best epoch; return the epoch it closed.

    The optimizer keeps this config's lr and weight_decay (the checkpoint's are replaced, and
    rank 0 says so), so a resumed run trains with the hyper-parameters it was given; under a
    schedule the lr is the restored scheduler's, which continues where it stopped.
    """
    kept = ("weight_decay",) if scheduler is not None else ("lr", "weight_decay")
    configured = [{k: group[k] for k in kept if k in group} for group in optimizer.param_groups]
    with checkpoint.as_directory() as folder:
        folder = Path(folder)
        closed = json.loads((folder / "epoch.json").read_text())
        has_best = best is not None and "best" in closed and closed["best"]["epoch"] >= 0
        if cfg.sharding.enabled:
            import torch.distributed.checkpoint as dcp

            optimizer.init_state()  # materialise optimizer state so DCP has tensors to fill
            state = {"model": model.state_dict(), "optimizer": optimizer.state_dict()}
            dcp.load(state, checkpoint_id=str(folder / "dcp"))
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            if has_best:
                best_state = {"model": _snapshot(model, sharded=True)}
                dcp.load(best_state, checkpoint_id=str(folder / BEST_SHARDS))
                best.weights = best_state["model"]
        else:
            state = torch.load(folder / "state.pt", map_location="cpu", weights_only=True)
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            if has_best:
                best.weights = torch.load(folder / BEST_WEIGHTS, map_location="cpu",
                                          weights_only=True)
        epoch = int(closed["epoch"])
    if has_best:
        best.load_json(closed["best"])
    if scheduler is not None and "scheduler" in closed:
        scheduler.load_state_dict(closed["scheduler"])
        for group, lr in zip(optimizer.param_groups, scheduler.get_last_lr(), strict=True):
            group["lr"] = lr
    replaced = set()
    for group, wanted in zip(optimizer.param_groups, configured, strict=True):
        for key, value in wanted.items():
            if group[key] != value:
                replaced.add(f"{key} {group[key]:g} -> {value:g}")
                group[key] = value
    if replaced and rank == 0:
        print(f"resume: the checkpoint's optimizer had other hyper-parameters; using the config's: "
              f"{', '.join(sorted(replaced))}", file=sys.stderr, flush=True)
    return epoch


def _report(
    model, optimizer, epoch: int, metrics: dict[str, Any], rank: int, cfg: TrainConfig,
    run_dir: str, scheduler=None, best: BestEpoch | None = None,
) -> None:
    """Report this epoch with its checkpoint (weights, optimizer, scheduler, best epoch so far).

    Ray Train copies a reported checkpoint into its storage, except in local mode, where it keeps
    the path as given: there we write straight into the run's folder so it outlives this call.
    """
    local_mode = cfg.scaling.num_workers == 0
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(run_dir) / f"checkpoint_epoch_{epoch:04d}" if local_mode else Path(tmp)
        folder.mkdir(parents=True, exist_ok=True)
        if cfg.sharding.enabled:
            import torch.distributed.checkpoint as dcp

            state = {"model": model.state_dict(), "optimizer": optimizer.state_dict()}
            dcp.save(state, checkpoint_id=str(folder / "dcp"))  # collective: every rank writes
            if best is not None and best.weights is not None:
                dcp.save({"model": best.weights}, checkpoint_id=str(folder / BEST_SHARDS))
        elif rank == 0:
            module = getattr(model, "module", model)
            torch.save(
                {"model": module.state_dict(), "optimizer": optimizer.state_dict()},
                folder / "state.pt",
            )
            if best is not None and best.weights is not None:
                torch.save(best.weights, folder / BEST_WEIGHTS)
        if rank == 0:
            closed: dict[str, Any] = {"epoch": epoch, "stopped_early": bool(metrics.get("stopped_early"))}
            if scheduler is not None:
                closed["scheduler"] = scheduler.state_dict()
            if best is not None and best.weights is not None:
                closed["best"] = best.to_json()
            (folder / "epoch.json").write_text(json.dumps(closed))
        has_files = rank == 0 or cfg.sharding.enabled
        checkpoint = ray.train.Checkpoint.from_directory(str(folder)) if has_files else None
        ray.train.report(metrics, checkpoint=checkpoint)


# --- the driver ---------------------------------------------------------------------------------
class ExactEvalSplits(ray.train.DataConfig):
    """Ray Train's data split, except that valid and test lose no rows.

    Ray splits every dataset with `streaming_split(equal=True)`, which drops N mod workers rows:
    right for training (every rank must run the same number of steps), wrong for evaluation,
    where each row must be scored exactly once. `evaluate` copes with the uneven parts.
    """

    def configure(self, datasets, world_size, worker_handles, worker_node_ids, **kwargs):
        output = super().configure(
            {k: v for k, v in datasets.items() if k not in EVAL_SPLITS},
            world_size, worker_handles, worker_node_ids, **kwargs,
        )
        hints = worker_node_ids if self._enable_shard_locality else None
        for name in EVAL_SPLITS:
            if name not in datasets:
                continue
            dataset = datasets[name].copy(datasets[name])
            dataset.context.execution_options = self._resolve_execution_options(name)
            parts = dataset.streaming_split(world_size, equal=False, locality_hints=hints)
            for rank, part in enumerate(parts):
                output[rank][name] = part
        return output


# Materialise the splits when their decoded size is at most this share of the object store.
MATERIALIZE_MIN_EPOCHS = 3  # see split_datasets
MATERIALIZE_SHARE = 0.25


def _fits_object_store(data_path: str) -> bool:
    """The splits' uncompressed size (Parquet metadata) against the object store's capacity."""
    import pyarrow.parquet as pq
    import ray

    if _is_uri(data_path):  # stream remote data sets: their size is a listing away
        return False
    footers = [pq.read_metadata(f"{data_path}/{split}.parquet") for split in SPLITS]
    decoded = sum(m.row_group(i).total_byte_size for m in footers for i in range(m.num_row_groups))
    return decoded <= MATERIALIZE_SHARE * ray.cluster_resources().get("object_store_memory", 0)


def split_datasets(cfg: TrainConfig) -> dict[str, Any]:
    """The data folder's splits as Ray Datasets, the train split in a seeded block order."""
    import ray.data

    # Blocks keep the order they are given, so an epoch's data order is a function of the seed
    # alone and a run resumed after a failure sees the batches the uninterrupted run saw.
    ray.data.DataContext.get_current().execution_options.preserve_order = True
    datasets = {
        split: ray.data.read_parquet(f"{cfg.data.path}/{split}.parquet") for split in SPLITS
    }
    if cfg.train.epochs >= MATERIALIZE_MIN_EPOCHS and _fits_object_store(cfg.data.path):
        # Read once into the object store: every later epoch (and eval) iterates the decoded
        # blocks instead of decoding Parquet again, which on 2 cores is most of Ray Data's cost.
        # The read is three more Ray Data executions up front: a run of one or two epochs
        # re-reads too little to win them back.
        datasets = {split: dataset.materialize() for split, dataset in datasets.items()}
    if cfg.train.shuffle:
        # One seeded block order per run, mixed anew each epoch by the seeded local buffer of
        # `epoch_batches`. Ray's own per-epoch reseeding counts executions per process, which a
        # restarted worker counts from 0 again: its order would differ from the uninterrupted run's.
        datasets["train"] = datasets["train"].randomize_block_order(
            seed=derived_seed(cfg.seed, BLOCK_ORDER_STREAM)
        )
    return datasets


def fit(cfg: TrainConfig, callbacks: list[Any] | None = None) -> dict[str, Any]:
    """Validate, then run the TorchTrainer; return the final metrics, checkpoint and run folder.

    A run gets a new folder `<name>-<timestamp>` under storage_path; `resume: RUN` continues
    RUN from its last checkpoint instead. `callbacks` go to Ray Train's RunConfig (a Tune trial
    passes a TuneReportCallback; Train's local mode calls none).
    """
    schema = validate(cfg)

    import ray
    import ray.data
    from ray.train.torch import TorchConfig, TorchTrainer

    if cfg.resume:
        storage_path, run_name, resume_from = _resume_point(cfg)
    else:
        storage_path, run_name, resume_from = cfg.storage_path, _new_run_name(cfg), None
    run_dir = f"{storage_path.rstrip('/')}/{run_name}"
    if not _is_uri(run_dir):
        Path(run_dir, "config.yaml").write_text(
            yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))

    if not ray.is_initialized():
        ray.init()
    check_cluster_fits(cfg)

    data_context = ray.data.DataContext.get_current()
    data_context.enable_progress_bars = True
    on_gpu = cfg.sharding.device == "cuda"
    trainer = TorchTrainer(
        train_func,
        train_loop_config={"cfg": cfg.model_dump(), "schema": schema.model_dump(),
                           "run_dir": run_dir, "resume_from": resume_from and str(resume_from),
                           "steps_per_epoch": steps_per_epoch(cfg) if cfg.train.schedule else 1},
        torch_config=TorchConfig(backend="nccl" if on_gpu else "gloo"),
        scaling_config=ray.train.ScalingConfig(
            num_workers=cfg.scaling.num_workers,
            use_gpu=on_gpu,
            resources_per_worker={"CPU": cfg.scaling.cpus_per_worker} | ({"GPU": 1} if on_gpu else {}),
        ),
        run_config=ray.train.RunConfig(
            name=run_name,
            storage_path=storage_path,
            failure_config=ray.train.FailureConfig(max_failures=cfg.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
            callbacks=callbacks,
        ),
        datasets=split_datasets(cfg),
        dataset_config=ExactEvalSplits(
            datasets_to_split=list(EVAL_SPLITS) if cfg.train.global_batches else "all"
        ),
    )
    started = time.perf_counter()
    result = trainer.fit()
    metrics = dict(result.metrics or {})
    metrics["wall_seconds"] = time.perf_counter() - started
    if "diverged_at_step" in metrics:
        step = metrics["diverged_at_step"]
        raise TrainingDiverged(
            f"run {run_dir}: the train loss is {metrics['train_loss_curve'][step]} at epoch "
            f"{metrics['epoch']} step {step}; stopped (train.stop_on_nonfinite_loss). Lower "
            f"train.lr (now {cfg.train.lr:g}) or look for NaN/inf in the data; the run's last "
            "checkpoint holds the last finite weights"
        )
    if result.checkpoint and not _is_uri(run_dir):
        _write_servable_run(result.checkpoint, run_dir, cfg, schema, metrics)
    print(_summary(cfg, metrics), file=sys.stderr, flush=True)
    return {
        "metrics": metrics,
        "checkpoint": result.checkpoint.path if result.checkpoint else None,
        "run_dir": run_dir,
    }


def steps_per_epoch(cfg: TrainConfig) -> int:
    """Optimizer steps of one worker in one epoch, from the train split's Parquet row count.

    Mirrors the split: Ray gives each worker rows // workers (equal split, batches of batch_size,
    the last one short), or with global_batches every worker takes rows // (batch x workers).
    """
    import pyarrow.dataset as pds

    rows = pds.dataset(f"{cfg.data.path}/train.parquet", format="parquet").count_rows()
    world = max(cfg.scaling.num_workers, 1)
    if cfg.train.global_batches:
        return max(rows // (cfg.train.batch_size * world), 1)
    return max(math.ceil(rows // world / cfg.train.batch_size), 1)


def _summary(cfg: TrainConfig, metrics: dict[str, Any]) -> str:
    """One line: epochs run, the epoch whose weights were kept and why, its valid and test AUC."""
    stopping = cfg.train.early_stopping
    if stopping is None:
        kept = "kept the last epoch"
    else:
        why = "stopped early" if metrics.get("stopped_early") else "ran every epoch"
        kept = (f"{why} (patience {stopping.patience}); kept the best epoch "
                f"{metrics.get('best_epoch')} by valid {stopping.metric}")
    return (f"train: {metrics.get('epochs_run', cfg.train.epochs)} of {cfg.train.epochs} epochs, "
            f"{kept}: valid AUC {metrics.get('valid_auc', float('nan')):.4f}, "
            f"test AUC {metrics.get('test_auc', float('nan')):.4f}")


def _write_servable_run(checkpoint, run_dir: str, cfg: TrainConfig, schema: Schema,
                        metrics: dict[str, Any]) -> None:
    """Leave the run folder `recray serve` loads: config, schema, the kept weights, metrics.

    The kept weights are the best epoch's under early stopping, else the last epoch's.
    """
    from recray import models
    from recray.platform.run_folder import _load_dcp, write_run_folder

    with checkpoint.as_directory() as folder:
        folder = Path(folder)
        best = cfg.train.early_stopping is not None
        if cfg.sharding.enabled:  # DCP shards resharded into one plain model, no process group
            model = models.build(cfg.model.name, schema, **cfg.model.hparams)
            shards = folder / BEST_SHARDS
            _load_dcp(model, shards if best and shards.is_dir() else folder / "dcp")
            weights = model.state_dict()
        elif best and (folder / BEST_WEIGHTS).is_file():
            weights = torch.load(folder / BEST_WEIGHTS, map_location="cpu", weights_only=True)
        else:
            weights = torch.load(folder / "state.pt", map_location="cpu",
                                 weights_only=True)["model"]
    write_run_folder(run_dir, cfg, schema, weights, metrics)
