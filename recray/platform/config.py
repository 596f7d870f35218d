"""Experiment configs: YAML files validated before any worker starts, errors naming the field."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

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


class OptimSection(_Strict):
    epochs: int = Field(default=1, gt=0)
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
    weight_decay: float = Field(default=0.0, ge=0)
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
