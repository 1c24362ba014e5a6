"""The μBench cell every stack runs: its files, its plain-HTTP app, the entry service.

One place for what must be identical across stacks (DESIGN §5): the same
workmodel file, seed, scale, custom functions and worker plan.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from harness.names import LOCAL_NODE
from harness.stacks.model import Component, Counters, File, Port, Probe, Settings, StackDescription
from harness.stacks.topology import Topology, place
from mubench.http_app import HEALTH_PATH as APP_HEALTH_PATH
from mubench.internal import custom_function_names
from mubench.workmodel import Workmodel, WorkmodelError, load_workmodel, plan_processes

WORKMODEL_MOUNT = "/etc/mubench/workmodel.json"
FUNCTIONS_MOUNT = "/etc/mubench/functions"
PUBLIC_PORT = 5005  # the bridge, gateway or entry app inside its container


@dataclass(frozen=True)
class Cell:
    """A loaded workmodel with its worker plan: what every stack of one run shares."""

    settings: Settings
    workmodel: Workmodel
    plan: dict[str, tuple[int, int]]
    warnings: tuple[str, ...]
    topology: Topology

    @property
    def services(self) -> tuple[str, ...]:
        return tuple(self.workmodel)

    @property
    def entry(self) -> str:
        return entry_service(self.workmodel)

    def stack(
        self,
        mesh: str,
        components: tuple[Component, ...],
        counters: Counters,
        front: tuple[str, ...],
    ) -> StackDescription:
        """A stack of the cell's apps (`http_app`): the cell's settings, services and plan."""
        return StackDescription(
            mesh=mesh,
            settings=self.settings,
            entry=self.entry,
            services=self.services,
            plan=self.plan,
            warnings=self.warnings,
            components=components,
            probe_path=APP_HEALTH_PATH,
            counters=counters,
            front=front,
            topology=self.topology,
        )

    def instances(self) -> list[tuple[str, str]]:
        """Every (service, node) instance of the cell, service by service."""
        return [(s, node) for s in self.services for node in self.topology.nodes_of(s)]

    def app_of(self, service: str, node: str) -> str:
        """The component name of `service`'s app (or DPUmesh workers) on `node`."""
        return self.instance_name(app_name(service), service, node)

    def instance_name(self, base: str, service: str, node: str) -> str:
        """A component name of one instance: `base`, with its node when the service has several."""
        return f"{base}-{node}" if self.topology.replicated(service) else base

    def files(self) -> tuple[File, ...]:
        """The workmodel and, if any, the directory of custom functions."""
        files = [File("workmodel", WORKMODEL_MOUNT, source=self.settings.workmodel)]
        if self.settings.functions_dir:
            files.append(
                File(
                    "functions", FUNCTIONS_MOUNT, source=self.settings.functions_dir, directory=True
                )
            )
        return tuple(files)

    def cell_args(self) -> tuple[str, ...]:
        """Seed, scale and custom functions, as `mubench.http_app` takes them."""
        functions = ("--functions-dir", "{file:functions}") if self.settings.functions_dir else ()
        return ("--seed", str(self.settings.seed), "--scale", repr(self.settings.scale), *functions)

    def cell_env(self) -> dict[str, str]:
        """The same settings as `mubench.dpumesh_app` reads them (environment)."""
        env = {
            "MUBENCH_WORKMODEL": "{file:workmodel}",
            "MUBENCH_SEED": str(self.settings.seed),
            "MUBENCH_SCALE": repr(self.settings.scale),
        }
        if self.settings.functions_dir:
            env["MUBENCH_FUNCTIONS_DIR"] = "{file:functions}"
        return env


def entry_service(workmodel: Workmodel) -> str:
    """μBench's convention: `s0`, or without one the first service in the file."""
    return "s0" if "s0" in workmodel else next(iter(workmodel))


def load_cell(settings: Settings) -> Cell:
    """Load and validate the workmodel and plan its workers (`WorkmodelError` if unusable)."""
    custom = custom_function_names(settings.functions_dir)
    workmodel = load_workmodel(str(settings.workmodel), custom=custom)
    plan, warnings = plan_processes(workmodel, settings.per_service_cap, settings.total_cap)
    services = tuple(workmodel)
    entry = entry_service(workmodel)
    replicas = {s: spec.replicas for s, spec in workmodel.items() if spec.replicas}
    try:
        topology = place(services, entry, settings.nodes, settings.place, replicas)
    except ValueError as exc:
        raise WorkmodelError(f"{settings.workmodel}: {exc}") from None
    warnings += [
        f"node {node} runs no service (its per-node parts start anyway)"
        for node in topology.empty_nodes()
    ]
    return Cell(settings, workmodel, plan, tuple(warnings), topology)


def service_port(cell: Cell, service: str, offset: int) -> int:
    """A fixed port number for `service` (inside containers), distinct across the stack."""
    return 20000 + 10 * cell.services.index(service) + offset


def app_name(service: str) -> str:
    return f"app-{service}"


def app_counters(apps: Sequence[Component]) -> dict[str, tuple[str, str]]:
    """The plain-HTTP apps' own counter endpoints (`harness.measure.accounting`)."""
    return {f"app:{c.name}": (c.name, "http") for c in apps}


def http_app(
    cell: Cell,
    service: str,
    routing: tuple[str, ...],
    *,
    public: bool = False,
    network_of: str | None = None,
    node: str = LOCAL_NODE,
) -> Component:
    """The plain-HTTP μBench cell of one instance of a service (the stacks but dpumesh)."""
    workers, threads = cell.plan[service]
    name = cell.app_of(service, node)
    number = PUBLIC_PORT if public else service_port(cell, service, 0)
    return Component(
        name=name,
        role="app",
        service=service,
        program="python",
        args=(
            *("-m", "mubench.http_app", "--workmodel", "{file:workmodel}", "--service", service),
            *("--host", "{bind}", "--port", f"{{port:{name}:http}}"),
            *("--workers", str(workers), "--threads", str(threads)),
            *cell.cell_args(),
            *routing,
        ),
        ports={"http": Port(number, public=public, read=True)},
        probe=Probe("http", APP_HEALTH_PATH),
        files=cell.files(),
        network_of=network_of,
        node=node,
    )
