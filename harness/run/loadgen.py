"""One headless Locust run as a subprocess, watched through Locust's own events.

The runner starts one `LocustRun` per load level (`loadtests/locustfile.py`
plus the `harness.run.locust_live` plugin), with ``-r`` = ``-u`` (all users at
once) and ``-t`` = excluded seconds + measured seconds. The plugin appends
Locust's events (``test_start``, a ``tick`` a second, ``test_stopping``,
``test_stop``, ``quitting``; each with Locust's live totals) to
``<csv prefix>.events.jsonl``; `EventsFile` reads the new complete lines, each
one checked (a malformed line is skipped and counted, never fatal). While
the run goes on:

* `live()` is the latest event's req/s and totals, for the progress display;
* `stopping()` says whether Locust fired ``test_stopping`` (``-t`` expired,
  its users are being stopped): the end of the CPU window.

Nothing depends on Locust's log wording; Locust's CSV statistics (full
history) are still written, as results artifacts under ``locust/``.

The process runs in its own session; `stop()` (and leaving the `with` block)
ends that session's processes (Locust's distributed workers included) if the
run has not ended by itself.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import subprocess
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import psutil

from harness.names import REPO
from harness.placement.launch import wrap_argv
from harness.procs import signals_deferred, spawn_session
from loadtests.options import USER_CLASS

LOCUSTFILE = REPO / "loadtests" / "locustfile.py"
LIVE_PLUGIN = Path(__file__).with_name("locust_live.py")
#: An events line longer than this is malformed (a real one is about 100 bytes).
MAX_EVENT_LINE_BYTES = 4096
#: At most this much of the events file is read per call (many seconds of events).
MAX_EVENTS_READ_BYTES = 1 << 20
#: The events file's events (`harness.run.locust_live` writes them), in Locust's order;
#: ``tick`` is the plugin's own, every other one is the Locust event of that name.
EVENTS = ("test_start", "tick", "test_stopping", "test_stop", "quitting")
#: Locust's events that mean its users are being (or have been) stopped.
STOPPING_EVENTS = frozenset({"test_stopping", "test_stop", "quitting"})


@dataclass(frozen=True)
class LocustSpec:
    """The parameters of one Locust run (rate None = closed loop)."""

    host: str
    users: int
    rate: float | None
    excluded_s: int
    measured_s: int
    hdr_out: Path
    csv_prefix: Path
    request_id_prefix: str
    request_mode: str = "get"
    processes: int = 1
    cpus: frozenset[int] | None = None  # the loadgen CPU set (None: unrestricted)
    # Where Locust runs: wraps its command line (a stack's `client_argv`: the client node).
    inside: Callable[[list[str]], list[str]] = list

    @property
    def run_s(self) -> int:
        return self.excluded_s + self.measured_s

    @property
    def log_path(self) -> Path:
        return self.csv_prefix.with_name(self.csv_prefix.name + ".log")

    @property
    def events_path(self) -> Path:
        return self.csv_prefix.with_name(self.csv_prefix.name + ".events.jsonl")


def locust_command(events_out: Path) -> list[str]:
    """Locust with the locustfile and the events plugin, appending events to `events_out`."""
    return [
        sys.executable,
        *("-m", "locust", "-f", f"{LOCUSTFILE},{LIVE_PLUGIN}"),
        *("--events-out", str(events_out)),
    ]


def locust_argv(spec: LocustSpec) -> list[str]:
    """The command line of one run."""
    argv = [
        *locust_command(spec.events_path),
        "--headless",
        "--only-summary",
        *("-u", str(spec.users), "-r", str(spec.users), "-t", f"{spec.run_s}s"),
        *("--host", spec.host),
        *("--hdr-out", str(spec.hdr_out), "--warmup-s", str(spec.excluded_s)),
        *("--open-loop-rate", f"{spec.rate or 0:g}"),
        *("--request-id-prefix", spec.request_id_prefix, "--request-mode", spec.request_mode),
        *("--csv", str(spec.csv_prefix), "--csv-full-history"),
        *("--exit-code-on-error", "0"),  # failures are results, counted in the sidecar
    ]
    if spec.processes > 1:
        argv += ["--processes", str(spec.processes)]
    return [*argv, USER_CLASS]


@dataclass(frozen=True)
class Live:
    """Locust's view at its latest event: current req/s and totals."""

    rps: float
    requests: int
    failures: int


@dataclass(frozen=True)
class LocustEvent:
    """One line of the events file (`harness.run.locust_live`)."""

    name: str
    t: float  # wall-clock seconds, when Locust fired it
    live: Live


def parse_event(line: bytes) -> LocustEvent:
    """One events line, checked: `ValueError` unless every field is what the plugin writes."""
    if len(line) > MAX_EVENT_LINE_BYTES:
        raise ValueError(f"events line longer than {MAX_EVENT_LINE_BYTES} bytes")
    try:
        doc = json.loads(line)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"events line is not JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise ValueError("events line is not an object")
    name, t, rps = doc.get("event"), doc.get("t"), doc.get("rps")
    requests, failures = doc.get("requests"), doc.get("failures")
    if name not in EVENTS:
        raise ValueError(f"unknown event {name!r:.40}")
    for what, n in (("requests", requests), ("failures", failures)):
        if type(n) is not int or n < 0:
            raise ValueError(f"{name}: {what} is not a count: {n!r:.40}")
    for what, x in (("t", t), ("rps", rps)):
        if type(x) not in (int, float) or not math.isfinite(x) or x < 0:
            raise ValueError(f"{name}: {what} is not a finite number >= 0: {x!r:.40}")
    return LocustEvent(name, float(t), Live(float(rps), requests, failures))


class EventsFile:
    """The events file of one run, read incrementally: new complete lines from an offset."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.offset = 0
        self.rejected = 0  # malformed lines skipped
        self._partial = b""

    def read(self) -> list[LocustEvent]:
        """The events appended since the last call (none before the file exists)."""
        try:
            with self.path.open("rb") as fh:
                fh.seek(self.offset)
                chunk = fh.read(MAX_EVENTS_READ_BYTES)
        except FileNotFoundError:
            return []
        self.offset += len(chunk)
        *lines, self._partial = (self._partial + chunk).split(b"\n")
        if len(self._partial) > MAX_EVENT_LINE_BYTES:  # no newline in sight: not ours
            self._partial = b""
            self.rejected += 1
        found = []
        for line in lines:
            try:
                found.append(parse_event(line))
            except ValueError:
                self.rejected += 1
        return found


class LocustRun:
    """A running Locust; use as a context manager so it never outlives the caller."""

    def __init__(self, spec: LocustSpec) -> None:
        self.spec = spec
        spec.hdr_out.parent.mkdir(parents=True, exist_ok=True)
        spec.csv_prefix.parent.mkdir(parents=True, exist_ok=True)
        spec.events_path.unlink(missing_ok=True)  # the plugin appends: start empty
        self._events = EventsFile(spec.events_path)
        self._live: Live | None = None
        self._stopping = False
        self.popen = spawn_locust(locust_argv(spec), spec.log_path, spec.cpus, spec.inside)
        try:
            self.process = psutil.Process(self.popen.pid)
        except BaseException:
            stop_session(self.popen)  # __exit__ never runs for a half-built run
            raise

    def __enter__(self) -> LocustRun:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.stop()

    def exited(self) -> bool:
        return self.popen.poll() is not None

    def _update(self) -> None:
        for event in self._events.read():
            self._live = event.live
            self._stopping |= event.name in STOPPING_EVENTS

    def stopping(self) -> bool:
        """Whether Locust has fired ``test_stopping`` (or a later event) for this run."""
        self._update()
        return self._stopping

    def live(self) -> Live | None:
        """Locust's numbers at its latest event (None before its first)."""
        self._update()
        return self._live

    def wait(self, timeout_s: float) -> int | None:
        """Wait for the exit status; on timeout stop the run and return None."""
        try:
            return self.popen.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.stop()
            return None

    def stop(self, grace_s: float = 5.0) -> None:
        """End the run's session (SIGTERM, then SIGKILL) unless it already ended."""
        stop_session(self.popen, grace_s)


def spawn_locust(
    argv: Sequence[str],
    log_path: Path,
    cpus: frozenset[int] | None,
    inside: Callable[[list[str]], list[str]] = list,
) -> subprocess.Popen[bytes]:
    """Start Locust's `argv` on `cpus` (None: unrestricted) in a session of its own, logging
    to `log_path`, `inside` the client's node; a Ctrl-C meanwhile waits until the process
    is known, then stops it."""
    popen = None
    try:
        with signals_deferred():
            popen = spawn_session(
                wrap_argv(inside(list(argv)), cpus),
                log_path,
                env={"PYTHONUNBUFFERED": "1"},
                cwd=REPO,
            )
    except BaseException:
        if popen is not None:
            stop_session(popen)
        raise
    return popen


def stop_session(popen: subprocess.Popen, grace_s: float = 5.0) -> None:
    """Signal `popen`'s session SIGTERM, then SIGKILL, until its leader has exited."""
    if popen.poll() is not None:
        return
    for sig in (signal.SIGTERM, signal.SIGKILL):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(popen.pid, sig)
        try:
            popen.wait(timeout=grace_s)
            return
        except subprocess.TimeoutExpired:
            continue
