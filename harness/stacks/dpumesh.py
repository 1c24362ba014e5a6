"""`dpumesh`: the DMA manager, the sidecar with its bridge on the public port, the workers.

All of them share one IPC namespace (the dpa-daemon's): rings, registry and
doorbells live in its /dev/shm. The workers and the DMA manager need no
network: every request reaches them through the shared-memory queues. The
daemons' CPU set is `dpu` (DESIGN §5): on real hardware they run on the DPU.
`DPUMESH_NS` (`{ipc}`) names the mesh's shared objects; a deployer picks it so
that two stacks on one machine never meet.
"""

from __future__ import annotations

from dpumesh.dpu_daemon import HEALTH_PATH as BRIDGE_HEALTH_PATH
from dpumesh.dpu_daemon import STATS_PATH as BRIDGE_STATS_PATH
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

DPA = "dpa-daemon"
DPU = "dpu-daemon"
APP_MODULE = "mubench.dpumesh_app:app"


def dpa_daemon(*, dma_latency_us: float = 0.0, dma_gbps: float = 0.0) -> Component:
    """The DMA manager (owner of the mesh's IPC namespace)."""
    dma = ()
    if dma_latency_us or dma_gbps:
        dma = ("--dma-latency-us", repr(dma_latency_us), "--dma-gbps", repr(dma_gbps))
    return Component(
        name=DPA,
        role="dpa-daemon",
        program="python",
        args=("-m", "dpumesh.dpa_daemon", "--ns", "{ipc}", *dma, "--log-level", "WARNING"),
        ipc_owner=True,
        network=False,
    )


def dpu_daemon(entry: str = "s0", services: tuple[str, ...] = (), *extra: str) -> Component:
    """The sidecar: L7 routing, the TCP bridge on the public port, the HTTP fallback.

    `services` are the services it expects workers of; `extra` more daemon flags.
    """
    expected = tuple(arg for svc in services for arg in ("--service", svc))
    return Component(
        name=DPU,
        role="dpu-daemon",
        program="python",
        args=(
            *("-m", "dpumesh.dpu_daemon", "--ns", "{ipc}"),
            *("--host", "{bind}", "--port", f"{{port:{DPU}:public}}"),
            *("--entry", entry, *expected, *extra, "--log-level", "WARNING"),
        ),
        ports={"public": Port(PUBLIC_PORT, public=True, read=True)},
        probe=Probe("public", BRIDGE_HEALTH_PATH),
        ipc_of=DPA,
    )


def worker(
    service: str,
    workers: int,
    threads: int,
    *,
    app: str = APP_MODULE,
    env: dict[str, str] | None = None,
    files: tuple = (),
) -> Component:
    """One service's worker runtime (`dpumesh.server`, `PN` worker processes)."""
    return Component(
        name=app_name(service),
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
        probe=WorkersProbe(DPU, "public", BRIDGE_STATS_PATH, service, workers),
        files=files,
        ipc_of=DPA,
        network=False,
    )


def assemble(
    settings: Settings,
    entry: str,
    plan: dict[str, tuple[int, int]],
    workers: tuple[Component, ...],
    warnings: tuple[str, ...] = (),
) -> StackDescription:
    """The stack around `workers`: both daemons, the bridge as the public port."""
    services = tuple(plan)
    return StackDescription(
        mesh="dpumesh",
        settings=settings,
        entry=entry,
        services=services,
        plan=plan,
        warnings=warnings,
        components=(
            dpa_daemon(dma_latency_us=settings.dma_latency_us, dma_gbps=settings.dma_gbps),
            dpu_daemon(entry, services),
            *workers,
        ),
        probe_path=BRIDGE_HEALTH_PATH,
        counters=Counters("dpumesh", {"bridge": (DPU, "public")}),
        front=(DPU, DPA, app_name(entry)),
    )


def describe(cell: Cell) -> StackDescription:
    workers = tuple(
        worker(svc, w, t, env=cell.cell_env(), files=cell.files())
        for svc, (w, t) in cell.plan.items()
    )
    return assemble(cell.settings, cell.entry, cell.plan, workers, cell.warnings)
