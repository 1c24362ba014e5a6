"""One headless Locust run as a subprocess, watched while it runs.

The runner starts one `LocustRun` per load level (`loadtests/locustfile.py`
plus the `harness.run.locust_live` plugin), with ``-r`` = ``-u`` (all users at
once) and ``-t`` = excluded seconds + measured seconds. While it runs:

* `live()` tails Locust's ``_stats_history.csv`` (one row a second) for the
  current req/s and totals, for the progress display;
* `time_limit_reached()` watches Locust's log for the line it prints when
  ``-t`` expires and it stops its users: the end of the CPU window.

The process runs in its own session; `stop()` (and leaving the `with` block)
ends that session's processes (Locust's distributed workers included) if the
run has not ended by itself.
"""

from __future__ import annotations

import contextlib
import csv
import io
import os
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import psutil

from harness.names import REPO
from harness.placement.launch import wrap_argv
from harness.procs import signals_deferred, spawn_session
from loadtests.options import USER_CLASS

LOCUSTFILE = REPO / "loadtests" / "locustfile.py"
LIVE_PLUGIN = Path(__file__).with_name("locust_live.py")
TIME_LIMIT_LINE = "--run-time limit reached"


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

    @property
    def run_s(self) -> int:
        return self.excluded_s + self.measured_s

    @property
    def log_path(self) -> Path:
        return self.csv_prefix.with_name(self.csv_prefix.name + ".log")


def locust_argv(spec: LocustSpec) -> list[str]:
    """The command line of one run."""
    argv = [
        sys.executable,
        "-m",
        "locust",
        "-f",
        f"{LOCUSTFILE},{LIVE_PLUGIN}",
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
    """Locust's view a second ago: current req/s and totals."""

    rps: float
    requests: int
    failures: int


def parse_history(text: str) -> Live | None:
    """Current req/s (last two seconds' Aggregated rows) and totals of a stats history CSV."""
    rows = [
        r
        for r in csv.DictReader(io.StringIO(text))
        if r.get("Name") == "Aggregated" and (r.get("Total Request Count") or "").isdigit()
    ]
    if not rows:
        return None
    last = rows[-1]
    requests = int(last["Total Request Count"])
    failures = int(last["Total Failure Count"] or 0)
    now = int(last["Timestamp"])
    earlier = [r for r in rows if int(r["Timestamp"]) < now]  # rows can repeat a second
    rps = 0.0
    if earlier:
        prev = earlier[-1]
        rps = (requests - int(prev["Total Request Count"])) / (now - int(prev["Timestamp"]))
    return Live(rps, requests, failures)


class LocustRun:
    """A running Locust; use as a context manager so it never outlives the caller."""

    def __init__(self, spec: LocustSpec) -> None:
        self.spec = spec
        spec.hdr_out.parent.mkdir(parents=True, exist_ok=True)
        spec.csv_prefix.parent.mkdir(parents=True, exist_ok=True)
        self._history = Path(f"{spec.csv_prefix}_stats_history.csv")
        self._log_offset = 0
        self._limit_seen = False
        popen = None
        try:
            with signals_deferred():  # a Ctrl-C waits until `popen` is known, then stops it
                argv = wrap_argv(locust_argv(spec), spec.cpus)
                popen = spawn_session(argv, spec.log_path, env={"PYTHONUNBUFFERED": "1"}, cwd=REPO)
            self.process = psutil.Process(popen.pid)
        except BaseException:
            if popen is not None:
                stop_session(popen)  # __exit__ never runs for a half-built run
            raise
        self.popen = popen

    def __enter__(self) -> LocustRun:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.stop()

    def exited(self) -> bool:
        return self.popen.poll() is not None

    def time_limit_reached(self) -> bool:
        """Whether Locust has logged that ``-t`` expired (or has exited)."""
        if not self._limit_seen:
            with self.spec.log_path.open("rb") as fh:
                fh.seek(self._log_offset)
                chunk = fh.read()
            # Keep a partial last line for the next read.
            cut = chunk.rfind(b"\n") + 1
            self._log_offset += cut
            self._limit_seen = TIME_LIMIT_LINE.encode() in chunk[:cut]
        return self._limit_seen or self.exited()

    def live(self) -> Live | None:
        """Locust's latest numbers (None before its first stats row)."""
        try:
            return parse_history(self._history.read_text(encoding="utf-8", errors="replace"))
        except OSError:
            return None

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
