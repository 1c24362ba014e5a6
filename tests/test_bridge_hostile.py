"""Hostile input against a real DPUmesh bridge: every probe gets its 4xx and stalls no one.

Each probe runs while a liveness client sends a valid request every 50 ms on
its own connection; no liveness request may wait more than 0.5 s, the probe
must get the status the protocol calls for, and `/_dpumesh/stats` must count
the refusal in `bridge_errors`. A seeded fuzz run (`tests/fuzz_inputs.py`)
then sends a few thousand generated inputs and checks, after each batch, that
the bridge still serves, and that its file descriptors and the namespace's
shared-memory objects are back where they were. The fallback client and the
apps' HTTP server get the same treatment from hostile peers and clients.
"""

from __future__ import annotations

import asyncio
import io
import json
import os
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest

from dpumesh.fallback import FallbackClient, FallbackError, Peer
from mubench.http_app import MAX_BODY, create_app
from mubench.workmodel import load_workmodel
from tests.fuzz_inputs import Generator, Liveness, Outcome, read_answers, send, violation
from tests.mesh import REPO, Mesh, shm_objects

LIVENESS_REQUEST = b"GET /s1/api/v1 HTTP/1.1\r\nHost: bridge\r\n\r\n"
MAX_LIVENESS_WAIT_S = 0.5
PROBE_TIMEOUT_S = 30.0
FUZZ_SEED = 15
FUZZ_BATCHES = 8
FUZZ_BATCH = 500
FUZZ_CLIENTS = 8
FUZZ_READ_TIMEOUT_S = 3.0


@pytest.fixture
def mesh(ns: str, tmp_path) -> Iterator[Mesh]:
    m = Mesh(ns, tmp_path)
    try:
        m.start_dpa()
        m.start_dpu()
        m.start_service("s1", processes=1)
        m.wait_workers({"s1": 1})
        yield m
    finally:
        m.close()
    assert shm_objects(ns) == [], "shared-memory objects left behind"


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def wait_for(done: Callable[[], bool], timeout_s: float) -> bool:
    """Poll `done` until true or `timeout_s` passed (a test's bounded wait, not a hot path)."""
    deadline = time.monotonic() + timeout_s
    while not done():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def bridge_errors(mesh: Mesh) -> Counter:
    return Counter({int(k): v for k, v in mesh.stats()["bridge_errors"].items()})


def stream(port: int, pieces: Iterator[bytes], timeout_s: float = PROBE_TIMEOUT_S) -> Outcome:
    """Send `pieces` from a thread while reading the answer; stop sending once refused."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=timeout_s)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    stop = threading.Event()

    def sender() -> None:
        try:
            for piece in pieces:
                if stop.is_set():
                    return
                sock.sendall(piece)
            sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass  # refused and closed while we were still sending

    thread = threading.Thread(target=sender, daemon=True)
    began = time.monotonic()
    thread.start()
    chunks = []
    closed = False
    try:
        while True:
            try:
                chunk = sock.recv(65536)
            except ConnectionResetError:
                closed = True
                break
            except TimeoutError:
                break
            if not chunk:
                closed = True
                break
            chunks.append(chunk)
            raw = b"".join(chunks)
            if (raw.startswith(b"HTTP/") and b"\r\n\r\n" in raw) or raw.startswith(b"{"):
                stop.set()
    finally:
        stop.set()
        sock.close()
        thread.join(timeout_s)
    out = Outcome(closed=closed, elapsed_s=time.monotonic() - began)
    read_answers(b"".join(chunks), out)
    return out


def repeat(piece: bytes, total: int) -> Iterator[bytes]:
    for _ in range(total // len(piece)):
        yield piece


def chunked_one_byte(n: int) -> Iterator[bytes]:
    yield b"POST /s1/echo HTTP/1.1\r\nHost: bridge\r\nTransfer-Encoding: chunked\r\n\r\n"
    for _ in range(n // 1000):
        yield b"1\r\nx\r\n" * 1000
    yield b"0\r\n\r\n"


def json_in_pieces_ending_in_braces(pieces: int) -> Iterator[bytes]:
    yield b'{"method": "POST", "path": "/echo", "target_service": "s1", "body": "'
    for _ in range(pieces):
        yield b"y" * 199 + b"}"
    yield b'"}'


PROBES: dict[str, tuple[Callable[[], Iterator[bytes]], str, int]] = {
    # name: (input pieces, protocol of the answer, status)
    "chunked-50000-one-byte": (lambda: chunked_one_byte(50_000), "http", 200),
    "unfinished-64MiB-header": (
        lambda: iter([b"GET /s1/api/v1 HTTP/1.1\r\nX: ", *repeat(b"a" * 65536, 64 << 20)]),
        "http",
        431,
    ),
    "finished-100KiB-header": (
        lambda: iter([b"GET /s1/api/v1 HTTP/1.1\r\nX: " + b"a" * 100_000 + b"\r\n\r\n"]),
        "http",
        431,
    ),
    "content-length-over-max": (
        lambda: iter([b"POST /s1/echo HTTP/1.1\r\nContent-Length: 100000000\r\n\r\n"]),
        "http",
        413,
    ),
    "chunked-body-over-max": (
        lambda: iter(
            [
                b"POST /s1/echo HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n",
                *repeat(b"10000\r\n" + b"z" * 65536 + b"\r\n", 9 << 20),
            ]
        ),
        "http",
        413,
    ),
    "endless-trailer": (
        lambda: iter(
            [
                b"POST /s1/echo HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\nX-T: ",
                *repeat(b"t" * 65536, 16 << 20),
            ]
        ),
        "http",
        400,
    ),
    "http-0.9-request-line": (
        lambda: iter([b"GET /s1/api/v1\r\nHost: bridge\r\n\r\n"]),
        "http",
        400,
    ),
    "not-a-protocol": (lambda: iter([b"\x16\x03\x01\x02\x00\x01\x00"]), "http", 400),
    "json-100000-deep": (
        lambda: iter([b'{"body": ' + b'{"a":' * 100_000 + b"1" + b"}" * 100_000 + b"}"]),
        "json",
        400,
    ),
    "json-1000000-deep-lists": (
        lambda: iter([b'{"body": ' + b"[" * 1_000_000 + b"]" * 1_000_000 + b"}"]),
        "json",
        400,
    ),
    "json-5000-digit-integer": (
        lambda: iter([b'{"body": ' + b"7" * 5000 + b"}"]),
        "json",
        400,
    ),
    "json-lone-surrogate": (lambda: iter([b'{"body": "\\ud800"}']), "json", 400),
    "json-unclosed-ipv6-url": (lambda: iter([b'{"url": "http://[::1"}']), "json", 400),
    "json-bad-port-url": (lambda: iter([b'{"url": "http://s1:70000/x"}']), "json", 400),
    "json-nan": (lambda: iter([b'{"method": NaN}']), "json", 400),
    "json-duplicate-key": (
        lambda: iter([b'{"target_service": "s1", "target_service": "s2"}']),
        "json",
        400,
    ),
    "json-1MB-in-pieces-ending-in-braces": (
        lambda: json_in_pieces_ending_in_braces(5000),
        "json",
        200,
    ),
}


@pytest.mark.e2e
@pytest.mark.parametrize("name", sorted(PROBES))
def test_probe_gets_its_answer_without_stalling_other_clients(mesh: Mesh, name: str) -> None:
    pieces, protocol, status = PROBES[name]
    before = bridge_errors(mesh)
    with Liveness(mesh.port, LIVENESS_REQUEST) as live:
        assert live.wait_requests(2, timeout_s=10), "liveness client never got going"
        seen = len(live.waits)
        out = stream(mesh.port, pieces())
        assert live.wait_requests(seen + 2, timeout_s=10)
    assert out.garbled is None and out.closed, out
    assert (out.protocol, out.statuses) == (protocol, [status])
    assert not live.failures, live.failures
    assert live.max_wait <= MAX_LIVENESS_WAIT_S, (
        f"a liveness request waited {live.max_wait:.3f} s (median {live.median_wait:.3f} s)"
    )
    after = bridge_errors(mesh)
    if status >= 400:
        assert after - before == Counter({status: 1})
    else:
        assert after == before


@pytest.mark.e2e
def test_the_answer_to_fifty_thousand_one_byte_chunks_is_the_body(mesh: Mesh) -> None:
    sock = socket.create_connection(("127.0.0.1", mesh.port), timeout=PROBE_TIMEOUT_S)
    with sock:
        sock.sendall(b"".join(chunked_one_byte(50_000)))
        sock.shutdown(socket.SHUT_WR)
        raw = b""
        while chunk := sock.recv(65536):
            raw += chunk
    head, _, body = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200")
    assert body == b"x" * 50_000


@pytest.mark.e2e
def test_fuzzed_inputs_leave_the_bridge_serving_and_clean(mesh: Mesh) -> None:
    pid = mesh.procs["dpu"].pid
    send(mesh.port, LIVENESS_REQUEST)  # warm: the first request opens the worker's queues
    fds = fd_count(pid)
    shm = shm_objects(mesh.ns)
    gen = Generator(FUZZ_SEED)
    kinds: Counter = Counter()
    with ThreadPoolExecutor(FUZZ_CLIENTS) as pool:
        for batch_no in range(FUZZ_BATCHES):
            batch = gen.batch(FUZZ_BATCH)
            outcomes = list(
                pool.map(lambda item: send(mesh.port, item.data, FUZZ_READ_TIMEOUT_S), batch)
            )
            problems = [
                f"{item.kind} {item.data[:120]!r}: {why}"
                for item, out in zip(batch, outcomes, strict=True)
                if (why := violation(item, out)) is not None
            ]
            kinds.update(
                f"{item.expect}/{out.klass}" for item, out in zip(batch, outcomes, strict=True)
            )
            assert not problems, f"batch {batch_no}: {len(problems)} wrong answers:\n" + "\n".join(
                problems[:20]
            )
            check = send(mesh.port, LIVENESS_REQUEST, timeout_s=2.0)
            assert check.statuses == [200] and check.elapsed_s < 1.0, check
            assert wait_for(lambda: fd_count(pid) == fds, timeout_s=5.0), (
                f"batch {batch_no}: dpu-daemon has {fd_count(pid)} fds, {fds} before"
            )
            assert shm_objects(mesh.ns) == shm, f"batch {batch_no}: shared memory changed"
    # Every kind of outcome the protocol allows actually happened.
    assert kinds["silent/close"] and kinds["valid/2xx"] and kinds["invalid/4xx"], kinds
    assert sum(kinds.values()) == FUZZ_BATCHES * FUZZ_BATCH


# ---- hostile peers of the fallback client --------------------------------------------


class Peer1:
    """A loopback server that answers every connection with fixed bytes, then waits."""

    def __init__(self, answer: Callable[[asyncio.StreamWriter], object]) -> None:
        self.answer = answer
        self.closed = asyncio.Event()
        self.connections = 0

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            await reader.readuntil(b"\r\n\r\n")
            result = self.answer(writer)
            if asyncio.iscoroutine(result):
                await result
            await writer.drain()
            while await reader.read(65536):
                pass  # until the client closes
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            self.closed.set()
            writer.close()

    async def start(self) -> Peer:
        self.server = await asyncio.start_server(self.handle, "127.0.0.1", 0)
        return Peer("127.0.0.1", self.server.sockets[0].getsockname()[1])


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 30))


async def call(answer, method: str = "GET", timeout: float = 5.0, max_body: int = 1 << 20):
    """One fallback request to a `Peer1` answering with `answer`; (result, peer server)."""
    peer_server = Peer1(answer)
    peer = await peer_server.start()
    client = FallbackClient(max_body=max_body)
    try:
        return await client.request(peer, method, "/x", [], b"", timeout), peer_server
    finally:
        client.close()
        peer_server.server.close()


def test_a_peer_with_an_endless_header_is_cut_off_early():
    sent = []

    async def endless(writer):
        writer.write(b"HTTP/1.1 200 OK\r\nX: ")
        for _ in range(1024):  # 64 MiB if nobody stopped reading
            writer.write(b"a" * 65536)
            sent.append(1)
            await writer.drain()

    with pytest.raises(FallbackError, match="header limit"):
        run(call(endless))
    # The client stopped reading after about two reads; the peer was stopped by
    # back-pressure long before 64 MiB.
    assert len(sent) < 1024


def test_a_peer_with_an_endless_trailer_is_cut_off():
    async def endless(writer):
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\nX: ")
        for _ in range(64):
            writer.write(b"t" * 65536)
            await writer.drain()

    with pytest.raises(FallbackError, match="header limit"):
        run(call(endless))


def test_a_peer_body_over_the_limit_is_refused():
    def answer(writer):
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 99999999999\r\n\r\n")

    with pytest.raises(FallbackError, match="exceeds"):
        run(call(answer))

    def chunked(writer):
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        writer.write((b"1000\r\n" + b"b" * 4096 + b"\r\n") * 300)

    with pytest.raises(FallbackError, match="exceeds"):
        run(call(chunked))


def test_interim_responses_are_skipped():
    def answer(writer):
        writer.write(
            b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n"
            b"HTTP/1.1 201 Created\r\nContent-Length: 2\r\n\r\nok"
        )

    (status, headers, body), _ = run(call(answer))
    assert (status, body) == (201, b"ok")
    assert ("Link", "</a>") not in headers


def test_bytes_after_the_response_end_the_connection():
    def answer(writer):
        writer.write(
            b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
            b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nstale"
        )

    async def scenario():
        peer_server = Peer1(answer)
        peer = await peer_server.start()
        client = FallbackClient()
        status, _, body = await client.request(peer, "GET", "/x", [], b"", 5)
        await asyncio.wait_for(peer_server.closed.wait(), 5)  # not kept for the next call
        client.close()
        peer_server.server.close()
        return status, body

    assert run(scenario()) == (200, b"ok")


def test_a_head_request_does_not_wait_for_a_body():
    def answer(writer):
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 1234\r\n\r\n")

    (status, _headers, body), _ = run(call(answer, method="HEAD", timeout=2.0))
    assert (status, body) == (200, b"")


def test_a_timed_out_call_closes_its_connection():
    def silent(writer):
        return None  # never answers

    async def scenario():
        peer_server = Peer1(silent)
        peer = await peer_server.start()
        client = FallbackClient()
        with pytest.raises(TimeoutError):
            await client.request(peer, "GET", "/x", [], b"", 0.2)
        await asyncio.wait_for(peer_server.closed.wait(), 5)  # the client hung up
        peer_server.server.close()

    run(scenario())


# ---- the apps' HTTP server (gunicorn + Flask) ---------------------------------------------


@pytest.fixture(scope="module")
def cell_app():
    return create_app(load_workmodel(str(REPO / "workmodels" / "default.json")), "s0")


def test_the_cell_app_refuses_a_body_over_the_limit(cell_app):
    client = cell_app.test_client()
    assert client.post("/", data=b"x" * (MAX_BODY + 1)).status_code == 413
    # A chunked body has no Content-Length: werkzeug cuts it at the limit, the app refuses.
    chunked = client.post(
        "/",
        input_stream=io.BytesIO(b"x" * (MAX_BODY + 10)),
        headers={"Transfer-Encoding": "chunked"},
        environ_overrides={"wsgi.input_terminated": True},  # what gunicorn sets for chunked
    )
    assert chunked.status_code == 413
    assert json.loads(chunked.data)["message"].startswith("request body exceeds")


def test_the_cell_app_answers_a_bad_trace_with_400(cell_app):
    assert cell_app.test_client().post("/", data=b'{"s0": 5}').status_code == 400
