"""Locust load for DPUmesh bench: closed or open loop, µs histograms, two protocols.

Web UI (``python run_bench.py serve --mesh X --locust-ui`` starts it beside a
stack, with ``--class-picker`` and the stack's counters), or by hand::

    locust -f loadtests/locustfile.py --host http://127.0.0.1:5005

Either way the UI has a ``Mesh`` tab (`loadtests.webui`): the running test's
µs HDR percentiles and, given ``--mesh-status-url``, the stack's own counters.

Headless (what the runner does)::

    locust -f loadtests/locustfile.py --headless -u 8 -r 8 -t 30s \\
        --host http://127.0.0.1:5005 HttpMeshUser \\
        --open-loop-rate 200 --hdr-out run/lat.hdr

User classes (Locust's standard selection: name them after the options, or
``--class-picker`` in the UI):

* `HttpMeshUser`: `FastHttpUser` (HTTP/1.1 keep-alive, one connection per
  user) with TCP_NODELAY on every connection (`loadtests.nodelay`).
* `JsonMeshUser`: the seed's JSON protocol on the same port, a new
  connection per request (`loadtests.seedjson`).

When no class is named (and the class picker is off) only `HttpMeshUser`
runs; Locust's usual default would mix both protocols half and half.

Options (all also in the web UI, see `loadtests.options`): ``--request-mode
{get,trace}``, ``--trace-json``, ``--request-path``, ``--open-loop-rate R``
(0 = closed loop), ``--warmup-s``, ``--hdr-out PATH``,
``--request-id-prefix`` (and, not in the UI, ``--mesh-status-url``).

Load models:

* Closed loop (``--open-loop-rate 0``): each user sends its next request as
  soon as the previous one completed (``wait_time = constant(0)``).
* Open loop at R requests/s: slots at intended times ``t0 + i/R``; process
  ``w`` of ``P`` owns slots ``i = k*P + w`` and its free users take its slots
  in order (`loadtests.schedule`). Latency is measured from the intended send
  time when a send is late, so queueing behind a stalled server is recorded
  (no coordinated omission). Use at least as many users as the rate needs
  (U >= R x worst-case latency), ``-r`` = ``-u`` (spawn at once) or
  ``--warmup-s`` so the ramp is not measured, and U >= P.

Distributed runs (``--processes P`` or ``--master``/``--worker``): at each test
start the master numbers its connected workers 0..P-1 (in Locust's
``worker_index`` order) and sends each its ``(index, count)``, the test's
number and whether it wants the worker's histograms (it has a web UI) in a
custom message (``dpumesh_slots``, `loadtests.schedule.Assignment`, via
``runner.send_message``; workers listen with ``runner.register_message``
and check it). The message is sent before Locust's spawn messages on the
same connection, so a worker knows its slots when its ``test_start`` fires.
Without it (an older master, or a malformed message) a worker falls back to
``runner.worker_index`` of ``--expect-workers`` and logs a warning. Workers
that join mid-test are not re-assigned.

Measurement: every process (local runner or worker; never the master, which
runs no users) records µs latencies into an HdrHistogram
(`loadtests.recorder`), successes only, failures counted separately; at
test stop it writes ``--hdr-out`` (worker ``N`` writes ``<stem>.wN<suffix>``)
and a ``.json`` sidecar. Merge them with `loadtests.latency.load_run`.
Locust's own request events are fired too, with the same precise latency in
ms (float), so ``--csv`` and the UI charts stay available.

Step loads: add ``loadtests/step_shape.py`` as a second locustfile (see there).
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import sys
import time
import urllib.parse
from pathlib import Path
from typing import Any

_ROOT = Path(__file__).resolve().parents[1]
if str(_ROOT) not in sys.path:  # Locust imports this file by path, not as a package
    sys.path.insert(0, str(_ROOT))

import gevent  # noqa: E402
from locust import FastHttpUser, User, __version__, constant, events, task  # noqa: E402
from locust.contrib.fasthttp import LocustBadStatusCode  # noqa: E402
from locust.exception import StopUser  # noqa: E402
from locust.runners import MasterRunner, WorkerRunner  # noqa: E402

from loadtests import latency, meshstats, nodelay, seedjson, webui  # noqa: E402
from loadtests import options as opts  # noqa: E402
from loadtests.recorder import FAIL_CONNECTION, FAIL_STATUS, Recorder  # noqa: E402
from loadtests.schedule import (  # noqa: E402
    Assignment,
    Slot,
    SlotSchedule,
    WakeupBias,
    parse_assignment,
    reference_ns,
)

logger = logging.getLogger("loadtests")

SLOTS_MESSAGE = "dpumesh_slots"
NETWORK_TIMEOUT_S = 60.0
_clock = time.perf_counter_ns


class StatusError(Exception):
    """A response with status >= 400 (a failure in Locust's stats and ours)."""

    def __init__(self, status: int) -> None:
        super().__init__(f"HTTP {status}")
        self.status = status


class LoadState:
    """Per-process (per-`Environment`) schedule, recorder and options."""

    def __init__(self, environment: Any) -> None:
        self.environment = environment
        self.options = opts.LoadOptions()
        self.schedule = SlotSchedule()
        self.recorder = Recorder()
        self.bias = WakeupBias()
        self.assigned: Assignment | None = None
        # The master's number of the test: counted by a master, the recorder's test on a
        # worker (what its histogram reports name); None in a local runner.
        self.test: int | None = None
        self.report_hdr = False  # a worker sends its histogram to the master (Mesh tab)
        self.active = False
        self.error: str | None = None

    def slots(self) -> tuple[int, int]:
        runner = self.environment.runner
        if not isinstance(runner, WorkerRunner):
            return 0, 1
        if self.assigned is not None:
            return self.assigned.index, self.assigned.count
        po = self.environment.parsed_options
        index = max(int(getattr(runner, "worker_index", 0) or 0), 0)
        count = max(int(getattr(po, "expect_workers", 1) or 1), index + 1)
        logger.warning(
            "no slot assignment from the master: using worker_index %d of %d "
            "(open-loop rate split may be wrong)",
            index,
            count,
        )
        return index, count

    def begin(self) -> None:
        """Start a test: (re)read options, new schedule and recorder."""
        self.error = None
        try:
            self.options = opts.from_namespace(self.environment.parsed_options)
        except opts.OptionError as exc:
            self.error = str(exc)
            self.active = False
            raise
        index, count = self.slots()
        given = self.assigned
        self.test, self.report_hdr = (given.test, given.report) if given else (None, False)
        self.schedule = SlotSchedule(self.options.open_loop_rate, index, count)
        self.bias = WakeupBias()
        self.recorder.reset(
            intended_rate=self.options.open_loop_rate,
            warmup_s=self.options.warmup_s,
            mode="open" if self.options.open_loop else "closed",
            request_mode=self.options.request_mode,
            request_path=self.options.path,
            request_id_prefix=self.options.request_id_prefix,
            slot_index=index,
            slot_count=count,
            worker_index=self.worker_index(),
            host=self.environment.host,
            user_classes=sorted(u.__name__ for u in self.environment.user_classes),
            locust_version=__version__,
        )
        self.active = True

    def worker_index(self) -> int | None:
        runner = self.environment.runner
        if isinstance(runner, WorkerRunner):
            idx = getattr(runner, "worker_index", -1)
            return idx if idx is not None and idx >= 0 else None
        return None

    def out_path(self) -> Path | None:
        if not self.options.hdr_out:
            return None
        if isinstance(self.environment.runner, WorkerRunner):
            idx = self.worker_index()
            suffix_index = idx if idx is not None else self.schedule.index
            return latency.worker_path(self.options.hdr_out, suffix_index)
        return Path(self.options.hdr_out)

    def finish(self) -> None:
        """End of a test: write the histogram (if asked) and log a µs summary."""
        if not self.active:
            return
        self.active = False
        self.assigned = None
        rec = self.recorder
        summary = latency.summarize(rec.hist)
        logger.info(
            "µs latency (this process, %s loop): n=%d mean=%.0f p50=%d p90=%d p99=%d "
            "p99.9=%d max=%d; failures=%d; in flight at stop=%d",
            "open" if self.options.open_loop else "closed",
            summary.count,
            summary.mean_us,
            summary.p50_us,
            summary.p90_us,
            summary.p99_us,
            summary.p999_us,
            summary.max_us,
            rec.failures,
            rec.started_total - rec.completed_total,
        )
        if self.options.open_loop:
            side = rec.summary()
            lag = side["send_lag_us"]
            logger.info(
                "open loop: offered %.1f rps (this process %.1f), achieved %.1f rps; "
                "send lag p50=%d p99=%d max=%d µs",
                self.options.open_loop_rate,
                self.options.open_loop_rate / self.schedule.count,
                side["achieved_rps"],
                lag["p50"],
                lag["p99"],
                lag["max"],
            )
            if lag["p99"] > 10_000:
                logger.warning(
                    "requests left late (p99 send lag %.1f ms): every user was busy (a slow or "
                    "stalled server, or too few users) or the generator's CPU was saturated; "
                    "the queueing is included in the latencies",
                    lag["p99"] / 1000,
                )
        path = self.out_path()
        if path is not None:
            hist_path, side_path = rec.write(path)
            logger.info("wrote %s and %s", hist_path, side_path)


def state(environment: Any) -> LoadState:
    """This process's `LoadState` (created on first use)."""
    st = getattr(environment, "_dpumesh_load", None)
    if st is None:
        st = LoadState(environment)
        environment._dpumesh_load = st
    return st


def _active_state(environment: Any) -> LoadState:
    st = state(environment)
    if not st.active and st.error is None:
        with contextlib.suppress(opts.OptionError):  # sets st.error
            st.begin()  # a bare Environment (no runner events), e.g. in tests
    if st.error is not None:
        raise StopUser()
    return st


# --- Locust events ------------------------------------------------------------


@events.init_command_line_parser.add_listener
def _add_options(parser: Any, **_: Any) -> None:
    opts.add_arguments(parser)


@events.init.add_listener
def _on_init(environment: Any, runner: Any = None, web_ui: Any = None, **_: Any) -> None:
    try:
        options = opts.from_namespace(environment.parsed_options)
    except opts.OptionError as exc:
        logger.error("%s", exc)
        sys.exit(2)
    st = state(environment)
    st.options = options  # what a test would use, shown before the first one
    if isinstance(runner, WorkerRunner):
        runner.register_message(SLOTS_MESSAGE, _on_slots_message)
        environment.events.report_to_master.add_listener(functools.partial(_report, environment))
    else:
        _default_user_class(environment)
    if web_ui is not None:
        webui.install(environment, st)


def _default_user_class(environment: Any) -> None:
    """With no class named and no class picker, run `HttpMeshUser` only."""
    po = environment.parsed_options
    if po is None or getattr(po, "user_classes", None) or getattr(po, "class_picker", False):
        return
    classes = environment.user_classes
    if HttpMeshUser in classes and JsonMeshUser in classes:
        classes[:] = [c for c in classes if c is not JsonMeshUser]
        logger.info(
            "no user class named: running HttpMeshUser only "
            "(name JsonMeshUser for the seed JSON protocol, or both to mix them)"
        )


def _on_slots_message(environment: Any, msg: Any, **_: Any) -> None:
    try:
        assigned = parse_assignment(msg.data)
    except ValueError as exc:
        logger.error("ignoring the master's %s message: %s", SLOTS_MESSAGE, exc)
        return
    state(environment).assigned = assigned
    logger.debug("open-loop slots: index %s of %s", assigned.index, assigned.count)


def _report(environment: Any, data: dict[str, Any], **_: Any) -> None:
    """A worker's stats message carries its histogram when the master asked for it."""
    st = state(environment)
    if st.report_hdr and st.test is not None:
        rec = st.recorder
        data[meshstats.REPORT_KEY] = meshstats.report_of(st.test, rec.hist, rec.failures)


@events.test_start.add_listener
def _on_test_start(environment: Any, **_: Any) -> None:
    runner = environment.runner
    if isinstance(runner, MasterRunner):
        _assign_slots(environment, runner)
        return
    try:
        state(environment).begin()
    except opts.OptionError as exc:
        logger.error("invalid load options, stopping the test: %s", exc)
        if runner is not None and not isinstance(runner, WorkerRunner):
            gevent.spawn(runner.stop)


def _assign_slots(environment: Any, runner: MasterRunner) -> None:
    try:
        options = opts.from_namespace(environment.parsed_options)
    except opts.OptionError as exc:
        logger.error("invalid load options, stopping the test: %s", exc)
        gevent.spawn(runner.stop)
        return
    st = state(environment)
    st.options = options
    st.test = 0 if st.test is None else st.test + 1
    workers = runner.clients.ready + runner.clients.spawning + runner.clients.running
    workers.sort(key=lambda w: runner.get_worker_index(w.id))
    report = environment.web_ui is not None  # only the Mesh tab reads workers' histograms
    for k, worker in enumerate(workers):
        message = Assignment(k, len(workers), st.test, report).as_message()
        runner.send_message(SLOTS_MESSAGE, message, client_id=worker.id)
    if options.open_loop and 0 < (runner.target_user_count or 0) < len(workers):
        logger.warning(
            "open loop with %d users on %d workers: workers without users leave their "
            "share of the rate unsent; use at least one user per worker",
            runner.target_user_count,
            len(workers),
        )


@events.test_stop.add_listener
def _on_test_stop(environment: Any, **_: Any) -> None:
    if isinstance(environment.runner, MasterRunner):
        return
    state(environment).finish()


@events.quitting.add_listener
def _on_quitting(environment: Any, **_: Any) -> None:
    if isinstance(environment.runner, MasterRunner):
        return
    state(environment).finish()  # no-op when test_stop already wrote


# --- users --------------------------------------------------------------------


def _take_slot(st: LoadState) -> Slot:
    """The next slot; in open loop, sleep until (about) its intended time."""
    slot = st.schedule.next_slot()
    st.recorder.set_origin(st.schedule.t0_ns or 0)
    if slot.intended_ns is not None:
        now = _clock()
        delay = st.bias.sleep_s(slot.intended_ns, now)
        if delay > 0:
            gevent.sleep(delay)
            st.bias.observe(delay, now, _clock())
    return slot


def _request_headers(o: opts.LoadOptions, seq: int) -> dict[str, str]:
    headers = {"x-request-id": f"{o.request_id_prefix}{seq}"}
    if o.method == "POST":
        headers["content-type"] = "application/json"
    return headers


class HttpMeshUser(FastHttpUser):
    """HTTP/1.1 keep-alive user (geventhttpclient) with TCP_NODELAY."""

    wait_time = constant(0)
    max_retries = 0  # a retry would hide a failure and double-count at the server
    network_timeout = NETWORK_TIMEOUT_S
    connection_timeout = NETWORK_TIMEOUT_S

    def __init__(self, environment: Any) -> None:
        super().__init__(environment)
        nodelay.install(self.client)

    @task
    def request(self) -> None:
        st = _active_state(self.environment)
        o = st.options
        slot = _take_slot(st)
        headers = _request_headers(o, slot.seq)
        send = _clock()
        ref = reference_ns(slot.intended_ns, send)
        st.recorder.sent(slot.intended_ns, send)
        resp = self.client.request(
            o.method,
            o.path,
            data=o.body or None,
            headers=headers,
            name=o.path,
            catch_response=True,
        )
        done = _clock()
        kind, exc = _http_outcome(resp)
        with resp:
            resp.request_meta["response_time"] = (done - ref) / 1e6
            if exc is None:
                resp.success()
            else:
                resp.failure(exc)
        st.recorder.done(ref, send, done, kind, getattr(exc, "status", 0))


def _http_outcome(resp: Any) -> tuple[str | None, Exception | None]:
    """(failure kind, exception) of a FastHttpSession response; (None, None) on success."""
    error = getattr(resp, "error", None)
    try:
        status = int(resp.status_code or 0)
    except Exception:  # an ErrorResponse wrapped by catch_response has no status
        status = 0
    if status >= 400:
        return FAIL_STATUS, StatusError(status)
    meta_exc = resp.request_meta.get("exception")
    if isinstance(error, LocustBadStatusCode):
        error = None  # e.g. 3xx outside Locust's list: not a failure by our rule
    if isinstance(meta_exc, LocustBadStatusCode):
        meta_exc = None
    if status == 0 or error is not None or meta_exc is not None:
        return FAIL_CONNECTION, error or meta_exc or ConnectionError("no response")
    return None, None


class JsonMeshUser(User):
    """The seed's JSON protocol on the mesh port, a new connection per request."""

    wait_time = constant(0)

    def __init__(self, environment: Any) -> None:
        super().__init__(environment)
        host = self.host or ""
        if "://" not in host:
            host = "tcp://" + host
        parts = urllib.parse.urlsplit(host)
        if not parts.hostname:
            raise ValueError(f"JsonMeshUser needs --host HOST:PORT (got {self.host!r})")
        self.target = (parts.hostname, parts.port or 80)

    @task
    def request(self) -> None:
        st = _active_state(self.environment)
        o = st.options
        slot = _take_slot(st)
        payload = seedjson.encode_request(
            o.method, o.path, _request_headers(o, slot.seq), o.body.decode("utf-8")
        )
        start_wall = time.time()
        send = _clock()
        ref = reference_ns(slot.intended_ns, send)
        st.recorder.sent(slot.intended_ns, send)
        reply: dict[str, Any] | None = None
        exc: Exception | None = None
        kind: str | None = None
        try:
            reply = seedjson.exchange(*self.target, payload, timeout_s=NETWORK_TIMEOUT_S)
        except (OSError, seedjson.ProtocolError) as e:
            exc, kind = e, FAIL_CONNECTION
        done = _clock()
        length = 0
        if reply is not None:
            body = reply.get("body")
            length = len(body) if isinstance(body, str) else len(json.dumps(body))
            if reply["status"] >= 400:
                exc, kind = StatusError(reply["status"]), FAIL_STATUS
        self.environment.events.request.fire(
            request_type=f"JSON-{o.method}",
            name=o.path,
            response_time=(done - ref) / 1e6,
            response_length=length,
            exception=exc,
            context=self.context(),
            response=reply,
            url=f"tcp://{self.target[0]}:{self.target[1]}{o.path}",
            start_time=start_wall,
        )
        st.recorder.done(ref, send, done, kind, getattr(exc, "status", 0))
