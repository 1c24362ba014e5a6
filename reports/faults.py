"""The report section of a `run_bench.py faults` directory: the table and a timeline per fault.

Reads ``faults.csv`` (a row per stack x fault) and ``faults.json`` (each
fault's completion timeline, `harness.measure.recovery.series`). A timeline
shows the achieved rate and the errors per 100 ms (as per-second rates) with
the offered rate, the fault at t = 0, a pause shaded and the recovery marked.
"""

from __future__ import annotations

import json
import math
from html import escape
from pathlib import Path
from typing import Any

import pandas as pd
import plotly.graph_objects as go

from harness.output.results import FAULTS_JSON
from harness.output.schema import FAULTS_CSV
from reports import charts, page
from reports.load import ResultsError, load_results

ERROR_COLOUR = "#B00020"


def is_faults_dir(path: Path) -> bool:
    """Whether `path` holds a fault benchmark's results."""
    return (path / FAULTS_CSV).is_file()


def load(path: Path) -> tuple[pd.DataFrame, dict[str, Any], list[dict[str, Any]]]:
    """faults.csv, meta.json and the timelines of faults.json (ResultsError when unusable)."""
    data = load_results(path)
    if data.faults is None:
        raise ResultsError(f"{path / FAULTS_CSV}: missing")
    try:
        doc = json.loads((path / FAULTS_JSON).read_text(encoding="utf-8"))
        timelines = list(doc["timelines"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ResultsError(f"{FAULTS_JSON} unreadable: {exc}") from exc
    return data.faults, data.meta, timelines


def section(path: Path, figures: page.Figures) -> str:
    """The HTML of the faults section of `path`."""
    rows, meta, timelines = load(path)
    info = meta.get("faults", {})
    head = (
        "stack",
        "fault",
        "target",
        "requests",
        "failed",
        "by status",
        "worst ms",
        "recovery s",
        "blast radius",
        "restarts",
    )
    cells = [
        [
            page.swatch(charts.colour(r.mesh)) + escape(r.mesh),
            escape(r.fault),
            escape(r.target),
            str(r.requests),
            str(r.failed),
            escape(r.failed_by_status or "none"),
            _ms(r.worst_ms),
            "not within the run" if math.isnan(r.recovery_s) else f"{r.recovery_s:.2f}",
            escape(r.blast_radius or "none"),
            escape(r.restarts or "none"),
        ]
        for r in rows.itertuples(index=False)
    ]
    skipped = info.get("not_applicable") or []
    skipped_html = (
        "<p class='note'>Not applicable (the stack has no such part): "
        + ", ".join(escape(f"{s['mesh']} {s['fault']}") for s in skipped)
        + ".</p>"
        if skipped
        else ""
    )
    problems = info.get("problems") or []
    problems_html = "".join(
        f"<div class='banner warn'>Problem: {escape(p)}</div>" for p in problems
    )
    if meta.get("interrupted"):
        problems_html += "<div class='banner warn'>The run was interrupted: rows are missing.</div>"
    rate = info.get("rate")
    parts = [
        f"<section><h2>Faults: {escape(path.resolve().name)}</h2>",
        f"<p>Every stack at {escape(_num(rate))} req/s open loop "
        f"({'calibrated' if info.get('rate_source') == 'calibrated' else 'given'}); each fault "
        f"{escape(_num(info.get('before_s')))} s into its own Locust run, watched for "
        f"{escape(_num(info.get('after_s')))} s after (plus the pause). Recovery: the time "
        "from the fault until, for a full second, every one-second window holds the offered "
        "rate within 5 % (at least one request) with no failure. Worst latency: after the "
        "fault, from each request's intended send time. Blast radius: the services whose "
        "5xx count rose. Restarts: the supervisor's, during the run.</p>",
        problems_html,
        page.table(head, cells, numeric_from=3),
        skipped_html,
    ]
    for timeline in timelines:
        parts.append(
            figures.embed(
                timeline_figure(timeline),
                escape(
                    f"{timeline['mesh']}: {timeline['fault']} on {timeline['target']}; rate "
                    f"and errors per {timeline['bucket_ms']} ms"
                ),
            )
        )
    parts.append("</section>")
    return "\n".join(parts)


def timeline_figure(timeline: dict[str, Any]) -> go.Figure:
    """Achieved rate and errors around one fault (t = 0), offered rate and recovery marked."""
    title = f"{timeline['mesh']}: {timeline['fault']} ({timeline['target']})"
    fig = charts.figure(title, "seconds since the fault", "requests per second", height=360)
    colour = charts.colour(timeline["mesh"])
    fig.add_trace(
        go.Scatter(
            x=timeline["t_s"],
            y=timeline["rps"],
            name="completed",
            mode="lines",
            line={"color": colour, "shape": "hv"},
        )
    )
    fig.add_trace(
        go.Bar(
            x=timeline["t_s"],
            y=timeline["errors_per_s"],
            name="failed",
            marker={"color": ERROR_COLOUR},
            offset=0,
            width=timeline["bucket_ms"] / 1000,
        )
    )
    fig.add_hline(
        y=timeline["offered_rps"], line={"color": "#888", "dash": "dot"}, annotation_text="offered"
    )
    fig.add_vline(x=0, line={"color": ERROR_COLOUR}, annotation_text="fault")
    if timeline.get("pause_s"):
        fig.add_vrect(x0=0, x1=float(timeline["pause_s"]), fillcolor="#F0E442", opacity=0.25)
    if timeline.get("recovery_s") is not None:
        fig.add_vline(
            x=float(timeline["recovery_s"]),
            line={"color": "#009E73", "dash": "dash"},
            annotation_text="recovered",
        )
    fig.update_layout(legend={"title": {"text": ""}}, bargap=0)
    return fig


def _num(value: Any) -> str:
    return "?" if value is None else f"{float(value):g}"


def _ms(value: float) -> str:
    return "n/a" if math.isnan(value) else f"{value:.1f}"
