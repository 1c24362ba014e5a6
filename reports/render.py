"""Assemble the HTML report of one results directory, or a comparison of several.

`write_report([DIR])` writes ``DIR/report.html``; with several directories
(e.g. before / after a change) the first one's ``report.html`` (or `out`)
gets a cross-run comparison followed by every run's own sections. Problems
in the data and failed self-checks are shown at the top, never hidden.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from html import escape
from pathlib import Path
from typing import Any
from urllib.parse import quote

from harness.measure import speed
from harness.measure.checks import MAX_ERROR_RATE, MIN_DELIVERY
from harness.measure.metrics import CPU_CLASSES_TEXT
from harness.names import ENVOY_MESHES
from harness.output.schema import META_JSON, RESULTS_CSV, ROLES_CSV
from reports import charts, faults, page, stats, whatif
from reports.load import Run, load_run, stack_order
from reports.stats import Estimate
from reports.summary import (
    CROSS_SHARE,
    HEADLINE,
    LATENCY_DIFFERENCES,
    P50,
    THROUGHPUT,
    RunSummary,
    compare_latency,
    compare_runs,
    summarize,
)

REPORT_HTML = "report.html"

METHODS = f"""
<p class='note'>Every number is the <b>median over repetitions</b>; brackets give its 95%
confidence interval, a percentile bootstrap over repetitions ({stats.RESAMPLES} resamples,
fixed seed). With few repetitions the interval is close to the range of the repetitions and
under-covers (n=2: it is that range); n=1 gives none. Ratios resample both sides independently.
<b>Max clean throughput</b>: per repetition, the highest open-loop offered rate (ladder and
refinement probes) whose achieved/offered ≥ {MIN_DELIVERY}, failures/requests ≤
{MAX_ERROR_RATE:.1%}, p99 ≤ the SLO and self-checks passed (0 when none: shown n/a); the
number is the lower median of those over repetitions (with an even count the lower of the two
middle ones, so it is always a rate that was measured), its interval a bootstrap over
repetitions. A
median at the ladder's top rate is shown <b>≥ top</b>: that stack's knee was not reached, so it
is a lower bound (no interval; a ratio with it is a bound too, and undetermined when both sides
are). <b>Latency and CPU</b> in the headline are at the <b>common rate</b>: the highest ladder
rate at which every stack's median over repetitions is clean, so every stack is compared at a
load it carries within the SLO (without one: the closed-loop level, said so in the table's
note). CPU-ms per request equals vCPU per 1000 req/s.
{CPU_CLASSES_TEXT[0].upper()}{CPU_CLASSES_TEXT[1:]}. MB = MiB.</p>
"""


def write_report(
    dirs: Sequence[Path],
    out: Path | None = None,
    level: str | None = None,
    summaries: Sequence[RunSummary] | None = None,
) -> Path:
    """Render the report of `dirs` and return its path.

    `level` picks the load level of the headline's latency and CPU (default:
    the common rate, else the closed-loop level; see `summary.headline_level`).
    `summaries`: the runs of `dirs` already summarised (the runner's, just printed).
    """
    if not dirs:
        raise ValueError("no results directory given")
    out = Path(out) if out is not None else Path(dirs[0]) / REPORT_HTML
    fault_dirs = [Path(d) for d in dirs if faults.is_faults_dir(Path(d))]
    if summaries is None:
        runs = _load_runs([Path(d) for d in dirs if Path(d) not in fault_dirs])
        summaries = [summarize(run, level) for run in runs]
    runs = [s.run for s in summaries]
    figures = page.Figures()
    labels = [r.label for r in runs] + [d.resolve().name for d in fault_dirs]
    title = "DPUmesh bench: " + " vs ".join(labels)
    body = [f"<h1>{escape(title)}</h1>", METHODS if runs else ""]
    if len(summaries) > 1:
        body.append(_comparison(summaries, figures))
    for summary in summaries:
        body.append(_run_section(summary, figures, out.parent, several=len(summaries) > 1))
    body.extend(faults.section(d, figures) for d in fault_dirs)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(page.document(title, "\n".join(body)), encoding="utf-8")
    tmp.replace(out)
    return out


def _load_runs(dirs: list[Path]) -> list[Run]:
    """Load every directory; labels are the directory names, made unique."""
    runs: list[Run] = []
    for d in dirs:
        label = d.resolve().name
        if any(r.label == label for r in runs):
            label = f"{label} #{len(runs) + 1}"
        runs.append(load_run(d, label))
    return runs


# --- one run ----------------------------------------------------------------------


def _run_section(summary: RunSummary, figures: page.Figures, out_dir: Path, several: bool) -> str:
    run = summary.run
    prefix = f"{run.label}: " if several else ""
    n_reps = run.results["rep"].nunique()
    chart_html = _charts(summary, figures, prefix)  # first: it finds missing histograms
    sensitivity_html = _sensitivity(summary, figures)  # and this one inconsistent variants
    probes = [lv for lv in run.levels() if lv.startswith("refine-")]
    levels = [lv for lv in run.levels() if lv not in probes]
    probes_text = f" and {len(probes)} refinement probe(s)" if probes else ""
    parts = [
        f"<section><h2>Results: {escape(run.label)}</h2>",
        f"<p>Directory <code>{escape(str(run.path))}</code>; stacks "
        f"{', '.join(escape(m) for m in run.stacks())}; {n_reps} repetition(s); "
        f"levels {', '.join(escape(lv) for lv in levels)}{probes_text}.</p>",
        _banners(run),
        _model(run.meta.get("dpu_model")),
        _transport(run),
        _nodes(summary),
        _headline(summary),
        sensitivity_html,
        _overhead(summary),
        chart_html,
        f"<h3>{escape(prefix)}self-checks</h3>",
        _checks_table(run),
        f"<h3>{escape(prefix)}fairness checklist</h3>",
        _fairness(run.meta.get("fairness")),
        f"<h3>{escape(prefix)}run metadata</h3>",
        _metadata(run.meta),
        f"<h3>{escape(prefix)}files</h3>",
        _links(run, out_dir),
        "</section>",
    ]
    return "\n".join(parts)


def _transport(run: Run) -> str:
    """Whether the Envoy stacks' proxy-to-proxy hops ran mutual TLS (results.csv's `mtls`)."""
    rows = run.results[run.results["mesh"].isin(ENVOY_MESHES)]
    if rows.empty:
        return ""
    stacks = ", ".join(escape(s) for s in stack_order(rows["stack"]))
    if not rows["mtls"].any():
        return (
            f"<p class='note'><b>Transport.</b> The Envoy stacks ({stacks}) ran plaintext "
            "between proxies; real meshes run mutual TLS by default, a large part of a proxy's "
            "CPU (<code>--mtls true</code>).</p>"
        )
    plain = stack_order(rows.loc[~rows["mtls"].astype(bool), "stack"])
    text = f"<p class='note'><b>Transport.</b> Proxy-to-proxy hops of {stacks} ran mutual TLS"
    text += " (certificates from a local CA per stack; app-to-local-proxy hops plain, as in Istio)"
    if plain:
        text += f"; these rows ran plaintext: {escape(', '.join(plain))}"
    return text + ".</p>"


def _nodes(summary: RunSummary) -> str:
    """Where the services ran (DESIGN §8) and, over several nodes, each stack's cross-node share."""
    run = summary.run
    if not run.nodes:
        return ""
    shares = ", ".join(
        f"{escape(label)} {page.estimate(_percent(s.values[CROSS_SHARE.key]), '%')}"
        for label, s in summary.stacks.items()
    )
    text = (
        f"<p class='note'><b>Nodes.</b> The services ran on {run.nodes} node(s), each a network "
        "namespace with its own address on a bridge, the load generator in one more (the "
        "placement per service is in meta.json's <code>nodes</code>). The nodes share this "
        "machine's CPU sets: every node's apps and proxies run on the host set, every node's "
        "DPU daemons on the dpu set (one DPU's capacity for all nodes), so N nodes' work "
        "competes for one machine's cores, alike for every stack. "
    )
    if run.nodes > 1:
        text += (
            "Share of the requests each stack carried that crossed nodes, at "
            f"{escape(summary.level)}: {shares}."
        )
    return text + "</p>"


def _scaled(e: Estimate, factor: float) -> Estimate:
    def one(v: float | None) -> float | None:
        return None if v is None else factor * v

    return Estimate(one(e.value), one(e.low), one(e.high), e.n, e.bound)


def _percent(e: Estimate) -> Estimate:
    """A share as a percentage."""
    return _scaled(e, 100)


def _ms(e: Estimate) -> Estimate:
    """A latency in µs as ms."""
    return _scaled(e, 1e-3)


def _model(model: dict | None) -> str:
    """The DPU model and CPU placement in force in one sentence (DESIGN §5); what was not met."""
    if not model:
        return "<p class='banner warn'>No DPU model recorded (a run older than placement).</p>"
    lines = [f"<p class='model'><b>Model.</b> {escape(model.get('sentence', ''))}.</p>"]
    for pair in model.get("overlaps", []):
        lines.append(f"<p class='note'>CPU sets {escape(' and '.join(pair))} share cores.</p>")
    for unmet in model.get("unmet", []):
        lines.append(f"<p class='banner warn'>Not met on this machine: {escape(unmet)}.</p>")
    return "\n".join(lines)


def _banners(run: Run) -> str:
    """Data problems and the self-check tally, at the top of the run's section."""
    out = [f"<div class='banner warn'>Data problem: {escape(p)}</div>" for p in run.problems]
    checks = _checks(run)
    failed = [c for c in checks if _failed(c)]
    if failed:
        out.append(
            f"<div class='banner fail'><b>{len(failed)} of {len(checks)} self-checks FAILED</b>"
            " (listed under self-checks below); numbers from those runs are suspect.</div>"
        )
    elif checks:
        noted = sum(not c["ok"] for c in checks)
        findings = f" ({noted} informational, not met: listed below)" if noted else ""
        out.append(f"<div class='banner ok'>All {len(checks)} self-checks passed{findings}.</div>")
    else:
        out.append("<div class='banner warn'>No self-check results were recorded.</div>")
    out.append(_machine_speed(run.meta.get("machine_speed")))
    return "\n".join(out)


def _machine_speed(record: dict | None) -> str:
    """How much the host CPUs' own speed varied across stack starts, when it is notable."""
    probes = [s["host_mloops_per_s"] for s in (record or {}).get("segments", [])]
    varied = speed.spread(probes)
    if varied is None or varied <= speed.NOTABLE_SPREAD:
        return ""
    return (
        "<div class='banner warn'>This machine's host CPUs ran between "
        f"{min(probes):.0f} and {max(probes):.0f} M loop iterations/s across the stack starts "
        f"(a spread of {varied:.0%}; meta.json <code>machine_speed</code>): differences between "
        "repetitions of up to that size may be the machine's rather than the stacks'.</div>"
    )


def _headline(summary: RunSummary) -> str:
    run, choice = summary.run, summary.headline
    head = ["stack", "mode", *(f"{m.label} ({m.unit})" for m in HEADLINE)]
    rows = []
    for label, stack in summary.stacks.items():
        swatch = page.swatch(charts.colour(label, summary.stacks))
        cells = [swatch + escape(label), escape(stack.modes)]
        for m in HEADLINE:
            text = page.estimate(stack.values[m.key], zero_is_na=m is THROUGHPUT)
            text += "".join(page.ratio(stack.vs[b][m.key], b) for b in stack.vs)
            cells.append(text)
        rows.append(cells)
    n = max((s.values[P50.key].n for s in summary.stacks.values()), default=0)
    slo = run.slo_p99_ms
    slo_text = (
        f"SLO p99 ≤ {slo:g} ms"
        if slo is not None
        else "<b>no slo_p99_ms in meta.json: the p99 criterion was not applied</b>"
    )
    top = run.ladder_top
    top_text = f"the ladder's top rate, {top:g} req/s" if top is not None else "the top rate"
    level = f"<code>{escape(choice.level)}</code>"
    common = " (common rate)" if choice.common_rate is not None else ""
    why = f"Latency and CPU at level {level}: {escape(choice.why)}."
    return (
        f"<h3>Headline at level {level}{common}</h3>"
        + (f"<p class='banner warn'>{why}</p>" if choice.fallback else "")
        + page.table(head, rows, numeric_from=2)
        + f"<p class='note'>{why} Median over up to {n} repetition(s). Max clean throughput:"
        " each repetition's highest clean open-loop rate, lower median over repetitions,"
        f" {slo_text};"
        f" ≥ = clean at {top_text} (a lower bound); n/a = no open-loop rate was clean."
        " × = ratio to that baseline stack.</p>"
    )


def _sensitivity(summary: RunSummary, figures: page.Figures) -> str:
    """A what-if run's sensitivity: chart, verdict, table and the variants' models."""
    record = summary.run.whatif
    if record is None:
        return ""
    sens = whatif.sensitivity(summary)
    if sens is None:
        return (
            "<p class='banner warn'>What-if run without an envoy or nomesh stack: no"
            " baseline, so no sensitivity chart.</p>"
        )
    base, param = escape(sens.baseline), escape(sens.param)
    notes = []
    if sens.baseline != "envoy":
        notes.append(f"envoy is not in this run: dpumesh is compared with {base}.")
    if summary.headline.fallback:
        notes.append(
            f"p99 and host CPU at <code>{escape(sens.level)}</code>, not at a common rate"
            " (no ladder rate was clean for every stack)."
        )
    rows, unmet = [], []
    for v in sens.variants:
        swatch = page.swatch(charts.colour(v.label, summary.stacks))
        model = "<b>not met</b> (see below)" if v.unmet else "met"
        cells = [page.number(v.value), swatch + escape(v.label), model]
        cells += [escape(page.factor(v.advantages[key])) for _, key, _, _ in whatif.ADVANTAGES]
        rows.append(cells)
        unmet += [f"<li><code>{escape(v.label)}</code>: {escape(u)}</li>" for u in v.unmet]
    if unmet:
        notes.append(
            "Hollow markers: variants whose DPU model this machine cannot give, measured"
            f" as far as it can:<ul>{''.join(unmet)}</ul>"
        )
    head = [sens.param, "stack", "model", *(sens.label(k) for _, k, _, _ in whatif.ADVANTAGES)]
    verdict = whatif.verdict(sens.break_even, sens.param, sens.baseline)
    chart = figures.embed(
        charts.sensitivity_figure(sens),
        "Every ratio is oriented so that above the dashed line (1) dpumesh is better; whiskers:"
        f" 95% bootstrap CI; dotted red: where the throughput ratio crosses 1 (linear"
        f" interpolation between adjacent values of {param}); triangles: bounds.",
    )
    return (
        f"<h3>What-if: dpumesh's advantage over {base} against {param}</h3>"
        f"<p class='model'><b>Break-even.</b> {escape(verdict)} (max clean throughput).</p>"
        + chart
        + page.table(head, rows, numeric_from=3)
        + f"<div class='note'>p99 and host CPU at <code>{escape(sens.level)}</code>; &gt; 1"
        " means dpumesh is better in every column. "
        + " ".join(notes)
        + "</div>"
        + _variant_models(record)
    )


def _variant_models(record: dict[str, Any]) -> str:
    """Each what-if variant's DPU model sentence, folded away."""
    models = record.get("models")
    if not isinstance(models, dict) or not models:
        return ""
    items = "".join(
        f"<li><code>{escape(label)}</code>: {escape(str(m.get('sentence', '')))}</li>"
        for label, m in models.items()
        if isinstance(m, dict)
    )
    return f"<details><summary>the variants' DPU models</summary><ul>{items}</ul></details>"


def _overhead(summary: RunSummary) -> str:
    if "nomesh" not in summary.stacks:
        return "<p class='note'>Mesh overhead per downstream call: no nomesh stack in this run.</p>"
    rows, faster_than_floor = [], []
    for label, stack in summary.stacks.items():
        if label == "nomesh":
            continue
        overhead = stack.overhead_per_call
        if overhead is not None and overhead.value is not None and overhead.value < 0:
            faster_than_floor.append(label)
        calls = (
            f"{page.number(stack.calls_per_req)} ({escape(stack.calls_source)})"
            if stack.calls_per_req
            else "unknown (no downstream_calls_per_req in results.csv or meta.json config)"
        )
        value = page.estimate(stack.overhead_per_call, "µs") if stack.overhead_per_call else "n/a"
        swatch = page.swatch(charts.colour(label, summary.stacks))
        rows.append([swatch + escape(label), calls, value])
    return (
        "<h3>Mesh overhead per downstream call</h3>"
        + page.table(["stack", "downstream calls per request", "(p50 − nomesh p50) / calls"], rows)
        + f"<p class='note'>p50 at level <code>{escape(summary.level)}</code>; 95% CI by"
        " bootstrap over both stacks' repetitions.</p>" + _below_floor_note(faster_than_floor)
    )


def _below_floor_note(meshes: list[str]) -> str:
    """Why an overhead can be negative: nomesh is the floor for proxies, not for the runtime."""
    if not meshes:
        return ""
    names = ", ".join(f"<code>{escape(m)}</code>" for m in meshes)
    return (
        f"<p class='note'>Negative overhead ({names}): that stack answered faster than"
        " nomesh at this level. nomesh has no proxy, but its apps still parse and send"
        " every call as HTTP in Python (gunicorn, urllib3); a stack whose runtime needs"
        " less CPU per request than that gets ahead once the machine's cores are busy."
        " Compare the CPU per request columns above; the difference is the runtime's,"
        " not a mesh that costs less than nothing.</p>"
    )


def _charts(summary: RunSummary, figures: page.Figures, prefix: str) -> str:
    run, level = summary.run, summary.level
    series = []
    for stack in summary.stacks:
        hist = run.merged_histogram(stack, level)
        if hist is not None:
            series.append(charts.CdfSeries(stack, hist))
    out = [f"<h3>{escape(prefix)}charts</h3>"]
    if series:
        cdf = charts.cdf_figure(
            series, f"Latency CDF at {escape(level)}: all repetitions' histograms merged"
        )
        out.append(figures.embed(cdf, "Exact merge of the HDR histograms (µs resolution)."))
    else:
        out.append("<p class='banner warn'>No latency histograms: CDF not drawn.</p>")
    out.append(
        figures.embed(
            charts.percentile_figure(summary),
            "Bars: median over repetitions of each percentile; whiskers: 95% bootstrap CI.",
        )
    )
    if any(s.curve for s in summary.stacks.values()):
        out.append(
            figures.embed(
                charts.rate_latency_figure(summary),
                "Dashed red line: the p99 SLO. ★: max clean throughput (median over"
                " repetitions of each one's highest clean rate); ▲ ≥ top: clean at the"
                " ladder's top rate, a lower bound.",
            )
        )
        out.append(
            figures.embed(
                charts.throughput_figure(summary),
                "Points below the grey line: the stack could not keep up with the offered rate.",
            )
        )
    else:
        out.append("<p class='note'>No open-loop levels: rate charts not drawn.</p>")
    if (run.roles["level"] == level).any():
        out.append(
            figures.embed(
                charts.roles_figure(
                    summary,
                    "cpu_ms_per_req",
                    f"CPU per request by role at {escape(level)}: host vs offload",
                    "CPU-ms per request",
                ),
                "Colour: stack; pattern and label: role. Hatched/patterned segments are "
                "non-app roles. Hover for values.",
            )
        )
        out.append(
            figures.embed(
                charts.roles_figure(
                    summary,
                    "rss_mean_mb",
                    f"Memory by role at {escape(level)}: mean RSS, host vs offload",
                    "RSS (MiB)",
                ),
                "Summed RSS of each role's processes, mean over the measurement window.",
            )
        )
    else:
        out.append(
            "<p class='banner warn'>No roles.csv rows at this level: role charts not drawn.</p>"
        )
    return "\n".join(out)


# --- self-checks, fairness, metadata, links --------------------------------------


def _checks(run: Run) -> list[dict[str, Any]]:
    """meta.json's checks plus results.csv's failed checks not already in them."""
    checks: list[dict[str, Any]] = []
    raw = run.meta.get("checks")
    for c in raw if isinstance(raw, list) else []:
        if isinstance(c, dict):
            checks.append({**c, "ok": bool(c.get("ok")), "source": META_JSON})
    known = {(c.get("mesh"), str(c.get("rep")), c.get("level"), c.get("name")) for c in checks}
    failed = run.results[~run.results["checks_ok"]]
    for r in failed.itertuples(index=False):
        for name in [c for c in r.checks.split(";") if c] or ["(unnamed)"]:
            if (r.stack, str(r.rep), r.level, name) not in known:
                checks.append(
                    {
                        "mesh": r.stack,
                        "rep": r.rep,
                        "level": r.level,
                        "name": name,
                        "ok": False,
                        "detail": "checks_ok=false",
                        "source": RESULTS_CSV,
                    }
                )
    return checks


def _failed(check: dict[str, Any]) -> bool:
    """A failed check; an informational one that is not ok is a finding (e.g. a rate past a
    stack's knee not delivered), shown, but not a failure of the run."""
    return not check["ok"] and not check.get("info")


def _checks_table(run: Run) -> str:
    checks = _checks(run)
    if not checks:
        return "<p class='banner warn'>No self-check results were recorded for this run.</p>"
    head = ["status", "stack", "rep", "level", "check", "detail", "from"]

    def rows(selected: list[dict[str, Any]]) -> list[list[str]]:
        return [
            [
                "ok" if c["ok"] else "FAIL" if _failed(c) else "info",
                *(escape(str(c.get(k, ""))) for k in ("mesh", "rep", "level", "name", "detail")),
                escape(c["source"]),
            ]
            for c in selected
        ]

    failed = [c for c in checks if _failed(c)]
    noted = [c for c in checks if not c["ok"] and not _failed(c)]
    passed = [c for c in checks if c["ok"]]
    out = page.table(head, rows(failed), ["fail"] * len(failed)) if failed else ""
    if noted:  # findings, such as rates past a knee that were not delivered
        out += (
            f"<details><summary>{len(noted)} informational checks not met (findings, such as"
            " open-loop rates past a stack's knee)</summary>"
            + page.table(head, rows(noted))
            + "</details>"
        )
    if passed:  # failures are always shown in full; passes fold away
        out += (
            f"<details><summary>{len(passed)} passed self-checks</summary>"
            + page.table(head, rows(passed))
            + "</details>"
        )
    return out


def _fairness(fairness: Any) -> str:
    """Render meta.json's fairness record: booleans (and {ok: ...}) as pass/fail rows."""
    if not fairness:
        return "<p class='banner warn'>No fairness record in meta.json.</p>"
    if isinstance(fairness, dict):
        items: Iterable[tuple[str, Any]] = fairness.items()
    elif isinstance(fairness, list):
        items = (
            (str(f.get("name", i)) if isinstance(f, dict) else str(i), f)
            for i, f in enumerate(fairness)
        )
    else:
        return f"<pre>{escape(json.dumps(fairness, indent=2))}</pre>"
    rows, classes = [], []
    for name, value in items:
        ok = value if isinstance(value, bool) else None
        if isinstance(value, dict) and isinstance(value.get("ok"), bool):
            ok = value["ok"]
        detail = "" if isinstance(value, bool) else _plain(value)
        rows.append(
            [
                {True: "✓ same", False: "✗ DIFFERS", None: "recorded"}[ok],
                escape(name),
                escape(detail),
            ]
        )
        classes.append("fail" if ok is False else "")
    return page.table(["status", "item", "value"], rows, classes)


def _plain(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value, sort_keys=True)


def _flatten(obj: Any, prefix: str = "") -> list[tuple[str, str]]:
    if isinstance(obj, dict) and obj:
        return [kv for k, v in obj.items() for kv in _flatten(v, f"{prefix}{k}.")]
    return [(prefix.rstrip("."), _plain(obj))]


def _metadata(meta: dict[str, Any]) -> str:
    if not meta:
        return "<p class='banner warn'>meta.json is missing or empty.</p>"
    shown = {k: v for k, v in meta.items() if k not in ("checks", "fairness", "mesh_configs")}
    config = shown.pop("config", None)
    rows = [[escape(k), f"<code>{escape(v)}</code>"] for k, v in _flatten(config or {}, "config.")]
    rows += [[escape(k), f"<code>{escape(v)}</code>"] for k, v in _flatten(shown)]
    return page.table(["key", "value"], rows)


def _config_paths(obj: Any, label: str = "") -> list[tuple[str, str]]:
    """(label, relative path) for every path in meta.json's mesh_configs, however nested."""
    if isinstance(obj, str):
        return [(label or obj, obj)]
    if isinstance(obj, dict):
        return [p for k, v in obj.items() for p in _config_paths(v, str(k))]
    if isinstance(obj, list):
        return [p for v in obj for p in _config_paths(v, label)]
    return []


def _links(run: Run, out_dir: Path) -> str:
    files = [(name, name) for name in (RESULTS_CSV, ROLES_CSV, META_JSON)]
    configs = _config_paths(run.meta.get("mesh_configs"))
    files += [(f"{label}: {path}", path) for label, path in configs]
    if not configs:
        files.append(("(no generated mesh configs listed in meta.json)", ""))
    items = []
    for text, rel in files:
        if not rel:
            items.append(f"<li>{escape(text)}</li>")
            continue
        target = run.path / rel
        href = quote(os.path.relpath(target, out_dir).replace(os.sep, "/"))
        missing = "" if target.exists() else " <b>(missing)</b>"
        items.append(f"<li><a href='{escape(href)}'>{escape(text)}</a>{missing}</li>")
    return "<ul>" + "".join(items) + "</ul>"


# --- several runs -------------------------------------------------------------------


def _comparison(summaries: list[RunSummary], figures: page.Figures) -> str:
    """Headline metrics of every run side by side, later runs as ratios to the first."""
    base = summaries[0]
    vs_base = [compare_runs(base, s) for s in summaries[1:]]
    nodes = [s.run.nodes for s in summaries]
    by_nodes = len(set(nodes)) > 1  # the same comparison on different node counts
    delta = [compare_latency(base, s) for s in summaries[1:]] if by_nodes else []

    def header(s: RunSummary) -> str:
        where = f", {s.run.nodes} node(s)" if by_nodes else ""
        return f"{s.run.label} ({s.level}{where})"

    head = ["stack", "metric", *map(header, summaries)]
    rows = []
    stacks = list(dict.fromkeys(m for s in summaries for m in s.stacks))
    for stack in stacks:
        swatch = page.swatch(charts.colour(stack, stacks))
        for m in HEADLINE:
            cells = [swatch + escape(stack), f"{m.label} ({m.unit})"]
            for i, s in enumerate(summaries):
                if stack not in s.stacks:
                    cells.append("—")
                    continue
                text = page.estimate(s.stacks[stack].values[m.key], zero_is_na=m is THROUGHPUT)
                if i and stack in vs_base[i - 1]:
                    text += page.ratio(vs_base[i - 1][stack][m.key], base.run.label)
                cells.append(text)
            rows.append(cells)
        for m in LATENCY_DIFFERENCES if by_nodes else ():
            cells = [swatch + escape(stack), f"{m.label} difference to the first run (ms)"]
            for i in range(len(summaries)):
                found = delta[i - 1].get(stack) if i else None
                cells.append(page.estimate(_ms(found[m.key])) if found else "—")
            rows.append(cells)
    series = []
    for i, s in enumerate(summaries):
        for stack in s.stacks:
            hist = s.run.merged_histogram(stack, s.level)
            if hist is not None:
                series.append(charts.CdfSeries(stack, hist, s.run.label, i))
    cdf = charts.cdf_figure(
        series, "Latency CDF per stack and run (solid: first run, dashed/dotted: later runs)"
    )
    return (
        "<section><h2>Comparison across runs</h2>"
        + page.table(head, rows, numeric_from=2)
        + f"<p class='note'>× = ratio to the first run ({escape(base.run.label)}), same stack;"
        " both runs' repetitions resampled independently.</p>"
        + figures.embed(cdf, "Each run at its own headline level (column headers).")
        + "</section>"
    )
