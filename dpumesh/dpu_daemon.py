"""DPU sidecar / L7 proxy: the port-5005 bridge, routing, fallback, deadlines, stats.

On real hardware this runs on the DPU. It accepts client connections (HTTP/1.1
keep-alive or the seed's JSON protocol), picks a live local worker of the
target service (least outstanding requests) and hands the request to the DMA
manager through `sidecar_cq`; worker replies and worker egress calls come back
through `sidecar_sq`. Services with no local worker go to an HTTP peer
without blocking the event loop. Every request has a deadline (504), a dead
worker's requests are answered at once (503), and counters are served at
`GET /_dpumesh/stats` so a benchmark can prove what crossed the mesh.

The shared-memory queue is read by one thread that blocks in `sem_wait` and
hands batches to the asyncio loop; everything else runs on the loop.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import signal
import socket
import threading
import time
from collections import defaultdict, deque
from collections.abc import Callable
from dataclasses import dataclass, field

from dpumesh import naming, registry, ring, wire
from dpumesh.bridge_codec import (
    BadRequest,
    BridgeParser,
    BridgeRequest,
    error_body,
    render_http,
    render_json,
)
from dpumesh.fallback import FallbackClient, FallbackError, Peer
from dpumesh.routing import WorkerTable, egress_target, host_service, split_prefix

log = logging.getLogger("dpumesh.dpu_daemon")

LIVENESS_PERIOD_S = 0.25
LINGER_S = 2.0
# Clients choose service names (target_service, Host, URL): counters are kept for at most
# this many names, the rest are counted together under OTHER_SERVICES.
MAX_COUNTED_SERVICES = 256
OTHER_SERVICES = "(other)"
STATS_PATH = "/_dpumesh/stats"
HEALTH_PATH = "/_dpumesh/health"
JSON_HEADERS = [("content-type", "application/json")]

Reply = tuple[int, list[tuple[str, str]], bytes]


@dataclass(slots=True)
class Config:
    """Everything the sidecar needs to know; filled from the command line."""

    namespace: str = "default"
    host: str = "127.0.0.1"
    port: int = 5005
    entry_service: str = "s0"
    deadline_s: float = 30.0
    receive_timeout_s: float = 10.0
    idle_timeout_s: float = 75.0
    max_body: int = ring.MAX_BODY
    services: list[str] = field(default_factory=list)
    routes: dict[str, Peer] = field(default_factory=dict)
    peer: Peer | None = None


@dataclass(slots=True)
class _Pending:
    """A request handed to a worker, waiting for its reply."""

    worker: int
    service: str
    deliver: Callable[[Reply], None]
    timer: asyncio.TimerHandle | None = None


@dataclass(slots=True)
class _ServiceStats:
    requests: int = 0
    ingress: int = 0
    egress: int = 0
    fallback: int = 0
    errors: int = 0
    by_class: dict[str, int] = field(default_factory=lambda: defaultdict(int))

    def as_dict(self) -> dict:
        return {
            "requests": self.requests,
            "ingress": self.ingress,
            "egress": self.egress,
            "fallback": self.fallback,
            "errors": self.errors,
            "by_class": dict(self.by_class),
        }


class Sidecar:
    """The sidecar's state machine around the queues; runs on one asyncio loop."""

    def __init__(self, cfg: Config, loop: asyncio.AbstractEventLoop) -> None:
        self.cfg = cfg
        self.loop = loop
        self.table = WorkerTable(cfg.services)
        self.pending: dict[int, _Pending] = {}
        self.by_worker: dict[int, set[int]] = defaultdict(set)
        self.stats: dict[str, _ServiceStats] = {}
        self.bridge_errors: dict[int, int] = defaultdict(int)
        self.corrupt_entries = 0
        self.bridge_requests = 0
        self._seen_version = -1
        self.fallback = FallbackClient(max_body=cfg.max_body)
        self._next_id = 1
        self._stopping = threading.Event()
        self.failure: str | None = None  # why the sidecar cannot go on (then it exits)
        self.on_failure: Callable[[], None] = lambda: None
        self.registry = registry.Registry.open_or_create(cfg.namespace)
        registry.collect_stale(cfg.namespace, self.registry)
        self.rings = registry.SidecarRings(cfg.namespace)
        self.membership = registry.Membership(
            self.registry, registry.DAEMON_PREFIX + "dpu-daemon", rejoin=True
        )
        self._reader = threading.Thread(target=self._read_loop, name="sidecar-sq", daemon=True)

    # ---- lifecycle -------------------------------------------------------

    def start(self) -> None:
        """Start the queue reader and the liveness timer."""
        self.refresh_workers()
        self._reader.start()
        self.loop.call_later(LIVENESS_PERIOD_S, self._liveness_tick)

    def stop(self) -> None:
        """Answer everything in flight with 503 and release the queues."""
        self._stopping.set()
        self.rings.bell.ring()
        if self._reader.ident is not None:  # started
            self._reader.join(timeout=2)
        for sid in list(self.pending):
            self._complete(sid, (503, JSON_HEADERS, error_body(503, "sidecar shutting down")))
        self.fallback.close()
        self.rings.close()
        self.membership.close()  # the last process of the namespace removes its objects
        self.registry.close()

    # ---- queue reader (its own thread) -------------------------------------

    def _read_loop(self) -> None:
        """Sleep on the doorbell, drain sidecar_sq, hand each batch to the event loop.

        An entry whose out-of-line body is gone is dropped and counted (its request
        then ends by its deadline); a corrupt ring ends the sidecar, which exits non-zero
        rather than serve 504s behind a healthy-looking port.
        """
        rings = self.rings
        pop = rings.sq.pop
        while not self._stopping.is_set():
            rings.bell.wait(timeout=1.0)
            batch = []
            taken = 0
            while True:
                try:
                    entry = pop()
                except ring.BadEntry as exc:
                    taken += 1
                    self.loop.call_soon_threadsafe(self._note_bad_entry, exc)
                    continue
                except ring.RingCorrupt as exc:
                    self.loop.call_soon_threadsafe(self._fail, f"sidecar_sq corrupt: {exc}")
                    return
                if entry is None:
                    break
                batch.append(entry)
                taken += 1
            if taken:
                rings.bell.absorb(taken - 1)
            if batch:
                self.loop.call_soon_threadsafe(self._on_entries, batch)

    def _note_bad_entry(self, exc: Exception) -> None:
        self.corrupt_entries += 1
        log.warning("dropped an entry of sidecar_sq: %s", exc)

    def _fail(self, why: str) -> None:
        log.error("%s; stopping", why)
        self.failure = why
        self.on_failure()

    # ---- liveness ------------------------------------------------------------

    def _liveness_tick(self) -> None:
        if self._stopping.is_set():
            return
        self.refresh_workers()
        self.loop.call_later(LIVENESS_PERIOD_S, self._liveness_tick)

    def _follow_registry(self) -> None:
        """Pick up workers that joined or left since the last liveness tick (cheap check)."""
        if self.registry.version != self._seen_version:
            self.refresh_workers()

    def refresh_workers(self) -> None:
        """Re-read the registry; answer the in-flight requests of dead workers with 503."""
        self._seen_version = self.registry.version
        live = [(info.key.route, info.service) for info in self.registry.snapshot() if info.alive]
        for key in self.table.update(live):
            for sid in list(self.by_worker.pop(key, ())):
                self._complete(sid, (503, JSON_HEADERS, error_body(503, "worker died")))

    # ---- entries from the DMA manager -----------------------------------------

    def _on_entries(self, batch: list[tuple[int, int, bytes]]) -> None:
        for route, flags, payload in batch:
            try:
                msg = wire.decode(payload)
            except wire.WireError as exc:
                self.corrupt_entries += 1
                log.warning("dropping corrupt entry from worker %#x: %s", route, exc)
                continue
            if flags & ring.BOUNCED:
                if msg.kind == wire.REQUEST:
                    # Our request never reached its worker; the worker is gone.
                    self._complete(msg.req_id, (503, JSON_HEADERS, error_body(503, "worker gone")))
                continue
            if msg.kind == wire.RESPONSE:
                self._complete(msg.req_id, (msg.status, msg.headers, msg.body))
            else:
                self._on_worker_egress(route, msg)

    def _on_worker_egress(self, origin: int, msg: wire.Message) -> None:
        def reply(result: Reply) -> None:
            status, headers, body = result
            answer = wire.Message(
                kind=wire.RESPONSE, req_id=msg.req_id, status=status, headers=headers, body=body
            )
            self._answer_worker(origin, wire.encode(answer), deadline_ns)

        deadline_ns = msg.deadline_ns or time.monotonic_ns() + int(self.cfg.deadline_s * 1e9)
        self._follow_registry()
        target = egress_target(msg.target, self.table.known)
        if target is None:
            reply((400, JSON_HEADERS, error_body(400, f"egress URL without host: {msg.target}")))
            return
        self._stats_for(target.service).egress += 1
        headers = [(k, v) for k, v in msg.headers if k.lower() != "host"]
        headers.append(("host", target.host))
        self._route(target.service, msg.method, target.path, headers, msg.body, deadline_ns, reply)

    def _answer_worker(
        self, route: int, payload: bytes, deadline_ns: int, delay: float = 0.0
    ) -> None:
        """Push a reply to a worker without blocking the loop; retry while sidecar_cq is full.

        The DMA manager drains sidecar_cq continuously, so a full queue is a brief
        overload: back off (1 ms doubling to 50 ms) until the request's own deadline,
        after which the worker has answered its caller with 504 and needs no reply.
        """
        try:
            self.rings.cq.push(payload, route=route, timeout=0)
            return
        except ring.PayloadTooLarge as exc:
            log.warning("cannot answer worker %#x: %s", route, exc)
            return
        except ring.RingFull:
            pass
        if time.monotonic_ns() >= deadline_ns or self._stopping.is_set():
            log.warning("sidecar_cq full: dropped a reply to worker %#x", route)
            return
        delay = min(0.05, max(0.001, delay * 2))
        self.loop.call_later(delay, self._answer_worker, route, payload, deadline_ns, delay)

    # ---- routing ----------------------------------------------------------------

    def _route(
        self,
        service: str,
        method: str,
        target: str,
        headers: list[tuple[str, str]],
        body: bytes,
        deadline_ns: int,
        deliver: Callable[[Reply], None],
    ) -> None:
        """Send a request to a local worker of `service`, a fallback peer, or answer an error."""
        stats = self._stats_for(service)
        stats.requests += 1

        def counted(result: Reply) -> None:
            status = result[0]
            stats.by_class[f"{status // 100}xx"] += 1
            if status >= 500:
                stats.errors += 1
            deliver(result)

        worker = self.table.pick(service)
        if worker is None:
            peer = self.cfg.routes.get(service) or self.cfg.peer
            if peer is not None:
                stats.fallback += 1
                self.loop.create_task(
                    self._fallback(peer, method, target, headers, body, deadline_ns, counted)
                )
            elif service in self.table.known:
                counted((503, JSON_HEADERS, error_body(503, f"no live worker for {service!r}")))
            else:
                counted((404, JSON_HEADERS, error_body(404, f"unknown service {service!r}")))
            return
        sid = self._next_id
        self._next_id += 1
        msg = wire.Message(
            kind=wire.REQUEST,
            req_id=sid,
            method=method,
            target=target,
            headers=headers,
            body=body,
            deadline_ns=deadline_ns,
        )
        try:
            self.rings.cq.push(wire.encode(msg), route=worker, timeout=0)
        except ring.RingFull:
            counted((503, JSON_HEADERS, error_body(503, "mesh queue full")))
            return
        except ring.PayloadTooLarge as exc:
            counted((413, JSON_HEADERS, error_body(413, str(exc))))
            return
        except wire.WireError as exc:
            counted((400, JSON_HEADERS, error_body(400, str(exc))))
            return
        pending = _Pending(worker=worker, service=service, deliver=counted)
        delay = max(0.0, (deadline_ns - time.monotonic_ns()) / 1e9)
        pending.timer = self.loop.call_later(delay, self._expire, sid)
        self.pending[sid] = pending
        self.by_worker[worker].add(sid)
        self.table.started(worker)

    async def _fallback(self, peer, method, target, headers, body, deadline_ns, deliver) -> None:
        timeout = max(0.001, (deadline_ns - time.monotonic_ns()) / 1e9)
        try:
            result = await self.fallback.request(peer, method, target, headers, body, timeout)
        except TimeoutError:
            result = (504, JSON_HEADERS, error_body(504, "deadline passed at the fallback peer"))
        except FallbackError as exc:
            result = (502, JSON_HEADERS, error_body(502, f"fallback failed: {exc}"))
        except Exception as exc:  # a bug must still answer the client, never strand it
            log.exception("fallback to %s:%d failed", peer.host, peer.port)
            result = (502, JSON_HEADERS, error_body(502, f"fallback failed: {exc!r}"))
        deliver(result)

    def _expire(self, sid: int) -> None:
        self._complete(sid, (504, JSON_HEADERS, error_body(504, "deadline passed")))

    def _complete(self, sid: int, result: Reply) -> None:
        pending = self.pending.pop(sid, None)
        if pending is None:
            return  # already answered (late reply after a deadline or a death)
        if pending.timer is not None:
            pending.timer.cancel()
        self.by_worker[pending.worker].discard(sid)
        self.table.finished(pending.worker)
        pending.deliver(result)

    # ---- bridge requests --------------------------------------------------------------

    def dispatch(self, req: BridgeRequest) -> tuple[int, asyncio.Future]:
        """Start one client request: (request number, future of (status, headers, body))."""
        self.bridge_requests += 1
        req_id = self.bridge_requests
        fut = self.loop.create_future()
        if req.path == STATS_PATH:
            body = json.dumps(self.snapshot_stats()).encode()
            fut.set_result((200, JSON_HEADERS, body))
            return req_id, fut
        if req.path == HEALTH_PATH:
            if self.failure is None:
                fut.set_result((200, JSON_HEADERS, b'{"status": "ok"}'))
            else:
                fut.set_result((503, JSON_HEADERS, error_body(503, self.failure)))
            return req_id, fut
        self._follow_registry()
        service, path = self._resolve(req)
        self._stats_for(service).ingress += 1
        target = path + ("?" + req.query if req.query else "")
        deadline_ns = time.monotonic_ns() + int(self.cfg.deadline_s * 1e9)

        def deliver(result: Reply) -> None:
            if not fut.done():
                fut.set_result(result)

        self._route(service, req.method, target, req.headers, req.body, deadline_ns, deliver)
        return req_id, fut

    def _resolve(self, req: BridgeRequest) -> tuple[str, str]:
        known = self.table.known
        if req.target_service:
            return req.target_service, req.path
        if req.url:
            target = egress_target(req.url, known)
            if target is not None:
                return target.service, req.path
        service, path = split_prefix(req.path, known)
        if service is not None:
            return service, path
        service = host_service(req.header("host"), known)
        return service or self.cfg.entry_service, req.path

    def _stats_for(self, service: str) -> _ServiceStats:
        stats = self.stats.get(service)
        if stats is None:
            if len(self.stats) >= MAX_COUNTED_SERVICES and service not in self.table.known:
                service = OTHER_SERVICES
            stats = self.stats.setdefault(service, _ServiceStats())
        return stats

    def note_bridge_error(self, status: int) -> None:
        """Count a request refused at the bridge (400, 408, 413, 431)."""
        self.bridge_errors[status] += 1

    def snapshot_stats(self) -> dict:
        """Counters for benchmarks and operators (served at /_dpumesh/stats)."""
        workers: dict[str, list[int]] = defaultdict(list)
        for info in self.registry.snapshot():
            if info.alive:
                workers[info.service].append(info.pid)
        return {
            "namespace": self.cfg.namespace,
            "services": {name: s.as_dict() for name, s in sorted(self.stats.items())},
            "workers": dict(workers),
            "inflight": len(self.pending),
            "bridge_requests": self.bridge_requests,
            "bridge_errors": {str(k): v for k, v in self.bridge_errors.items()},
            "corrupt_entries": self.corrupt_entries,
        }


class BridgeConnection(asyncio.Protocol):
    """One client connection: parse, dispatch, answer in order, enforce timeouts."""

    MAX_PIPELINED = 128

    def __init__(self, sidecar: Sidecar) -> None:
        self.sidecar = sidecar
        self.cfg = sidecar.cfg
        self.parser = BridgeParser(self.cfg.max_body)
        self.transport: asyncio.Transport | None = None
        self.queue: deque[tuple[BridgeRequest, int, asyncio.Future]] = deque()
        self.receive_timer: asyncio.TimerHandle | None = None
        self.idle_timer: asyncio.TimerHandle | None = None
        self.closing = False
        self.close_after_flush = False
        self.paused = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        sock = transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._arm_idle()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closing = True
        for timer in (self.receive_timer, self.idle_timer):
            if timer is not None:
                timer.cancel()

    def data_received(self, data: bytes) -> None:
        if self.closing:
            return  # refused: discard what the client is still sending
        try:
            requests = self.parser.feed(data)
        except BadRequest as exc:
            self._refuse(exc.status, exc.reason)
            return
        for req in requests:
            req_id, fut = self.sidecar.dispatch(req)
            self.queue.append((req, req_id, fut))
            fut.add_done_callback(self._flush)
        self._update_receive_timer()
        self._arm_idle()
        if len(self.queue) > self.MAX_PIPELINED and not self.paused:
            self.paused = True
            self.transport.pause_reading()
        self._flush()

    def eof_received(self) -> bool:
        if self.closing:
            return False
        try:
            self.parser.eof()
        except BadRequest as exc:
            self._refuse(exc.status, exc.reason)
            return False
        if not self.queue:
            return False  # nothing owed: let the transport close
        self.close_after_flush = True
        return True  # keep the write side open until queued answers are sent

    def _flush(self, _fut: asyncio.Future | None = None) -> None:
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        while self.queue and self.queue[0][2].done():
            req, req_id, fut = self.queue.popleft()
            status, headers, body = fut.result()
            if req.protocol == "json":
                transport.write(render_json(req_id, status, headers, body))
            else:
                transport.write(render_http(status, headers, body, keep_alive=req.keep_alive))
                if not req.keep_alive:
                    self._close()
                    return
        if self.paused and len(self.queue) <= self.MAX_PIPELINED // 2:
            self.paused = False
            transport.resume_reading()
        if not self.queue and self.close_after_flush:
            self._close()

    def _refuse(self, status: int, reason: str) -> None:
        """Answer a protocol error and close; earlier pipelined answers are dropped."""
        self.sidecar.note_bridge_error(status)
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        body = error_body(status, reason)
        if self.parser.protocol == "json":
            transport.write(render_json(0, status, JSON_HEADERS, body))
        else:
            transport.write(render_http(status, JSON_HEADERS, body, keep_alive=False))
        # Lingering close: a client still uploading (say, a body over the limit) would
        # get a reset instead of our answer if we closed now. Stop writing, discard
        # its input until it closes, and close for good after a short grace period.
        self.closing = True
        if transport.can_write_eof():
            transport.write_eof()
        self.sidecar.loop.call_later(LINGER_S, transport.close)

    def _close(self) -> None:
        self.closing = True
        if self.transport is not None:
            self.transport.close()

    def _update_receive_timer(self) -> None:
        if self.parser.in_progress:
            if self.receive_timer is None:
                self.receive_timer = self.sidecar.loop.call_later(
                    self.cfg.receive_timeout_s, self._refuse, 408, "request not received in time"
                )
        elif self.receive_timer is not None:
            self.receive_timer.cancel()
            self.receive_timer = None

    def _arm_idle(self) -> None:
        if self.idle_timer is not None:
            self.idle_timer.cancel()
        self.idle_timer = self.sidecar.loop.call_later(self.cfg.idle_timeout_s, self._idle)

    def _idle(self) -> None:
        if self.queue or self.parser.in_progress:
            self._arm_idle()
        else:
            self._close()


def parse_args(argv: list[str] | None = None) -> Config:
    """Command line -> Config (every option also documented in --help)."""
    p = argparse.ArgumentParser(
        prog="python -m dpumesh.dpu_daemon",
        description=(
            "DPUmesh sidecar / L7 proxy (runs on the DPU on real hardware). Accepts HTTP/1.1 "
            "and the seed JSON protocol on one TCP port, routes to local workers through the "
            "DMA manager's shared-memory queues, falls back to HTTP peers for other services."
        ),
    )
    p.add_argument(
        "--ns",
        default=None,
        help="instance namespace (default: $DPUMESH_NS or 'default')",
    )
    p.add_argument("--host", default="127.0.0.1", help="bridge listen address (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=5005, help="bridge listen port (default 5005)")
    p.add_argument("--entry", default="s0", help="service for requests naming none (default s0)")
    p.add_argument(
        "--deadline",
        type=float,
        default=30.0,
        help="per-request deadline in seconds; then 504 (default 30)",
    )
    p.add_argument(
        "--receive-timeout",
        type=float,
        default=10.0,
        help="seconds a client may take to send one whole request; then 408",
    )
    p.add_argument(
        "--max-body",
        type=int,
        default=ring.MAX_BODY,
        help="largest request/response body in bytes; larger gets 413 (default 8 MiB)",
    )
    p.add_argument(
        "--service",
        action="append",
        default=[],
        metavar="NAME",
        help="a service expected here (answers 503, not 404, while it has no worker)",
    )
    p.add_argument(
        "--route",
        action="append",
        default=[],
        metavar="SVC=URL",
        help="send SVC to this HTTP endpoint when it has no local worker",
    )
    p.add_argument(
        "--peer",
        metavar="URL",
        help="default HTTP endpoint (e.g. another dpu-daemon) for non-local services",
    )
    p.add_argument("--log-level", default="INFO", help="logging level (default INFO)")
    args = p.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(name)s %(message)s")
    routes = {}
    for item in args.route:
        name, sep, url = item.partition("=")
        if not sep:
            p.error(f"--route expects SVC=URL, got {item!r}")
        try:
            routes[name] = Peer.parse(url)
        except ValueError as exc:
            p.error(str(exc))
    try:
        peer = Peer.parse(args.peer) if args.peer else None
        ns = naming.namespace_from_env() if args.ns is None else naming.validate_namespace(args.ns)
    except ValueError as exc:
        p.error(str(exc))
    return Config(
        namespace=ns,
        host=args.host,
        port=args.port,
        entry_service=args.entry,
        deadline_s=args.deadline,
        receive_timeout_s=min(args.receive_timeout, args.deadline),
        max_body=args.max_body,
        services=args.service,
        routes=routes,
        peer=peer,
    )


async def serve(cfg: Config, ready: Callable[[], None] | None = None) -> None:
    """Run the sidecar until SIGINT/SIGTERM."""
    loop = asyncio.get_running_loop()
    sidecar = Sidecar(cfg, loop)
    sidecar.start()
    server = await loop.create_server(
        lambda: BridgeConnection(sidecar), cfg.host, cfg.port, reuse_address=True, backlog=1024
    )
    stop = asyncio.Event()
    sidecar.on_failure = stop.set
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    log.info("dpu-daemon ns=%s listening on %s:%d", cfg.namespace, cfg.host, cfg.port)
    if ready is not None:
        ready()
    try:
        await stop.wait()
    finally:
        server.close()
        sidecar.stop()
        await server.wait_closed()
    if sidecar.failure is not None:
        raise SystemExit(f"dpu-daemon: {sidecar.failure}")


def main(argv: list[str] | None = None) -> None:
    """Entry point of `python -m dpumesh.dpu_daemon`."""
    cfg = parse_args(argv)
    try:
        import uvloop

        runner = uvloop.run
    except ImportError:  # pragma: no cover - uvloop is pinned, but keep asyncio usable
        runner = asyncio.run
    try:
        runner(serve(cfg))
    except OSError as exc:
        raise SystemExit(f"dpu-daemon: cannot listen on {cfg.host}:{cfg.port}: {exc}") from None


if __name__ == "__main__":
    main()
