"""Plotly figures of a report. One colour per stack in every chart; units on every axis.

Text that comes from result files (stack, level, run and role names) is
HTML-escaped before it reaches plotly, whose labels accept a subset of HTML.
Shapes and annotations are avoided: on a log axis plotly wants their
coordinates as log10, so reference lines are drawn as traces.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from html import escape

import plotly.graph_objects as go
from hdrh.histogram import HdrHistogram

from loadtests import latency
from reports import page, stats
from reports.load import split_stack, stack_order
from reports.summary import PERCENTILES, THROUGHPUT, RunSummary
from reports.whatif import ADVANTAGES, Sensitivity

#: Fixed stack colours (Okabe-Ito, colour-blind safe); unknown stacks take the spares.
STACK_COLOURS = {
    "dpumesh": "#0072B2",
    "envoy": "#D55E00",
    "nomesh": "#009E73",
    "nodeproxy": "#CC79A7",
}
SPARE_COLOURS = ("#E69F00", "#56B4E9", "#000000", "#F0E442")
#: Line dash per run when several runs share a chart (first run solid).
RUN_DASHES = ("solid", "dash", "dot", "dashdot", "longdash")
#: Bar pattern per role in the per-role charts (the colour stays the stack's).
ROLE_PATTERNS = {
    "app": "",
    "sidecar": "/",
    "gateway": "\\",
    "nodeproxy": "-",
    "dpu-daemon": "x",
    "dpa-daemon": ".",
    "loadgen": "+",
}
FONT = "system-ui, -apple-system, 'Segoe UI', Roboto, 'DejaVu Sans', sans-serif"


#: Colour and marker of each what-if advantage series (keys of `reports.whatif.ADVANTAGES`).
ADVANTAGE_STYLE = {
    "throughput": ("#0072B2", "circle"),
    "p99": ("#CC79A7", "square"),
    "cpu_host": ("#E69F00", "diamond"),
}
SLO_COLOUR = "#B00020"


def colour(stack: str, shown: Iterable[str] = ()) -> str:
    """The stack's colour, the same in every chart of a report.

    A what-if variant (``dpumesh@dpu_speed=0.5``) takes its mesh's hue, shaded
    dark to light by its rank among that mesh's variants in `shown` (the
    stacks drawn together), so variants are told apart and still read as dpumesh.
    """
    mesh, variant = split_stack(stack)
    key = mesh if variant else stack
    base = STACK_COLOURS.get(key) or SPARE_COLOURS[sum(map(ord, key)) % len(SPARE_COLOURS)]
    if not variant:
        return base
    variants = [s for s in stack_order({*shown, stack}) if split_stack(s)[0] == mesh and "@" in s]
    return _shade(base, variants.index(stack), len(variants))


def _shade(hex_colour: str, index: int, count: int) -> str:
    """`hex_colour` darkened (first of `count`) through lightened (last)."""
    t = -0.45 + 0.95 * index / (count - 1) if count > 1 else 0.0
    rgb = [int(hex_colour[i : i + 2], 16) for i in (1, 3, 5)]
    mixed = [c * (1 + t) if t < 0 else c + (255 - c) * t for c in rgb]
    return "#" + "".join(f"{round(c):02X}" for c in mixed)


def figure(title: str, x_title: str, y_title: str, height: int = 460) -> go.Figure:
    fig = go.Figure()
    fig.update_layout(
        title={"text": title, "x": 0.01, "xanchor": "left"},
        font={"family": FONT, "size": 13},
        height=height,
        margin={"l": 70, "r": 20, "t": 60, "b": 60},
        hovermode="closest",
        legend={"title": {"text": "stack"}},
        template="plotly_white",
    )
    fig.update_xaxes(title_text=x_title, showline=True, linecolor="#888", mirror=True)
    fig.update_yaxes(title_text=y_title, showline=True, linecolor="#888", mirror=True)
    return fig


@dataclass(frozen=True)
class CdfSeries:
    """One curve of a CDF chart: a stack's merged histogram, optionally of one of several runs."""

    stack: str
    hist: HdrHistogram
    run_label: str = ""
    run_index: int = 0


def cdf_figure(series: Sequence[CdfSeries], title: str) -> go.Figure:
    """Latency CDF per stack from merged histograms (log x in µs)."""
    fig = figure(title, "latency (µs, log scale)", "fraction of requests ≤ latency")
    shown = [s.stack for s in series]
    for s in series:
        points = latency.cdf(s.hist)
        name = escape(s.stack + (f" ({s.run_label})" if s.run_label else ""))
        fig.add_trace(
            go.Scatter(
                x=[v for v, _ in points],
                y=[f for _, f in points],
                mode="lines",
                name=name,
                line={
                    "color": colour(s.stack, shown),
                    "dash": RUN_DASHES[s.run_index % len(RUN_DASHES)],
                    "shape": "hv",
                },
                hovertemplate=f"{name}<br>%{{y:.2%}} of requests ≤ %{{x:,}} µs<extra></extra>",
            )
        )
    _log_scale(fig, "x")
    fig.update_yaxes(range=[0, 1.02], tickformat=".0%")
    return fig


def percentile_figure(summary: RunSummary) -> go.Figure:
    """p50/p90/p99/p99.9 per stack at the headline level, whiskers = 95 % bootstrap CI."""
    fig = figure(
        f"Latency percentiles at {escape(summary.level)}: median over repetitions, 95% CI",
        "percentile",
        "latency (µs, log scale)",
    )
    labels = [m.label.replace(" latency", "") for m in PERCENTILES]
    for label, stack in summary.stacks.items():
        ests = [stack.values[m.key] for m in PERCENTILES]
        whiskers = [_whiskers(e) for e in ests]
        fig.add_trace(
            go.Bar(
                x=labels,
                y=[e.value for e in ests],
                name=escape(label),
                marker_color=colour(label, summary.stacks),
                error_y={
                    "type": "data",
                    "symmetric": False,
                    "array": [w[0] for w in whiskers],
                    "arrayminus": [w[1] for w in whiskers],
                    "color": "#333",
                },
                customdata=[[_ci_text(e)] for e in ests],
                hovertemplate=f"{escape(label)} %{{x}}: %{{y:,.0f}} µs<br>%{{customdata[0]}}"
                "<extra></extra>",
            )
        )
    fig.update_layout(barmode="group")
    _log_scale(fig, "y")
    return fig


def rate_latency_figure(summary: RunSummary) -> go.Figure:
    """p50 and p99 against offered rate (open loop), SLO line and each stack's knee.

    Every measured rate is drawn (ladder and refinement probes), median over
    the repetitions that ran it. The knee marker sits at the stack's max clean
    throughput (median over repetitions, on its p99 curve); a stack clean at
    the ladder's top gets a triangle labelled "≥ top" instead of the star.
    """
    slo = summary.run.slo_p99_ms
    fig = figure(
        "Latency vs offered rate (open loop, median over repetitions): p99 solid, p50 dotted,"
        " ★ = max clean throughput, ▲ = clean at the top rate (≥)",
        "offered rate (requests/s)",
        "latency (ms, log scale)",
    )
    for label, stack in summary.stacks.items():
        if not stack.curve:
            continue
        tint, group = colour(label, summary.stacks), escape(label)
        x = [p.offered_rps for p in stack.curve]
        for field, dash in (("p99_us", "solid"), ("p50_us", "dot")):
            name = escape(f"{label} {field[:3]}")
            fig.add_trace(
                go.Scatter(
                    x=x,
                    y=[_ms(getattr(p, field)) for p in stack.curve],  # None: a gap
                    mode="lines+markers",
                    name=name,
                    legendgroup=group,
                    line={"color": tint, "dash": dash},
                    hovertemplate=f"{name}: %{{y:,.3f}} ms at %{{x:,}} req/s<extra></extra>",
                )
            )
        best = stack.values[THROUGHPUT.key]
        if not best.value:
            continue
        top = best.bound == "≥"
        fig.add_trace(
            go.Scatter(
                x=[best.value],
                y=[_p99_at(stack.curve, best.value) / 1000],
                mode="markers+text" if top else "markers",
                text=["≥ top"] if top else None,
                textposition="top center",
                name=escape(f"{label} max clean"),
                legendgroup=group,
                marker={
                    "symbol": "triangle-up" if top else "star",
                    "size": 16 if top else 18,
                    "color": tint,
                    "line": {"color": "#000", "width": 1},
                },
                hovertemplate=f"{group} max clean throughput: "
                f"{escape(page.bounded(best, 'req/s'))}"
                + (" (clean at the ladder's top: a lower bound)" if top else "")
                + " (p99 %{y:,.3f} ms)<extra></extra>",
            )
        )
    rates = [p.offered_rps for s in summary.stacks.values() for p in s.curve]
    if slo is not None and rates:
        fig.add_trace(
            go.Scatter(
                x=[min(rates), max(rates)],
                y=[slo, slo],
                mode="lines",
                name=f"SLO: p99 ≤ {slo:g} ms",
                line={"color": SLO_COLOUR, "dash": "dash"},
                hovertemplate=f"SLO p99 {slo:g} ms<extra></extra>",
            )
        )
    _log_scale(fig, "y")
    return fig


def _ms(us: float) -> float | None:
    """µs as ms; None for a level without latency (no request succeeded: infinite)."""
    return us / 1000 if math.isfinite(us) else None


def _p99_at(curve: Sequence[stats.LevelPoint], rate: float) -> float:
    """The p99 curve at `rate`: geometric between neighbours (a straight line on a log axis)."""
    below = [p for p in curve if p.offered_rps <= rate] or curve[:1]
    above = [p for p in curve if p.offered_rps >= rate] or curve[-1:]
    lo, hi = below[-1], above[0]
    if hi.offered_rps == lo.offered_rps:
        return lo.p99_us
    t = (rate - lo.offered_rps) / (hi.offered_rps - lo.offered_rps)
    return lo.p99_us * (hi.p99_us / lo.p99_us) ** t


def sensitivity_figure(sens: Sensitivity) -> go.Figure:
    """dpumesh's advantages over the baseline against the swept value, break-even marked.

    Each series is oriented so that > 1 means dpumesh is better; whiskers are
    95 % bootstrap intervals. Hollow markers: variants whose DPU model this
    machine could not give (`Variant.unmet`); triangles: bounds (a maximum at
    the ladder's top).
    """
    param = escape(sens.param)
    fig = figure(
        f"What-if: dpumesh's advantage over {escape(sens.baseline)} against {param}"
        " (> 1: dpumesh better)",
        param + (" (log scale)" if sens.log_x else ""),
        "advantage (ratio, > 1: dpumesh better)",
    )
    fig.update_layout(legend={"title": {"text": "advantage"}})
    ys: list[float] = [1.0]
    for _, key, _, _ in ADVANTAGES:
        tint, symbol = ADVANTAGE_STYLE[key]
        shown = [(v, e) for v in sens.variants if (e := v.advantages[key]).value is not None]
        if not shown:
            continue
        whiskers = [_whiskers(e) for _, e in shown]
        name = escape(sens.label(key))
        ys += [y for _, e in shown for y in (e.value, e.low, e.high) if y is not None]
        fig.add_trace(
            go.Scatter(
                x=[v.value for v, _ in shown],
                y=[e.value for _, e in shown],
                mode="lines+markers",
                name=name,
                line={"color": tint},
                marker={
                    "size": 11,
                    "color": tint,
                    "symbol": [
                        _bound_symbol(symbol, e.bound) + ("-open" if v.unmet else "")
                        for v, e in shown
                    ],
                    "line": {"color": tint, "width": 2},
                },
                error_y={
                    "type": "data",
                    "symmetric": False,
                    "array": [w[0] for w in whiskers],
                    "arrayminus": [w[1] for w in whiskers],
                    "color": tint,
                },
                customdata=[[escape(v.label), escape(page.factor(e))] for v, e in shown],
                hovertemplate=f"{name}<br>%{{customdata[0]}}: %{{customdata[1]}}<extra></extra>",
            )
        )
    values = [v.value for v in sens.variants]
    if values:
        fig.add_trace(
            go.Scatter(
                x=[min(values), max(values)],
                y=[1, 1],
                mode="lines",
                name="break-even (= 1)",
                line={"color": "#555", "dash": "dash"},
                hoverinfo="skip",
            )
        )
    for x in sens.break_even.crossings:
        fig.add_trace(
            go.Scatter(
                x=[x, x],
                y=[min(ys), max(ys)],
                mode="lines+text",
                text=["", f"break-even ≈ {x:.3g}"],
                textposition="top right",
                name=f"throughput break-even: {param} ≈ {x:.3g}",
                line={"color": SLO_COLOUR, "dash": "dot"},
                hovertemplate=f"throughput ratio = 1 at {param} ≈ {x:.3g}<extra></extra>",
            )
        )
    if sens.log_x:
        _log_scale(fig, "x")
    return fig


def _bound_symbol(symbol: str, bound: stats.Bound) -> str:
    return {"": symbol, "≥": "triangle-up", "≤": "triangle-down"}[bound]


def throughput_figure(summary: RunSummary) -> go.Figure:
    """Achieved against offered rate per stack (open loop) with the y = x line."""
    fig = figure(
        "Achieved vs offered throughput (open loop, median over repetitions)",
        "offered rate (requests/s)",
        "achieved rate (requests/s)",
    )
    top = 0.0
    for label, stack in summary.stacks.items():
        if not stack.curve:
            continue
        top = max(top, *(p.offered_rps for p in stack.curve))
        fig.add_trace(
            go.Scatter(
                x=[p.offered_rps for p in stack.curve],
                y=[p.achieved_rps for p in stack.curve],
                mode="lines+markers",
                name=escape(label),
                line={"color": colour(label, summary.stacks)},
                hovertemplate=f"{escape(label)}: %{{y:,.1f}} achieved at %{{x:,}} offered req/s"
                "<extra></extra>",
            )
        )
    if top:
        fig.add_trace(
            go.Scatter(
                x=[0, top],
                y=[0, top],
                mode="lines",
                name="achieved = offered",
                line={"color": "#888", "dash": "dash"},
                hoverinfo="skip",
            )
        )
    return fig


def roles_figure(summary: RunSummary, field: str, title: str, y_title: str) -> go.Figure:
    """A roles.csv quantity per stack, split host / offload / loadgen, stacked by role.

    Bars keep the stack's colour; roles are told apart by pattern and label.
    Values are medians over repetitions at the headline level.
    """
    fig = figure(title, "stack / side", y_title)
    roles_df = summary.run.roles
    rows = roles_df[roles_df["level"] == summary.level]
    order = {role: i for i, role in enumerate(ROLE_PATTERNS)}
    roles = sorted(set(rows["role"]), key=lambda r: (order.get(r, len(order)), r))
    # Median over repetitions per role, stack and side; stacks in the summary's order.
    medians = rows.groupby(["role", "stack", "side"])[field].median().dropna()
    for role in roles:
        shown = [
            (stack, side, value)
            for stack in summary.stacks
            for (r, s, side), value in medians.items()
            if r == role and s == stack
        ]
        if not shown:
            continue
        xs = [[escape(stack) for stack, _, _ in shown], [escape(side) for _, side, _ in shown]]
        ys = [float(value) for _, _, value in shown]
        colours = [colour(stack, summary.stacks) for stack, _, _ in shown]
        fig.add_trace(
            go.Bar(
                x=xs,
                y=ys,
                name=escape(role),
                marker={
                    "color": colours,
                    "pattern": {
                        "shape": ROLE_PATTERNS.get(role, "-"),
                        "fgcolor": "#fff",
                        "solidity": 0.35,
                    },
                    "line": {"color": "#fff", "width": 1},
                },
                text=[escape(role)] * len(ys),
                textposition="inside",
                insidetextanchor="middle",
                hovertemplate=f"{escape(role)} (%{{x}}): %{{y:,.3f}} {escape(y_title)}"
                "<extra></extra>",
                showlegend=False,
            )
        )
    fig.update_layout(barmode="stack", uniformtext={"minsize": 10, "mode": "hide"})
    return fig


def _log_scale(fig: go.Figure, axis: str) -> None:
    """Make `axis` logarithmic with 1-2-5 ticks labelled in full over the plotted values.

    (Plotly's own log ticks label minor steps "2", "5", which reads as 2 µs.)
    """
    values = [v for t in fig.data for v in getattr(t, axis) or () if v is not None and v > 0]
    settings: dict[str, object] = {"type": "log"}
    if values:
        lo, hi = min(values), max(values)
        ticks = [
            m * 10.0**e
            for e in range(math.floor(math.log10(lo)) - 1, math.ceil(math.log10(hi)) + 1)
            for m in (1, 2, 5)
        ]
        ticks = [t for t in ticks if lo / 2.5 <= t <= hi * 2.5]
        settings |= {"tickvals": ticks, "ticktext": [f"{t:,.6g}" for t in ticks]}
    fig.update_xaxes(**settings) if axis == "x" else fig.update_yaxes(**settings)


def _whiskers(e: stats.Estimate) -> tuple[float, float]:
    """(above, below) error-bar lengths of an estimate's interval; zero when it has none."""
    if e.value is None or e.low is None or e.high is None:
        return 0.0, 0.0
    return e.high - e.value, e.value - e.low


def _ci_text(e: stats.Estimate) -> str:
    if e.low is None or e.high is None:
        return f"no CI (n={e.n})"
    return f"95% CI {e.low:,.0f}–{e.high:,.0f} µs (n={e.n})"
