"""The A/B harness: config checks before any shard, assignment shares, 1 vs N shards, the GTE
against a direct run of the gym env, failures recorded, and the verb and Ray fan-out end to end."""

from __future__ import annotations

import json
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import gymnasium as gym
import numpy as np
import pandas as pd
import pytest
import scipy.stats

import recray.simulators as sims
from recray.abtest.config import (
    ExperimentConfigError,
    parse_config,
    validate,
    world_params,
)
from recray.abtest.harness import (
    _POLICY_KEY,
    daily_means,
    make_assignment,
    run_experiment,
    run_world,
    world_key,
)
from recray.abtest.policies import KeyedRng
from recray.simulators.policies import make_policy
from recray.simulators.streams import child_keys

WORLD = {"num_creators": 20, "num_candidates": 10}


def config(**overrides):
    data = {"name": "t", "users": 240, "days": 3, "world": {"params": dict(WORLD)},
            "arms": [{"name": "control", "share": 0.5, "policy": "popularity"},
                     {"name": "treatment", "share": 0.5, "policy": "myopic"}]}
    data.update(overrides)
    return parse_config(data)


# --- bad input, before anything runs -------------------------------------------------------------
def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("change, field", [
    ({"arms": [{"name": "a", "share": 0.5, "policy": "popularity"},
               {"name": "b", "share": 0.6, "policy": "myopic"}]}, "arms[].share"),
    ({"arms": [{"name": "a", "share": 0.5, "policy": "popularity"},
               {"name": "a", "share": 0.5, "policy": "myopic"}]}, "names must be distinct"),
    ({"arms": [{"name": "a", "share": 0.5}, {"name": "b", "share": 0.5, "policy": "myopic"}]},
     "exactly one of policy, model, http"),
    ({"design": "cluster"}, "markets"),
    ({"world": {"params": {"num_users": 5}}}, "world.params.num_users"),
    ({"world": {"env": "recray/Nope-v0"}}, "world.env"),
])
def test_bad_config_is_refused_naming_the_field(change, field):
    with pytest.raises(ExperimentConfigError, match=field.replace("[", r"\[").replace("]", r"\]")):
        config(**change)


@pytest.mark.parametrize("change, field", [
    ({"arms": [{"name": "control", "share": 0.5, "policy": "popularity"},
               {"name": "treatment", "share": 0.5, "policy": "bogus"}]},
     r"arms\[1\]\.policy \(treatment\).*'bogus'"),
    ({"analysis": {"metrics": ["watch_minutes", "happiness"]}}, r"analysis\.metrics.*happiness"),
    ({"arms": [{"name": "control", "share": 1e-6, "policy": "popularity"},
               {"name": "treatment", "share": 1 - 1e-6, "policy": "myopic"}]},
     r"arms\[0\]\.share \(control\).*0 of 240 users"),
    ({"arms": [{"name": "control", "share": 0.5, "policy": "popularity"},
               {"name": "served", "share": 0.5,
                "http": {"url": f"http://127.0.0.1:{_closed_port()}", "variant": "x",
                         "timeout_s": 2}}]},
     r"arms\[1\]\.http\.url \(served\).*unreachable"),
    ({"world": {"params": {**WORLD, "slate_size": 50}}}, r"world\.params: slate_size"),
    ({"arms": [{"name": "control", "share": 0.5, "policy": "popularity"},
               {"name": "m", "share": 0.5, "model": {"run_dir": "/nonexistent"}}]},
     r"arms\[1\]\.model\.run_dir \(m\).*not found"),
])
def test_unrunnable_experiment_is_refused_before_any_shard(change, field):
    with pytest.raises(ExperimentConfigError, match=field):
        validate(config(**change))


def test_verb_refuses_a_bad_config_with_exit_2_and_writes_nothing(tmp_path, capsys):
    import ray

    from recray.cli import main

    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\narms:\n  - {name: a, share: 0.7, policy: popularity}\n"
                   "  - {name: b, share: 0.7, policy: myopic}\n")
    out = tmp_path / "out"
    assert main(["abtest", str(bad), "--out", str(out)]) == 2
    assert "arms[].share" in capsys.readouterr().err
    assert not out.exists() and not any(tmp_path.glob(".out*"))
    assert not ray.is_initialized()


# --- assignment ---------------------------------------------------------------------------------
def test_assignment_follows_the_shares_by_chi_square():
    shares = [0.2, 0.3, 0.5]
    cfg = config(users=30_000, arms=[{"name": n, "share": s, "policy": "random"}
                                     for n, s in zip("abc", shares, strict=True)])
    counts = np.bincount(make_assignment(cfg).user_arm, minlength=3)
    assert scipy.stats.chisquare(counts, np.array(shares) * cfg.users).pvalue > 0.001
    # another salt is another draw, with the same shares
    other = np.bincount(make_assignment(cfg.model_copy(update={"salt": "other"})).user_arm)
    assert not np.array_equal(counts, other)
    assert scipy.stats.chisquare(other, np.array(shares) * cfg.users).pvalue > 0.001


def test_a_user_keeps_its_arm_every_day_including_the_pre_period():
    result = run_world(config(pre_days=1), seed=0)
    assert (result.users.groupby("user")["arm"].nunique() == 1).all()
    assert sorted(result.users["day"].unique()) == [-1, 0, 1, 2]
    assert len(result.users) == 240 * 4


# --- sharding -----------------------------------------------------------------------------------
@pytest.mark.parametrize("overrides", [
    {},
    {"arms": [{"name": "control", "share": 0.5, "policy": "popularity"},
              {"name": "treatment", "share": 0.5, "policy": "exposure_aware"}], "pre_days": 1},
    {"arms": [{"name": "control", "share": 0.5, "policy": "thompson"},
              {"name": "treatment", "share": 0.5, "policy": "random"}]},
    {"design": "creator"},
    {"design": "cluster", "world": {"params": {**WORLD, "markets": 4}}},
    {"world": {"env": sims.LONG_TERM_SATISFACTION}, "days": 4,
     "arms": [{"name": "control", "share": 0.5, "policy": "popularity"},
              {"name": "treatment", "share": 0.5, "policy": "kale"}]},
], ids=["user", "exposure-aware+pre", "thompson", "creator", "cluster", "longterm"])
def test_one_shard_and_three_shards_give_identical_frames(overrides):
    cfg = config(**overrides)
    one, three = run_world(cfg, seed=4, shards=1), run_world(cfg, seed=4, shards=3)
    pd.testing.assert_frame_equal(one.users, three.users)
    pd.testing.assert_frame_equal(one.creators, three.creators)
    assert one.users["clicks"].sum() > 0


# --- the truth: a direct run of the gym env ------------------------------------------------------
def direct_run(cfg, seed: int, policy_name: str) -> pd.DataFrame:
    """Everyone under one policy, driven through the gym vector env's own step loop (not the
    harness's shards and hub), with the same per-user policy randomness."""
    params = world_params(cfg)
    env = gym.make_vec(sims.CREATOR_ECOSYSTEM, num_envs=cfg.users,
                       vectorization_mode="vector_entry_point", **params)
    policy = make_policy(policy_name, sims.CREATOR_ECOSYSTEM, params.get("slate_size", 2))
    keys = child_keys(world_key(seed)[0] ^ _POLICY_KEY, np.arange(cfg.users))
    obs, info = env.reset(seed=seed)
    world = env.unwrapped.world if hasattr(env, "unwrapped") else env.world
    rows = []
    for day in range(cfg.days):
        active = world.active_today.copy()
        clicks, minutes, sessions = (np.zeros(cfg.users) for _ in range(3))
        for _ in range(world.p.sessions_per_day):
            served = obs["active"][:, 0].astype(bool)
            actions = policy.act(obs, KeyedRng(keys, world.counter), None)
            obs, reward, _, _, info = env.step(actions)
            sessions += served
            clicks += reward > 0
            minutes += reward
        rows.append(pd.DataFrame({"user": np.arange(cfg.users), "day": day, "active": active,
                                  "sessions": sessions, "clicks": clicks,
                                  "watch_minutes": minutes}))
    return pd.concat(rows, ignore_index=True)


def test_a_forced_world_matches_the_gym_env_and_the_gte_is_its_difference():
    cfg = config(days=4)
    result = run_experiment(cfg, seed=2)
    direct = {arm: direct_run(cfg, 2, name) for arm, name in
              (("control", "popularity"), ("treatment", "myopic"))}
    forced = run_world(cfg, seed=2, forced=1)
    for column in ("active", "sessions", "clicks"):
        np.testing.assert_array_equal(forced.users[column].to_numpy(),
                                      direct["treatment"][column].to_numpy())
    np.testing.assert_allclose(forced.users["watch_minutes"], direct["treatment"]["watch_minutes"],
                               rtol=1e-12)
    for metric in ("watch_minutes", "clicks", "sessions", "active"):
        truth = direct["treatment"][metric].mean() - direct["control"][metric].mean()
        assert result.gte[metric] == pytest.approx(truth, rel=1e-9, abs=1e-12)
    assert result.gte["watch_minutes"] != 0.0
    assert daily_means(forced)["watch_minutes"] == pytest.approx(
        direct["treatment"]["watch_minutes"].mean())


def test_user_randomised_arms_share_the_creators_but_cluster_arms_do_not():
    shared = run_world(config(days=3), seed=1).creators
    per_arm = shared.pivot(index="day", columns="arm", values="active_creators")
    assert (per_arm["control"] == per_arm["treatment"]).all()
    cluster = run_world(config(days=3, design="cluster",
                               world={"params": {**WORLD, "markets": 4}}), seed=1)
    # a market's users see only that market's creators
    assert set(cluster.users["unit"]) == {0, 1, 2, 3}
    assert (cluster.users.groupby("unit")["arm"].nunique() == 1).all()


# --- an endpoint that fails mid-run --------------------------------------------------------------
class _Flaky(BaseHTTPRequestHandler):
    """A stand-in ranker over HTTP (first candidates first) that fails after `budget` requests."""

    budget = 0

    def log_message(self, *args) -> None:
        pass

    def _json(self, code: int, body: object) -> None:
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:
        if self.path == "/healthz":
            self._json(200, {"status": "ok"})
        elif self.path == "/v1/models":
            self._json(200, {"variants": [{"name": "v1", "run_dir": self.server.run_dir}]})
        else:
            self._json(200, {"components": {"schemas": {
                "User": {"properties": {"user_id": {}, "history": {}}},
                "Candidate": {"properties": {"item_id": {}, "creator_id": {}}}}}})

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        type(self).budget -= 1
        if type(self).budget < 0:
            self._json(500, {"detail": "down"})
        else:
            self._json(200, {"ranking": list(range(len(body["candidates"])))})


def test_an_endpoint_failing_mid_run_is_recorded_with_day_and_users(tmp_path):
    from recray.simulators.logging_policy import LogConfig, schema_for_log, simulate_creator_log

    schema = schema_for_log(simulate_creator_log(LogConfig(num_users=50, days=1, world=WORLD)))
    schema.save(tmp_path / "schema.yaml")
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Flaky)
    server.run_dir = str(tmp_path)
    _Flaky.budget = 10**9
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}"
        cfg = config(users=60, days=3, gte=False,
                     arms=[{"name": "control", "share": 0.5, "policy": "popularity"},
                           {"name": "served", "share": 0.5,
                            "http": {"url": url, "variant": "v1", "concurrency": 2}}])
        validate(cfg)
        with pytest.raises(ExperimentConfigError, match=r"http\.variant.*'v2'.*\['v1'\]"):
            validate(cfg.model_copy(update={"arms": [cfg.arms[0], cfg.arms[1].model_copy(
                update={"http": cfg.arms[1].http.model_copy(update={"variant": "v2"})})]}))
        healthy = run_world(cfg, seed=0)
        assert healthy.failures == []
        served_day0 = healthy.users.query("arm == 'served' and day == 0")["sessions"].sum()
        _Flaky.budget = served_day0  # every day-0 session answered, then the endpoint is down
        result = run_world(cfg, seed=0)
    finally:
        server.shutdown()
    assert [f["day"] for f in result.failures] == [1, 2]
    assert all(f["arm"] == "served" and "500" in f["error"] for f in result.failures)
    for failure in result.failures:
        day = result.users.query(f"arm == 'served' and day == {failure['day']}")
        assert failure["users"] == day["sessions"].sum()  # users affected, summed over rounds
    assert result.users.query("arm == 'served' and day >= 1")["sessions"].sum() > 0


# --- Ray ----------------------------------------------------------------------------------------
@pytest.mark.ray
def test_ray_shards_give_the_in_process_frames_and_run_many_keeps_order(ray_local):
    from recray.platform.abtest import run_many, run_world_on_ray

    cfg = config(arms=[{"name": "control", "share": 0.5, "policy": "popularity"},
                       {"name": "treatment", "share": 0.5, "policy": "exposure_aware"}])
    local = run_world(cfg, seed=3)
    on_ray = run_world_on_ray(cfg, seed=3, shards=2)
    pd.testing.assert_frame_equal(local.users, on_ray.users)
    pd.testing.assert_frame_equal(local.creators, on_ray.creators)
    small = cfg.model_copy(update={"gte": False})
    results = run_many([small, small], seeds=[3, 5])
    assert [r.meta["seed"] for r in results] == [3, 5]
    pd.testing.assert_frame_equal(results[0].users, local.users)


@pytest.mark.ray
def test_verb_writes_frames_report_and_ray_log_under_the_final_name_only(ray_local, tmp_path,
                                                                          capsys):
    from recray.cli import main

    spec = tmp_path / "ab.yaml"
    spec.write_text(json.dumps({
        "name": "small", "users": 200, "pre_days": 1, "days": 3, "shards": 2,
        "world": {"params": WORLD}, "analysis": {"metrics": ["watch_minutes", "ctr"]},
        "arms": [{"name": "control", "share": 0.5, "policy": "popularity"},
                 {"name": "treatment", "share": 0.5, "policy": "exposure_aware"}]}))
    out = tmp_path / "result"
    assert main(["abtest", str(spec), "--out", str(out)]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert sum(line.startswith("day ") for line in printed) == 4
    assert (out / "users.parquet").is_file() and (out / "ray.log").is_file()
    assert (out / "report.html").is_file()
    assert pd.read_parquet(out / "users.parquet")["day"].min() == -1
    summary = json.loads((out / "result.json").read_text())
    assert set(summary["gte"]) >= {"watch_minutes", "active_creators"}
    assert not list(tmp_path.glob(".*partial"))


@pytest.mark.ray
def test_an_http_arm_through_recray_serve_ranks_like_the_same_model_in_process(ray_local,
                                                                              tmp_path):
    """A real `recray serve` app on loopback: the arm that calls /v1/rank serves the same slates
    as a model arm scoring the same run folder in process (one row path, offline = online)."""
    import torch
    from ray import serve

    from recray import models
    from recray.platform.config import TrainConfig
    from recray.platform.run_folder import write_run_folder
    from recray.platform.serve import deploy, load_serve_config
    from recray.simulators.logging_policy import LogConfig, schema_for_log, simulate_creator_log

    schema = schema_for_log(simulate_creator_log(LogConfig(num_users=60, days=1, world=WORLD)))
    schema.save(tmp_path / "schema.yaml")
    torch.manual_seed(0)
    model = models.build("dnn", schema)
    run_dir = tmp_path / "run"
    write_run_folder(run_dir, TrainConfig.model_validate(
        {"data": {"path": str(tmp_path)}, "model": {"name": "dnn"}}), schema,
        model.state_dict(), {})
    port = _closed_port()
    (tmp_path / "serve.yaml").write_text(json.dumps({
        "port": port, "num_replicas": 1, "cpus_per_replica": 0.5,
        "variants": [{"name": "candidate", "run_dir": str(run_dir)}]}))
    url = deploy(load_serve_config(tmp_path / "serve.yaml"))
    try:
        arms = {"http": {"url": url, "variant": "candidate", "concurrency": 4},
                "model": {"run_dir": str(run_dir)}}
        results = {}
        for kind, spec in arms.items():
            cfg = config(users=40, days=2, gte=False, arms=[
                {"name": "control", "share": 0.5, "policy": "popularity"},
                {"name": "candidate", "share": 0.5, kind: spec}])
            validate(cfg)
            results[kind] = run_world(cfg, seed=0)
    finally:
        serve.shutdown()
    assert results["http"].failures == []
    load = results["http"].meta["endpoints"]["candidate"]
    sessions = results["http"].users.query("arm == 'candidate'")["sessions"].sum()
    assert load["scores"] == sessions * WORLD["num_candidates"] and load["scores_per_second"] > 0
    pd.testing.assert_frame_equal(results["http"].users, results["model"].users)
    assert results["http"].users.query("arm == 'candidate'")["clicks"].sum() > 0


def test_clickbait_against_kale_is_ahead_on_day_one_and_behind_later():
    """configs/abtest-longterm.yaml, smaller: the novelty effect the statistics must flag."""
    from recray.abtest.config import load_config

    cfg = load_config("configs/abtest-longterm.yaml").model_copy(update={"users": 1500,
                                                                          "days": 12})
    users = run_world(cfg, seed=0).users
    lift = users[users["day"] >= 0].groupby(["day", "arm"])["watch_minutes"].mean().unstack()
    lift = lift["clickbait"] - lift["kale"]
    assert lift.iloc[0] > 0
    assert lift.iloc[-4:].mean() < 0


def test_a_market_retrieves_only_its_own_creators_items_and_one_market_is_the_old_world():
    from recray.simulators.creator_ecosystem import CreatorEcosystem, CreatorWorld

    world = CreatorWorld(CreatorEcosystem(num_users=200, markets=4, **WORLD), world_key(0))
    users = np.arange(200)
    for _ in range(6):  # two days of rounds, creators' evenings included
        rows = world.candidates(users)
        assert ((world.item_slot[rows] % 4) == (users % 4)[:, None]).all()
        assert (np.sort(rows, axis=1)[:, 1:] != np.sort(rows, axis=1)[:, :-1]).all()
        slates = np.tile(np.arange(2), (len(users), 1))
        active = world.round_users()
        world.end_round(world.serve(active, rows[active], slates[active]))
    one = CreatorWorld(CreatorEcosystem(num_users=50, markets=1, **WORLD), world_key(0))
    default = CreatorWorld(CreatorEcosystem(num_users=50, **WORLD), world_key(0))
    np.testing.assert_array_equal(one.candidates(np.arange(50)), default.candidates(np.arange(50)))
    with pytest.raises(ValueError, match="markets"):
        CreatorEcosystem(num_creators=3, markets=4)
