"""The run folder: what `recray train` leaves behind and `recray serve` (or an A/B policy) loads.

Layout, nothing else needed to score:

    config.yaml        the TrainConfig the run used (model name and hyper-parameters)
    schema.yaml        the feature schema the model was built for
    model/weights.pt   a flat {name: tensor} state dict, loadable with torch.load(weights_only=True)
    model/dcp/         or: torch.distributed.checkpoint shards of a sharded (DMP) run
    metrics.json       the final metrics

Weights are plain tensors (never pickled objects), so loading runs no code from the file.
"""

from __future__ import annotations

import json
import pickle
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn

from recray.data.schema import Schema
from recray.platform.config import ConfigError, TrainConfig, load_yaml, parse

WEIGHTS = Path("model") / "weights.pt"
DCP_SHARDS = Path("model") / "dcp"
# Prefixes that wrappers add to a module's parameter names: a train-state dict ({"model": ...}),
# TorchRec's DistributedModelParallel and DDP. A DCP checkpoint of a wrapped model keeps them.
WRAPPER_PREFIXES = ("model.", "_dmp_wrapped_module.", "module.")


def new_run_folder(root: str | Path, name: str) -> Path:
    """A new folder `root/<name>-<YYYYmmdd-HHMMSS>`, reserved by creating it (a suffix when taken).

    The one naming rule for train, tune and RL runs. A fixed name would make a second run
    silently continue the first (Ray reloads whatever checkpoint it finds under it); the
    exclusive mkdir keeps two runs started in the same second apart.
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    folder, attempt = root / f"{name}-{stamp}", 0
    while True:
        try:
            folder.mkdir()
            return folder
        except FileExistsError:
            attempt += 1
            folder = root / f"{name}-{stamp}-{attempt}"


@dataclass
class RunFolder:
    """A loaded run: its config, schema, the model with its trained weights (eval mode), metrics."""

    path: Path
    config: TrainConfig
    schema: Schema
    model: nn.Module
    metrics: dict[str, Any]


def write_run_folder(
    run_dir: str | Path,
    cfg: TrainConfig,
    schema: Schema,
    model_state_dict: dict[str, torch.Tensor],
    metrics: dict[str, Any],
) -> Path:
    """Write a servable run folder and return its path.

    From `fit()`: `write_run_folder(run_dir, cfg, schema, module.state_dict(), final_metrics)`
    with the TrainConfig of the run, the Schema `validate(cfg)` returned, the state dict of the
    unwrapped module (not the DDP/DMP wrapper: its names carry wrapper prefixes and a DMP holds
    sharded tensors; a sharded run leaves its DCP shards in `model/dcp/` instead) and the final
    metrics (JSON-serialisable numbers).
    """
    run_dir = Path(run_dir)
    (run_dir / WEIGHTS).parent.mkdir(parents=True, exist_ok=True)
    not_plain = sorted(k for k, v in model_state_dict.items() if type(v) is not torch.Tensor
                       and not isinstance(v, nn.Parameter))
    if not_plain:
        raise ValueError(
            f"model_state_dict: {not_plain[:3]} are not plain tensors (a sharded model?); pass the "
            "unwrapped single-device module's state_dict, or save DCP shards to model/dcp/"
        )
    tensors = {name: value.detach().cpu().contiguous() for name, value in model_state_dict.items()}
    torch.save(tensors, run_dir / WEIGHTS)
    (run_dir / "config.yaml").write_text(
        yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
    )
    schema.save(run_dir / "schema.yaml")
    (run_dir / "metrics.json").write_text(json.dumps(metrics, indent=2, default=float))
    return run_dir


def load_run_folder(run_dir: str | Path) -> RunFolder:
    """Read a run folder: config, schema, the built model with its weights in eval mode, metrics."""
    from recray import models

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ConfigError(f"run folder not found: {run_dir}")
    cfg = parse(TrainConfig, load_yaml(run_dir / "config.yaml"), str(run_dir / "config.yaml"))
    schema = Schema.load(run_dir / "schema.yaml")
    try:
        model = models.build(cfg.model.name, schema, **cfg.model.hparams)
    except ValueError as e:
        raise ConfigError(f"{run_dir / 'config.yaml'}: model: {e}") from None
    if (run_dir / WEIGHTS).is_file():
        _load_weights(model, run_dir / WEIGHTS)
    elif (run_dir / DCP_SHARDS).is_dir():
        load_dcp(model, run_dir / DCP_SHARDS)
    else:
        raise ConfigError(f"{run_dir}: no weights: expected {WEIGHTS} or {DCP_SHARDS}/")
    metrics_file = run_dir / "metrics.json"
    metrics = json.loads(metrics_file.read_text()) if metrics_file.is_file() else {}
    return RunFolder(run_dir, cfg, schema, model.eval(), metrics)


def _load_weights(model: nn.Module, path: Path) -> None:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # an unpickling refusal or a truncated file: name the file
        raise ConfigError(f"{path}: not a weights-only state dict: {e}") from None
    _check_names(model, set(state), path)
    _load_state(model, state, path)


def load_dcp(model: nn.Module, folder: str | Path) -> None:
    """Load DCP shards (saved by any number of ranks, under any sharding plan, names with or
    without wrapper prefixes) into a single-device model in place: no process group, resharded
    by DCP itself, nothing unpickled. Optimizer state in the checkpoint is skipped."""
    folder = Path(folder)
    import torch.distributed.checkpoint as dcp

    try:
        reader = _safe_reader_class()(str(folder))
        saved = reader.read_metadata().state_dict_metadata
    except Exception as e:
        raise ConfigError(f"{folder}: not a torch.distributed.checkpoint folder: {e}") from None
    plain = model.state_dict()
    # Shard names carry wrapper prefixes; DCP loads by name, so point each saved name at the
    # plain model's tensor (loaded in place). Names that fit nothing (optimizer state) are skipped.
    targets = {}
    for saved_name in saved:
        name = saved_name
        while name not in plain and name.startswith(WRAPPER_PREFIXES):
            name = name.split(".", 1)[1]
        if name in plain:
            targets[name] = saved_name
    _check_names(model, set(targets), folder)
    dcp.load({saved_name: plain[name] for name, saved_name in targets.items()},
             storage_reader=reader, no_dist=True)
    _load_state(model, plain, folder)


_load_dcp = load_dcp  # the old private name, still imported by recray/platform/train.py


# DCP loads tensors with weights_only=True but reads its `.metadata` file with plain pickle.load,
# which would run any code a crafted run folder put there. These are the only globals DCP's
# metadata of a model checkpoint names (seen in files written by 1 and 2 ranks).
_DCP_METADATA_MODULES = ("torch.distributed.checkpoint.metadata",)
_ALLOWED_GLOBALS = {("torch", "Size"), ("torch.serialization", "_get_layout"),
                    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
                    ("pathlib", "PosixPath"), ("pathlib", "WindowsPath"), ("pathlib", "Path")}


class _MetadataUnpickler(pickle.Unpickler):
    """Unpickles DCP metadata and nothing else: any other global is refused by name."""

    def find_class(self, module: str, name: str) -> object:
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        if (module, name) in _ALLOWED_GLOBALS or (
                module in _DCP_METADATA_MODULES and not name.startswith("__")):
            found = super().find_class(module, name)
            if module in _DCP_METADATA_MODULES and not isinstance(found, type):
                raise pickle.UnpicklingError(f"global {module}.{name} is not allowed")
            return found
        raise pickle.UnpicklingError(f"global {module}.{name} is not allowed in DCP metadata")


def _safe_reader_class() -> type:
    """DCP's FileSystemReader, defined on first use (importing DCP is slow)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import StorageMeta

    class Reader(dcp.FileSystemReader):
        # upstream's read_metadata, with _MetadataUnpickler in place of pickle.load

        def read_metadata(self, *args: Any, **kwargs: Any):
            with self.fs.create_stream(self._get_metadata_path(kwargs.get("rank")), "rb") as f:
                metadata = _MetadataUnpickler(f).load()
            if getattr(metadata, "storage_meta", None) is None:
                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            return metadata

    return Reader


def _load_state(model: nn.Module, state: dict[str, torch.Tensor], source: Path) -> None:
    try:
        model.load_state_dict(state)
    except RuntimeError as e:  # shapes that do not fit: torch names the tensor
        raise ConfigError(f"{source}: weights do not fit the model in config.yaml: {e}") from None


def _check_names(model: nn.Module, names: set[str], source: Path) -> None:
    expected = set(model.state_dict())
    missing, unexpected = sorted(expected - names), sorted(names - expected)
    if missing or unexpected:
        raise ConfigError(
            f"{source}: weights do not fit the model in config.yaml: {len(missing)} missing "
            f"{missing[:5]}, {len(unexpected)} unexpected {unexpected[:5]}"
        )
