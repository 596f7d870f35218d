"""The A/B report as a reader gets it: every number in report.html is the JSON's, plots are real PNGs."""

from __future__ import annotations

import base64
import json
import math
import re
from html.parser import HTMLParser

import numpy as np
import pytest

from recray.abtest.report import json_safe, write_report
from recray.abtest.stats import AnalysisConfig, analyze
from recray.abtest.synthetic import synthetic_experiment

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


class KeyedCells(HTMLParser):
    """Collects (data-key, text) of every element that carries a data-key."""

    def __init__(self) -> None:
        super().__init__()
        self.cells: list[tuple[str, str]] = []
        self._key: str | None = None

    def handle_starttag(self, tag, attrs):
        self._key = dict(attrs).get("data-key", self._key)

    def handle_data(self, data):
        if self._key is not None:
            self.cells.append((self._key, data.strip()))
            self._key = None


def _at(report: dict, dotted: str):
    """The JSON value at a dotted path; None where the JSON has no such number (shown as a dash)."""
    node = report
    for part in dotted.split("."):
        node = node[int(part)] if isinstance(node, list) else node.get(part)
        if node is None:
            return None
    return node


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    result = synthetic_experiment(users=1500, days=8, pre_days=4,
                                  lift=[0.4, 0.3, 0.1, 0.0, -0.1, -0.1, -0.1, -0.1], seed=3)
    result.gte.update({"watch_minutes": 0.05, "ctr": 0.001})
    analysis = analyze(result, AnalysisConfig(metrics=["watch_minutes", "ctr", "churned", "active"]))
    out = tmp_path_factory.mktemp("report")
    return out, write_report(result, analysis, out), analysis


def test_report_files_are_complete_and_json_has_no_nan(written):
    out, paths, _ = written
    assert sorted(p.name for p in out.iterdir()) == ["report.html", "report.json"]
    report = json.loads(paths["json"].read_text(), parse_constant=lambda c: pytest.fail(f"JSON has {c}"))
    metrics = report["comparisons"][0]["metrics"]
    assert set(metrics) == {"watch_minutes", "ctr", "churned", "active"}
    assert metrics["watch_minutes"]["gte"]["gte"] == 0.05
    assert len(metrics["ctr"]["daily"]["rel_effect"]) == 8


def test_every_number_in_the_html_is_the_jsons(written):
    _, paths, _ = written
    report = json.loads(paths["json"].read_text())
    parser = KeyedCells()
    parser.feed(paths["html"].read_text())
    checked = 0
    for key, text in parser.cells:
        value = _at(report, key)
        if value is None:
            assert text == "\u2013", key
            continue
        assert float(text) == pytest.approx(value, rel=1e-5, abs=1e-12), key
        checked += 1
    # 4 metrics x the metric table columns + the GTE rows + the SRM p-value + creator means
    assert checked >= 4 * 12 + 2 * 5 + 1 + 5 * 2
    assert any(key.endswith("cuped.variance_reduction") for key, _ in parser.cells)


def test_plots_are_inline_pngs(written):
    _, paths, _ = written
    page = paths["html"].read_text()
    images = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    # daily lift, estimate vs GTE, cumulative per arm, creators
    assert len(images) == 4
    assert all(base64.b64decode(b).startswith(PNG_MAGIC) for b in images)
    assert "http://" not in page and "https://" not in page  # self-contained


def test_the_page_names_the_verdicts(written):
    _, paths, analysis = written
    page = paths["html"].read_text()
    flag = analysis["comparisons"][0]["metrics"]["ctr"]["novelty"]["flag"]
    assert flag == "novelty"
    assert "novelty (sign flip)" in page or "novelty</td>" in page
    assert "Sample-ratio check" in page and "MISMATCH" not in page


def test_json_safe_turns_non_finite_into_null():
    assert json_safe({"a": float("nan"), "b": [np.float64(math.inf), np.int64(3)], "c": (1.5,)}) == {
        "a": None, "b": [None, 3], "c": [1.5]}


def test_creator_design_reports_creators_and_the_gte(tmp_path):
    """Real harness, creator randomisation: no user-side arm, so the page shows the creator
    metrics per arm and the GTE, every number again the JSON's."""
    from recray.abtest.config import parse_config
    from recray.abtest.harness import run_experiment

    cfg = parse_config({"name": "creators", "users": 200, "days": 3, "design": "creator",
                        "arms": [{"name": "control", "share": 0.5, "policy": "popularity"},
                                 {"name": "treatment", "share": 0.5, "policy": "exposure_aware"}]})
    result = run_experiment(cfg)
    analysis = analyze(result)
    assert analysis["comparisons"] == [] and analysis["srm"] is None
    paths = write_report(result, analysis, tmp_path)
    report = json.loads(paths["json"].read_text())
    parser = KeyedCells()
    parser.feed(paths["html"].read_text())
    keys = [key for key, _ in parser.cells]
    assert "gte.watch_minutes" in keys and "creator_effects.exits.per_arm.treatment" in keys
    for key, text in parser.cells:
        value = _at(report, key)
        assert text == "\u2013" if value is None else float(text) == pytest.approx(value, rel=1e-5)
