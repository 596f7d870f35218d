"""Serving under load: plain FastAPI + uvicorn (1 and 2 workers) against recray serve (1 replica,
2 replicas, autoscaling) on the same model and requests, with wrk as the low-CPU load generator.

    python benchmarks/serve_load.py --out benchmarks/results/serve_load.json
    python benchmarks/serve_load.py --size smoke --out /tmp/serve_load.json   # a minute, tiny model
    python benchmarks/serve_load.py --replica-cpu --out benchmarks/results/serve_replica_cpu.json

Model: DCN-v2 over 26 sparse features (13 user-side, 13 candidate-side) of 100,000 x 16 tables
and 13 dense features, 100 candidates per request, one torch thread per process. The baseline
parses, converts and scores with the same recray functions as a replica, without Ray or batching.
Then a load step (low, high, low) on the autoscaling app, sampled in wrk chunks, and a replica
killed under load. Needs `wrk` (Debian: apt-get install wrk). Run it on idle cores.
`--replica-cpu` (no Ray, no wrk) measures instead the CPU a replica spends per request on
conversion and forward, the user's ids looked up per candidate against once per request.
"""

import argparse
import json
import os
import platform
import resource
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Annotated, Any

import numpy as np

SIZES = {
    "full": {"vocab": 100_000, "candidates": 100, "seconds": 8, "concurrency": [1, 8, 32, 64],
             "step": [(4, 14), (48, 44), (4, 40)], "kill_seconds": 15},
    "smoke": {"vocab": 1000, "candidates": 20, "seconds": 2, "concurrency": [1, 8],
              "step": [(2, 6), (32, 12), (2, 16)], "kill_seconds": 8},
}
SPARSE_PER_SIDE, DENSE = 13, 13
BODIES = 32
CHUNK_S = 2  # the load step is measured in wrk runs of this length: a time series of rps and p99

# wrk's Lua: cycle through the request bodies; count the requests each forward scored (the
# replica's `batch_requests`), so mean batch = requests / forwards = n / sum(1 / batch_requests).
LUA = r"""
local bodies, i, threads = {}, 0, {}
seen, inverse = 0, 0.0
function setup(thread) table.insert(threads, thread) end
function init(args)
  for k = 1, tonumber(args[1]) do
    local f = io.open(args[2] .. "/body_" .. (k - 1) .. ".json", "rb")
    bodies[k] = f:read("*a")
    f:close()
  end
  wrk.method = "POST"
  wrk.headers["Content-Type"] = "application/json"
end
function request()
  i = i % #bodies + 1
  return wrk.format(nil, "/v1/rank", nil, bodies[i])
end
function response(status, headers, body)
  local b = body:match('"batch_requests": ?(%d+)')
  if b then seen = seen + 1; inverse = inverse + 1 / tonumber(b) end
end
function done(summary, latency, requests)
  local n, inv = 0, 0.0
  for _, t in ipairs(threads) do n = n + t:get("seen"); inv = inv + t:get("inverse") end
  local e = summary.errors
  io.write(string.format(
    'RESULT {"requests": %d, "duration_s": %f, "non2xx": %d, "socket_errors": %d, ' ..
    '"timeouts": %d, "p50_ms": %f, "p99_ms": %f, "seen": %d, "inverse": %f}\n',
    summary.requests, summary.duration / 1e6, e.status, e.connect + e.read + e.write,
    e.timeout, latency:percentile(50) / 1000, latency:percentile(99) / 1000, n, inv))
end
"""


# --- the model and the requests ------------------------------------------------------------------
def make_run(folder: Path, vocab: int) -> Path:
    import torch

    from recray import models
    from recray.data.schema import Feature, Schema
    from recray.platform.config import TrainConfig
    from recray.platform.run_folder import write_run_folder

    sparse = [f"{side}_s{i}" for side in ("user", "item") for i in range(SPARSE_PER_SIDE)]
    schema = Schema(features=[
        *[Feature(name=name, kind="sparse", vocab_size=vocab, embedding_dim=16) for name in sparse],
        *[Feature(name=f"item_d{i}", kind="dense") for i in range(DENSE)],
    ])
    torch.manual_seed(0)
    model = models.build("dcnv2", schema)
    cfg = TrainConfig.model_validate({"data": {"path": str(folder)}, "model": {"name": "dcnv2"}})
    write_run_folder(folder / "run", cfg, schema, model.state_dict(), {})
    return folder / "run"


def make_bodies(folder: Path, vocab: int, candidates: int) -> None:
    rng = np.random.default_rng(0)
    for k in range(BODIES):
        body = {
            "user": {f"user_s{i}": int(rng.integers(vocab)) for i in range(SPARSE_PER_SIDE)},
            "candidates": [
                {**{f"item_s{i}": int(rng.integers(vocab)) for i in range(SPARSE_PER_SIDE)},
                 **{f"item_d{i}": round(float(rng.normal()), 4) for i in range(DENSE)}}
                for _ in range(candidates)
            ],
        }
        (folder / f"body_{k}.json").write_text(json.dumps(body))
    (folder / "bodies.lua").write_text(LUA)


# --- the baseline: plain FastAPI + uvicorn + torch, same recray functions, no Ray --------------------
def baseline_app() -> Any:
    """uvicorn factory (one per worker process): the replica's request path without Ray."""
    import torch
    from fastapi import Body, FastAPI

    from recray.platform.run_folder import load_run_folder
    from recray.platform.serve import (
        load_serve_config,
        request_model,
        request_rows,
        requests_batch,
        user_side,
    )

    torch.set_num_threads(1)
    run_dir = os.environ["RECRAY_BENCH_RUN"]
    run = load_run_folder(run_dir)
    cfg = load_serve_config(None, run_dir)
    RankRequest = request_model(run.schema, cfg)
    user_keys = {f.name for f in user_side(run.schema, cfg) if f.is_id}  # as a replica does
    app = FastAPI()

    async def rank(request):
        with torch.inference_mode():
            probabilities = torch.sigmoid(run.model(requests_batch(
                [request_rows(request, run.schema)], run.schema, user_keys)))
        order = torch.argsort(probabilities[:, 0], descending=True, stable=True)
        return {"variant": "default", "model": "dcnv2",
                "scores": dict(zip(run.schema.tasks, probabilities.T.tolist(), strict=True)),
                "ranking": order.tolist()}

    rank.__annotations__ = {"request": Annotated[RankRequest, Body()]}  # built at run time
    app.post("/v1/rank")(rank)
    return app


def start_baseline(run_dir: Path, workers: int, port: int) -> subprocess.Popen:
    env = {**os.environ, "RECRAY_BENCH_RUN": str(run_dir), "OMP_NUM_THREADS": "1"}
    server = subprocess.Popen(
        [sys.executable, "-m", "uvicorn", "serve_load:baseline_app", "--factory",
         "--app-dir", str(Path(__file__).parent), "--host", "127.0.0.1", "--port", str(port),
         "--workers", str(workers), "--log-level", "warning", "--no-access-log"],
        env=env, start_new_session=True)
    wait_ready(f"http://127.0.0.1:{port}/docs", timeout_s=120)
    return server


def wait_ready(url: str, timeout_s: float) -> None:
    import requests

    deadline = time.time() + timeout_s
    while time.time() < deadline:
        try:
            if requests.get(url, timeout=2).status_code == 200:
                return
        except requests.RequestException:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"{url} not ready after {timeout_s} s")


# --- wrk -----------------------------------------------------------------------------------------
def wrk(url: str, folder: Path, concurrency: int, seconds: float) -> dict[str, Any]:
    """One wrk run (one thread, `concurrency` connections); its CPU seconds come from rusage."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    done = subprocess.run(
        ["wrk", "-t1", f"-c{concurrency}", f"-d{seconds}s", "--timeout", "10s",
         "-s", str(folder / "bodies.lua"), url, "--", str(BODIES), str(folder)],
        capture_output=True, text=True, check=True)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    line = next(x for x in done.stdout.splitlines() if x.startswith("RESULT "))
    raw = json.loads(line.removeprefix("RESULT "))
    errors = raw["non2xx"] + raw["socket_errors"] + raw["timeouts"]
    return {
        "concurrency": concurrency,
        "requests": raw["requests"],
        "rps": raw["requests"] / raw["duration_s"],
        "p50_ms": raw["p50_ms"],
        "p99_ms": raw["p99_ms"],
        "errors": errors,
        "mean_batch": raw["seen"] / raw["inverse"] if raw["inverse"] else 1.0,
        "wrk_cpu_s": (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime),
        "duration_s": raw["duration_s"],
    }


def sweep(name: str, url: str, folder: Path, size: dict, candidates: int) -> list[dict]:
    wrk(url, folder, 4, 2)  # warm-up: first forwards, connection pools
    rows = []
    for c in size["concurrency"]:
        r = wrk(url, folder, c, size["seconds"])
        row = {"config": name, "concurrency": c, "rps": round(r["rps"], 1),
               "scores_per_s": round(r["rps"] * candidates, 1), "p50_ms": round(r["p50_ms"], 2),
               "p99_ms": round(r["p99_ms"], 2), "errors": r["errors"],
               "mean_batch": round(r["mean_batch"], 2), "requests": r["requests"],
               "wrk_cpu_share": round(r["wrk_cpu_s"] / r["duration_s"], 3)}
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


# --- recray serve --------------------------------------------------------------------------------
def deploy(run_dir: Path, port: int, **options: Any) -> str:
    from recray.platform.serve import deploy as serve_deploy
    from recray.platform.serve import load_serve_config

    cfg = load_serve_config(None, run_dir, port=port, **options)
    url = serve_deploy(cfg)
    wait_ready(f"{url}/healthz", timeout_s=120)
    return url


def deployment_details() -> dict[str, Any]:
    from ray.serve.context import _get_global_client

    return _get_global_client().get_serve_details()["applications"]["recray"]["deployments"][
        "Ranker"]


def replicas_running() -> int:
    return sum(r["state"] == "RUNNING" for r in deployment_details()["replicas"])


def load_step(url: str, folder: Path, size: dict) -> dict[str, Any]:
    """Low, high, low load in CHUNK_S wrk runs, replicas sampled every second meanwhile."""
    started, samples, stop = time.time(), [], threading.Event()

    def sample() -> None:  # [seconds, replicas running, replicas the autoscaler wants]
        while not stop.is_set():
            details = deployment_details()
            running = sum(r["state"] == "RUNNING" for r in details["replicas"])
            samples.append([round(time.time() - started, 1), running,
                            details["target_num_replicas"]])
            stop.wait(1.0)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    chunks = []
    for concurrency, seconds in size["step"]:
        for _ in range(int(seconds // CHUNK_S)):
            r = wrk(url, folder, concurrency, CHUNK_S)
            chunks.append({"t_s": round(time.time() - started, 1), "concurrency": concurrency,
                           "rps": round(r["rps"], 1), "p99_ms": round(r["p99_ms"], 2),
                           "requests": r["requests"], "errors": r["errors"]})
    stop.set()
    sampler.join()
    return {"replicas_over_time": samples, "chunks": chunks,
            "requests": sum(c["requests"] for c in chunks),
            "failed_requests": sum(c["errors"] for c in chunks),
            "replica_path": [s[1] for i, s in enumerate(samples)
                             if i == 0 or samples[i - 1][1] != s[1]]}


def replica_kill(url: str, folder: Path, size: dict) -> dict[str, Any]:
    """Kill one of two replicas a third of the way into a c=32 run; Serve starts a new one."""
    import ray

    result: dict[str, Any] = {}
    load = threading.Thread(target=lambda: result.update(wrk(url, folder, 32, size["kill_seconds"])))
    load.start()
    time.sleep(size["kill_seconds"] / 3)
    victim = deployment_details()["replicas"][0]
    ray.kill(ray.get_actor(victim["actor_name"], namespace="serve"), no_restart=True)
    killed = time.time()
    load.join()
    while replicas_running() < 2 and time.time() - killed < 120:
        time.sleep(0.5)
    return {"requests": result["requests"], "failed_requests": result["errors"],
            "p99_ms": round(result["p99_ms"], 2), "replaced_after_s": round(time.time() - killed, 1)}


def plot(autoscale: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(3, 1, figsize=(7, 7), sharex=True)
    t = [c["t_s"] for c in autoscale["chunks"]]
    axes[0].step(t, [c["rps"] for c in autoscale["chunks"]], where="pre")
    axes[0].set_ylabel("requests/s")
    axes[1].step(t, [c["p99_ms"] for c in autoscale["chunks"]], where="pre")
    axes[1].set_ylabel("p99 ms")
    seconds, running, target = zip(*autoscale["replicas_over_time"], strict=True)
    axes[2].step(seconds, running, where="post", label="running")
    axes[2].step(seconds, target, where="post", linestyle="--", label="target")
    axes[2].legend()
    axes[2].set_ylabel("replicas")
    axes[2].set_xlabel("seconds")
    fig.suptitle("recray serve autoscaling: load low -> high -> low")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def replica_cpu(size: dict, folder: Path, run_dir: Path, repeats: int) -> dict[str, Any]:
    """CPU ms per request of a replica's conversion + forward (no HTTP), one torch thread, with
    the user's ids looked up per candidate (`expanded`) or once per request (`once`), for one
    request per forward and for full batches; and the ids each lookup took."""
    import torch

    from recray.models.layers import FeatureEmbedding
    from recray.platform.run_folder import load_run_folder
    from recray.platform.serve import (
        load_serve_config,
        request_model,
        request_rows,
        requests_batch,
        user_side,
    )

    torch.set_num_threads(1)
    run = load_run_folder(run_dir)
    cfg = load_serve_config(None, run_dir)
    RankRequest = request_model(run.schema, cfg)
    user_keys = {f.name for f in user_side(run.schema, cfg) if f.is_id}
    bodies = [RankRequest.model_validate_json((folder / f"body_{k}.json").read_bytes())
              for k in range(BODIES)]
    looked_up = [0]
    for module in run.model.modules():
        if isinstance(module, FeatureEmbedding):
            for table in module.modules():
                if isinstance(table, (torch.nn.Embedding, torch.nn.EmbeddingBag)):
                    table.register_forward_hook(
                        lambda m, args, kwargs, out: looked_up.__setitem__(
                            0, looked_up[0] + (args[0] if args else kwargs["input"]).numel()),
                        with_kwargs=True)
    rows = []
    for batch_requests in (1, 16):
        for mode, keys in (("expanded", None), ("once", user_keys)):
            def score(start: int, keys=keys, batch_requests=batch_requests) -> None:
                group = [bodies[(start + j) % BODIES] for j in range(batch_requests)]
                with torch.inference_mode():
                    run.model(requests_batch([request_rows(b, run.schema) for b in group],
                                             run.schema, keys))

            score(0)  # warm-up
            looked_up[0] = 0
            score(0)
            ids_per_request = looked_up[0] / batch_requests
            cpu_started = time.process_time()
            for i in range(repeats):
                score(i * batch_requests)
            cpu_ms = (time.process_time() - cpu_started) * 1e3 / (repeats * batch_requests)
            rows.append({"requests_per_forward": batch_requests, "user_ids": mode,
                         "cpu_ms_per_request": round(cpu_ms, 3),
                         "ids_looked_up_per_request": ids_per_request})
            print(json.dumps(rows[-1]), flush=True)
    return {"candidates": size["candidates"], "repeats": repeats, "rows": rows}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=sorted(SIZES), default="full")
    parser.add_argument("--ingress", choices=("proxy", "haproxy", "direct"), default="haproxy",
                        help="Serve's HTTP path: its Python proxy, HAProxy, or direct ingress")
    parser.add_argument("--out", default="benchmarks/results/serve_load.json")
    parser.add_argument("--replica-cpu", action="store_true",
                        help="only the replica's CPU per request, user ids expanded vs once")
    parser.add_argument("--repeats", type=int, default=200, help="forwards per --replica-cpu case")
    args = parser.parse_args()
    size = SIZES[args.size]
    folder = Path(tempfile.mkdtemp(prefix="serve_load_"))
    run_dir = make_run(folder, size["vocab"])
    make_bodies(folder, size["vocab"], size["candidates"])
    started = time.time()
    if args.replica_cpu:
        measured = replica_cpu(size, folder, run_dir, args.repeats)
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({
            "command": " ".join(["python", *sys.argv]),
            "load_average_at_start": os.getloadavg(), **measured,
            "wall_s": round(time.time() - started, 1)}, indent=2))
        print(f"-> {out}", flush=True)
        return
    results = []

    for workers in (1, 2):
        port = free_port()
        server = start_baseline(run_dir, workers, port)
        try:
            results += sweep(f"fastapi_{workers}w", f"http://127.0.0.1:{port}", folder, size,
                             size["candidates"])
        finally:
            os.killpg(server.pid, 15)
            server.wait()

    from recray.platform.serve import HAPROXY_ENV

    if args.ingress == "haproxy":  # before Ray starts: its processes read them
        os.environ.update(HAPROXY_ENV)
    elif args.ingress == "direct":
        os.environ["RAY_SERVE_ENABLE_DIRECT_INGRESS"] = "1"
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    import ray
    from ray import serve

    ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=False,
             log_to_driver=False, logging_level="WARNING")
    port = free_port()
    fixed = {"cpus_per_replica": 1.0, "torch_threads": 1, "max_ongoing_requests": 64}
    try:
        url = deploy(run_dir, port, num_replicas=1, **fixed)
        results += sweep("serve_1r", url, folder, size, size["candidates"])
        url = deploy(run_dir, port, num_replicas=2, **fixed)
        results += sweep("serve_2r", url, folder, size, size["candidates"])
        replica = replica_kill(url, folder, size)
        print("replica_kill", json.dumps(replica), flush=True)
        autoscaling = {"min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 8,
                       "upscale_delay_s": 2, "downscale_delay_s": 10, "look_back_period_s": 4,
                       "metrics_interval_s": 1}
        url = deploy(run_dir, port, autoscaling=autoscaling, **fixed)
        results += sweep("serve_autoscale", url, folder, size, size["candidates"])
        # Back to one replica (the sweep's c=64 scaled it up) before the step starts.
        while [r["state"] for r in deployment_details()["replicas"]] != ["RUNNING"]:
            time.sleep(1)
        autoscale = load_step(url, folder, size)
        print("autoscale", autoscale["replica_path"], autoscale["failed_requests"], flush=True)
    finally:
        serve.shutdown()
        ray.shutdown()

    def at(config: str, c: int) -> dict:
        return next(r for r in results if r["config"] == config and r["concurrency"] == c)

    c_ref = 32 if 32 in size["concurrency"] else size["concurrency"][-1]
    ratios = {
        f"serve_2r_rps_vs_fastapi_2w_c{c_ref}": round(at("serve_2r", c_ref)["rps"]
                                                       / at("fastapi_2w", c_ref)["rps"], 3),
        f"serve_2r_p99_vs_fastapi_2w_c{c_ref}": round(at("serve_2r", c_ref)["p99_ms"]
                                                       / at("fastapi_2w", c_ref)["p99_ms"], 3),
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    plot(autoscale, out.with_suffix(".png"))
    out.write_text(json.dumps({
        "command": " ".join(["python", *sys.argv]),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                    "cpu": next((line.split(":", 1)[1].strip() for line in
                                 Path("/proc/cpuinfo").read_text().splitlines()
                                 if line.startswith("model name")), platform.processor()),
                    "load_average_at_start": os.getloadavg()},
        "setup": {"size": args.size, "ingress": args.ingress, **{k: v for k, v in size.items()},
                  "sparse_features": 2 * SPARSE_PER_SIDE, "dense_features": DENSE,
                  "load_generator": "wrk -t1 (Lua bodies); wrk_cpu_share = its CPU s per s",
                  "serve": {**fixed, "max_batch_size": 16, "batch_wait_timeout_s": 0.002}},
        "results": results,
        "ratios": ratios,
        "autoscale": autoscale,
        "replica_kill": replica,
        "wall_s": round(time.time() - started, 1),
    }, indent=2))
    print(json.dumps(ratios), f"-> {out}", flush=True)


if __name__ == "__main__":
    main()
