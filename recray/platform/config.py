"""Experiment configs: YAML files validated before any worker starts, errors naming the field."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ByteSize,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from recray.data.schema import describe_errors


class ConfigError(ValueError):
    """A config that cannot run; the message names the file, the field and the value."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class DataSection(_Strict):
    path: str = Field(description="directory with train/valid/test.parquet and schema.yaml")


class ModelSection(_Strict):
    name: str
    hparams: dict[str, Any] = Field(default_factory=dict)


class EarlyStopping(_Strict):
    """Stop when a validation metric has not improved for `patience` epochs; keep the best epoch.

    The best epoch's weights are restored at the end for the test metrics, the run folder that
    `recray serve` loads and Tune's export; `train.epochs` is the most epochs a run may take.
    """

    metric: Literal["auc", "logloss"] = Field(
        default="auc", description="valid AUC (higher is better) or valid logloss (lower is better)"
    )
    label: str | None = Field(
        default=None,
        description="the task to watch in a multi-task schema (a label column's task name, e.g. "
        "'click'); default: the single label, or the mean over tasks",
    )
    patience: int = Field(default=5, ge=1, description="epochs without improvement before stopping")
    min_delta: float = Field(
        default=0.0, ge=0, description="an improvement smaller than this does not count"
    )

    def key(self, tasks: list[str]) -> str:
        """The metrics key watched: valid_<metric> or valid_<metric>_<task>."""
        return f"valid_{self.metric}" + (f"_{self.label}" if self.label and len(tasks) > 1 else "")

    def improved(self, value: float, best: float | None) -> bool:
        """Better than the best so far by more than min_delta (NaN never improves)."""
        if value != value:
            return False
        if best is None:
            return True
        gain = value - best if self.metric == "auc" else best - value
        return gain > self.min_delta


class LRSchedule(_Strict):
    """torch's schedulers, stepped every optimizer step: linear warmup, then constant/cosine/step.

    Lengths are in epochs (fractions allowed) and become steps from the train split's row count.
    """

    warmup_epochs: float = Field(default=0.0, ge=0, description="linear warmup (LinearLR) length")
    warmup_start_factor: float = Field(
        default=0.1, gt=0, le=1, description="lr x this at the first step of the warmup"
    )
    decay: Literal["constant", "cosine", "step"] = Field(
        default="constant",
        description="after the warmup: constant, CosineAnnealingLR down to lr x min_lr_factor at "
        "train.epochs, or StepLR (x gamma every step_epochs)",
    )
    min_lr_factor: float = Field(default=0.0, ge=0, le=1, description="cosine: final lr / lr")
    step_epochs: float = Field(default=1.0, gt=0, description="step: epochs between decays")
    gamma: float = Field(default=0.1, gt=0, le=1, description="step: lr factor per decay")


class OptimSection(_Strict):
    epochs: int = Field(default=1, gt=0, description="epochs to train (the most, with early_stopping)")
    batch_size: int = Field(default=1024, gt=0)
    eval_batch_size: int = Field(default=8192, gt=0)
    shuffle: bool = Field(
        default=True,
        description="shuffle the train split: a seeded block order per run plus a seeded local "
        "buffer of shuffle_buffer_rows drawn anew each epoch; false reads it in file order",
    )
    shuffle_buffer_rows: int = Field(
        default=100_000, ge=0, description="rows Ray Data's local shuffle mixes; 0 = block order only"
    )
    prefetch_batches: int = Field(default=4, ge=0, description="batches Ray Data prepares ahead")
    global_batches: bool = Field(
        default=False,
        description="every worker streams the whole train split and trains on its slice of each "
        "global batch (batch_size x workers): the data order of one worker, for any worker count",
    )
    optimizer: Literal["adam", "adagrad", "sgd"] = "adam"
    lr: float = Field(default=1e-3, gt=0)
    weight_decay: float = Field(default=0.0, ge=0, description="weight decay of the dense weights")
    embedding_weight_decay: float | None = Field(
        default=None, ge=0,
        description="weight decay (L2, as the optimizer applies it) of the embedding tables; "
        "default: weight_decay. Unsharded runs only: a sharded run's fused embedding optimizer "
        "does not take it",
    )
    grad_clip_norm: float | None = Field(
        default=None, gt=0,
        description="clip the dense weights' gradient to this global L2 norm (clip_grad_norm_); "
        "embedding tables are not clipped: a sharded run's fused optimizers update them inside "
        "backward, before any clipping could see them, and unsharded runs do the same",
    )
    schedule: LRSchedule | None = Field(default=None, description="learning-rate schedule")
    early_stopping: EarlyStopping | None = Field(
        default=None, description="stop on a plateau of a validation metric and keep the best epoch"
    )
    stop_on_nonfinite_loss: bool = Field(
        default=True,
        description="stop the run with an error at the end of an epoch whose loss curve holds a "
        "NaN or inf; false keeps training and reports the NaN",
    )


class ScalingSection(_Strict):
    num_workers: int = Field(default=0, ge=0, description="0 = Ray Train local mode")
    cpus_per_worker: float = Field(default=1.0, gt=0)
    allow_autoscale: bool = Field(
        default=False, description="allow more workers than the cluster has CPUs right now"
    )


ShardingType = Literal["auto", "data_parallel", "table_wise", "column_wise", "row_wise",
                       "table_row_wise", "table_column_wise", "grid_shard"]


class ShardingSection(_Strict):
    """TorchRec DistributedModelParallel: tables placed by the planner, dense part DDP."""

    enabled: bool = False
    default_type: ShardingType = "auto"
    tables: dict[str, ShardingType] = Field(default_factory=dict, description="per-table type")
    embedding_optimizer: Literal["adagrad", "rowwise_adagrad", "sgd", "adam"] | None = Field(
        default=None,
        description="fused optimizer of the embedding tables; default: train.optimizer, as in an "
        "unsharded run, except Adam on CPU (no fused CPU kernel): adagrad, and the plan says so",
    )
    embedding_lr: float | None = Field(
        default=None, gt=0, description="default: train.lr (train.lr / workers for sgd)"
    )
    device: Literal["cpu", "cuda"] = "cpu"
    memory_per_worker: ByteSize | None = Field(
        default=None,
        description="memory one worker gives the model (DDR on cpu, HBM on cuda), e.g. '16GiB': "
        "TorchRec's planner must split tables that do not fit; a config that fits on no plan is "
        "refused before training; none = TorchRec's defaults",
    )
    memory_reserved_fraction: float = Field(
        default=0.15, ge=0, lt=1,
        description="share of memory_per_worker the planner keeps for the dense part, inputs and "
        "margin (TorchRec's default); the rest holds tables and their optimizer state",
    )
    init_scale_rows: int | None = Field(
        default=None, gt=0,
        description="tables start U(+-sqrt(1/rows)) as in TorchRec; a table of more rows starts "
        "as if it had this many (TorchRec's scale shrinks with rows: a 40M-row hashed table "
        "starts near zero); none = no cap",
    )

    @model_validator(mode="after")
    def _offered_on_device(self) -> ShardingSection:
        if self.device != "cpu":
            return self
        from recray.platform.sharding import CPU_EMBEDDING_OPTIMIZERS, CPU_SHARDING_TYPES

        asked = {"default_type": self.default_type} | {f"tables.{t}": k for t, k in self.tables.items()}
        for where, kind in asked.items():
            if kind != "auto" and kind not in CPU_SHARDING_TYPES:
                raise ValueError(
                    f"{where}: {kind!r} is refused by TorchRec on CPU (its CPU sharders offer "
                    f"{', '.join(CPU_SHARDING_TYPES)}); use one of those, or device: cuda"
                )
        if self.embedding_optimizer not in (None, *CPU_EMBEDDING_OPTIMIZERS):
            raise ValueError(
                f"embedding_optimizer: {self.embedding_optimizer!r} has no fused CPU kernel in "
                f"fbgemm; on CPU use one of {', '.join(CPU_EMBEDDING_OPTIMIZERS)}"
            )
        return self


class FaultInjection(_Strict):
    """Test aid: the worker of `rank` exits (os._exit) once, at `step` of `epoch`."""

    epoch: int = Field(ge=0)
    step: int = Field(ge=0)
    rank: int = Field(default=0, ge=0)


class TrainConfig(_Strict):
    name: str = Field(default="train", pattern=r"^[A-Za-z0-9_.-]+$",
                      description="runs are folders <name>-<timestamp> under storage_path")
    seed: int = Field(default=0, ge=0)
    data: DataSection
    model: ModelSection
    train: OptimSection = Field(default_factory=OptimSection)
    scaling: ScalingSection = Field(default_factory=ScalingSection)
    storage_path: str = Field(
        default="runs", validate_default=True,
        description="folder of the run folders (relative to the working directory) or a URI",
    )
    resume: str | None = Field(
        default=None,
        description="continue this run (a folder name under storage_path, or its path) from its "
        "last checkpoint; without it every run starts afresh in a new folder",
    )
    sharding: ShardingSection = Field(default_factory=ShardingSection)
    max_failures: int = Field(default=0, ge=-1, description="-1 = retry forever")
    fault_injection: FaultInjection | None = None

    @model_validator(mode="after")
    def _fault_needs_a_worker_process(self) -> TrainConfig:
        if self.fault_injection and self.scaling.num_workers == 0:
            raise ValueError("fault_injection: needs scaling.num_workers >= 1 (local mode would "
                             "kill the driver itself)")
        if self.fault_injection and self.fault_injection.rank >= max(self.scaling.num_workers, 1):
            raise ValueError(f"fault_injection.rank: {self.fault_injection.rank} is not below "
                             f"scaling.num_workers={self.scaling.num_workers}")
        return self

    @model_validator(mode="after")
    def _embedding_decay_needs_plain_embeddings(self) -> TrainConfig:
        if self.sharding.enabled and self.train.embedding_weight_decay:
            raise ValueError(
                f"train.embedding_weight_decay: {self.train.embedding_weight_decay:g} is not "
                "supported with sharding.enabled (the fused embedding optimizer takes no weight "
                "decay here); unset it, or train unsharded"
            )
        return self

    @model_validator(mode="after")
    def _local_mode_writes_a_local_folder(self) -> TrainConfig:
        if self.scaling.num_workers == 0 and "://" in self.storage_path:
            raise ValueError(f"storage_path: {self.storage_path!r} is a URI, which needs "
                             "scaling.num_workers >= 1 (local mode writes checkpoints locally)")
        return self

    @field_validator("storage_path")
    @classmethod
    def _absolute(cls, value: str) -> str:
        """Ray Train needs an absolute path or a URI (s3://, gs://), which passes unchanged."""
        if "://" in value:
            return value
        return str(Path(value).expanduser().resolve())


def load_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level, got {type(data).__name__}")
    return data


def parse(model: type[BaseModel], data: dict[str, Any], source: str) -> Any:
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise ConfigError(f"{source}: {describe_errors(e)}") from None


def load_train_config(path: str | Path, overrides: dict[str, Any] | None = None) -> TrainConfig:
    data = load_yaml(path)
    for dotted, value in (overrides or {}).items():
        node = data
        *parents, leaf = dotted.split(".")
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = value
    return parse(TrainConfig, data, str(path))
