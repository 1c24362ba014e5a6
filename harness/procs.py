"""Start, watch and tear down the processes of a benchmark stack.

Every process runs in its own session and process group (`start_new_session`),
so a terminal's Ctrl-C reaches only the harness, which then tears the stack
down. stdout and stderr go to `<run_dir>/<name>.log`.

Teardown (`Supervisor.stop`) is idempotent and runs on leaving the `with`
block (normally, on an exception, on Ctrl-C), on SIGTERM to the harness
(turned into `SystemExit` while a supervisor is live), after a failed start,
and at interpreter exit. It first collects every process tree (recursive
children, every member of each session, and any descendant seen before),
then sends SIGTERM to each group and to each collected process outside
them, waits `grace_s`, and SIGKILLs what is left: grandchildren that were
reparented or left their group die too.

Leaders are not reaped before teardown: their exit is detected with
`waitid(WNOWAIT)`, so each leader's pid, which is also its group and session
id, stays reserved by the zombie. Signalling a group or scanning a session
can therefore never reach an unrelated process that reused the id.

Limits: a descendant that leaves the session and is orphaned before the
supervisor has ever looked (`roles()` or teardown) escapes; a SIGKILLed
harness leaves its children.
"""

from __future__ import annotations

import atexit
import contextlib
import http.client
import os
import re
import signal
import subprocess
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import NoReturn

import psutil

ROLES = ("app", "sidecar", "gateway", "dpu-daemon", "dpa-daemon", "loadgen")

ReadyCheck = Callable[[], bool]

_NAME = re.compile(r"[A-Za-z0-9_.-]+")
_KILL_WAIT_S = 5.0


class StartError(RuntimeError):
    """A process failed to start or become ready; the stack has been torn down."""


def http_ok(url: str, timeout_s: float = 1.0) -> ReadyCheck:
    """Ready when `GET url` answers 200 (plain `http.client`: no proxy variables apply)."""
    parts = urllib.parse.urlsplit(url)
    target = parts.path or "/"
    if parts.query:
        target += "?" + parts.query

    def check() -> bool:
        conn = http.client.HTTPConnection(parts.hostname, parts.port or 80, timeout=timeout_s)
        try:
            conn.request("GET", target)
            return conn.getresponse().status == 200
        except (OSError, http.client.HTTPException):
            return False
        finally:
            conn.close()

    return check


def log_tail(path: Path, lines: int = 20) -> str:
    """The last `lines` lines of a log, for error messages."""
    try:
        with path.open("rb") as f:
            f.seek(max(0, f.seek(0, os.SEEK_END) - 16384))
            data = f.read()
    except OSError as exc:
        return f"<no log: {exc}>"
    return "\n".join(data.decode(errors="replace").splitlines()[-lines:])


@dataclass(eq=False)
class Proc:
    """One supervised process (the leader of its own session)."""

    name: str
    role: str
    argv: list[str]
    log_path: Path
    popen: subprocess.Popen[bytes]
    ready: ReadyCheck | None = None
    is_ready: bool = False
    # Every descendant ever seen, so one that later escapes the session is
    # still killed; also keeps psutil objects stable for cpu_percent().
    known: dict[int, psutil.Process] = field(default_factory=dict)

    @property
    def pid(self) -> int:
        return self.popen.pid

    def exit_status(self) -> str | None:
        """How the leader ended ("exit code 3", "signal 9"), or None while running.

        Does not reap it (WNOWAIT), keeping its pid reserved until teardown.
        """
        if self.popen.returncode is not None:
            return f"exit code {self.popen.returncode}"
        try:
            info = os.waitid(os.P_PID, self.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
        except ChildProcessError:
            return "exited"
        if info is None:
            return None
        if info.si_code == os.CLD_EXITED:
            return f"exit code {info.si_status}"
        return f"signal {info.si_status}"


def _alive(proc: psutil.Process) -> bool:
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def raise_system_exit(signum: int, _frame: object) -> None:
    """A SIGTERM handler that unwinds like Ctrl-C does, so `finally` blocks tear down."""
    raise SystemExit(128 + signum)


class Supervisor:
    """Runs a stack's processes and guarantees none outlive it.

    Usage::

        with Supervisor(run_dir) as sup:
            sup.start("s0", argv, role="app", ready=http_ok("http://127.0.0.1:8000/"))
            sup.wait_ready()
            ...
    """

    def __init__(self, run_dir: Path, *, grace_s: float = 5.0) -> None:
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.grace_s = grace_s
        self._procs: dict[str, Proc] = {}
        self._closed = False
        self._stopped = False
        # SIGTERM becomes SystemExit (unwinding `with` blocks, then atexit)
        # until this supervisor has stopped.
        self._saved_sigterm: object = None
        self._sigterm_installed = threading.current_thread() is threading.main_thread()
        if self._sigterm_installed:
            self._saved_sigterm = signal.signal(signal.SIGTERM, raise_system_exit)
        atexit.register(self.stop)

    def __enter__(self) -> Supervisor:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.stop()

    @property
    def procs(self) -> Mapping[str, Proc]:
        """Supervised processes by name, in start order."""
        return dict(self._procs)

    def start(
        self,
        name: str,
        argv: Sequence[str],
        *,
        role: str,
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
        ready: ReadyCheck | None = None,
    ) -> Proc:
        """Launch `argv` in a new session, logging to `<run_dir>/<name>.log`.

        `env` adds to (overrides) this process's environment. Does not wait:
        start everything, then `wait_ready()` probes them together.
        """
        if self._closed:
            raise RuntimeError("supervisor already stopped")
        if role not in ROLES:
            raise ValueError(f"role {role!r} not one of {ROLES}")
        if not _NAME.fullmatch(name) or name in self._procs:
            raise ValueError(f"process name {name!r} is invalid or already used")
        log_path = self.run_dir / f"{name}.log"
        try:
            # Ctrl-C between fork and registration would leave a child no teardown
            # knows about (holding its port): hold signals until it is registered.
            with signals_deferred():
                popen = spawn_session(argv, log_path, env=env, cwd=cwd)
                proc = Proc(name, role, list(argv), log_path, popen, ready)
                self._procs[name] = proc
        except OSError as exc:
            self.stop()
            raise StartError(f"{name} ({role}): cannot run {argv[0]!r}: {exc}") from exc
        return proc

    def wait_ready(self, names: Iterable[str] | None = None, timeout_s: float = 30.0) -> None:
        """Wait until every (named) process's readiness check passes.

        Fails early when a process exits, or after `timeout_s`: the whole
        stack is torn down and `StartError` carries the culprit's log tail.
        """
        chosen = self._procs.values() if names is None else [self._procs[n] for n in names]
        pending = [p for p in chosen if p.ready is not None and not p.is_ready]
        deadline = time.monotonic() + timeout_s
        delay = 0.01
        while pending:
            for proc in list(pending):
                status = proc.exit_status()
                if status is not None:
                    self._fail(proc, f"ended ({status}) before it was ready")
                if proc.ready is not None and proc.ready():
                    proc.is_ready = True
                    pending.remove(proc)
            if not pending:
                return
            if time.monotonic() > deadline:
                self._fail(pending[0], f"not ready after {timeout_s:.1f} s")
            time.sleep(delay)
            delay = min(delay * 2, 0.1)

    def _fail(self, proc: Proc, why: str) -> NoReturn:
        message = (
            f"{proc.name} ({proc.role}) {why}; log {proc.log_path}:\n{log_tail(proc.log_path)}"
        )
        self.stop()
        raise StartError(message)

    def roles(self) -> dict[str, list[psutil.Process]]:
        """Live processes per role (every role present), descendants included.

        The same `psutil.Process` objects are returned on each call, so CPU
        deltas (`cpu_times`, `cpu_percent`) can be taken across a window.
        """
        by_role: dict[str, list[psutil.Process]] = {role: [] for role in ROLES}
        sessions = self._session_members()
        for proc in self._procs.values():
            by_role[proc.role].extend(self._tree(proc, sessions).values())
        return by_role

    def _session_members(self) -> dict[int, list[int]]:
        """Pids by session id, for the sessions of leaders not yet reaped."""
        leaders = {p.pid for p in self._procs.values() if p.popen.returncode is None}
        members: dict[int, list[int]] = {}
        for pid in psutil.pids():
            try:
                sid = os.getsid(pid)
            except OSError:
                continue
            if sid in leaders:
                members.setdefault(sid, []).append(pid)
        return members

    def _tree(self, proc: Proc, sessions: Mapping[int, list[int]]) -> dict[int, psutil.Process]:
        """The live processes of `proc`'s tree, remembered in `proc.known`."""
        found: list[psutil.Process] = []
        if proc.popen.returncode is None:
            with contextlib.suppress(psutil.Error):
                leader = psutil.Process(proc.pid)
                found += [leader, *leader.children(recursive=True)]
            for pid in sessions.get(proc.pid, ()):
                with contextlib.suppress(psutil.Error):
                    found.append(psutil.Process(pid))
        found += list(proc.known.values())
        for candidate in found:
            kept = proc.known.get(candidate.pid)
            if kept is None or not kept.is_running():
                proc.known[candidate.pid] = candidate
        for pid, kept in list(proc.known.items()):
            if not _alive(kept):
                del proc.known[pid]
        return dict(proc.known)

    def stop(self) -> None:
        """Tear down every process tree: SIGTERM, `grace_s`, then SIGKILL. Idempotent.

        Ctrl-C or SIGTERM arriving meanwhile is held back until teardown is done.
        """
        if self._stopped:
            return
        self._closed = True
        with signals_deferred() as handlers_after:
            self._terminate_all()
            self._stopped = True
            atexit.unregister(self.stop)
            if self._sigterm_installed:
                handlers_after[signal.SIGTERM] = self._saved_sigterm
                self._sigterm_installed = False

    def _collect(self) -> dict[int, psutil.Process]:
        sessions = self._session_members()
        victims: dict[int, psutil.Process] = {}
        for proc in self._procs.values():
            victims.update(self._tree(proc, sessions))
        return victims

    def _signal(self, victims: Mapping[int, psutil.Process], sig: signal.Signals) -> None:
        """Signal each group whose id is still ours (leader unreaped), then stragglers."""
        groups = {p.pid for p in self._procs.values() if p.popen.returncode is None}
        for pgid in groups:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pgid, sig)
        for victim in victims.values():
            with contextlib.suppress(psutil.Error, OSError):
                if os.getpgid(victim.pid) not in groups:
                    victim.send_signal(sig)  # psutil refuses if the pid was reused

    def _terminate_all(self) -> None:
        victims = self._collect()  # before signalling: parents' deaths orphan children
        self._signal(victims, signal.SIGTERM)
        if not _wait_gone(victims.values(), self.grace_s):
            victims.update(self._collect())
            self._signal(victims, signal.SIGKILL)
            _wait_gone(victims.values(), _KILL_WAIT_S)
        for proc in self._procs.values():
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.popen.wait(timeout=_KILL_WAIT_S)


def _wait_gone(procs: Iterable[psutil.Process], timeout_s: float) -> bool:
    """Whether all of `procs` died (zombies count as dead) within `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    remaining = list(procs)
    while True:
        remaining = [p for p in remaining if _alive(p)]
        if not remaining:
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)


def spawn_session(
    argv: Sequence[str],
    log_path: Path,
    *,
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
) -> subprocess.Popen[bytes]:
    """Start `argv` in a session of its own (so its whole tree can be signalled),
    stdin closed, stdout and stderr to `log_path`; `env` adds to this environment.

    Call it under `signals_deferred()` and record the result before leaving it:
    a Ctrl-C in between would leave a child nobody stops.
    """
    with log_path.open("wb") as log:
        return subprocess.Popen(
            list(argv),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=None if env is None else {**os.environ, **env},
            cwd=cwd,
            start_new_session=True,
        )


@contextlib.contextmanager
def signals_deferred() -> Iterator[dict[signal.Signals, object]]:
    """Hold SIGINT/SIGTERM during teardown, then re-deliver them (main thread only).

    Yields the handlers to reinstate afterwards; the caller may change them.
    """
    after: dict[signal.Signals, object] = {}
    if threading.current_thread() is not threading.main_thread():
        yield after
        return
    received: list[int] = []
    for sig in (signal.SIGINT, signal.SIGTERM):
        after[sig] = signal.signal(sig, lambda s, _f: received.append(s))
    try:
        yield after
    finally:
        for sig, handler in after.items():
            # None: a handler set outside Python; the default is the best match.
            signal.signal(sig, signal.SIG_DFL if handler is None else handler)
        for sig in received:
            signal.raise_signal(sig)
