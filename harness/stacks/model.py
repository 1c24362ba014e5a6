"""A stack as data (DESIGN §7): what runs, with nothing in it about where or how.

A `StackDescription` lists `Component`s: name, role, μBench service, program
and arguments, environment, named ports, readiness probe, files, which
component's network or IPC namespace it joins, and its CPU set. Deployers
(`harness.deploy`) decide where and how each component runs; they never add,
drop or change a component.

Arguments, environment values and generated files refer to the things a
deployer decides through placeholders, resolved by `render` with the
deployer's `Resolver`:

====================  ==========================================================
``{bind}``            the address the component listens on (127.0.0.1 locally,
                      0.0.0.0 in a container)
``{port:C:P}``        the number of component C's port P
``{host:C}``          how this component reaches component C (loopback when they
                      share a network namespace, else C's address or name)
``{file:F}``          the path of this component's file F
``{ipc}``             the name of the component's IPC group (`DPUMESH_NS`)
``{node}``            the name of the node the component runs on
====================  ==========================================================

So the same description renders to a local command line, a compose service
or a Kubernetes container, and a test can compare those renderings with the
placeholders masked (the deployers' parity).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from baselines.envoy.config import DEFAULT_CONCURRENCY
from harness.names import CPU_SETS, ENVOY_MESHES, LOCAL_NODE, ROLE_CPU_SET, ROLES
from harness.stacks.topology import Topology
from mubench.workmodel import DEFAULT_PER_SERVICE_CAP, DEFAULT_TOTAL_CAP

PROGRAMS = ("python", "envoy")
_PLACEHOLDER = re.compile(r"\{(bind|port|host|file|ipc|node)(?::([^{}:]+))?(?::([^{}:]+))?\}")


class Resolver(Protocol):
    """What a deployer decides, asked for by the placeholders of one component."""

    def bind(self, component: Component) -> str:
        """The address `component` listens on."""
        ...

    def port(self, component: Component, target: str, port: str) -> int:
        """The number of `target`'s port `port`, as `component` connects to it (or binds it)."""
        ...

    def host(self, component: Component, target: str) -> str:
        """The address or name by which `component` reaches `target`."""
        ...

    def file(self, component: Component, name: str) -> str:
        """Where `component` finds its file `name`."""
        ...

    def ipc(self, component: Component) -> str:
        """The DPUmesh namespace of `component`'s IPC group."""
        ...

    def node(self, component: Component) -> str:
        """The node `component` runs on."""
        ...


@dataclass(frozen=True)
class Port:
    """A port a component binds, with its number inside a container of its own.

    `public`: the stack's one public port (the URL load is sent to). `read`:
    the harness reads it from the host (admin stats, app counters, health),
    so a container deployer publishes it on a loopback port.
    """

    number: int
    public: bool = False
    read: bool = False


@dataclass(frozen=True)
class Probe:
    """Ready when `GET <component's port>/<path>` answers 200."""

    port: str
    path: str


@dataclass(frozen=True)
class WorkersProbe:
    """Ready when the DPUmesh bridge (`component`'s `port`) lists `count` live workers of `service`.

    A worker has no port of its own: it is ready once it registered with the mesh.
    """

    component: str
    port: str
    path: str
    service: str
    count: int


@dataclass(frozen=True)
class File:
    """A file a component reads: copied from `source`, or generated from the rendered stack.

    `mount` is its path inside a container; locally the file is used where it is
    (`source`) or written to the run directory (generated). `generate` gets the
    resolver of the component that reads it, so addresses inside match.
    `secret`: key material (`harness.deploy.files`: readable by its reader only,
    never published with the results; a Kubernetes Secret, not a ConfigMap).
    """

    name: str
    mount: str
    source: Path | None = None
    generate: Callable[[Resolver, Component], str] | None = None
    # Validates a generated file once written, given where its reader's other files were
    # written here, by their path in its container (`mount`), for a file that names them.
    check: Callable[[Path, Mapping[str, Path]], None] | None = None
    directory: bool = False
    secret: bool = False

    def __post_init__(self) -> None:
        if (self.source is None) == (self.generate is None):
            raise ValueError(f"file {self.name}: exactly one of source and generate")
        if self.secret and self.generate is None:
            raise ValueError(f"file {self.name}: only a generated file can be secret")


@dataclass(frozen=True)
class Component:
    """One process (one container, one pod container) of a stack."""

    name: str
    role: str
    program: str  # one of PROGRAMS; deployers map it to an executable
    args: tuple[str, ...]
    service: str = ""  # the μBench service it serves, "" for shared parts
    env: Mapping[str, str] = field(default_factory=dict)
    ports: Mapping[str, Port] = field(default_factory=dict)
    probe: Probe | WorkersProbe | None = None
    files: tuple[File, ...] = ()
    network_of: str | None = None  # joins this component's network namespace (a pod)
    ipc_of: str | None = None  # joins this component's IPC namespace (/dev/shm)
    ipc_owner: bool = False  # others join its IPC namespace
    network: bool = True  # False: needs no network at all (reached through shared memory)
    node: str = LOCAL_NODE  # the node it runs on (`harness.stacks.topology`)

    def __post_init__(self) -> None:
        if self.role not in ROLES or self.role == "loadgen":
            raise ValueError(f"component {self.name}: role {self.role!r} is not a stack role")
        if self.program not in PROGRAMS:
            raise ValueError(f"component {self.name}: program {self.program!r} not in {PROGRAMS}")

    @property
    def cpu_set(self) -> str:
        """The CPU set its role belongs to (DESIGN §5)."""
        return ROLE_CPU_SET[self.role]

    def file(self, name: str) -> File:
        for item in self.files:
            if item.name == name:
                return item
        raise KeyError(f"component {self.name} has no file {name!r}")


@dataclass(frozen=True)
class Settings:
    """What a stack is built from besides its mesh: the cell and the mesh's own knobs."""

    workmodel: Path | None  # None: the stack's apps read no workmodel (test or benchmark apps)
    seed: int = 0
    scale: float = 1.0
    functions_dir: Path | None = None
    per_service_cap: int = DEFAULT_PER_SERVICE_CAP
    total_cap: int = DEFAULT_TOTAL_CAP
    envoy_concurrency: int = DEFAULT_CONCURRENCY
    dma_latency_us: float = 0.0
    dma_gbps: float = 0.0
    mtls: bool = False  # mutual TLS between the Envoy stacks' proxies (`ENVOY_MESHES`)
    nodes: int = 0  # 0: this machine; N: N node namespaces (`harness.stacks.topology`)
    place: tuple[tuple[str, int], ...] = ()  # (service, node number) pairs; others round robin

    def as_dict(self) -> dict[str, Any]:
        return {
            "workmodel": str(self.workmodel) if self.workmodel else None,
            "seed": self.seed,
            "scale": self.scale,
            "functions_dir": str(self.functions_dir) if self.functions_dir else None,
            "per_service_cap": self.per_service_cap,
            "total_cap": self.total_cap,
            "envoy_concurrency": self.envoy_concurrency,
            "dma_latency_us": self.dma_latency_us,
            "dma_gbps": self.dma_gbps,
            "mtls": self.mtls,
            "nodes": self.nodes,
            "place": {service: number for service, number in self.place},
        }


@dataclass(frozen=True)
class ServedAt:
    """Where an Envoy stack counts the requests one service instance received, and its 5xx
    answers: the sums of stats (full names) of the Envoy `proxy` in front of the instance's app."""

    proxy: str
    requests: tuple[str, ...]
    errors: tuple[str, ...]


@dataclass(frozen=True)
class Counters:
    """Where a stack's traffic counters are (`harness.measure.accounting`).

    `endpoints` name (component, port) pairs the reader of `kind` needs:
    ``app:<component>`` for an app's own counters, ``admin:<envoy>`` for Envoy
    admin stats, ``bridge:<node>`` for a node's DPUmesh bridge. Kind ``envoy``
    also says, per service, which Envoy stats count each instance (`served`)
    and which stats count requests an Envoy carried to another node
    (`crossing`: (Envoy, stat) pairs, summed).
    """

    kind: str
    endpoints: Mapping[str, tuple[str, str]]
    served: Mapping[str, tuple[ServedAt, ...]] = field(default_factory=dict)
    crossing: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class StackDescription:
    """One stack: its components in start order and what the harness needs to drive it."""

    mesh: str
    settings: Settings
    entry: str  # the entry μBench service
    services: tuple[str, ...]
    plan: Mapping[str, tuple[int, int]]  # (workers, threads) per service
    warnings: tuple[str, ...]
    components: tuple[Component, ...]
    probe_path: str  # must answer 200 on the public URL once the stack is ready
    counters: Counters
    # Components whose logs explain a public URL that does not answer.
    front: tuple[str, ...]
    topology: Topology  # the nodes, and where each service's instances run

    def __post_init__(self) -> None:
        names = [c.name for c in self.components]
        if len(set(names)) != len(names):
            raise ValueError(f"{self.mesh}: component names repeat: {names}")
        public = [(c.name, p) for c in self.components for p, s in c.ports.items() if s.public]
        if len(public) != 1:
            raise ValueError(f"{self.mesh}: exactly one public port, not {public}")
        known = set(names)
        for c in self.components:
            if c.node not in self.topology.nodes:
                raise ValueError(f"{self.mesh}: {c.name} is on unknown node {c.node}")
            for ref in (c.network_of, c.ipc_of):
                if ref is not None and ref not in known:
                    raise ValueError(f"{self.mesh}: {c.name} joins unknown component {ref}")
                if ref is not None and self.component(ref).node != c.node:
                    raise ValueError(f"{self.mesh}: {c.name} joins {ref} on another node")
            if c.cpu_set not in CPU_SETS:
                raise ValueError(f"{self.mesh}: {c.name} has unknown CPU set {c.cpu_set}")

    def component(self, name: str) -> Component:
        for c in self.components:
            if c.name == name:
                return c
        raise KeyError(f"{self.mesh} stack has no component {name!r}")

    @property
    def mtls(self) -> bool:
        """Whether its proxy-to-proxy hops run mutual TLS (asked for, and an Envoy stack)."""
        return self.settings.mtls and self.mesh in ENVOY_MESHES

    @property
    def public(self) -> tuple[Component, str]:
        """The component and port name of the stack's public port."""
        for c in self.components:
            for name, spec in c.ports.items():
                if spec.public:
                    return c, name
        raise AssertionError("checked in __post_init__")

    def network_owner(self, name: str) -> Component:
        """The component whose network namespace `name` lives in (itself, or its pod owner)."""
        component = self.component(name)
        return self.component(component.network_of) if component.network_of else component


@dataclass(frozen=True)
class Rendered:
    """A component with every placeholder resolved: what a deployer runs."""

    component: Component
    args: tuple[str, ...]
    env: Mapping[str, str]
    files: Mapping[str, str]  # generated files: name -> content


def substitute(text: str, component: Component, resolver: Resolver) -> str:
    """`text` with its placeholders resolved for `component` (see the module docstring)."""

    def one(match: re.Match[str]) -> str:
        kind, first, second = match.groups()
        if kind == "bind" and first is None:
            return resolver.bind(component)
        if kind == "port" and first and second:
            return str(resolver.port(component, first, second))
        if kind == "host" and first and second is None:
            return resolver.host(component, first)
        if kind == "file" and first and second is None:
            return resolver.file(component, first)
        if kind == "ipc" and first is None:
            return resolver.ipc(component)
        if kind == "node" and first is None:
            return resolver.node(component)
        raise ValueError(f"component {component.name}: bad placeholder {match.group(0)!r}")

    return _PLACEHOLDER.sub(one, text)


def render(component: Component, resolver: Resolver) -> Rendered:
    """Resolve one component's arguments, environment and generated files."""
    return Rendered(
        component=component,
        args=tuple(substitute(a, component, resolver) for a in component.args),
        env={k: substitute(v, component, resolver) for k, v in component.env.items()},
        files={
            f.name: f.generate(resolver, component)
            for f in component.files
            if f.generate is not None
        },
    )


def placeholders(values: Sequence[str]) -> list[str]:
    """Every placeholder in `values`, in order (for tests and manifests)."""
    return [m.group(0) for v in values for m in _PLACEHOLDER.finditer(v)]
