"""`dpumesh`: the DMA manager, the sidecar with its bridge on the public port, the workers.

Per node (DESIGN §8, the seed's DaemonSets): one DMA manager, one sidecar
and the workers of the services placed there, sharing one IPC namespace (the
node's dpa-daemon's): rings, registry and doorbells live in its /dev/shm. A
call for a service with no worker on the node leaves through the node's
sidecar (HTTP fallback) to the sidecar of a node that has one. The workers
and the DMA manager need no network: every request reaches them through the
shared-memory queues. The daemons' CPU set is `dpu` (DESIGN §5): on real
hardware they run on the DPU. `DPUMESH_NS` (`{ipc}`) names a node's shared
objects; a deployer picks it so that two stacks (or nodes) never meet.
"""

from __future__ import annotations

from collections.abc import Callable

from dpumesh.dpu_daemon import HEALTH_PATH as BRIDGE_HEALTH_PATH
from dpumesh.dpu_daemon import STATS_PATH as BRIDGE_STATS_PATH
from harness.names import LOCAL_NODE
from harness.stacks.cell import PUBLIC_PORT, Cell, app_name
from harness.stacks.model import (
    Component,
    Counters,
    Port,
    Probe,
    Settings,
    StackDescription,
    WorkersProbe,
)
from harness.stacks.topology import Topology, place

DPA = "dpa-daemon"
DPU = "dpu-daemon"
APP_MODULE = "mubench.dpumesh_app:app"


def dpa_daemon(
    *, dma_latency_us: float = 0.0, dma_gbps: float = 0.0, name: str = DPA, node: str = LOCAL_NODE
) -> Component:
    """The DMA manager of one node (owner of that node's IPC namespace)."""
    dma = ()
    if dma_latency_us or dma_gbps:
        dma = ("--dma-latency-us", repr(dma_latency_us), "--dma-gbps", repr(dma_gbps))
    return Component(
        name=name,
        role="dpa-daemon",
        program="python",
        args=("-m", "dpumesh.dpa_daemon", "--ns", "{ipc}", *dma, "--log-level", "WARNING"),
        ipc_owner=True,
        network=False,
        node=node,
    )


def dpu_daemon(
    entry: str = "s0",
    services: tuple[str, ...] = (),
    *extra: str,
    name: str = DPU,
    dpa: str = DPA,
    node: str = LOCAL_NODE,
    public: bool = True,
) -> Component:
    """A node's sidecar: L7 routing, the TCP bridge (the public port on the entry node), the
    HTTP fallback.

    `services` are the services it expects (503, not 404, while one has no worker);
    `extra` more daemon flags (the fallback routes of a node's non-local services).
    """
    expected = tuple(arg for svc in services for arg in ("--service", svc))
    return Component(
        name=name,
        role="dpu-daemon",
        program="python",
        args=(
            *("-m", "dpumesh.dpu_daemon", "--ns", "{ipc}"),
            *("--host", "{bind}", "--port", f"{{port:{name}:public}}"),
            *("--entry", entry, *expected, *extra, "--log-level", "WARNING"),
        ),
        ports={"public": Port(PUBLIC_PORT, public=public, read=True)},
        probe=Probe("public", BRIDGE_HEALTH_PATH),
        ipc_of=dpa,
        node=node,
    )


def worker(
    service: str,
    workers: int,
    threads: int,
    *,
    app: str = APP_MODULE,
    env: dict[str, str] | None = None,
    files: tuple = (),
    name: str | None = None,
    daemons: tuple[str, str] = (DPA, DPU),
    node: str = LOCAL_NODE,
) -> Component:
    """One service's worker runtime on one node (`dpumesh.server`, `PN` worker processes),
    in the IPC namespace of that node's `daemons` (DMA manager, sidecar)."""
    dpa, dpu = daemons
    return Component(
        name=name or app_name(service),
        role="app",
        service=service,
        program="python",
        args=("-m", "dpumesh.server", app),
        env={
            "APP": service,
            "ZONE": "{node}",
            "K8S_APP": f"{service}-worker",
            "PN": str(workers),
            "DPUMESH_THREADS": str(threads),
            "DPUMESH_NS": "{ipc}",
            **(env or {}),
        },
        probe=WorkersProbe(dpu, "public", BRIDGE_STATS_PATH, service, workers),
        files=files,
        ipc_of=dpa,
        network=False,
        node=node,
    )


def daemon_names(topology: Topology, node: str) -> tuple[str, str]:
    """The (DMA manager, sidecar) of `node`: named after it when the run has several nodes."""
    if len(topology.nodes) == 1:
        return DPA, DPU
    return f"{DPA}-{node}", f"{DPU}-{node}"


def stack(
    settings: Settings,
    entry: str,
    plan: dict[str, tuple[int, int]],
    topology: Topology,
    make_worker: Callable[..., Component],
    warnings: tuple[str, ...] = (),
) -> StackDescription:
    """Per node both daemons and the workers of the services placed there; the entry node's
    bridge is the public port. `make_worker(service, node, daemons)` builds a worker.

    A node's sidecar routes a service with no instance on its node to the sidecars of the
    nodes that have one (`--route`, HTTP fallback, `topology.targets`)."""
    services = tuple(plan)
    components: list[Component] = []
    for node in topology.nodes:
        dpa, dpu = daemon_names(topology, node)
        local = topology.services_on(node)
        routes = []
        for svc in services:
            if svc in local:
                continue
            for target in topology.targets(node, svc):
                peer = daemon_names(topology, target)[1]
                routes += ["--route", f"{svc}=http://{{host:{peer}}}:{{port:{peer}:public}}"]
        components += [
            dpa_daemon(
                dma_latency_us=settings.dma_latency_us,
                dma_gbps=settings.dma_gbps,
                name=dpa,
                node=node,
            ),
            dpu_daemon(
                entry,
                services,
                *routes,
                name=dpu,
                dpa=dpa,
                node=node,
                public=node == topology.nodes[0],
            ),
        ]
        components += [make_worker(svc, node, (dpa, dpu)) for svc in local]
    entry_node = topology.nodes[0]
    dpa, dpu = daemon_names(topology, entry_node)
    entry_worker = next(c.name for c in components if c.service == entry and c.node == entry_node)
    bridges = {
        f"bridge:{node}": (daemon_names(topology, node)[1], "public") for node in topology.nodes
    }
    return StackDescription(
        mesh="dpumesh",
        settings=settings,
        entry=entry,
        services=services,
        plan=plan,
        warnings=warnings,
        components=tuple(components),
        probe_path=BRIDGE_HEALTH_PATH,
        counters=Counters("dpumesh", bridges),
        front=(dpu, dpa, entry_worker),
        topology=topology,
    )


def assemble(
    settings: Settings,
    entry: str,
    plan: dict[str, tuple[int, int]],
    workers: tuple[Component, ...],
    warnings: tuple[str, ...] = (),
) -> StackDescription:
    """A one-node stack around ready-made `workers` (test and benchmark apps)."""
    by_service = {w.service: w for w in workers}
    return stack(
        settings,
        entry,
        plan,
        place(tuple(plan), entry, 0),
        lambda svc, _node, _daemons: by_service[svc],
        warnings,
    )


def describe(cell: Cell) -> StackDescription:
    def make_worker(svc: str, node: str, daemons: tuple[str, str]) -> Component:
        workers, threads = cell.plan[svc]
        return worker(
            svc,
            workers,
            threads,
            env=cell.cell_env(),
            files=cell.files(),
            name=cell.app_of(svc, node),
            daemons=daemons,
            node=node,
        )

    return stack(cell.settings, cell.entry, cell.plan, cell.topology, make_worker, cell.warnings)
