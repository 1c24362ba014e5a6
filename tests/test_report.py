"""HTML report: statistics, loading, page assembly, and the page in a real browser.

The browser tests render the recorded sample results (tests/data/results-sample,
see its README) and a synthetic what-if run, and open each page in headless
Chromium (`tests.browser`: no console error, nothing fetched, every chart drawn).
"""

from __future__ import annotations

import json
import random
import re
import shutil
from dataclasses import asdict
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

from harness.output import schema
from harness.output.results import ResultsDir
from loadtests import latency
from reports import charts, page, write_report
from reports.__main__ import main as reports_main
from reports.load import ResultsError, Run, load_run, stack_order
from reports.stats import (
    POINT_FIELDS,
    Estimate,
    LevelPoint,
    at_top,
    bootstrap,
    common_rate,
    max_clean_per_rep,
    median,
    median_curve,
    overhead_per_call,
    quantile,
    ratio,
    ratio_bound,
)
from reports.summary import HeadlineLevel, headline_level, summarize
from reports.whatif import BreakEven, break_even, log_axis, sensitivity, verdict
from tests.browser import assert_renders
from tests.conftest import require_external

SAMPLE = Path(__file__).parent / "data" / "results-sample"

# --- statistics -----------------------------------------------------------------------


def median_estimate(values: list[float]) -> Estimate:
    """The report's per-stack headline statistic (reports.summary.Metric.estimate)."""
    return bootstrap([values], lambda g: median(g[0]))


def ratio_estimate(a: list[float], b: list[float]) -> Estimate:
    """The report's ratio of medians between two stacks (reports.summary.ratio_of)."""
    return bootstrap([a, b], lambda g: ratio(median(g[0]), median(g[1])))


def test_median_and_quantile() -> None:
    assert median([3, 1, 2]) == 2
    assert median([4, 1, 3, 2]) == 2.5
    assert quantile([0, 10], 0.25) == 2.5
    assert quantile([5], 0.9) == 5
    with pytest.raises(ValueError):
        median([])


def test_bootstrap_interval_properties() -> None:
    values = [100.0, 104.0, 98.0, 101.0, 120.0, 99.0, 102.0]
    e = median_estimate(values)
    assert e.value == 101.0 and e.n == 7
    assert e.low is not None and e.high is not None
    assert min(values) <= e.low <= e.value <= e.high <= max(values)
    assert median_estimate(values) == e  # seeded: reproducible
    assert median_estimate([5.0, 5.0, 5.0]) == Estimate(5.0, 5.0, 5.0, 3)


def test_bootstrap_with_two_repetitions_spans_their_range() -> None:
    assert median_estimate([10.0, 20.0]) == Estimate(15.0, 10.0, 20.0, 2)


def test_bootstrap_one_repetition_or_undefined_statistic_has_no_interval() -> None:
    assert median_estimate([7.0]) == Estimate(7.0, None, None, 1)
    assert not median_estimate([7.0]).has_ci
    assert median_estimate([]) == Estimate(None, n=0)
    # undefined in some resamples (a zero denominator can be drawn): value but no interval
    e = bootstrap([[1.0, 0.0, 2.0]], lambda g: None if 0.0 in g[0] else 1.0)
    assert e == Estimate(None, n=3)
    e = bootstrap([[1.0, 0.0]], lambda g: 1.0 / max(g[0]) if max(g[0]) else None)
    assert e.value == 1.0 and not e.has_ci


def test_ratio_estimate() -> None:
    e = ratio_estimate([2.0, 2.0, 2.0], [1.0, 1.0, 1.0])
    assert e == Estimate(2.0, 2.0, 2.0, 3)
    e = ratio_estimate([90.0, 100.0, 110.0], [50.0, 50.0, 50.0])
    assert e.value == 2.0 and e.low is not None and e.high is not None
    assert 1.8 <= e.low < 2.0 < e.high <= 2.2
    assert ratio_estimate([1.0, 2.0], [0.0, 0.0]).value is None  # offload CPU of envoy
    assert ratio(0.0, 400.0) == 0.0  # no clean rate against a baseline's maximum


@pytest.mark.parametrize(
    ("a", "b", "bound"),
    [("", "", ""), ("≥", "", "≥"), ("", "≥", "≤"), ("≥", "≥", None), ("≤", "≥", "≤")],
)
def test_ratio_bound(a: str, b: str, bound: str | None) -> None:
    assert ratio_bound(a, b) == bound  # type: ignore[arg-type]


def test_overhead_per_call() -> None:
    e = overhead_per_call([1300.0, 1300.0], [1000.0, 1000.0], calls=3)
    assert e == Estimate(100.0, 100.0, 100.0, 2)
    assert overhead_per_call([1.0], [1.0], calls=0).value is None


def _point(
    rate: float,
    achieved: float | None = None,
    err: float = 0.0,
    p99_ms: float = 1.0,
    checks_ok: bool = True,
) -> LevelPoint:
    """A level point; achieved defaults to the offered rate."""
    achieved = rate if achieved is None else achieved
    return LevelPoint(rate, achieved, err, p99_ms * 500, p99_ms * 1000, checks_ok)


def _frame(reps: list[list[LevelPoint]]) -> pd.DataFrame:
    """A points frame (`reports.stats`): repetition i + 1 has the points of reps[i]."""
    rows = [{"rep": i, **asdict(p)} for i, rep in enumerate(reps, 1) for p in rep]
    return pd.DataFrame(rows, columns=["rep", *POINT_FIELDS])


def test_max_clean_throughput_is_per_repetition() -> None:
    reps = [
        [_point(100), _point(200), _point(300, p99_ms=50.0), _point(250)],  # 250: a refine probe
        [_point(100), _point(200, p99_ms=50.0), _point(150)],
        [_point(100, err=0.5)],  # nothing clean
        [_point(100), _point(200, checks_ok=False)],
        [_point(50), _point(100, err=0.01), _point(200), _point(400, achieved=300)],
    ]
    # The highest clean rate, even above a dirty one (the fifth repetition).
    assert max_clean_per_rep(_frame(reps), 5.0) == [250, 150, 0.0, 100, 200]
    assert median(max_clean_per_rep(_frame(reps[:4]), 5.0)) == 125  # median over repetitions
    assert max_clean_per_rep(_frame([]), 5.0) == []


def test_median_curve_takes_medians_per_rate_and_a_majority_of_checks() -> None:
    reps = [
        [_point(100), _point(200)],
        [_point(100), _point(200, p99_ms=50.0, checks_ok=False)],
        [_point(100), _point(200), _point(250)],  # a refine probe only this repetition ran
    ]
    curve = median_curve(_frame(reps))
    assert [p.offered_rps for p in curve] == [100, 200, 250]
    assert curve[1].p99_us == 1000 and curve[1].checks_ok  # 2 of 3 passed
    assert not median_curve(_frame(reps[:2]))[1].checks_ok  # 1 of 2 is not a majority
    assert median_curve(_frame([[_point(100, p99_ms=2.0)], [_point(100, p99_ms=3.0)]])) == [
        LevelPoint(100.0, 100.0, 0.0, 1250.0, 2500.0)  # the mean of the middle two
    ]
    assert median_curve(_frame([])) == []


def test_at_top() -> None:
    assert at_top(800.0, 800.0)
    assert not at_top(600.0, 800.0)
    assert not at_top(0.0, 800.0)  # no clean rate is not "at the top"
    assert not at_top(800.0, None)


def test_common_rate_is_the_highest_ladder_rate_every_stack_ran_clean() -> None:
    fast = [_point(100), _point(200), _point(400), _point(300)]
    slow = [_point(100), _point(200), _point(400, p99_ms=50), _point(300)]  # 300: refine
    stopped = [_point(100), _point(200)]  # never offered 400: it stopped below
    ladder = [100, 200, 400]
    assert common_rate([fast, slow], ladder, 5.0) == 200  # 300 is no ladder rate
    assert common_rate([fast], ladder, 5.0) == 400
    assert common_rate([fast, stopped], ladder, 5.0) == 200
    assert common_rate([fast, [_point(100, err=0.5)]], ladder, 5.0) is None
    assert common_rate([], ladder, 5.0) is None


@pytest.mark.parametrize(
    ("points", "expected"),
    [
        ([(0.25, 0.5), (0.5, 0.75), (1, 1.5), (2, 2.0)], BreakEven((2 / 3,), False, False)),
        ([(10, 1.5), (1, 2.0), (100, 0.5)], BreakEven((55.0,), False, False)),  # unsorted
        ([(1, 1.2), (2, 1.5)], BreakEven((), True, False)),
        ([(1, 0.2), (2, 0.5)], BreakEven((), False, True)),
        ([(1, 1.0), (2, 1.5)], BreakEven((1.0,), False, False)),  # at an end of the range
        ([(1, 0.5), (2, 1.5), (3, 0.5)], BreakEven((1.5, 2.5), False, False)),
        ([], BreakEven((), False, False)),
    ],
)
def test_break_even(points: list[tuple[float, float]], expected: BreakEven) -> None:
    got = break_even(points)
    assert got.crossings == pytest.approx(expected.crossings)
    assert (got.always, got.never) == (expected.always, expected.never)


def test_break_even_verdict_and_axis() -> None:
    assert verdict(BreakEven((0.6667,), False, False), "dpu_speed", "envoy") == (
        "dpumesh stops beating envoy at dpu_speed ≈ 0.667"
    )
    assert "over the whole range" in verdict(BreakEven((), True, False), "dma_gbps", "envoy")
    assert "never beats nomesh" in verdict(BreakEven((), False, True), "dpu_cores", "nomesh")
    assert log_axis([0.1, 0.5, 2.0]) and not log_axis([0.25, 2.0])
    assert not log_axis([0, 1, 100])


def test_bounded_estimates_print_as_bounds() -> None:
    at_least = Estimate(800.0, n=2, bound="≥")
    assert page.bounded(at_least, "req/s") == "≥ 800 req/s"
    assert page.estimate(at_least).startswith("≥ 800 ")
    assert page.factor(Estimate(2.0, n=2, bound="≥")) == "×≥2.00 (lower bound)"
    assert page.factor(Estimate(1.5, 1.4, 1.6, 3)) == "×1.50 [1.40–1.60]"
    assert page.factor(Estimate(None)) == "—"
    assert "×≤0.50 vs envoy" in page.ratio(Estimate(0.5, n=2, bound="≤"), "envoy")


def test_stack_order_and_variant_colours() -> None:
    labels = ["nomesh", "dpumesh@dpu_speed=10", "envoy", "dpumesh@dpu_speed=2", "dpumesh"]
    assert stack_order(labels) == [
        "dpumesh",
        "dpumesh@dpu_speed=2",
        "dpumesh@dpu_speed=10",
        "envoy",
        "nomesh",
    ]
    shades = {charts.colour(s, labels) for s in labels if "@" in s}
    assert len(shades) == 2 and charts.colour("dpumesh", labels) not in shades
    assert charts.colour("envoy", labels) == charts.STACK_COLOURS["envoy"]
    for shade in shades:  # still dpumesh's blue hue
        red, green, blue = (int(shade[i : i + 2], 16) for i in (1, 3, 5))
        assert blue > red and blue > green


# --- a small results directory made by the test (synthetic: for code paths only) -------

STACKS = {"dpumesh": 900, "envoy": 1500, "nomesh": 700}
LEVELS = (("closed-4", 4, None), ("open-50", None, 50.0), ("open-100", None, 100.0))


#: What a synthetic row carries in the columns the report does not vary (the rest empty).
FIXED = {
    "mode": "local",
    "workmodel": "default",
    "duration_s": 5.0,
    "cpu_loadgen_ms_per_req": 0.2,
    "rss_host_mb": 100.0,
    "rss_offload_mb": 0.0,
    "mtls": False,
    "nodes": 0,
    "placement": "host=0;dpu=1;loadgen=1",
    "dpu_profile": "bluefield3",
    "dpu_cores": 1,
    "dpu_speed": 1.0,
    "dma_latency_us": 0.0,
    "dma_gbps": 0.0,
    "checks_ok": True,
    "checks": "",
}


def _measured(
    root: Path,
    stack: str,
    rep: int,
    level: str,
    users: int | None,
    rate: float | None,
    *,
    latency_us: float,
    cpu: tuple[float, float],
    rng: random.Random,
    achieved: float | None = None,
) -> dict[str, Any]:
    """A results.csv row (mesh = stack) whose latencies come from a histogram written to hist/.

    Latencies are uniform in 0.5 .. 2 x `latency_us`; `cpu` is (host, offload) ms/request.
    """
    hist = latency.new_histogram()
    for _ in range(300):
        hist.record_value(int(latency_us * rng.uniform(0.5, 2.0)))
    latency.dump_histogram(hist, root / "hist" / f"{stack}-rep{rep}-{level}.hdr")
    s = latency.summarize(hist)
    empty = {c.name: None for c in schema.RESULTS.columns if c.optional}
    return (
        empty
        | FIXED
        | {
            "mesh": stack,
            "stack": stack,
            "rep": rep,
            "level": level,
            "users": users or 8,
            "offered_rps": rate,
            "achieved_rps": (rate or 80) * 0.995 if achieved is None else achieved,
            "requests": 300,
            "failures": 0,
            "mean_us": s.mean_us,
            "p50_us": s.p50_us,
            "p90_us": s.p90_us,
            "p99_us": s.p99_us,
            "p999_us": s.p999_us,
            "cpu_host_ms_per_req": cpu[0],
            "cpu_offload_ms_per_req": cpu[1],
        }
    )


def _roles(row: dict[str, Any]) -> list[dict[str, Any]]:
    """roles.csv rows of one results.csv row: app, sidecar and loadgen."""
    keys = {k: row[k] for k in ("mesh", "stack", "rep", "level")}
    return [
        keys
        | {
            "role": role,
            "side": side,
            "cpu_s": 0.1,
            "cpu_ms_per_req": 0.3,
            "vcpu_per_1000rps": None,
            "rss_mean_mb": 50.0,
            "rss_max_mb": 60.0,
            "pss_mean_mb": None,
            "processes": 1,
            "window_s": 5.0,
            "notes": "",
        }
        for role, side in (("app", "host"), ("sidecar", "host"), ("loadgen", "loadgen"))
    ]


def _write(root: Path, rows: list[dict[str, Any]], roles: list[dict[str, Any]]) -> ResultsDir:
    """The rows through the harness's own writer (`harness.output.schema`)."""
    out = ResultsDir(root)
    for row in rows:
        out.append_result(row)
    out.append_roles(roles)
    return out


def _make_results(
    root: Path, *, extras: bool = True, meshes: dict[str, int] = STACKS, with_meta: bool = True
) -> Path:
    """A results directory in the DESIGN §6 layout.

    `extras=False`: no failed check, no downstream call count; `with_meta=False`: a
    meta.json with its schema version only (no config, checks, fairness).
    """
    rng = random.Random(7)
    rows, roles = [], []
    for rep in (1, 2):
        for mesh, base in meshes.items():
            for level, users, rate in LEVELS:
                cpu = (base / 1000, 0.5 if mesh == "dpumesh" else 0)
                row = _measured(
                    root, mesh, rep, level, users, rate, latency_us=base, cpu=cpu, rng=rng
                )
                if extras:
                    bad = mesh == "envoy" and rep == 2 and level == "open-100"
                    row |= {
                        "checks_ok": not bad,
                        "checks": "loadgen_saturated" if bad else "",
                        "downstream_calls_per_req": 2.0,
                    }
                rows.append(row)
                roles += _roles(row)
    out = _write(root, rows, roles)
    if not with_meta:
        out.write_meta({})
    else:
        meta = {
            "git": {"commit": "abc123"},
            "config": {"slo_p99_ms": 10, "seed": 0, "repetitions": 2},
            "mesh_configs": {"envoy": ["configs/envoy/gateway.yaml"]},
            "checks": [
                {
                    "mesh": "envoy",
                    "rep": 2,
                    "level": "open-100",
                    "name": "counts_match",
                    "ok": False,
                    "detail": "stack 290 vs loadgen 300",
                },
                {
                    "mesh": "nomesh",
                    "rep": 1,
                    "level": "open-50",
                    "name": "counts_match",
                    "ok": True,
                    "detail": "",
                },
            ],
            "fairness": {
                "same_seed": True,
                "same_workers": False,
                "envoy_flags": ["--concurrency 1"],
            },
        }
        out.write_meta(meta)
    return root


def test_a_run_answers_the_reports_questions_with_dataframes(tmp_path: Path) -> None:
    run = load_run(_make_results(tmp_path, extras=False, with_meta=False))
    assert run.levels() == ["closed-4", "open-50", "open-100"]
    assert run.stacks() == ["dpumesh", "envoy", "nomesh"]
    assert run.at("envoy", "open-50")["rep"].tolist() == [1, 2]
    assert run.is_open_loop("open-50") and not run.is_open_loop("closed-4")
    assert run.ladder_levels() == {50.0: "open-50", 100.0: "open-100"}
    assert run.ladder_top == 100.0  # no ladder in meta.json: the highest offered rate
    assert run.slo_p99_ms is None and run.problems == []
    (tmp_path / "roles.csv").unlink()
    assert load_run(tmp_path).problems == ["roles.csv missing: no CPU and memory per role"]
    (tmp_path / "results.csv").unlink()
    with pytest.raises(ResultsError, match=r"results\.csv: no rows"):
        load_run(tmp_path)


def test_headline_level_choice(tmp_path: Path) -> None:
    run = load_run(_make_results(tmp_path))
    # open-100: envoy failed a self-check in 1 of 2 repetitions, so not every stack is clean
    choice = headline_level(run)
    assert (choice.level, choice.common_rate, choice.fallback) == ("open-50", 50, False)
    assert "common rate, 50 req/s" in choice.why
    assert headline_level(run, "open-100").level == "open-100"  # asked for: it wins
    assert headline_level(run, "open-100").common_rate is None
    with pytest.raises(ResultsError):
        headline_level(run, "closed-999")
    run.results = run.results[run.results["offered_rps"].isna()]
    assert headline_level(run) == HeadlineLevel(
        "closed-4",
        "no ladder rate was clean for every stack, so the closed-loop level every stack ran",
        fallback=True,
    )


def test_headline_falls_back_to_closed_loop_and_says_so(tmp_path: Path) -> None:
    results = _make_results(tmp_path)
    meta = json.loads((results / "meta.json").read_text())
    meta["config"]["slo_p99_ms"] = 1  # every open-loop p99 is above 1 ms
    (results / "meta.json").write_text(json.dumps(meta))
    text = write_report([results]).read_text(encoding="utf-8")
    assert "Headline at level <code>closed-4</code></h3><p class='banner warn'>" in text
    assert "no ladder rate was clean for every stack" in text


def test_summary_ratios_and_overhead(tmp_path: Path) -> None:
    s = summarize(load_run(_make_results(tmp_path)))
    dpu = s.stacks["dpumesh"]
    assert set(dpu.vs) == {"envoy", "nomesh"}
    assert "envoy" not in s.stacks["envoy"].vs
    p50 = dpu.values["p50_us"].value
    env = s.stacks["envoy"].values["p50_us"].value
    assert p50 is not None and env is not None
    assert dpu.vs["envoy"]["p50_us"].value == pytest.approx(p50 / env)
    assert dpu.vs["envoy"]["cpu_offload_ms_per_req"].value is None  # envoy has no offload CPU
    assert dpu.calls_per_req == 2 and dpu.calls_source == "results.csv"
    nomesh = s.stacks["nomesh"].values["p50_us"].value
    assert dpu.overhead_per_call is not None and nomesh is not None
    assert dpu.overhead_per_call.value == pytest.approx((p50 - nomesh) / 2)
    assert dpu.values["max_clean_rps"].value == 100  # every open level clean, SLO 10 ms


def test_report_content_and_escaping(tmp_path: Path) -> None:
    results = _make_results(tmp_path / "run", meshes={**STACKS, "<script>x</script>": 800})
    out = write_report([results])
    assert out == results / "report.html"
    text = out.read_text(encoding="utf-8")
    assert "<script>x</script>" not in text
    assert "&lt;script&gt;x&lt;/script&gt;" in text
    assert len(re.findall(r"<script>", text)) == 1 + text.count("class='chart'")  # js once
    assert not re.search(r"<script[^>]*\bsrc=|<link\b|@import|url\(http", text)
    assert "Content-Security-Policy" in text
    for needle in (
        "2 of 3 self-checks FAILED",
        "loadgen_saturated",
        "✗ DIFFERS",
        "href='results.csv'",
        "href='configs/envoy/gateway.yaml'",
        "(missing)",
    ):
        assert needle in text
    assert write_report([results]).read_text(encoding="utf-8") == text  # reproducible


def test_report_without_optional_files(tmp_path: Path) -> None:
    results = _make_results(tmp_path, extras=False, with_meta=False)
    (results / "roles.csv").unlink()
    shutil.rmtree(results / "hist")
    text = write_report([results]).read_text(encoding="utf-8")
    for needle in (
        "Data problem: roles.csv",
        "histogram missing",
        "CDF not drawn",
        "no slo_p99_ms in meta.json",
        "No self-check results",
        "unknown (no downstream",
    ):
        assert needle in text


def test_negative_overhead_is_explained(tmp_path: Path) -> None:
    below = _make_results(tmp_path / "below", meshes={"dpumesh": 500, "nomesh": 700})
    assert "Negative overhead (<code>dpumesh</code>)" in write_report([below]).read_text("utf-8")
    above = _make_results(tmp_path / "above")  # dpumesh 900 µs, nomesh 700 µs
    assert "Negative overhead" not in write_report([above]).read_text("utf-8")


def test_comparison_of_two_runs_via_cli(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    before = _make_results(tmp_path / "before")
    after = _make_results(tmp_path / "after", meshes={"dpumesh": 600, "envoy": 1500})
    assert reports_main([str(before), str(after)]) == 0
    out = Path(capsys.readouterr().out.strip())
    assert out == before / "report.html"
    text = out.read_text(encoding="utf-8")
    assert "Comparison across runs" in text and "vs before" in text
    assert "href='../after/results.csv'" in text  # links relative to the report's folder
    assert reports_main([str(tmp_path / "nothing")]) == 1


def test_run_bench_report_is_the_same_command(tmp_path: Path, capsys) -> None:
    import run_bench

    results = _make_results(tmp_path / "run")
    out = tmp_path / "elsewhere.html"
    assert run_bench.main(["report", str(results), "--out", str(out), "--level", "open-100"]) == 0
    assert Path(capsys.readouterr().out.strip()) == out
    assert "Headline at level <code>open-100</code>" in out.read_text(encoding="utf-8")
    assert not (results / "report.html").exists()
    assert run_bench.main(["report", str(tmp_path / "nothing")]) == 1


# --- a synthetic what-if run (issue 14's contract: stack labels, ladder, refinement) -------

LADDER = (100.0, 200.0, 400.0, 800.0)
#: label -> (dpu_speed, capacity req/s: clean up to it, host CPU ms/req); baselines have 1x
WHATIF_STACKS = {
    "dpumesh@dpu_speed=0.25": (0.25, 150.0, 1.2),
    "dpumesh@dpu_speed=0.5": (0.5, 300.0, 1.2),
    "dpumesh@dpu_speed=1": (1.0, 600.0, 1.2),
    "dpumesh@dpu_speed=2": (2.0, 1000.0, 1.2),  # clean at the top: "≥ 800"
    "envoy": (1.0, 450.0, 3.0),
    "nomesh": (1.0, 1000.0, 1.0),
}
UNMET = "dpu_speed 2 > 1: a host core cannot be faster than itself (ran at 1x)"
CORES = "bluefield3 has 16 DPU cores; the dpu set has 1 CPU, so 1 is simulated"


def _climb(capacity: float) -> list[tuple[str, float]]:
    """The open-loop levels one repetition runs, as the harness climbs (DESIGN §5).

    The ladder until two rates in a row are dirty, then one refinement probe
    between the highest clean and the lowest dirty rate.
    """
    levels: list[tuple[str, float]] = []
    dirty = 0
    for rate in LADDER:
        if dirty == 2:
            break
        levels.append((f"open-{rate:g}", rate))
        dirty = dirty + 1 if rate > capacity else 0
    clean = [r for _, r in levels if r <= capacity]
    above = [r for _, r in levels if r > capacity]
    if clean and above:
        levels.append((f"refine-{(max(clean) + min(above)) / 2:g}", (max(clean) + min(above)) / 2))
    return levels


def _make_whatif(root: Path, stacks: tuple[str, ...] = tuple(WHATIF_STACKS)) -> Path:
    """A what-if results directory (dpu_speed sweep) with histograms, roles and meta.json."""
    rng = random.Random(14)
    rows, roles, max_clean = [], [], {}
    for rep in (1, 2):
        for label in stacks:
            speed, capacity, host_cpu = WHATIF_STACKS[label]
            mesh = label.partition("@")[0]
            cpu = (host_cpu, 1 / speed if mesh == "dpumesh" else 0.0)
            for level, users, rate in (
                ("closed-8", 8, None),
                *((n, None, r) for n, r in _climb(capacity)),
            ):
                clean = rate is None or rate <= capacity
                row = _measured(
                    root,
                    label,
                    rep,
                    level,
                    users,
                    rate,
                    latency_us=1000 * (1 + (rate or 0) / capacity) if clean else 20_000,
                    cpu=cpu,
                    rng=rng,
                    achieved=None if clean else 0.9 * (rate or 0),
                )
                row |= {"mesh": mesh, "stack": label, "dpu_speed": speed}
                rows.append(row)
                roles += _roles(row)
            best = max(r for _, r in _climb(capacity) if r <= capacity)
            max_clean.setdefault(label, {})[str(rep)] = {"rps": best, "at_top": best >= LADDER[-1]}
    out = _write(root, rows, roles)
    variants = [s for s in stacks if "@" in s]
    meta = {
        "config": {"slo_p99_ms": 10, "repetitions": 2},
        "dpu_model": {"sentence": "base model: 1 DPU core at 1x", "unmet": [CORES], "overlaps": []},
        "ladder": {"rates": list(LADDER), "top": LADDER[-1], "source": "calibrated"},
        "max_clean_throughput": {
            label: {**per_rep["1"], "per_rep": per_rep} for label, per_rep in max_clean.items()
        },
        "whatif": {
            "param": "dpu_speed",
            "stack": "dpumesh",
            "values": {s: WHATIF_STACKS[s][0] for s in variants},
            "baselines": [s for s in stacks if "@" not in s],
            "models": {
                s: {
                    "sentence": f"{s}: DPU at {WHATIF_STACKS[s][0]:g}x a host core",
                    # The run's own unmet line, and the one a value above 1x adds.
                    "unmet": [CORES, *([UNMET] if WHATIF_STACKS[s][0] > 1 else [])],
                }
                for s in variants
            },
        },
        "checks": [],
        "fairness": {"same_seed": True},
    }
    out.write_meta(meta)
    return root


def test_whatif_summary_and_sensitivity(tmp_path: Path) -> None:
    run = load_run(_make_whatif(tmp_path))
    assert run.stacks() == list(WHATIF_STACKS)  # variants by value, then the baselines
    assert run.ladder_top == 800 and run.whatif is not None
    assert run.at("dpumesh@dpu_speed=0.5", "refine-300")["mesh"].tolist() == ["dpumesh"] * 2
    s = summarize(run)
    assert (s.level, s.headline.common_rate) == ("open-100", 100)  # dpu_speed=0.25 is dirty at 200
    throughput = {k: v.values["max_clean_rps"] for k, v in s.stacks.items()}
    assert {k: e.value for k, e in throughput.items()} == {
        "dpumesh@dpu_speed=0.25": 150,  # a refinement probe
        "dpumesh@dpu_speed=0.5": 300,
        "dpumesh@dpu_speed=1": 600,
        "dpumesh@dpu_speed=2": 800,
        "envoy": 400,
        "nomesh": 800,
    }
    assert [k for k, e in throughput.items() if e.bound == "≥"] == ["dpumesh@dpu_speed=2", "nomesh"]
    assert not throughput["nomesh"].has_ci  # a bound has no interval
    assert s.stacks["dpumesh@dpu_speed=2"].vs["nomesh"]["max_clean_rps"].value is None  # both ≥
    assert s.stacks["envoy"].vs["nomesh"]["max_clean_rps"].bound == "≤"

    sens = sensitivity(s)
    assert sens is not None and (sens.param, sens.baseline, sens.level) == (
        "dpu_speed",
        "envoy",
        "open-100",
    )
    assert [v.value for v in sens.variants] == [0.25, 0.5, 1, 2] and not sens.log_x
    tput = [v.advantages["throughput"] for v in sens.variants]
    assert [e.value for e in tput] == pytest.approx([0.375, 0.75, 1.5, 2.0])
    assert [e.bound for e in tput] == ["", "", "", "≥"]
    assert sens.break_even.crossings == pytest.approx((2 / 3,))  # between 0.5 and 1
    # Only what a value adds to the run's own model is marked on its variant.
    assert [v.unmet for v in sens.variants] == [(), (), (), (UNMET,)]
    slow = sens.variants[0]
    p99 = {k: _median_at(run, k, "p99_us") for k in ("envoy", slow.label)}
    assert slow.advantages["p99"].value == pytest.approx(p99["envoy"] / p99[slow.label])
    assert slow.advantages["cpu_host"].value == pytest.approx(3.0 / 1.2)
    assert run.problems == []  # meta.json's max clean throughput agrees with results.csv


def _median_at(run: Run, stack: str, column: str) -> float:
    """The median over repetitions of one results.csv column at the headline's open-100."""
    return median(run.at(stack, "open-100")[column])


def test_whatif_report(tmp_path: Path) -> None:
    text = write_report([_make_whatif(tmp_path)]).read_text(encoding="utf-8")
    for needle in (
        "Headline at level <code>open-100</code> (common rate)",
        "the common rate, 100 req/s",
        "≥ 800 <span class='ci'>lower bound, n=2</span>",  # dpumesh@dpu_speed=2 and nomesh
        "What-if: dpumesh's advantage over envoy against dpu_speed",
        "dpumesh stops beating envoy at dpu_speed ≈ 0.667",
        "×≥2.00 (lower bound)",
        "<b>not met</b> (see below)",
        "<code>dpumesh@dpu_speed=2</code>: dpu_speed 2 &gt; 1",
        "the variants' DPU models",
        "and 3 refinement probe(s)",
    ):
        assert needle in text, needle
    assert "Data problem" not in text  # every histogram present, meta.json consistent
    assert text.count("≥ 800 <span") == 2


def test_whatif_without_envoy_compares_with_nomesh(tmp_path: Path) -> None:
    variants = tuple(s for s in WHATIF_STACKS if s != "envoy")
    results = _make_whatif(tmp_path, variants)
    meta = json.loads((results / "meta.json").read_text())
    meta["max_clean_throughput"]["nomesh"]["rps"] = 700  # disagrees with results.csv
    (results / "meta.json").write_text(json.dumps(meta))
    text = write_report([results]).read_text(encoding="utf-8")
    assert "envoy is not in this run: dpumesh is compared with nomesh" in text
    assert "dpumesh never beats nomesh in the range of dpu_speed" in text
    assert "Data problem: max clean throughput of nomesh: meta.json records 700" in text


def test_whatif_variant_with_the_wrong_model_is_a_data_problem(tmp_path: Path) -> None:
    results = _make_whatif(tmp_path)
    meta = json.loads((results / "meta.json").read_text())
    meta["whatif"]["values"]["dpumesh@dpu_speed=1"] = 1.5
    (results / "meta.json").write_text(json.dumps(meta))
    s = summarize(load_run(results))
    assert sensitivity(s) is not None
    assert s.run.problems == [
        "dpumesh@dpu_speed=1: results.csv has dpu_speed = 1, meta.json whatif says 1.5"
    ]


# --- the page in headless Chromium (tests/browser.py) ------------------------------------


@pytest.mark.browser
def test_sample_report_renders_in_chromium(tmp_path: Path) -> None:
    require_external(shutil.which("chromium") is not None, "chromium")
    if not (SAMPLE / "results.csv").is_file():
        pytest.fail(f"no recorded sample results in {SAMPLE}: its README.md says how to record")
    results = tmp_path / "results-sample"
    shutil.copytree(SAMPLE, results)
    assert_renders(write_report([results]), tmp_path, charts=6)


@pytest.mark.browser
def test_whatif_report_renders_in_chromium(tmp_path: Path) -> None:
    require_external(shutil.which("chromium") is not None, "chromium")
    results = _make_whatif(tmp_path / "whatif")
    assert_renders(write_report([results]), tmp_path, charts=7)  # the sensitivity chart too


def test_a_machine_whose_speed_varied_says_so() -> None:
    from reports.render import _machine_speed

    steady = {"segments": [{"host_mloops_per_s": v} for v in (95, 100, 104)]}
    assert _machine_speed(steady) == "" and _machine_speed(None) == ""
    varied = {"segments": [{"host_mloops_per_s": v} for v in (52, 80, 97)]}
    text = _machine_speed(varied)
    assert "between 52 and 97" in text and "spread of 56%" in text


def test_informational_checks_are_findings_not_failures() -> None:
    from reports.render import _failed

    assert _failed({"ok": False, "info": False})
    assert not _failed({"ok": False, "info": True})  # e.g. a rate past the knee not delivered
    assert not _failed({"ok": True})


def test_the_report_says_whether_the_envoy_stacks_ran_mutual_tls(tmp_path: Path) -> None:
    from reports.load import load_run
    from reports.render import _transport

    run = load_run(_make_results(tmp_path / "plain"))
    assert "The Envoy stacks (envoy) ran plaintext between proxies" in _transport(run)
    run.results.loc[run.results["mesh"] == "envoy", "mtls"] = True
    text = _transport(run)
    assert "Proxy-to-proxy hops of envoy ran mutual TLS" in text and "plaintext" not in text
    run.results = run.results[run.results["mesh"] != "envoy"]
    assert _transport(run) == ""  # no Envoy stack, nothing to say


def _on_nodes(root: Path, nodes: int, extra_us: float) -> Path:
    """A two-stack run on `nodes` nodes, each stack `extra_us` slower than on one node, one
    call in three crossing nodes (cross-node per request 1 of 1 + 2 requests)."""
    rng = random.Random(nodes)
    rows = []
    for rep in (1, 2):
        for mesh, base in {"dpumesh": 900, "nomesh": 700}.items():
            for level, users, rate in LEVELS:
                row = _measured(
                    root,
                    mesh,
                    rep,
                    level,
                    users,
                    rate,
                    latency_us=base + extra_us,
                    cpu=(1.0, 0.0),
                    rng=rng,
                )
                crossing = 1.0 if nodes > 1 else 0.0
                rows.append(
                    row
                    | {
                        "nodes": nodes,
                        "cross_node_per_req": crossing,
                        "downstream_calls_per_req": 2.0,
                    }
                )
    _write(root, rows, [r for row in rows for r in _roles(row)]).write_meta(
        {"config": {"slo_p99_ms": 10, "nodes": nodes}}
    )
    return root


def test_nodes_show_the_cross_node_share_and_the_latency_difference(tmp_path):
    one = _on_nodes(tmp_path / "one-node", 1, 0.0)
    three = _on_nodes(tmp_path / "three-nodes", 3, 1000.0)
    summary = summarize(load_run(three))
    share = summary.stacks["dpumesh"].values["cross_node_share"]
    assert share.value == pytest.approx(1 / 3)
    page_html = write_report([one, three], tmp_path / "report.html").read_text()
    text = re.sub(r"<[^>]+>", " ", page_html)
    assert "The services ran on 3 node(s)" in text
    assert "dpumesh 33.3 %" in text
    assert "one-node (open-100, 1 node(s))" in text and "three-nodes (open-100, 3 node(s))" in text
    differences = re.findall(
        r"p50 latency difference to the first run \(ms\)\s+—\s+([-0-9.]+)", text
    )
    assert len(differences) == 2  # per stack; the latencies were 1 ms apart, uniform x0.5..2
    assert all(0.8 < float(d) < 1.7 for d in differences), differences
    single = re.sub(r"<[^>]+>", " ", write_report([one], tmp_path / "one.html").read_text())
    assert "crossed nodes" not in single
