"""Ray Serve ranking endpoint: FastAPI ingress, pydantic requests, A/B variants, batched scoring.

A request is one user and the candidates to rank. It takes the training feature path: JSON ->
pydantic -> Arrow RecordBatch (one row per candidate, user columns repeated) ->
`recray.data.jagged.to_batch` -> model, so online scores equal offline scores on the same rows.
The user's ids are then kept once per request (TorchRec's variable-batch KJT), so the model looks
them up once and broadcasts the vectors to the candidates.
Every variant's model lives in every replica: arms are assigned per user by a salted hash, so each
replica sees every arm anyway, and one deployment saves a handle hop per request.
"""

from __future__ import annotations

import json
import time
from operator import itemgetter
from pathlib import Path
from typing import Annotated, Any, Literal

import numpy as np
import pyarrow as pa
import torch
import yaml
from fastapi import FastAPI, Request, Response
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictInt,
    ValidationError,
    create_model,
    model_validator,
)
from ray import serve
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from recray.abtest.assignment import assign_variant
from recray.data.jagged import Batch, to_batch
from recray.data.schema import Feature, Schema, SchemaError
from recray.platform.config import ConfigError, load_yaml, parse
from recray.platform.run_folder import RunFolder, load_run_folder

VARIANT_HEADER = "x-recray-variant"
SERVE_CONFIG_FILE = "serve_config.yaml"  # written next to the run, for `serve deploy` / `serve run`
INT64 = Annotated[StrictInt, Field(ge=-(2**63), le=2**63 - 1)]
# `ingress: haproxy`: Serve's HAProxy front (least-connections over replicas that serve HTTP
# themselves) instead of its Python proxy actor; measured at 100 candidates, 7 ms of CPU per
# request against 18 ms (replica 12 + proxy actor 6). Ray reads these where it starts, so the
# verb sets them before starting a local Ray.
# Scoring is idempotent, so a request cut off by a dying replica is replayed on another (Ray
# retries only connection failures by default); a replay needs the whole body in HAProxy's buffer.
HAPROXY_ENV = {
    "RAY_SERVE_ENABLE_HA_PROXY": "1",
    "RAY_SERVE_HAPROXY_RETRY_ON": "conn-failure empty-response",
    "RAY_SERVE_HAPROXY_TUNE_BUFSIZE": str(256 * 1024),
}


# --- config (configs/serve.yaml) -----------------------------------------------------------------
class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Limits(_Strict):
    max_candidates: int = Field(default=500, gt=0)
    max_history_length: int = Field(default=1000, gt=0, description="per list-valued feature")
    max_body_bytes: int = Field(default=1_000_000, gt=0, description="larger bodies get 413")


class Variant(_Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    run_dir: str
    share: float = Field(default=1.0, ge=0, description="traffic share, normalised over variants")


class Autoscaling(_Strict):
    """Serve's `autoscaling_config`; the keys are Serve's own (old names would be ignored)."""

    min_replicas: int = Field(default=1, ge=0)
    max_replicas: int = Field(default=2, gt=0)
    initial_replicas: int | None = Field(default=None, ge=0)
    target_ongoing_requests: float = Field(default=16, gt=0)
    upscale_delay_s: float = Field(default=5.0, ge=0)
    downscale_delay_s: float = Field(default=30.0, ge=0)
    look_back_period_s: float | None = Field(default=None, gt=0, description="load averaged "
                                             "over this window; None: Serve's default (30 s)")
    metrics_interval_s: float | None = Field(default=None, gt=0)

    @model_validator(mode="after")
    def _ordered(self) -> Autoscaling:
        if self.min_replicas > self.max_replicas:
            raise ValueError(f"autoscaling.min_replicas: {self.min_replicas} is above "
                             f"max_replicas={self.max_replicas}")
        return self


class Batching(_Strict):
    max_batch_size: int = Field(default=16, gt=0, description="requests scored in one forward")
    batch_wait_timeout_s: float = Field(default=0.002, ge=0)


class ServeConfig(_Strict):
    app_name: str = "recray"
    host: str = Field(default="127.0.0.1", description="another address is an explicit choice")
    ingress: Literal["proxy", "haproxy"] = Field(
        default="proxy", description="Serve's Python proxy, or HAProxy in front of replicas that "
        "serve HTTP themselves (faster; Ray then binds the replicas' ports on all interfaces)")
    port: int = Field(default=8000, gt=0, lt=65536)
    route_prefix: str = "/"
    variants: list[Variant] = Field(
        default_factory=list, description="empty: the run folder given on the command line alone"
    )
    salt: str = Field(default="recray-ab", description="arm = hash(salt, unit id); change it to "
                      "re-randomise users")
    unit_feature: str = Field(default="user_id", description="the user feature hashed for arms")
    user_features: list[str] | None = Field(
        default=None, description="request-level features; default: sequence features and "
        "features named user*")
    rank_by: dict[str, float] = Field(default_factory=dict, description="task -> weight of its "
                                      "probability in the ranking score; default: the first task")
    limits: Limits = Field(default_factory=Limits)
    batching: Batching = Field(default_factory=Batching)
    num_replicas: int | None = Field(default=None, gt=0, description="fixed; None = autoscaling")
    autoscaling: Autoscaling = Field(default_factory=Autoscaling)
    max_ongoing_requests: int = Field(default=64, gt=0, description="per replica; must exceed "
                                      "max_batch_size or batches cannot form")
    cpus_per_replica: float = Field(default=1.0, gt=0)
    torch_threads: int = Field(default=1, gt=0)

    @model_validator(mode="after")
    def _consistent(self) -> ServeConfig:
        if self.max_ongoing_requests < self.batching.max_batch_size:
            raise ValueError(f"max_ongoing_requests: {self.max_ongoing_requests} is below "
                             f"batching.max_batch_size={self.batching.max_batch_size}, so no "
                             "batch could fill")
        names = [v.name for v in self.variants]
        if len(set(names)) != len(names):
            raise ValueError(f"variants: duplicate names in {names}")
        if self.variants and sum(v.share for v in self.variants) <= 0:
            raise ValueError("variants: the shares sum to 0")
        return self

    def deployment_options(self) -> dict[str, Any]:
        """Serve deployment options: replicas or autoscaling, concurrency, CPUs."""
        options: dict[str, Any] = {
            "max_ongoing_requests": self.max_ongoing_requests,
            "ray_actor_options": {"num_cpus": self.cpus_per_replica},
        }
        if self.num_replicas is not None:
            options["num_replicas"] = self.num_replicas
        else:
            options["autoscaling_config"] = self.autoscaling.model_dump(exclude_none=True)
        return options


def load_serve_config(path: str | Path | None, run_dir: str | Path | None = None,
                      **overrides: Any) -> ServeConfig:
    """The serve config from YAML (defaults without a file); `run_dir` is the default variant."""
    data = load_yaml(path) if path else {}
    data.update({k: v for k, v in overrides.items() if v is not None})
    cfg = parse(ServeConfig, data, str(path or "serve config"))
    if not cfg.variants:
        if run_dir is None:
            raise ConfigError(f"{path or 'serve config'}: variants: none given and no run folder")
        cfg.variants = [Variant(name="default", run_dir=str(run_dir))]
    for variant in cfg.variants:
        variant.run_dir = str(Path(variant.run_dir).expanduser().resolve())
    return cfg


# --- arms ----------------------------------------------------------------------------------------
# --- requests ------------------------------------------------------------------------------------
def user_side(schema: Schema, cfg: ServeConfig) -> list[Feature]:
    """Features given once per request; the rest come with each candidate."""
    if cfg.user_features is None:
        return [f for f in schema.features if f.kind == "sequence" or f.name.startswith("user")]
    names = [f.name for f in schema.features]
    unknown = [n for n in cfg.user_features if n not in names]
    if unknown:
        raise ConfigError(f"user_features: {unknown} are not features; features are {names}")
    return [schema.feature(n) for n in cfg.user_features]


def check_against_schema(cfg: ServeConfig, schema: Schema) -> None:
    """Config fields that name features or tasks must name real ones (ConfigError otherwise)."""
    user_names = [f.name for f in user_side(schema, cfg)]
    if len(cfg.variants) > 1 and cfg.unit_feature not in user_names:
        raise ConfigError(f"unit_feature: {cfg.unit_feature!r} is not a user-side feature, so "
                          f"arms could not be assigned by user; user-side features: {user_names}")
    unknown = sorted(set(cfg.rank_by) - set(schema.tasks))
    if unknown:
        raise ConfigError(f"rank_by: {unknown} are not tasks of the model; tasks: {schema.tasks}")


def _field_type(feature: Feature, limits: Limits) -> Any:
    if feature.kind == "dense":
        return Annotated[float, Field(allow_inf_nan=False, strict=True)]
    ids = Annotated[list[INT64], Field(max_length=limits.max_history_length)]
    return ids if feature.kind == "sequence" else INT64 | ids


def request_model(schema: Schema, cfg: ServeConfig) -> type[BaseModel]:
    """The pydantic model of a /v1/rank body: `user`, `candidates` (1..max), optional `variant`."""
    strict = ConfigDict(extra="forbid")
    user_names = {f.name for f in user_side(schema, cfg)}
    user = create_model(
        "User", __config__=strict,
        **{f.name: (_field_type(f, cfg.limits), ...) for f in schema.features if f.name in user_names},
    )
    candidate = create_model(
        "Candidate", __config__=strict,
        **{f.name: (_field_type(f, cfg.limits), ...) for f in schema.features
           if f.name not in user_names},
    )
    variant_names = tuple(v.name for v in cfg.variants)
    return create_model(
        "RankRequest", __config__=strict,
        user=(user, ...),
        candidates=(list[candidate], Field(min_length=1, max_length=cfg.limits.max_candidates)),
        variant=(Literal[variant_names] | None, Field(  # type: ignore[valid-type]
            default=None, description="the arm to score with; default: hash of the unit id")),
    )


def _id_column(values: tuple[Any, ...], max_length: int | None = None) -> pa.Array:
    """Ids per row -> int64 when every row has one id, else list<int64> (a single id = a list of
    one; a list cut to its newest `max_length`); to_batch reads both as the same jagged rows."""
    if all(type(v) is int for v in values):
        return pa.array(np.fromiter(values, np.int64, len(values)))
    lists = [(v[-max_length:] if max_length else v) if isinstance(v, list) else [v]
             for v in values]
    lengths = np.fromiter((len(v) for v in lists), np.int32, len(lists))
    offsets = np.zeros(len(lists) + 1, np.int32)
    np.cumsum(lengths, out=offsets[1:])
    flat = np.fromiter((i for v in lists for i in v), np.int64, int(offsets[-1]))
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(flat))


def request_rows(request: BaseModel, schema: Schema) -> pa.RecordBatch:
    """One row per candidate, in schema column order; user values repeated; labels zero."""
    user = request.user.__dict__
    rows = len(request.candidates)
    # Candidates -> columns in one pass: a tuple per candidate, transposed by zip.
    names = [f.name for f in schema.features if f.name not in user]
    candidate_rows = []
    if names:
        pick = itemgetter(*names)
        candidate_rows = [pick(c.__dict__) for c in request.candidates]
        if len(names) == 1:  # itemgetter of one name gives the value, not a 1-tuple
            candidate_rows = [(value,) for value in candidate_rows]
    by_name = dict(zip(names, zip(*candidate_rows, strict=True), strict=True))
    columns = {}
    for f in schema.features:
        if f.name in user:
            value = user[f.name]
            if f.kind == "dense":
                columns[f.name] = pa.array(np.full(rows, value, np.float32))
            else:
                ids = np.asarray(value if isinstance(value, list) else [value], np.int64)
                if f.max_length:  # trained on the newest max_length values (oldest first)
                    ids = ids[-f.max_length:]
                offsets = np.arange(rows + 1, dtype=np.int32) * len(ids)
                columns[f.name] = pa.ListArray.from_arrays(pa.array(offsets),
                                                           pa.array(np.tile(ids, rows)))
        elif f.kind == "dense":
            columns[f.name] = pa.array(np.array(by_name[f.name], np.float32))
        else:
            columns[f.name] = _id_column(by_name[f.name], f.max_length)
    for label in schema.labels:  # to_batch wants labels; a request has none
        columns[label] = pa.array(np.zeros(rows, np.float32))
    return pa.RecordBatch.from_pydict(columns)


def share_user_rows(batch: Batch, user_keys: set[str], request_rows: list[int]) -> Batch:
    """`batch` (rows grouped by request, user ids alike within a request) with the user keys cut
    to one row per request, in TorchRec's variable-batch KJT: `inverse_indices` broadcast that row
    to the request's candidates, so an embedding module looks a user's ids up once."""
    keys, rows = batch.sparse.keys(), len(batch)
    sizes = torch.tensor(request_rows)
    owner = torch.repeat_interleave(torch.arange(len(request_rows)), sizes)
    is_user = torch.tensor([key in user_keys for key in keys])[:, None]
    first_row = torch.zeros(rows, dtype=torch.bool)
    first_row[sizes.cumsum(0) - sizes] = True
    # [keys, rows] kept: every row of an item key, a request's first row of a user key; the
    # KJT's lengths are key-major, so one mask over them and one over the ids cut all keys at once
    kept = (~is_user | first_row).flatten()
    lengths = batch.sparse.lengths()
    sparse = KeyedJaggedTensor(
        keys=keys,
        values=batch.sparse.values()[torch.repeat_interleave(kept, lengths.long())],
        lengths=lengths[kept],
        stride_per_key_per_rank=[[len(request_rows)] if key in user_keys else [rows]
                                 for key in keys],
        inverse_indices=(keys, torch.where(is_user, owner, torch.arange(rows))),
    )
    return Batch(batch.dense, sparse, batch.labels)


def requests_batch(tables: list[pa.RecordBatch], schema: Schema,
                   user_keys: set[str] | None) -> Batch:
    """Requests' rows -> one Batch by the training path; the user ids once per request when
    `user_keys` names them (None: every row looks up its own)."""
    batch = to_batch(pa.Table.from_batches(tables), schema, source="request")
    if not user_keys:
        return batch
    return share_user_rows(batch, user_keys, [t.num_rows for t in tables])


def probe_rows(schema: Schema, user_names: set[str], requests: int = 3,
               candidates: int = 4, seed: int = 0) -> list[pa.RecordBatch]:
    """Random in-vocabulary requests (user columns alike within each) for `shares_user_lookups`."""
    rng = np.random.default_rng(seed)

    def draw(feature: Feature, rows: int) -> pa.Array:
        if feature.kind == "dense":
            return pa.array(rng.normal(size=rows).astype(np.float32))
        lengths = rng.integers(0, 5, rows) if feature.kind == "sequence" else np.ones(rows, int)
        offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
        ids = rng.integers(0, feature.num_embeddings, int(offsets[-1]))
        return pa.ListArray.from_arrays(pa.array(offsets), pa.array(ids))

    tables = []
    for _ in range(requests):
        columns = {}
        for f in schema.features:
            column = draw(f, 1 if f.name in user_names else candidates)
            columns[f.name] = column.take(np.zeros(candidates, np.int64)) \
                if f.name in user_names else column
        for label in schema.labels:
            columns[label] = pa.array(np.zeros(candidates, np.float32))
        tables.append(pa.RecordBatch.from_pydict(columns))
    return tables


def shares_user_lookups(model: torch.nn.Module, schema: Schema, user_keys: set[str]) -> bool:
    """Whether `model` scores a variable-batch KJT exactly as the expanded rows.

    A model that reads its ids only through `recray.models.layers.FeatureEmbedding` does; one that
    reads `batch.sparse` itself may not (MDL's scenario ids), and is served with expanded rows.
    """
    if not user_keys:
        return False
    tables = probe_rows(schema, {f.name for f in schema.features if f.name in user_keys})
    with torch.inference_mode():
        expanded = model(requests_batch(tables, schema, None))
        try:
            shared = model(requests_batch(tables, schema, user_keys))
        except Exception:  # noqa: BLE001 -- any failure means: serve this model expanded
            return False
    return shared.shape == expanded.shape and torch.allclose(shared, expanded, rtol=0, atol=1e-6)


class RequestError(ValueError):
    """A request that passed the pydantic model but not the schema (an id out of vocabulary)."""


# --- the deployment ------------------------------------------------------------------------------
@serve.deployment
@serve.ingress()
class Ranker:
    """One replica: every variant's model, a batched scorer, and the FastAPI app built on them."""

    def __init__(self, config: dict[str, Any]) -> None:
        from ray.serve import metrics

        self.cfg = ServeConfig.model_validate(config)
        torch.set_num_threads(self.cfg.torch_threads)
        self.runs: dict[str, RunFolder] = {v.name: load_run_folder(v.run_dir)
                                           for v in self.cfg.variants}
        self.schema = check_same_schema(self.runs)
        check_against_schema(self.cfg, self.schema)
        self.tasks = self.schema.tasks
        user_keys = {f.name for f in user_side(self.schema, self.cfg) if f.is_id}
        # Per variant: the user ids looked up once per request, where the model allows it.
        self.user_keys = {name: user_keys if shares_user_lookups(run.model, self.schema, user_keys)
                          else None for name, run in self.runs.items()}
        weights = self.cfg.rank_by or {self.tasks[0]: 1.0}
        self.rank_weights = torch.tensor([weights.get(t, 0.0) for t in self.tasks])
        self.RankRequest = request_model(self.schema, self.cfg)
        self._score.set_max_batch_size(self.cfg.batching.max_batch_size)
        self._score.set_batch_wait_timeout_s(self.cfg.batching.batch_wait_timeout_s)
        # Per-variant series on the Ray dashboard, beside Serve's own per-deployment metrics.
        self.requests_metric = metrics.Counter(
            "recray_rank_requests", description="rank requests by variant and status",
            tag_keys=("variant", "status"))
        self.latency_metric = metrics.Histogram(
            "recray_rank_latency_ms", description="rank request latency inside the replica",
            boundaries=[1, 2, 5, 10, 20, 50, 100, 200, 500, 1000], tag_keys=("variant",))
        self.batch_metric = metrics.Histogram(
            "recray_rank_batch_requests", description="requests scored per forward",
            boundaries=[1, 2, 4, 8, 16, 32, 64], tag_keys=("variant",))

    def __serve_build_asgi_app__(self):
        return build_app(self)

    def pick_variant(self, request: BaseModel, header: str | None) -> str:
        if header is not None:
            if header not in self.runs:
                raise RequestError(f"header {VARIANT_HEADER}: unknown variant {header!r}; "
                                   f"variants are {sorted(self.runs)}")
            return header
        if request.variant is not None:
            return request.variant
        unit = getattr(request.user, self.cfg.unit_feature, None)
        return assign_variant(unit, self.cfg.salt, [v.name for v in self.cfg.variants],
                              [v.share for v in self.cfg.variants])

    @serve.batch
    async def _score(self, jobs: list[tuple[str, pa.RecordBatch]]) -> list[Any]:
        """Score the queued requests: one forward per variant over all their rows."""
        results: list[Any] = [None] * len(jobs)
        by_variant: dict[str, list[int]] = {}
        for i, (variant, _) in enumerate(jobs):
            by_variant.setdefault(variant, []).append(i)
        for variant, members in by_variant.items():
            user_keys = self.user_keys[variant]
            try:
                batch = requests_batch([jobs[i][1] for i in members], self.schema, user_keys)
            except SchemaError:  # one bad request must not fail the others: convert one by one
                good = []
                for i in members:
                    try:
                        to_batch(jobs[i][1], self.schema, source="request")
                        good.append(i)
                    except SchemaError as e:
                        results[i] = RequestError(str(e).removeprefix("request: "))
                members = good
                if not members:
                    continue
                batch = requests_batch([jobs[i][1] for i in members], self.schema, user_keys)
            with torch.inference_mode():
                probabilities = torch.sigmoid(self.runs[variant].model(batch))
            self.batch_metric.observe(len(members), tags={"variant": variant})
            start = 0
            for i in members:
                rows = jobs[i][1].num_rows
                results[i] = (probabilities[start:start + rows], len(members))
                start += rows
        return results

    async def rank(self, request: BaseModel, header: str | None) -> dict[str, Any]:
        started = time.perf_counter()
        variant = self.pick_variant(request, header)
        result = await self._score((variant, request_rows(request, self.schema)))
        if isinstance(result, Exception):
            self.requests_metric.inc(tags={"variant": variant, "status": "4xx"})
            raise result
        probabilities, batch_requests = result
        order = torch.argsort(probabilities @ self.rank_weights, descending=True, stable=True)
        self.requests_metric.inc(tags={"variant": variant, "status": "ok"})
        self.latency_metric.observe((time.perf_counter() - started) * 1e3, tags={"variant": variant})
        return {
            "variant": variant,
            "model": self.runs[variant].config.model.name,
            "scores": dict(zip(self.tasks, probabilities.T.tolist(), strict=True)),
            "ranking": order.tolist(),
            "batch_requests": batch_requests,
        }

    def models(self) -> dict[str, Any]:
        total = sum(v.share for v in self.cfg.variants)
        return {"tasks": self.tasks, "rank_by": self.rank_weights.tolist(), "variants": [
            {"name": v.name, "share": v.share / total, "run_dir": v.run_dir,
             "model": self.runs[v.name].config.model.name,
             "hparams": self.runs[v.name].config.model.hparams,
             "metrics": self.runs[v.name].metrics,
             "user_lookup_once_per_request": self.user_keys[v.name] is not None}
            for v in self.cfg.variants
        ]}


def check_same_schema(runs: dict[str, RunFolder]) -> Schema:
    """Variants answer the same request, so they must read the same features."""
    (first_name, first), *others = runs.items()
    for name, run in others:
        if run.schema != first.schema:
            raise ConfigError(f"variants: {name!r} ({run.path}) has another schema than "
                              f"{first_name!r} ({first.path}); variants must share one schema")
    return first.schema


class BodyLimit:
    """ASGI middleware: a body over `max_bytes` gets 413 before anything parses it."""

    def __init__(self, app: Any, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = next((v for k, v in scope["headers"] if k == b"content-length"), None)
        if declared is not None:
            if not declared.isdigit() or int(declared) > self.max_bytes:
                return await self._too_large(scope, send, declared.decode(errors="replace"))
            return await self.app(scope, receive, send)
        # No length declared (chunked): read it all here, within the limit, then replay it.
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            more = message.get("more_body", False)
            if size > self.max_bytes:
                return await self._too_large(scope, send, f"over {size}")
        body = b"".join(chunks)

        async def replay() -> dict:
            nonlocal body
            message, body = {"type": "http.request", "body": body, "more_body": False}, b""
            return message

        return await self.app(scope, replay, send)

    async def _too_large(self, scope: dict, send: Any, size: str) -> None:
        response = JSONResponse(status_code=413, content={"detail": [{
            "loc": ["body"], "type": "body_too_large",
            "msg": f"body of {size} bytes is over limits.max_body_bytes={self.max_bytes}"}]})
        await response(scope, None, send)


def build_app(ranker: Ranker) -> FastAPI:
    """The FastAPI app of one replica: /v1/rank, /v1/models, /healthz, /openapi.json, /docs."""
    def _invalid(errors: list[dict[str, Any]]) -> JSONResponse:
        return JSONResponse(status_code=422, content={"detail": errors})

    app = FastAPI(title="recray ranking", version="1")
    app.add_middleware(BodyLimit, max_bytes=ranker.cfg.limits.max_body_bytes)

    RankRequest = ranker.RankRequest

    # The body is parsed and validated in one step by pydantic-core (json.loads and then
    # validating the objects costs twice as much), and the answer is encoded once by json.dumps.
    @app.post("/v1/rank", openapi_extra={
        "requestBody": {"required": True, "content": {"application/json": {
            "schema": {"$ref": "#/components/schemas/RankRequest"}}}},
        "parameters": [{"name": VARIANT_HEADER, "in": "header", "required": False,
                        "description": "the arm to score with", "schema": {"type": "string"}}],
    })
    async def rank(http: Request) -> Response:
        try:
            request = RankRequest.model_validate_json(await http.body())
        except ValidationError as e:
            # named by field; never echoing the input (a NaN cannot even be encoded as JSON)
            return _invalid([{"loc": ["body", *problem["loc"]], "msg": problem["msg"],
                              "type": problem["type"]} for problem in e.errors()])
        try:
            answer = await ranker.rank(request, http.headers.get(VARIANT_HEADER))
        except RequestError as e:
            where = ["header", VARIANT_HEADER] if str(e).startswith("header") else ["body"]
            return _invalid([{"loc": where, "msg": str(e), "type": "value_error"}])
        return Response(json.dumps(answer), media_type="application/json")

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            spec = get_openapi(title=app.title, version=app.version, routes=app.routes)
            body = RankRequest.model_json_schema(ref_template="#/components/schemas/{model}")
            schemas = spec.setdefault("components", {}).setdefault("schemas", {})
            schemas.update(body.pop("$defs", {}))
            schemas["RankRequest"] = body
            app.openapi_schema = spec
        return app.openapi_schema

    app.openapi = openapi

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return ranker.models()

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    return app


# --- applications: from Python, from the CLI, from Serve's own CLI --------------------------------
def application(cfg: ServeConfig) -> Any:
    """The bound Serve application for a config (variants loaded by each replica)."""
    if not cfg.variants:
        raise ConfigError("variants: none given; name at least one run folder")
    for variant in cfg.variants:
        if not Path(variant.run_dir).is_dir():
            raise ConfigError(f"variants.{variant.name}.run_dir: not found: {variant.run_dir}")
    return Ranker.options(**cfg.deployment_options()).bind(cfg.model_dump(mode="json"))


def app_builder(args: dict[str, Any]) -> Any:
    """Serve's application builder for `serve run` / `serve deploy`: args = {config: {...}}."""
    return application(parse(ServeConfig, args.get("config", {}), "args.config"))


def serve_config_file(cfg: ServeConfig) -> dict[str, Any]:
    """The Serve config file (`serve deploy FILE` / `serve run FILE`) that deploys this app."""
    deployment = {"name": Ranker.name, **cfg.deployment_options()}
    return {
        "proxy_location": "HeadOnly",
        "http_options": {"host": cfg.host, "port": cfg.port},
        "applications": [{
            "name": cfg.app_name,
            "route_prefix": cfg.route_prefix,
            "import_path": "recray.platform.serve:app_builder",
            "args": {"config": cfg.model_dump(mode="json")},
            "deployments": [deployment],
        }],
    }


def write_serve_config_file(cfg: ServeConfig, folder: str | Path) -> Path:
    path = Path(folder) / SERVE_CONFIG_FILE
    path.write_text(yaml.safe_dump(serve_config_file(cfg), sort_keys=False))
    return path


def deploy(cfg: ServeConfig) -> str:
    """Start Serve on the connected Ray (HTTP on cfg.host:cfg.port) and run the app; its URL."""
    serve.start(http_options={"host": cfg.host, "port": cfg.port})
    serve.run(application(cfg), name=cfg.app_name, route_prefix=cfg.route_prefix)
    return f"http://{cfg.host}:{cfg.port}{cfg.route_prefix.rstrip('/')}"
