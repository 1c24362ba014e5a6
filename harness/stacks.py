"""Start and stop one benchmark stack (`dpumesh`, `envoy`, `nomesh`) as local processes.

Every stack runs the same μBench cell code with the same workmodel, seed,
scale and worker counts (DESIGN §5); only the mesh differs. Worker counts
come from `mubench.workmodel.plan_processes` (per-service and total caps, so
a 20-service workmodel fits a 2-core machine); its warnings are printed.

* `nomesh`, the floor: one gunicorn app per service; callers reach callees
  directly (`--upstream` for every service). The entry service's app itself
  listens on the public port: the floor has no proxy, so nothing sits in
  front of it and the public port costs nothing.
* `envoy`: per service an app plus an Envoy sidecar (inbound listener -> app;
  the app sends every call to its sidecar's outbound listener with
  `--egress-proxy`), and an Envoy ingress gateway on the public port. The
  generated, Envoy-validated configs are written to `<run_dir>/configs/`.
* `dpumesh`: `dpa-daemon`, `dpu-daemon` (bridge on the public port) and one
  `dpumesh.server` per service (`PN` = its workers, `DPUMESH_THREADS` = its
  threads), in a namespace unique to this start.

The entry service is `s0` (μBench's convention) or, without one, the first
service in the file. All ports other than the public one come from
`harness.ports`; every process logs to `<run_dir>/<name>.log`, and
`<run_dir>/stack.json` records what ran (argv, environment, pids, ports,
configs), so a reader can rebuild the stack.

A stack counts as started when every process passed its readiness check,
all are still alive and the public URL answers; otherwise everything is torn
down and `StartError` carries the failing process's log tail. Teardown (on
`stop()`, on leaving the `with` block, on Ctrl-C or SIGTERM) leaves no
process, no bound port and no shared-memory object of the stack.
"""

from __future__ import annotations

import http.client
import itertools
import json
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

from baselines.envoy.config import (
    DEFAULT_CONCURRENCY,
    GatewayPorts,
    MeshDescription,
    ServicePorts,
)
from baselines.envoy.runner import start_mesh
from dpumesh import naming
from dpumesh.dpu_daemon import HEALTH_PATH as BRIDGE_HEALTH_PATH
from dpumesh.dpu_daemon import STATS_PATH as BRIDGE_STATS_PATH
from harness.accounting import (
    Traffic,
    dpumesh_traffic,
    envoy_traffic,
    get_json,
    nomesh_traffic,
    since,
)
from harness.ports import free_ports, port_is_free, release_ports, wait_port_free
from harness.procs import (
    ROLES,
    ReadyCheck,
    StartError,
    Supervisor,
    http_ok,
    log_tail,
    signals_deferred,  # the supervisor's own "finish teardown before Ctrl-C" guard
)
from mubench.http_app import HEALTH_PATH as APP_HEALTH_PATH
from mubench.internal import custom_function_names
from mubench.workmodel import (
    DEFAULT_PER_SERVICE_CAP,
    DEFAULT_TOTAL_CAP,
    Workmodel,
    load_workmodel,
    plan_processes,
)

MESHES = ("dpumesh", "envoy", "nomesh")
STACK_ROLES = tuple(role for role in ROLES if role != "loadgen")
DEFAULT_PORT = 5005
REPO = Path(__file__).resolve().parent.parent
DEFAULT_WORKMODEL = REPO / "workmodels" / "default.json"
MANIFEST = "stack.json"
PORTS_FREE_TIMEOUT_S = 10.0  # after every process stopped, ports must be free by then

_LOOPBACK = "127.0.0.1"
_STATS_TTL_S = 0.2
_namespaces = itertools.count()


@dataclass
class _Launched:
    """What a mesh launcher hands back to `start_stack`."""

    read_traffic: Callable[[], Traffic]
    # Process names on the way in, whose logs explain a public URL that does not answer.
    front: tuple[str, ...]
    # Path that must answer 200 on the public URL once everything is ready.
    probe: str
    configs: dict[str, Path] = field(default_factory=dict)
    details: dict[str, str] = field(default_factory=dict)


class _Launch:
    """One stack being started: its supervisor, its ports and the cell settings."""

    def __init__(
        self,
        mesh: str,
        workmodel_path: Path,
        workmodel: Workmodel,
        plan: dict[str, tuple[int, int]],
        *,
        port: int,
        run_dir: Path,
        seed: int,
        scale: float,
        functions_dir: Path | None,
        envoy_concurrency: int,
        ready_timeout_s: float,
    ) -> None:
        self.mesh = mesh
        self.workmodel_path = workmodel_path
        self.services = list(workmodel)
        self.entry = "s0" if "s0" in workmodel else self.services[0]
        self.plan = plan
        self.port = port
        self.url = f"http://{_LOOPBACK}:{port}"
        self.run_dir = run_dir
        self.seed = seed
        self.scale = scale
        self.functions_dir = functions_dir
        self.envoy_concurrency = envoy_concurrency
        self.deadline = time.monotonic() + ready_timeout_s
        self.ports = [port]  # every port the stack binds
        self.allocated: list[int] = []  # those from harness.ports, released after teardown
        self.env: dict[str, dict[str, str]] = {}
        self.cleanups: list[Callable[[], None]] = []
        self._down = False
        self.sup = Supervisor(run_dir)

    def free_ports(self, n: int) -> list[int]:
        ports = free_ports(n)
        self.ports += ports
        self.allocated += ports
        return ports

    def remaining_s(self) -> float:
        return max(1.0, self.deadline - time.monotonic())

    def start(
        self,
        name: str,
        argv: Sequence[str],
        *,
        role: str,
        env: dict[str, str] | None = None,
        ready: ReadyCheck | None = None,
    ) -> None:
        self.env[name] = dict(env or {})
        self.sup.start(name, argv, role=role, env=env, cwd=REPO, ready=ready)

    def fail(self, names: Sequence[str], why: str) -> StartError:
        tails = "".join(f"\n--- {n}.log ---\n{log_tail(self.sup.procs[n].log_path)}" for n in names)
        return StartError(f"{self.mesh} stack: {why}; logs in {self.run_dir}{tails}")

    def teardown(self) -> None:
        """Stop every process, then make sure its ports and shared memory are gone."""
        if self._down:
            return
        self._down = True
        with signals_deferred():
            self.sup.stop()
            for cleanup in self.cleanups:
                cleanup()
            busy = []
            deadline = time.monotonic() + PORTS_FREE_TIMEOUT_S  # one wait for all ports
            for port in self.ports:
                try:
                    wait_port_free(port, timeout_s=max(0.0, deadline - time.monotonic()))
                except TimeoutError:
                    busy.append(port)
            release_ports(p for p in self.allocated if p not in busy)
        if busy:
            raise RuntimeError(f"{self.mesh} stack: ports {busy} still bound after teardown")


class RunningStack:
    """A started stack. Use it as a context manager, or call `stop()` (idempotent)."""

    def __init__(self, launch: _Launch, launched: _Launched, manifest: Path) -> None:
        self.mesh = launch.mesh
        self.url = launch.url
        self.entry = launch.entry
        self.run_dir = launch.run_dir
        self.configs = dict(launched.configs)
        self.manifest = manifest
        self._launch = launch
        self._read_traffic = launched.read_traffic
        # Readiness probes crossed the stack too: counts start from here.
        self._baseline = launched.read_traffic()

    def __enter__(self) -> RunningStack:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.stop()

    def roles(self) -> dict[str, list[psutil.Process]]:
        """Live processes per role (descendants included), the same objects on every call."""
        by_role = self._launch.sup.roles()
        return {role: by_role[role] for role in STACK_ROLES}

    def traffic(self) -> Traffic:
        """Requests that crossed the stack since it became ready (see `harness.accounting`)."""
        return since(self._read_traffic(), self._baseline)

    def stop(self) -> None:
        """Tear the stack down: no process, bound port or shared-memory object remains."""
        self._launch.teardown()


def start_stack(
    mesh: str,
    workmodel_path: str | Path = DEFAULT_WORKMODEL,
    *,
    run_dir: str | Path,
    port: int = DEFAULT_PORT,
    seed: int = 0,
    scale: float = 1.0,
    functions_dir: str | Path | None = None,
    per_service_cap: int = DEFAULT_PER_SERVICE_CAP,
    total_cap: int = DEFAULT_TOTAL_CAP,
    envoy_concurrency: int = DEFAULT_CONCURRENCY,
    ready_timeout_s: float = 60.0,
) -> RunningStack:
    """Start `mesh` serving `workmodel_path` on `127.0.0.1:port`; return once it answers.

    `envoy_concurrency` is every Envoy's `--concurrency` (worker threads) in
    the `envoy` stack; the other stacks ignore it.

    Raises `WorkmodelError` for a bad workmodel (before starting anything) and
    `StartError` when a process fails or is not ready within `ready_timeout_s`
    (after tearing everything down).
    """
    if mesh not in MESHES:
        raise ValueError(f"mesh {mesh!r} is not one of {MESHES}")
    workmodel_path = Path(workmodel_path).resolve()
    workmodel = load_workmodel(str(workmodel_path), custom=custom_function_names(functions_dir))
    plan, warnings = plan_processes(workmodel, per_service_cap, total_cap)
    for line in warnings:
        print(f"warning: {line}", file=sys.stderr)
    if not port_is_free(port):
        raise StartError(f"{mesh} stack: port {port} is already in use")
    launch = _Launch(
        mesh,
        workmodel_path,
        workmodel,
        plan,
        port=port,
        run_dir=Path(run_dir).resolve(),
        seed=seed,
        scale=scale,
        functions_dir=Path(functions_dir).resolve() if functions_dir else None,
        envoy_concurrency=envoy_concurrency,
        ready_timeout_s=ready_timeout_s,
    )
    try:
        launched = _LAUNCHERS[mesh](launch)
        launch.sup.wait_ready(timeout_s=launch.remaining_s())
        _wait_answering(launch, launched)
        manifest = _write_manifest(launch, launched, warnings)
        return RunningStack(launch, launched, manifest)
    except BaseException:
        launch.teardown()
        raise


def serve(mesh: str, workmodel_path: str | Path, **options: Any) -> None:
    """Run one stack until SIGINT or SIGTERM, then tear it down.

    Prints one line containing `ready` and the URL once the stack answers.
    `options` are `start_stack`'s keyword arguments.
    """
    stop = threading.Event()
    with start_stack(mesh, workmodel_path, **options) as stack:
        print(
            f"{mesh} stack ready at {stack.url} (run dir {stack.run_dir}); Ctrl-C to stop",
            flush=True,
        )
        previous = {
            sig: signal.signal(sig, lambda *_: stop.set())
            for sig in (signal.SIGINT, signal.SIGTERM)
        }
        try:
            stop.wait()  # the handlers run in this thread and set it
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        print(f"stopping the {mesh} stack", flush=True)
    print("stopped", flush=True)


# ---- the stacks -------------------------------------------------------------------------------


def _python(module: str, *args: str) -> list[str]:
    """Run `module` with this interpreter (the venv every stack shares)."""
    return [sys.executable, "-m", module, *args]


def _start_http_app(launch: _Launch, service: str, port: int, routing: Sequence[str]) -> None:
    """The plain-HTTP μBench cell of one service (envoy and nomesh stacks)."""
    workers, threads = launch.plan[service]
    argv = _python(
        "mubench.http_app",
        *("--workmodel", str(launch.workmodel_path), "--service", service),
        *("--host", _LOOPBACK, "--port", str(port)),
        *("--workers", str(workers), "--threads", str(threads)),
        *("--seed", str(launch.seed), "--scale", repr(launch.scale)),
        *(["--functions-dir", str(launch.functions_dir)] if launch.functions_dir else []),
        *routing,
    )
    ready = http_ok(f"http://{_LOOPBACK}:{port}{APP_HEALTH_PATH}")
    launch.start(f"app-{service}", argv, role="app", ready=ready)


def _launch_nomesh(launch: _Launch) -> _Launched:
    """Apps only; the entry app takes the public port (the floor has no proxy in front)."""
    others = [s for s in launch.services if s != launch.entry]
    ports = launch.free_ports(len(others))
    app_ports = {launch.entry: launch.port, **dict(zip(others, ports, strict=True))}
    routing = [
        arg
        for svc, p in app_ports.items()
        for arg in ("--upstream", f"{svc}=http://{_LOOPBACK}:{p}")
    ]
    for service in launch.services:
        _start_http_app(launch, service, app_ports[service], routing)
    return _Launched(
        read_traffic=lambda: nomesh_traffic(app_ports, launch.entry),
        front=(f"app-{launch.entry}",),
        probe=APP_HEALTH_PATH,
    )


def _launch_envoy(launch: _Launch) -> _Launched:
    """Apps behind their sidecars, and the gateway on the public port."""
    services = {svc: ServicePorts(*launch.free_ports(4)) for svc in launch.services}
    gateway = GatewayPorts(launch.port, launch.free_ports(1)[0])
    desc = MeshDescription(
        services, gateway, entry=launch.entry, concurrency=launch.envoy_concurrency
    )
    for svc, ports in services.items():
        egress = ["--egress-proxy", f"http://{_LOOPBACK}:{ports.outbound_port}"]
        _start_http_app(launch, svc, ports.app_port, egress)
    configs = start_mesh(
        launch.sup, desc, launch.run_dir / "configs", timeout_s=launch.remaining_s()
    )
    app_ports = {svc: ports.app_port for svc, ports in services.items()}
    return _Launched(
        read_traffic=lambda: envoy_traffic(desc, app_ports),
        front=("gateway", f"sidecar-{launch.entry}", f"app-{launch.entry}"),
        probe=APP_HEALTH_PATH,
        configs=configs,
    )


def _launch_dpumesh(launch: _Launch) -> _Launched:
    """Both daemons and one worker service per μBench service, in a fresh namespace."""
    ns = f"b{os.getpid()}n{next(_namespaces)}"
    launch.cleanups.append(lambda: _remove_shm(ns))
    launch.start(
        "dpa-daemon",
        _python("dpumesh.dpa_daemon", "--ns", ns, "--log-level", "WARNING"),
        role="dpa-daemon",
    )
    expected = [arg for svc in launch.services for arg in ("--service", svc)]
    launch.start(
        "dpu-daemon",
        _python(
            "dpumesh.dpu_daemon",
            *("--ns", ns, "--host", _LOOPBACK, "--port", str(launch.port)),
            *("--entry", launch.entry, *expected, "--log-level", "WARNING"),
        ),
        role="dpu-daemon",
        ready=http_ok(launch.url + BRIDGE_HEALTH_PATH),
    )
    watch = _WorkerWatch(launch.port)
    cell_env = {
        "DPUMESH_NS": ns,
        "MUBENCH_WORKMODEL": str(launch.workmodel_path),
        "MUBENCH_SEED": str(launch.seed),
        "MUBENCH_SCALE": repr(launch.scale),
    }
    if launch.functions_dir:
        cell_env["MUBENCH_FUNCTIONS_DIR"] = str(launch.functions_dir)
    for svc, (workers, threads) in launch.plan.items():
        env = {"APP": svc, "PN": str(workers), "DPUMESH_THREADS": str(threads), **cell_env}
        launch.start(
            f"app-{svc}",
            _python("dpumesh.server", "mubench.dpumesh_app:app"),
            role="app",
            env=env,
            ready=watch.ready(svc, workers),
        )
    return _Launched(
        read_traffic=lambda: dpumesh_traffic(launch.port, launch.services),
        front=("dpu-daemon", "dpa-daemon", f"app-{launch.entry}"),
        probe=BRIDGE_HEALTH_PATH,
        details={"namespace": ns},
    )


_LAUNCHERS: dict[str, Callable[[_Launch], _Launched]] = {
    "dpumesh": _launch_dpumesh,
    "envoy": _launch_envoy,
    "nomesh": _launch_nomesh,
}


class _WorkerWatch:
    """Live DPUmesh workers per service from the bridge's stats, fetched at most every 0.2 s.

    One fetch serves every service's readiness check in a polling round.
    """

    def __init__(self, bridge_port: int) -> None:
        self._port = bridge_port
        self._workers: dict[str, list[int]] = {}
        self._fetched = -_STATS_TTL_S

    def ready(self, service: str, expected: int) -> ReadyCheck:
        """Ready when `service` has exactly `expected` live workers."""
        return lambda: len(self._current().get(service, [])) == expected

    def _current(self) -> dict[str, list[int]]:
        now = time.monotonic()
        if now - self._fetched >= _STATS_TTL_S:
            self._fetched = now
            try:
                self._workers = get_json(self._port, BRIDGE_STATS_PATH, timeout_s=2.0)["workers"]
            except (OSError, RuntimeError, ValueError, http.client.HTTPException):
                self._workers = {}
        return self._workers


def _remove_shm(ns: str) -> None:
    """Unlink what the (now dead) processes of `ns` left in /dev/shm, saying so.

    The namespace is unique to this stack start, so nothing else uses it.
    """
    leftovers = naming.remove_all(ns)
    if leftovers:
        names = ", ".join(obj.name for obj in leftovers)
        print(f"warning: removed shared memory left by stopped processes: {names}", file=sys.stderr)


def _wait_answering(launch: _Launch, launched: _Launched) -> None:
    """Every process still alive and the public URL answering 200, or `StartError`."""
    for proc in launch.sup.procs.values():
        status = proc.exit_status()
        if status is not None:
            raise launch.fail([proc.name], f"{proc.name} ended ({status}) after it was ready")
    answers = http_ok(launch.url + launched.probe)
    while not answers():
        if time.monotonic() > launch.deadline:
            raise launch.fail(launched.front, f"{launch.url}{launched.probe} does not answer 200")
        time.sleep(0.1)


def _write_manifest(launch: _Launch, launched: _Launched, warnings: list[str]) -> Path:
    """`stack.json`: what ran, how, as which pids, with which configs."""
    roles = launch.sup.roles()
    manifest = {
        "mesh": launch.mesh,
        "url": launch.url,
        "workmodel": str(launch.workmodel_path),
        "entry": launch.entry,
        "seed": launch.seed,
        "scale": launch.scale,
        "plan": {svc: {"workers": w, "threads": t} for svc, (w, t) in launch.plan.items()},
        "warnings": warnings,
        **launched.details,
        "ports": launch.ports,
        "configs": {name: str(path) for name, path in launched.configs.items()},
        "processes": [
            {
                "name": proc.name,
                "role": proc.role,
                "argv": proc.argv,
                "env": launch.env.get(proc.name, {}),
                "log": str(proc.log_path),
            }
            for proc in launch.sup.procs.values()
        ],
        "pids": {
            role: [{"pid": p.pid, "create_time": p.create_time()} for p in roles[role]]
            for role in STACK_ROLES
        },
    }
    path = launch.run_dir / MANIFEST
    path.write_text(json.dumps(manifest, indent=2) + "\n")
    return path
