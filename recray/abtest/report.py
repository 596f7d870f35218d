"""The experiment report: a self-contained report.html (inline PNG plots) and report.json with every figure."""

from __future__ import annotations

import base64
import html
import io
import json
import math
import os
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from recray.abtest.result import ExperimentResult  # noqa: E402

# The columns of the metric table: (label, path inside a metric's entry).
METRIC_COLUMNS = [
    ("control", ("decision", "control")),
    ("treatment", ("decision", "treatment")),
    ("effect", ("decision", "effect")),
    ("CI low", ("decision", "ci_low")),
    ("CI high", ("decision", "ci_high")),
    ("lift", ("decision", "rel_effect")),
    ("lift CI low", ("decision", "rel_ci_low")),
    ("lift CI high", ("decision", "rel_ci_high")),
    ("p", ("decision", "pvalue")),
    ("p (BH)", ("decision", "pvalue_adj")),
    ("CUPED var. reduction", ("cuped", "variance_reduction")),
    ("MDE (lift)", ("power", "mde_rel")),
    ("projected last-day effect", ("projection", "projected")),
    ("real last-day effect", ("projection", "actual_last_day")),
    ("projection error", ("projection", "error")),
]


def json_safe(value: Any) -> Any:
    """Plain JSON types throughout: numpy scalars unwrapped, NaN and infinities as null."""
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple | np.ndarray):
        return [json_safe(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _lookup(entry: dict[str, Any], path: tuple[str, ...]) -> Any:
    for key in path:
        if not isinstance(entry, dict) or key not in entry:
            return None
        entry = entry[key]
    return entry


def _number(value: Any, key: str) -> str:
    """A table cell carrying its JSON path, so a reader (and the test) can trace every number."""
    text = "&ndash;" if value is None else (f"{value:.6g}" if isinstance(value, float) else str(value))
    return f'<td data-key="{html.escape(key)}">{text}</td>'


def _png(figure: plt.Figure) -> str:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=90, bbox_inches="tight")
    plt.close(figure)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def _grid(count: int) -> tuple[plt.Figure, np.ndarray]:
    cols = min(4, count)
    rows = math.ceil(count / cols)
    figure, axes = plt.subplots(rows, cols, figsize=(3.6 * cols, 2.7 * rows), squeeze=False,
                              layout="constrained")
    for ax in axes.ravel()[count:]:
        ax.set_visible(False)
    return figure, axes.ravel()


def _values(seq: list[Any]) -> np.ndarray:
    return np.array([np.nan if v is None else v for v in seq], dtype=float)


def plot_daily_lift(comparison: dict[str, Any]) -> str:
    """Relative lift per experiment day with its 95% band, one panel per metric."""
    metrics = comparison["metrics"]
    figure, axes = _grid(len(metrics))
    for ax, (name, entry) in zip(axes, metrics.items(), strict=False):
        daily = entry["daily"]
        day = np.asarray(daily["day"])
        ax.fill_between(day, 100 * _values(daily["rel_ci_low"]), 100 * _values(daily["rel_ci_high"]),
                        alpha=0.3, label="95% CI")
        ax.plot(day, 100 * _values(daily["rel_effect"]), marker=".", label="lift")
        ax.axhline(0, color="black", lw=0.8)
        ax.set_title(f"{name} ({entry['novelty']['flag']})", fontsize=9)
        ax.set_xlabel("day")
        ax.set_ylabel("lift %")
    axes[0].legend(fontsize=7)
    figure.suptitle(f"Daily lift, {comparison['treatment']} vs control")
    return _png(figure)


def plot_cumulative(per_arm: dict[str, Any], metrics: list[str]) -> str:
    """The cumulative value of each metric per arm."""
    figure, axes = _grid(len(metrics))
    for ax, name in zip(axes, metrics, strict=False):
        for arm, values in per_arm.items():
            ax.plot(_values(values[name]["cumulative"]), label=arm)
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("day")
    axes[0].legend(fontsize=7)
    figure.suptitle("Cumulative metric per arm")
    return _png(figure)


def plot_creators(creators: dict[str, list[Any]]) -> str:
    """Creator exits and the exposure Gini of what each arm showed, over days."""
    figure, (exits_ax, gini_ax) = plt.subplots(1, 2, figsize=(9, 3), layout="constrained")
    arms = np.asarray(creators["arm"])
    days = np.asarray(creators["day"])
    for arm in dict.fromkeys(arms):
        mine = arms == arm
        exits_ax.plot(days[mine], np.cumsum(_values(list(np.asarray(creators["exits"])[mine]))), label=arm)
        gini_ax.plot(days[mine], _values(list(np.asarray(creators["exposure_gini"])[mine])), label=arm)
    exits_ax.set_title("creator exits (cumulative)", fontsize=9)
    gini_ax.set_title("exposure Gini", fontsize=9)
    for ax in (exits_ax, gini_ax):
        ax.set_xlabel("day")
        ax.legend(fontsize=7)
    return _png(figure)


def plot_estimate_vs_gte(comparison: dict[str, Any]) -> str | None:
    """The A/B estimate with its CI beside the global treatment effect, per metric that has one,
    both relative to the control arm's mean so metrics of different units share one axis."""
    rows = [(name, entry["gte"], entry["decision"]["control"])
            for name, entry in comparison["metrics"].items() if "gte" in entry]
    if not rows:
        return None
    figure, ax = plt.subplots(figsize=(6, 0.6 * len(rows) + 1.2), layout="constrained")
    for y, (_, gte, control) in enumerate(rows):
        estimate, low, high = (100 * gte[k] / control for k in ("estimate", "ci_low", "ci_high"))
        ax.errorbar(estimate, y, xerr=[[estimate - low], [high - estimate]], fmt="o", color="C0",
                    label="A/B estimate, 95% CI" if y == 0 else None)
        ax.plot(100 * gte["gte"] / control, y, "D", color="C3", label="GTE" if y == 0 else None)
    ax.set_yticks(range(len(rows)), [name for name, *_ in rows])
    ax.axvline(0, color="black", lw=0.8)
    ax.set_xlabel("effect, % of the control mean")
    ax.legend(fontsize=8)
    ax.set_title(f"Estimate vs global treatment effect ({comparison['treatment']})", fontsize=9)
    return _png(figure)


def _metric_table(index: int, comparison: dict[str, Any]) -> str:
    head = "".join(f"<th>{html.escape(label)}</th>" for label, _ in METRIC_COLUMNS)
    rows = []
    for name, entry in comparison["metrics"].items():
        base = f"comparisons.{index}.metrics.{name}"
        cells = "".join(_number(_lookup(entry, path), f"{base}.{'.'.join(path)}")
                        for _, path in METRIC_COLUMNS)
        verdicts = (f"<td>{'yes' if entry['significant'] else 'no'}</td>"
                    f"<td>{'rejects' if entry['sequential']['rejected'] else 'continue'}"
                    f"{'' if entry['sequential']['first_day'] is None else ' on day ' + str(entry['sequential']['first_day'])}</td>"
                    f"<td>{html.escape(entry['novelty']['flag'])}"
                    f"{' (sign flip)' if entry['novelty'].get('sign_flip') else ''}</td>")
        rows.append(f"<tr><th>{html.escape(name)}</th>{cells}{verdicts}</tr>")
    return (f"<table><tr><th>metric</th>{head}<th>significant (BH)</th><th>sequential</th>"
            f"<th>novelty</th></tr>{''.join(rows)}</table>")


def _gte_table(index: int, comparison: dict[str, Any]) -> str:
    rows = []
    for name, entry in comparison["metrics"].items():
        if "gte" not in entry:
            continue
        base = f"comparisons.{index}.metrics.{name}.gte"
        cells = "".join(_number(entry["gte"][k], f"{base}.{k}")
                        for k in ("estimate", "ci_low", "ci_high", "gte", "bias"))
        rows.append(f"<tr><th>{html.escape(name)}</th>{cells}</tr>")
    if not rows:
        return "<p>The global treatment effect was not computed for this experiment.</p>"
    return ("<table><tr><th>metric</th><th>A/B estimate</th><th>CI low</th><th>CI high</th>"
            f"<th>GTE</th><th>bias</th></tr>{''.join(rows)}</table>")


def _creator_table(report: dict[str, Any]) -> str:
    arms = report["arms"]
    head = "".join(f"<th>{html.escape(a)}</th>" for a in arms)
    rows = []
    for name, entry in report["creator_effects"].items():
        base = f"creator_effects.{name}"
        cells = "".join(_number(entry["per_arm"].get(a), f"{base}.per_arm.{a}") for a in arms)
        cells += "".join(_number(entry.get(k), f"{base}.{k}") for k in ("gte", "bias"))
        rows.append(f"<tr><th>{html.escape(name)}</th>{cells}</tr>")
    return (f"<table><tr><th>creator metric (mean over days)</th>{head}<th>GTE</th><th>bias</th></tr>"
            f"{''.join(rows)}</table>")


def _image(png: str | None, alt: str) -> str:
    return "" if png is None else f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{png}">'


STYLE = """body{font-family:sans-serif;margin:2em;max-width:1400px}
table{border-collapse:collapse;font-size:12px;margin:1em 0}td,th{border:1px solid #ccc;padding:3px 6px}
td{text-align:right}img{max-width:100%;display:block;margin:1em 0}.warn{color:#b00}"""


def render_html(report: dict[str, Any]) -> str:
    """The whole page from the JSON-safe report (so the page cannot show a number the JSON lacks)."""
    srm = report["srm"]
    if srm is None:
        srm_line = ("<p>Creator randomisation: every user's slates mix both arms' creators, so the "
                    "comparison is the creator metrics per arm below and the GTE.</p>")
    else:
        srm_line = (f'<p class="{"warn" if srm["mismatch"] else ""}">Sample-ratio check: units '
                    f'per arm {html.escape(str(srm["counts"]))} against shares '
                    f'{html.escape(str(srm["expected_shares"]))}, chi-square p = '
                    f'<span data-key="srm.pvalue">{srm["pvalue"]:.6g}</span>'
                    f'{" &mdash; MISMATCH: do not trust the lifts" if srm["mismatch"] else ""}.</p>')
    parts = [f"<h1>A/B experiment: {html.escape(' vs '.join(report['arms']))}</h1>",
             f"<p>Design: {html.escape(report['design'])} randomisation; "
             f"{report['days']} experiment days after {report['pre_days']} pre-period days; "
             f"alpha {report['alpha']}; {'A/A test' if report['aa'] else ''}</p>", srm_line]
    if report["failures"]:
        parts.append(f'<p class="warn">Failures: {html.escape(json.dumps(report["failures"]))}</p>')
    for index, comparison in enumerate(report["comparisons"]):
        parts += [f"<h2>{html.escape(comparison['treatment'])} vs {html.escape(report['control'])}</h2>",
                  f"<p>Fixed-horizon lifts {'with CUPED (pre-period covariate)' if comparison['cuped'] else 'without CUPED'},"
                  " delta method at the randomisation unit, Benjamini-Hochberg across metrics; "
                  "sequential: O'Brien-Fleming alpha spending over daily peeks.</p>",
                  _metric_table(index, comparison),
                  "<h3>Estimate vs global treatment effect</h3>", _gte_table(index, comparison),
                  _image(report["figures"]["estimate_vs_gte"][index], "estimate vs GTE"),
                  "<h3>Daily lift</h3>", _image(report["figures"]["daily_lift"][index], "daily lift")]
    if report["figures"]["cumulative"] is not None:
        parts += ["<h2>Cumulative metric per arm</h2>",
                  _image(report["figures"]["cumulative"], "cumulative")]
    if report["gte"] and not report["comparisons"]:
        rows = "".join(f"<tr><th>{html.escape(k)}</th>{_number(v, f'gte.{k}')}</tr>"
                       for k, v in report["gte"].items())
        parts += ["<h2>Global treatment effect</h2>", f"<table>{rows}</table>"]
    parts += ["<h2>Creators</h2>", _creator_table(report),
              _image(report["figures"]["creators"], "creators")]
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>A/B report</title>"
            f"<style>{STYLE}</style></head><body>{''.join(parts)}</body></html>")


def _write_atomically(path: Path, text: str) -> None:
    """Write beside, then rename: a crash never leaves a half-written file under the final name."""
    partial = path.with_name(f".{path.name}.partial")
    partial.write_text(text, encoding="utf-8")
    os.replace(partial, path)


def write_report(result: ExperimentResult, analysis: dict[str, Any], out_dir: str | Path) -> dict[str, Path]:
    """report.json (the analysis, every number, plots as base64) and report.html in `out_dir`."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    figures = {
        "daily_lift": [plot_daily_lift(c) for c in analysis["comparisons"]],
        "cumulative": (plot_cumulative(analysis["per_arm"], list(analysis["config"]["metrics"]))
                       if analysis["per_arm"] else None),
        "creators": plot_creators(analysis["creators"]),
        "estimate_vs_gte": [plot_estimate_vs_gte(c) for c in analysis["comparisons"]],
    }
    report = json_safe({**analysis, "figures": figures,
                        "experiment": {"arms": result.arms, "shares": result.shares,
                                       "design": result.design}})
    text = json.dumps(report, allow_nan=False, indent=1)
    json_path, html_path = out / "report.json", out / "report.html"
    _write_atomically(json_path, text)
    _write_atomically(html_path, render_html(report))
    return {"json": json_path, "html": html_path}
