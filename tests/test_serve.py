"""Serving: run folders round-trip, arms split by hash, and a real Serve app on loopback that scores
a request exactly as the model does offline, refuses bad requests by name and stays up."""

from __future__ import annotations

import importlib
import json
import math
import socket
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import torch
import yaml

from recray import models
from recray.data.jagged import to_batch
from recray.data.schema import Schema
from recray.data.simulate import WorldConfig, simulate
from recray.platform.config import ConfigError, TrainConfig
from recray.platform.run_folder import load_run_folder, write_run_folder
from recray.platform.serve import (
    SERVE_CONFIG_FILE,
    assign_variant,
    load_serve_config,
    serve_config_file,
    write_serve_config_file,
)

WORLD = WorldConfig(num_users=1000, num_items=100, num_impressions=6000, seed=7)
USER_SIDE = ("user_id", "user_segment", "history")
ITEM_SIDE = ("item_id", "item_tags", "position")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("sim")
    simulate(out, WORLD)
    return out


def trained_run(data_dir, run_dir, name: str, seed: int) -> torch.nn.Module:
    """A run folder as `fit()` leaves it: seeded weights stand in for trained ones."""
    schema = Schema.load(data_dir)
    torch.manual_seed(seed)
    model = models.build(name, schema)
    cfg = TrainConfig.model_validate({"data": {"path": str(data_dir)}, "model": {"name": name}})
    write_run_folder(run_dir, cfg, schema, model.state_dict(), {"test_auc": 0.5 + seed / 100})
    return model.eval()


def offline_rows(data_dir, user: int | None = None):
    """All train rows of one user (the first user with at least 5 rows by default)."""
    table = pq.read_table(data_dir / "train.parquet")
    if user is None:
        counts = pc.value_counts(table.column("user_id"))
        user = next(c["values"].as_py() for c in counts if c["counts"].as_py() >= 5)
    return table.filter(pc.equal(table.column("user_id"), user))


def body_for(rows) -> dict:
    first = rows.slice(0, 1).to_pylist()[0]
    return {"user": {k: first[k] for k in USER_SIDE},
            "candidates": [{k: r[k] for k in ITEM_SIDE} for r in rows.to_pylist()]}


# --- run folders ---------------------------------------------------------------------------------
def test_run_folder_round_trip_scores_like_the_saved_model(data_dir, tmp_path):
    model = trained_run(data_dir, tmp_path / "run", "dcnv2", seed=1)
    run = load_run_folder(tmp_path / "run")
    # plain tensors only: torch's own weights-only unpickler reads the file
    state = torch.load(tmp_path / "run" / "model" / "weights.pt", weights_only=True)
    assert all(type(v) is torch.Tensor for v in state.values())
    assert run.config.model.name == "dcnv2" and run.metrics == {"test_auc": 0.51}
    batch = to_batch(offline_rows(data_dir), run.schema)
    with torch.inference_mode():
        assert torch.equal(run.model(batch), model(batch))


def test_run_folder_refuses_pickled_objects_and_foreign_weights(data_dir, tmp_path):
    trained_run(data_dir, tmp_path / "run", "dcnv2", seed=1)
    weights = tmp_path / "run" / "model" / "weights.pt"
    saved = torch.load(weights, weights_only=True)
    torch.save({"model": ConfigError("not a tensor")}, weights)  # needs unpickling of a class
    with pytest.raises(ConfigError, match="weights.pt: not a weights-only state dict"):
        load_run_folder(tmp_path / "run")
    torch.save({"cross.layers.0.weight": saved["cross.layers.0.weight"]}, weights)
    with pytest.raises(ConfigError, match=r"do not fit .* missing \['cross.layers.0.bias'"):
        load_run_folder(tmp_path / "run")
    torch.save({**saved, "cross.layers.0.weight": torch.zeros(2, 2)}, weights)
    with pytest.raises(ConfigError, match="size mismatch for cross.layers.0.weight"):
        load_run_folder(tmp_path / "run")


def test_dcp_shards_of_a_wrapped_model_load_without_a_process_group(data_dir, tmp_path):
    import torch.distributed.checkpoint as dcp

    model = trained_run(data_dir, tmp_path / "run", "din", seed=2)
    (tmp_path / "run" / "model" / "weights.pt").unlink()
    # Names as a DMP inside a {"model", "optimizer"} train state writes them.
    saved = {f"model._dmp_wrapped_module.{k}": v for k, v in model.state_dict().items()}
    saved["optimizer.state.0.step"] = torch.tensor(3.0)
    dcp.save(saved, checkpoint_id=str(tmp_path / "run" / "model" / "dcp"), no_dist=True)
    run = load_run_folder(tmp_path / "run")
    for name, value in model.state_dict().items():
        assert torch.equal(run.model.state_dict()[name], value), name


def _sharded_rank(rank: int, data_dir, run_dir, port: int) -> None:
    """One of 2 gloo ranks: a column-wise sharded DCN-v2 (TorchRec DMP) takes one SGD step on a
    user's rows, scores them (a collective forward), and every rank saves its shards by DCP."""
    import os

    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp

    from recray.platform.sharding import build_for_sharding, shard

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    torch.set_num_threads(1)
    schema = Schema.load(data_dir)
    model, optimizer, _ = shard(
        build_for_sharding("dcnv2", schema, {}, seed=0), default_type="column_wise",
        table_types={}, embedding_optimizer="sgd", embedding_lr=0.5,
        dense_optimizer=lambda params: torch.optim.SGD(params, lr=0.5),
        device=torch.device("cpu"))
    batch = to_batch(offline_rows(data_dir), schema)
    loss = torch.nn.functional.binary_cross_entropy_with_logits(model(batch), batch.labels)
    loss.backward()
    optimizer.step()
    with torch.no_grad():  # fbgemm's sharded lookup has no inference-mode kernel
        scores = torch.sigmoid(model(batch))
    if rank == 0:
        torch.save(scores, run_dir / "sharded_scores.pt")
    dcp.save({"model": model.state_dict()}, checkpoint_id=str(run_dir / "model" / "dcp"))
    dist.destroy_process_group()


@pytest.mark.ray
def test_a_run_sharded_over_two_ranks_serves_from_its_dcp_shards_with_the_same_scores(
        data_dir, tmp_path):
    import torch.multiprocessing as mp

    from recray.platform.serve import ServeConfig, request_model, request_rows, requests_batch

    run_dir = tmp_path / "run"
    trained_run(data_dir, run_dir, "dcnv2", seed=9)  # config and schema; weights replaced:
    (run_dir / "model" / "weights.pt").unlink()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.start_processes(_sharded_rank, args=(data_dir, run_dir, port), nprocs=2,
                       start_method="spawn")
    sharded = torch.load(run_dir / "sharded_scores.pt", weights_only=True)
    run = load_run_folder(run_dir)  # one process, no process group: DCP reshards
    schema = run.schema
    cfg = ServeConfig(variants=[{"name": "default", "run_dir": str(run_dir)}])
    body = request_model(schema, cfg).model_validate(body_for(offline_rows(data_dir)))
    with torch.inference_mode():
        offline = torch.sigmoid(run.model(to_batch(offline_rows(data_dir), schema)))
        online = torch.sigmoid(run.model(requests_batch(
            [request_rows(body, schema)], schema, {"user_id", "user_segment", "history"})))
    torch.testing.assert_close(offline, sharded, rtol=0, atol=1e-6)
    torch.testing.assert_close(online, sharded, rtol=0, atol=1e-6)


def test_dcp_metadata_that_would_run_code_is_refused(data_dir, tmp_path):
    import os
    import pickle

    trained_run(data_dir, tmp_path / "run", "lr", seed=0)
    (tmp_path / "run" / "model" / "weights.pt").unlink()
    shards = tmp_path / "run" / "model" / "dcp"
    shards.mkdir()
    witness = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return os.system, (f"touch {witness}",)

    (shards / ".metadata").write_bytes(pickle.dumps(Payload()))
    with pytest.raises(ConfigError, match=r"global posix.system is not allowed"):
        load_run_folder(tmp_path / "run")
    assert not witness.exists()


# --- user features looked up once per request ----------------------------------------------------
def _count_lookups(model: torch.nn.Module) -> dict[int, int]:
    """{id of each FeatureEmbedding: ids its tables looked up}, counted by forward hooks."""
    from recray.models.layers import FeatureEmbedding

    looked_up: dict[int, int] = {}

    def counter(key: int):
        def hook(module, args, kwargs, output):
            looked_up[key] += (args[0] if args else kwargs["input"]).numel()
        return hook

    for embedding in (m for m in model.modules() if isinstance(m, FeatureEmbedding)):
        looked_up[id(embedding)] = 0
        for table in embedding.modules():
            if isinstance(table, (torch.nn.Embedding, torch.nn.EmbeddingBag)):
                table.register_forward_hook(counter(id(embedding)), with_kwargs=True)
    return looked_up


@pytest.mark.parametrize("name", ["dcnv2", "dnn", "deepfm", "din"])
def test_user_ids_are_looked_up_once_per_request_and_scores_stay_the_same(name, data_dir):
    from recray.platform.serve import ServeConfig, request_model, request_rows, requests_batch

    schema = Schema.load(data_dir)
    torch.manual_seed(5)
    model = models.build(name, schema).eval()
    cfg = ServeConfig(variants=[{"name": "default", "run_dir": "."}])
    RankRequest = request_model(schema, cfg)
    users = [offline_rows(data_dir, user) for user in (None, 3, 11)]
    bodies = [RankRequest.model_validate(body_for(rows)) for rows in users]
    looked_up = _count_lookups(model)
    with torch.inference_mode():
        online = torch.sigmoid(model(requests_batch(
            [request_rows(b, schema) for b in bodies], schema, {"user_id", "user_segment",
                                                               "history"})))
    # Independently from the JSON: each request's user ids once, each candidate's own ids.
    user_ids = sum(2 + len(b.user.history) for b in bodies)
    candidate_ids = sum(1 + len(c.item_tags if isinstance(c.item_tags, list) else [c.item_tags])
                        for b in bodies for c in b.candidates)
    assert set(looked_up.values()) == {user_ids + candidate_ids}
    with torch.inference_mode():
        offline = torch.sigmoid(model(to_batch(pa.concat_tables(users), schema)))
    torch.testing.assert_close(online, offline, rtol=0, atol=1e-6)


def test_a_model_that_reads_user_ids_per_row_is_served_with_expanded_rows(data_dir):
    from recray.platform.serve import shares_user_lookups

    class ReadsIdsItself(torch.nn.Module):  # reads batch.sparse directly, not via FeatureEmbedding
        def forward(self, batch):
            return batch.sparse["user_id"].values().float()[:, None]

    schema = Schema.load(data_dir)
    assert not shares_user_lookups(ReadsIdsItself(), schema, {"user_id", "history"})
    assert shares_user_lookups(models.build("din", schema).eval(), schema, {"user_id", "history"})


# --- config and arms -----------------------------------------------------------------------------
def test_arms_follow_configured_shares_and_are_stable():
    names, shares = ["control", "treatment", "holdout"], [0.5, 0.3, 0.2]
    users = range(20_000)
    arms = [assign_variant(u, "s1", names, shares) for u in users]
    for name, share in zip(names, shares, strict=True):
        observed = arms.count(name) / len(arms)
        assert abs(observed - share) < 4 * math.sqrt(share * (1 - share) / len(arms)), name
    assert arms[:100] == [assign_variant(u, "s1", names, shares) for u in range(100)]
    # another salt re-randomises: about 1 - sum(share^2) of users change arm
    moved = np.mean([a != assign_variant(u, "s2", names, shares) for u, a in zip(users, arms, strict=True)])
    assert abs(moved - (1 - sum(s * s for s in shares))) < 0.02


def test_serve_config_is_checked_and_the_written_file_is_valid_for_serves_cli(tmp_path):
    from ray.serve import Application
    from ray.serve.schema import ServeDeploySchema

    bad = tmp_path / "bad.yaml"
    bad.write_text("max_ongoing_requests: 4\nbatching: {max_batch_size: 8}\n")
    with pytest.raises(ConfigError, match="max_ongoing_requests: 4 is below"):
        load_serve_config(bad, tmp_path)
    cfg = load_serve_config("configs/serve.yaml", tmp_path)
    path = write_serve_config_file(cfg, tmp_path)
    assert path == tmp_path / SERVE_CONFIG_FILE
    parsed = ServeDeploySchema.model_validate(yaml.safe_load(path.read_text()))
    app = parsed.applications[0]
    assert app.import_path == "recray.platform.serve:app_builder"
    assert parsed.http_options.host == "127.0.0.1"
    assert app.deployments[0].autoscaling_config["max_replicas"] == 2
    assert serve_config_file(cfg)["applications"][0]["args"]["config"]["variants"][0]["run_dir"] \
        == str(tmp_path.resolve())
    # what `serve run FILE` calls: the builder named by import_path, with the file's args
    module, builder = app.import_path.split(":")
    built = getattr(importlib.import_module(module), builder)(app.args)
    assert isinstance(built, Application)


def test_serve_verb_names_a_missing_run_folder_and_config_fields_the_schema_lacks(
        capsys, data_dir, tmp_path):
    from recray.cli import main

    assert main(["serve", "/nonexistent/run"]) == 2
    assert "run folder not found: /nonexistent/run" in capsys.readouterr().err
    trained_run(data_dir, tmp_path / "run", "lr", seed=0)
    config = tmp_path / "serve.yaml"
    config.write_text("rank_by: {clicks: 1.0}\n")
    assert main(["serve", str(tmp_path / "run"), "--config", str(config)]) == 2
    assert "rank_by: ['clicks'] are not tasks of the model; tasks: ['label']" in \
        capsys.readouterr().err
    config.write_text(yaml.safe_dump({"unit_feature": "item_id", "variants": [
        {"name": "a", "run_dir": str(tmp_path / "run")},
        {"name": "b", "run_dir": str(tmp_path / "run")}]}))
    assert main(["serve", "--config", str(config)]) == 2
    assert "unit_feature: 'item_id' is not a user-side feature" in capsys.readouterr().err


# --- a real Serve app on loopback ----------------------------------------------------------------
@pytest.fixture(scope="module")
def endpoint(ray_local, data_dir, tmp_path_factory):
    """Two arms (DCN-v2 70%, DIN 30%) behind one app on 127.0.0.1; shut down after the module."""
    import requests
    from ray import serve

    from recray.platform.serve import deploy

    runs = tmp_path_factory.mktemp("runs")
    offline = {"dcn": trained_run(data_dir, runs / "dcn", "dcnv2", seed=3),
               "din": trained_run(data_dir, runs / "din", "din", seed=4)}
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    config = runs / "serve.yaml"
    config.write_text(yaml.safe_dump({
        "port": port,
        "variants": [{"name": "dcn", "run_dir": str(runs / "dcn"), "share": 0.7},
                     {"name": "din", "run_dir": str(runs / "din"), "share": 0.3}],
        "limits": {"max_candidates": 50, "max_history_length": 120, "max_body_bytes": 20_000},
        "autoscaling": {"min_replicas": 1, "max_replicas": 3, "target_ongoing_requests": 7,
                        "upscale_delay_s": 2.5, "downscale_delay_s": 40},
        "max_ongoing_requests": 48,
        "cpus_per_replica": 0.5,
    }))
    url = deploy(load_serve_config(config))
    session = requests.Session()
    yield url, session, offline
    serve.shutdown()


@pytest.mark.ray
def test_online_scores_equal_offline_scores_on_the_same_parquet_rows(endpoint, data_dir):
    url, session, offline = endpoint
    schema = Schema.load(data_dir)
    rows = offline_rows(data_dir)
    for variant in ("dcn", "din"):
        answer = session.post(f"{url}/v1/rank", json={**body_for(rows), "variant": variant})
        assert answer.status_code == 200, answer.text
        answer = answer.json()
        with torch.inference_mode():
            expected = torch.sigmoid(offline[variant](to_batch(rows, schema)))[:, 0].tolist()
        assert answer["variant"] == variant
        assert answer["scores"]["label"] == expected  # bit for bit
        assert answer["ranking"] == sorted(range(len(expected)), key=lambda i: -expected[i])
    models_answer = session.get(f"{url}/v1/models").json()
    assert [(v["name"], v["model"], v["share"]) for v in models_answer["variants"]] == \
        [("dcn", "dcnv2", 0.7), ("din", "din", pytest.approx(0.3))]
    assert session.get(f"{url}/healthz").json() == {"status": "ok"}
    spec = session.get(f"{url}/openapi.json").json()
    assert "/v1/rank" in spec["paths"]
    request_schema = spec["components"]["schemas"]["RankRequest"]
    assert request_schema["properties"]["candidates"]["maxItems"] == 50
    assert set(spec["components"]["schemas"]["User"]["required"]) == set(USER_SIDE)


@pytest.mark.ray
def test_bad_requests_get_4xx_naming_the_field_and_the_app_still_answers(endpoint, data_dir):
    url, session, _ = endpoint
    good = body_for(offline_rows(data_dir))

    def changed(edit) -> dict:
        body = json.loads(json.dumps(good))
        edit(body)
        return body

    cases = {
        "item_id": changed(lambda b: b["candidates"][0].update(item_id="5")),  # wrong type
        "history": changed(lambda b: b["user"].pop("history")),  # missing feature
        "candidates": changed(lambda b: b.update(candidates=b["candidates"] * 11)),  # 55 > 50
        "colour": changed(lambda b: b["user"].update(colour=1)),  # unknown feature
        "variant": changed(lambda b: b.update(variant="no-such-arm")),
        "item_tags": changed(lambda b: b["candidates"][1].update(item_tags=[1, 2.5])),
        "user_segment": changed(lambda b: b["user"].update(user_segment=10**6)),  # out of vocab
    }
    for field, body in cases.items():
        answer = session.post(f"{url}/v1/rank", json=body)
        assert answer.status_code == 422, (field, answer.text)
        assert field in answer.text, (field, answer.text)
    long_history = changed(lambda b: b["user"].update(history=[1] * 121))
    answer = session.post(f"{url}/v1/rank", json=long_history)
    assert answer.status_code == 422 and "history" in answer.text
    nan = json.dumps(changed(lambda b: b["candidates"][0].update(position=12345.5)))
    nan = nan.replace("12345.5", "NaN")
    answer = session.post(f"{url}/v1/rank", data=nan, headers={"content-type": "application/json"})
    assert answer.status_code == 422 and "position" in answer.text, answer.text
    answer = session.post(f"{url}/v1/rank", json=good, headers={"X-Recray-Variant": "zzz"})
    assert answer.status_code == 422 and "x-recray-variant" in answer.text
    answer = session.post(f"{url}/v1/rank", data=b"[" * 30_000,
                          headers={"content-type": "application/json"})
    assert answer.status_code == 413 and "max_body_bytes" in answer.text
    chunked = iter([b"[" * 15_000, b"[" * 15_000])  # no Content-Length: counted as it arrives
    answer = session.post(f"{url}/v1/rank", data=chunked,
                          headers={"content-type": "application/json"})
    assert answer.status_code == 413 and "max_body_bytes" in answer.text
    # A bad request queued with good ones fails alone; the app answers throughout.
    out_of_vocab = changed(lambda b: b["candidates"][0].update(item_id=WORLD.num_items))
    bodies = [good] * 7 + [out_of_vocab]
    with ThreadPoolExecutor(8) as pool:
        codes = list(pool.map(lambda b: session.post(f"{url}/v1/rank", json=b).status_code,
                              bodies))
    assert codes == [200] * 7 + [422]
    assert session.post(f"{url}/v1/rank", json=good).status_code == 200


@pytest.mark.ray
def test_requests_fuzzed_from_the_openapi_schema_get_no_5xx_and_the_app_still_answers(endpoint):
    import schemathesis
    from hypothesis import HealthCheck, given, settings
    from schemathesis import GenerationMode
    from schemathesis.checks import not_a_server_error

    url, session, _ = endpoint
    schema = schemathesis.openapi.from_url(f"{url}/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert {(op.method.upper(), op.path) for op in operations} >= {
        ("POST", "/v1/rank"), ("GET", "/v1/models"), ("GET", "/healthz")}
    for operation in operations:
        # invalid inputs exist only where there are inputs: the body of /v1/rank, its header
        modes = [GenerationMode.POSITIVE] + [GenerationMode.NEGATIVE] * (operation.path == "/v1/rank")
        for mode in modes:
            @given(case=operation.as_strategy(generation_mode=mode))
            @settings(max_examples=50, deadline=None, database=None,
                      suppress_health_check=list(HealthCheck))
            def fuzz(case):
                case.call_and_validate(checks=[not_a_server_error])

            fuzz()
    assert session.get(f"{url}/healthz", timeout=10).json() == {"status": "ok"}


@pytest.mark.ray
def test_two_variants_split_users_by_hash_in_the_configured_shares(endpoint, data_dir):
    url, session, _ = endpoint
    good = body_for(offline_rows(data_dir))
    users = range(200)
    arms = []
    for user in users:
        good["user"]["user_id"] = user
        arms.append(session.post(f"{url}/v1/rank", json=good).json()["variant"])
    share = arms.count("dcn") / len(arms)
    assert abs(share - 0.7) < 4 * math.sqrt(0.7 * 0.3 / len(arms)), share
    good["user"]["user_id"] = 17  # the same user keeps the same arm
    assert {session.post(f"{url}/v1/rank", json=good).json()["variant"] for _ in range(5)} == \
        {arms[17]}


@pytest.mark.ray
def test_autoscaling_and_concurrency_config_is_applied(endpoint):
    from ray.serve.context import _get_global_client

    details = _get_global_client().get_serve_details()
    deployment = details["applications"]["recray"]["deployments"]["Ranker"]
    config = deployment["deployment_config"]
    assert config["max_ongoing_requests"] == 48
    scaling = config["autoscaling_config"]
    assert (scaling["min_replicas"], scaling["max_replicas"]) == (1, 3)
    assert scaling["target_ongoing_requests"] == 7
    assert (scaling["upscale_delay_s"], scaling["downscale_delay_s"]) == (2.5, 40)
    assert config["ray_actor_options"]["num_cpus"] == 0.5
    assert details["http_options"]["host"] == "127.0.0.1"


@pytest.mark.ray
def test_the_endpoint_is_reachable_on_loopback_only(endpoint):
    from urllib.parse import urlsplit

    import ray

    url, session, _ = endpoint
    port = urlsplit(url).port
    assert session.get(f"{url}/healthz", timeout=10).status_code == 200
    # every address of this host that is not loopback: nothing answers there
    addresses = {ray.util.get_node_ip_address(), *(info[4][0] for info in socket.getaddrinfo(
        socket.gethostname(), None, socket.AF_INET))} - {"127.0.0.1", "127.0.1.1"}
    if not addresses:
        pytest.skip("this host has no address but loopback")
    for address in addresses:
        with pytest.raises(OSError):
            socket.create_connection((address, port), timeout=5).close()


def test_binding_another_address_is_an_explicit_option(tmp_path):
    assert serve_config_file(load_serve_config(None, tmp_path))["http_options"]["host"] == \
        "127.0.0.1"
    exposed = load_serve_config(None, tmp_path, host="0.0.0.0")
    assert serve_config_file(exposed)["http_options"]["host"] == "0.0.0.0"


@pytest.mark.ray
def test_per_variant_request_counts_reach_rays_metrics_endpoint(endpoint, data_dir):
    import re
    import time

    import ray

    url, session, _ = endpoint
    body = {**body_for(offline_rows(data_dir)), "variant": "din"}
    for _ in range(3):
        assert session.post(f"{url}/v1/rank", json=body).status_code == 200
    node = ray._private.worker.global_worker.node
    metrics_url = f"http://{node.node_ip_address}:{node.metrics_export_port}/metrics"
    deadline, found = time.monotonic() + 90, []
    while time.monotonic() < deadline and not found:  # exported every few seconds
        text = session.get(metrics_url, timeout=10).text
        found = [float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                 if re.match(r"\w*recray_rank_requests", line)
                 and 'variant="din"' in line and 'status="ok"' in line]
        time.sleep(2)
    assert found and max(found) >= 3, text[-2000:]
    assert re.search(r'^\w*recray_rank_latency_ms_bucket\{[^}]*variant="din"', text, re.M)


def test_new_run_folders_started_in_the_same_second_never_share_a_folder(tmp_path, monkeypatch):
    import time as time_module

    from recray.platform.run_folder import new_run_folder

    monkeypatch.setattr(time_module, "strftime", lambda fmt: "20260101-120000")  # one second
    folders = [new_run_folder(tmp_path / "runs", "sim") for _ in range(3)]
    assert [f.name for f in folders] == ["sim-20260101-120000", "sim-20260101-120000-1",
                                         "sim-20260101-120000-2"]
    assert all(f.is_dir() for f in folders)


def test_a_history_capped_in_training_is_cut_to_its_newest_values_at_serving(tmp_path):
    from types import SimpleNamespace

    from recray.platform.serve import request_rows
    from recray.platform.tune import data_view

    simulate(tmp_path / "sim", WorldConfig(num_users=30, num_items=20, num_impressions=300, seed=2))
    view = data_view(str(tmp_path / "sim"), tmp_path / "views", None, 3)
    schema = Schema.load(view)
    assert {f.name: f.max_length for f in schema.sequence_features} == {"history": 3}
    full = pq.read_table(tmp_path / "sim" / "test.parquet").slice(0, 8)
    user = full.slice(0, 1).to_pylist()[0]
    assert len(user["history"]) > 3  # the case that matters: a longer history than trained on
    request = SimpleNamespace(
        user=SimpleNamespace(**{k: user[k] for k in USER_SIDE}),
        candidates=[SimpleNamespace(**{k: v for k, v in row.items() if k not in USER_SIDE})
                    for row in full.to_pylist()])
    served = pa.Table.from_batches([request_rows(request, schema)])
    # independently: the user's history as the view's rows hold it, newest three, oldest first
    assert served.column("history").to_pylist() == [user["history"][-3:]] * full.num_rows
    unchanged = pa.Table.from_batches([request_rows(request, Schema.load(tmp_path / "sim"))])
    assert unchanged.column("history").to_pylist() == [user["history"]] * full.num_rows
