"""Faults and hostile load against a real mesh (issue 15): daemon deaths, large bodies, floods.

Every wait is a bounded loop on an observable event (health, stats, a reply);
only the liveness bound of a dead DMA manager is a stated time budget.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import resource
import selectors
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO

import psutil
import pytest

from dpumesh import naming, registry, ring
from dpumesh.dpu_daemon import LIVENESS_PERIOD_S
from tests.mesh import REPO, Mesh

pytestmark = pytest.mark.e2e

MiB = 1024 * 1024
# kill -9 of the DMA manager -> health 503: the heartbeat in flight, its expiry and two
# liveness ticks, plus a second for a loaded 2-core machine.
DMA_DEATH_BOUND_S = registry.HEARTBEAT_INTERVAL + registry.DEAD_AFTER + 2 * LIVENESS_PERIOD_S + 1.0


@pytest.fixture
def mesh(ns: str, tmp_path: Path) -> Iterator[Mesh]:
    m = Mesh(ns, tmp_path)
    try:
        yield m
    finally:
        m.close()


def request(
    port: int, path: str, method: str = "GET", body: bytes | None = None, timeout: float = 40
) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request(method, path, body=body)
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def try_request(port: int, path: str, timeout: float = 5) -> int | None:
    """The status of a GET, or None if the connection failed."""
    try:
        return request(port, path, timeout=timeout)[0]
    except OSError:
        return None


def read_response(reader: BinaryIO) -> tuple[int, bytes]:
    """One content-length framed HTTP/1.1 response from a buffered socket reader."""
    status = int(reader.readline().split()[1])
    length = 0
    while (line := reader.readline()) not in (b"\r\n", b""):
        name, _, value = line.decode("latin-1").partition(":")
        if name.strip().lower() == "content-length":
            length = int(value)
    return status, reader.read(length)


def wait_for(what: str, check: Callable[[], bool], timeout: float = 20.0) -> float:
    """Poll `check` until true (bounded); returns the monotonic time it first held."""
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)
    return time.monotonic()


def start_with_one_worker(mesh: Mesh, *dpu_options: str) -> None:
    """Both daemons (the sidecar with `dpu_options`) and one worker of s1, registered."""
    mesh.start_dpa()
    mesh.start_dpu(*dpu_options)
    mesh.start_service("s1", processes=1)
    mesh.wait_workers({"s1": 1})


def wait_in_worker(mesh: Mesh, worker: registry.WorkerInfo, count: int) -> None:
    """Until `count` requests are in flight and past the DMA manager, in `worker`'s hands."""
    wait_for(
        f"{count} request(s) in the worker",
        lambda: (
            mesh.stats()["inflight"] == count
            and ring_len(naming.sidecar_cq(mesh.ns)) == 0
            and ring_len(naming.worker_sq(mesh.ns, worker.slot, worker.gen)) == 0
        ),
    )


def kill9(mesh: Mesh, name: str) -> float:
    proc = mesh.procs.pop(name)
    proc.send_signal(signal.SIGKILL)
    proc.wait(10)
    return time.monotonic()


def vm_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise AssertionError(f"no {field} for pid {pid}")


def ring_len(name: str) -> int:
    """Unread entries of a ring (a read-only look at its header)."""
    r = ring.Ring.open(name)
    try:
        return len(r)
    finally:
        r.close()


def test_dead_dma_manager_turns_health_503_fails_fast_and_recovers(mesh: Mesh) -> None:
    start_with_one_worker(mesh)
    assert request(mesh.port, "/s1/api/v1")[0] == 200
    before = mesh.stats()
    assert before["dma_manager"]["alive"] is True and before["dma_manager"]["deaths"] == 0
    old_pid = mesh.procs["dpa"].pid
    assert before["dma_manager"]["pid"] == old_pid
    # One request in the worker's hands when the DMA manager dies: its reply can never come.
    slow: list[tuple[int, bytes, float]] = []

    def slow_call() -> None:
        status, body = request(mesh.port, "/s1/sleep?s=8")
        slow.append((status, body, time.monotonic()))

    with contextlib.closing(registry.Registry.open(mesh.ns)) as table:
        (worker,) = table.snapshot()
    caller = threading.Thread(target=slow_call)
    caller.start()
    wait_in_worker(mesh, worker, 1)

    t_kill = kill9(mesh, "dpa")
    t_unhealthy = wait_for(
        "health 503",
        lambda: request(mesh.port, "/_dpumesh/health", timeout=5)[0] == 503,
        timeout=DMA_DEATH_BOUND_S + 5,
    )
    assert t_unhealthy - t_kill <= DMA_DEATH_BOUND_S
    status, body = request(mesh.port, "/_dpumesh/health")
    assert status == 503 and b"DMA manager" in body
    dma = mesh.stats()["dma_manager"]
    assert (dma["alive"], dma["deaths"], dma["pid"]) == (False, 1, old_pid)

    started = time.monotonic()
    status, body = request(mesh.port, "/s1/api/v1")
    assert status == 503 and b"DMA manager" in body
    assert time.monotonic() - started < 1.0  # at once, not at the 30 s deadline
    # The request in flight is answered when the grace (2 s from the death) is over.
    caller.join(30)
    ((status, body, t_done),) = slow
    assert status == 503 and b"DMA manager" in body
    assert t_unhealthy <= t_done < t_kill + DMA_DEATH_BOUND_S + 2.0 + 1.0

    mesh.start_dpa()  # a new process, started the same way, re-attaches to everything
    wait_for("health 200", lambda: request(mesh.port, "/_dpumesh/health", timeout=5)[0] == 200)
    status, body = request(mesh.port, "/s1/api/v1")
    after = mesh.stats()
    assert (status, body) == (200, f"s1:{after['workers']['s1'][0]}".encode())
    assert after["workers"] == before["workers"]  # the same worker served it
    dma = after["dma_manager"]
    assert (dma["alive"], dma["deaths"]) == (True, 1)
    assert dma["pid"] == mesh.procs["dpa"].pid != old_pid
    assert dma["failed_requests"] == 2  # the fail-fast one and the abandoned one
    log = (mesh.tmp / "dpa.log").read_text()
    assert f"dpa-daemon pid {old_pid} up" in log and f"pid {mesh.procs['dpa'].pid} up" in log


def test_requests_in_flight_complete_if_the_dma_manager_returns_in_the_grace(mesh: Mesh) -> None:
    start_with_one_worker(mesh, "--dma-grace", "6")
    with contextlib.closing(registry.Registry.open(mesh.ns)) as table:
        (worker,) = table.snapshot()
    results: list[tuple[float, float, int, bytes]] = []
    lock = threading.Lock()

    def call() -> None:
        start = time.monotonic()
        status, body = request(mesh.port, "/s1/sleep?s=3")
        with lock:
            results.append((start, time.monotonic(), status, body))

    callers = [threading.Thread(target=call) for _ in range(4)]
    for t in callers:
        t.start()
    # All four are past the DMA manager (in the worker's handlers), so none dies with it.
    wait_in_worker(mesh, worker, 4)
    t_kill = kill9(mesh, "dpa")
    t_dead = wait_for(
        "the death to be seen",
        lambda: mesh.stats()["dma_manager"]["alive"] is False,
        timeout=DMA_DEATH_BOUND_S + 5,
    )
    t_restart = time.monotonic()
    mesh.start_dpa()
    for t in callers:
        t.join(30)
    assert len(results) == 4
    assert [(s, b) for _, _, s, b in results] == [(200, b"slept")] * 4
    for start, end, _, _ in results:
        # sent before the kill, answered only once a new DMA manager was there
        assert start < t_kill < t_dead <= t_restart < end
    dma = mesh.stats()["dma_manager"]
    assert (dma["alive"], dma["deaths"], dma["failed_requests"]) == (True, 1, 0)


def test_a_restarted_sidecar_serves_with_the_same_dma_manager_and_workers(mesh: Mesh) -> None:
    start_with_one_worker(mesh)
    assert request(mesh.port, "/s1/api/v1")[0] == 200
    before = mesh.stats()
    old_pid = mesh.procs["dpu"].pid
    # A request whose reply reaches sidecar_sq after the sidecar that sent it died.
    orphan = threading.Thread(target=try_request, args=(mesh.port, "/s1/sleep?s=4", 10))
    orphan.start()
    wait_for("the orphan to reach the worker", lambda: mesh.stats()["inflight"] == 1)
    t_kill = kill9(mesh, "dpu")
    orphan.join(10)
    mesh.start_dpu()  # same port: re-bindable at once; waits for health 200
    after = mesh.stats()
    assert after["pid"] == mesh.procs["dpu"].pid != old_pid
    assert after["workers"] == before["workers"]
    assert after["dma_manager"]["pid"] == before["dma_manager"]["pid"] == mesh.procs["dpa"].pid
    # Counters start fresh: only health probes and this stats request so far.
    assert after["bridge_requests"] <= 5 and after["services"] == {}
    assert (after["dma_manager"]["alive"], after["dma_manager"]["deaths"]) == (True, 0)
    pid = after["workers"]["s1"][0]
    assert request(mesh.port, "/s1/api/v1") == (200, f"s1:{pid}".encode())
    # Numbered like the orphan had the numbering restarted; the orphan's reply arrives
    # while it waits and must not be taken for its own.
    sent = time.monotonic()
    assert request(mesh.port, "/s1/sleep?s=6") == (200, b"slept")
    assert time.monotonic() - sent >= 6.0
    assert t_kill < sent
    assert mesh.stats()["inflight"] == 0
    log = (mesh.tmp / "dpu.log").read_text()
    assert f"dpu-daemon pid {old_pid} ns={mesh.ns}" in log
    assert f"dpu-daemon pid {mesh.procs['dpu'].pid} ns={mesh.ns}" in log


def _http_upload(body: bytes) -> bytes:
    head = (
        f"POST /s1/echo HTTP/1.1\r\nhost: s1\r\ncontent-type: application/json\r\n"
        f"content-length: {len(body)}\r\nconnection: close\r\n\r\n"
    )
    return head.encode() + body


def upload_concurrently(
    port: int,
    payloads: list[bytes],
    *,
    hold: int = 0,
    gate: Callable[[], bool] = lambda: True,
    timeout: float = 60,
) -> list[int]:
    """Send every payload on its own connection at once (round robin), return the statuses.

    One thread with non-blocking sockets, so all uploads are unfinished together and the
    test's own threads cannot delay the liveness client. The last `hold` bytes of each
    payload are sent only once all the rest is sent and `gate()` is true. A connection
    the sidecar answers early (503) is read to its end; one that closes on us before
    answering counts as -1.
    """
    sel = selectors.DefaultSelector()
    state = {}
    for i, data in enumerate(payloads):
        sock = socket.create_connection(("127.0.0.1", port))
        sock.setblocking(False)
        cut = len(data) - hold
        state[sock] = {
            "i": i,
            "out": memoryview(data)[:cut],
            "held": memoryview(data)[cut:],
            "in": bytearray(),
        }
        sel.register(sock, selectors.EVENT_READ | selectors.EVENT_WRITE)
    statuses = [0] * len(payloads)
    deadline = time.monotonic() + timeout
    holding = hold > 0
    while state:
        assert time.monotonic() < deadline, "uploads hung"
        if holding and not any(st["out"] for st in state.values()) and gate():
            holding = False
            for sock, st in state.items():
                st["out"], st["held"] = st["held"], memoryview(b"")
                if st["out"]:
                    sel.modify(sock, selectors.EVENT_READ | selectors.EVENT_WRITE)
        for key, events in sel.select(timeout=0.05 if holding else 1.0):
            sock = key.fileobj
            st = state[sock]
            done = False
            if events & selectors.EVENT_WRITE and st["out"]:
                try:
                    sent = sock.send(st["out"][: 256 * 1024])
                    st["out"] = st["out"][sent:]
                except BlockingIOError:
                    pass
                except OSError:
                    st["out"] = st["held"] = memoryview(b"")  # answered and closed
                if not st["out"]:
                    sel.modify(sock, selectors.EVENT_READ)
            if events & selectors.EVENT_READ:
                try:
                    chunk = sock.recv(1 << 20)
                except BlockingIOError:
                    continue
                except OSError:
                    chunk = b""
                if chunk:
                    st["in"] += chunk
                else:
                    done = True
            if done:
                head = bytes(st["in"][:12])
                statuses[st["i"]] = int(head[9:12]) if head.startswith(b"HTTP/1.1 ") else -1
                sel.unregister(sock)
                sock.close()
                del state[sock]
    sel.close()
    return statuses


def test_concurrent_large_bodies_stay_within_the_budget(mesh: Mesh) -> None:
    budget = 32 * MiB
    mesh.start_dpa()
    mesh.start_dpu("--max-buffered-bytes", str(budget))
    mesh.start_service("s1", processes=2)
    mesh.start_service("s2", processes=1)
    mesh.wait_workers({"s1": 2, "s2": 1})
    pid = mesh.procs["dpu"].pid
    rss_before = vm_kib(pid, "VmRSS")
    body = json.dumps({"data": "x" * (8 * MiB - 64)}).encode()
    assert len(body) <= ring.MAX_BODY
    payload = _http_upload(body)

    stop = threading.Event()
    probing = threading.Event()
    samples: list[tuple[float, float]] = []  # (sent, waited)
    liveness_statuses: set[int] = set()

    def liveness() -> None:
        conn = http.client.HTTPConnection("127.0.0.1", mesh.port, timeout=10)
        while not stop.is_set():
            start = time.monotonic()
            conn.request("GET", "/s2/api/v1")
            resp = conn.getresponse()
            resp.read()
            samples.append((start, time.monotonic() - start))
            liveness_statuses.add(resp.status)
            probing.set()
            stop.wait(0.05)
        conn.close()

    probe = threading.Thread(target=liveness)
    probe.start()
    assert probing.wait(10)
    rounds = []
    t_load = time.monotonic()
    try:
        # Round 1: 8 x 6 MiB unfinished at once; the big ones may hold 28 MiB, so at least
        # four can never fit and get 503 before the last 2 MiB of each is sent.
        refused_before = mesh.stats()["buffers"]["refused"]
        rounds.append(
            upload_concurrently(
                mesh.port,
                [payload] * 8,
                hold=2 * MiB,
                gate=lambda: mesh.stats()["buffers"]["refused"] - refused_before >= 4,
            )
        )
        # Rounds 2-4: as fast as they come; complete requests free the budget, so
        # connections over it are paused rather than refused.
        for _ in range(3):
            rounds.append(upload_concurrently(mesh.port, [payload] * 8))
        t_done = time.monotonic()
    finally:
        stop.set()
        probe.join(30)
    statuses = [s for r in rounds for s in r]
    assert set(statuses) <= {200, 503}, rounds  # over the budget: 503, never a hang
    assert all(200 in r for r in rounds), rounds  # and the budget still lets work through
    assert rounds[0].count(503) >= 4, rounds
    refused = statuses.count(503)
    assert liveness_statuses == {200}
    during = [waited for sent, waited in samples if t_load <= sent <= t_done]
    assert len(during) >= 3, samples  # it did run while the bodies went through
    worst = max(waited for _, waited in samples)
    assert worst < 0.5, f"liveness waited {worst:.3f} s"
    peak_mib = vm_kib(pid, "VmHWM") / 1024
    assert peak_mib < budget / MiB + 200, f"peak RSS {peak_mib:.0f} MiB"
    stats = mesh.stats()
    assert stats["bridge_errors"].get("503") == refused
    assert stats["buffers"]["refused"] == refused
    assert stats["buffers"]["paused"] > 0
    # Once idle, nothing is held and the memory went back.
    wait_for("buffers released", lambda: mesh.stats()["buffers"]["used"] < 64 * 1024)
    wait_for(
        "RSS back near its start",
        lambda: vm_kib(pid, "VmRSS") < rss_before + 48 * 1024,
        timeout=10,
    )


def test_connections_over_the_cap_are_answered_503_and_logged(mesh: Mesh) -> None:
    cap = 100
    mesh.start_dpa()
    mesh.start_dpu("--max-connections", str(cap))
    ctl = http.client.HTTPConnection("127.0.0.1", mesh.port, timeout=10)

    def stats() -> dict:
        ctl.request("GET", "/_dpumesh/stats")
        return json.loads(ctl.getresponse().read())

    wait_for("only the control connection", lambda: stats()["connections"]["open"] == 1)
    socks = [socket.create_connection(("127.0.0.1", mesh.port)) for _ in range(2 * cap - 1)]
    try:
        wait_for(
            "every connection accepted or refused",
            lambda: stats()["connections"] == {"open": cap, "max": cap, "refused": cap},
        )
        # Refused ones were answered before being counted: the bytes are already here.
        refused, kept = [], []
        for sock in socks:
            sock.setblocking(False)
            try:
                (refused if sock.recv(65536, socket.MSG_PEEK) else kept).append(sock)
            except BlockingIOError:
                kept.append(sock)
        assert (len(refused), len(kept)) == (cap, cap - 1)
        for sock in refused:
            sock.setblocking(True)
            reply = b""
            while chunk := sock.recv(65536):
                reply += chunk
            assert reply.startswith(b"HTTP/1.1 503") and b"too many connections" in reply
        for sock in kept:  # the accepted ones are served
            sock.setblocking(True)
            sock.settimeout(10)
            sock.sendall(b"GET /_dpumesh/stats HTTP/1.1\r\nhost: x\r\n\r\n")
            assert sock.recv(65536).startswith(b"HTTP/1.1 200")
    finally:
        for sock in socks:
            sock.close()
    log = (mesh.tmp / "dpu.log").read_text()
    assert f"connection cap reached ({cap} open, --max-connections {cap})" in log
    wait_for("the idle connections to close", lambda: stats()["connections"]["open"] == 1)
    ctl.close()
    assert request(mesh.port, "/_dpumesh/stats")[0] == 200  # a new client is served again


def test_out_of_descriptors_is_logged_and_the_listener_survives(
    ns: str, tmp_path: Path, mesh: Mesh
) -> None:
    """uvloop's own server stops listening for good on EMFILE; ours logs and goes on."""
    mesh.start_dpa()
    limit = 200
    log_path = tmp_path / "dpu-lowfd.log"
    port = mesh.port

    def low_limit() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (limit, limit))

    argv = [sys.executable, "-m", "dpumesh.dpu_daemon", "--ns", ns, "--port", str(port)]
    with open(log_path, "wb") as out:
        proc = subprocess.Popen(
            [*argv, "--max-connections", "1000", "--log-level", "WARNING"],
            cwd=REPO,
            env=dict(os.environ, PYTHONPATH=str(REPO)),
            stdout=out,
            stderr=subprocess.STDOUT,
            preexec_fn=low_limit,
        )
    try:
        mesh.wait_http("/_dpumesh/health")
        assert psutil.Process(proc.pid).rlimit(psutil.RLIMIT_NOFILE) == (limit, limit)
        socks = []
        try:
            for _ in range(limit + 50):  # more than the daemon has descriptors for
                socks.append(socket.create_connection(("127.0.0.1", port), timeout=5))
            wait_for(
                "the accept error in the log",
                lambda: "accept() failed: [Errno 24]" in log_path.read_text(),
            )
        finally:
            for sock in socks:
                sock.close()
        # Descriptors are back: the same listener accepts and serves again.
        wait_for("a served request", lambda: try_request(port, "/_dpumesh/health") == 200)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(10)


def test_connection_cap_refuses_one_huge_request_and_paces_pipelined_ones(mesh: Mesh) -> None:
    cap = 1 * MiB
    start_with_one_worker(mesh, "--max-connection-bytes", str(cap))
    status, body = request(mesh.port, "/s1/echo", "POST", b"x" * (2 * cap))
    assert status == 413 and b"buffered bytes" in body  # can never fit one connection
    # Four 512 KiB requests in one write: more than the cap together, so the connection
    # is read as answers free it, and every request is answered in order.
    parts = [bytes([65 + i]) * (cap // 2) for i in range(4)]
    data = b"".join(
        b"POST /s1/echo HTTP/1.1\r\nhost: s1\r\ncontent-length: %d\r\n\r\n%s" % (len(p), p)
        for p in parts
    )
    with socket.create_connection(("127.0.0.1", mesh.port), timeout=30) as sock:
        sender = threading.Thread(target=sock.sendall, args=(data,))
        sender.start()
        reader = sock.makefile("rb")
        for part in parts:
            assert read_response(reader) == (200, part)
        sender.join(30)
    stats = mesh.stats()
    assert stats["bridge_errors"] == {"413": 1}
    assert stats["services"]["s1"]["by_class"] == {"2xx": 4}


def test_a_worker_leaving_after_traffic_bounces_nothing_it_had_read(mesh: Mesh) -> None:
    """The DMA manager reads a departed worker's rest through a consumer's view of its queue."""
    mesh.start_dpa()
    mesh.start_dpu()
    mesh.start_service("s1", processes=1)
    mesh.start_service("s2", processes=1)
    mesh.wait_workers({"s1": 1, "s2": 1})
    big = os.urandom(1 * MiB)  # travels in buffer segments the worker unlinks once read
    for _ in range(3):
        assert request(mesh.port, "/s1/echo", "POST", big) == (200, big)
    assert request(mesh.port, "/s1/api/v1")[0] == 200
    mesh.stop("svc-s1")
    mesh.wait_workers({"s1": 0}, timeout=10)
    # The DMA manager notices the departure before it moves anything else, and whatever
    # it bounces reaches the sidecar before this reply does.
    assert request(mesh.port, "/s2/api/v1")[0] == 200
    assert mesh.stats()["corrupt_entries"] == 0
    mesh.stop("dpa")  # its last line counts what it bounced
    assert ", 0 bounced" in (mesh.tmp / "dpa.log").read_text()


def test_a_dead_workers_slot_is_freed_by_its_parent_not_by_the_heartbeat(mesh: Mesh) -> None:
    """kill -9 of one worker: `dpumesh.server` frees its registry slot at once, so the
    sidecar stops routing to it and its in-flight request gets 503 without waiting for
    the heartbeat. The DMA manager (the only heartbeat reaper) is stopped meanwhile, so
    only the parent can have freed the slot."""
    mesh.start_dpa()
    mesh.start_dpu()
    mesh.start_service("s1", processes=2)
    mesh.wait_workers({"s1": 2})
    with contextlib.closing(registry.Registry.open(mesh.ns)) as table:
        victim = min(info.pid for info in table.snapshot())
        dpa = psutil.Process(mesh.procs["dpa"].pid)
        dpa.suspend()
        try:
            os.kill(victim, signal.SIGKILL)
            wait_for(
                "the parent to free the dead worker's slot",
                lambda: victim not in {i.pid for i in table.snapshot()},
            )
            # A slot left for the heartbeat would still be listed (dead) while the
            # reaper is stopped: this one is gone, freed by the parent.
            assert victim not in {i.pid for i in table.snapshot(include_daemons=True)}
        finally:
            dpa.resume()
    mesh.wait_workers({"s1": 2})  # the parent restarted the worker
    assert request(mesh.port, "/s1/api/v1")[0] == 200
    log = (mesh.tmp / "svc-s1.log").read_text(errors="replace")
    assert f"freed the registry slot of dead worker pid {victim}" in log
