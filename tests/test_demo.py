"""`recray demo` end to end: the closed loop (simulate, train, tune, serve, A/B, report) on a tiny world.

Slow: real Ray Train (one run sharded on 2 workers), Ray Tune, Ray Serve and the A/B harness.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from recray.jobs import demo


@pytest.mark.ray
def test_demo_runs_the_closed_loop_and_keeps_ray_logs_off_the_terminal(tmp_path):
    # A process of its own, as a person runs it: what reaches its stdout/stderr is the terminal.
    out = tmp_path / "demo"
    done = subprocess.run(
        [sys.executable, "-m", "recray.jobs.demo", "--out", str(out), "--users", "200",
         "--log-days", "3", "--epochs", "1", "--trials", "2", "--ab-users", "200",
         "--ab-days", "2"],
        capture_output=True, text=True, timeout=900, env={k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"})
    terminal = done.stdout + done.stderr
    assert done.returncode == 0, terminal[-3000:]
    # one line per stage and a table; Ray's and Ray Data's output went to the log file
    for step in range(1, demo.STAGES + 1):
        assert f"[{step}/{demo.STAGES}]" in terminal
    assert "Running Dataset" not in terminal and "ServeReplica" not in terminal
    assert len(terminal) < 8000, terminal[-2000:]
    log = (out / "logs" / "ray.log").read_text(errors="replace")
    assert "Running Dataset" in log or "Dataset" in log

    report = json.loads((out / "report.json").read_text())
    assert {r["model"] for r in report["models"]} == {demo.PRODUCTION, *demo.CANDIDATES}
    assert next(r for r in report["models"] if r["model"] == "dcnv2")["source"] == "sharded x2"
    assert report["tune"]["trials"] == 2
    assert report["challenger"]["valid_auc"] == max(
        [r["valid_auc"] for r in report["models"] if r["model"] != demo.PRODUCTION]
        + [report["tune"]["best"]["valid_auc"]])
    comparison = report["abtest"]["comparison"]
    for metric in ("watch_minutes", "ctr", "active"):
        entry = comparison[metric]
        assert entry["ci_low"] <= entry["effect"] <= entry["ci_high"]
        assert "gte" in entry
        assert f"{entry['effect']:+.4f}" in terminal  # the table shows the report's figures
    html = (out / "abtest" / "report.html").read_text()
    assert "<img" in html and "production" in html and "challenger" in html
    assert str(out / "abtest" / "report.html") in terminal
