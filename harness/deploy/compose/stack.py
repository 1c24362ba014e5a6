"""A started compose project: readiness, published ports, traffic, restarts, manifest, teardown.

Restarts are Docker's (the compose file's `restart:`): a container whose
process dies is started again by the engine. From the moment the stack is
ready a `restarts.RestartWatch` records them from the engine's events and
restarts the containers sharing a restarted container's namespaces (see
there). A container that restarts before the stack is ready fails the
start, as a local process dying before it is ready does. Ports published on
an ephemeral host port may move when their container restarts, so they are
looked up again after any restart.
"""

from __future__ import annotations

import atexit
import contextlib
import http.client
import json
import signal
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import docker.errors
import psutil
from docker.models.containers import Container

from harness.deploy import files, manifest
from harness.deploy.compose.cli import (
    PROJECT_LABEL,
    SERVICE_LABEL,
    ComposeError,
    compose,
    compose_command,
    docker_client,
    project_resources,
)
from harness.deploy.compose.render import LOOPBACK, Deployment, command, restart_value
from harness.deploy.compose.restarts import RestartWatch
from harness.deploy.compose.sampler import ContainerSampler
from harness.deploy.image import IMAGE, LABEL_ROLE, LABEL_SERVICE
from harness.measure import accounting
from harness.measure.accounting import Traffic, get_json, since
from harness.names import MANIFEST, ROLE_CPU_SET, STACK_ROLES
from harness.placement.apply import Placement
from harness.procs import (
    ALWAYS,
    RestartPolicy,
    console,
    http_ok,
    raise_system_exit,
    signals_deferred,
)
from harness.stacks.model import Probe, WorkersProbe

MODE = "compose"
_POLL_S = 0.2
# A readiness check, and the components whose logs explain it failing.
_Check = tuple[tuple[str, ...], Callable[[], bool]]


class ComposeStack:
    """A compose project of one stack description (`harness.deploy.RunningStack`).

    `.url`, `.traffic()`, `.sampler()` and `.stop()` (idempotent, also on
    leaving `with`, at exit and on SIGTERM) behave as a local stack's;
    `.containers()` and `.host_port()` show the containers behind them.
    """

    def __init__(
        self,
        deployment: Deployment,
        *,
        project: str,
        port: int,
        run_dir: Path,
        placement: Placement | None = None,
        restart: RestartPolicy = ALWAYS,
    ) -> None:
        desc = deployment.desc
        self._placement = placement
        self.restart_policy = restart
        self.mesh = desc.mesh
        self.desc = desc
        self.url = f"http://{LOOPBACK}:{port}"
        self.port = port
        self.entry = desc.entry
        self.run_dir = run_dir
        self.project = project
        self.deployment = deployment
        # Published with the results: the generated configs and the compose file that ran them.
        self.configs = {**deployment.configs, "compose": deployment.file}
        self.manifest = run_dir / MANIFEST
        self._client = docker_client()
        self._host_ports: dict[tuple[str, str], int] = {}
        self._down = False
        # As under a `Supervisor`: SIGTERM unwinds (SystemExit) so teardown runs, until stop().
        self._sigterm: list[object] = []
        if threading.current_thread() is threading.main_thread():
            self._sigterm.append(signal.signal(signal.SIGTERM, raise_system_exit))
        self._baseline: Traffic | None = None
        self._read_traffic: Callable[[], Traffic] | None = None
        # Restart counts the traffic reader's ports were looked up at.
        self._reader_restarts: dict[str, int] = {}
        self._watch: RestartWatch | None = None
        atexit.register(self.stop)

    def __enter__(self) -> ComposeStack:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.stop()

    def containers(self) -> dict[str, list[Container]]:
        """The stack's containers per role (every stack role present, maybe empty)."""
        by_role: dict[str, list[Container]] = {role: [] for role in STACK_ROLES}
        for container in self._client.containers.list(
            all=True, filters={"label": f"{PROJECT_LABEL}={self.project}"}
        ):
            by_role.setdefault(container.labels[LABEL_ROLE], []).append(container)
        return by_role

    def sampler(
        self,
        extra_roles: Mapping[str, Iterable[psutil.Process]] | None = None,
        interval_s: float = 1.0,
    ) -> ContainerSampler:
        """A CPU/memory sampler over this stack's containers (plus host processes, e.g. loadgen)."""
        return ContainerSampler(self.containers(), interval_s=interval_s, extra_roles=extra_roles)

    def traffic(self) -> Traffic:
        """Requests that crossed the stack since it became ready (`harness.measure.accounting`)."""
        if self._read_traffic is None or self._baseline is None:
            raise RuntimeError(f"{self.project}: not started")
        restarts = self.restarts()
        if restarts != self._reader_restarts:  # a restarted container may publish elsewhere now
            self._host_ports.clear()
            self._read_traffic = self._reader()
            self._reader_restarts = restarts
        return since(self._read_traffic(), self._baseline)

    def client_argv(self, argv: list[str]) -> list[str]:
        """The load generator runs on this machine, reaching the stack's published port."""
        return argv

    def _reader(self) -> Callable[[], Traffic]:
        desc = self.desc
        return accounting.reader(desc, lambda c, p: (LOOPBACK, self.host_port(c, p)))

    def restarts(self) -> dict[str, int]:
        """Restarts per component since the stack was ready (every component present)."""
        if self._watch is None:
            return {c.name: 0 for c in self.desc.components}
        return self._watch.restarts()

    def restart_events(self) -> list[dict[str, Any]]:
        """Each restart since the stack was ready, oldest first (`restarts.ContainerRestart`).

        `at_*` is when the container ended (the engine's clock; the monotonic
        time derived from it), `how` its exit code or why the harness restarted it.
        """
        return [] if self._watch is None else [r.as_dict() for r in self._watch.events()]

    def component_processes(self, name: str) -> list[psutil.Process]:
        """The host processes of component `name`'s container, its program first.

        The program is the child of the container's init (`init: true`); a
        fault kills it, as a crash would, because `docker kill` counts as a
        manual stop and Docker would not restart the container.
        """
        container = self._container(name)
        container.reload()
        init = psutil.Process(container.attrs["State"]["Pid"])
        programs = init.children()
        if not programs:
            raise ComposeError(f"{container.name}: no program runs under its init")
        return [*programs, *(d for p in programs for d in p.children(recursive=True))]

    def wait_restarts(self, counts: Mapping[str, int], timeout_s: float) -> bool:
        """Block until each named component restarted `counts[name]` times (False on timeout)."""
        return self._watch is not None and self._watch.wait_restarts(counts, timeout_s)

    def host_port(self, component: str, port: str) -> int:
        """The loopback port where `component`'s port `port` is reachable from the host.

        Published on the container owning the component's network namespace.
        """
        key = (component, port)
        if key not in self._host_ports:
            owner = self.desc.network_owner(component).name
            number = self.desc.component(component).ports[port].number
            container = self._container(owner)
            container.reload()
            bindings = (container.ports or {}).get(f"{number}/tcp") or []
            found = [int(b["HostPort"]) for b in bindings if b.get("HostIp") in (LOOPBACK, "")]
            if not found:
                raise ComposeError(f"{owner}: port {number} ({component} {port}) is not published")
            self._host_ports[key] = found[0]
        return self._host_ports[key]

    def _container(self, service: str) -> Container:
        found = self._client.containers.list(
            all=True,
            filters={"label": [f"{PROJECT_LABEL}={self.project}", f"{SERVICE_LABEL}={service}"]},
        )
        if not found:
            raise ComposeError(f"{self.project}: no container for service {service}")
        return found[0]

    def start(self, timeout_s: float) -> None:
        """`up -d`, then wait until every component's probe and the public URL answer.

        A container that exits or restarts meanwhile fails the start.
        """
        compose(self.project, self.deployment.file, "up", "--detach", "--no-build")
        deadline = time.monotonic() + timeout_s
        self._fail_if_exited()
        try:
            pending = self._checks()
        except ComposeError as exc:
            raise self._failure(str(exc), [c.name for c in self.desc.components]) from exc
        while True:
            pending = [(names, check) for names, check in pending if not check()]
            self._fail_if_exited()
            if not pending:
                break
            if time.monotonic() > deadline:
                names = [name for names, _check in pending for name in names]
                raise self._failure(f"not ready after {timeout_s:.0f} s", names)
            time.sleep(_POLL_S)
        self._watch = RestartWatch(
            self.desc, self.project, docker_client(), self.restart_policy, console
        )
        self._watch.start(since_wall_s=time.time())
        self._reader_restarts = self.restarts()
        self._read_traffic = self._reader()
        # Readiness probes crossed the stack too: counts start from here.
        self._baseline = self._read_traffic()

    def _checks(self) -> list[_Check]:
        """Every component's probe, the workers' registration, then the public URL."""
        checks: list[_Check] = []
        workers: dict[tuple[str, str, str], list[tuple[str, WorkersProbe]]] = {}
        for c in self.desc.components:
            if isinstance(c.probe, Probe):
                url = f"http://{LOOPBACK}:{self.host_port(c.name, c.probe.port)}{c.probe.path}"
                checks.append(((c.name,), http_ok(url)))
            elif isinstance(c.probe, WorkersProbe):
                bridge = (c.probe.component, c.probe.port, c.probe.path)
                workers.setdefault(bridge, []).append((c.name, c.probe))
        for (component, port, path), probes in workers.items():
            names = tuple(name for name, _probe in probes)
            stats = (LOOPBACK, self.host_port(component, port))
            checks.append((names, self._registered(stats, path, [p for _n, p in probes])))
        public, name = self.desc.public
        url = f"http://{LOOPBACK}:{self.host_port(public.name, name)}{self.desc.probe_path}"
        checks.append((self.desc.front, http_ok(url)))
        return checks

    @staticmethod
    def _registered(
        address: tuple[str, int], path: str, probes: list[WorkersProbe]
    ) -> Callable[[], bool]:
        """Ready when the bridge at `address` lists each probe's number of live workers.

        One stats request per round serves every worker runtime behind that bridge.
        """

        def check() -> bool:
            try:
                live = get_json(address, path, timeout_s=2.0)["workers"]
            except (OSError, RuntimeError, ValueError, http.client.HTTPException):
                return False
            return all(len(live.get(p.service, [])) == p.count for p in probes)

        return check

    def _fail_if_exited(self) -> None:
        exited = [
            container
            for containers in self.containers().values()
            for container in containers
            if container.status not in ("created", "running") or container.attrs.get("RestartCount")
        ]
        if exited:
            states = ", ".join(
                f"{c.name} is {c.status} (restarted {c.attrs.get('RestartCount') or 0} times)"
                for c in exited
            )
            raise self._failure(
                f"container {states}", [c.labels.get(SERVICE_LABEL, c.name) for c in exited]
            )

    def _failure(self, why: str, components: Iterable[str]) -> ComposeError:
        """`ComposeError` with the last log lines of the containers of `components`."""
        wanted = set(components)
        tails = []
        for containers in self.containers().values():
            for container in containers:
                if container.labels.get(SERVICE_LABEL) in wanted:
                    log = container.logs(tail=20).decode(errors="replace")
                    tails.append(f"\n--- {container.name} ({container.status}) ---\n{log}")
        return ComposeError(
            f"{self.mesh} compose stack: {why}; logs in {self.run_dir}{''.join(tails)}"
        )

    def pids_by_set(self) -> dict[str, list[int]]:
        """Host pids of every container's processes per CPU set (Docker's `top`)."""
        by_set: dict[str, list[int]] = {}
        for role, containers in self.containers().items():
            for container in containers:
                if container.status != "running":
                    continue
                top = container.top(ps_args="-o pid")
                pids = [int(row[0]) for row in top.get("Processes") or []]
                by_set.setdefault(ROLE_CPU_SET[role], []).extend(pids)
        return by_set

    def write_manifest(self, image_id: str) -> None:
        """`stack.json` (`harness.deploy.manifest`), the app code asked of a container."""
        records = [
            manifest.component_record(
                item, command(item), {p: s.number for p, s in item.component.ports.items()}
            )
            for item in self.deployment.rendered
        ]
        built = manifest.build(
            self.desc,
            mode=MODE,
            url=self.url,
            components=records,
            configs=self.deployment.configs,
            app_code=self._app_code(),
            deployment=self._deployment(image_id),
            placement=self._placement and self._placement.read_back(self.pids_by_set()),
        )
        manifest.write(self.run_dir, built)

    def _app_code(self) -> dict[str, Any]:
        """`mubench.fingerprint` as an app container's own interpreter reports it."""
        app = self.containers()["app"][0]  # one image: every app runs the same code
        done = app.exec_run(["python", "-m", "mubench.fingerprint"])
        output = done.output.decode(errors="replace")
        if done.exit_code != 0:
            raise ComposeError(f"{app.name}: python -m mubench.fingerprint failed:\n{output}")
        return json.loads(output)

    def _deployment(self, image_id: str) -> dict[str, Any]:
        """What only the compose deployer knows: project, file, image, restart, containers."""
        published = {
            c.name: {p: self.host_port(c.name, p) for p, s in c.ports.items() if s.public or s.read}
            for c in self.desc.components
            if c.ports
        }
        return {
            "project": self.project,
            "compose_command": list(compose_command()),
            "compose_file": str(self.deployment.file),
            "image": {"tag": IMAGE, "id": image_id},
            "restart": restart_value(self.restart_policy),
            "published": published,
            "containers": [
                {
                    "name": c.name,
                    "id": c.id,
                    "component": c.labels.get(SERVICE_LABEL),
                    "role": role,
                    "service": c.labels.get(LABEL_SERVICE),
                }
                for role, containers in self.containers().items()
                for c in containers
            ],
        }

    def stop(self) -> None:
        """Save every container's log to the run dir, then `down -v`; nothing may remain
        (the mTLS secrets written for the containers are deleted too).

        Raises `ComposeError` if a container, network or volume of the project
        is still there afterwards (after trying to force-remove it).
        """
        if self._down:
            return
        self._down = True
        atexit.unregister(self.stop)
        down = ["down", "--volumes", "--remove-orphans", "--timeout", "10"]
        failed: ComposeError | None = None
        with signals_deferred() as handlers_after:
            if self._sigterm:
                handlers_after[signal.SIGTERM] = self._sigterm.pop()
            try:
                if self._watch is not None:
                    self._watch.stop()  # restarting joiners would fight `down`
                self._save_logs()
            finally:
                try:
                    compose(self.project, self.deployment.file, *down)
                except ComposeError as exc:
                    failed = exc
                left = self._remove_leftovers()
                files.remove_secrets(self.deployment.files_dir)
        if left:
            raise ComposeError(f"{self.project}: still there after teardown: {left}") from failed
        if failed:
            raise failed

    def _save_logs(self) -> None:
        for containers in self.containers().values():
            for container in containers:
                component = container.labels.get(SERVICE_LABEL, container.name)
                with contextlib.suppress(docker.errors.NotFound):
                    (self.run_dir / f"{component}.log").write_bytes(container.logs())

    def _remove_leftovers(self) -> dict[str, list[str]]:
        """Force-remove what `down` left of the project; what could not be removed."""
        labelled = {"label": f"{PROJECT_LABEL}={self.project}"}
        with contextlib.suppress(docker.errors.DockerException):
            for container in self._client.containers.list(all=True, filters=labelled):
                container.remove(force=True, v=True)
            for network in self._client.networks.list(filters=labelled):
                network.remove()
            for volume in self._client.volumes.list(filters=labelled):
                volume.remove(force=True)
        return {k: v for k, v in project_resources(self._client, self.project).items() if v}
