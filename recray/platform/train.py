"""Training on Ray Train: a TorchTrainer whose train function streams Parquet through Ray Data as KJTs."""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from sklearn.metrics import log_loss, roc_auc_score

from recray.data import SPLITS
from recray.data.jagged import check_columns, to_batch
from recray.data.schema import Schema, SchemaError
from recray.platform.config import ConfigError, TrainConfig
from recray.platform.sharding import embedding_tables, shard


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
    if cfg.model.name not in models.available():
        raise ConfigError(
            f"model.name: unknown model {cfg.model.name!r}; available: {models.available()}"
        )
    try:
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


# --- the train function (runs in each Ray Train worker) -----------------------------------------
def _optimizer(cfg: TrainConfig, params) -> torch.optim.Optimizer:
    kinds = {"adam": torch.optim.Adam, "adagrad": torch.optim.Adagrad, "sgd": torch.optim.SGD}
    return kinds[cfg.train.optimizer](params, lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)


def task_metrics(
    split: str, tasks: list[str], labels: np.ndarray, probs: np.ndarray
) -> dict[str, float]:
    """AUC and logloss per task; `label` is the single-task name, else `<split>_auc_<task>` too."""
    out: dict[str, float] = {}
    for t, task in enumerate(tasks):
        y, p = labels[:, t], np.clip(probs[:, t], 1e-7, 1 - 1e-7)
        suffix = "" if task == "label" else f"_{task}"
        out[f"{split}_auc{suffix}"] = (
            float(roc_auc_score(y, p)) if 0 < y.sum() < len(y) else float("nan")
        )
        out[f"{split}_logloss{suffix}"] = float(log_loss(y, p, labels=[0, 1]))
    if len(tasks) > 1:
        out[f"{split}_auc"] = float(np.nanmean([out[f"{split}_auc_{t}"] for t in tasks]))
        out[f"{split}_logloss"] = float(np.mean([out[f"{split}_logloss_{t}"] for t in tasks]))
    return out


@torch.no_grad()
def evaluate(model, shard, schema: Schema, batch_size: int, split: str) -> dict[str, float]:
    """Predict a data shard; with several workers, gather every worker's predictions first."""
    import torch.distributed as dist

    model.eval()
    device = next(model.parameters()).device
    labels, probs = [], []
    for table in shard.iter_batches(batch_size=batch_size, batch_format="pyarrow"):
        batch = to_batch(table, schema, source=split)
        labels.append(batch.labels.numpy())
        if device.type != "cpu":
            batch = batch.to(device, non_blocking=True)
        probs.append(torch.sigmoid(model(batch)).cpu().numpy())
    model.train()
    n_tasks = len(schema.labels)
    local = (
        np.concatenate(labels) if labels else np.zeros((0, n_tasks), np.float32),
        np.concatenate(probs) if probs else np.zeros((0, n_tasks), np.float32),
    )
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        gathered: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, local)
        local = (np.concatenate([g[0] for g in gathered]), np.concatenate([g[1] for g in gathered]))
    return task_metrics(split, schema.tasks, *local)


def train_func(config: dict[str, Any]) -> dict[str, float]:
    """Ray Train's unit: build the model, stream this worker's shard, evaluate, checkpoint."""
    import ray.train
    import ray.train.torch

    from recray import models

    cfg = TrainConfig.model_validate(config["cfg"])
    schema = Schema.model_validate(config["schema"])
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    torch.manual_seed(cfg.seed)
    model = models.build(cfg.model.name, schema, **cfg.model.hparams)
    if cfg.sharding.enabled:
        _ensure_process_group()
        model, optimizer, plan = shard(
            model,
            default_type=cfg.sharding.default_type,
            table_types=cfg.sharding.tables,
            embedding_optimizer=cfg.sharding.embedding_optimizer,
            embedding_lr=cfg.sharding.embedding_lr or cfg.train.lr,
            dense_optimizer=lambda params: _optimizer(cfg, params),
            device=torch.device(cfg.sharding.device),
        )
        if rank == 0:
            print(plan, flush=True)
    else:
        optimizer = _optimizer(cfg, model.parameters())
    checkpoint = ray.train.get_checkpoint()  # set when Ray restarts workers after a failure
    start_epoch = _restore(checkpoint, model, optimizer, cfg) + 1 if checkpoint else 0
    resumed_from = start_epoch - 1 if checkpoint else -1
    if world > 1 and not cfg.sharding.enabled:  # DMP already wraps the dense part in DDP
        model = ray.train.torch.prepare_model(model)
    loss_fn = torch.nn.BCEWithLogitsLoss()
    device = torch.device(cfg.sharding.device)  # GPU path written for DMP, not yet run on a GPU
    torch.manual_seed(cfg.seed + rank + start_epoch)

    metrics: dict[str, float] = {}
    for epoch in range(start_epoch, cfg.train.epochs):
        started, rows, steps, compute_seconds = time.perf_counter(), 0, 0, 0.0
        train_shard = ray.train.get_dataset_shard("train")
        local_losses = []
        global_batch = cfg.train.batch_size * (world if cfg.train.global_batches else 1)
        for table in train_shard.iter_batches(
            batch_size=global_batch,
            batch_format="pyarrow",
            local_shuffle_buffer_size=cfg.train.shuffle_buffer_rows or None,
            local_shuffle_seed=cfg.seed + epoch,
            prefetch_batches=cfg.train.prefetch_batches,
            # A short last global batch could leave a rank without rows while the others run a
            # collective forward (DMP's all-to-all): drop it so every rank steps together.
            drop_last=cfg.train.global_batches,
        ):
            if cfg.train.global_batches:
                table = table.slice(rank * cfg.train.batch_size, cfg.train.batch_size)
            _maybe_fail(cfg, rank, epoch, steps)
            step_started = time.perf_counter()
            batch = to_batch(table, schema, source="train")
            if device.type != "cpu":
                batch = batch.to(device, non_blocking=True)
            if len(batch) == 0:
                continue
            loss = loss_fn(model(batch), batch.labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
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
            "train_rows_per_s": rows * world / max(train_seconds, 1e-9),
            "train_seconds": train_seconds,
            # Time the loop spent waiting for Ray Data: near train_seconds means input-bound.
            "train_data_wait_seconds": train_seconds - compute_seconds,
        }
        evaluated = ("valid", "test") if epoch == cfg.train.epochs - 1 else ("valid",)
        for split in evaluated:
            metrics |= evaluate(
                model, ray.train.get_dataset_shard(split), schema, cfg.train.eval_batch_size, split
            )
        _report(model, optimizer, epoch, metrics, rank, cfg)
    return metrics


def _mean_over_ranks(losses: list[torch.Tensor]) -> list[float]:
    """Per-step loss averaged over workers: one all-reduce per epoch, not per step."""
    import torch.distributed as dist

    curve = torch.stack(losses) if losses else torch.zeros(0)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        # Ranks may run different step counts when shards are uneven; pad to the longest.
        length = torch.tensor([curve.numel()])
        dist.all_reduce(length, op=dist.ReduceOp.MAX)
        padded = torch.full((int(length),), float("nan"))
        padded[: curve.numel()] = curve
        counts = (~padded.isnan()).float()
        dist.all_reduce(counts)
        dist.all_reduce(padded.nan_to_num_(0.0))
        curve = padded / counts.clamp(min=1)
    return curve.tolist()


def _maybe_fail(cfg: TrainConfig, rank: int, epoch: int, step: int) -> None:
    """Fault injection for tests: exit this worker process once (a marker file remembers)."""
    fault = cfg.fault_injection
    if fault is None or (fault.rank, fault.epoch, fault.step) != (rank, epoch, step):
        return
    marker = Path(cfg.storage_path) / cfg.name / "fault_injected"
    if marker.exists():
        return
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.write_text(f"{time.time()}\n")
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
# with weights_only=True. `epoch.json` says which epoch the checkpoint closes.
def _restore(checkpoint, model, optimizer, cfg: TrainConfig) -> int:
    """Load a checkpoint into model and optimizer; return the epoch it closed."""
    import json

    with checkpoint.as_directory() as folder:
        folder = Path(folder)
        if cfg.sharding.enabled:
            import torch.distributed.checkpoint as dcp

            optimizer.init_state()  # materialise optimizer state so DCP has tensors to fill
            state = {"model": model.state_dict(), "optimizer": optimizer.state_dict()}
            dcp.load(state, checkpoint_id=str(folder / "dcp"))
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
        else:
            state = torch.load(folder / "state.pt", weights_only=True)
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
        return int(json.loads((folder / "epoch.json").read_text())["epoch"])


def _report(
    model, optimizer, epoch: int, metrics: dict[str, float], rank: int, cfg: TrainConfig
) -> None:
    """Report this epoch with its checkpoint (weights, optimizer state, epoch).

    Ray Train copies a reported checkpoint into its storage, except in local mode, where it keeps
    the path as given: there we write straight into the run's folder so it outlives this call.
    """
    import json

    import ray.train

    local_mode = cfg.scaling.num_workers == 0
    with tempfile.TemporaryDirectory() as tmp:
        folder = (
            Path(cfg.storage_path) / cfg.name / f"checkpoint_epoch_{epoch:04d}"
            if local_mode
            else Path(tmp)
        )
        folder.mkdir(parents=True, exist_ok=True)
        if cfg.sharding.enabled:
            import torch.distributed.checkpoint as dcp

            state = {"model": model.state_dict(), "optimizer": optimizer.state_dict()}
            dcp.save(state, checkpoint_id=str(folder / "dcp"))  # collective: every rank writes
        elif rank == 0:
            module = getattr(model, "module", model)
            torch.save(
                {"model": module.state_dict(), "optimizer": optimizer.state_dict()},
                folder / "state.pt",
            )
        if rank == 0:
            (folder / "epoch.json").write_text(json.dumps({"epoch": epoch}))
        has_files = rank == 0 or cfg.sharding.enabled
        checkpoint = ray.train.Checkpoint.from_directory(str(folder)) if has_files else None
        ray.train.report(metrics, checkpoint=checkpoint)


# --- the driver ---------------------------------------------------------------------------------
def fit(cfg: TrainConfig) -> dict[str, Any]:
    """Validate, then run the TorchTrainer; return the final metrics and the checkpoint path."""
    schema = validate(cfg)

    import ray
    import ray.data
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    if not ray.is_initialized():
        ray.init()
    check_cluster_fits(cfg)

    data_context = ray.data.DataContext.get_current()
    data_context.enable_progress_bars = True
    # A fixed block order makes an epoch's data order a function of the seed alone, so a run
    # resumed after a failure sees exactly the batches the uninterrupted run would have seen.
    data_context.execution_options.preserve_order = True
    datasets = {
        split: ray.data.read_parquet(f"{cfg.data.path}/{split}.parquet") for split in SPLITS
    }
    on_gpu = cfg.sharding.device == "cuda"
    trainer = TorchTrainer(
        train_func,
        train_loop_config={"cfg": cfg.model_dump(), "schema": schema.model_dump()},
        torch_config=TorchConfig(backend="nccl" if on_gpu else "gloo"),
        scaling_config=ray.train.ScalingConfig(
            num_workers=cfg.scaling.num_workers,
            use_gpu=on_gpu,
            resources_per_worker={"CPU": cfg.scaling.cpus_per_worker} | ({"GPU": 1} if on_gpu else {}),
        ),
        run_config=ray.train.RunConfig(
            name=cfg.name,
            storage_path=cfg.storage_path,
            failure_config=ray.train.FailureConfig(max_failures=cfg.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
        ),
        datasets=datasets,
        dataset_config=ray.train.DataConfig(
            datasets_to_split=["valid", "test"] if cfg.train.global_batches else "all"
        ),
    )
    started = time.perf_counter()
    result = trainer.fit()
    metrics = dict(result.metrics or {})
    metrics["wall_seconds"] = time.perf_counter() - started
    return {
        "metrics": metrics,
        "checkpoint": result.checkpoint.path if result.checkpoint else None,
    }
