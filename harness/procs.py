"""Start, watch, restart and tear down the processes of a benchmark stack.

Every process runs in its own session and process group (`start_new_session`),
so a terminal's Ctrl-C reaches only the harness, which then tears the stack
down. stdout and stderr go to `<run_dir>/<name>.log`.

Restarts (DESIGN §9). Like a Kubernetes pod with `restartPolicy: Always`,
every process runs under a `RestartPolicy`: once the stack is up
(`Supervisor.arm_restarts()`), an unexpected exit of a leader is seen by the
process's watcher thread (blocked on a pidfd, no polling), which writes one
line to the harness console (stderr, or the `notify` callback) and a marker
to the process's log, SIGKILLs what is left of its session and process group
(as a container restart kills everything in the container), reaps it, waits
its back-off (interruptible by `stop()`) and starts the same argv, env and
cwd again, appending to the same log. A placement-wrapped argv is restarted
as given, so the new process gets the same CPU set and cgroup. Back-off
grows by `factor` from `initial_backoff_s` up to `max_backoff_s` and starts
over once a run lasted `reset_after_s` (kubelet's CrashLoopBackOff, scaled
for benchmarks). With mode `never` a dead process stays dead (its remains
are still killed). Before `arm_restarts()` nothing is restarted: a process
that dies before the stack is up fails the start (`wait_ready()`), as
before. Each restart is a `RestartEvent` (`restart_events()`,
`restarts()`, `wait_restarts()`).

Teardown (`Supervisor.stop`) is idempotent and runs on leaving the `with`
block (normally, on an exception, on Ctrl-C), on SIGTERM to the harness
(turned into `SystemExit` while a supervisor is live), after a failed start,
and at interpreter exit. It first collects every process tree (recursive
children, every member of each session, and any descendant seen before),
then sends SIGTERM to each group and to each collected process outside
them, waits `grace_s`, and SIGKILLs what is left: grandchildren that were
reparented or left their group die too. Spawning and teardown share one
lock, so a restart racing `stop()` either completes before the teardown
collects (and its process is torn down) or sees the supervisor closed and
starts nothing.

Leaders are not reaped before teardown (or, for a restart, before the
remains of their session are dead): their exit is detected through a pidfd
and read with `waitid(WNOWAIT)`, so each leader's pid, which is also its
group and session id, stays reserved by the zombie. Signalling a group or
scanning a session can therefore never reach an unrelated process that
reused the id.

Limits: a descendant that leaves the session and is orphaned before the
supervisor has ever looked (`roles()`, teardown or a restart) escapes; a
SIGKILLed harness leaves its children. Needs Linux >= 5.3 (pidfds).
"""

from __future__ import annotations

import atexit
import contextlib
import http.client
import os
import re
import select
import signal
import subprocess
import sys
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal, NoReturn

import psutil

from harness.names import RESTART_MODES, ROLES

ReadyCheck = Callable[[], bool]

_NAME = re.compile(r"[A-Za-z0-9_.-]+")
_KILL_WAIT_S = 5.0


class StartError(RuntimeError):
    """A process failed to start or become ready; the stack has been torn down."""


@dataclass(frozen=True, kw_only=True)
class RestartPolicy:
    """What happens when a process of a running stack exits (DESIGN §9).

    `always` restarts it after a back-off of `initial_backoff_s`, times
    `factor` per consecutive crash, at most `max_backoff_s`; a run that lasted
    `reset_after_s` resets the back-off (kubelet's CrashLoopBackOff with
    10 s / 5 min / 10 min, scaled to what a benchmark can wait). `never`
    leaves it dead, for experiments that want a dead component to stay dead.
    """

    mode: Literal["always", "never"] = "always"
    initial_backoff_s: float = 0.5
    factor: float = 2.0
    max_backoff_s: float = 30.0
    reset_after_s: float = 10.0

    def __post_init__(self) -> None:
        if self.mode not in RESTART_MODES:
            raise ValueError(f"restart mode {self.mode!r} not one of {RESTART_MODES}")
        if not 0 <= self.initial_backoff_s <= self.max_backoff_s:
            raise ValueError(
                f"restart back-off must satisfy 0 <= initial ({self.initial_backoff_s:g} s) "
                f"<= max ({self.max_backoff_s:g} s)"
            )
        if self.factor < 1:
            raise ValueError(f"restart back-off factor {self.factor:g} must be >= 1")
        if self.reset_after_s < 0:
            raise ValueError(f"restart reset_after_s {self.reset_after_s:g} must be >= 0")

    @property
    def restarts(self) -> bool:
        return self.mode == "always"

    def backoff_s(self, consecutive: int) -> float:
        """The wait before restart number `consecutive` (1-based) of an unbroken crash loop."""
        if consecutive < 1:
            raise ValueError(f"consecutive crash count {consecutive} must be >= 1")
        try:
            backoff = self.initial_backoff_s * self.factor ** (consecutive - 1)
        except OverflowError:  # a very long crash loop: far past the cap
            return self.max_backoff_s
        return min(backoff, self.max_backoff_s)

    def consecutive(self, previous: int, ran_s: float) -> int:
        """The crash-loop count after a run of `ran_s` ended; `previous` counted the ones before."""
        return 1 if ran_s >= self.reset_after_s else previous + 1

    def as_dict(self) -> dict[str, Any]:
        """For stack.json and meta.json."""
        return asdict(self)


ALWAYS = RestartPolicy()
NEVER = RestartPolicy(mode="never")


@dataclass(frozen=True)
class RestartEvent:
    """One restart: how the previous run ended, when, and when the new one started.

    `at_*` is when the end was seen (monotonic and wall clock, seconds);
    `restarted_*` when the new process was started, `backoff_s` (the
    back-off waited) later.
    """

    component: str
    role: str
    how: str
    at_wall_s: float
    at_mono_s: float
    number: int  # 1 for the component's first restart
    backoff_s: float
    ran_s: float  # how long the run that ended had lasted
    restarted_wall_s: float
    restarted_mono_s: float
    pid: int  # of the new process

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


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
    """One supervised process (the leader of its own session); a restart replaces `popen`."""

    name: str
    role: str
    argv: list[str]
    log_path: Path
    popen: subprocess.Popen[bytes]
    ready: ReadyCheck | None = None
    is_ready: bool = False
    env: Mapping[str, str] | None = None
    cwd: Path | None = None
    started_mono_s: float = field(default_factory=time.monotonic)
    # A pidfd of the current leader, owned by its watcher thread.
    pidfd: int | None = None
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
        code = self.popen.returncode
        if code is not None:
            return f"signal {-code}" if code < 0 else f"exit code {code}"
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


def console(line: str) -> None:
    """One line to the harness console (stderr), for restart notices."""
    print(line, file=sys.stderr, flush=True)


class Supervisor:
    """Runs a stack's processes, restarts them per its `RestartPolicy`, and lets none outlive it.

    Usage::

        with Supervisor(run_dir, restart=RestartPolicy()) as sup:
            sup.start("s0", argv, role="app", ready=http_ok("http://127.0.0.1:8000/"))
            sup.wait_ready()
            sup.arm_restarts()  # the stack is up: from now on a crash restarts
            ...

    `notify` receives each one-line restart notice (default: stderr).
    """

    def __init__(
        self,
        run_dir: Path,
        *,
        grace_s: float = 5.0,
        restart: RestartPolicy = ALWAYS,
        notify: Callable[[str], None] = console,
    ) -> None:
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.grace_s = grace_s
        self.restart = restart
        self._notify = notify
        self._procs: dict[str, Proc] = {}
        self._watchers: list[threading.Thread] = []
        self._events: list[RestartEvent] = []
        # Guards spawning, the process table, restarts and teardown; watchers wait on it.
        self._cond = threading.Condition(threading.RLock())
        self._armed = False
        self._closed = False
        self._torn_down = False
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
        with self._cond:
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
        if role not in ROLES:
            raise ValueError(f"role {role!r} not one of {ROLES}")
        log_path = self.run_dir / f"{name}.log"
        failed: OSError | None = None
        with self._cond:
            if self._closed:
                raise RuntimeError("supervisor already stopped")
            if not _NAME.fullmatch(name) or name in self._procs:
                raise ValueError(f"process name {name!r} is invalid or already used")
            try:
                # Ctrl-C between fork and registration would leave a child no teardown
                # knows about (holding its port): hold signals until it is registered.
                with signals_deferred():
                    popen = spawn_session(argv, log_path, env=env, cwd=cwd)
                    proc = Proc(name, role, list(argv), log_path, popen, ready, env=env, cwd=cwd)
                    self._procs[name] = proc
                    proc.pidfd = os.pidfd_open(popen.pid)  # a child: unreaped, so still ours
            except OSError as exc:
                failed = exc
            else:
                watcher = threading.Thread(
                    target=self._watch, args=(proc,), name=f"supervise-{name}", daemon=True
                )
                self._watchers.append(watcher)
                watcher.start()
        if failed is not None:
            self.stop()  # outside the lock: stopping joins the watchers, which need it
            raise StartError(f"{name} ({role}): cannot run {argv[0]!r}: {failed}") from failed
        return proc

    def wait_ready(self, names: Iterable[str] | None = None, timeout_s: float = 30.0) -> None:
        """Wait until every (named) process's readiness check passes.

        Fails early when a process exits, or after `timeout_s`: the whole
        stack is torn down and `StartError` carries the culprit's log tail.
        Meant for the start, before `arm_restarts()`: a process that dies
        before it is ready is a failed start, not something to restart.
        """
        procs = self.procs
        chosen = procs.values() if names is None else [procs[n] for n in names]
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

    def arm_restarts(self) -> None:
        """The stack is up: from now on an unexpected exit is handled by the restart policy.

        A process that had already ended by now is handled at once.
        """
        with self._cond:
            self._armed = True
            self._cond.notify_all()

    def restarts(self) -> dict[str, int]:
        """Restarts per process name so far (every process present, 0 if none)."""
        with self._cond:
            counts = dict.fromkeys(self._procs, 0)
            for event in self._events:
                counts[event.component] += 1
            return counts

    def restart_events(self) -> list[RestartEvent]:
        """Every restart so far, in the order they happened."""
        with self._cond:
            return list(self._events)

    def wait_restarts(self, counts: Mapping[str, int], timeout_s: float) -> bool:
        """Block until each named process has restarted at least `counts[name]` times.

        False after `timeout_s`, or once the supervisor is stopped with too few.
        """

        def done() -> bool:
            have = self.restarts()
            return self._closed or all(have.get(n, 0) >= c for n, c in counts.items())

        with self._cond:
            self._cond.wait_for(done, timeout=timeout_s)
            have = self.restarts()
            return all(have.get(n, 0) >= c for n, c in counts.items())

    def _fail(self, proc: Proc, why: str) -> NoReturn:
        message = (
            f"{proc.name} ({proc.role}) {why}; log {proc.log_path}:\n{log_tail(proc.log_path)}"
        )
        self.stop()
        raise StartError(message)

    def _watch(self, proc: Proc) -> None:
        """One process's watcher: block until its leader exits, then apply the policy."""
        consecutive = 0
        while True:
            fd = proc.pidfd
            if fd is None:
                return
            try:
                _wait_readable([fd], None)  # the leader exited (or was reaped by teardown)
                ended_mono, ended_wall = time.monotonic(), time.time()
                with self._cond:
                    self._cond.wait_for(lambda: self._armed or self._closed)
                    if self._closed:
                        return  # teardown's to handle
                    how = proc.exit_status() or "exited"
                    ran_s = ended_mono - proc.started_mono_s
                    consecutive = self.restart.consecutive(consecutive, ran_s)
                    self._kill_remains(proc)
                    if not self.restart.restarts:
                        self._announce(
                            proc,
                            f"ended ({how}) after {ran_s:.1f} s; restart "
                            "policy never: it stays down",
                        )
                        return  # unreaped, as before: its pid stays reserved until teardown
                    proc.popen.wait()  # nothing is left in its group: reap the leader now
                    os.close(fd)
                    proc.pidfd = fd = None
                    number = 1 + sum(e.component == proc.name for e in self._events)
                    backoff = self.restart.backoff_s(consecutive)
                    self._announce(
                        proc,
                        f"ended ({how}) after {ran_s:.1f} s; restart {number} in {backoff:.2f} s",
                    )
                    waited = 0.0
                    while True:
                        if self._cond.wait_for(lambda: self._closed, timeout=backoff):
                            return  # stopped during the back-off: nothing of it is left
                        waited += backoff
                        try:
                            self._respawn(proc)
                            break
                        except OSError as exc:
                            consecutive += 1
                            backoff = self.restart.backoff_s(consecutive)
                            self._announce(
                                proc,
                                f"cannot run {proc.argv[0]!r}: {exc}; retry in {backoff:.2f} s",
                            )
                    self._events.append(
                        RestartEvent(
                            component=proc.name,
                            role=proc.role,
                            how=how,
                            at_wall_s=ended_wall,
                            at_mono_s=ended_mono,
                            number=number,
                            backoff_s=waited,
                            ran_s=ran_s,
                            restarted_wall_s=time.time(),
                            restarted_mono_s=proc.started_mono_s,
                            pid=proc.pid,
                        )
                    )
                    self._cond.notify_all()
            finally:
                if fd is not None:  # leaving with the current leader's pidfd: ours to close
                    proc.pidfd = None
                    os.close(fd)

    def _respawn(self, proc: Proc) -> None:
        """Start `proc`'s argv again in a fresh session, appending to its log. Under the lock."""
        popen = spawn_session(proc.argv, proc.log_path, env=proc.env, cwd=proc.cwd, append=True)
        proc.started_mono_s = time.monotonic()
        proc.popen = popen
        proc.known.clear()
        try:
            proc.pidfd = os.pidfd_open(popen.pid)
        except OSError as exc:  # out of descriptors: it runs, torn down at stop(), unwatched
            self._announce(proc, f"cannot watch pid {popen.pid} ({exc}): no further restarts")

    def _announce(self, proc: Proc, what: str) -> None:
        """One line to the console, and a marker in the process's own log."""
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        with contextlib.suppress(OSError), proc.log_path.open("ab") as log:
            log.write(f"\n=== supervisor {stamp}: {what} ===\n".encode())
        self._notify(f"supervisor: {proc.name} ({proc.role}) {what}; log {proc.log_path}")

    def _kill_remains(self, proc: Proc) -> None:
        """SIGKILL everything left of a dead leader's session, group and known descendants.

        The unreaped leader keeps its group id reserved, so the group signal
        reaches only its own processes.
        """
        victims = self._tree(proc, self._session_members())
        victims.pop(proc.pid, None)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        for victim in victims.values():
            with contextlib.suppress(psutil.Error, OSError):
                if os.getpgid(victim.pid) != proc.pid:
                    victim.send_signal(signal.SIGKILL)  # psutil refuses if the pid was reused
        _wait_gone(victims.values(), _KILL_WAIT_S)
        proc.known.clear()

    def roles(self) -> dict[str, list[psutil.Process]]:
        """Live processes per role (every role present), descendants and restarts included.

        The same `psutil.Process` objects are returned on each call (until a
        restart replaces a process), so CPU deltas (`cpu_times`,
        `cpu_percent`) can be taken across a window.
        """
        by_role: dict[str, list[psutil.Process]] = {role: [] for role in ROLES}
        with self._cond:
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

        Also stops restarts: one in its back-off never starts, one starting
        is torn down with the rest. Ctrl-C or SIGTERM arriving meanwhile is
        held back until teardown is done.
        """
        if self._stopped:
            return
        with signals_deferred() as handlers_after:
            with self._cond:
                self._closed = True
                self._cond.notify_all()
                if not self._torn_down:
                    self._terminate_all()
                    self._torn_down = True
            self._join_watchers()
            self._stopped = True
            atexit.unregister(self.stop)
            if self._sigterm_installed:
                handlers_after[signal.SIGTERM] = self._saved_sigterm
                self._sigterm_installed = False

    def _join_watchers(self) -> None:
        """Watchers wake once their leader is gone; give them one bounded wait in all."""
        deadline = time.monotonic() + _KILL_WAIT_S
        current = threading.current_thread()
        for watcher in self._watchers:
            if watcher is not current:
                watcher.join(timeout=max(0.0, deadline - time.monotonic()))

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


def _wait_readable(fds: Sequence[int], timeout_s: float | None) -> set[int]:
    """Block until each pidfd in `fds` is readable (its process exited), or `timeout_s`.

    Returns the fds still pending (empty when all exited).
    """
    poller = select.poll()
    pending = set(fds)
    for fd in pending:
        poller.register(fd, select.POLLIN)
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    while pending:
        left = None if deadline is None else deadline - time.monotonic()
        if left is not None and left <= 0:
            break
        for fd, _events in poller.poll(None if left is None else left * 1000):
            poller.unregister(fd)
            pending.discard(fd)
    return pending


def _wait_gone(procs: Iterable[psutil.Process], timeout_s: float) -> bool:
    """Whether all of `procs` died (zombies count as dead) within `timeout_s`.

    Waits on a pidfd per process: any process, not only our children.
    """
    fds: list[int] = []
    try:
        for proc in procs:
            try:
                fd = os.pidfd_open(proc.pid)
            except ProcessLookupError:
                continue
            fds.append(fd)
            if not _alive(proc):  # a zombie, or the pid now names another process
                fds.pop()
                os.close(fd)
        return not _wait_readable(fds, timeout_s)
    finally:
        for fd in fds:
            os.close(fd)


def spawn_session(
    argv: Sequence[str],
    log_path: Path,
    *,
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
    append: bool = False,
) -> subprocess.Popen[bytes]:
    """Start `argv` in a session of its own (so its whole tree can be signalled),
    stdin closed, stdout and stderr to `log_path` (appended to with `append`,
    as a restart does); `env` adds to this environment.

    Call it under `signals_deferred()` and record the result before leaving it:
    a Ctrl-C in between would leave a child nobody stops.
    """
    with log_path.open("ab" if append else "wb") as log:
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
