"""DPU sidecar / L7 proxy: the port-5005 bridge, routing, fallback, deadlines, stats.

On real hardware this runs on the DPU. It accepts client connections (HTTP/1.1
keep-alive or the seed's JSON protocol), picks a live local worker of the
target service (least outstanding requests) and hands the request to the DMA
manager through `sidecar_cq`; worker replies and worker egress calls come back
through `sidecar_sq`. Services with no local worker go to an HTTP peer
(`--route`, round robin over a service's peers; which peers, the stack
descriptions decide by `dpumesh.routing.nearest`) without blocking the event
loop. Every request has a deadline (504), a dead worker's requests are
answered at once (503), and counters are served at `GET /_dpumesh/stats` so a
benchmark can prove what crossed the mesh. A request a peer sidecar sent
(`PEER_HEADER`) is routed by its `Host` alone and counted as `peer_ingress`,
not as a client's `ingress`.

The shared-memory queue is read by one thread that blocks in `sem_wait` and
hands batches to the asyncio loop; everything else runs on the loop.

Buffered bytes (DESIGN §9). Every byte a client sends is charged, from the
moment it is read until its request is answered (the answer handed to the
socket), to its connection and to one budget shared by all connections. An
answer the client does not read is charged too while the socket's write
buffer is over its high-water mark; the connection then neither reads nor
writes until the client catches up.

- Per connection (`--max-connection-bytes`, default max_body + 128 KiB): a
  request whose own bytes reach the cap can never fit: 413. A connection whose
  pipelined requests reach it is not read until their answers free it.
- In total (`--max-buffered-bytes`, default 256 MiB): a connection whose bytes
  take the total over the budget is not read until the budget frees (oldest
  waiting connection first), as long as complete requests hold part of it:
  they are answered by their deadline at the latest. If unfinished requests
  alone hold the whole budget, waiting cannot help: the connection whose bytes
  crossed it is answered 503 and closed. When only unfinished requests of
  waiting connections are left and the oldest cannot go on, the newest waiting
  one gets 503. A request we stopped reading that is still incomplete after
  `--receive-timeout` gets 503, not 408. An eighth of the budget is kept for
  connections holding at most 64 KiB, so small requests go on while large
  bodies wait. Reads come in chunks of up to 256 KiB, so the total can pass
  the budget by about one chunk per connection being read at that moment.
  Refusals are counted in `bridge_errors`, usage under `buffers` in the stats.
- What a refused or vanished connection had buffered is dropped with it; the
  parser's objects reference each other, so after 16 MiB of such bytes a
  garbage collection runs (at most once a second).
- Large entries from sidecar_sq (over 64 KiB) are handled about 1 MiB per loop
  iteration, small ones at once, so a burst of 8 MiB replies does not hold up
  the small requests of other connections.

Memory goes back once large bodies are gone: glibc raises its mmap
threshold to the largest block freed (up to 32 MiB), so after the first 8 MiB
body they come from the heap, which fragments and keeps its pages. When the
budget's use falls to a sixteenth of a high mark of at least 32 MiB (or half
the budget), the next liveness tick calls `malloc_trim(0)`. Measured (64 concurrent 8 MiB echo
requests, 2 rounds, default budget, 2-core VM): HTTP peak RSS 1102-1544 MB
before, about 380 MB after, idle (3 s later) 194-415 MB before, 31 MB after;
seed JSON peak 157-173 MB before, 486 MB after (the budget lets more uploads
proceed at once), idle 45-86 -> 31 MB. Fixing the mmap threshold at 128 KiB
(mallopt) instead kept the peak lower (312/401 MB) but cost 40-70 % more time
per large body (mmap and page faults for every 8 MiB copy).

Connections: at most `--max-connections` are served (default: the smaller of
10000 and RLIMIT_NOFILE - 256, the soft limit being raised to the hard one at
start). Beyond it a new connection is answered 503 and closed at once, logged
at most every 10 s with counts. The bridge accepts connections itself rather
than through `loop.create_server`: uvloop closes its listening server for
good, without a word, on an accept() error such as EMFILE. Here such errors
are logged (rate-limited), a spare descriptor is given up to accept and close
the clients waiting in the backlog, and accepting goes on.

DMA manager liveness (truthful health, DESIGN §9). The sidecar checks the
dpa-daemon's registry slot on every liveness tick (LIVENESS_PERIOD_S) and
whenever the registry changes. While no such slot is alive (heartbeat older
than `registry.DEAD_AFTER`): health answers 503 naming the DMA manager, the
stats show `dma_manager.alive` false; new requests for local workers get 503
at once; requests already handed to the queues wait up to `--dma-grace`
(default 2 s) from the moment the death was seen: if the DMA manager is back
by then (and within their deadline) they complete normally, otherwise they
get 503 then. A sidecar started before any DMA manager gives one the same
grace to attach (health ok, requests queue). Entries a killed DMA manager held
in its own memory (one move in progress, backlogs of full queues) are gone:
those requests end at their deadline (504).

Restarts: either daemon may be killed and started again while the other and
the workers run. A new sidecar waits (at most about 1.4 s) for a predecessor's
slot to go stale, so that sidecar_sq never has two consumers, re-binds the
port at once (SO_REUSEADDR), starts with fresh counters and numbers its
requests from a random base, so replies still queued for the old process never
complete its requests.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import errno
import functools
import gc
import itertools
import json
import logging
import os
import resource
import secrets
import signal
import socket
import threading
import time
from collections import defaultdict, deque
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field

from dpumesh import naming, registry, ring, wire
from dpumesh.bridge_codec import (
    MAX_HEADER_BYTES,
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
RETRY_HEADERS = [*JSON_HEADERS, ("retry-after", "1")]  # 503s a client may simply retry
DMA_GRACE_S = 2.0
MAX_BUFFERED_BYTES = 256 * 1024 * 1024
MAX_CONNECTIONS = 10_000
FD_RESERVE = 256  # descriptors kept for everything but client connections
READ_CHUNK = 256 * 1024  # the most one data_received delivers (uvloop's read buffer)
SMALL_CONNECTION = MAX_HEADER_BYTES  # connections holding no more may use the reserve
ACCEPT_BATCH = 64  # connections accepted per wake-up of the listener
ACCEPT_RETRY_S = 0.1  # pause after an accept error that is not the clients' doing
LOG_EVERY_S = 10.0  # rate limit of repeated warnings (refused connections, accept errors)
TRIM_AFTER_BYTES = 32 * 1024 * 1024  # a budget high mark that makes a later trim worth it
ENTRY_SLICE_BYTES = 1024 * 1024  # large entry payload handled per loop iteration
SMALL_ENTRY = 64 * 1024  # entries up to this size are handled as soon as they arrive
GC_AFTER_DROPPED = 16 * 1024 * 1024  # unfinished request bytes dropped before a collection
GC_EVERY_S = 1.0  # at most one such collection per second
_REFUSED = render_http(
    503, RETRY_HEADERS, error_body(503, "too many connections"), keep_alive=False
)

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
    routes: Mapping[str, tuple[Peer, ...]] = field(default_factory=dict)  # fallback peers
    peer: Peer | None = None
    max_buffered_bytes: int = MAX_BUFFERED_BYTES
    max_connection_bytes: int | None = None  # None: max_body + 2 * MAX_HEADER_BYTES
    max_connections: int | None = None  # None: from RLIMIT_NOFILE (default_max_connections)
    dma_grace_s: float = DMA_GRACE_S

    @property
    def connection_cap(self) -> int:
        """Bytes one connection may hold (a whole request: head, body, framing)."""
        return self.max_connection_bytes or self.max_body + 2 * MAX_HEADER_BYTES


@dataclass(slots=True)
class _Pending:
    """A request handed to a worker, waiting for its reply."""

    worker: int
    service: str
    deliver: Callable[[Reply], None]
    timer: asyncio.TimerHandle | None = None


#: Marks a request one sidecar's fallback sends another (nodes, DESIGN §8).
PEER_HEADER = "x-dpumesh-peer"


@dataclass(slots=True)
class _ServiceStats:
    requests: int = 0
    ingress: int = 0
    peer_ingress: int = 0  # from another node's sidecar (its fallback), not from a client
    egress: int = 0
    fallback: int = 0
    fallback_errors: int = 0  # fallbacks that failed here (502/504: no answer from the peer)
    errors: int = 0
    by_class: dict[str, int] = field(default_factory=lambda: defaultdict(int))

    def as_dict(self) -> dict:
        return {
            "requests": self.requests,
            "ingress": self.ingress,
            "peer_ingress": self.peer_ingress,
            "egress": self.egress,
            "fallback": self.fallback,
            "fallback_errors": self.fallback_errors,
            "errors": self.errors,
            "by_class": dict(self.by_class),
        }


@dataclass(slots=True)
class _DmaState:
    """What the sidecar knows of the DMA manager (module docstring: liveness)."""

    since: float  # loop time of the last change (or of the sidecar's start)
    alive: bool = False
    seen: bool = False  # attached at least once since this sidecar started
    deaths: int = 0
    pid: int | None = None
    failed: int = 0  # requests answered 503 because it was not alive

    def as_dict(self, now: float) -> dict:
        return {
            "alive": self.alive,
            "since_s": round(now - self.since, 3),
            "deaths": self.deaths,
            "pid": self.pid,
            "failed_requests": self.failed,
        }


class _RateLimitedLog:
    """A warning repeated at most once per LOG_EVERY_S, with counts, so floods stay readable."""

    def __init__(self, loop: asyncio.AbstractEventLoop, message: Callable[[], str]) -> None:
        self.loop = loop
        self.message = message  # describes the situation at the time of logging
        self.total = 0
        self._unlogged = 0
        self._next = 0.0
        self._timer: asyncio.TimerHandle | None = None

    def note(self) -> None:
        """Count one occurrence; log now or at the end of the current period."""
        self.total += 1
        self._unlogged += 1
        now = self.loop.time()
        if now >= self._next:
            self._emit()
        elif self._timer is None:
            self._timer = self.loop.call_at(self._next, self._emit)

    def _emit(self) -> None:
        self._timer = None
        if self._unlogged:
            log.warning(
                "%s (%d in the last %.0f s, %d in all)",
                self.message(),
                self._unlogged,
                LOG_EVERY_S,
                self.total,
            )
            self._unlogged = 0
            self._next = self.loop.time() + LOG_EVERY_S

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None


class _Budget:
    """Request bytes read by the bridge and not yet answered, shared by all connections.

    `used` counts every charged byte, `partial` those of requests still
    arriving; the rest belong to complete requests (or unread answers) and
    are released without help from any waiting connection. Policy: module
    docstring, "Buffered bytes".
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.reserve = limit // 8  # for connections holding <= SMALL_CONNECTION
        self.used = 0
        self.partial = 0
        self.peak = 0
        self.high = 0  # highest use since the heap was last trimmed
        self.paused = 0  # times a connection was stopped for the budget
        self.refused = 0  # requests answered 503 for the budget
        self.waiters: deque[BridgeConnection] = deque()
        self.small_waiters: deque[BridgeConnection] = deque()
        self._waking = False

    def limit_for(self, held: int) -> int:
        """The total a connection holding `held` bytes may take the budget to."""
        return self.limit if held <= SMALL_CONNECTION else self.limit - self.reserve

    def take(self, n: int) -> None:
        """Charge `n` bytes of a request still arriving."""
        self.used += n
        self.partial += n
        if self.used > self.high:
            self.high = self.used
            self.peak = max(self.peak, self.used)

    def settle(self, n: int) -> None:
        """`n` charged bytes now belong to a complete request."""
        self.partial -= n

    def release(self, n: int, partial: int = 0) -> None:
        """Give back `n` bytes (`partial` of them unfinished); wake waiting connections."""
        self.used -= n
        self.partial -= partial
        if self.small_waiters or self.waiters:
            self.wake()

    def wait(self, conn: BridgeConnection) -> None:
        """Queue a paused connection; small ones have their own queue (they need little)."""
        self.paused += 1
        if conn.held <= SMALL_CONNECTION:
            self.small_waiters.append(conn)
        else:
            self.waiters.append(conn)

    def wake(self) -> None:
        """Resume waiting connections, oldest first, for as much as the budget has room.

        Each resumed connection may read one chunk before it is checked again, so
        room is counted for that. Small connections go first, up to the whole
        budget; large ones up to the budget less the reserve.
        """
        if self._waking:
            return  # a refusal below released bytes: the loop here goes on
        self._waking = True
        try:
            room = self.limit - self.used
            small = self.small_waiters
            while small and (not small[0].waiting_budget or room >= SMALL_CONNECTION):
                conn = small.popleft()
                if conn.waiting_budget:
                    room -= SMALL_CONNECTION
                    conn.resume_budget()
            room -= self.reserve
            resumed = False
            waiters = self.waiters
            while waiters:
                conn = waiters[0]
                if not conn.waiting_budget:
                    waiters.popleft()  # closed or refused meanwhile
                    continue
                if room >= READ_CHUNK:
                    waiters.popleft()
                    room -= READ_CHUNK
                    resumed = True
                    conn.resume_budget()
                    continue
                if self.used > self.partial or resumed:
                    return  # complete requests (or resumed ones) will free room: wait for them
                # Only unfinished requests hold the budget and the oldest one cannot go on.
                newest = waiters.pop()
                if newest is conn:
                    conn.resume_budget()  # alone: let it try; its own bytes decide
                    return
                if newest.waiting_budget:
                    newest.refuse_budget()  # the newest gives way
                    room = self.limit - self.reserve - self.used
        finally:
            self._waking = False

    def as_dict(self) -> dict:
        return {
            "used": self.used,
            "unfinished": self.partial,
            "limit": self.limit,
            "peak": self.peak,
            "waiting": sum(c.waiting_budget for q in (self.waiters, self.small_waiters) for c in q),
            "paused": self.paused,
            "refused": self.refused,
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
        self._large_entries: deque[tuple[int, int, bytes]] = deque()  # not yet handled
        self._draining = False
        self.fallback = FallbackClient(max_body=cfg.max_body)
        # Requests for a service with no live local worker rotate over its peers.
        self._routes: dict[str, Iterator[Peer]] = {
            svc: itertools.cycle(peers) for svc, peers in cfg.routes.items() if peers
        }
        # A random base per process: replies to a predecessor's requests still in
        # sidecar_sq (it was killed, we replaced it) can never complete ours.
        self._next_id = (secrets.randbits(30) << 32) + 1
        self._stopping = threading.Event()
        self.failure: str | None = None  # why the sidecar cannot go on (then it exits)
        self.on_failure: Callable[[], None] = lambda: None
        self.budget = _Budget(cfg.max_buffered_bytes)
        self._dropped = 0  # bytes of unfinished requests dropped since the last collection
        self._gc_timer: asyncio.TimerHandle | None = None
        self._last_gc = 0.0
        self.connections = 0  # open bridge connections
        self.max_connections = cfg.max_connections or MAX_CONNECTIONS
        self.refused_connections = _RateLimitedLog(
            loop,
            lambda: (
                f"connection cap reached ({self.connections} open, --max-connections "
                f"{self.max_connections}): new connections answered 503 and closed"
            ),
        )
        self.started_at = loop.time()
        self.dma = _DmaState(since=self.started_at)
        self._dma_timer: asyncio.TimerHandle | None = None
        self.registry = registry.Registry.open_or_create(cfg.namespace)
        try:
            other = registry.wait_for_predecessor(self.registry, registry.SIDECAR_NAME)
            if other is not None:
                raise RuntimeError(
                    f"another dpu-daemon (pid {other.pid}) serves namespace {cfg.namespace}"
                )
            registry.collect_stale(cfg.namespace, self.registry)
            self.rings = registry.SidecarRings(cfg.namespace)
        except BaseException:
            self.registry.close()
            raise
        self.membership = registry.Membership(self.registry, registry.SIDECAR_NAME, rejoin=True)
        self._reader = threading.Thread(target=self._read_loop, name="sidecar-sq", daemon=True)

    # ---- lifecycle -------------------------------------------------------

    def start(self) -> None:
        """Start the queue reader and the liveness timer."""
        self.refresh_workers()
        if not self.dma.alive:  # started first: the DMA manager gets the grace to attach
            self._dma_timer = self.loop.call_later(self.cfg.dma_grace_s, self._dma_gone)
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
        for timer in (self._dma_timer, self._gc_timer):
            if timer is not None:
                timer.cancel()
        self.refused_connections.close()
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
        self._trim_if_drained()
        self.refresh_workers()
        self.loop.call_later(LIVENESS_PERIOD_S, self._liveness_tick)

    def _follow_registry(self) -> None:
        """Pick up workers that joined or left since the last liveness tick (cheap check)."""
        if self.registry.version != self._seen_version:
            self.refresh_workers()

    def refresh_workers(self) -> None:
        """Re-read the registry; answer the in-flight requests of dead workers with 503.

        Also follows the DMA manager's slot (module docstring: liveness).
        """
        self._seen_version = self.registry.version
        infos = self.registry.snapshot(include_daemons=True)
        live = [(i.key.route, i.service) for i in infos if i.alive and not i.is_daemon]
        dma = [i for i in infos if i.service == registry.DMA_MANAGER_NAME]
        alive = [i for i in dma if i.alive]
        if alive:
            self._follow_dma(alive[0].pid)
        else:
            self._follow_dma(None, min((i.heartbeat_age_s for i in dma), default=None))
        for key in self.table.update(live):
            for sid in list(self.by_worker.pop(key, ())):
                self._complete(sid, (503, JSON_HEADERS, error_body(503, "worker died")))

    def _follow_dma(self, pid: int | None, age_s: float | None = None) -> None:
        """Note the DMA manager attaching or dying; a death starts the in-flight grace.

        `pid`: the live DMA manager's, None if there is none; `age_s`: then the
        freshest heartbeat of a stale slot, None if it left no slot.
        """
        dma = self.dma
        now = self.loop.time()
        if pid is not None:
            dma.pid = pid
            if dma.alive:
                return
            dma.alive = True
            if dma.seen:
                log.warning(
                    "DMA manager (dpa-daemon pid %d) is back after %.1f s", pid, now - dma.since
                )
            else:
                log.info("DMA manager (dpa-daemon pid %d) attached", pid)
            dma.seen = True
            dma.since = now
            if self._dma_timer is not None:
                self._dma_timer.cancel()
                self._dma_timer = None
            return
        if not dma.alive:
            return
        dma.alive = False
        dma.since = now
        dma.deaths += 1
        log.error(
            "DMA manager (dpa-daemon pid %s) is not alive (%s): new requests for local workers "
            "get 503; the %d in flight wait up to %.1f s for it",
            dma.pid,
            "registry slot gone" if age_s is None else f"no heartbeat for {age_s:.1f} s",
            len(self.pending),
            self.cfg.dma_grace_s,
        )
        self._dma_timer = self.loop.call_later(self.cfg.dma_grace_s, self._dma_gone)

    def _dma_gone(self) -> None:
        """The grace is over without a DMA manager: answer every queued request with 503."""
        self._dma_timer = None
        if self.dma.alive:
            return
        why = error_body(503, f"{self.dma_problem()}; request abandoned")
        failed = list(self.pending)
        for sid in failed:
            self._complete(sid, (503, JSON_HEADERS, why))
        self.dma.failed += len(failed)
        if failed:
            log.error(
                "%s: answered %d requests in flight with 503", self.dma_problem(), len(failed)
            )

    def dma_refusing(self) -> bool:
        """True while requests for local workers are refused for want of a DMA manager."""
        dma = self.dma
        return not dma.alive and (dma.seen or self._dma_timer is None)

    def dma_problem(self) -> str:
        """Why the sidecar cannot reach its workers (health reason, error detail)."""
        gone = self.loop.time() - self.dma.since
        if self.dma.seen:
            return f"DMA manager (dpa-daemon) not alive for {gone:.1f} s"
        return f"no DMA manager (dpa-daemon) attached in {gone:.1f} s"

    # ---- entries from the DMA manager -----------------------------------------

    def _on_entries(self, batch: list[tuple[int, int, bytes]]) -> None:
        """Take a batch from the reader thread: small entries now, large ones queued."""
        large = self._large_entries
        for entry in batch:
            if len(entry[2]) > SMALL_ENTRY:
                large.append(entry)
            else:
                self._on_entry(*entry)
        if large and not self._draining:
            self._draining = True
            self._drain_large()

    def _drain_large(self) -> None:
        """Handle large entries in arrival order, about ENTRY_SLICE_BYTES per loop iteration.

        Why: decoding and answering one 8 MiB reply takes milliseconds; a batch of
        them in one callback would keep the small requests of other connections
        waiting all that time. Entries are independent (each answers or asks for
        one request), so small ones may overtake large ones.
        """
        large = self._large_entries
        left = ENTRY_SLICE_BYTES
        while large:
            route, flags, payload = large.popleft()
            left -= len(payload)
            self._on_entry(route, flags, payload)
            if left <= 0 and large:
                self.loop.call_soon(self._drain_large)
                return
        self._draining = False

    def _on_entry(self, route: int, flags: int, payload: bytes) -> None:
        try:
            msg = wire.decode(payload)
        except wire.WireError as exc:
            self.corrupt_entries += 1
            log.warning("dropping corrupt entry from worker %#x: %s", route, exc)
            return
        if flags & ring.BOUNCED:
            if msg.kind == wire.REQUEST:
                # Our request never reached its worker; the worker is gone.
                self._complete(msg.req_id, (503, JSON_HEADERS, error_body(503, "worker gone")))
            return
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
        if worker is not None and self.dma_refusing():
            self.dma.failed += 1
            counted((503, JSON_HEADERS, error_body(503, self.dma_problem())))
            return
        if worker is None:
            peers = self._routes.get(service)
            peer = next(peers) if peers is not None else self.cfg.peer
            if peer is not None:
                stats.fallback += 1
                headers = _to_peer(headers, service, self.table.known)
                self.loop.create_task(
                    self._fallback(peer, method, target, headers, body, deadline_ns, counted, stats)
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

    async def _fallback(
        self, peer, method, target, headers, body, deadline_ns, deliver, stats
    ) -> None:
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
        else:
            deliver(result)  # the peer's answer: counted there too
            return
        stats.fallback_errors += 1
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
            if self.failure is not None:
                fut.set_result((503, JSON_HEADERS, error_body(503, self.failure)))
            elif self.dma_refusing():
                fut.set_result((503, JSON_HEADERS, error_body(503, self.dma_problem())))
            else:
                fut.set_result((200, JSON_HEADERS, b'{"status": "ok"}'))
            return req_id, fut
        self._follow_registry()
        from_peer = req.header(PEER_HEADER) is not None
        service, path = self._resolve(req, from_peer)
        stats = self._stats_for(service)
        if from_peer:
            stats.peer_ingress += 1
        else:
            stats.ingress += 1
        target = path + ("?" + req.query if req.query else "")
        deadline_ns = time.monotonic_ns() + int(self.cfg.deadline_s * 1e9)

        def deliver(result: Reply) -> None:
            if not fut.done():
                fut.set_result(result)

        self._route(service, req.method, target, req.headers, req.body, deadline_ns, deliver)
        return req_id, fut

    def _resolve(self, req: BridgeRequest, from_peer: bool = False) -> tuple[str, str]:
        """The service and path of a bridge request; a peer sidecar's already names its
        service in `Host` (its path is the callee's own, whatever its first segment)."""
        known = self.table.known
        if from_peer:
            return host_service(req.header("host"), known) or self.cfg.entry_service, req.path
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

    def note_dropped(self, nbytes: int) -> None:
        """A connection dropped the parser of an unfinished request holding `nbytes`.

        The parser's objects reference each other, so its buffered body is freed
        only by the cyclic garbage collector, which counts objects, not bytes:
        after GC_AFTER_DROPPED such bytes, collect (at most every GC_EVERY_S).
        """
        self._dropped += nbytes
        if self._dropped >= GC_AFTER_DROPPED and self._gc_timer is None:
            delay = max(0.0, self._last_gc + GC_EVERY_S - self.loop.time())
            self._gc_timer = self.loop.call_later(delay, self._collect)

    def _collect(self) -> None:
        self._gc_timer = None
        self._dropped = 0
        self._last_gc = self.loop.time()
        gc.collect()
        if trim_heap is not None:
            trim_heap()

    def _trim_if_drained(self) -> None:
        """Give freed heap pages back once large bodies are gone (module docstring)."""
        budget = self.budget
        mark = min(TRIM_AFTER_BYTES, budget.limit // 2)
        if budget.high >= mark and budget.used <= budget.high // 16:
            budget.high = budget.used
            if trim_heap is not None:
                trim_heap()

    def note_bridge_error(self, status: int) -> None:
        """Count a request refused at the bridge (400, 408, 413, 431, 503 for buffers)."""
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
            "dma_manager": self.dma.as_dict(self.loop.time()),
            "buffers": self.budget.as_dict(),
            "connections": {
                "open": self.connections,
                "max": self.max_connections,
                "refused": self.refused_connections.total,
            },
            "pid": os.getpid(),
        }


_P_PIPELINE = 1  # too many answers owed on this connection
_P_CONNECTION = 2  # this connection holds more than its cap
_P_BUDGET = 4  # the shared budget is exhausted
_P_WRITE = 8  # the client does not read its answers


def _request_size(req: BridgeRequest) -> int:
    """A lower bound of the bytes `req` took on the wire (its share of a pipelined read)."""
    size = len(req.method) + len(req.path) + len(req.query) + len(req.body) + 16
    for name, value in req.headers:
        size += len(name) + len(value) + 4
    return size


class BridgeConnection(asyncio.Protocol):
    """One client connection: parse, dispatch, answer in order, enforce timeouts and caps.

    Bytes are charged as they are read (`partial`), move to the request they
    completed (`settled`) and are released when its answer is written; `out`
    is the write buffer while the client does not read (module docstring).
    """

    MAX_PIPELINED = 128

    def __init__(self, sidecar: Sidecar) -> None:
        self.sidecar = sidecar
        self.cfg = sidecar.cfg
        self.budget = sidecar.budget
        self.cap = self.cfg.connection_cap
        self.parser = BridgeParser(self.cfg.max_body)
        self.transport: asyncio.Transport | None = None
        # (is json, keep-alive, request number, future of the answer, bytes charged):
        # not the request itself, so its body is freed once it is in the queue.
        self.queue: deque[tuple[bool, bool, int, asyncio.Future, int]] = deque()
        self.receive_timer: asyncio.TimerHandle | None = None
        self.idle_timer: asyncio.TimerHandle | None = None
        self.closing = False
        self.close_after_flush = False
        self.paused = 0  # _P_* reasons reading is paused for
        self.waiting_budget = False  # queued in budget.waiters
        self.partial = 0
        self.settled = 0
        self.out = 0
        self.in_count = False  # counted in sidecar.connections (set by the Listener)

    @property
    def held(self) -> int:
        """Bytes this connection holds of the budget."""
        return self.partial + self.settled + self.out

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
        self._release_all()
        self.uncount()

    def uncount(self) -> None:
        """Leave sidecar.connections (idempotent)."""
        if self.in_count:
            self.in_count = False
            self.sidecar.connections -= 1

    def data_received(self, data: bytes) -> None:
        if self.closing:
            return  # refused: discard what the client is still sending
        n = len(data)
        self.partial += n
        self.budget.take(n)
        try:
            requests = self.parser.feed(data)
        except BadRequest as exc:
            self._refuse(exc.status, exc.reason)
            return
        if requests:
            self._dispatch(requests)
        elif self.partial and not self.parser.in_progress:
            self._release_partial(self.partial)  # between requests (whitespace)
        self._update_receive_timer()
        self._arm_idle()
        if len(self.queue) > self.MAX_PIPELINED:
            self._pause(_P_PIPELINE)
        if self._check_limits():
            self._flush()

    def _dispatch(self, requests: list[BridgeRequest]) -> None:
        """Start each request, charging it the bytes it arrived in."""
        last = len(requests) - 1
        done = not self.parser.in_progress
        for i, req in enumerate(requests):
            # A read that ended between requests: the last one owns every byte since the
            # one before. Otherwise each gets its own size (a lower bound) and the rest
            # stays with the request still arriving.
            size = self.partial if done and i == last else min(self.partial, _request_size(req))
            self.partial -= size
            self.settled += size
            self.budget.settle(size)
            req_id, fut = self.sidecar.dispatch(req)
            self.queue.append((req.protocol == "json", req.keep_alive, req_id, fut, size))
            fut.add_done_callback(self._flush)

    def _check_limits(self) -> bool:
        """Apply the per-connection cap and the shared budget; False if refused."""
        if self.partial > self.cap:
            self._refuse(413, f"request exceeds {self.cap} buffered bytes")
            return False
        held = self.held
        if held > self.cap and self.queue:
            self._pause(_P_CONNECTION)
        budget = self.budget
        limit = budget.limit_for(held)
        if budget.used <= limit:
            return True
        if self.partial and budget.partial > limit:
            # Unfinished requests alone fill the budget: waiting cannot make room.
            self.refuse_budget()
            return False
        if not self.waiting_budget:
            self.waiting_budget = True
            budget.wait(self)
            self._pause(_P_BUDGET)
        return True

    def resume_budget(self) -> None:
        """The budget has room again (called by `_Budget.wake`)."""
        self.waiting_budget = False
        self._resume(_P_BUDGET)

    def refuse_budget(self) -> None:
        """Answer 503: the request cannot be buffered now."""
        self.waiting_budget = False
        self.budget.refused += 1
        self._refuse(503, "bridge buffers full (--max-buffered-bytes)", RETRY_HEADERS)

    def _pause(self, reason: int) -> None:
        if not self.paused and self.transport is not None:
            self.transport.pause_reading()
        self.paused |= reason

    def _resume(self, reason: int) -> None:
        if not self.paused & reason:
            return
        self.paused &= ~reason
        if not self.paused and not self.closing and self.transport is not None:
            self.transport.resume_reading()

    def _release_partial(self, n: int) -> None:
        self.partial -= n
        self.budget.release(n, partial=n)

    def _release_all(self) -> None:
        """Give every held byte back (refused or closed: no answer will be written).

        Drops the answers owed and the parser too, so that what they buffered is
        freed now rather than when the connection object goes.
        """
        held, partial = self.held, self.partial
        self.partial = self.settled = self.out = 0
        self.waiting_budget = False
        self.queue.clear()
        if self.parser.in_progress:
            self.parser = BridgeParser(self.cfg.max_body)
            self.sidecar.note_dropped(partial)
        if held:
            self.budget.release(held, partial=partial)

    def pause_writing(self) -> None:
        """The client is not reading: stop reading and writing, charge the write buffer."""
        transport = self.transport
        out = transport.get_write_buffer_size() if transport is not None else 0
        self.budget.take(out)
        self.budget.settle(out)
        self.out += out
        self._pause(_P_WRITE)

    def resume_writing(self) -> None:
        out, self.out = self.out, 0
        if out:
            self.budget.release(out)
        self._resume(_P_WRITE)
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
        if transport is None or self.closing or transport.is_closing():
            return
        queue = self.queue
        while queue and queue[0][3].done() and not self.paused & _P_WRITE:
            is_json, keep_alive, req_id, fut, size = queue.popleft()
            status, headers, body = fut.result()
            if is_json:
                transport.write(render_json(req_id, status, headers, body))
            else:
                transport.write(render_http(status, headers, body, keep_alive=keep_alive))
            self.settled -= size
            self.budget.release(size)
            if not is_json and not keep_alive:
                self._close()
                return
        if self.paused & _P_PIPELINE and len(queue) <= self.MAX_PIPELINED // 2:
            self._resume(_P_PIPELINE)
        if self.paused & _P_CONNECTION and self.held <= self.cap:
            self._resume(_P_CONNECTION)
        if not queue and self.close_after_flush:
            self._close()

    def _refuse(
        self, status: int, reason: str, headers: list[tuple[str, str]] = JSON_HEADERS
    ) -> None:
        """Answer a protocol error and close; earlier pipelined answers are dropped."""
        self.sidecar.note_bridge_error(status)
        transport = self.transport
        if transport is None or self.closing or transport.is_closing():
            return
        body = error_body(status, reason)
        if self.parser.protocol == "json":
            transport.write(render_json(0, status, headers, body))
        else:
            transport.write(render_http(status, headers, body, keep_alive=False))
        # Lingering close: a client still uploading (say, a body over the limit) would
        # get a reset instead of our answer if we closed now. Stop writing, discard
        # its input until it closes, and close for good after a short grace period.
        self.closing = True
        self._release_all()
        if self.paused:
            self.paused = 0
            transport.resume_reading()  # read (and discard) so that the client can finish
        if transport.can_write_eof():
            transport.write_eof()
        self.sidecar.loop.call_later(LINGER_S, transport.close)

    def _close(self) -> None:
        self.closing = True
        self.waiting_budget = False
        if self.transport is not None:
            self.transport.close()

    def _update_receive_timer(self) -> None:
        if self.parser.in_progress:
            if self.receive_timer is None:
                self.receive_timer = self.sidecar.loop.call_later(
                    self.cfg.receive_timeout_s, self._receive_timeout
                )
        elif self.receive_timer is not None:
            self.receive_timer.cancel()
            self.receive_timer = None

    def _receive_timeout(self) -> None:
        self.receive_timer = None
        if self.paused:  # we stopped reading it: not the client's fault
            if self.paused & _P_BUDGET:
                self.budget.refused += 1
            self.waiting_budget = False
            self._refuse(503, "request could not be buffered in time", RETRY_HEADERS)
        else:
            self._refuse(408, "request not received in time")

    def _arm_idle(self) -> None:
        if self.idle_timer is not None:
            self.idle_timer.cancel()
        self.idle_timer = self.sidecar.loop.call_later(self.cfg.idle_timeout_s, self._idle)

    def _idle(self) -> None:
        if self.queue or self.parser.in_progress:
            self._arm_idle()
        else:
            self._close()


class Listener:
    """Accepts bridge connections itself: the connection cap and accept errors are ours.

    uvloop's own server closes its listening socket for good on an accept()
    error like EMFILE, silently (module docstring). Over the cap a client is
    answered 503 and closed without a transport; out of descriptors, a spare
    one is given up to accept and close the clients waiting in the backlog.
    """

    def __init__(self, sidecar: Sidecar, socks: list[socket.socket]) -> None:
        self.sidecar = sidecar
        self.loop = sidecar.loop
        self.socks = socks
        self._spare: int | None = _open_spare()
        self.accept_errors = _RateLimitedLog(self.loop, self._error_message)
        self._last_error: OSError | None = None

    def _error_message(self) -> str:
        return (
            f"accept() failed: {self._last_error} ({self.sidecar.connections} connections "
            f"open, RLIMIT_NOFILE {resource.getrlimit(resource.RLIMIT_NOFILE)[0]}); "
            "waiting clients are closed"
        )

    def start(self) -> None:
        for sock in self.socks:
            self.loop.add_reader(sock.fileno(), self._accept, sock)

    def close(self) -> None:
        for sock in self.socks:
            with contextlib.suppress(ValueError, OSError):
                self.loop.remove_reader(sock.fileno())
            sock.close()
        self.accept_errors.close()
        if self._spare is not None:
            os.close(self._spare)
            self._spare = None

    def _accept(self, sock: socket.socket) -> None:
        sidecar = self.sidecar
        for _ in range(ACCEPT_BATCH):
            try:
                conn, _addr = sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except ConnectionAbortedError:
                continue
            except OSError as exc:
                self._accept_failed(sock, exc)
                return
            if sidecar.connections >= sidecar.max_connections:
                sidecar.refused_connections.note()
                _refuse_socket(conn)
                continue
            conn.setblocking(False)
            protocol = BridgeConnection(sidecar)
            protocol.in_count = True
            sidecar.connections += 1
            task = self.loop.create_task(
                self.loop.connect_accepted_socket(lambda p=protocol: p, conn)
            )
            task.add_done_callback(functools.partial(_connected, protocol, conn))

    def _accept_failed(self, sock: socket.socket, exc: OSError) -> None:
        """Log (rate-limited); out of descriptors, close waiting clients; retry shortly."""
        self._last_error = exc
        self.accept_errors.note()
        if exc.errno in (errno.EMFILE, errno.ENFILE) and self._spare is not None:
            os.close(self._spare)
            self._spare = None
            try:
                for _ in range(ACCEPT_BATCH):
                    conn, _addr = sock.accept()
                    _refuse_socket(conn)
            except OSError:
                pass
            self._spare = _open_spare()
        fd = sock.fileno()
        self.loop.remove_reader(fd)
        self.loop.call_later(ACCEPT_RETRY_S, self._retry, sock)

    def _retry(self, sock: socket.socket) -> None:
        if sock.fileno() >= 0:
            self.loop.add_reader(sock.fileno(), self._accept, sock)


def _connected(protocol: BridgeConnection, conn: socket.socket, task: asyncio.Task) -> None:
    """Un-count a connection whose transport could not be set up."""
    if task.cancelled() or task.exception() is not None:
        log.warning(
            "could not set up a bridge connection: %r",
            None if task.cancelled() else task.exception(),
        )
        conn.close()
        protocol.uncount()


def _open_spare() -> int | None:
    try:
        return os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None


def _refuse_socket(conn: socket.socket) -> None:
    """Answer 503 (if the socket takes it at once) and close, without a transport."""
    with contextlib.suppress(OSError):
        conn.setblocking(False)
        conn.send(_REFUSED)
    conn.close()


def listen(host: str, port: int, backlog: int = 1024) -> list[socket.socket]:
    """Bound, listening, non-blocking sockets for every address of `host` (SO_REUSEADDR)."""
    socks: list[socket.socket] = []
    seen = set()
    try:
        infos = socket.getaddrinfo(
            host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
        for family, kind, proto, _name, addr in infos:
            if (family, addr) in seen:
                continue
            seen.add((family, addr))
            sock = socket.socket(family, kind, proto)
            socks.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind(addr)
            sock.listen(backlog)
            sock.setblocking(False)
    except BaseException:
        for sock in socks:
            sock.close()
        raise
    return socks


def raise_fd_limit() -> int:
    """Raise RLIMIT_NOFILE's soft limit to the hard one; returns the soft limit now."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError) as exc:
            log.warning("cannot raise RLIMIT_NOFILE from %d to %d: %s", soft, target, exc)
    return soft


def default_max_connections(nofile: int) -> int:
    """Connections the descriptor limit allows, keeping FD_RESERVE for everything else."""
    return max(16, min(MAX_CONNECTIONS, nofile - FD_RESERVE))


def _malloc_trim() -> Callable[[], None] | None:
    """glibc's malloc_trim(0) (None elsewhere): gives the heap's free pages back."""
    try:
        trim = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return None
    trim.argtypes = [ctypes.c_size_t]
    return lambda: trim(0)


trim_heap = _malloc_trim()


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
        help="send SVC to this HTTP endpoint when it has no local worker (repeatable; "
        "several for one SVC: round robin)",
    )
    p.add_argument(
        "--peer",
        metavar="URL",
        help="default HTTP endpoint (e.g. another dpu-daemon) for non-local services",
    )
    p.add_argument(
        "--max-buffered-bytes",
        type=_positive_int,
        default=MAX_BUFFERED_BYTES,
        metavar="N",
        help="request bytes all connections together may hold until answered; beyond it "
        "connections wait or get 503 (default 256 MiB)",
    )
    p.add_argument(
        "--max-connection-bytes",
        type=_positive_int,
        default=None,
        metavar="N",
        help="request bytes one connection may hold; a single larger request gets 413 "
        "(default max-body + 128 KiB)",
    )
    p.add_argument(
        "--max-connections",
        type=_positive_int,
        default=None,
        metavar="N",
        help="open client connections; more are answered 503 and closed "
        f"(default min({MAX_CONNECTIONS}, RLIMIT_NOFILE - {FD_RESERVE}))",
    )
    p.add_argument(
        "--dma-grace",
        type=float,
        default=DMA_GRACE_S,
        metavar="S",
        help="seconds requests in flight wait for a dead DMA manager to come back before "
        f"503 (default {DMA_GRACE_S:g})",
    )
    p.add_argument("--log-level", default="INFO", help="logging level (default INFO)")
    args = p.parse_args(argv)
    if args.dma_grace < 0:
        p.error("--dma-grace must be >= 0")
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(name)s %(message)s")
    routes: dict[str, tuple[Peer, ...]] = {}
    for item in args.route:
        name, sep, url = item.partition("=")
        if not sep:
            p.error(f"--route expects SVC=URL, got {item!r}")
        try:
            routes[name] = (*routes.get(name, ()), Peer.parse(url))
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
        max_buffered_bytes=args.max_buffered_bytes,
        max_connection_bytes=args.max_connection_bytes,
        max_connections=args.max_connections,
        dma_grace_s=args.dma_grace,
    )


def _to_peer(
    headers: list[tuple[str, str]], service: str, known: set[str]
) -> list[tuple[str, str]]:
    """`headers` for a peer sidecar: marked as from a peer (`PEER_HEADER`: not a client's
    entry request there, routed by `Host` alone) with a `Host` naming `service`.

    A worker's call already names its callee; a bridge request routed by path prefix, seed
    JSON or as the entry service may carry the client's `Host` (another node's address).
    """
    host = next((v for k, v in headers if k.lower() == "host"), None)
    if host_service(host, known) != service:
        host = service
    kept = [(k, v) for k, v in headers if k.lower() not in ("host", PEER_HEADER)]
    return [*kept, ("host", host), (PEER_HEADER, "1")]


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def announce(msg: str, *args: object) -> None:
    """Log at INFO whatever the configured level: a (re)start must show in the log."""
    log.handle(log.makeRecord(log.name, logging.INFO, __file__, 0, msg, args, None))


async def serve(cfg: Config, ready: Callable[[], None] | None = None) -> None:
    """Run the sidecar until SIGINT/SIGTERM.

    The port is bound before the queues are touched, so a second daemon on the
    same port fails before it could consume anything.
    """
    loop = asyncio.get_running_loop()
    nofile = raise_fd_limit()
    if cfg.max_connections is None:
        cfg.max_connections = default_max_connections(nofile)
    elif cfg.max_connections > nofile - FD_RESERVE:
        log.warning(
            "--max-connections %d leaves fewer than %d of RLIMIT_NOFILE %d for the rest",
            cfg.max_connections,
            FD_RESERVE,
            nofile,
        )
    socks = listen(cfg.host, cfg.port)
    try:
        sidecar = Sidecar(cfg, loop)
    except BaseException:
        for sock in socks:
            sock.close()
        raise
    sidecar.start()
    listener = Listener(sidecar, socks)
    listener.start()
    stop = asyncio.Event()
    sidecar.on_failure = stop.set
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    announce(
        "dpu-daemon pid %d ns=%s listening on %s:%d (max %d connections, %d buffered bytes, "
        "%d per connection)",
        os.getpid(),
        cfg.namespace,
        cfg.host,
        cfg.port,
        sidecar.max_connections,
        cfg.max_buffered_bytes,
        cfg.connection_cap,
    )
    if ready is not None:
        ready()
    try:
        await stop.wait()
    finally:
        listener.close()
        sidecar.stop()
    announce("dpu-daemon pid %d stopped", os.getpid())
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
    except RuntimeError as exc:  # another dpu-daemon holds the namespace
        raise SystemExit(f"dpu-daemon: {exc}") from None
    except OSError as exc:
        raise SystemExit(f"dpu-daemon: cannot listen on {cfg.host}:{cfg.port}: {exc}") from None


if __name__ == "__main__":
    main()
