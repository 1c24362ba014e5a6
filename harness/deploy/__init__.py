"""Deployers: run a stack description (`harness.stacks`) somewhere, behind one interface.

* `local`: processes on this machine under a `harness.procs.Supervisor`;
* `compose`: one container per component (`harness.deploy.compose`);
* `k8s`: Kubernetes manifests only (`harness.deploy.k8s`); nothing here runs them.

A deployer decides where and how a component runs (addresses, ports, paths,
namespaces), never what runs. Whatever the deployer, the runner sees a
`RunningStack` and every start writes the same `stack.json`
(`harness.deploy.manifest`).

Every component of a running stack is restarted when it dies, per the
start's `harness.procs.RestartPolicy` (DESIGN §9): `local` by its
`Supervisor` (with the policy's back-off), `compose` by Docker (`restart:
always` or `"no"`, with Docker's own back-off), `k8s` by the controllers
(see `harness.deploy.k8s`). `RunningStack.restarts()` and
`restart_events()` say what was restarted; the self-check
`harness.measure.checks.no_restarts` flags a restart during a measured
window.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Protocol

import psutil

from harness.measure.accounting import Traffic
from harness.measure.metrics import WindowUsage
from harness.names import DEFAULT_PORT, DEFAULT_WORKMODEL, MODES
from harness.placement.apply import Placement
from harness.placement.layout import PlacementError
from harness.procs import ALWAYS, RestartPolicy
from harness.stacks import describe
from harness.stacks.model import Settings, StackDescription


class Sampler(Protocol):
    """CPU and memory per role over one window (`harness.measure.metrics.RoleSampler`)."""

    def start(self) -> None: ...

    def stop(self) -> WindowUsage: ...


class RunningStack(Protocol):
    """A started stack, whatever runs it. `stop()` is idempotent; so is leaving `with`."""

    mesh: str
    url: str
    entry: str
    run_dir: Path
    manifest: Path
    configs: Mapping[str, Path]

    def traffic(self) -> Traffic:
        """Requests that crossed the stack since it became ready."""
        ...

    def pids_by_set(self) -> dict[str, list[int]]:
        """Live pids per CPU set (`host`, `dpu`), to read back the placement in force."""
        ...

    def sampler(self, extra_roles: Mapping[str, Iterable[psutil.Process]]) -> Sampler:
        """A sampler over the stack's roles plus `extra_roles` (the load generator)."""
        ...

    def restarts(self) -> dict[str, int]:
        """Restarts per component since the stack started (every component present)."""
        ...

    def restart_events(self) -> list[dict[str, Any]]:
        """Each restart, oldest first: at least `component`, `role`, `at_wall_s`,
        `at_mono_s` (when the end was seen, or the new start where only that is
        known) and `how` it ended."""
        ...

    def component_processes(self, name: str) -> list[psutil.Process]:
        """The live processes of component `name`, its program first: what a fault hits."""
        ...

    def client_argv(self, argv: list[str]) -> list[str]:
        """`argv` run where the load generator belongs (a node of its own, DESIGN §8)."""
        ...

    def stop(self) -> None: ...

    def __enter__(self) -> RunningStack: ...

    def __exit__(self, *exc: object) -> None: ...


def check_placement(mode: str, placement: Placement | None) -> None:
    """Refuse, before anything starts, a placement the deployer of `mode` cannot honour.

    Compose holds the DPU speed by making the daemons' containers under the
    placement's cgroup, which needs Docker's `cgroupfs` cgroup driver (the
    `systemd` one takes only slices as parents).
    """
    if mode != "compose" or placement is None or placement.group is None:
        return
    from harness.deploy.compose.cli import docker_client  # the Docker SDK only when asked for

    driver = docker_client().info().get("CgroupDriver")
    if driver != "cgroupfs":
        raise PlacementError(
            f"compose mode cannot hold the DPU at {placement.model.dpu_speed:g}x host speed: "
            f"Docker's cgroup driver is {driver!r}, not 'cgroupfs'; use --mode local"
        )


def start(
    mode: str,
    desc: StackDescription,
    *,
    run_dir: str | Path,
    port: int = DEFAULT_PORT,
    restart: RestartPolicy = ALWAYS,
    **kw: Any,
) -> RunningStack:
    """Start `desc` with the deployer of `mode`; its public port is `127.0.0.1:port`.

    `restart` applies to every component once the stack answers.
    """
    if mode == "local":
        from harness.deploy import local

        return local.start(desc, run_dir=Path(run_dir), port=port, restart=restart, **kw)
    if mode == "compose":
        from harness.deploy import compose  # the Docker SDK only when asked for

        return compose.start(desc, run_dir=Path(run_dir), port=port, restart=restart, **kw)
    raise ValueError(f"unknown mode {mode!r} (one of {', '.join(MODES)})")


def start_stack(
    mesh: str,
    workmodel: str | Path = DEFAULT_WORKMODEL,
    *,
    run_dir: str | Path,
    port: int = DEFAULT_PORT,
    mode: str = "local",
    ready_timeout_s: float | None = None,
    placement: Placement | None = None,
    restart: RestartPolicy = ALWAYS,
    **settings: Any,
) -> RunningStack:
    """Describe `mesh` for `workmodel` with `settings` (`Settings` fields) and start it."""
    desc = describe(mesh, Settings(workmodel=Path(workmodel).resolve(), **settings))
    extra: dict[str, Any] = {} if ready_timeout_s is None else {"ready_timeout_s": ready_timeout_s}
    if placement is not None:
        extra["placement"] = placement
    return start(mode, desc, run_dir=run_dir, port=port, restart=restart, **extra)
