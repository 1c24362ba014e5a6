"""One DPUmesh worker process: the event loop that runs execution graphs.

The loop sleeps on a single doorbell semaphore. Two kinds of events ring it:
entries arriving on this worker's `worker_sq` (ingress requests, replies to
our egress calls) and completions posted by the thread pool (Flask handlers,
InternalSteps). The Flask handler only *builds* a graph; the loop then drives
the pure `GraphRun` state machine: EGRESS actions go out through
`worker_cq`, INTERNAL actions go to the pool, DONE answers the request. No
thread ever blocks waiting for a downstream service, and every request has a
deadline after which it is answered 504 and its state freed.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from dpumesh import registry, ring, wire
from dpumesh.context import ExecutionContext, bind_context
from dpumesh.graph import (
    DoneAction,
    EgressAction,
    GraphError,
    GraphRun,
    InternalAction,
    StepResult,
)
from dpumesh.wsgi import WsgiApp, build_environ, call_app

log = logging.getLogger("dpumesh.worker")

IDLE_WAKE_S = 1.0
CQ_PUSH_TIMEOUT_S = 1.0
_current: WorkerRuntime | None = None


def current_runtime() -> WorkerRuntime | None:
    """The runtime of this process, if it is a DPUmesh worker."""
    return _current


@dataclass(slots=True)
class _Request:
    """State of one ingress request while its handler and graph run."""

    req_id: int
    deadline_ns: int
    msg: wire.Message
    run: GraphRun | None = None
    egress_ids: set[int] = field(default_factory=set)
    finished: bool = False


@dataclass(slots=True)
class BlockingCall:
    """An egress call made by `dpumesh.requests` from a pool thread."""

    event: threading.Event = field(default_factory=threading.Event)
    result: StepResult | None = None


def _text(body: bytes) -> str:
    return body.decode("utf-8", errors="surrogateescape")


def _bytes(body: str | bytes | None) -> bytes:
    if body is None:
        return b""
    if isinstance(body, bytes):
        return body
    return body.encode("utf-8", errors="surrogateescape")


def _header_list(headers) -> list[tuple[str, str]]:
    if not headers:
        return []
    items = headers.items() if hasattr(headers, "items") else headers
    return [(str(k), str(v)) for k, v in items]


class WorkerRuntime:
    """The event loop of one worker process of service `service`."""

    def __init__(
        self,
        app: WsgiApp,
        service: str,
        namespace: str,
        *,
        threads: int = 16,
        deadline_s: float = 30.0,
        environ_extra: dict | None = None,
    ) -> None:
        self.app = app
        self.service = service
        self.deadline_ns = int(deadline_s * 1e9)
        self.failure: str | None = None  # why this worker left on its own (then it exits 1)
        self.endpoint = registry.WorkerEndpoint(namespace, service, on_lost=self._on_lost)
        self.bell = self.endpoint.bell
        self.sq = self.endpoint.worker_sq
        self.cq = self.endpoint.worker_cq
        self.pool = ThreadPoolExecutor(threads, thread_name_prefix=f"{service}-pool")
        self.completions: deque[Callable[[], None]] = deque()
        self.requests: dict[int, _Request] = {}
        self.egress: dict[int, tuple[_Request | BlockingCall, str, int]] = {}
        self.deadlines: list[tuple[int, int]] = []
        self._egress_ids = itertools.count(1)
        self._stopping = threading.Event()
        self._loop_thread: threading.Thread | None = None
        self._environ_extra = environ_extra or {}

    # ---- cross-thread entry points ---------------------------------------------------

    def post(self, fn: Callable[[], None]) -> None:
        """Run `fn` on the loop thread soon (callable from any thread)."""
        self.completions.append(fn)
        self.bell.ring()

    def stop(self) -> None:
        """Ask the loop to finish (callable from a signal handler)."""
        self._stopping.set()
        self.bell.ring()

    def _on_lost(self) -> None:
        # Our slot was reaped while we stalled: the daemons have dropped our queues, so
        # leave; the supervisor (dpumesh.server) starts a fresh worker in our place.
        self.failure = "registry slot reaped after a stall"
        self.stop()

    def on_loop_thread(self) -> bool:
        """True when called from the event loop itself."""
        return threading.current_thread() is self._loop_thread

    # ---- the loop ------------------------------------------------------------------------

    def run_forever(self) -> None:
        """Serve until `stop()`; then release the registry slot and the queues."""
        global _current
        _current = self
        self._loop_thread = threading.current_thread()
        pop = self.sq.pop
        completions = self.completions
        try:
            while not self._stopping.is_set():
                self.bell.wait(self._wait_timeout())
                handled = 0
                while completions:
                    completions.popleft()()
                    handled += 1
                while True:
                    try:
                        entry = pop()
                    except ring.BadEntry as exc:  # one entry lost (its buffer vanished)
                        log.warning("dropping an entry of worker_sq: %s", exc)
                        handled += 1
                        continue
                    except ring.RingCorrupt as exc:
                        self.failure = f"worker_sq corrupt: {exc}"
                        break
                    if entry is None:
                        break
                    self._on_entry(*entry)
                    handled += 1
                if self.failure is not None:
                    log.error("%s; leaving", self.failure)
                    break
                if handled > 1:
                    # One token per event was posted; we used one to wake. Skip the
                    # wake-ups the others would cause (the count never drops below
                    # the number of unhandled events).
                    self.bell.absorb(handled - 1)
                if self.deadlines:
                    self._expire_due()
        finally:
            _current = None
            self.pool.shutdown(wait=False, cancel_futures=True)
            self.endpoint.close()

    def _wait_timeout(self) -> float:
        if not self.deadlines:
            return IDLE_WAKE_S
        return max(0.0, min(IDLE_WAKE_S, (self.deadlines[0][0] - time.monotonic_ns()) / 1e9))

    def _on_entry(self, route: int, flags: int, payload: bytes) -> None:
        try:
            msg = wire.decode(payload)
        except wire.WireError as exc:
            log.warning("dropping corrupt entry: %s", exc)
            return
        if msg.kind == wire.REQUEST:
            self._on_ingress(msg)
        else:
            self._on_egress_reply(msg)

    # ---- ingress ---------------------------------------------------------------------------

    def _on_ingress(self, msg: wire.Message) -> None:
        deadline = msg.deadline_ns or time.monotonic_ns() + self.deadline_ns
        req = _Request(req_id=msg.req_id, deadline_ns=deadline, msg=msg)
        self.requests[msg.req_id] = req
        heapq.heappush(self.deadlines, (deadline, msg.req_id))
        self.pool.submit(self._run_handler, req)

    def _run_handler(self, req: _Request) -> None:
        """Pool thread: call the Flask app with a fresh execution context bound."""
        msg = req.msg
        ctx = ExecutionContext(
            method=msg.method,
            path=msg.target.partition("?")[0],
            headers=dict(msg.headers),
            body=msg.body,
            request_id=msg.header("x-request-id"),
        )
        environ = build_environ(
            msg.method, msg.target, msg.headers, msg.body, extra=self._environ_extra
        )
        try:
            with bind_context(ctx):
                reply = call_app(self.app, environ)
        except Exception as exc:  # the app itself crashed: 500, never a lost request
            log.exception("handler of %s failed", self.service)
            reply = (500, [("content-type", "text/plain")], f"handler error: {exc}".encode())
        self.post(lambda: self._on_handler_done(req, ctx, reply))

    def _on_handler_done(self, req: _Request, ctx: ExecutionContext, reply) -> None:
        if req.finished:
            return
        try:
            graph = ctx.build_graph()
            if graph is None:
                self._answer(req, *reply)
                return
            req.run = GraphRun(graph)
            actions = req.run.start()
        except GraphError as exc:
            self._answer(req, 500, [("content-type", "text/plain")], f"graph error: {exc}".encode())
            return
        self._perform(req, actions)

    # ---- graph actions ---------------------------------------------------------------------

    def _perform(self, req: _Request, actions: list) -> None:
        for action in actions:
            if isinstance(action, EgressAction):
                self._send_egress(req, action)
            elif isinstance(action, InternalAction):
                self.pool.submit(self._run_internal, req, action)
            elif isinstance(action, DoneAction):
                result = action.result
                self._answer(
                    req, result.status_code, _header_list(result.headers), _bytes(result.body)
                )

    def _send_egress(self, req: _Request, action: EgressAction) -> None:
        eid = next(self._egress_ids)
        msg = wire.Message(
            kind=wire.REQUEST,
            req_id=eid,
            method=action.method,
            target=action.url,
            headers=_header_list(action.headers),
            body=_bytes(action.body),
            deadline_ns=req.deadline_ns,
        )
        self.egress[eid] = (req, action.step_id, action.seq)
        req.egress_ids.add(eid)
        error = self._push(msg)
        if error is not None:
            self._on_egress_reply(
                wire.Message(kind=wire.RESPONSE, req_id=eid, status=error[0], body=error[1])
            )

    def _run_internal(self, req: _Request, action: InternalAction) -> None:
        """Pool thread: run one InternalStep; exceptions are results too."""
        try:
            value = action.func(*action.args, **action.kwargs)
        except Exception as exc:
            value = exc
        self.post(lambda: self._on_internal_done(req, action.step_id, value))

    def _on_internal_done(self, req: _Request, step_id: str, value) -> None:
        if req.finished or req.run is None:
            return
        self._perform(req, req.run.on_internal_done(step_id, value))

    def _on_egress_reply(self, msg: wire.Message) -> None:
        entry = self.egress.pop(msg.req_id, None)
        if entry is None:
            return  # a late reply for a request that already finished
        owner, step_id, seq = entry
        result = StepResult(status_code=msg.status, headers=dict(msg.headers), body=_text(msg.body))
        if isinstance(owner, BlockingCall):
            owner.result = result
            owner.event.set()
            return
        owner.egress_ids.discard(msg.req_id)
        if owner.finished or owner.run is None:
            return
        self._perform(owner, owner.run.on_egress_response(step_id, seq, result))

    # ---- answers and deadlines -------------------------------------------------------------

    def _answer(self, req: _Request, status: int, headers, body: bytes) -> None:
        if req.finished:
            return
        req.finished = True
        self.requests.pop(req.req_id, None)
        for eid in req.egress_ids:
            self.egress.pop(eid, None)
        req.egress_ids.clear()
        msg = wire.Message(
            kind=wire.RESPONSE, req_id=req.req_id, status=status, headers=headers, body=body
        )
        error = self._push(msg)
        if error is not None:
            log.warning("could not answer request %d: %s", req.req_id, error[1])

    def _push(self, msg: wire.Message) -> tuple[int, bytes] | None:
        """Send on worker_cq; returns (status, reason) if the mesh refused it."""
        try:
            self.cq.push(wire.encode(msg), timeout=CQ_PUSH_TIMEOUT_S)
        except ring.PayloadTooLarge as exc:
            return 413, str(exc).encode()
        except ring.RingFull:
            return 503, b"worker_cq full"
        except wire.WireError as exc:
            return 400, str(exc).encode()
        return None

    def _expire_due(self) -> None:
        now = time.monotonic_ns()
        while self.deadlines and self.deadlines[0][0] <= now:
            _, req_id = heapq.heappop(self.deadlines)
            req = self.requests.get(req_id)
            if req is None or req.finished:
                continue
            if req.run is not None:
                self._perform(req, req.run.expire())
            if not req.finished:
                self._answer(req, 504, [("content-type", "text/plain")], b"deadline passed")

    # ---- blocking egress for dpumesh.requests ------------------------------------------------

    def call_blocking(
        self,
        method: str,
        url: str,
        headers: list[tuple[str, str]],
        body: bytes,
        timeout_s: float,
    ) -> StepResult | None:
        """Send one egress request from a pool thread and wait for its reply (None: timeout)."""
        if self.on_loop_thread():
            raise RuntimeError("dpumesh.requests cannot be used on the worker's event loop")
        call = BlockingCall()
        deadline_ns = time.monotonic_ns() + int(timeout_s * 1e9)
        eid = next(self._egress_ids)

        def send() -> None:
            self.egress[eid] = (call, "", 0)
            msg = wire.Message(
                kind=wire.REQUEST,
                req_id=eid,
                method=method,
                target=url,
                headers=headers,
                body=body,
                deadline_ns=deadline_ns,
            )
            error = self._push(msg)
            if error is not None:
                self._on_egress_reply(
                    wire.Message(kind=wire.RESPONSE, req_id=eid, status=error[0], body=error[1])
                )

        self.post(send)
        if not call.event.wait(timeout_s):
            self.post(lambda: self.egress.pop(eid, None))
            return None
        return call.result
