"""Plain-HTTP runtime of the μBench cell, for the Envoy and no-mesh stacks.

A Flask app served by gunicorn (gthread workers, app preloaded so the shared
counters exist before the fork). Each request: the cell core plans it
(`mubench.cell`), the internal function runs in the request thread, then the
call groups run in parallel (the request thread takes the first group, a
per-process thread pool the rest), calls inside a group one after another over
keep-alive connections (one `urllib3.PoolManager` per process). The first
failing call of a group ends that group (like an `order` in the DPUmesh graph)
and the request answers 500.

Where calls go: `--egress-proxy URL` sends every call to that URL with `Host:
<callee id>` (an Envoy sidecar's outbound listener routes by Host);
`--upstream SVC=URL` sends calls for SVC to URL (given several times for one
SVC: round robin over its URLs, per worker process); otherwise
`http://<callee id><path>` (service ids as DNS names, e.g. Docker Compose).

`GET /_mubench/stats` sums the counters of all worker processes (`calls`: the
downstream calls per callee, `downstream_calls` their sum);
`GET /_mubench/health` answers 200 once a worker is serving.
"""

from __future__ import annotations

import argparse
import ctypes
import itertools
import logging
import mmap
import multiprocessing
import os
import sys
import threading
from collections.abc import Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, NoReturn

import urllib3
from flask import Flask, Response, jsonify, request
from gunicorn.app.base import BaseApplication

from mubench.cell import Call, Cell, TraceError
from mubench.flask_glue import add_cell_routes, incoming_request
from mubench.internal import (
    FunctionsError,
    InternalFunction,
    check_functions,
    check_scale,
    custom_names,
    load_functions,
)
from mubench.workmodel import (
    DEFAULT_PER_SERVICE_CAP,
    DEFAULT_THREADS,
    DEFAULT_TOTAL_CAP,
    Workmodel,
    WorkmodelError,
    load_workmodel,
    plan_processes,
)

log = logging.getLogger("mubench.http_app")

STATS_PATH = "/_mubench/stats"
HEALTH_PATH = "/_mubench/health"
# Server keep-alive well above any client idle time in a run, so a client
# (Envoy, urllib3, Locust) never races the server closing an idle connection.
KEEPALIVE_S = 75
DOWNSTREAM_TIMEOUT = urllib3.Timeout(connect=5.0, read=120.0)
# Thread pool for parallel groups: a request may need (groups - 1) extra threads.
_MAX_GROUP_THREADS = 256
# Largest request body a cell reads (413 beyond): without it one request could make a
# worker buffer any amount. The same as the DPUmesh bridge's default
# (`dpumesh.ring.MAX_BODY`), so every stack refuses the same bodies. Flask is given one
# byte more: werkzeug cuts a chunked body at the limit instead of refusing it, so a body
# that reaches MAX_BODY + 1 bytes is known to be too large.
MAX_BODY = 8 * 1024 * 1024


class SharedCounters:
    """Request counters in anonymous shared memory, summed across forked workers.

    Created before gunicorn forks, so every worker maps the same pages. Each
    process writes only its own slot (under a thread lock), so a worker killed
    mid-update cannot wedge the others and workers never contend with each
    other per request; the cross-process lock guards only the one-time slot
    claim. A slot whose process died is taken over with its counts kept, so
    totals survive worker restarts. No files, no pickle. Calls are also
    counted per callee, one cell each: the callees are fixed at creation (the
    workmodel's services), so the memory is bounded.
    """

    FIELDS = ("requests", "errors", "downstream_calls")
    SLOTS = 256

    def __init__(self, callees: Iterable[str] = ()) -> None:
        self._callees = tuple(dict.fromkeys(callees))
        # A slot: owner pid, then FIELDS, then one call counter per callee.
        self._width = 1 + len(self.FIELDS) + len(self._callees)
        self._field_at = {name: 1 + i for i, name in enumerate(self.FIELDS)}
        self._call_at = {svc: 1 + len(self.FIELDS) + i for i, svc in enumerate(self._callees)}
        size = self._width * self.SLOTS
        self._mem = mmap.mmap(-1, 8 * size)
        self._cells = (ctypes.c_uint64 * size).from_buffer(self._mem)
        self._claim_lock = multiprocessing.get_context("fork").Lock()
        self._lock = threading.Lock()
        self._pid = -1
        self._base = 0

    def add(self, name: str) -> None:
        """Add one to counter `name` in this process's slot."""
        offset = self._field_at[name]
        with self._lock:
            if self._pid != os.getpid():
                self._claim()
            self._cells[self._base + offset] += 1

    def add_call(self, callee: str) -> None:
        """Count one downstream call to `callee` (also in `downstream_calls`), one lock."""
        total, mine = self._field_at["downstream_calls"], self._call_at[callee]
        with self._lock:
            if self._pid != os.getpid():
                self._claim()
            self._cells[self._base + total] += 1
            self._cells[self._base + mine] += 1

    def snapshot(self) -> dict[str, int | dict[str, int]]:
        """Every counter summed over all slots; `calls` holds the callees called at all."""
        cells, width = self._cells, self._width
        used = [slot * width for slot in range(self.SLOTS) if cells[slot * width] != 0]
        out: dict[str, int | dict[str, int]] = {
            name: sum(cells[base + at] for base in used) for name, at in self._field_at.items()
        }
        calls = {svc: sum(cells[base + at] for base in used) for svc, at in self._call_at.items()}
        out["calls"] = {svc: n for svc, n in calls.items() if n}
        return out

    def _claim(self) -> None:
        pid = os.getpid()
        width = self._width
        with self._claim_lock:
            owners = [self._cells[slot * width] for slot in range(self.SLOTS)]
            slot = next((n for n, owner in enumerate(owners) if owner == 0), None)
            if slot is None:
                slot = next((n for n, owner in enumerate(owners) if not _alive(owner)), None)
            if slot is None:
                raise RuntimeError(f"all {self.SLOTS} counter slots belong to live processes")
            self._cells[slot * width] = pid
        self._pid, self._base = pid, slot * width


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class Downstream:
    """Runs a plan's call groups over HTTP (groups in parallel, calls in order)."""

    def __init__(
        self,
        counters: SharedCounters,
        pool_size: int,
        upstreams: Mapping[str, Sequence[str]] | None = None,
        egress_proxy: str | None = None,
    ) -> None:
        self._counters = counters
        self._pool_size = pool_size
        # Round robin over a service's URLs. Copied by fork, so each worker process
        # rotates on its own; `next` on a cycle is one C call, atomic under the GIL.
        self._upstreams: dict[str, Iterator[str]] = {
            svc: itertools.cycle([url.rstrip("/") for url in urls])
            for svc, urls in (upstreams or {}).items()
            if urls
        }
        self._proxy = egress_proxy.rstrip("/") if egress_proxy else None
        # Sockets and threads do not survive fork: built lazily in each process.
        self._lock = threading.Lock()
        self._pid = -1
        self._http: urllib3.PoolManager
        self._executor: ThreadPoolExecutor

    def run(self, groups: Sequence[Sequence[Call]]) -> bool:
        """Execute every group; True when every call succeeded."""
        if not groups:
            return True
        self._ensure_process_state()
        first, *rest = groups
        futures = [self._executor.submit(self._run_group, g) for g in rest]
        results = [self._run_group(first)] + [f.result() for f in futures]
        return all(results)

    def target(self, call: Call) -> tuple[str, dict[str, str]]:
        """The URL and headers a call is sent with, after proxy/upstream mapping."""
        if self._proxy is not None:
            return self._proxy + call.path, {**call.headers, "host": call.service}
        urls = self._upstreams.get(call.service)
        if urls is not None:
            return next(urls) + call.path, call.headers
        return call.url, call.headers

    def _ensure_process_state(self) -> None:
        pid = os.getpid()
        if self._pid == pid:
            return
        with self._lock:
            if self._pid != pid:
                self._http = urllib3.PoolManager(
                    num_pools=64,
                    maxsize=self._pool_size,
                    retries=False,
                    timeout=DOWNSTREAM_TIMEOUT,
                )
                self._executor = ThreadPoolExecutor(
                    self._pool_size, thread_name_prefix="mubench-group"
                )
                self._pid = pid

    def _run_group(self, calls: Sequence[Call]) -> bool:
        return all(self._call(call) for call in calls)

    def _call(self, call: Call) -> bool:
        self._counters.add_call(call.service)
        url, headers = self.target(call)
        try:
            response = self._http.request(call.method, url, body=call.body, headers=headers)
        except urllib3.exceptions.HTTPError as e:
            log.warning("call to %s (%s) failed: %s", call.service, url, e)
            return False
        if response.status >= 400:
            log.warning("call to %s (%s) answered %d", call.service, url, response.status)
            return False
        return True


def create_app(
    workmodel: Workmodel,
    service_id: str,
    *,
    seed: int = 0,
    scale: float = 1.0,
    functions: Mapping[str, InternalFunction] | None = None,
    upstreams: Mapping[str, Sequence[str]] | None = None,
    egress_proxy: str | None = None,
    threads: int = 16,
) -> Flask:
    """The Flask app of one service; create it before forking workers."""
    cell = Cell(workmodel, service_id, seed)
    functions = functions if functions is not None else load_functions()
    check_functions(cell.service, functions)
    counters = SharedCounters(callees=workmodel)  # a trace may call any of its services
    max_groups = max(
        len(b.groups) for b in (cell.service.behavior, *cell.service.alternatives.values())
    )
    downstream = Downstream(
        counters,
        pool_size=min(_MAX_GROUP_THREADS, threads * max(1, max_groups)),
        upstreams=upstreams,
        egress_proxy=egress_proxy,
    )
    app = Flask(__name__)
    app.config["MAX_CONTENT_LENGTH"] = MAX_BODY + 1

    def handle() -> Response | tuple[Response, int]:
        counters.add("requests")
        if len(request.get_data()) > MAX_BODY:  # cached: incoming_request reads it again
            counters.add("errors")
            return jsonify(message=f"request body exceeds {MAX_BODY} bytes"), 413
        try:
            plan = cell.plan(incoming_request())
        except TraceError as e:
            counters.add("errors")
            return jsonify(message=f"bad trace: {e}"), 400
        try:
            body = functions[plan.function](plan.params, plan.rng, scale)
        except Exception:
            log.exception("internal service %s failed", plan.function)
            counters.add("errors")
            return jsonify(message="Error in internal service"), 500
        if not downstream.run(plan.groups):
            counters.add("errors")
            return jsonify(message="Error in external services request"), 500
        return Response(body, 200, headers=plan.headers, mimetype="text/plain")

    add_cell_routes(app, cell.service.path, handle)
    app.add_url_rule(
        STATS_PATH, "stats", lambda: jsonify(service=service_id, **counters.snapshot())
    )
    app.add_url_rule(HEALTH_PATH, "health", lambda: "ok")
    return app


class _Server(BaseApplication):
    """gunicorn run programmatically (its documented custom-application API)."""

    def __init__(self, app: Flask, options: Mapping[str, Any]) -> None:
        self.application = app
        self.options = dict(options)
        super().__init__()

    def load_config(self) -> None:
        for key, value in self.options.items():
            self.cfg.set(key, value)

    def load(self) -> Flask:
        return self.application


def serve(app: Flask, name: str, host: str, port: int, workers: int, threads: int) -> None:
    """Serve `app` with gunicorn until SIGINT/SIGTERM (gunicorn reaps its workers)."""
    _Server(
        app,
        {
            "bind": f"{host}:{port}",
            "workers": workers,
            "threads": threads,
            "worker_class": "gthread",
            "preload_app": True,
            "keepalive": KEEPALIVE_S,
            "graceful_timeout": 5,
            "accesslog": None,
            "errorlog": "-",
            "loglevel": "info",
            # The default control socket is one fixed path shared by every
            # gunicorn on the machine; dozens of cells would fight over it.
            "control_socket_disable": True,
            "proc_name": f"mubench-{name}",
        },
    ).run()


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _upstream(text: str) -> tuple[str, str]:
    service, sep, url = text.partition("=")
    if not sep or not service or not url.startswith(("http://", "https://")):
        raise argparse.ArgumentTypeError(f"expected SVC=http://HOST:PORT, got {text!r}")
    return service, url


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m mubench.http_app",
        description=(
            "Serve one μBench service (plain HTTP, gunicorn gthread) for the Envoy and "
            "no-mesh stacks. Answers GET/POST on the service's path and on '/', plus "
            f"{STATS_PATH} (JSON counters summed over workers) and {HEALTH_PATH}."
        ),
        epilog=(
            "Calls go to --egress-proxy if given, else to the --upstream of the callee, "
            "else to http://<callee id><callee path>. Requests carrying x-request-id make "
            "the same random choices in every stack for the same --seed."
        ),
    )
    parser.add_argument("--workmodel", required=True, metavar="PATH", help="workmodel.json")
    parser.add_argument("--service", required=True, metavar="ID", help="service id to serve")
    parser.add_argument("--host", default="127.0.0.1", help="bind address (default %(default)s)")
    parser.add_argument("--port", required=True, type=int, metavar="N", help="bind port")
    parser.add_argument(
        "--workers",
        type=_positive,
        metavar="W",
        help=(
            "worker processes (default: the workmodel's, capped at "
            f"{DEFAULT_PER_SERVICE_CAP} per service and {DEFAULT_TOTAL_CAP} in total)"
        ),
    )
    parser.add_argument(
        "--threads",
        type=_positive,
        metavar="T",
        help=f"threads per worker (default: the workmodel's, else {DEFAULT_THREADS})",
    )
    route = parser.add_mutually_exclusive_group()
    route.add_argument(
        "--egress-proxy",
        metavar="URL",
        help="send every call to URL with 'Host: <callee id>' (e.g. an Envoy sidecar)",
    )
    route.add_argument(
        "--upstream",
        action="append",
        type=_upstream,
        default=[],
        metavar="SVC=URL",
        help="send calls for SVC to URL, e.g. s1=http://127.0.0.1:9001 (repeatable; "
        "several for one SVC: round robin)",
    )
    parser.add_argument(
        "--seed", type=int, default=0, help="random seed shared by all stacks (default 0)"
    )
    parser.add_argument(
        "--scale",
        type=float,
        default=1.0,
        metavar="F",
        help="multiply pi computations and sleep times by F >= 0 (default 1; <1 for smoke tests)",
    )
    parser.add_argument(
        "--functions-dir",
        metavar="DIR",
        help="directory of μBench custom internal functions (*.py)",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    """CLI entry point; configuration errors exit 2 with one line on stderr."""
    parser = _parser()
    args = parser.parse_args(argv)

    def fail(message: str) -> NoReturn:
        parser.exit(2, f"error: {message}\n")

    try:
        check_scale(args.scale)
    except ValueError as e:
        fail(f"--scale {e}")
    try:
        functions = load_functions(args.functions_dir)
        workmodel = load_workmodel(args.workmodel, custom=custom_names(functions))
        if args.service not in workmodel:
            fail(f"{args.workmodel}: no service '{args.service}' (have: {', '.join(workmodel)})")
        check_functions(workmodel[args.service], functions, args.workmodel)
    except (WorkmodelError, FunctionsError) as e:
        fail(str(e))
    upstreams: dict[str, list[str]] = {}
    for service, url in args.upstream:
        upstreams.setdefault(service, []).append(url)
    unknown = sorted(set(upstreams) - set(workmodel))
    if unknown:
        fail(f"--upstream for services not in the workmodel: {', '.join(unknown)}")
    plan, warnings = plan_processes(workmodel)
    if args.workers is None:
        for line in warnings:
            if line.startswith(f"service '{args.service}'") or not line.startswith("service "):
                print(f"warning: {line}", file=sys.stderr)
    workers = args.workers or plan[args.service][0]
    threads = args.threads or plan[args.service][1]
    app = create_app(
        workmodel,
        args.service,
        seed=args.seed,
        scale=args.scale,
        functions=functions,
        upstreams=upstreams,
        egress_proxy=args.egress_proxy,
        threads=threads,
    )
    serve(app, args.service, args.host, args.port, workers, threads)


if __name__ == "__main__":
    main()
