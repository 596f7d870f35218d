"""`recray demo` end to end on the default simulated world (slow: real Ray Train runs)."""

from __future__ import annotations

import json

import pytest

from recray.jobs import demo


@pytest.mark.ray
def test_demo_best_model_within_002_of_oracle(tmp_path, ray_local, capsys):
    code = demo.main(["--out", str(tmp_path), "--models", "dcnv2", "--epochs", "1"])
    assert code == 0
    report = json.loads((tmp_path / "report.json").read_text())
    oracle_auc = report["oracle"]["test"]["auc"]
    best = max(row["test_auc"] for row in report["models"])
    assert oracle_auc - best < 0.02, report
    printed = capsys.readouterr().out
    assert "oracle AUC" in printed and f"{oracle_auc:.4f}" in printed
