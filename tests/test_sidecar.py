"""The sidecar's queue reader, replies to workers and fallback routes, in-process.

No DMA manager runs here, so the test itself is the producer of sidecar_sq and
the consumer of sidecar_cq: it can inject faults the daemons never produce.
Fallback peers are real loopback servers.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Iterator

import posix_ipc
import pytest

from dpumesh import naming, ring, wire
from dpumesh.bridge_codec import BridgeRequest
from dpumesh.dpu_daemon import Config, Sidecar, parse_args
from dpumesh.fallback import Peer
from tests.mesh import corrupt, shm_objects
from tests.test_fallback import Server

TAIL_OFFSET = 320  # the ring header's tail counter (see tests/test_ring.py)


@pytest.fixture
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    loop = asyncio.new_event_loop()
    yield loop
    loop.close()


@pytest.fixture
def make_sidecar(ns: str, loop) -> Iterator[Callable[..., Sidecar]]:
    """The sidecar of namespace `ns` on `loop`, Config fields as keywords (once per test)."""
    made: list[Sidecar] = []

    def make(**cfg: object) -> Sidecar:
        made.append(Sidecar(Config(namespace=ns, **cfg), loop))
        return made[-1]

    try:
        yield make
    finally:
        for sc in made:
            sc.stop()
    assert shm_objects(ns) == []


@pytest.fixture
def sidecar(make_sidecar: Callable[..., Sidecar]) -> Sidecar:
    return make_sidecar()


def run_until(sc: Sidecar, done: Callable[[], bool], timeout: float = 5.0) -> None:
    async def wait() -> None:
        deadline = sc.loop.time() + timeout
        while not done():
            assert sc.loop.time() < deadline, "timed out"
            await asyncio.sleep(0.01)

    sc.loop.run_until_complete(wait())


def egress(req_id: int, url: str) -> bytes:
    """A worker's call, as the DMA manager hands it to the sidecar."""
    msg = wire.Message(kind=wire.REQUEST, req_id=req_id, method="GET", target=url)
    return wire.encode(msg)


def health(sc: Sidecar) -> int:
    _, fut = sc.dispatch(BridgeRequest(protocol="http", method="GET", path="/_dpumesh/health"))
    return fut.result()[0]


def test_an_entry_whose_buffer_vanished_is_dropped_and_reading_goes_on(ns, sidecar):
    sq = sidecar.rings.sq
    sq.push(bytes(sq.max_inline + 1), route=1)  # carried in a buffer segment
    (buf,) = [o.name for o in naming.list_objects(ns) if naming.is_buffer(ns, o.name)]
    posix_ipc.unlink_shared_memory(buf)
    sq.push(egress(7, "http://nosuch/x"), route=1)
    sidecar.start()
    run_until(sidecar, lambda: len(sidecar.rings.cq) == 1)
    route, _, payload = sidecar.rings.cq.pop()
    reply = wire.decode(payload)
    assert (route, reply.req_id, reply.status) == (1, 7, 404)  # the next entry was served
    assert sidecar.corrupt_entries == 1
    assert health(sidecar) == 200


def test_a_corrupt_queue_stops_the_sidecar_instead_of_hiding(sidecar):
    stopped = []
    sidecar.on_failure = lambda: stopped.append(True)
    sidecar.rings.sq.push(egress(1, "http://nosuch/x"), route=1)
    corrupt(sidecar.rings.sq.name, TAIL_OFFSET, "=Q", 10_000)  # tail far beyond head + slots
    sidecar.start()
    run_until(sidecar, lambda: bool(stopped))
    assert "sidecar_sq corrupt" in sidecar.failure
    assert health(sidecar) == 503


def test_replies_to_workers_wait_for_room_without_blocking_the_loop(sidecar):
    cq = sidecar.rings.cq
    filler = 0
    while True:  # fill sidecar_cq: nobody drains it until we do
        try:
            cq.push(b"f", route=2, timeout=0)
        except ring.RingFull:
            break
        filler += 1
    sidecar.rings.sq.push(egress(9, "http://nosuch/x"), route=1)
    sidecar.start()
    ticks = []

    async def tick_and_drain() -> None:
        for _ in range(20):  # the loop keeps running while the reply waits for room
            ticks.append(sidecar.loop.time())
            await asyncio.sleep(0.005)
        for _ in range(filler):
            cq.pop()

    sidecar.loop.run_until_complete(tick_and_drain())
    assert len(ticks) == 20 and ticks[-1] - ticks[0] < 1.0
    run_until(sidecar, lambda: len(cq) == 1)
    reply = wire.decode(cq.pop()[2])
    assert (reply.req_id, reply.status) == (9, 404)


def test_counters_for_client_chosen_names_are_bounded(sidecar, monkeypatch):
    monkeypatch.setattr("dpumesh.dpu_daemon.MAX_COUNTED_SERVICES", 4)
    for i in range(10):
        req = BridgeRequest(protocol="json", method="GET", path="/", target_service=f"x{i}")
        _, fut = sidecar.dispatch(req)
        assert fut.result()[0] == 404
    stats = sidecar.snapshot_stats()["services"]
    assert len(stats) == 5
    assert stats["(other)"]["ingress"] == 6
    assert json.dumps(stats)  # still one small JSON document


def test_route_repeated_for_a_service_collects_its_peers_in_order():
    cfg = parse_args(
        ["--route", "s1=http://a:1", "--route", "s2=http://c:3", "--route", "s1=http://b:2"]
    )
    assert cfg.routes == {"s1": (Peer("a", 1), Peer("b", 2)), "s2": (Peer("c", 3),)}


def test_a_service_with_no_local_worker_rotates_over_its_peers(loop, make_sidecar):
    servers = [Server(), Server()]
    peers = tuple(loop.run_until_complete(s.start()) for s in servers)
    sc = make_sidecar(routes={"far": peers})
    statuses = []
    for _ in range(6):
        req = BridgeRequest(protocol="json", method="GET", path="/x", target_service="far")
        _, fut = sc.dispatch(req)
        run_until(sc, fut.done)
        statuses.append(fut.result()[0])
    sc.fallback.close()  # the peers' handlers see EOF and finish before the loop closes
    for s in servers:
        s.server.close()
    loop.run_until_complete(asyncio.sleep(0.05))
    assert statuses == [200] * 6
    assert [s.received.count(b"GET /x ") for s in servers] == [3, 3]
    assert sc.snapshot_stats()["services"]["far"]["fallback"] == 6
