"""``run_bench.py serve --locust-ui``: a stack and Locust's web UI beside it, stopped together.

`serve` is `harness.deploy.local.serve` with a `LocustUI` beside the stack:

1. a status endpoint on 127.0.0.1 (an ephemeral port, `StatusServer`):
   ``GET /traffic`` answers the stack's counters since it became ready
   (`RunningStack.traffic`, its `loadtests.counters.MESH_FIELDS`), or 503
   with ``{"error": ...}`` while they cannot be read;
2. Locust's web UI as a subprocess (`locust_ui_argv`): the locustfile and the
   events plugin (`harness.run.loadgen.locust_command`), ``--web-host
   127.0.0.1``, ``--host`` the stack's URL, ``--class-picker``, start-form
   defaults ``-u``/``-r`` of an open-loop level, ``--mesh-status-url`` the
   endpoint above (the Mesh tab's counters, `loadtests.webui`); on the
   loadgen CPU set, in its own session, logging to ``<run dir>/locust.log``,
   its events to ``<run dir>/locust.events.jsonl`` (a record of every test
   started from the UI);
3. once the UI answers, one line ``locust web UI at http://127.0.0.1:N``
   (with nodes, the client namespace's address) after the stack's ``ready``
   line.

With nodes (`--nodes`, DESIGN §8) Locust runs in the nodes' client namespace
(`LocalStack.client_argv`) and its UI listens on the client's address, the
status endpoint on the harness's address on the nodes' bridge; both URLs are
reachable from this machine.

SIGINT or SIGTERM stops Locust's session, the status endpoint, then the
stack. A Locust that exits while serving ends the serve too: the stack is
stopped and `LocustUIError` (a `StartError`: ``run_bench.py`` prints it in
one line and exits 1) names its exit status and log.
"""

from __future__ import annotations

import http.client
import json
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from harness.deploy import local
from harness.measure.accounting import Traffic
from harness.ports import port_is_free
from harness.procs import StartError, http_ok, log_tail
from harness.run.loadgen import locust_command, spawn_locust, stop_session
from harness.run.plan import OPEN_LOOP_MIN_USERS
from harness.stacks.model import StackDescription
from loadtests.counters import MESH_FIELDS

LOOPBACK = "127.0.0.1"
STATUS_PATH = "/traffic"
LOCUST_START_TIMEOUT_S = 60.0
_UI_POLL_S = 0.1


class LocustUIError(StartError):
    """Locust's web UI did not come up, or exited while the stack was served."""


class StatusServer:
    """``GET /traffic`` on `address` (ephemeral port): the stack's counters, as JSON.

    127.0.0.1, or with nodes the harness's address on the nodes' bridge, which the
    client namespace Locust runs in reaches."""

    def __init__(self, read: Callable[[], Traffic], address: str = LOOPBACK) -> None:
        self.server = ThreadingHTTPServer((address, 0), _status_handler(read))
        self.server.daemon_threads = True
        self.url = f"http://{address}:{self.server.server_address[1]}{STATUS_PATH}"
        self.thread = threading.Thread(
            target=self.server.serve_forever, name="mesh-status", daemon=True
        )
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join()


def _status_handler(read: Callable[[], Traffic]) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if self.path != STATUS_PATH:
                self._reply(404, {"error": f"only {STATUS_PATH}"})
                return
            try:
                traffic = read()
            except (OSError, RuntimeError, ValueError, http.client.HTTPException) as exc:
                self._reply(503, {"error": f"stack counters unreadable: {exc}"})
                return
            self._reply(200, {k: traffic[k] for k in MESH_FIELDS})

        def _reply(self, status: int, doc: dict[str, Any]) -> None:
            body = json.dumps(doc).encode()
            self.send_response(status)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            """Silent: the UI polls every 2 s; a line each would bury the serve's console."""

    return Handler


def locust_ui_argv(
    url: str, web_host: str, web_port: int, status_url: str, events_out: Path
) -> list[str]:
    """Locust's web UI against the stack at `url`, with the Mesh tab's counters at `status_url`."""
    users = str(OPEN_LOOP_MIN_USERS)  # the start form's defaults: an open-loop level's users
    return [
        *locust_command(events_out),
        *("--web-host", web_host, "--web-port", str(web_port)),
        *("--host", url, "--class-picker", "-u", users, "-r", users),
        *("--mesh-status-url", status_url),
    ]


class LocustUI:
    """Locust's web UI beside a served stack (a `harness.deploy.local.Beside`)."""

    def __init__(
        self,
        stack: local.LocalStack,
        stop: threading.Event,
        *,
        port: int,
        cpus: frozenset[int] | None,
    ) -> None:
        self.stack, self.stop, self.port, self.cpus = stack, stop, port, cpus
        self.url = f"http://{stack.client_address}:{port}"
        self.log_path = stack.run_dir / "locust.log"
        self.exit_status: int | None = None  # set when Locust exited on its own
        self._closing = threading.Event()

    def __enter__(self) -> LocustUI:
        on_host = self.stack.client_address == LOOPBACK  # else in the client's namespace
        if on_host and not port_is_free(self.port):
            raise LocustUIError(f"Locust web UI: port {self.port} is already in use")
        self.status = StatusServer(self.stack.traffic, self.stack.harness_address)
        try:
            argv = locust_ui_argv(
                self.stack.url,
                self.stack.client_address,
                self.port,
                self.status.url,
                self.stack.run_dir / "locust.events.jsonl",
            )
            self.popen = spawn_locust(argv, self.log_path, self.cpus, self.stack.client_argv)
        except BaseException:
            self.status.close()
            raise
        try:
            self._wait_answering()
        except BaseException:
            self._close()
            raise
        self.watcher = threading.Thread(target=self._watch, name="locust-ui-watch", daemon=True)
        self.watcher.start()
        if not self.stop.is_set():
            print(f"locust web UI at {self.url}", flush=True)
        return self

    def _wait_answering(self) -> None:
        """Until the UI answers 200, Locust exits (`LocustUIError`) or a signal stops the serve."""
        answers = http_ok(self.url + "/")
        deadline = time.monotonic() + LOCUST_START_TIMEOUT_S
        while not self.stop.is_set() and not answers():
            code = self.popen.poll()
            if code is not None:
                raise LocustUIError(
                    f"Locust ended ({_how(code)}) before its web UI answered; {self.log_path}:\n"
                    + log_tail(self.log_path)
                )
            if time.monotonic() > deadline:
                raise LocustUIError(f"Locust's web UI did not answer at {self.url}")
            self.stop.wait(_UI_POLL_S)  # a signal ends the wait at once

    def _watch(self) -> None:
        code = self.popen.wait()
        if not self._closing.is_set():
            self.exit_status = code
            self.stop.set()

    def _close(self) -> None:
        self._closing.set()
        stop_session(self.popen)
        self.status.close()

    def __exit__(self, *_exc: object) -> None:
        self._close()
        self.watcher.join()
        if self.exit_status is not None:
            raise LocustUIError(
                f"Locust's web UI ended ({_how(self.exit_status)}) while serving; "
                f"its log: {self.log_path}"
            )


def _how(returncode: int) -> str:
    """A `Popen.returncode` in words."""
    return f"signal {-returncode}" if returncode < 0 else f"exit code {returncode}"


def serve(desc: StackDescription, *, locust_port: int, **options: Any) -> None:
    """Serve `desc` (`harness.deploy.local.start`'s `options`) with Locust's web UI on
    port `locust_port` of the load generator's node (127.0.0.1 without nodes), until
    SIGINT/SIGTERM or Locust's exit."""
    placement = options.get("placement")
    cpus = placement.cpus("loadgen") if placement is not None else None

    def beside(stack: local.LocalStack, stop: threading.Event) -> LocustUI:
        return LocustUI(stack, stop, port=locust_port, cpus=cpus)

    local.serve(desc, beside=beside, **options)
