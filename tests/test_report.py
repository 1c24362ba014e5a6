"""HTML report: statistics, loading, page assembly, and the page in a real browser.

The browser test renders the recorded sample results (tests/data/results-sample,
see its README) and opens the page in headless Chromium over the DevTools
Protocol: every console error, uncaught exception and log error is collected
(Runtime.consoleAPICalled, Runtime.exceptionThrown, Log.entryAdded), every
request the page makes is recorded (Network.requestWillBeSent) and must be
file:, data:, blob: or about:, and every chart must have drawn its SVG.
A full-page screenshot is written next to the report.
"""

from __future__ import annotations

import base64
import csv
import json
import os
import random
import re
import shutil
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from loadtests import latency
from reports import write_report
from reports.__main__ import main as reports_main
from reports.load import REQUIRED_RESULT_COLUMNS, ResultsError, load_run
from reports.stats import (
    Estimate,
    LevelPoint,
    bootstrap,
    is_clean,
    knee,
    max_clean_throughput,
    median,
    median_curve,
    overhead_per_call,
    quantile,
    ratio,
)
from reports.summary import headline_level, summarize
from tests.conftest import require_external

SAMPLE = Path(__file__).parent / "data" / "results-sample"
RECORD = (
    "python run_bench.py run --duration 5 --warmup 2 --repeat 2 --rate 50,100 "
    "--out tests/data/results-sample"
)

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


def test_overhead_per_call() -> None:
    e = overhead_per_call([1300.0, 1300.0], [1000.0, 1000.0], calls=3)
    assert e == Estimate(100.0, 100.0, 100.0, 2)
    assert overhead_per_call([1.0], [1.0], calls=0).value is None


def _point(
    rate: float, achieved: float | None = None, err: float = 0.0, p99_ms: float = 1.0
) -> LevelPoint:
    """A level point; achieved defaults to the offered rate."""
    achieved = rate if achieved is None else achieved
    return LevelPoint(rate, achieved, err, p99_ms * 500, p99_ms * 1000)


@pytest.mark.parametrize(
    ("point", "clean"),
    [
        (_point(100, achieved=98.0), True),
        (_point(100, achieved=97.9), False),
        (_point(100, err=0.001), True),
        (_point(100, err=0.0011), False),
        (_point(100, p99_ms=5.0), True),  # p99 exactly at the SLO
        (_point(100, p99_ms=5.001), False),
        (_point(0), False),
    ],
)
def test_is_clean_boundaries(point: LevelPoint, clean: bool) -> None:
    assert is_clean(point, slo_p99_ms=5.0) is clean


def test_is_clean_without_slo_ignores_latency() -> None:
    assert is_clean(_point(100, p99_ms=1e6), None)


def test_knee_is_highest_clean_level_even_above_a_dirty_one() -> None:
    points = [_point(50), _point(100, err=0.01), _point(200), _point(400, achieved=300)]
    assert knee(points, 5.0) == _point(200)
    assert knee([_point(50, p99_ms=9.0)], 5.0) is None
    assert knee([], 5.0) is None


def test_max_clean_throughput_uses_per_rate_medians() -> None:
    reps = [
        [_point(100), _point(200)],
        [_point(100), _point(200, p99_ms=50.0)],  # one bad repetition at 200
        [_point(100), _point(200)],
    ]
    curve = median_curve(reps)
    assert [p.offered_rps for p in curve] == [100, 200]
    assert curve[1].p99_us == 1000
    assert max_clean_throughput(reps, 5.0) == 200
    assert max_clean_throughput(reps[1:2], 5.0) == 100
    assert max_clean_throughput([[_point(100, err=0.5)]], 5.0) == 0.0  # "n/a"


# --- a small results directory made by the test (synthetic: for code paths only) -------

STACKS = {"dpumesh": 900, "envoy": 1500, "nomesh": 700}
LEVELS = (("closed-4", 4, None), ("open-50", None, 50.0), ("open-100", None, 100.0))


def _make_results(
    root: Path, *, optional: bool = True, meshes: dict[str, int] = STACKS, with_meta: bool = True
) -> Path:
    """A results directory in the DESIGN §6 layout; `optional=False` omits optional columns."""
    rng = random.Random(7)
    rows, roles = [], []
    for rep in (1, 2):
        for mesh, base in meshes.items():
            for level, users, rate in LEVELS:
                hist = latency.new_histogram()
                for _ in range(300):
                    hist.record_value(int(base * rng.uniform(0.5, 2.0)))
                latency.dump_histogram(hist, root / "hist" / f"{mesh}-rep{rep}-{level}.hdr")
                s = latency.summarize(hist)
                row: dict[str, Any] = {
                    "mesh": mesh,
                    "mode": "local",
                    "workmodel": "default",
                    "rep": rep,
                    "users": users or "",
                    "offered_rps": rate or "",
                    "achieved_rps": (rate or 80) * 0.995,
                    "requests": 300,
                    "failures": 0,
                    "duration_s": 5,
                    "mean_us": s.mean_us,
                    "p50_us": s.p50_us,
                    "p90_us": s.p90_us,
                    "p99_us": s.p99_us,
                    "p999_us": s.p999_us,
                    "cpu_host_ms_per_req": base / 1000,
                    "cpu_offload_ms_per_req": 0.5 if mesh == "dpumesh" else 0,
                    "cpu_loadgen_ms_per_req": 0.2,
                    "rss_host_mb": 100,
                    "rss_offload_mb": 0,
                }
                if optional:
                    bad = mesh == "envoy" and rep == 2 and level == "open-100"
                    row |= {
                        "level": level,
                        "checks_ok": "false" if bad else "true",
                        "checks": "loadgen_saturated" if bad else "",
                        "downstream_calls_per_req": 2,
                    }
                rows.append(row)
                for role, side in (("app", "host"), ("sidecar", "host"), ("loadgen", "loadgen")):
                    roles.append(
                        {
                            "mesh": mesh,
                            "rep": rep,
                            "level": level,
                            "role": role,
                            "side": side,
                            "cpu_s": 0.1,
                            "cpu_ms_per_req": 0.3,
                            "rss_mean_mb": 50,
                            "rss_max_mb": 60,
                        }
                    )
    _write_csv(root / "results.csv", rows)
    _write_csv(root / "roles.csv", roles)
    if with_meta:
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
        (root / "meta.json").write_text(json.dumps(meta), encoding="utf-8")
    return root


def _write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def test_loader_derives_level_and_tolerates_missing_optional_columns(tmp_path: Path) -> None:
    run = load_run(_make_results(tmp_path, optional=False, with_meta=False))
    assert run.levels() == ["closed-4", "open-50", "open-100"]
    assert run.meshes() == ["dpumesh", "envoy", "nomesh"]
    row = run.rows_at("envoy", "open-50")[0]
    assert row.checks_ok is None and row.failed_checks == ()
    assert row.downstream_calls_per_req is None
    assert run.slo_p99_ms is None
    assert any("meta.json" in p for p in run.problems)


def test_loader_rejects_missing_required_column(tmp_path: Path) -> None:
    _write_csv(tmp_path / "results.csv", [{c: "1" for c in REQUIRED_RESULT_COLUMNS[:-1]}])
    with pytest.raises(ResultsError, match="rss_offload_mb"):
        load_run(tmp_path)


def test_headline_level_choice(tmp_path: Path) -> None:
    run = load_run(_make_results(tmp_path))
    assert headline_level(run) == "closed-4"
    assert headline_level(run, "open-100") == "open-100"
    with pytest.raises(ResultsError):
        headline_level(run, "closed-999")
    open_only = [r for r in run.rows if r.open_loop]
    run.rows = open_only
    assert headline_level(run) == "open-50"


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
    results = _make_results(tmp_path, optional=False, with_meta=False)
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


# --- the page in headless Chromium --------------------------------------------------------

CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-extensions",
    "--no-first-run",
    "--disable-quic",
    "--remote-debugging-address=127.0.0.1",
    "--remote-debugging-port=0",
)
LOCAL_SCHEMES = ("file:", "data:", "blob:", "about:")
CHARTS_STATE = """JSON.stringify(Array.from(document.querySelectorAll('figure.chart')).map(f => ({
  id: (f.querySelector('.plotly-graph-div') || {}).id || null,
  svgs: f.querySelectorAll('svg.main-svg').length,
  traces: f.querySelectorAll('g.trace').length})))"""


@dataclass
class PageVisit:
    """What Chromium saw while loading a page."""

    errors: list[str] = field(default_factory=list)
    requests: list[str] = field(default_factory=list)
    charts: list[dict[str, Any]] = field(default_factory=list)


class DevTools:
    """A minimal Chrome DevTools Protocol client over one browser websocket (flat sessions)."""

    def __init__(self, url: str) -> None:
        import websocket  # websocket-client, installed with locust

        self.ws = websocket.create_connection(url, timeout=30, suppress_origin=True)
        self.ids = iter(range(1, 1_000_000))
        self.events: list[dict[str, Any]] = []

    def call(self, method: str, session: str | None = None, **params: Any) -> dict[str, Any]:
        msg_id = next(self.ids)
        msg: dict[str, Any] = {"id": msg_id, "method": method, "params": params}
        if session:
            msg["sessionId"] = session
        self.ws.send(json.dumps(msg))
        while True:
            reply = json.loads(self.ws.recv())
            if reply.get("id") == msg_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply.get("result", {})
            if "method" in reply:
                self.events.append(reply)

    def wait_for(self, method: str, timeout_s: float) -> None:
        """Read events until `method` arrives (it may have arrived already)."""
        deadline = time.monotonic() + timeout_s
        while not any(e["method"] == method for e in self.events):
            if time.monotonic() > deadline:
                raise TimeoutError(method)
            self.events.append(json.loads(self.ws.recv()))

    def close(self) -> None:
        self.ws.close()


def _browse(report: Path, screenshot: Path, tmp: Path) -> PageVisit:
    """Load `report` in headless Chromium, collect errors/requests/charts, save a screenshot."""
    profile, log = tmp / "chromium-profile", tmp / "chromium.log"
    with log.open("wb") as stderr:
        proc = subprocess.Popen(
            ["chromium", *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "about:blank"],
            stdout=subprocess.DEVNULL,
            stderr=stderr,
            # A terminated Chromium can leave its singleton socket directory in TMPDIR.
            env={**os.environ, "TMPDIR": str(tmp)},
        )
    try:
        port_file = profile / "DevToolsActivePort"
        deadline = time.monotonic() + 60
        while not (port_file.is_file() and len(port_file.read_text().split()) == 2):
            assert proc.poll() is None, f"chromium exited: {log.read_text(errors='replace')}"
            assert time.monotonic() < deadline, "chromium did not open its DevTools port"
            time.sleep(0.1)
        port, path = port_file.read_text().split()
        cdp = DevTools(f"ws://127.0.0.1:{port}{path}")
        try:
            return _visit(cdp, report, screenshot)
        finally:
            cdp.close()
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _viewport(cdp: DevTools, session: str, height: int) -> None:
    cdp.call(
        "Emulation.setDeviceMetricsOverride",
        session=session,
        width=1400,
        height=height,
        deviceScaleFactor=1,
        mobile=False,
    )


def _visit(cdp: DevTools, report: Path, screenshot: Path) -> PageVisit:
    target = cdp.call("Target.createTarget", url="about:blank")["targetId"]
    s = cdp.call("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
    for domain in ("Runtime", "Log", "Network", "Page"):
        cdp.call(f"{domain}.enable", session=s)
    _viewport(cdp, s, height=1000)
    cdp.events.clear()  # only what the report's page does counts (not about:blank's load)
    cdp.call("Page.navigate", session=s, url=report.resolve().as_uri())
    cdp.wait_for("Page.loadEventFired", timeout_s=60)
    visit = PageVisit()
    deadline = time.monotonic() + 30
    while True:  # plotly draws asynchronously: wait until every chart has its traces
        state = cdp.call("Runtime.evaluate", session=s, expression=CHARTS_STATE, returnByValue=True)
        visit.charts = json.loads(state["result"]["value"])
        drawn = visit.charts and all(c["svgs"] and c["traces"] for c in visit.charts)
        if drawn or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    height = cdp.call("Page.getLayoutMetrics", session=s)["cssContentSize"]["height"]
    _viewport(cdp, s, height=min(int(height) + 1, 16_000))  # whole page in one screenshot
    time.sleep(1.0)  # responsive charts re-lay out after the resize
    shot = cdp.call("Page.captureScreenshot", session=s, format="png")
    screenshot.write_bytes(base64.b64decode(shot["data"]))
    for e in cdp.events:
        p = e.get("params", {})
        if e["method"] == "Runtime.consoleAPICalled" and p.get("type") in ("error", "assert"):
            visit.errors.append("console: " + " ".join(str(a.get("value")) for a in p["args"]))
        elif e["method"] == "Runtime.exceptionThrown":
            details = p["exceptionDetails"]
            text = details.get("exception", {}).get("description") or details.get("text")
            visit.errors.append(f"exception: {text} at {details.get('url')}")
        elif e["method"] == "Log.entryAdded" and p["entry"]["level"] == "error":
            visit.errors.append(f"log: {p['entry'].get('text')} {p['entry'].get('url', '')}")
        elif e["method"] == "Network.requestWillBeSent":
            visit.requests.append(p["request"]["url"])
    return visit


@pytest.mark.browser
def test_sample_report_renders_in_chromium(tmp_path: Path) -> None:
    require_external(shutil.which("chromium") is not None, "chromium")
    if not (SAMPLE / "results.csv").is_file():
        pytest.fail(f"no recorded sample results in {SAMPLE}: record them with `{RECORD}`")
    results = tmp_path / "results-sample"
    shutil.copytree(SAMPLE, results)
    report = write_report([results])
    visit = _browse(report, report.with_suffix(".png"), tmp_path)
    assert visit.errors == []
    assert visit.requests, "the browser recorded no request at all: Network domain not working"
    assert [u for u in visit.requests if not u.startswith(LOCAL_SCHEMES)] == []
    assert len(visit.charts) >= 6
    assert [c for c in visit.charts if not (c["svgs"] and c["traces"])] == []
    assert report.with_suffix(".png").stat().st_size > 50_000
