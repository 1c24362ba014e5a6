"""The fault benchmark's pure parts: fault lists, targets, the timeline and recovery rule."""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from harness.measure import recovery
from harness.measure.accounting import counted_since
from harness.names import REPO
from harness.output.schema import FAULTS
from harness.run import faults
from harness.stacks import describe
from harness.stacks.model import Settings
from loadtests import latency
from loadtests.recorder import FAIL_CONNECTION, FAIL_STATUS, TIMELINE_BUCKET_NS, Recorder
from tests.browser import assert_renders
from tests.conftest import require_external

WORKMODEL = Path(__file__).resolve().parents[1] / "workmodels" / "default.json"
MS = 1_000_000


def test_parse_faults():
    assert faults.parse_faults("kill:worker,pause:dpa-daemon") == [
        faults.Fault("kill", "worker"),
        faults.Fault("pause", "dpa-daemon"),
    ]
    assert len(faults.parse_faults("all")) == len(faults.KINDS) * len(faults.TARGETS)
    for bad in ("kill", "stop:worker", "kill:brain", "", "kill:worker,kill:worker"):
        with pytest.raises(ValueError):
            faults.parse_faults(bad)


@pytest.mark.parametrize(
    ("mesh", "expected"),
    [
        (
            "dpumesh",
            {"worker": "app-s1", "dpu-daemon": "dpu-daemon", "dpa-daemon": "dpa-daemon"},
        ),
        ("envoy", {"worker": "app-s1", "sidecar": "sidecar-s1", "gateway": "gateway"}),
        ("nomesh", {"worker": "app-s1"}),
    ],
)
def test_targets_per_stack(mesh, expected):
    desc = describe(mesh, Settings(workmodel=WORKMODEL))
    service = faults.default_service(desc)
    assert service == "s1"  # the entry s0's first callee
    found = {
        t: faults.target_component(desc, faults.Fault("kill", t), service) for t in faults.TARGETS
    }
    assert {t: c for t, c in found.items() if c is not None} == expected


def _timeline(per_bucket: list[tuple[int, int, int]], start: int = 1000) -> recovery.Timeline:
    record = {
        "bucket_ms": 100,
        "buckets": {str(start + i): list(v) for i, v in enumerate(per_bucket) if v[0]},
    }
    return recovery.Timeline.from_record(record)


def test_recovery_after_an_outage():
    # 100 req/s = 10 per 100 ms; fault at bucket 20; 5 buckets of errors, 5 of nothing,
    # then a catch-up burst: the window from bucket 28 averages 99 but the next ones are
    # over 105 (the burst); from bucket 31 on every window holds.
    steady = [(10, 0, 2000)] * 20
    outage = [(10, 10, 30000)] * 5 + [(0, 0, 0)] * 5 + [(25, 0, 900000), (14, 0, 5000)]
    after = [(10, 0, 2000)] * 20
    tl = _timeline(steady + outage + after)
    fault_ns = (1000 + 20) * TIMELINE_BUCKET_NS + 30 * MS  # 30 ms into bucket 20
    got = recovery.recovery_s(tl, 100.0, fault_ns)
    assert got == pytest.approx(11 * 0.1 - 0.03)
    summary = recovery.after_fault(tl, fault_ns)
    assert summary == {"completed": 50 + 39 + 200, "failed": 50, "worst_us": 900000}
    series = recovery.series(tl, fault_ns)
    assert series["t_s"][20] == pytest.approx(-0.03)
    assert series["rps"][0] == pytest.approx(100.0)
    assert series["errors_per_s"][20] == pytest.approx(100.0)


def test_recovery_zero_without_disruption_and_none_without_recovery():
    steady = [(10, 0, 2000)] * 40
    fault_ns = (1000 + 10) * TIMELINE_BUCKET_NS
    assert recovery.recovery_s(_timeline(steady), 100.0, fault_ns) == 0.0
    broken = steady[:10] + [(10, 1, 2000)] * 30
    assert recovery.recovery_s(_timeline(broken), 100.0, fault_ns) is None
    slow = steady[:10] + [(5, 0, 2000)] * 30  # half the offered rate: never back
    assert recovery.recovery_s(_timeline(slow), 100.0, fault_ns) is None


def test_recovery_ignores_the_cut_last_bucket_and_low_rates_allow_one_request():
    # 10 req/s: one per bucket; the rule allows one request either way per second, so a
    # request landing a bucket late is no disruption.
    rows = [(1, 0, 1000)] * 10 + [(0, 0, 0), (2, 0, 1000)] + [(1, 0, 1000)] * 20
    fault_ns = 1000 * TIMELINE_BUCKET_NS
    assert recovery.recovery_s(_timeline(rows), 10.0, fault_ns) == 0.0
    # Too short for a full window once the last bucket is left out.
    assert recovery.recovery_s(_timeline([(10, 0, 1)] * 10), 100.0, fault_ns) is None


def test_recorder_timeline_and_failures_by_status():
    clock = [0]
    wall0 = 1_700_000_000 * 10**9
    rec = Recorder(clock_ns=lambda: clock[0], wall_ns=lambda: wall0 + clock[0])
    rec.reset(intended_rate=100.0)
    rec.sent(0, 0)
    rec.done(0, 0, 2 * MS)
    rec.sent(50 * MS, 50 * MS)
    rec.done(50 * MS, 50 * MS, 150 * MS, FAIL_STATUS, 503)  # next bucket
    rec.sent(60 * MS, 60 * MS)
    rec.done(60 * MS, 60 * MS, 160 * MS, FAIL_CONNECTION)
    doc = rec.summary()
    assert doc["failures_by"] == {"503": 1, "connection": 1}
    first = wall0 // TIMELINE_BUCKET_NS
    assert doc["timeline"] == {
        "bucket_ms": 100,
        "buckets": {str(first): [1, 0, 2000], str(first + 1): [2, 2, 100000]},
    }
    merged = latency.merge_sidecars([doc, doc])
    assert merged["failures_by"] == {"503": 2, "connection": 2}
    assert merged["timeline"]["buckets"][str(first + 1)] == [4, 4, 100000]


def test_counter_restart_counts_from_zero():
    assert counted_since(15, 10) == 5
    assert counted_since(3, 10) == 3  # the process restarted: its counter began at 0


@pytest.mark.e2e
@pytest.mark.slow
def test_a_short_faults_run_writes_faults_csv_and_renders_timelines(tmp_path):
    """`faults` over two stacks and two faults: faults.csv, the restarts, and a report
    whose fault timelines render in headless Chromium."""
    require_external(shutil.which("chromium") is not None, "chromium")
    out = tmp_path / "results"
    argv = [
        *("faults", "--meshes", "dpumesh,nomesh", "--faults", "kill:worker,kill:dpa-daemon"),
        *("--fault-rate", "40", "--before-s", "2", "--after-s", "6", "--scale", "0.1"),
        *("--warmup", "1", "--out", str(out)),
    ]
    res = subprocess.run(
        [sys.executable, "run_bench.py", *argv],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    log = res.stdout[-4000:] + res.stderr[-4000:]
    assert res.returncode == 0, log
    run_dir = (out / "latest").resolve()
    with (run_dir / "faults.csv").open(newline="") as fh:
        reader = csv.DictReader(fh)
        assert tuple(reader.fieldnames or ()) == FAULTS.names
        rows = list(reader)
    assert [(r["mesh"], r["fault"]) for r in rows] == [
        ("dpumesh", "kill:worker"),
        ("dpumesh", "kill:dpa-daemon"),
        ("nomesh", "kill:worker"),
    ], log
    meta = json.loads((run_dir / "meta.json").read_text())
    assert meta["faults"]["not_applicable"] == [{"mesh": "nomesh", "fault": "kill:dpa-daemon"}]
    by_fault = {(r["mesh"], r["fault"]): r for r in rows}
    for row in rows:
        assert int(row["requests"]) > 0 and row["loadgen_ok"] == "true", row
        assert float(row["injected_at_s"]) >= 2.0
        assert row["recovered"] == "true", row  # back to the offered rate within the run
    # The supervisor restarted the killed DMA manager (a worker is restarted by its own
    # runtime's parent, not the supervisor).
    assert by_fault[("dpumesh", "kill:dpa-daemon")]["restarts"] == "dpa-daemon=1", log
    timelines = json.loads((run_dir / "faults.json").read_text())["timelines"]
    assert [(t["mesh"], t["fault"]) for t in timelines] == [(r["mesh"], r["fault"]) for r in rows]
    for t in timelines:
        assert len(t["t_s"]) == len(t["rps"]) == len(t["errors_per_s"]) > 50
        assert min(t["t_s"]) < 0 < max(t["t_s"])  # the fault inside the series
    report = run_dir / "report.html"
    assert "Faults:" in report.read_text()
    assert_renders(report, tmp_path, charts=len(rows))
