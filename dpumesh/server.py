"""Worker runtime: `python -m dpumesh.server module:app` runs PN worker processes.

The parent process only supervises: it starts `PN` children (each a
`WorkerRuntime` with its own registry slot and queues), restarts a child that
dies, and on SIGINT/SIGTERM stops them all. Children exit by themselves if the
parent disappears (PR_SET_PDEATHSIG), so no worker outlives its service.

Environment (as in the seed): `APP` service name (required), `PN` worker
processes (default 4), `ZONE`, `K8S_APP` (metadata, exposed to the app in the
WSGI environ), `DPUMESH_NS` namespace, `DPUMESH_THREADS` pool threads per
process (default 16), `DPUMESH_DEADLINE` seconds (default 30).

The graph API is re-exported here because the seed's examples import it from
`dpumesh.server`.
"""

from __future__ import annotations

import argparse
import ctypes
import importlib
import logging
import os
import signal
import subprocess
import sys
import time

import posix_ipc

from dpumesh import naming, registry
from dpumesh.context import ExecutionContext, get_context, get_current_context
from dpumesh.graph import EgressStep, InternalStep, StepResult, order, pipe
from dpumesh.wsgi import WsgiApp

__all__ = [
    "EgressStep",
    "ExecutionContext",
    "InternalStep",
    "StepResult",
    "get_context",
    "get_current_context",
    "main",
    "order",
    "pipe",
]

log = logging.getLogger("dpumesh.server")
RESTART_BACKOFF_S = 0.5
# A worker that ran this long came up and then died (not a crash at start): restart it at once.
CRASH_LOOP_S = 1.0
STOP_GRACE_S = 5.0


def load_app(spec: str) -> WsgiApp:
    """Import `module:attribute` (attribute defaults to `app`)."""
    module_name, _, attr = spec.partition(":")
    module = importlib.import_module(module_name)
    try:
        return getattr(module, attr or "app")
    except AttributeError:
        raise SystemExit(
            f"dpumesh.server: {module_name} has no attribute {attr or 'app'!r}"
        ) from None


def _positive_int(name: str, default: int) -> int:
    raw = os.environ.get(name, str(default))
    try:
        value = int(raw)
    except ValueError:
        raise SystemExit(f"dpumesh.server: {name} must be an integer, got {raw!r}") from None
    if value < 1:
        raise SystemExit(f"dpumesh.server: {name} must be >= 1, got {value}")
    return value


def _die_with_parent() -> None:
    """Ask Linux to SIGTERM this process when its parent exits."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # pragma: no cover - non-Linux
        pass


def run_child(spec: str, index: int) -> None:
    """One worker process: serve until SIGTERM/SIGINT."""
    from dpumesh.worker import WorkerRuntime

    signal.pthread_sigmask(signal.SIG_UNBLOCK, _SUPERVISOR_SIGNALS)  # inherited from the parent
    _die_with_parent()
    service = os.environ["APP"]
    runtime = WorkerRuntime(
        load_app(spec),
        service,
        naming.namespace_from_env(),
        threads=_positive_int("DPUMESH_THREADS", 16),
        deadline_s=float(os.environ.get("DPUMESH_DEADLINE", "30")),
        environ_extra={
            "dpumesh.service": service,
            "dpumesh.zone": os.environ.get("ZONE", ""),
            "dpumesh.k8s_app": os.environ.get("K8S_APP", ""),
            "dpumesh.worker_index": index,
        },
    )
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: runtime.stop())
    log.info("worker %s[%d] pid %d serving", service, index, os.getpid())
    runtime.run_forever()
    if runtime.failure is not None:
        raise SystemExit(f"dpumesh.server: worker {service}[{index}]: {runtime.failure}")


_SUPERVISOR_SIGNALS = {signal.SIGCHLD, signal.SIGTERM, signal.SIGINT}


def _release_slots(pid: int) -> None:
    """Free a dead child's registry slot now, so the sidecar stops routing to it at once
    (its in-flight requests get 503) instead of after the heartbeat expiry."""
    try:
        table = registry.Registry.open(naming.namespace_from_env())
    except (OSError, ValueError, posix_ipc.Error):
        return  # no registry (the namespace was cleaned up): nothing to free
    try:
        freed = table.release_pid(pid)
    finally:
        table.close()
    if freed:
        log.warning("freed the registry slot of dead worker pid %d", pid)


def supervise(spec: str, processes: int) -> int:
    """Start `processes` children, restart the ones that die, stop all on SIGINT/SIGTERM.

    Event-driven: the parent sleeps in sigwaitinfo() until a child exits or a
    stop signal arrives.
    """
    signal.pthread_sigmask(signal.SIG_BLOCK, _SUPERVISOR_SIGNALS)

    started: dict[int, float] = {}

    def spawn(index: int) -> subprocess.Popen:
        argv = [sys.executable, "-m", "dpumesh.server", "--child", str(index), spec]
        started[index] = time.monotonic()
        return subprocess.Popen(argv)

    children = {i: spawn(i) for i in range(processes)}
    while signal.sigwaitinfo(_SUPERVISOR_SIGNALS).si_signo == signal.SIGCHLD:
        for index, child in list(children.items()):
            if child.poll() is not None:
                log.warning("worker %d exited with %s; restarting", index, child.returncode)
                _release_slots(child.pid)
                if time.monotonic() - started[index] < CRASH_LOOP_S:
                    time.sleep(RESTART_BACKOFF_S)  # back off so a crash loop does not spin
                children[index] = spawn(index)
    for child in children.values():
        if child.poll() is None:
            child.terminate()
    deadline = time.monotonic() + STOP_GRACE_S
    for child in children.values():
        try:
            child.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()
    return 0


def main(argv: list[str] | None = None) -> None:
    """Entry point of `python -m dpumesh.server`."""
    p = argparse.ArgumentParser(
        prog="python -m dpumesh.server",
        description=(
            "Run a Flask (WSGI) app as DPUmesh workers: PN processes that take requests from "
            "shared-memory queues and run each handler's execution graph without blocking. "
            "Environment: APP (service name, required), PN (processes, default 4), ZONE, "
            "K8S_APP, DPUMESH_NS (namespace), DPUMESH_THREADS (pool threads per process, "
            "default 16), DPUMESH_DEADLINE (seconds, default 30)."
        ),
    )
    p.add_argument("app", help="the WSGI app as module:attribute, e.g. mubench.dpumesh_app:app")
    p.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument(
        "--log-level",
        default=os.environ.get("DPUMESH_LOG_LEVEL", "INFO"),
        help="logging level (default $DPUMESH_LOG_LEVEL or INFO)",
    )
    args = p.parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(name)s[%(process)d] %(message)s"
    )
    if not os.environ.get("APP"):
        p.error("the APP environment variable (service name) is required")
    try:
        naming.validate_namespace(naming.namespace_from_env())
    except ValueError as exc:
        p.error(str(exc))
    if args.child is not None:
        run_child(args.app, args.child)
        return
    load_app(args.app)  # fail fast, in the parent, on an import error
    sys.exit(supervise(args.app, _positive_int("PN", 4)))


if __name__ == "__main__":
    main()
