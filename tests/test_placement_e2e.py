"""The DPU model on running stacks: CPU sets read back from the kernel, the DPU speed held."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
import urllib.request

import psutil
import pytest

from harness.deploy import start_stack
from harness.names import MESHES, REPO
from harness.placement import readback
from harness.placement.apply import prepare
from harness.placement.layout import format_cpus
from harness.ports import free_ports, port_is_free
from tests.conftest import require_external

pytestmark = pytest.mark.e2e


def _cgroups_usable() -> bool:
    return os.geteuid() == 0 and os.path.isdir("/sys/fs/cgroup")


def _threads(pids):
    return {pid: readback.thread_cpus(pid) for pid in pids if psutil.pid_exists(pid)}


@pytest.mark.parametrize("mesh", MESHES)
def test_every_process_and_thread_runs_on_its_cpu_set(mesh, tmp_path):
    online = readback.online_cpus()
    require_external(len(online) >= 2, "two CPUs")
    (port,) = free_ports(1)
    with (
        prepare("auto", "ideal", {}) as placement,
        start_stack(mesh, port=port, run_dir=tmp_path, placement=placement) as stack,
    ):
        assert urllib.request.urlopen(stack.url + "/", timeout=30).status == 200
        by_set = stack.pids_by_set()
        manifest = json.loads(stack.manifest.read_text())
        assert set(by_set) == {"host", "dpu"} if mesh == "dpumesh" else {"host"}
        for cpu_set, pids in by_set.items():
            threads = _threads(pids)
            assert threads, cpu_set
            wanted = placement.layout.cpus(cpu_set)
            assert {c for t in threads.values() for c in t.values()} == {wanted}, cpu_set
    assert manifest["placement"]["readback"] == []
    assert manifest["placement"]["observed"] == {
        cpu_set: [format_cpus(placement.layout.cpus(cpu_set))] for cpu_set in by_set
    }
    assert manifest["placement"]["placement"] == placement.layout.as_text()


def test_shared_leaves_every_process_unrestricted(tmp_path):
    (port,) = free_ports(1)
    with prepare("shared", "ideal", {}) as placement:
        assert placement.group is None
        with start_stack("dpumesh", port=port, run_dir=tmp_path, placement=placement) as stack:
            threads = {
                pid: t for pids in stack.pids_by_set().values() for pid, t in _threads(pids).items()
            }
    assert {c for t in threads.values() for c in t.values()} == {readback.online_cpus()}


def test_dpu_speed_a_quarter_holds_the_daemons_to_a_quarter_core(tmp_path):
    require_external(_cgroups_usable(), "root and cgroups")
    (port,) = free_ports(1)
    with prepare("auto", "ideal", {"dpu_speed": 0.25}) as placement:
        assert placement.quota_cores == pytest.approx(0.25)
        with start_stack("dpumesh", port=port, run_dir=tmp_path, placement=placement) as stack:
            daemons = [psutil.Process(p) for p in stack.pids_by_set()["dpu"]]
            stop = threading.Event()

            def load() -> None:  # bounded: at most 30 s or until stopped
                end = time.monotonic() + 30
                while not stop.is_set() and time.monotonic() < end:
                    urllib.request.urlopen(stack.url + "/", timeout=30).read()

            clients = [threading.Thread(target=load) for _ in range(8)]
            before = sum(sum(p.cpu_times()[:2]) for p in daemons)
            began = time.monotonic()
            for c in clients:
                c.start()
            time.sleep(4)
            used = sum(sum(p.cpu_times()[:2]) for p in daemons) - before
            elapsed = time.monotonic() - began
            stop.set()
            for c in clients:
                c.join()
    # 0.25 core per 100 ms period; generous tolerance for tick accounting and the last period.
    assert used / elapsed <= 0.35, (used, elapsed)
    assert used > 0


def test_a_speed_below_1_without_cgroups_stops_before_anything_starts(tmp_path):
    (port,) = free_ports(1)
    not_a_mount = tmp_path / "no-cgroups"
    not_a_mount.mkdir()
    before = {p.pid for p in psutil.Process().children(recursive=True)}
    done = subprocess.run(
        [
            *(sys.executable, "run_bench.py", "serve", "--mesh", "dpumesh", "--port", str(port)),
            *("--dpu-speed", "0.5", "--run-dir", str(tmp_path / "run")),
        ],
        cwd=REPO,
        env={**os.environ, "DPUMESH_CGROUP_ROOT": str(not_a_mount)},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 1
    assert done.stderr.startswith("error: cannot hold the DPU at 0.5x host speed")
    assert done.stderr.count("\n") == 1, done.stderr
    assert str(not_a_mount) in done.stderr
    assert not (tmp_path / "run").exists()
    assert list(not_a_mount.iterdir()) == []
    assert {p.pid for p in psutil.Process().children(recursive=True)} <= before
    assert port_is_free(port)
