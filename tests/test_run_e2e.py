"""`run_bench.py run` end to end: real stacks, real Locust, the results contract (DESIGN §6)."""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time

import pytest

from baselines.envoy.config import envoy_binary
from harness.deploy import start_stack
from harness.measure import checks
from harness.names import DEFAULT_MESHES as MESHES  # the default comparison
from harness.names import REPO
from harness.ports import free_ports
from harness.run import runner
from harness.run.loadgen import LocustSpec
from loadtests import latency
from tests.browser import assert_renders
from tests.conftest import require_external

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

CONTRACT = [
    "mesh",
    "stack",
    "mode",
    "workmodel",
    "rep",
    "users",
    "offered_rps",
    "achieved_rps",
    "requests",
    "failures",
    "duration_s",
    "mean_us",
    "p50_us",
    "p90_us",
    "p99_us",
    "p999_us",
    "cpu_host_ms_per_req",
    "cpu_offload_ms_per_req",
    "cpu_loadgen_ms_per_req",
    "vcpu_host_per_1000rps",
    "vcpu_offload_per_1000rps",
    "rss_host_mb",
    "rss_offload_mb",
    "level",
    "checks_ok",
    "checks",
    "downstream_calls_per_req",
]


def _envoy_available() -> bool:
    try:
        envoy_binary()
    except FileNotFoundError:
        return False
    return True


def run_bench(argv: list[str], timeout_s: float) -> subprocess.CompletedProcess[str]:
    """`python run_bench.py ARGV` from the repository, output captured."""
    return subprocess.run(
        [sys.executable, "run_bench.py", *argv],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout_s,
    )


@pytest.fixture(scope="module")
def short_run(tmp_path_factory):
    """One short run over all three stacks (about a minute)."""
    require_external(_envoy_available(), "Envoy")
    out = tmp_path_factory.mktemp("results")
    argv = [
        # 6 s windows: the achieved rate's denominator ends with the last response, so a
        # slow last request on this shared machine weighs less than in a 4 s window.
        *("run", "--duration", "6", "--warmup", "2", "--repeat", "1"),
        *("--rate", "20", "--users", "4", "--out", str(out)),
    ]
    res = run_bench(argv, timeout_s=240)
    latest = out / "latest"
    return res, latest.resolve()


def _rows(run_dir):
    with (run_dir / "results.csv").open() as fh:
        return list(csv.DictReader(fh))


def test_run_writes_the_results_contract(short_run):
    res, run_dir = short_run
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    rows = _rows(run_dir)
    assert set(CONTRACT) <= set(rows[0])
    # one row per stack x repetition x level, interleaved: A B C
    assert [(r["mesh"], r["rep"], r["level"]) for r in rows] == [
        (m, "1", lv) for m in MESHES for lv in ("closed-4", "open-20")
    ]
    for r in rows:
        where = f"{r['mesh']} {r['level']}"
        assert r["checks_ok"] == "true" and r["checks"] == "", where
        assert r["mode"] == "local" and r["workmodel"] == "default.json"
        assert float(r["achieved_rps"]) > 0 and int(r["requests"]) > 0, where
        assert int(r["failures"]) == 0, where
        assert 0 < float(r["p50_us"]) < float(r["p99_us"]) <= float(r["p999_us"]), where
        assert float(r["cpu_host_ms_per_req"]) > 0, where
        assert float(r["cpu_loadgen_ms_per_req"]) > 0, where
        offload = float(r["cpu_offload_ms_per_req"])
        assert (offload > 0) == (r["mesh"] == "dpumesh"), where
        assert (float(r["rss_offload_mb"]) > 0) == (r["mesh"] == "dpumesh"), where
        assert float(r["downstream_calls_per_req"]) == pytest.approx(2.0), where
        if r["level"] == "open-20":
            assert r["offered_rps"] == "20" and r["users"] == "8"
            # open loop at a rate every stack sustains: achieved within 2 % of offered
            assert float(r["achieved_rps"]) == pytest.approx(20.0, rel=0.02), where
        else:
            assert r["offered_rps"] == "" and r["users"] == "4"
    assert "self-checks: all" in res.stdout and "  vs envoy " in res.stdout  # the summary
    assert "Latency and CPU at level " in res.stdout


def test_an_auto_placement_run_records_its_dpu_model(short_run):
    """The default (auto, bluefield3): CSV columns, meta.json's layout as read back, headline."""
    res, run_dir = short_run
    model = json.loads((run_dir / "meta.json").read_text())["dpu_model"]
    layout = model["placement"]
    assert layout != "shared" and model["dpu_profile"] == "bluefield3"
    for r in _rows(run_dir):
        assert (r["placement"], r["dpu_profile"]) == (layout, "bluefield3")
        assert (r["dpu_speed"], r["dma_latency_us"], r["dma_gbps"]) == ("0.5", "1", "504.1")
    for mesh, starts in model["per_stack"].items():
        assert [s["placement"] for s in starts] == [layout], mesh
        assert [s["readback"] for s in starts] == [[]], mesh
    sentence = model["sentence"]
    assert sentence.startswith("DPU: ") and f"model: {sentence}" in res.stdout
    assert f"<b>Model.</b> {sentence}." in (run_dir / "report.html").read_text()


def test_run_checks_itself_and_records_why(short_run):
    _, run_dir = short_run
    meta = json.loads((run_dir / "meta.json").read_text())
    assert meta["checks_ok"] is True and meta["interrupted"] is False
    names = {(c["mesh"], c["level"], c["name"]) for c in meta["checks"]}
    for mesh in MESHES:
        for level in ("closed-4", "open-20"):
            for name in ("loadgen_ran", "counts_match", "error_rate", "loadgen_cpu"):
                assert (mesh, level, name) in names
            assert (mesh, level, "mesh_crossed") in names
        assert (mesh, "open-20", "open_loop_delivery") in names
    # Locust's count equals the stack's own count, up to requests in flight at the edges
    for c in meta["checks"]:
        if c["name"] == "counts_match":
            assert c["ok"], c
    # meta.json: config, versions, machine, fairness, configs, calls per request
    assert meta["config"]["duration"] == 6 and meta["config"]["rates"] == [20.0]
    assert meta["ladder"]["rates"] == [20.0] and meta["ladder"]["calibration"] == {}
    speeds = meta["machine_speed"]["segments"]
    assert [s["stack"] for s in speeds] == list(MESHES)  # timed before every stack start
    assert all(s["host_mloops_per_s"] > 0 for s in speeds)
    assert set(meta["max_clean_throughput"]) == set(MESHES)
    assert meta["config"]["downstream_calls_per_req"] == 2.0
    assert meta["downstream_calls_per_req"] == 2.0
    assert meta["versions"]["locust"] and meta["git"]["commit"]
    assert meta["machine"]["cpu_logical"] and meta["machine"]["mem_total_bytes"]
    fairness = meta["fairness"]
    for item in ("same_app_code", "workmodel", "seed", "worker_counts"):
        assert fairness[item]["ok"] is True, item
    assert len(fairness["workmodel"]["sha256"]) == 64
    assert "--concurrency" in fairness["envoy_tuning"]["flags"]
    assert set(meta["mesh_configs"]) == set(MESHES)
    for files in meta["mesh_configs"].values():
        for rel in files.values():
            assert (run_dir / rel).is_file(), rel
    assert "gateway" in meta["mesh_configs"]["envoy"]


def test_run_files(short_run):
    _, run_dir = short_run
    for name in ("results.csv", "roles.csv", "meta.json", "report.html"):
        assert (run_dir / name).is_file(), name
    hists = sorted(p.name for p in (run_dir / "hist").glob("*.hdr"))
    assert hists == sorted(f"{m}-rep1-{lv}.hdr" for m in MESHES for lv in ("closed-4", "open-20"))
    for rec in _rows(run_dir):
        path = run_dir / "hist" / f"{rec['mesh']}-rep1-{rec['level']}.hdr"
        count = latency.load_histogram(path).get_total_count()
        assert count == int(rec["requests"]) - int(rec["failures"])
    assert list((run_dir / "locust").glob("*_stats_history.csv"))
    assert (run_dir / "configs" / "envoy" / "gateway.json").is_file()
    with (run_dir / "roles.csv").open() as fh:
        roles = list(csv.DictReader(fh))
    sides = {(r["mesh"], r["role"]): r["side"] for r in roles}
    assert sides[("dpumesh", "dpu-daemon")] == "offload"
    assert sides[("envoy", "sidecar")] == "host" and sides[("envoy", "gateway")] == "host"
    assert sides[("nomesh", "loadgen")] == "loadgen"
    assert not any(r["side"] == "offload" for r in roles if r["mesh"] != "dpumesh")


def test_a_paused_entry_process_shows_in_p99(tmp_path):
    """SIGSTOP the DPUmesh bridge for 1 s in an open-loop level: p99 must show it."""
    (port,) = free_ports(1)
    with start_stack("dpumesh", port=port, run_dir=tmp_path / "stack") as stack:
        (bridge,) = stack.roles()["dpu-daemon"]
        spec = LocustSpec(
            host=stack.url,
            users=30,
            rate=50.0,
            excluded_s=1,
            measured_s=5,
            hdr_out=tmp_path / "hist" / "pause.hdr",
            csv_prefix=tmp_path / "locust" / "pause",
            request_id_prefix="pause-",
        )
        paused = threading.Event()

        def pause() -> None:
            deadline = time.monotonic() + 30
            # ~2 s of traffic first: the stall falls inside the measured window
            while stack.traffic()["entry_requests"] < 100 and time.monotonic() < deadline:
                time.sleep(0.02)
            os.kill(bridge.pid, signal.SIGSTOP)
            try:
                time.sleep(1.0)
            finally:
                os.kill(bridge.pid, signal.SIGCONT)
            paused.set()

        thread = threading.Thread(target=pause, daemon=True)
        thread.start()
        m = runner.measure_level(stack, spec)
        thread.join(timeout=30)
    assert paused.is_set()
    assert m.returncode == 0 and m.hist is not None
    summary = latency.summarize(m.hist)
    assert summary.p99_us >= 900_000, summary
    assert summary.max_us >= 950_000, summary
    assert m.sidecar["failures"] == 0
    assert checks.counts_match(m.sidecar, m.level_traffic["entry_requests"]).ok
    assert m.usage is not None and m.window_requests > 0


def test_a_failing_self_check_is_reported_not_hidden(tmp_path):
    """Every request fails (a custom internal function raises): results are still written,
    the rows and the summary say which check failed, and the exit status is 1."""
    functions = tmp_path / "functions"
    functions.mkdir()
    (functions / "boom.py").write_text("def boom(params):\n    raise RuntimeError('boom')\n")
    workmodel = json.loads((REPO / "workmodels" / "default.json").read_text())
    workmodel["s0"]["internal_service"] = {"boom": {}}
    (tmp_path / "wm.json").write_text(json.dumps(workmodel))
    out = tmp_path / "results"
    argv = [
        *("run", "--meshes", "nomesh", "--duration", "2", "--warmup", "1", "--repeat", "1"),
        *("--rate", "", "--users", "2", "--workmodel", str(tmp_path / "wm.json")),
        *("--functions-dir", str(functions), "--out", str(out)),
    ]
    res = run_bench(argv, timeout_s=120)
    assert res.returncode == 1, res.stdout[-3000:] + res.stderr[-3000:]
    assert "self-checks FAILED" in res.stdout
    run_dir = (out / "latest").resolve()
    (row,) = _rows(run_dir)
    assert row["checks_ok"] == "false" and "error_rate" in row["checks"].split(";")
    assert int(row["failures"]) == int(row["requests"]) > 0
    meta = json.loads((run_dir / "meta.json").read_text())
    assert meta["checks_ok"] is False
    assert meta["config"]["functions_dir"] == str(functions)
    assert (run_dir / "report.html").is_file()


def _check_merged_histograms(run_dir, rows):
    """Each Locust worker wrote its own histogram (kept in hist/parts/); the merged one
    counts every successful request of both, exactly (a saturated level may have none)."""
    for row in rows:
        merged = run_dir / "hist" / f"{row['stack']}-rep{row['rep']}-{row['level']}.hdr"
        parts = json.loads(latency.sidecar_path(merged).read_text())["files"]
        assert len(parts) == 2, parts
        count = latency.load_histogram(merged).get_total_count()
        assert count == sum(
            latency.load_histogram(run_dir / "hist" / part).get_total_count() for part in parts
        )
        assert count == int(row["requests"]) - int(row["failures"])


def test_a_stack_that_saturates_early_shows_its_knee_and_another_reaches_the_top(tmp_path):
    """dpumesh with a slow DMA engine (3 ms per transfer, one engine: transfers queue) has
    its knee below the top rate; nomesh is clean at the top, so its maximum is "≥ top".
    Two Locust processes per level: their histograms merge exactly. 6 s windows: the
    achieved rate's denominator ends with the last response, so the tail weighs < 1 %."""
    out = tmp_path / "results"
    argv = [
        *("run", "--meshes", "nomesh,dpumesh", "--repeat", "1", "--processes", "2"),
        *("--duration", "6", "--warmup", "1", "--settle", "1", "--users", "2"),
        *("--rate", "10,60", "--refine", "1", "--scale", "0.1"),
        *("--dpu-profile", "ideal", "--dma-latency-us", "3000", "--out", str(out)),
    ]
    res = run_bench(argv, timeout_s=240)
    run_dir = (out / "latest").resolve()
    assert (run_dir / "meta.json").is_file(), res.stdout[-3000:] + res.stderr[-3000:]
    meta = json.loads((run_dir / "meta.json").read_text())
    assert meta["ladder"]["rates"] == [10.0, 60.0] and meta["ladder"]["source"] == "config"
    best = meta["max_clean_throughput"]
    assert best["nomesh"] == {
        "rps": 60.0,
        "at_top": True,
        "per_rep": {"1": {"rps": 60.0, "at_top": True}},
    }, res.stdout[-3000:]
    assert best["dpumesh"]["at_top"] is False, res.stdout[-3000:]
    assert best["dpumesh"]["rps"] is not None and best["dpumesh"]["rps"] < 60
    rows = _rows(run_dir)
    levels = {(r["stack"], r["level"]) for r in rows}
    assert {("nomesh", "open-10"), ("nomesh", "open-60"), ("dpumesh", "open-60")} <= levels
    refined = [r for r in rows if r["level"].startswith("refine-")]
    assert [r["stack"] for r in refined] == ["dpumesh"]  # only a stack with a bracket refines
    assert 10 < float(refined[0]["offered_rps"]) < 60
    assert [r["dma_latency_us"] for r in rows] == ["3000"] * len(rows)
    _check_merged_histograms(run_dir, rows)
    assert all(int(r["requests"]) > 0 for r in rows if r["stack"] == "nomesh")
    assert re.search(r"\nnomesh +≥ 60\.0 ", res.stdout), res.stdout[-3000:]  # the summary table
    html = (run_dir / "report.html").read_text()
    assert "≥ 60" in html
    # Rates past dpumesh's knee were not delivered: findings, not failed self-checks.
    assert res.returncode == 0 and "self-checks FAILED" not in html
    assert "informational, not met" in html


def test_a_whatif_sweep_measures_dpumesh_at_every_value_and_charts_it(tmp_path):
    """`whatif --param dpu_speed`: envoy once, dpumesh at two speeds (each its own DPU
    cgroup), a calibrated ladder; the report's sensitivity chart renders in Chromium."""
    require_external(_envoy_available(), "Envoy")
    require_external(shutil.which("chromium") is not None, "chromium")
    out = tmp_path / "results"
    argv = [
        *("whatif", "--param", "dpu_speed", "--values", "0.25,1", "--baselines", "envoy"),
        *("--quick", "--ladder-rates", "3", "--scale", "0.2", "--out", str(out)),
    ]
    res = run_bench(argv, timeout_s=300)
    run_dir = (out / "latest").resolve()
    assert (run_dir / "meta.json").is_file(), res.stdout[-3000:] + res.stderr[-3000:]
    meta = json.loads((run_dir / "meta.json").read_text())
    labels = ["envoy", "dpumesh@dpu_speed=0.25", "dpumesh@dpu_speed=1"]
    assert meta["whatif"]["param"] == "dpu_speed"
    assert meta["whatif"]["values"] == {labels[1]: 0.25, labels[2]: 1.0}
    assert set(meta["ladder"]["calibration"]) == set(labels)
    assert meta["ladder"]["source"] == "calibrated" and len(meta["ladder"]["rates"]) <= 3
    rows = _rows(run_dir)
    by_stack = {label: [r for r in rows if r["stack"] == label] for label in labels}
    assert all(by_stack.values()), sorted({r["stack"] for r in rows})
    assert {r["dpu_speed"] for r in by_stack[labels[1]]} == {"0.25"}
    assert {r["dpu_speed"] for r in by_stack[labels[2]]} == {"1"}
    # Each speed was held by its own cgroup, read back from the 0.25 stack's DPU daemons.
    (quarter,) = meta["dpu_model"]["per_stack"][labels[1]]
    assert quarter["dpu_quota_cores"] == pytest.approx(0.25) and quarter["readback"] == []
    report = run_dir / "report.html"
    assert "sensitivity" in report.read_text().lower()
    assert_renders(report, tmp_path, charts=7)  # the sensitivity chart among them
