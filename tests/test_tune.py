"""recray tune: the search section fails before any trial naming the field; the front and the
budget pick against brute force; one real search, killed and resumed, exports what train and
serve take."""

from __future__ import annotations

import csv
import itertools
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import yaml
from sklearn.metrics import roc_auc_score

from recray import cli
from recray.data.jagged import to_batch
from recray.data.schema import Schema
from recray.platform.config import ConfigError, TrainConfig, load_train_config
from recray.platform.run_folder import load_run_folder
from recray.platform.train import validate
from recray.platform.tune import (
    TuneConfig,
    data_view,
    load_tune_config,
    newest_items,
    param_space,
    pareto_front,
    pick_best,
    search_algorithm,
    trial_config,
    tune_search,
)

REPO = Path(__file__).resolve().parents[1]
def _config(sim_dir, tmp_path) -> dict:
    return {
        "name": "t",
        "data": {"path": str(sim_dir)},
        "model": {"name": "dcnv2"},
        "train": {"epochs": 2, "batch_size": 512, "lr": 0.01},
        "scaling": {"num_workers": 1, "cpus_per_worker": 0.5},
        "storage_path": str(tmp_path / "runs"),
        "search": {
            "num_samples": 1,
            "space": {"train.lr": {"loguniform": [0.003, 0.03]}},
            "models": {"lr": {}, "dcnv2": {"cross_layers": {"choice": [1, 2]}}},
            "latency": {"repeats": 20, "warmup": 2},
        },
    }


def _write(tmp_path, cfg: dict) -> Path:
    path = tmp_path / "tune.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _set(cfg: dict, changes: dict) -> dict:
    """Apply {"a/b": value} changes; None deletes the key."""
    for dotted, value in changes.items():
        node = cfg
        *parents, leaf = dotted.split("/")
        for key in parents:
            node = node.setdefault(key, {})
        if value is None:
            node.pop(leaf)
        else:
            node[leaf] = value
    return cfg


@pytest.mark.parametrize(
    "changes,pattern",
    [
        ({"search/space": {}, "search/models": {"dcnv2": {}}}, r"search: the space is empty"),
        ({"search/models": {"transformer9": {}}}, r"search\.models\.transformer9: unknown model"),
        ({"search/models": {"dcnv2": {"heads": {"choice": [1]}}}},
         r"search\.models\.dcnv2\.heads: dcnv2 has no such hparam; its hparams are \["),
        ({"search/models": {"dcnv2": {"cross_layers": {"randint": [0, 3]}}}},
         r"search\.models\.dcnv2\.cross_layers: value 0 is refused"),
        ({"search/models": {"din": {"hidden": {"choice": [[64], [0]]}}}},
         r"search\.models\.din\.hidden: value \[0\] is refused"),
        ({"search/models": {"dcnv2": {"hidden": [64]}}},
         r"search\.models\.dcnv2\.hidden: Input should be a valid dictionary"),
        ({"search/space": {"train.lr": {"uniform": [0.1, 0.01]}}},
         r"search\.space\.train\.lr: Value error, uniform: \[0\.1, 0\.01\] is empty"),
        ({"search/space": {"train.lr": {"loguniform": [0, 0.01]}}},
         r"search\.space\.train\.lr: Value error, loguniform: low 0\.0 must be above 0"),
        ({"search/space": {"train.lr": {"choice": [0.01], "uniform": [0.1, 0.2]}}},
         r"search\.space\.train\.lr: Value error, give exactly one of choice"),
        ({"search/space": {"train.lr": {"choice": []}}}, r"search\.space\.train\.lr\.choice: "),
        ({"search/space": {"train.weight_decay": {"uniform": [-1.0, 0.1]}}},
         r"search\.space\.train\.weight_decay: value -1\.0 is refused: .*greater than or equal to 0"),
        ({"search/space": {"model.hparams.hidden": {"choice": [[8]]}}},
         r"search: Value error, space\.model\.hparams\.hidden: not a train setting"),
        ({"search/space": {"train.epochs": {"choice": [1, 2]}}},
         r"space\.train\.epochs: the epochs are the scheduler's budget"),
        ({"search/scheduler": {"name": "asha2"}},
         r"search\.scheduler\.name: 'asha2' is not a Tune scheduler"),
        ({"search/scheduler": {"name": "asha", "options": {"grace": 1}}},
         r"search\.scheduler\.options: \['grace'\] are not options of async_hyperband"),
        ({"search/scheduler": {"name": "asha", "options": {"grace_period": 5}}},
         r"search\.scheduler\.options: async_hyperband refuses .* train\.epochs=2"),
        ({"search/num_samples": 0}, r"search\.num_samples: .*greater than 0"),
        ({"search/max_latency_ms": -1}, r"search\.max_latency_ms: .*greater than 0"),
        ({"search/samples": 3}, r"search\.samples: Extra inputs are not permitted"),
        ({"scaling/num_workers": 0}, r"scaling\.num_workers: 0 \(Ray Train's local mode\)"),
        ({"search": None}, r"search: missing"),
        ({"search/space": {"schema.embedding_dim": {"uniform": [4.0, 16.0]}}},
         r"search\.space\.schema\.embedding_dim: value 4\.0 is refused: a whole number"),
        ({"search/space": {"data.max_history_length": {"choice": [10, 0]}}},
         r"search\.space\.data\.max_history_length: value 0 is refused: a whole number"),
        ({"search/searcher": "hyperopt"}, r"search\.searcher: Input should be 'random' or 'optuna'"),
        ({"search/searcher": "optuna", "search/space": {"train.lr": {"grid": [0.01, 0.1]}}},
         r"space\.train\.lr: grid is Tune's grid search, which searcher optuna does not take"),
    ],
)
def test_bad_search_sections_fail_before_any_trial_naming_the_field(
    sim_dir, tmp_path, changes, pattern
):
    cfg = _set(_config(sim_dir, tmp_path), changes)
    started = time.perf_counter()
    with pytest.raises(ConfigError, match=pattern):
        tune_search(load_tune_config(_write(tmp_path, cfg)))
    assert time.perf_counter() - started < 10
    assert not (tmp_path / "runs").exists()  # no tune folder: nothing started


def test_the_cli_reports_a_bad_search_with_exit_2_and_the_field(sim_dir, tmp_path, capsys):
    cfg = _config(sim_dir, tmp_path)
    cfg["search"]["models"]["dcnv2"] = {"cross_layers": {"randint": [3, 3]}}
    assert cli.main(["tune", str(_write(tmp_path, cfg))]) == 2
    stderr = capsys.readouterr().err
    assert "search.models.dcnv2.cross_layers" in stderr and "is empty" in stderr


def test_a_trial_config_takes_its_family_its_hparams_and_its_train_values(sim_dir, tmp_path):
    cfg = TuneConfig.model_validate(_config(sim_dir, tmp_path) | {
        "model": {"name": "dcnv2", "hparams": {"structure": "parallel"}}})
    params = {"family": "din", "train": {"lr": 0.02, "batch_size": 64},
              "hparams": {"dcnv2": {"cross_layers": 2}, "din": {"attention_heads": 4}}}
    trial = trial_config(cfg.base(), params)
    assert (trial.model.name, trial.model.hparams) == ("din", {"attention_heads": 4})
    assert (trial.train.lr, trial.train.batch_size, trial.train.epochs) == (0.02, 64, 2)
    # The base model's fixed hparams stay with its own family only.
    params["family"] = "dcnv2"
    assert trial_config(cfg.base(), params).model.hparams == {"structure": "parallel",
                                                              "cross_layers": 2}


def _dominated(points, i) -> bool:
    return any(
        a >= points[i][0] and t <= points[i][1] and (a, t) != points[i]
        for j, (a, t) in enumerate(points) if j != i
    )


def test_pareto_front_is_exactly_the_undominated_points():
    rng = random.Random(0)
    for _ in range(200):
        n = rng.randint(1, 12)
        # Coarse values, so equal AUCs and equal latencies (ties) occur often.
        points = [(rng.randint(0, 5) / 10, rng.randint(0, 5)) for _ in range(n)]
        front = pareto_front(points)
        undominated = {i for i in range(n) if not _dominated(points, i)}
        # Duplicated points: the front keeps one of each.
        assert {points[i] for i in front} == {points[i] for i in undominated}
        assert len(front) == len({points[i] for i in front})
        assert [points[i][1] for i in front] == sorted(points[i][1] for i in front)


def test_the_budget_picks_the_best_auc_within_it_and_names_the_fastest_when_none_fits():
    rng = np.random.default_rng(1)
    trials = [{"trial": f"t{i}", "family": "dnn", "status": status, "valid_auc": auc,
               "p99_ms": p99}
              for i, (status, auc, p99) in enumerate(zip(
                  itertools.cycle(["finished", "finished", "stopped"]), rng.uniform(0.6, 0.8, 30),
                  rng.uniform(1, 20, 30), strict=False))]
    for budget in (None, 3.0, 8.0, 19.0):
        chosen = pick_best(trials, budget)
        pool = [t for t in trials if t["status"] == "finished"
                and (budget is None or t["p99_ms"] <= budget)]
        assert chosen["valid_auc"] == max(t["valid_auc"] for t in pool)
    fastest = min((t for t in trials if t["status"] == "finished"), key=lambda t: t["p99_ms"])
    with pytest.raises(ConfigError, match=rf"--max-latency-ms: no finished trial serves within "
                                          rf"0\.5 ms .* trial {fastest['trial']} \(dnn\)"):
        pick_best(trials, 0.5)


def test_newest_items_keeps_each_rows_last_items_as_a_python_slice_does():
    rng = np.random.default_rng(0)
    rows = [rng.integers(0, 100, rng.integers(0, 12)).tolist() for _ in range(300)]
    lists = pa.array(rows, pa.list_(pa.int64()))
    for keep in (1, 3, 50):
        for part in (lists, lists.slice(17, 200),
                     pa.chunked_array([lists.slice(0, 100), lists.slice(100)])):
            assert newest_items(part, keep).to_pylist() == [r[-keep:] for r in part.to_pylist()]


def test_a_data_view_has_the_searched_dim_and_history_and_train_accepts_it(sim_dir, tmp_path):
    view = Path(data_view(str(sim_dir), tmp_path / "views", 8, 5))
    assert data_view(str(sim_dir), tmp_path / "views", 8, 5) == str(view)  # made once
    schema = Schema.load(view / "schema.yaml")
    assert {f.embedding_dim for f in schema.id_features} == {8}
    assert schema.sequence_features
    for split in ("train", "valid", "test"):
        before, after = pq.read_table(sim_dir / f"{split}.parquet"), pq.read_table(
            view / f"{split}.parquet")
        for name in before.column_names:
            if name in {f.name for f in schema.sequence_features}:
                assert after[name].to_pylist() == [r[-5:] for r in before[name].to_pylist()]
            else:
                assert after[name].equals(before[name])
    linked = Path(data_view(str(sim_dir), tmp_path / "views", 32, None))
    assert (linked / "train.parquet").resolve() == (sim_dir / "train.parquet").resolve()
    cfg = TrainConfig.model_validate({"name": "v", "data": {"path": str(view)},
                                      "model": {"name": "din"}})
    assert validate(cfg).id_features[0].embedding_dim == 8


def test_optuna_samples_families_and_data_settings_and_its_front_is_the_pareto_front(
    sim_dir, tmp_path
):
    cfg = _config(sim_dir, tmp_path)
    cfg["search"] |= {"searcher": "optuna",
                      "space": {"train.lr": {"loguniform": [0.003, 0.03]},
                                "schema.embedding_dim": {"choice": [8, 16]}}}
    cfg = TuneConfig.model_validate(cfg)
    searcher = search_algorithm(cfg)
    searcher.set_search_properties(None, None, param_space(cfg))
    rng = np.random.default_rng(2)
    points, families, dims = [], set(), set()
    for i in range(12):
        params = searcher.suggest(str(i))
        trial = trial_config(cfg.base(), params)  # a valid train config
        families.add(trial.model.name)
        dims.add(params["data"]["embedding_dim"])
        assert 0.003 <= trial.train.lr <= 0.03
        point = (float(rng.uniform(0.6, 0.8)), float(rng.uniform(1, 10)))
        searcher.on_trial_complete(str(i), {"valid_auc": point[0], "p99_ms": point[1]})
        points.append(point)
    assert families == {"lr", "dcnv2"} and dims == {8, 16}
    study = searcher._ot_study  # Optuna's own multi-objective study behind Tune's searcher
    assert [d.name for d in study.directions] == ["MAXIMIZE", "MINIMIZE"]
    assert {tuple(t.values) for t in study.best_trials} == {points[i] for i in pareto_front(points)}


# --- one real search, its driver killed, resumed ---------------------------------------------------
def _finished_runs(folder: Path) -> list[Path]:
    return sorted(p.parent for p in folder.glob("trials/*/metrics.json"))


def _terminated_trials(folder: Path) -> list[str]:
    """Trials that Tune's saved experiment state (what a restore reads) records as finished."""
    ids = []
    for state in folder.glob("experiment/experiment_state-*.json"):
        try:
            trials = [json.loads(t[0]) for t in json.loads(state.read_text())["trial_data"]]
        except (ValueError, KeyError):  # caught mid-write
            continue
        ids += [t["trial_id"] for t in trials if t["status"] == "TERMINATED"]
    return ids


def _test_auc_of(run_dir: Path, data_dir: Path) -> float:
    """The run's test AUC scored here, by sklearn over every test row."""
    run = load_run_folder(run_dir)
    table = pq.read_table(data_dir / "test.parquet")
    with torch.no_grad():
        probs = torch.sigmoid(run.model(to_batch(table, run.schema))).numpy()[:, 0]
    return roc_auc_score(table.column(run.schema.labels[0]).to_numpy(), probs)


def _checkpointed(folder: Path, trial: str) -> bool:
    """Whether the trial's run folder holds a whole checkpoint (its weights and epoch written)."""
    return any((c / "state.pt").is_file() for c in folder.glob(f"trials/t-{trial}-*/*")
               if (c / "epoch.json").is_file())


def _trial_ids(folder: Path) -> list[str]:
    return sorted({p.name.split("-")[1] for p in folder.glob("trials/t-*")})


@pytest.mark.ray
@pytest.mark.timeout(2400)  # minutes on a quiet machine; the margin is for a loaded one
def test_search_killed_mid_trial_resumes_from_its_checkpoint_and_exports_what_train_and_serve_take(
    sim_dir, tmp_path
):
    cfg = _config(sim_dir, tmp_path)
    # Two trials of one family, in order: the first finishes before the kill, the second is
    # killed between its first checkpoint and its end (3 epochs leave two to go). FIFO: no
    # scheduler decision can end the second trial early.
    cfg["train"]["epochs"] = 3
    cfg["search"] |= {"space": {"train.lr": {"grid": [0.01, 0.003]}},
                      "models": {"dcnv2": {}}, "scheduler": {"name": "fifo", "options": {}}}
    path = _write(tmp_path, cfg)
    command = [sys.executable, "-m", "recray.cli", "tune", str(path)]
    env = os.environ | {"RAY_AUTH_MODE": "disabled"}
    env.pop("RAY_ADDRESS", None)
    log = open(tmp_path / "first.log", "w")
    driver = subprocess.Popen(command, cwd=tmp_path, env=env, stdout=log, stderr=log,
                              start_new_session=True)
    deadline = time.monotonic() + 1500
    folder = second = None
    while time.monotonic() < deadline and driver.poll() is None and second is None:
        folders = list((tmp_path / "runs").glob("t-*"))
        finished = _terminated_trials(folders[0]) if folders else []
        running = [t for t in _trial_ids(folders[0]) if t not in finished] if folders else []
        if finished and running and _checkpointed(folders[0], running[0]):
            folder, second = folders[0], running[0]
        time.sleep(0.2)
    assert second is not None, (tmp_path / "first.log").read_text()[-3000:]
    os.killpg(driver.pid, signal.SIGKILL)  # the driver and its Ray die together, mid-trial
    driver.wait()
    first = _finished_runs(folder)
    assert len(first) == 1 and not (folder / "trials.csv").exists()
    first_trial = first[0].name.split("-")[1]
    assert first_trial == _terminated_trials(folder)[0] != second
    # One trial at a time (max_concurrent_trials: 1): the second began after the first ended.
    (second_run,) = folder.glob(f"trials/t-{second}-*")
    began = time.mktime(time.strptime("-".join(second_run.name.split("-")[2:4]), "%Y%m%d-%H%M%S"))
    assert began >= int((first[0] / "metrics.json").stat().st_mtime) - 1

    done = subprocess.run(command + ["--resume", "--max-latency-ms", "1000"], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=1500)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "resuming" in done.stdout and "Pareto front" in done.stdout

    rows = {r["trial"]: r for r in csv.DictReader(open(folder / "trials.csv"))}
    # Every trial once, both to the end; the finished one was not rerun, the killed one went
    # on from its checkpoint (epoch 0 or later) in its own run folder, not from scratch.
    assert sorted(rows) == sorted([first_trial, second])
    assert all((r["status"], r["epochs_done"]) == ("finished", "3") for r in rows.values())
    assert rows[first_trial]["resumed_from_epoch"] == "-1"
    assert 0 <= int(rows[second]["resumed_from_epoch"]) < 2
    for trial in rows:
        assert len(list((folder / "trials").glob(f"t-{trial}-*"))) == 1
    assert first[0] in _finished_runs(folder) and len(_finished_runs(folder)) == 2
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["placement_groups_left"] == 0
    for name in ("pareto.csv", "pareto.png", "best/train.yaml"):
        assert (folder / name).is_file(), name

    # best/train.yaml is a config `recray train` takes as it is: its checks pass, and it names
    # the chosen trial's model and values.
    best_row = max(rows.values(), key=lambda r: float(r["valid_auc"]))
    best_train = load_train_config(folder / "best" / "train.yaml")
    validate(best_train)
    assert best_train.model.name == "dcnv2" and best_train.resume is None
    assert best_train.train.lr == json.loads(best_row["params"])["train"]["lr"]
    # best/model is a run folder serve loads; its weights score the test split as the trial did.
    assert _test_auc_of(folder / "best" / "model", sim_dir) == pytest.approx(
        float(best_row["test_auc"]), abs=1e-6)


# Ray Train's placement-group cleaner, run the way it runs inside a trial: a worker of the
# search's Ray asks the state API whether an actor is alive.
_CLEANER_PROBE = """
import ray
from recray.platform.tune import start_ray

start_ray()

@ray.remote(num_cpus=0)
class Probe:
    def own_liveness(self):
        import time
        from ray.train.v2._internal.state.util import is_actor_alive
        from ray.util.state.exception import RayStateApiException

        for _ in range(30):  # the dashboard may still be starting (the cleaner retries too)
            try:
                return is_actor_alive(ray.get_runtime_context().get_actor_id(), timeout=10)
            except RayStateApiException:
                time.sleep(1)

print("alive", ray.get(Probe.remote().own_liveness.remote()), flush=True)
"""


@pytest.mark.ray
@pytest.mark.timeout(300)
def test_train_placement_group_cleaner_reaches_the_search_ray_beside_another_ray(tmp_path):
    """Regression: with a second Ray on the host, the cleaner's state-API lookup raised
    "Found multiple active Ray instances", its thread died, and each trial that ASHA stopped
    kept its workers' CPUs, starving the next trial's Ray Data on 2 CPUs."""
    env = os.environ | {"RAY_AUTH_MODE": "disabled"}
    env.pop("RAY_ADDRESS", None)
    other = subprocess.Popen(
        [sys.executable, "-c", "import ray, time; ray.init(address='local', num_cpus=1, "
         "include_dashboard=False); print('up', flush=True); time.sleep(300)"],
        cwd=tmp_path, env=env, stdout=subprocess.PIPE, text=True, start_new_session=True)
    try:
        assert other.stdout.readline().strip() == "up"
        probe = subprocess.run([sys.executable, "-c", _CLEANER_PROBE], cwd=tmp_path, env=env,
                               capture_output=True, text=True, timeout=240)
        assert probe.returncode == 0, probe.stderr[-3000:]
        assert "alive True" in probe.stdout
    finally:
        os.killpg(other.pid, signal.SIGKILL)
        other.wait()


def test_submit_checks_a_tune_config_and_its_data_before_submitting(tmp_path):
    from recray.platform.submit import check_config

    (tmp_path / "configs").mkdir()
    shutil.copy(REPO / "configs" / "tune-sim.yaml", tmp_path / "configs")
    uploaded = {"configs/tune-sim.yaml"}
    check_config("configs/tune-sim.yaml", tmp_path, uploaded, {"data.path": "s3://bucket/sim"})
    with pytest.raises(ConfigError, match=r"data\.path: 'data/sim' on the cluster"):
        check_config("configs/tune-sim.yaml", tmp_path, uploaded)
    with pytest.raises(ConfigError, match=r"search\.num_samples: "):
        check_config("configs/tune-sim.yaml", tmp_path, uploaded, {"search.num_samples": 0})


@pytest.mark.parametrize("name", ["tune-sim.yaml", "tune-movielens.yaml"])
def test_the_shipped_search_configs_pass_every_check(sim_dir, name):
    from recray.platform.tune import validate_search

    validate_search(load_tune_config(REPO / "configs" / name, {"data.path": str(sim_dir)}))


def test_early_stopped_runs_last_report_is_left_to_the_trial_and_is_not_resumable(
        tmp_path, monkeypatch):
    from ray.tune.integration.ray_train import TuneReportCallback

    from recray.platform.tune import EpochsToTune, resumable

    forwarded = []
    monkeypatch.setattr(TuneReportCallback, "__init__", lambda self: None)  # no Tune session
    monkeypatch.setattr(TuneReportCallback, "after_report",
                        lambda self, ctx, metrics, ckpt: forwarded.append(metrics[0]))
    callback = EpochsToTune({"family": "dnn"}, last_epoch=9)
    callback.after_report(None, [{"epoch": 2, "valid_auc": 0.7}], None)
    # epoch 3 stopped the run early: its report carries epochs_run, the trial reports it itself
    callback.after_report(None, [{"epoch": 3, "valid_auc": 0.69, "epochs_run": 4}], None)
    assert [(m["epoch"], m["epochs_done"]) for m in forwarded] == [(2, 3)]

    for epoch, stopped in ((2, False), (3, True)):
        folder = tmp_path / "run" / f"checkpoint_{epoch:06d}"
        folder.mkdir(parents=True)
        (folder / "epoch.json").write_text(json.dumps({"epoch": epoch, "stopped_early": stopped}))
    assert not resumable(tmp_path / "run", epochs=10)
    shutil.rmtree(tmp_path / "run" / "checkpoint_000003")
    assert resumable(tmp_path / "run", epochs=10)
    assert not resumable(tmp_path / "run", epochs=3)
