"""Architecture search on Ray Tune: trials that launch TorchTrainers, AUC against serving latency.

A search config is a train config plus a `search:` section (`SearchSection`). Each Tune trial is a
function that measures the serving latency of its architecture, then runs `train.fit` (a real
TorchTrainer) and forwards every epoch to Tune, where a scheduler (ASHA by default) stops the
weak ones. The driver turns the trials into a Pareto front over (validation AUC, p99 latency)
and exports the chosen trial as `best/train.yaml` (for `recray train`) and `best/model/` (for
`recray serve`). Everything lives in one tune folder, which `resume` continues with
`Tuner.restore`.
"""

from __future__ import annotations

import csv
import inspect
import json
import math
import os
import re
import shutil
import sys
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any, Literal, TextIO

import numpy as np
import pyarrow as pa
import torch
import yaml
from pydantic import Field, model_validator
from ray import tune
from ray.tune.integration.ray_train import TuneReportCallback

from recray.data.schema import Schema
from recray.platform.config import ConfigError, OptimSection, TrainConfig, _Strict, parse
from recray.platform.ray_init import init_local_ray
from recray.platform.run_folder import new_run_folder

METRIC = "valid_auc"
DOMAIN_KINDS = ("choice", "grid", "uniform", "loguniform", "randint")
EXPERIMENT = "experiment"  # Tune's experiment folder inside the tune folder
# Tune's own names, plus `asha` for its AsyncHyperBandScheduler.
SCHEDULER_ALIASES = {"asha": "async_hyperband"}
# Options the search sets itself: the scheduler ranks on valid AUC per epoch.
SCHEDULER_OWN_OPTIONS = ("metric", "mode", "time_attr", "max_t")
# Searched data settings, beside train.<field>: a trial trains on a view of the data folder
# (the same Parquet files linked, or rewritten with every sequence cut to its newest items, and
# the schema with the searched embedding dim). Train and serve read the view like any data folder.
DATA_SPACE = {
    "schema.embedding_dim": "embedding_dim of every id feature in the schema",
    "data.max_history_length": "every sequence feature cut to its newest N items",
}
SEARCHERS = ("random", "optuna")
TRIAL_CPU = 0.01  # a trial only waits on its TorchTrainer (Tune refuses 0)


# --- the search section ---------------------------------------------------------------------------
class Domain(_Strict):
    """One searched value, as Tune's own primitive of that name (`randint` is [low, high))."""

    choice: list[Any] | None = Field(default=None, min_length=1)
    grid: list[Any] | None = Field(default=None, min_length=1)
    uniform: tuple[float, float] | None = None
    loguniform: tuple[float, float] | None = None
    randint: tuple[int, int] | None = None

    @model_validator(mode="after")
    def _one_kind_with_a_range(self) -> Domain:
        given = [kind for kind in DOMAIN_KINDS if getattr(self, kind) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of {', '.join(DOMAIN_KINDS)}; got {given or 'none'}")
        kind = given[0]
        if kind in ("uniform", "loguniform", "randint"):
            low, high = getattr(self, kind)
            if low >= high:
                raise ValueError(f"{kind}: [{low}, {high}] is empty (low must be below high)")
            if kind == "loguniform" and low <= 0:
                raise ValueError(f"loguniform: low {low} must be above 0")
        return self

    @property
    def kind(self) -> str:
        return next(kind for kind in DOMAIN_KINDS if getattr(self, kind) is not None)

    def to_tune(self) -> Any:
        value = getattr(self, self.kind)
        if self.kind == "grid":
            return tune.grid_search(value)
        if self.kind == "choice":
            return tune.choice(value)
        return getattr(tune, self.kind)(*value)

    def edges(self) -> list[Any]:
        """Values that validation tries: every listed value, or both ends of a range."""
        value = getattr(self, self.kind)
        if self.kind in ("choice", "grid"):
            return value
        return [value[0], value[1] - 1] if self.kind == "randint" else list(value)


class SchedulerSection(_Strict):
    name: str = Field(default="asha", description="asha, or any ray.tune.create_scheduler name")
    options: dict[str, Any] = Field(
        default_factory=lambda: {"grace_period": 1, "reduction_factor": 2},
        description="the scheduler's own keyword arguments (metric, mode, time_attr, max_t are "
        "set by the search: valid_auc, max, epochs_done, train.epochs)",
    )


class LatencySection(_Strict):
    """Serving latency: one request of `candidates` rows from the valid split, 1 CPU thread."""

    candidates: int = Field(default=100, gt=0)
    repeats: int = Field(default=200, gt=0)
    warmup: int = Field(default=20, ge=0)


class SearchSection(_Strict):
    num_samples: int = Field(default=4, gt=0, description="trials per model family (and per grid "
                             "point: Tune repeats the grid num_samples times)")
    max_concurrent_trials: int = Field(default=1, gt=0)
    scheduler: SchedulerSection = Field(default_factory=SchedulerSection)
    space: dict[str, Domain] = Field(
        default_factory=dict, description="train.<field> -> domain, e.g. train.lr: {loguniform: "
        "[1e-4, 1e-2]}")
    models: dict[str, dict[str, Domain]] = Field(
        default_factory=dict, description="model family -> hparam -> domain; each family gets "
        "num_samples trials; empty: model.name only")
    max_latency_ms: float | None = Field(
        default=None, gt=0, description="pick the best trial whose p99 latency is within this")
    latency: LatencySection = Field(default_factory=LatencySection)
    loggers: list[Literal["tensorboard", "mlflow"]] = Field(
        default_factory=list, description="Ray Tune's logger callbacks to switch on")
    searcher: Literal[SEARCHERS] = Field(
        default="random", description="random: Tune's variant generator (random samples, grid "
        "points enumerated); optuna: Tune's OptunaSearch, multi-objective over valid AUC (max) "
        "and p99 latency (min), families as one more categorical, grid domains refused")

    @model_validator(mode="after")
    def _searches_train_fields(self) -> SearchSection:
        for key in self.space:
            if key in DATA_SPACE:
                continue
            section, _, field = key.partition(".")
            if section != "train" or field not in OptimSection.model_fields:
                raise ValueError(
                    f"space.{key}: not a train setting; the space takes train.<field> with a "
                    f"field of {sorted(OptimSection.model_fields)}, or {sorted(DATA_SPACE)}, and "
                    "model hparams go under search.models.<family>")
            if field == "epochs":
                raise ValueError("space.train.epochs: the epochs are the scheduler's budget "
                                 "(max_t); set train.epochs instead")
        if self.searcher == "optuna":
            grids = [f"space.{key}" for key, d in self.space.items() if d.kind == "grid"] + [
                f"models.{family}.{name}" for family, space in self.models.items()
                for name, d in space.items() if d.kind == "grid"]
            if grids:
                raise ValueError(f"{grids[0]}: grid is Tune's grid search, which searcher optuna "
                                 "does not take (it samples); use choice")
        return self


class TuneConfig(TrainConfig):
    """A train config plus its search; every trial trains the train config with its own values."""

    search: SearchSection

    def base(self) -> TrainConfig:
        return TrainConfig.model_validate(self.model_dump(exclude={"search"}))


def load_tune_config(path: str | Path, overrides: dict[str, Any] | None = None) -> TuneConfig:
    from recray.platform.config import load_yaml

    data = load_yaml(path)
    if "search" not in data:
        raise ConfigError(f"{path}: search: missing; a tune config is a train config plus a "
                          "search: section (see configs/tune-sim.yaml)")
    for dotted, value in (overrides or {}).items():
        node = data
        *parents, leaf = dotted.split(".")
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = value
    return parse(TuneConfig, data, str(path))


# --- validation: the whole space is checked before any trial starts ------------------------------
def families(cfg: TuneConfig) -> list[str]:
    return list(cfg.search.models) or [cfg.model.name]


def validate_search(cfg: TuneConfig) -> Schema:
    """Check data, base model, every family and every value of the space; return the schema."""
    from recray import models
    from recray.platform.train import validate

    schema = validate(cfg)  # data folder and the base model; resolves data.path
    if cfg.scaling.num_workers == 0:
        raise ConfigError(
            "scaling.num_workers: 0 (Ray Train's local mode) calls no Train callbacks, so no epoch "
            "would reach Tune's scheduler; give trials real workers: num_workers >= 1 (on 2 cores "
            "with cpus_per_worker: 0.5)")
    domains = sum(len(space) for space in cfg.search.models.values()) + len(cfg.search.space)
    if domains == 0 and len(families(cfg)) < 2:
        raise ConfigError("search: the space is empty: give search.space (train.<field>: domain) "
                          "or search.models (family: {hparam: domain}), or two families")
    base = cfg.base().model_dump(mode="json")
    dims = check_data_space(cfg, schema)
    for key, domain in cfg.search.space.items():
        if key in DATA_SPACE:
            continue
        field = key.split(".", 1)[1]
        for value in domain.edges():
            trial = {**base, "train": {**base["train"], field: value}}
            parse(TrainConfig, trial, f"search.space.{key}: value {value!r} is refused")
    for family, space in cfg.search.models.items():
        if family not in models.available():
            raise ConfigError(f"search.models.{family}: unknown model; available: "
                              f"{models.available()}")
        fields = models.MODELS[family].Hparams.model_fields
        fixed = cfg.model.hparams if family == cfg.model.name else {}
        try:
            models.build(family, schema, **fixed)
        except (ValueError, TypeError) as e:
            raise ConfigError(f"search.models.{family}: cannot build on this data: {e}") from None
        for dim in dims:
            try:
                models.build(family, with_embedding_dim(schema, dim), **fixed)
            except (ValueError, TypeError) as e:
                raise ConfigError(f"search.space.schema.embedding_dim: value {dim!r} is refused "
                                  f"by {family}: {e}") from None
        for hparam, domain in space.items():
            if hparam not in fields:
                raise ConfigError(f"search.models.{family}.{hparam}: {family} has no such "
                                  f"hparam; its hparams are {sorted(fields)}")
            for value in domain.edges():
                try:
                    models.build(family, schema, **{**fixed, hparam: value})
                except (ValueError, TypeError) as e:
                    raise ConfigError(f"search.models.{family}.{hparam}: value {value!r} is "
                                      f"refused: {e}") from None
    scheduler(cfg, with_metric=cfg.search.searcher == "optuna")
    loggers(cfg)
    return schema


def check_data_space(cfg: TuneConfig, schema: Schema) -> list[int]:
    """Check the searched data settings; return the embedding dims to build every family with."""
    for key, domain in cfg.search.space.items():
        if key not in DATA_SPACE:
            continue
        if "://" in cfg.data.path:
            raise ConfigError(f"search.space.{key}: a trial writes its view of the data next to "
                              f"the search; data.path must be a local folder, not {cfg.data.path!r}")
        for value in domain.edges():
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ConfigError(f"search.space.{key}: value {value!r} is refused: a whole "
                                  "number above 0 (use choice or randint)")
        if key == "data.max_history_length" and not schema.sequence_features:
            raise ConfigError(f"search.space.{key}: the data has no sequence feature to cut; "
                              f"its features: {[f.name for f in schema.features]}")
    dims = cfg.search.space.get("schema.embedding_dim")
    return dims.edges() if dims is not None else []


def with_embedding_dim(schema: Schema, dim: int) -> Schema:
    """The schema with every id feature's embedding_dim set to `dim` (shared tables stay equal)."""
    data = schema.model_dump()
    for feature in data["features"]:
        if feature["kind"] != "dense":
            feature["embedding_dim"] = dim
    return Schema.model_validate(data)


def with_max_length(schema: Schema, keep: int) -> Schema:
    """The schema with every sequence feature marked as cut to its newest `keep` values."""
    data = schema.model_dump()
    for feature in data["features"]:
        if feature["kind"] == "sequence":
            feature["max_length"] = keep
    return Schema.model_validate(data)


def newest_items(column: pa.ChunkedArray | pa.Array, keep: int) -> pa.Array:
    """Each list cut to its last `keep` values (histories are stored oldest first).

    pyarrow's list_slice takes one start for all rows; the newest N need a start per row.
    """
    import pyarrow.compute as pc

    lists = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    lengths = pc.list_value_length(lists).fill_null(0).to_numpy(zero_copy_only=False)
    values = lists.flatten()  # respects slicing, unlike .values
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
    kept = np.minimum(lengths, keep)
    offsets = np.concatenate([[0], np.cumsum(kept)]).astype(np.int64)
    within = np.arange(offsets[-1]) - np.repeat(offsets[:-1], kept)
    taken = values.take(pa.array(np.repeat(starts + lengths - kept, kept) + within))
    return pa.ListArray.from_arrays(pa.array(offsets, pa.int32()), taken, type=lists.type)


def data_view(src: str, root: Path, embedding_dim: int | None,
              max_history_length: int | None) -> str:
    """The data folder a trial with these data settings trains on, made once per setting."""
    import tempfile

    import pyarrow.parquet as pq

    from recray.data import SPLITS

    parts = [f"dim{embedding_dim}" if embedding_dim else "",
             f"history{max_history_length}" if max_history_length else ""]
    folder = root / "-".join(p for p in parts if p)
    if (folder / "schema.yaml").is_file():
        return str(folder)
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=root))
    schema = Schema.load(f"{src}/schema.yaml")
    view = with_embedding_dim(schema, embedding_dim) if embedding_dim else schema
    (with_max_length(view, max_history_length) if max_history_length else view).save(tmp)
    for split in SPLITS:
        source = Path(src) / f"{split}.parquet"
        if max_history_length:
            table = pq.read_table(source)
            for feature in schema.sequence_features:
                index = table.schema.get_field_index(feature.name)
                table = table.set_column(index, table.field(index),
                                         newest_items(table.column(index), max_history_length))
            pq.write_table(table, tmp / f"{split}.parquet")
        else:
            (tmp / f"{split}.parquet").symlink_to(source.resolve())
    try:
        tmp.rename(folder)
    except OSError:  # a concurrent trial made the same view first
        shutil.rmtree(tmp)
    return str(folder)


def _first_line(error: Exception) -> str:
    return str(error).splitlines()[-1].strip() if str(error) else type(error).__name__


def scheduler(cfg: TuneConfig, with_metric: bool = False) -> Any:
    """The Tune scheduler the config names, ranking on valid AUC per epoch.

    `with_metric`: the scheduler takes metric and mode itself (a multi-objective searcher
    leaves Tune's TuneConfig without them).
    """
    from ray.tune.schedulers import SCHEDULER_IMPORT

    name = SCHEDULER_ALIASES.get(cfg.search.scheduler.name, cfg.search.scheduler.name)
    if name not in SCHEDULER_IMPORT:
        raise ConfigError(f"search.scheduler.name: {cfg.search.scheduler.name!r} is not a Tune "
                          f"scheduler; names: {['asha', *SCHEDULER_IMPORT]}")
    cls = SCHEDULER_IMPORT[name]
    cls = cls() if inspect.isfunction(cls) else cls  # pb2 is imported lazily by a function
    accepted = set(inspect.signature(cls).parameters) - set(SCHEDULER_OWN_OPTIONS)
    options = cfg.search.scheduler.options
    unknown = sorted(set(options) - accepted)
    if unknown:
        raise ConfigError(f"search.scheduler.options: {unknown} are not options of {name} (or "
                          f"are set by the search); its options: {sorted(accepted)}")
    # metric and mode go to Tune's TuneConfig, which refuses a scheduler that has them too.
    own = {"time_attr": "epochs_done", "max_t": cfg.train.epochs}
    if with_metric:
        own |= {"metric": METRIC, "mode": "max"}
    own = {k: v for k, v in own.items() if k in inspect.signature(cls).parameters}
    try:
        return cls(**own, **options)
    except (AssertionError, TypeError, ValueError) as e:
        raise ConfigError(f"search.scheduler.options: {name} refuses {options} with "
                          f"train.epochs={cfg.train.epochs}: {e or 'invalid value'}") from None


def loggers(cfg: TuneConfig) -> list[Any]:
    """Ray Tune's logger callbacks the config switches on."""
    out = []
    for name in cfg.search.loggers:
        try:
            if name == "tensorboard":
                from ray.tune.logger import TBXLoggerCallback

                out.append(TBXLoggerCallback())
            else:
                from ray.air.integrations.mlflow import MLflowLoggerCallback

                out.append(MLflowLoggerCallback(experiment_name=cfg.name))
        except ImportError as e:
            raise ConfigError(f"search.loggers: {name!r} needs a package that is not "
                              f"installed: {e}") from None
    return out


# --- one trial -------------------------------------------------------------------------------------
def trial_config(base: TrainConfig, params: dict[str, Any]) -> TrainConfig:
    """The train config of one trial: the base with its family, hparams and train values."""
    family = params["family"]
    data = base.model_dump(mode="json")
    fixed = base.model.hparams if family == base.model.name else {}
    data["model"] = {"name": family,
                     "hparams": {**fixed, **params.get("hparams", {}).get(family, {})}}
    data["train"] = {**data["train"], **params.get("train", {})}
    return TrainConfig.model_validate(data)


def param_space(cfg: TuneConfig) -> dict[str, Any]:
    """Tune's param_space: families as a grid (optuna: a choice); every family's hparams
    sampled, its own used; the train settings; the data settings (`data_view`)."""
    names = families(cfg)
    space = {
        "family": tune.choice(names) if cfg.search.searcher == "optuna" else tune.grid_search(names),
        "train": {key.split(".", 1)[1]: d.to_tune() for key, d in cfg.search.space.items()
                  if key not in DATA_SPACE},
        "data": {key.split(".", 1)[1]: d.to_tune() for key, d in cfg.search.space.items()
                 if key in DATA_SPACE},
        "hparams": {family: {name: d.to_tune() for name, d in domains.items()}
                    for family, domains in cfg.search.models.items() if domains},
    }
    return {key: value for key, value in space.items() if value != {}}


def planned_trials(cfg: TuneConfig) -> int:
    """How many trials the search runs: num_samples per family, times every grid's points."""
    domains = [*cfg.search.space.values(),
               *(d for space in cfg.search.models.values() for d in space.values())]
    return cfg.search.num_samples * len(families(cfg)) * math.prod(
        len(d.grid) for d in domains if d.kind == "grid")


def search_algorithm(cfg: TuneConfig) -> Any:
    """Tune's searcher the config names, seeded with the config's seed.

    Tune limits the concurrency of a `Searcher` it is given (ConcurrencyLimiter), but not of a
    variant generator: that one takes max_concurrent itself.
    """
    if cfg.search.searcher == "optuna":
        import warnings

        import optuna
        from ray.tune.search.optuna import OptunaSearch

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        # List choices (MLP widths) could not go to a database; this study stays in memory.
        warnings.filterwarnings("ignore", message="Choices for a categorical distribution")
        return OptunaSearch(metric=[METRIC, "p99_ms"], mode=["max", "min"], seed=cfg.seed)
    from ray.tune.search.basic_variant import BasicVariantGenerator

    return BasicVariantGenerator(random_state=cfg.seed,
                                 max_concurrent=cfg.search.max_concurrent_trials)


def request_rows(data_path: str, candidates: int) -> pa.Table:
    """`candidates` rows of the valid split (repeated when it has fewer): one request's items."""
    import pyarrow.dataset as ds

    table = ds.dataset(f"{data_path.rstrip('/')}/valid.parquet", format="parquet").head(candidates)
    return table.take(np.arange(candidates) % table.num_rows)


def serving_latency_ms(model: torch.nn.Module, schema: Schema, rows: pa.Table,
                       latency: LatencySection) -> tuple[float, float]:
    """(p50, p99) ms of what a `recray serve` replica does per request, on 1 CPU thread.

    The request is JSON, one user (the first row's user features) and the rows as candidates;
    timed from the JSON body to the probabilities: pydantic parse, request -> Arrow rows ->
    `to_batch` -> forward. A model's compute does not depend on its weights' values, so the
    untrained model of an architecture serves as fast as its trained one.
    """
    from recray.data.jagged import to_batch
    from recray.platform.serve import ServeConfig, Variant, request_model, user_side
    from recray.platform.serve import request_rows as rows_of_request

    serve_cfg = ServeConfig(variants=[Variant(name="default", run_dir=".")])  # serve's defaults
    user_names = {f.name for f in user_side(schema, serve_cfg)}
    records = rows.select([f.name for f in schema.features]).to_pylist()
    body = json.dumps({
        "user": {name: records[0][name] for name in user_names},
        "candidates": [{k: v for k, v in r.items() if k not in user_names} for r in records],
    }).encode()
    RankRequest = request_model(schema, serve_cfg)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    model.eval()
    seconds = []
    try:
        for step in range(latency.warmup + latency.repeats):
            started = time.perf_counter()
            request = RankRequest.model_validate_json(body)
            batch = to_batch(rows_of_request(request, schema), schema, source="request")
            with torch.inference_mode():
                torch.sigmoid(model(batch))
            if step >= latency.warmup:
                seconds.append(time.perf_counter() - started)
    finally:
        torch.set_num_threads(threads)
    p50, p99 = np.percentile(np.array(seconds) * 1e3, [50, 99])
    return float(p50), float(p99)


def _scalars(metrics: dict[str, Any]) -> dict[str, Any]:
    """A Train report without its per-step loss curve (Tune keeps every result)."""
    return {k: v for k, v in metrics.items() if not isinstance(v, list | dict)}


class EpochsToTune(TuneReportCallback):
    """Ray Train -> Tune: every epoch but the last, with the trial's extras (latency, family).

    The trial reports the last epoch itself once fit() has written its run folder: a scheduler
    stops a trial at max_t, and must not stop it before the folder exists.
    """

    def __init__(self, extras: dict[str, Any], last_epoch: int) -> None:
        super().__init__()
        self.extras, self.last_epoch = extras, last_epoch

    def after_report(self, run_context, metrics, checkpoint):
        epoch = metrics[0]["epoch"]
        # An early-stopped run's last report (it carries epochs_run) comes before train.epochs:
        # it is the last one too, and the trial reports it itself once the run folder exists.
        if epoch < self.last_epoch and "epochs_run" not in metrics[0]:
            forwarded = _scalars(metrics[0]) | self.extras | {"epochs_done": epoch + 1}
            super().after_report(run_context, [forwarded], None)


def run_trial(params: dict[str, Any], base: dict[str, Any], schema: dict[str, Any],
              latency: dict[str, Any], trial_runs: str, views: str) -> None:
    """Tune's function trainable: latency of the architecture, then a real TorchTrainer run."""
    from recray import models
    from recray.platform.train import fit

    cfg = trial_config(TrainConfig.model_validate(base), params)
    trial_id = tune.get_context().get_trial_id()
    cfg.name, cfg.storage_path = f"{cfg.name}-{trial_id}", trial_runs
    schema_obj = Schema.model_validate(schema)
    data = params.get("data", {})
    if data:
        cfg.data.path = data_view(cfg.data.path, Path(views), data.get("embedding_dim"),
                                  data.get("max_history_length"))
        schema_obj = Schema.load(f"{cfg.data.path}/schema.yaml")
    torch.manual_seed(cfg.seed)
    model = models.build(cfg.model.name, schema_obj, **cfg.model.hparams)
    latency_cfg = LatencySection.model_validate(latency)
    p50, p99 = serving_latency_ms(model, schema_obj, request_rows(cfg.data.path,
                                  latency_cfg.candidates), latency_cfg)
    extras = {"family": cfg.model.name, "p50_ms": p50, "p99_ms": p99,
              "parameters": sum(p.numel() for p in model.parameters())}
    for earlier in reversed(earlier_runs(trial_runs, cfg.name)):  # newest first
        if (earlier / "metrics.json").is_file():
            # Trained to the end before the driver died, but Tune never heard: report it.
            metrics = json.loads((earlier / "metrics.json").read_text())
            tune.report(_scalars(metrics) | extras | {"epochs_done": cfg.train.epochs,
                                                      "run_dir": str(earlier)})
            return
        if resumable(earlier, cfg.train.epochs):
            cfg.resume = str(earlier)  # train.fit continues the run from its last checkpoint
            break
    result = fit(cfg, callbacks=[EpochsToTune(extras, cfg.train.epochs - 1)])
    tune.report(_scalars(result["metrics"]) | extras | {
        "epochs_done": cfg.train.epochs, "run_dir": result["run_dir"]})


def earlier_runs(trial_runs: str, name: str) -> list[Path]:
    """The run folders earlier attempts of this trial left (`<name>-<stamp>`), oldest first.

    Why not Tune's own trial checkpoints: every epoch's Train checkpoint is already in the
    trial's run folder, and `train.fit`'s `resume` continues a run from it; reporting it to
    Tune as well would store each checkpoint twice. Tuner.restore(resume_unfinished=True)
    starts an unfinished trial again under its old id, so its folder is found by name.
    """
    return sorted((p for p in Path(trial_runs).glob(f"{name}-*") if p.is_dir()),
                  key=lambda p: p.stat().st_mtime)


def resumable(run_dir: Path, epochs: int) -> bool:
    """Whether the run has a checkpoint that leaves epochs to train (else it starts again); a run
    that stopped early has none left."""
    from recray.platform.train import latest_checkpoint

    latest = latest_checkpoint(run_dir)
    if latest is None or latest[0] >= epochs - 1:
        return False
    return not json.loads((latest[1] / "epoch.json").read_text()).get("stopped_early", False)


# --- the front ---------------------------------------------------------------------------------------
def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the (auc, latency) points no other point beats on both, fastest first.

    A point is dominated when another has AUC >= and latency <=, one of them strictly.
    """
    order = sorted(range(len(points)), key=lambda i: (points[i][1], -points[i][0]))
    front, best_auc = [], -math.inf
    for i in order:
        if points[i][0] > best_auc:
            front.append(i)
            best_auc = points[i][0]
    return front


def pick_best(trials: list[dict[str, Any]], max_latency_ms: float | None) -> dict[str, Any]:
    """The finished trial with the best valid AUC within the latency budget (ties: faster)."""
    finished = [t for t in trials if t["status"] == "finished"]
    if not finished:
        raise ConfigError("search: no trial finished (see trials.csv for the failed and stopped "
                          "ones); nothing to export")
    within = [t for t in finished if max_latency_ms is None or t["p99_ms"] <= max_latency_ms]
    if not within:
        fastest = min(finished, key=lambda t: t["p99_ms"])
        raise ConfigError(
            f"--max-latency-ms: no finished trial serves within {max_latency_ms:g} ms at p99; the "
            f"fastest is trial {fastest['trial']} ({fastest['family']}) at "
            f"{fastest['p99_ms']:.3f} ms; raise the budget or search smaller models")
    return max(within, key=lambda t: (t["valid_auc"], -t["p99_ms"]))


# --- the driver ----------------------------------------------------------------------------------
def tune_folder(cfg: TuneConfig, resume: str | None) -> tuple[Path, bool]:
    """(folder, restoring): a new `<name>-<timestamp>` folder, or the one `resume` names.

    `resume: latest` is the newest tune folder of this config's name under storage_path.
    """
    root = Path(cfg.storage_path)
    if resume is None:
        return new_run_folder(root, cfg.name), False
    if resume == "latest":
        candidates = sorted((p for p in root.glob(f"{cfg.name}-*") if (p / EXPERIMENT).is_dir()),
                            key=lambda p: p.stat().st_mtime)
        if not candidates:
            raise ConfigError(f"--resume: no tune folder of {cfg.name!r} under {root}")
        folder = candidates[-1]
    else:
        given = Path(resume).expanduser()
        folder = given.resolve() if len(given.parts) > 1 else root / resume
    if not tune.Tuner.can_restore(str(folder / EXPERIMENT)):
        raise ConfigError(f"--resume: {folder} holds no Tune experiment to restore "
                          f"(no {EXPERIMENT}/ with Tune's state)")
    return folder, True


def start_ray() -> None:
    """Join the cluster of a submitted job (RAY_ADDRESS), or start a Ray of this search's own.

    Workers' output (Ray Data progress) stays in Ray's logs: one line per trial here.

    Why the dashboard port is chosen here: a trial that Tune stops dies with its Ray Train
    controller, whose worker placement group outlives both (placement groups live as long as
    the job). Ray Train's detached PlacementGroupCleaner removes it, once Ray's state API says
    the controller is dead. The cleaner finds the state API by auto-detecting "the" Ray on the
    host; with two (another user's, a test's) that raises ConnectionError, the cleaner's thread
    dies, and every stopped trial keeps its workers' CPUs until the search ends: on 2 CPUs the
    next trial's Ray Data reads then wait forever. Naming the dashboard in every worker's
    environment (RAY_API_SERVER_ADDRESS) lets the cleaner reach its own cluster.
    """
    import ray

    if "RAY_ADDRESS" in os.environ:
        ray.init(address=os.environ["RAY_ADDRESS"], log_to_driver=False)
        return
    port = _free_port()
    # include_dashboard stays Ray's default: a dashboard slow to start on a loaded machine is
    # then no error (the cleaner waits for it), where include_dashboard=True fails ray.init.
    context = init_local_ray(
        log_to_driver=False, dashboard_port=port,
        runtime_env={"env_vars": {"RAY_API_SERVER_ADDRESS": f"http://127.0.0.1:{port}"}})
    if not (context.dashboard_url or "").endswith(f":{port}"):
        print(f"warning: Ray's dashboard is at {context.dashboard_url!r}, not port {port}: trials "
              "that the scheduler stops may keep their CPUs until the search ends",
              file=sys.stderr)


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def placement_groups_held() -> set[str]:
    """Ids of the placement groups that hold (or wait for) resources now."""
    import ray

    return {pg_id for pg_id, pg in ray.util.placement_group_table().items()
            if pg["state"] not in ("REMOVED",)}


def placement_groups_left(before: set[str], remove: bool, wait_s: float = 30.0) -> int:
    """After the search: how many placement groups its trials made are still held once Ray
    Train's cleaner had `wait_s` to remove them (0 when every stopped trial's workers were
    released). `remove`: remove them (only in a Ray of the search's own: in a shared cluster
    a new placement group may be another job's)."""
    import ray
    from ray.util.placement_group import PlacementGroup

    deadline = time.monotonic() + wait_s
    while (left := placement_groups_held() - before) and time.monotonic() < deadline:
        time.sleep(1)
    if remove:
        for pg_id in left:
            ray.util.remove_placement_group(PlacementGroup(ray.PlacementGroupID.from_hex(pg_id)))
    return len(left)


class TrialLines(tune.Callback):
    """One line per finished, stopped or failed trial, instead of Tune's pages of tables.

    The stream is the class's: Tune pickles its callbacks with the experiment and a restored
    search gets the unpickled ones, which could not carry a terminal stream.
    """

    out: TextIO | None = None

    def on_trial_complete(self, iteration, trials, trial, **info):
        r = trial.last_result or {}
        done = r.get("epochs_done", 0)
        state = "finished" if "run_dir" in r else f"stopped after epoch {done}"
        print(f"trial {trial.trial_id} {r.get('family', '?'):<8} {state:<22} "
              f"valid_auc {r.get(METRIC, float('nan')):.4f}  "
              f"p99 {r.get('p99_ms', float('nan')):.2f} ms", file=self.out or sys.stdout,
              flush=True)

    def on_trial_error(self, iteration, trials, trial, **info):
        print(f"trial {trial.trial_id} {trial.config.get('family', '?'):<8} failed "
              "(its error is in trials.csv)", file=self.out or sys.stdout, flush=True)


def collect(grid: Any) -> list[dict[str, Any]]:
    """One row per trial: status, family, metrics of its last epoch, latency, its values."""
    trials = []
    for result in grid:
        config = result.config or {}
        family = config.get("family")
        frame = result.metrics_dataframe
        final = {}
        if frame is not None and len(frame):
            rows = frame.to_dict("records")
            final = max(rows, key=lambda r: (r.get("epochs_done", 0),
                                             isinstance(r.get("run_dir"), str)))
        final = final or (result.metrics or {})
        status = ("failed" if result.error else
                  "finished" if isinstance(final.get("run_dir"), str) else "stopped")
        trials.append({
            "trial": final.get("trial_id") or _trial_id(result.path),
            "status": status,
            "family": family,
            "epochs_done": int(final.get("epochs_done", 0) or 0),
            # The epoch whose checkpoint a resumed trial continued from (-1: trained from scratch).
            "resumed_from_epoch": _whole(final.get("resumed_from_epoch"), -1),
            "valid_auc": _number(final.get(METRIC)),
            "test_auc": _number(final.get("test_auc")),
            "p50_ms": _number(final.get("p50_ms")),
            "p99_ms": _number(final.get("p99_ms")),
            "run_dir": final.get("run_dir") if status == "finished" else None,
            "error": _first_line(result.error) if result.error else None,
            "params": {"train": config.get("train", {}),
                       "hparams": config.get("hparams", {}).get(family, {}),
                       "data": config.get("data", {})},
        })
    return sorted(trials, key=lambda t: t["trial"])


def _trial_id(path: str | None) -> str:
    """A trial's id from its folder name `<trainable>_<id>_<index>_<values>`."""
    found = re.search(r"_([0-9a-f]{5}_\d{5})", Path(path or "").name)
    return found.group(1) if found else "?"


def _whole(value: Any, default: int) -> int:
    number = _number(value)
    return int(number) if math.isfinite(number) else default


def _number(value: Any) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return float("nan")


def write_reports(folder: Path, trials: list[dict[str, Any]], front: list[int],
                  best: dict[str, Any] | None) -> str:
    """trials.csv, pareto.csv, pareto.png in the folder; returns the terminal table."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = ["trial", "status", "family", "epochs_done", "resumed_from_epoch", "valid_auc",
               "test_auc", "p50_ms", "p99_ms", "params", "error"]
    finished = [t for t in trials if t["status"] == "finished"]
    front_rows = [finished[i] for i in front]
    for name, rows in (("trials.csv", trials), ("pareto.csv", front_rows)):
        with open(folder / name, "w", newline="") as f:
            writer = csv.DictWriter(f, columns, extrasaction="ignore")
            writer.writeheader()
            for t in rows:
                writer.writerow(t | {"params": json.dumps(t["params"])})

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for family in sorted({t["family"] for t in trials if t["family"]}):
        mine = [t for t in trials if t["family"] == family and math.isfinite(t["valid_auc"])]
        done = [t for t in mine if t["status"] == "finished"]
        stopped = [t for t in mine if t["status"] != "finished"]
        dots = ax.scatter([t["p99_ms"] for t in done], [t["valid_auc"] for t in done],
                          label=family)
        ax.scatter([t["p99_ms"] for t in stopped], [t["valid_auc"] for t in stopped],
                   facecolors="none", edgecolors=dots.get_facecolor())
    ax.step([t["p99_ms"] for t in front_rows], [t["valid_auc"] for t in front_rows],
            where="post", color="black", linewidth=1, label="Pareto front")
    if best is not None:
        ax.scatter([best["p99_ms"]], [best["valid_auc"]], marker="*", s=250, color="gold",
                   edgecolors="black", zorder=3, label="chosen")
    ax.set_xlabel("p99 serving latency, 100-candidate request, 1 thread (ms)")
    ax.set_ylabel("validation AUC (hollow: stopped early)")
    ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(folder / "pareto.png", dpi=120)
    plt.close(fig)

    head = f"{'trial':<12} {'family':<8} {'valid AUC':>9} {'test AUC':>9} {'p50 ms':>8} {'p99 ms':>8}  values"
    lines = ["Pareto front (valid AUC vs p99 latency):", head, "-" * len(head)]
    for t in front_rows:
        mark = " *" if best is not None and t["trial"] == best["trial"] else ""
        values = {k: v for part in t["params"].values() for k, v in part.items()}
        lines.append(f"{t['trial']:<12} {t['family']:<8} {t['valid_auc']:>9.4f} "
                     f"{t['test_auc']:>9.4f} {t['p50_ms']:>8.2f} {t['p99_ms']:>8.2f}  "
                     f"{json.dumps(values)}{mark}")
    return "\n".join(lines)


def export_best(folder: Path, best: dict[str, Any], cfg: TuneConfig) -> Path:
    """best/train.yaml (reruns with `recray train`) and best/model/ (`recray serve` loads it)."""
    run_dir = Path(best["run_dir"])
    out = folder / "best"
    if out.exists():
        shutil.rmtree(out)
    (out / "model").mkdir(parents=True)
    for name in ("config.yaml", "schema.yaml", "metrics.json"):
        shutil.copy2(run_dir / name, out / "model" / name)
    shutil.copytree(run_dir / "model", out / "model" / "model")
    train = yaml.safe_load((run_dir / "config.yaml").read_text())
    train |= {"name": f"{cfg.name}-best", "storage_path": cfg.storage_path, "resume": None}
    (out / "train.yaml").write_text(
        f"# trial {best['trial']} of {folder.name}: valid AUC {best['valid_auc']:.4f}, "
        f"p99 {best['p99_ms']:.2f} ms\n" + yaml.safe_dump(train, sort_keys=False))
    return out


def tune_search(cfg: TuneConfig, resume: str | None = None,
                log_to: Callable[[Path], AbstractContextManager[TextIO]] | None = None
                ) -> dict[str, Any]:
    """Validate, run (or restore) the search, write the front and export the best trial.

    `log_to(path)`: a context that sends the process's output (Ray's, Tune's) to the file at
    `path` in the tune folder and yields the terminal for the search's own progress lines (the
    CLI passes `recray.jobs.output_to_file`); without it everything prints as it comes.
    """
    schema = validate_search(cfg)
    folder, restoring = tune_folder(cfg, resume)
    if restoring:  # the search as it started: its paths and space, whatever CONFIG says now
        saved = parse(TuneConfig, yaml.safe_load((folder / "search.yaml").read_text()),
                      str(folder / "search.yaml"))
        if cfg.search.max_latency_ms is not None:
            saved.search.max_latency_ms = cfg.search.max_latency_ms
        cfg = saved
    else:
        (folder / "search.yaml").write_text(
            yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
    with log_to(folder / "ray.log") if log_to else nullcontext(sys.stdout) as out:
        summary = _search(cfg, schema, folder, restoring, out)
    return _export(cfg, folder, summary)


def _search(cfg: TuneConfig, schema: Schema, folder: Path, restoring: bool,
            out: TextIO) -> dict[str, Any]:
    import ray

    TrialLines.out = out
    own_ray = not ray.is_initialized()
    if own_ray:
        start_ray()
    cpus = ray.cluster_resources().get("CPU", 0)
    # Ray Data's read tasks take a whole CPU: the trials' actors and workers must leave one.
    per_trial = cfg.scaling.num_workers * cfg.scaling.cpus_per_worker + TRIAL_CPU
    needed = cfg.search.max_concurrent_trials * per_trial
    if needed > cpus - 1 and not cfg.scaling.allow_autoscale:
        raise ConfigError(
            f"search.max_concurrent_trials: {cfg.search.max_concurrent_trials} trials x "
            f"({cfg.scaling.num_workers} workers x {cfg.scaling.cpus_per_worker:g} CPU + "
            f"{TRIAL_CPU:g} for the trial) need {needed:g} CPUs and Ray Data 1 more; the "
            f"cluster has {cpus:g}: lower max_concurrent_trials or scaling.cpus_per_worker")
    trainable = tune.with_resources(
        tune.with_parameters(run_trial, base=cfg.base().model_dump(mode="json"),
                             schema=schema.model_dump(), latency=cfg.search.latency.model_dump(),
                             trial_runs=str(folder / "trials"), views=str(folder / "data")),
        # The trial only waits on its TorchTrainer, whose workers hold the CPUs (Tune refuses 0).
        {"CPU": TRIAL_CPU},
    )
    started = time.perf_counter()
    if restoring:
        print(f"resuming {folder}: finished trials are kept, unfinished ones continue from their "
              "last checkpoint", file=out, flush=True)
        tuner = tune.Tuner.restore(str(folder / EXPERIMENT), trainable, resume_unfinished=True,
                                   restart_errored=False)
    else:
        print(f"searching {planned_trials(cfg)} trials ({len(families(cfg))} families, "
              f"{cfg.search.searcher} searcher, {cfg.search.scheduler.name}) -> {folder} (Ray's "
              f"logs: {folder / 'ray.log'})", file=out, flush=True)
        optuna = cfg.search.searcher == "optuna"
        tuner = tune.Tuner(
            trainable,
            param_space=param_space(cfg),
            tune_config=tune.TuneConfig(
                # A multi-objective searcher holds the metrics; the scheduler gets valid AUC.
                metric=None if optuna else METRIC, mode=None if optuna else "max",
                search_alg=search_algorithm(cfg), scheduler=scheduler(cfg, with_metric=optuna),
                # num_samples is per family: a grid over families multiplies it, a choice not.
                num_samples=cfg.search.num_samples * (len(families(cfg)) if optuna else 1),
                max_concurrent_trials=cfg.search.max_concurrent_trials),
            run_config=tune.RunConfig(
                name=EXPERIMENT, storage_path=str(folder), verbose=0,
                callbacks=[TrialLines(), *loggers(cfg)]),
        )
    held_before = placement_groups_held()
    grid = tuner.fit()
    seconds = time.perf_counter() - started
    left = placement_groups_left(held_before, remove=own_ray)
    if left:
        print(f"warning: {left} placement group(s) of stopped trials were still held after the "
              "search" + (" (removed now)" if own_ray else ""), file=out, flush=True)
    trials = collect(grid)
    finished = [t for t in trials if t["status"] == "finished"]
    front = pareto_front([(t["valid_auc"], t["p99_ms"]) for t in finished])
    summary = {
        "folder": str(folder),
        "trials": len(trials),
        "finished": len(finished),
        "stopped_early": sum(t["status"] == "stopped" for t in trials),
        "failed": sum(t["status"] == "failed" for t in trials),
        "seconds": seconds,
        "placement_groups_left": left,
        "pareto": [{"trial": finished[i]["trial"], "family": finished[i]["family"],
                    "valid_auc": finished[i]["valid_auc"], "p99_ms": finished[i]["p99_ms"]}
                   for i in front],
        "trial_rows": trials,
    }
    return summary


def _export(cfg: TuneConfig, folder: Path, summary: dict[str, Any]) -> dict[str, Any]:
    """Reports of the search and the chosen trial's export (a budget none meets: ConfigError)."""
    out = sys.stdout
    trials = summary["trial_rows"]
    finished = [t for t in trials if t["status"] == "finished"]
    front = pareto_front([(t["valid_auc"], t["p99_ms"]) for t in finished])
    try:
        best = pick_best(trials, cfg.search.max_latency_ms)
    except ConfigError:
        print(write_reports(folder, trials, front, None), file=out, flush=True)
        (folder / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
        raise
    print(write_reports(folder, trials, front, best), file=out, flush=True)
    summary["best"] = {k: best[k] for k in ("trial", "family", "valid_auc", "test_auc", "p50_ms",
                                             "p99_ms", "params")}
    summary["best"]["exported"] = str(export_best(folder, best, cfg))
    (folder / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    print(f"best: trial {best['trial']} ({best['family']}) valid AUC {best['valid_auc']:.4f}, "
          f"p99 {best['p99_ms']:.2f} ms -> {summary['best']['exported']}", file=out, flush=True)
    return summary
