"""DPUmesh end to end with real processes: daemons, workers, the port-5005 bridge."""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import signal
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import psutil
import pytest

from dpumesh.registry import Registry
from tests.mesh import Mesh, shm_objects

pytestmark = pytest.mark.e2e


@pytest.fixture
def mesh(namespace, tmp_path):
    m = Mesh(namespace, tmp_path)
    try:
        yield m
    finally:
        m.close()
        assert shm_objects(namespace) == [], "shared-memory objects left behind"


@pytest.fixture
def seed_mesh(mesh):
    mesh.start_dpa()
    mesh.start_dpu()
    for service in ("s0", "s1", "s2"):
        mesh.start_service(service)
    mesh.wait_workers({"s0": 2, "s1": 2, "s2": 2})
    return mesh


def get(port: int, path: str = "/", method: str = "GET", body: bytes | None = None, **headers):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request(method, path, body=body, headers=headers)
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def seed_json_client(port: int, req: dict) -> dict:
    """The seed README's single-request snippet, unchanged in substance."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.connect(("localhost", port))
    sock.sendall(json.dumps(req).encode())
    sock.settimeout(10)
    resp = sock.recv(4096)
    sock.close()
    return json.loads(resp.decode())


def test_http_and_seed_json_clients(seed_mesh):
    status, body = get(seed_mesh.port)
    assert status == 200
    assert body.decode().startswith("s0[s1:") and "|s2:" in body.decode()
    reply = seed_json_client(
        seed_mesh.port,
        {
            "method": "POST",
            "path": "/api/v1",
            "headers": {"Content-Type": "application/json"},
            "body": json.dumps({"s0": [{"s1": {}, "s2": {}}]}),
            "query_string": "",
        },
    )
    assert reply["status"] == 200
    assert reply["body"].startswith("s0[s1:")
    # Service chosen by path prefix and by Host header.
    assert get(seed_mesh.port, "/s1/api/v1")[1].startswith(b"s1:")
    assert get(seed_mesh.port, "/api/v1", Host="s2.default.svc")[1].startswith(b"s2:")


def test_sequential_and_concurrent_requests_none_lost(seed_mesh):
    conn = http.client.HTTPConnection("127.0.0.1", seed_mesh.port, timeout=30)
    for _ in range(200):  # one keep-alive connection
        conn.request("GET", "/")
        resp = conn.getresponse()
        assert resp.status == 200 and resp.read().startswith(b"s0[")
    conn.close()
    with ThreadPoolExecutor(50) as pool:
        results = list(pool.map(lambda _: get(seed_mesh.port), range(50)))
    assert [s for s, _ in results] == [200] * 50
    stats = seed_mesh.stats()["services"]
    assert stats["s0"]["ingress"] == 250
    assert stats["s1"]["egress"] == stats["s2"]["egress"] == 250


def test_errors_propagate_as_500(seed_mesh):
    assert get(seed_mesh.port, "/fail")[0] == 500


def test_large_body_and_limit(seed_mesh):
    body = os.urandom(5 * 1024 * 1024)
    status, echoed = get(seed_mesh.port, "/s1/echo", method="POST", body=body)
    assert status == 200 and echoed == body
    status, _ = get(seed_mesh.port, "/s1/echo", method="POST", body=b"x" * (8 * 1024 * 1024 + 1))
    assert status == 413


def test_blocking_requests_shim(seed_mesh):
    status, body = get(seed_mesh.port, "/blocking")
    assert (status, body) == (200, b"via-requests[200:s1]")


def test_unknown_service_and_no_worker(seed_mesh):
    conn = http.client.HTTPConnection("127.0.0.1", seed_mesh.port, timeout=5)
    conn.request("GET", "/api/v1", headers={"Host": "s1"})
    assert conn.getresponse().read().startswith(b"s1:")
    reply = seed_json_client(seed_mesh.port, {"target_service": "nosuch"})
    assert reply["status"] == 404
    seed_mesh.stop("svc-s2")
    seed_mesh.wait_workers({"s2": 0}, timeout=5)
    assert get(seed_mesh.port, "/s2/api/v1")[0] == 503  # known service, no live worker
    assert get(seed_mesh.port, "/")[0] == 500  # s0's call to s2 fails -> graph fails


def test_kill_worker_while_requests_flow(seed_mesh):
    victim = psutil.Process(seed_mesh.stats()["workers"]["s1"][0])
    latencies: list[tuple[float, float, int]] = []
    stop = threading.Event()

    def client():
        conn = http.client.HTTPConnection("127.0.0.1", seed_mesh.port, timeout=30)
        while not stop.is_set():
            start = time.monotonic()
            conn.request("GET", "/s1/sleep?s=0.05")
            resp = conn.getresponse()
            resp.read()
            latencies.append((start, time.monotonic() - start, resp.status))
        conn.close()

    threads = [threading.Thread(target=client) for _ in range(4)]
    for t in threads:
        t.start()
    time.sleep(1.0)
    killed_at = time.monotonic()
    victim.send_signal(signal.SIGKILL)
    time.sleep(2.5)
    stop.set()
    for t in threads:
        t.join(30)
    after = [(lat, status) for start, lat, status in latencies if start >= killed_at - 0.05]
    assert after, "no requests after the kill"
    assert max(lat for lat, _ in after) < 1.6, "a request waited too long after the kill"
    late = [status for start, _, status in latencies if start > killed_at + 1.2]
    assert late and all(s == 200 for s in late), "traffic did not move to the live worker"
    # The supervisor restarts the killed process and it rejoins without restarting daemons.
    seed_mesh.wait_workers({"s1": 2}, timeout=10)
    workers = seed_mesh.stats()["workers"]["s1"]
    assert victim.pid not in workers
    served_by = {get(seed_mesh.port, "/s1/api/v1")[1] for _ in range(20)}
    assert {f"s1:{pid}".encode() for pid in workers} == served_by  # both take traffic


def test_a_stalled_worker_is_replaced_and_the_new_one_serves(mesh):
    mesh.start_dpa()
    mesh.start_dpu()
    mesh.start_service("s1", processes=1)
    mesh.wait_workers({"s1": 1})
    (pid,) = mesh.stats()["workers"]["s1"]
    stalled = psutil.Process(pid)
    stalled.suspend()  # heartbeats stop: the daemons reap its slot and drop its queues
    try:
        mesh.wait_workers({"s1": 0}, timeout=5)
        assert get(mesh.port, "/s1/api/v1")[0] == 503
        # Resume only once the slot is reaped (a worker back before that simply goes on).
        with contextlib.closing(Registry.open(mesh.ns)) as table:
            deadline = time.monotonic() + 5
            while any(info.pid == pid for info in table.snapshot()):
                assert time.monotonic() < deadline, "the dead slot was not reaped"
                time.sleep(0.05)
    finally:
        stalled.resume()
    # Its slot is gone, so it leaves; its supervisor starts a fresh worker in its place.
    psutil.wait_procs([stalled], timeout=10)
    assert not stalled.is_running()
    mesh.wait_workers({"s1": 1}, timeout=10)
    (new_pid,) = mesh.stats()["workers"]["s1"]
    assert new_pid != pid
    assert get(mesh.port, "/s1/api/v1") == (200, f"s1:{new_pid}".encode())


def test_workers_started_before_daemons(mesh):
    for service in ("s0", "s1", "s2"):
        mesh.start_service(service, processes=1)
    time.sleep(1.0)
    mesh.start_dpu()
    mesh.start_dpa()
    mesh.wait_workers({"s0": 1, "s1": 1, "s2": 1})
    assert get(mesh.port)[0] == 200


def test_two_sidecars_http_fallback(namespace, tmp_path):
    remote = Mesh(namespace + "b", tmp_path / "b")
    (tmp_path / "b").mkdir()
    local = Mesh(namespace + "a", tmp_path)
    try:
        remote.start_dpa()
        remote.start_dpu()
        remote.start_service("s1", processes=1)
        remote.start_service("s2", processes=1)
        local.start_dpa()
        local.start_dpu("--peer", f"http://127.0.0.1:{remote.port}")
        local.start_service("s0", processes=1)
        remote.wait_workers({"s1": 1, "s2": 1})
        local.wait_workers({"s0": 1})
        status, body = get(local.port)
        assert status == 200 and body.startswith(b"s0[s1:")
        assert local.stats()["services"]["s1"]["fallback"] == 1
        # The remote sidecar knows it came from a peer: not a client's entry request there.
        received = remote.stats()["services"]["s1"]
        assert (received["peer_ingress"], received["ingress"]) == (1, 0)
    finally:
        local.close()
        remote.close()
    assert shm_objects(namespace + "a") == shm_objects(namespace + "b") == []


def _raw_exchange(port: int, data: bytes, *, wait: float = 5.0) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=wait) as sock:
        sock.sendall(data)
        sock.shutdown(socket.SHUT_WR)
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


@pytest.mark.parametrize(
    ("data", "expect"),
    [
        (os.urandom(64).replace(b"{", b"x").replace(b"G", b"x"), b"400"),
        (b'{"method": "GET", "path": "/ap', b'"status": 400'),
        (b'{"target_service": "s1", "path": "/x\\r\\nX-Injected: 1"}', b'"status": 400'),
        (b"GET / HTTP/1.1\r\nHost: a\r\nBad Header\r\n\r\n", b"400"),
        (b"POST / HTTP/1.1\r\nContent-Length: 100000000\r\n\r\n", b"413"),
        # An unknown prefix is a path of the entry service s0, whose app has no such route.
        (b"GET /nosuch/x HTTP/1.1\r\nHost: nosuch\r\n\r\n", b"HTTP/1.1 404"),
    ],
)
def test_bad_input_on_the_bridge(seed_mesh, data, expect):
    reply = _raw_exchange(seed_mesh.port, data)
    assert expect in reply
    assert get(seed_mesh.port)[0] == 200  # the daemon keeps serving others


def test_slow_client_is_cut_off(namespace, tmp_path):
    mesh = Mesh(namespace, tmp_path)
    try:
        mesh.start_dpa()
        mesh.start_dpu("--receive-timeout", "2")
        mesh.start_service("s1", processes=1)
        with socket.create_connection(("127.0.0.1", mesh.port), timeout=10) as sock:
            start = time.monotonic()
            reply = b""
            for byte in b"GET /s1/api/v1 HTTP/1.1\r\n":
                try:
                    sock.sendall(bytes([byte]))
                except OSError:
                    break
                time.sleep(0.5)
                sock.setblocking(False)
                try:
                    reply += sock.recv(4096)
                except BlockingIOError:
                    pass
                finally:
                    sock.setblocking(True)
                if reply:
                    break
        assert b"408" in reply and time.monotonic() - start < 5
    finally:
        mesh.close()
    assert shm_objects(namespace) == []


def test_idle_daemons_use_almost_no_cpu(seed_mesh):
    procs = [psutil.Process(seed_mesh.procs[n].pid) for n in ("dpa", "dpu")]
    before = [sum(p.cpu_times()[:2]) for p in procs]
    time.sleep(10)
    after = [sum(p.cpu_times()[:2]) for p in procs]
    for b, a in zip(before, after, strict=True):
        assert (a - b) / 10 < 0.01


def test_deadline_gives_504_and_frees_the_request(namespace, tmp_path):
    mesh = Mesh(namespace, tmp_path)
    try:
        mesh.start_dpa()
        mesh.start_dpu("--deadline", "1")
        mesh.start_service("s1", processes=1)
        mesh.wait_workers({"s1": 1})
        start = time.monotonic()
        status, _ = get(mesh.port, "/s1/sleep?s=3")
        assert status == 504 and time.monotonic() - start < 2.5
        assert mesh.stats()["inflight"] == 0
        assert get(mesh.port, "/s1/api/v1")[0] == 200  # the worker keeps serving
    finally:
        mesh.close()
    assert shm_objects(namespace) == []


@pytest.mark.parametrize(
    "module", ["dpumesh.dpa_daemon", "dpumesh.dpu_daemon", "dpumesh.server", "dpumesh.bench"]
)
def test_every_cli_has_help(module):
    import subprocess
    import sys

    args = [sys.executable, "-m", module, "--help"]
    out = subprocess.run(args, capture_output=True, text=True, timeout=60, check=True)
    assert "usage:" in out.stdout.lower()
