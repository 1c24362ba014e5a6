"""The DMA manager as a real subprocess between a fake sidecar and fake workers."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator

import posix_ipc
import psutil
import pytest

from dpumesh import naming, ring
from dpumesh.registry import (
    DAEMON_PREFIX,
    Registry,
    RegistryError,
    SidecarRings,
    WorkerEndpoint,
    WorkerKey,
)

pytestmark = pytest.mark.e2e

# Child worker that never reads its worker_sq; reports its key, waits to be killed.
SILENT_WORKER = """
import json, sys, time
from dpumesh.registry import WorkerEndpoint
ep = WorkerEndpoint(sys.argv[1], "silent")
print(json.dumps(list(ep.key)), flush=True)
time.sleep(60)
"""


def stop(proc: subprocess.Popen, sig: int = signal.SIGTERM) -> int:
    if proc.poll() is None:
        proc.send_signal(sig)
    try:
        return proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        raise


@pytest.fixture
def start_daemon(ns: str) -> Iterator[Callable[..., subprocess.Popen]]:
    procs: list[subprocess.Popen] = []

    def start(*extra: str) -> subprocess.Popen:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "dpumesh.dpa_daemon",
                "--ns",
                ns,
                "--log-level",
                "WARNING",
                *extra,
            ]
        )
        procs.append(proc)
        # ready once it holds its registry slot (its rings and signal handlers exist by then)
        deadline = time.monotonic() + 15
        while proc.pid not in daemon_pids(ns):
            assert proc.poll() is None and time.monotonic() < deadline, "daemon did not start"
            time.sleep(0.02)
        return proc

    yield start
    for proc in procs:
        stop(proc)


def daemon_pids(ns: str) -> set[int]:
    """Pids of the daemons holding a registry slot in `ns`."""
    try:
        reg = Registry.open(ns)
    except (posix_ipc.ExistentialError, RegistryError):
        return set()
    try:
        return {
            i.pid for i in reg.snapshot(include_daemons=True) if i.service.startswith(DAEMON_PREFIX)
        }
    finally:
        reg.close()


def recv_until(recv: Callable[[float], tuple | None], count: int, timeout: float = 10.0) -> list:
    got = []
    deadline = time.monotonic() + timeout
    while len(got) < count and time.monotonic() < deadline:
        item = recv(0.5)
        if item is not None:
            got.append(item)
    return got


def exchange(ns: str, sidecar: SidecarRings, worker: WorkerEndpoint) -> None:
    """Requests sidecar -> worker and replies worker -> sidecar, small and large."""
    big = os.urandom(5 * 1024 * 1024)
    for i in range(50):
        sidecar.send(b"req%d" % i, route=worker.key.route)
    sidecar.send(big, route=worker.key.route)
    got = recv_until(worker.recv, 51)
    assert [g[2] for g in got[:50]] == [b"req%d" % i for i in range(50)]
    assert got[50] == (worker.key.route, 0, big)
    for i in range(50):
        worker.send(b"rsp%d" % i, route=12345)
    worker.send(big[::-1])
    back = recv_until(sidecar.recv, 51)
    # the daemon stamps every reply with the worker's key
    assert {route for route, _f, _p in back} == {worker.key.route}
    assert [p for _r, _f, p in back[:50]] == [b"rsp%d" % i for i in range(50)]
    assert back[50][2] == big[::-1]
    assert not [o for o in naming.list_objects(ns) if naming.is_buffer(ns, o.name)]


@pytest.mark.parametrize("daemon_first", [True, False])
def test_end_to_end_in_both_start_orders(
    ns: str, start_daemon: Callable[[], subprocess.Popen], daemon_first: bool
) -> None:
    daemon = start_daemon() if daemon_first else None
    worker = WorkerEndpoint(ns, "ms-001")
    sidecar = SidecarRings(ns)
    if daemon is None:
        sidecar.send(b"early", route=worker.key.route)  # queued before the daemon exists
        daemon = start_daemon()
        assert recv_until(worker.recv, 1) == [(worker.key.route, 0, b"early")]
    try:
        exchange(ns, sidecar, worker)
    finally:
        worker.close()
        sidecar.close()
    assert stop(daemon) == 0
    assert naming.list_objects(ns) == []


def test_unknown_or_stale_key_bounces(ns: str, start_daemon: Callable) -> None:
    start_daemon()
    sidecar = SidecarRings(ns)
    worker = WorkerEndpoint(ns, "svc")
    stale = WorkerKey(worker.key.slot, worker.key.gen + 1)
    try:
        sidecar.send(b"nobody", route=WorkerKey(99, 1).route)
        sidecar.send(b"stale", route=stale.route)
        big = os.urandom(1 << 20)
        sidecar.send(big, route=WorkerKey(98, 1).route)
        got = recv_until(sidecar.recv, 3)
        assert got == [
            (WorkerKey(99, 1).route, ring.BOUNCED, b"nobody"),
            (stale.route, ring.BOUNCED, b"stale"),
            (WorkerKey(98, 1).route, ring.BOUNCED, big),
        ]
    finally:
        worker.close()
        sidecar.close()


def test_dead_worker_requests_bounce_promptly(ns: str, start_daemon: Callable) -> None:
    start_daemon()
    sidecar = SidecarRings(ns)
    proc = subprocess.Popen([sys.executable, "-c", SILENT_WORKER, ns], stdout=subprocess.PIPE)
    try:
        key = WorkerKey(*json.loads(proc.stdout.readline()))
        time.sleep(0.3)  # let the daemon attach it
        for i in range(3):
            sidecar.send(b"inflight%d" % i, route=key.route)
        time.sleep(0.2)
        assert sidecar.recv(0) is None  # delivered to the worker, which does not answer
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        t_kill = time.monotonic()
        got = recv_until(sidecar.recv, 3, timeout=5.0)
        assert [(f, p) for _r, f, p in got] == [(ring.BOUNCED, b"inflight%d" % i) for i in range(3)]
        assert time.monotonic() - t_kill < 2.5  # ~1 s heartbeat timeout + one tick
        sidecar.send(b"after", route=key.route)
        assert recv_until(sidecar.recv, 1) == [(key.route, ring.BOUNCED, b"after")]
        # the daemon reaped the slot and collected the dead worker's segments
        assert not [o for o in naming.list_objects(ns) if naming.worker_of(o.name)]
    finally:
        proc.kill()
        proc.wait()
        sidecar.close()


def test_slow_worker_backlog_then_bounce_without_loss(ns: str, start_daemon: Callable) -> None:
    start_daemon()
    sidecar = SidecarRings(ns)
    worker = WorkerEndpoint(ns, "slow", slots=8, slot_size=128)
    try:
        time.sleep(0.3)
        total = 8 + 256 + 40  # ring + worker backlog + overflow
        for i in range(total):
            sidecar.send(b"m%d" % i, route=worker.key.route, timeout=5)
        bounced = recv_until(sidecar.recv, 40)
        assert all(f == ring.BOUNCED for _r, f, _p in bounced)
        bounced_ids = {int(p[1:]) for _r, _f, p in bounced}
        delivered = recv_until(worker.recv, total - len(bounced_ids))
        ids = [int(p[1:]) for _r, _f, p in delivered]
        assert ids == sorted(ids)  # in order, nothing overwritten
        assert set(ids) | bounced_ids == set(range(total)) and not set(ids) & bounced_ids
        assert worker.recv(0.3) is None and sidecar.recv(0) is None
    finally:
        worker.close()
        sidecar.close()


def test_slow_sidecar_back_pressure_without_loss(ns: str, start_daemon: Callable) -> None:
    start_daemon()
    sidecar = SidecarRings(ns, slots=8, slot_size=128)
    worker = WorkerEndpoint(ns, "chatty")
    try:
        n = 600
        for i in range(n):
            worker.send(b"r%d" % i, timeout=10)
        got = recv_until(sidecar.recv, n)
        assert [p for _r, _f, p in got] == [b"r%d" % i for i in range(n)]
    finally:
        worker.close()
        sidecar.close()


def test_idle_daemon_uses_no_cpu_and_sigterm_cleans_up(ns: str, start_daemon: Callable) -> None:
    daemon = start_daemon()
    sidecar = SidecarRings(ns)
    worker = WorkerEndpoint(ns, "idle")
    sidecar.send(b"warm-up", route=worker.key.route)
    assert recv_until(worker.recv, 1)
    proc = psutil.Process(daemon.pid)
    before = proc.cpu_times()
    t0 = time.monotonic()
    time.sleep(5.0)
    after = proc.cpu_times()
    elapsed = time.monotonic() - t0
    used = (after.user + after.system) - (before.user + before.system)
    # Asleep on its doorbell, ticking 5 times a second: about 0.5 % (seen 1.2 % on a busy
    # 2-core machine); a loop that polled would use a whole core.
    assert used / elapsed < 0.05, f"idle daemon used {used / elapsed:.2%} CPU"
    worker.close()
    sidecar.close()
    assert stop(daemon) == 0
    assert naming.list_objects(ns) == []


def test_dma_cost_model_delays_each_transfer(ns: str, start_daemon: Callable) -> None:
    daemon = start_daemon("--dma-latency-us", "50000", "--dma-gbps", "1")
    sidecar = SidecarRings(ns)
    worker = WorkerEndpoint(ns, "costly")
    try:
        sent = time.monotonic()
        sidecar.send(b"small", route=worker.key.route)
        assert recv_until(worker.recv, 1)
        assert time.monotonic() - sent >= 0.05  # the per-transfer latency
        payload = bytes(4 << 20)  # 4 MiB at 1 Gbit/s: 33.6 ms on top of the latency
        sent = time.monotonic()
        sidecar.send(payload, route=worker.key.route)
        assert recv_until(worker.recv, 1)[0][2] == payload
        assert time.monotonic() - sent >= 0.05 + len(payload) * 8 / 1e9
    finally:
        worker.close()
        sidecar.close()
    assert stop(daemon, signal.SIGINT) == 0  # SIGINT shuts down as cleanly as SIGTERM
    assert naming.list_objects(ns) == []


def test_sigterm_keeps_shared_objects_while_workers_live(ns: str, start_daemon: Callable) -> None:
    daemon = start_daemon()
    worker = WorkerEndpoint(ns, "stays")
    sidecar = SidecarRings(ns)
    sidecar.close()
    assert stop(daemon) == 0
    names = {o.name for o in naming.list_objects(ns)}
    # Another process (the worker) still holds a slot: nothing shared is removed.
    assert {naming.dpa_bell(ns), naming.registry(ns), naming.sidecar_sq(ns)} <= names
    # a restarted daemon serves the same worker through the same dpa doorbell
    start_daemon()
    sidecar = SidecarRings(ns)
    try:
        worker.send(b"still here")
        assert recv_until(sidecar.recv, 1) == [(worker.key.route, 0, b"still here")]
    finally:
        worker.close()
        sidecar.close()


def test_last_process_out_removes_shared_objects(ns: str, start_daemon: Callable) -> None:
    daemon = start_daemon()
    worker = WorkerEndpoint(ns, "leaves-last")
    assert stop(daemon) == 0
    assert naming.list_objects(ns) != []
    worker.close()  # the last member of the namespace cleans up after everyone
    assert naming.list_objects(ns) == []


def test_help() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "dpumesh.dpa_daemon", "--help"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    for flag in ("--ns", "--dma-latency-us", "--dma-gbps", "--log-level"):
        assert flag in out


def test_dma_cost_formula_counts_transfers_and_charged_time() -> None:
    from dpumesh.dpa_daemon import DmaCost

    cost = DmaCost(latency_us=2.0, gbps=8.0)  # 8 Gbit/s = 1e9 bytes/s
    assert cost.enabled
    assert cost.delay_s(0) == pytest.approx(2e-6)
    assert cost.delay_s(1000) == pytest.approx(2e-6 + 1000 / 1e9)
    assert DmaCost(gbps=1.0).delay_s(125) == pytest.approx(1e-6)  # bytes at gbps * 1e9 / 8
    assert DmaCost(latency_us=3.0).delay_s(10**6) == pytest.approx(3e-6)
    assert not DmaCost().enabled and not DmaCost(-1.0, -1.0).enabled
    assert DmaCost().delay_s(10**6) == 0.0
    sizes = [0, 1, 100, 4096, 65536]
    for nbytes in sizes:
        cost.charge(nbytes)
    assert cost.transfers == len(sizes)
    assert cost.charged_s == pytest.approx(sum(2e-6 + n / 1e9 for n in sizes))


def test_dma_cost_charged_on_every_move_both_ways_and_from_backlogs(ns: str) -> None:
    from dpumesh.dpa_daemon import DmaCost, DmaManager

    # Driven step by step in this process: small rings force both backlogs.
    sidecar = SidecarRings(ns, slots=8)
    worker = WorkerEndpoint(ns, "counted", slots=4)
    cost = DmaCost(latency_us=1.0, gbps=100.0)
    manager = DmaManager(ns, cost)
    moved: list[bytes] = []
    try:
        manager._rescan()  # attach the worker (run() does this on a registry change)
        requests = [b"q" * n for n in (10, 200, 3000, 7000, 1, 50, 900, 4000)]
        for payload in requests:
            sidecar.send(payload, route=worker.key.route)
        manager.pump()  # sidecar_cq -> worker_sq: 4 fit, 4 wait in the worker's backlog
        assert len(manager.workers[worker.key.route].backlog) == 4
        got = recv_until(worker.recv, 4)
        manager.pump()  # the backlog is flushed into the freed worker_sq
        got += recv_until(worker.recv, 4)
        assert [p for _r, _f, p in got] == requests
        moved += requests

        replies = [b"r" * n for n in (5, 6000, 70, 800, 9, 1000, 2, 3, 4, 5)]
        for batch in (replies[:4], replies[4:8], replies[8:]):
            for payload in batch:
                worker.send(payload)
            manager.pump()  # worker_cq -> sidecar_sq, 8 slots: the last 2 wait in its backlog
        assert len(manager._sidecar_backlog) == 2
        back = recv_until(sidecar.recv, 8)
        manager.pump()
        back += recv_until(sidecar.recv, 2)
        assert [p for _r, _f, p in back] == replies
        moved += replies

        sidecar.send(b"nobody", route=12345)  # a bounce stays in DPU memory: not charged
        manager.pump()
        assert recv_until(sidecar.recv, 1) == [(12345, ring.BOUNCED, b"nobody")]
    finally:
        manager.close()
        worker.close()
        sidecar.close()
    assert manager.bounced == 1
    assert cost.transfers == len(moved) == manager.moved - manager.bounced == 18
    assert cost.charged_s == pytest.approx(sum(1e-6 + len(p) * 8 / 100e9 for p in moved))
    assert cost.charged_s == pytest.approx(sum(cost.delay_s(len(p)) for p in moved))
