"""The three stacks (`dpumesh`, `envoy`, `nomesh`) as Docker Compose projects, built offline.

What runs is what `harness.deploy.local` runs as local processes: the same μBench
cell, workmodel, seed, scale and worker plan (`plan_processes`), the same
daemon flags and the same Envoy configs (`baselines.envoy.config`, with
container addresses); each local process becomes one container:

* `dpumesh`: `dpa-daemon` owns the IPC namespace (`ipc: shareable`, so one
  /dev/shm, 1 GiB, holds the rings, registry and semaphores); `dpu-daemon`
  (bridge published on `127.0.0.1:<port>`) and one `app-<svc>` per service
  (`dpumesh.server`, PN workers) join it
  (`ipc: service:dpa-daemon`); each keeps its own PID namespace. The workers
  and the DMA manager have no network at all (`network_mode: none`): every
  request reaches them through the shared-memory queues, across containers.
* `envoy`: per service a pod: `sidecar-<svc>` owns the network namespace and
  `app-<svc>` joins it (`network_mode: service:sidecar-<svc>`), so the app
  and its sidecar talk over loopback; `gateway` is published on the port.
* `nomesh`: one `app-<svc>` per service calling the others by container
  name; the entry one is published on the port.

Every container has the labels `dpumesh.role` (a `harness.procs.ROLES` role)
and `dpumesh.service`. Ports inside containers are fixed per service, so
generated files are stable; counters the harness reads (Envoy admin, apps'
stats) are published on ephemeral loopback ports, found through the Docker
SDK. Only loopback is ever published.

Images (`ensure_image`): one image for every role, from `compose/Dockerfile`
with the repository root as context. Python packages come from
`compose/.wheelhouse`, downloaded on the host for the image's Python (cp311,
glibc 2.36: Debian bookworm), so the build needs no network. The base is
`python:3.11-slim` when it is here or can be pulled, else
`dpumesh-base:bookworm`, made by `compose/build-base-image.sh` (debootstrap
from the machine's Debian mirror). Docker's layer cache makes rebuilds cheap.

CPU and memory are measured per container through the Docker SDK
(`ContainerSampler`): cgroup CPU time deltas over the window, memory usage
minus inactive page cache, summed per role.

Command line: `python -m harness.deploy.compose.legacy build` builds the image;
`python -m harness.deploy.compose.legacy generate` writes the compose files of a workmodel
(the checked-in `compose/default/` is this for `workmodels/default.json`).
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import functools
import hashlib
import http.client
import itertools
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import docker
import docker.errors
import psutil
import requests
from docker.models.containers import Container

from baselines.envoy.config import (
    DEFAULT_CONCURRENCY,
    GATEWAY,
    GatewayPorts,
    MeshDescription,
    ServicePorts,
    envoy_argv,
    sidecar_name,
    write_configs,
)
from dpumesh.dpu_daemon import HEALTH_PATH as BRIDGE_HEALTH_PATH
from dpumesh.dpu_daemon import STATS_PATH as BRIDGE_STATS_PATH
from harness.deploy.local import (
    DEFAULT_PORT,
    DEFAULT_WORKMODEL,
    MANIFEST,
    MESHES,
    REPO,
    STACK_ROLES,
)
from harness.measure.accounting import (
    Traffic,
    dpumesh_traffic,
    envoy_traffic,
    get_json,
    nomesh_traffic,
    since,
)
from harness.measure.metrics import MIB, RoleSampler, RoleUsage, WindowUsage, role_class
from harness.ports import port_is_free
from harness.procs import StartError, http_ok, raise_system_exit, signals_deferred
from mubench.http_app import HEALTH_PATH as APP_HEALTH_PATH
from mubench.internal import custom_function_names
from mubench.workmodel import (
    DEFAULT_PER_SERVICE_CAP,
    DEFAULT_TOTAL_CAP,
    load_workmodel,
    plan_processes,
)

COMPOSE_DIR = REPO / "compose"
DOCKERFILE = COMPOSE_DIR / "Dockerfile"
WHEELHOUSE = COMPOSE_DIR / ".wheelhouse"
IMAGE = "dpumesh-bench:latest"
DEFAULT_BASE_IMAGE = "python:3.11-slim"
LOCAL_BASE_IMAGE = "dpumesh-base:bookworm"
LABEL_ROLE = "dpumesh.role"
LABEL_SERVICE = "dpumesh.service"
PROJECT_LABEL = "com.docker.compose.project"
SERVICE_LABEL = "com.docker.compose.service"

# Inside containers (fixed, so generated files are stable).
_WORKMODEL_PATH = "/etc/mubench/workmodel.json"
_FUNCTIONS_PATH = "/etc/mubench/functions"
_ENVOY_CONFIG_PATH = "/etc/envoy/envoy.json"
# The real binary (linked by compose/Dockerfile), not the wheel's Python wrapper.
_ENVOY_BINARY = "/usr/local/bin/envoy"
_PUBLIC_PORT = 5005  # the bridge, gateway or entry app inside its container
_GATEWAY_ADMIN_PORT = 9901
_ANY = "0.0.0.0"
_LOOPBACK = "127.0.0.1"
_PYTHON_ABI = ("3.11", "cp311")
_GLIBC_MINOR = 36  # Debian bookworm, the base image's distribution
_PULL_TIMEOUT_S = 60
_POOL_SIZE = 128
_projects = itertools.count()


class ComposeError(StartError):
    """Docker, Compose or an image build failed (nothing of the stack is left running)."""


@dataclass(frozen=True)
class CpuSets:
    """Cores for the offload roles (the DPU daemons) and for everything else (`cpuset:`)."""

    offload: str
    host: str


# ---- Docker and Compose -----------------------------------------------------------------------


def docker_client(timeout_s: int = 120) -> docker.DockerClient:
    """A client of the engine `DOCKER_HOST` names (default: the local socket)."""
    try:
        # One connection per container, so a stats round reads them all at once.
        client = docker.from_env(timeout=timeout_s, max_pool_size=_POOL_SIZE)
        client.ping()
    except (docker.errors.DockerException, requests.RequestException) as exc:
        raise ComposeError(f"no Docker engine answers: {exc}") from exc
    return client


@functools.cache
def compose_command() -> tuple[str, ...]:
    """`docker compose` (v2) if installed, else `docker-compose` (v1)."""
    for argv in (("docker", "compose"), ("docker-compose",)):
        if shutil.which(argv[0]) and _quiet_ok([*argv, "version"]):
            return argv
    raise ComposeError("neither `docker compose` (v2) nor `docker-compose` (v1) is installed")


def _quiet_ok(argv: Sequence[str]) -> bool:
    done = subprocess.run(list(argv), capture_output=True, timeout=60, check=False)
    return done.returncode == 0


def _compose(project: str, file: Path, *args: str, timeout_s: float = 300) -> str:
    """Run one compose command on `file` as `project`; its output, or `ComposeError`."""
    argv = [*compose_command(), "--project-name", project, "--file", str(file), *args]
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout_s, check=False)
    except subprocess.TimeoutExpired as exc:
        raise ComposeError(f"{' '.join(argv)}: no answer after {timeout_s:.0f} s") from exc
    if done.returncode != 0:
        raise ComposeError(f"{' '.join(argv)} failed:\n{(done.stderr or done.stdout)[-4000:]}")
    return done.stdout


def check_config(file: Path) -> None:
    """`compose config --quiet`: Compose's own validation of a file (`ComposeError` if invalid)."""
    _compose("config-check", file, "config", "--quiet", timeout_s=60)


def project_resources(client: docker.DockerClient, project: str) -> dict[str, list[str]]:
    """Names of the containers, networks and volumes carrying `project`'s compose label."""
    labelled = {"label": f"{PROJECT_LABEL}={project}"}
    return {
        "containers": [c.name for c in client.containers.list(all=True, filters=labelled)],
        "networks": [n.name for n in client.networks.list(filters=labelled)],
        "volumes": [v.name for v in client.volumes.list(filters=labelled)],
    }


# ---- image ------------------------------------------------------------------------------------


def gather_wheelhouse() -> Path:
    """Download the containers' wheels into `compose/.wheelhouse` unless already there.

    Targets the image's Python (cp311 on glibc <= 2.36) rather than the host's,
    binary wheels only, at the versions of requirements.lock. Skipped when the
    inputs are unchanged since the last download (hash in `.stamp`).
    """
    lock = REPO / "requirements.lock"
    wanted = COMPOSE_DIR / "requirements.in"
    version, abi = _PYTHON_ABI
    machine = platform.machine()
    target = [
        *("--only-binary=:all:", "--python-version", version, "--implementation", "cp"),
        *("--abi", abi, "--abi", "abi3"),
        *(
            arg
            for minor in range(5, _GLIBC_MINOR + 1)
            for arg in ("--platform", f"manylinux_2_{minor}_{machine}")
        ),
    ]
    digest = hashlib.sha256(lock.read_bytes() + wanted.read_bytes() + " ".join(target).encode())
    stamp = WHEELHOUSE / ".stamp"
    if stamp.is_file() and stamp.read_text() == digest.hexdigest():
        return WHEELHOUSE
    shutil.rmtree(WHEELHOUSE, ignore_errors=True)
    argv = [sys.executable, "-m", "pip", "download", "--quiet", "--dest", str(WHEELHOUSE)]
    argv += [*target, "--constraint", str(lock), "--requirement", str(wanted)]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=600, check=False)
    if done.returncode != 0:
        raise ComposeError(f"pip download for the image failed:\n{done.stderr[-4000:]}")
    stamp.write_text(digest.hexdigest())
    return WHEELHOUSE


def base_image(client: docker.DockerClient) -> str:
    """`python:3.11-slim` if present or pullable, else the debootstrap image (built if needed)."""
    for tag in (DEFAULT_BASE_IMAGE, LOCAL_BASE_IMAGE):
        if _have_image(client, tag):
            return tag
    try:
        docker_client(_PULL_TIMEOUT_S).images.pull(DEFAULT_BASE_IMAGE)
        return DEFAULT_BASE_IMAGE
    except (docker.errors.DockerException, requests.RequestException) as exc:
        why = str(exc).splitlines()[0][:200]
        print(f"note: cannot pull {DEFAULT_BASE_IMAGE} ({why}); building {LOCAL_BASE_IMAGE}")
    script = COMPOSE_DIR / "build-base-image.sh"
    done = subprocess.run(["bash", str(script), LOCAL_BASE_IMAGE], timeout=1800, check=False)
    if done.returncode != 0:
        raise ComposeError(f"{script} failed (exit {done.returncode})")
    return LOCAL_BASE_IMAGE


def _have_image(client: docker.DockerClient, tag: str) -> bool:
    try:
        client.images.get(tag)
    except docker.errors.ImageNotFound:
        return False
    return True


@functools.cache
def ensure_image(base: str | None = None) -> str:
    """Build (or refresh from cache) `IMAGE` from the current tree; its image id.

    Once per process: a benchmark starts many stacks from one build.
    """
    client = docker_client(timeout_s=1800)
    base = base or base_image(client)
    gather_wheelhouse()
    try:
        image, _logs = client.images.build(
            path=str(REPO),
            dockerfile=str(DOCKERFILE.relative_to(REPO)),
            tag=IMAGE,
            buildargs={"BASE_IMAGE": base},
            rm=True,
            forcerm=True,
        )
    except docker.errors.BuildError as exc:
        tail = "".join(str(part.get("stream", part.get("error", ""))) for part in exc.build_log)
        raise ComposeError(f"building {IMAGE} from {base} failed: {exc}\n{tail[-4000:]}") from exc
    return str(image.id)


# ---- compose files ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Published:
    """A container port the harness reads from the host (on an ephemeral loopback port)."""

    service: str  # compose service owning the network namespace
    port: int  # inside the container


@dataclass
class Deployment:
    """One generated compose project: its file and what the harness needs to drive it."""

    mesh: str
    file: Path
    workmodel: Path
    entry: str
    services: list[str]
    plan: dict[str, tuple[int, int]]
    warnings: list[str]
    # Health endpoints that must answer 200 before the stack counts as started.
    probes: list[tuple[Published, str]]
    # Where the counters of `harness.measure.accounting` live (see `_reader`).
    counters: dict[str, Published] = field(default_factory=dict)
    mesh_description: MeshDescription | None = None
    configs: dict[str, Path] = field(default_factory=dict)


class _Generator:
    """Builds the compose services of one stack, in the spirit of `harness.deploy.local`' launchers."""

    def __init__(
        self,
        mesh: str,
        workmodel: Path,
        out_dir: Path,
        *,
        port: int,
        seed: int,
        scale: float,
        functions_dir: Path | None,
        per_service_cap: int,
        total_cap: int,
        envoy_concurrency: int,
        cpusets: CpuSets | None,
        image: str,
    ) -> None:
        self.mesh = mesh
        self.workmodel = workmodel
        self.out_dir = out_dir
        self.port = port
        self.seed = seed
        self.scale = scale
        self.functions_dir = functions_dir
        self.envoy_concurrency = envoy_concurrency
        self.cpusets = cpusets
        self.image = image
        model = load_workmodel(str(workmodel), custom=custom_function_names(functions_dir))
        self.plan, self.warnings = plan_processes(model, per_service_cap, total_cap)
        self.service_ids = list(model)
        self.entry = "s0" if "s0" in model else self.service_ids[0]
        self.services: dict[str, dict[str, Any]] = {}

    def mount(self, host: Path, target: str) -> str:
        """A read-only bind mount, relative to the compose file so the tree can move."""
        rel = os.path.relpath(host, self.out_dir)
        return f"{rel if rel.startswith('.') else './' + rel}:{target}:ro"

    def cell_mounts(self) -> list[str]:
        mounts = [self.mount(self.workmodel, _WORKMODEL_PATH)]
        if self.functions_dir:
            mounts.append(self.mount(self.functions_dir, _FUNCTIONS_PATH))
        return mounts

    def add(
        self, name: str, role: str, command: Sequence[str], service: str = "", **extra: Any
    ) -> None:
        """One compose service running `command` as `role` (for μBench `service`, if any)."""
        spec: dict[str, Any] = {
            "image": self.image,
            "command": list(command),
            "labels": {LABEL_ROLE: role, LABEL_SERVICE: service},
            **extra,
        }
        if self.cpusets:
            offload = role_class(role) == "offload"
            spec["cpuset"] = self.cpusets.offload if offload else self.cpusets.host
        self.services[name] = spec

    def http_app(self, service: str, port: int, routing: Sequence[str], **extra: Any) -> None:
        """The plain-HTTP μBench cell (same flags as the local stacks' apps)."""
        workers, threads = self.plan[service]
        argv = [
            *("python", "-m", "mubench.http_app"),
            *("--workmodel", _WORKMODEL_PATH, "--service", service),
            *("--host", _ANY, "--port", str(port)),
            *("--workers", str(workers), "--threads", str(threads)),
            *("--seed", str(self.seed), "--scale", repr(self.scale)),
            *(["--functions-dir", _FUNCTIONS_PATH] if self.functions_dir else []),
            *routing,
        ]
        self.add(f"app-{service}", "app", argv, service, volumes=self.cell_mounts(), **extra)

    def deployment(self, **details: Any) -> Deployment:
        file = self.out_dir / f"{self.mesh}.yml"
        header = (
            f"# {self.mesh} stack for {os.path.relpath(self.workmodel, self.out_dir)} "
            f"(seed {self.seed}, scale {self.scale:g}), public port 127.0.0.1:{self.port}.\n"
            "# Generated by harness/deploy/compose (python -m harness.deploy.compose.legacy generate); "
            "do not edit.\n"
        )
        document = {"version": "2.4", "services": self.services}
        file.write_text(header + to_yaml(document))
        return Deployment(
            mesh=self.mesh,
            file=file,
            workmodel=self.workmodel,
            entry=self.entry,
            services=self.service_ids,
            plan=self.plan,
            warnings=self.warnings,
            **details,
        )


def _service_ports(index: int) -> ServicePorts:
    """Ports of service number `index` inside its containers.

    Distinct across services although each pod has its own network namespace:
    `MeshDescription` wants them so, and the host-side view of the same mesh
    (`ComposeStack._reader`) reuses it with published admin ports.
    """
    base = 20000 + 10 * index
    return ServicePorts(base, base + 1, base + 2, base + 3)


def _generate_nomesh(gen: _Generator) -> Deployment:
    ports = {svc: _service_ports(i).app_port for i, svc in enumerate(gen.service_ids)}
    ports[gen.entry] = _PUBLIC_PORT
    routing = [a for s, p in ports.items() for a in ("--upstream", f"{s}=http://app-{s}:{p}")]
    for svc, port in ports.items():
        public = gen.port if svc == gen.entry else ""
        gen.http_app(svc, port, routing, init=True, ports=[f"{_LOOPBACK}:{public}:{port}"])
    apps = {svc: Published(f"app-{svc}", p) for svc, p in ports.items()}
    return gen.deployment(
        probes=[(pub, APP_HEALTH_PATH) for pub in apps.values()],
        counters={f"app:{svc}": pub for svc, pub in apps.items()},
    )


def _generate_envoy(gen: _Generator) -> Deployment:
    services = {svc: _service_ports(i) for i, svc in enumerate(gen.service_ids)}
    desc = MeshDescription(
        services,
        GatewayPorts(_PUBLIC_PORT, _GATEWAY_ADMIN_PORT),
        entry=gen.entry,
        concurrency=gen.envoy_concurrency,
        listen_address=_ANY,
        service_hosts={svc: sidecar_name(svc) for svc in services},
    )
    configs = write_configs(desc, gen.out_dir / "configs")
    config_mounts = {name: gen.mount(path, _ENVOY_CONFIG_PATH) for name, path in configs.items()}

    # The same command line as a local Envoy, with the image's binary and config path.
    envoy = [_ENVOY_BINARY, *envoy_argv(desc, Path(_ENVOY_CONFIG_PATH))[1:]]

    probes: list[tuple[Published, str]] = []
    counters: dict[str, Published] = {}
    for svc, ports in services.items():
        pod = sidecar_name(svc)
        published = [ports.admin_port, ports.app_port]
        gen.add(
            pod,
            "sidecar",
            envoy,
            svc,
            init=True,
            volumes=[config_mounts[pod]],
            ports=[f"{_LOOPBACK}::{p}" for p in published],
        )
        egress = ["--egress-proxy", f"http://{_LOOPBACK}:{ports.outbound_port}"]
        gen.http_app(svc, ports.app_port, egress, init=True, network_mode=f"service:{pod}")
        probes += [(Published(pod, ports.admin_port), "/ready")]
        probes += [(Published(pod, ports.app_port), APP_HEALTH_PATH)]
        counters[f"admin:{svc}"] = Published(pod, ports.admin_port)
        counters[f"app:{svc}"] = Published(pod, ports.app_port)
    gen.add(
        GATEWAY,
        "gateway",
        envoy,
        init=True,
        volumes=[config_mounts[GATEWAY]],
        ports=[f"{_LOOPBACK}:{gen.port}:{_PUBLIC_PORT}", f"{_LOOPBACK}::{_GATEWAY_ADMIN_PORT}"],
    )
    counters[f"admin:{GATEWAY}"] = Published(GATEWAY, _GATEWAY_ADMIN_PORT)
    probes.append((Published(GATEWAY, _GATEWAY_ADMIN_PORT), "/ready"))
    probes.append((Published(GATEWAY, _PUBLIC_PORT), APP_HEALTH_PATH))
    return gen.deployment(probes=probes, counters=counters, mesh_description=desc, configs=configs)


def _generate_dpumesh(gen: _Generator) -> Deployment:
    shared = {"ipc": "service:dpa-daemon"}
    gen.add(
        "dpa-daemon",
        "dpa-daemon",
        ["python", "-m", "dpumesh.dpa_daemon", "--log-level", "WARNING"],
        init=True,  # a real PID 1 (signals, reaping)
        ipc="shareable",
        shm_size="1g",
        network_mode="none",
    )
    expected = [arg for svc in gen.service_ids for arg in ("--service", svc)]
    gen.add(
        "dpu-daemon",
        "dpu-daemon",
        [
            *("python", "-m", "dpumesh.dpu_daemon", "--host", _ANY, "--port", str(_PUBLIC_PORT)),
            *("--entry", gen.entry, *expected, "--log-level", "WARNING"),
        ],
        ports=[f"{_LOOPBACK}:{gen.port}:{_PUBLIC_PORT}"],
        **shared,
    )
    cell_env = {
        "MUBENCH_WORKMODEL": _WORKMODEL_PATH,
        "MUBENCH_SEED": str(gen.seed),
        "MUBENCH_SCALE": repr(gen.scale),
    }
    if gen.functions_dir:
        cell_env["MUBENCH_FUNCTIONS_DIR"] = _FUNCTIONS_PATH
    for svc, (workers, threads) in gen.plan.items():
        gen.add(
            f"app-{svc}",
            "app",
            ["python", "-m", "dpumesh.server", "mubench.dpumesh_app:app"],
            svc,
            environment={
                "APP": svc,
                "PN": str(workers),
                "DPUMESH_THREADS": str(threads),
                **cell_env,
            },
            volumes=gen.cell_mounts(),
            network_mode="none",
            **shared,
        )
    return gen.deployment(probes=[(Published("dpu-daemon", _PUBLIC_PORT), BRIDGE_HEALTH_PATH)])


_GENERATORS: dict[str, Callable[[_Generator], Deployment]] = {
    "dpumesh": _generate_dpumesh,
    "envoy": _generate_envoy,
    "nomesh": _generate_nomesh,
}


def generate(
    mesh: str,
    workmodel_path: str | Path = DEFAULT_WORKMODEL,
    out_dir: str | Path = COMPOSE_DIR / "default",
    *,
    port: int = DEFAULT_PORT,
    seed: int = 0,
    scale: float = 1.0,
    functions_dir: str | Path | None = None,
    per_service_cap: int = DEFAULT_PER_SERVICE_CAP,
    total_cap: int = DEFAULT_TOTAL_CAP,
    envoy_concurrency: int = DEFAULT_CONCURRENCY,
    cpusets: CpuSets | None = None,
    image: str = IMAGE,
) -> Deployment:
    """Write `<out_dir>/<mesh>.yml` (and, for envoy, validated `configs/*.json`) for a workmodel.

    Raises `WorkmodelError` for a bad workmodel, `EnvoyConfigError` if Envoy
    rejects a generated config.
    """
    if mesh not in MESHES:
        raise ValueError(f"mesh {mesh!r} is not one of {MESHES}")
    out = Path(out_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    gen = _Generator(
        mesh,
        Path(workmodel_path).resolve(),
        out,
        port=port,
        seed=seed,
        scale=scale,
        functions_dir=Path(functions_dir).resolve() if functions_dir else None,
        per_service_cap=per_service_cap,
        total_cap=total_cap,
        envoy_concurrency=envoy_concurrency,
        cpusets=cpusets,
        image=image,
    )
    return _GENERATORS[mesh](gen)


_PLAIN_KEY = re.compile(r"[A-Za-z0-9_.-]+")


def to_yaml(value: Mapping[str, Any] | list[Any], indent: str = "") -> str:
    """Block-style YAML (no YAML library needed).

    Scalars are written as JSON, which YAML reads as is, so quoting is never
    wrong; `$` is doubled because Compose interpolates variables in strings.
    """
    if isinstance(value, Mapping):
        return "".join(
            f"{indent}{key if _PLAIN_KEY.fullmatch(key) else json.dumps(key)}:"
            + _yaml_value(item, indent)
            for key, item in value.items()
        )
    return "".join(f"{indent}-{_yaml_value(item, indent)}" for item in value)


def _yaml_value(item: Any, indent: str) -> str:
    """What follows `key:` or `-`: an indented block, or a JSON scalar on the same line."""
    if isinstance(item, Mapping | list) and item:
        return "\n" + to_yaml(item, indent + "  ")
    if isinstance(item, str):
        item = item.replace("$", "$$")
    return f" {json.dumps(item, ensure_ascii=False)}\n"


# ---- running stack ----------------------------------------------------------------------------


class ComposeStack:
    """A started compose stack; the local `RunningStack`'s interface with containers.

    `.url`, `.traffic()` and `.stop()` (idempotent, also on leaving `with`)
    behave as there; `.containers()` and `.sampler()` replace `.roles()`.
    """

    def __init__(self, deployment: Deployment, *, project: str, port: int, run_dir: Path) -> None:
        self.mesh = deployment.mesh
        self.url = f"http://{_LOOPBACK}:{port}"
        self.port = port
        self.entry = deployment.entry
        self.run_dir = run_dir
        self.project = project
        self.deployment = deployment
        self.configs = {**deployment.configs, "compose": deployment.file}
        self.manifest = run_dir / MANIFEST
        self._client = docker_client()
        self._down = False
        # As under a `Supervisor`: SIGTERM unwinds (SystemExit) so teardown runs, until stop().
        self._sigterm: list[object] = []
        if threading.current_thread() is threading.main_thread():
            self._sigterm.append(signal.signal(signal.SIGTERM, raise_system_exit))
        self._baseline: Traffic | None = None
        self._read_traffic: Callable[[], Traffic] | None = None
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
        interval_s: float = 1.0,
        extra_roles: Mapping[str, Iterable[psutil.Process]] | None = None,
    ) -> ContainerSampler:
        """A CPU/memory sampler over this stack's containers (plus host processes, e.g. loadgen)."""
        return ContainerSampler(self.containers(), interval_s=interval_s, extra_roles=extra_roles)

    def traffic(self) -> Traffic:
        """Requests that crossed the stack since it became ready (see `harness.measure.accounting`)."""
        if self._read_traffic is None or self._baseline is None:
            raise RuntimeError(f"{self.project}: not started")
        return since(self._read_traffic(), self._baseline)

    def host_port(self, published: Published) -> int:
        """The loopback port where `published` is reachable from the host."""
        container = self._container(published.service)
        container.reload()
        bindings = (container.ports or {}).get(f"{published.port}/tcp") or []
        for binding in bindings:
            if binding.get("HostIp") in (_LOOPBACK, "") and binding.get("HostPort"):
                return int(binding["HostPort"])
        raise ComposeError(f"{published.service}: port {published.port} is not published")

    def _container(self, service: str) -> Container:
        found = self._client.containers.list(
            all=True,
            filters={"label": [f"{PROJECT_LABEL}={self.project}", f"{SERVICE_LABEL}={service}"]},
        )
        if not found:
            raise ComposeError(f"{self.project}: no container for service {service}")
        return found[0]

    def start(self, timeout_s: float) -> None:
        """`up -d`, then wait until every probe answers and the public URL does."""
        _compose(self.project, self.deployment.file, "up", "--detach", "--no-build")
        deadline = time.monotonic() + timeout_s
        self._fail_if_exited()
        try:
            checks = [
                http_ok(f"http://{_LOOPBACK}:{self.host_port(pub)}{path}")
                for pub, path in self.deployment.probes
            ]
        except ComposeError as exc:
            raise self._failure(str(exc)) from exc
        if self.mesh == "dpumesh":
            checks.append(self._workers_registered)
        while not all(check() for check in checks):
            self._fail_if_exited()
            if time.monotonic() > deadline:
                raise self._failure(f"not ready after {timeout_s:.0f} s")
            time.sleep(0.2)
        self._fail_if_exited()
        self._read_traffic = self._reader()
        # Readiness probes crossed the stack too: counts start from here.
        self._baseline = self._read_traffic()

    def _workers_registered(self) -> bool:
        """Every service has its planned number of live DPUmesh workers (bridge stats)."""
        try:
            workers = get_json(self.port, BRIDGE_STATS_PATH, timeout_s=2.0)["workers"]
        except (OSError, RuntimeError, ValueError, http.client.HTTPException):
            return False
        plan = self.deployment.plan
        return all(len(workers.get(svc, [])) == w for svc, (w, _t) in plan.items())

    def _fail_if_exited(self) -> None:
        for containers in self.containers().values():
            for container in containers:
                if container.status not in ("created", "running"):
                    raise self._failure(f"container {container.name} is {container.status}")

    def _failure(self, why: str) -> ComposeError:
        tails = []
        for containers in self.containers().values():
            for container in containers:
                log = container.logs(tail=20).decode(errors="replace")
                tails.append(f"\n--- {container.name} ({container.status}) ---\n{log}")
        return ComposeError(
            f"{self.mesh} compose stack: {why}; logs in {self.run_dir}{''.join(tails)}"
        )

    def _reader(self) -> Callable[[], Traffic]:
        """The `harness.measure.accounting` reader of this mesh, on the host side of published ports."""
        dep = self.deployment
        host = {name: self.host_port(pub) for name, pub in dep.counters.items()}
        app_ports = {svc: host[f"app:{svc}"] for svc in dep.services if f"app:{svc}" in host}
        if self.mesh == "dpumesh":
            return lambda: dpumesh_traffic(self.port, dep.services)
        if self.mesh == "nomesh":
            return lambda: nomesh_traffic(app_ports, dep.entry)
        assert dep.mesh_description is not None
        desc = dep.mesh_description
        host_desc = replace(
            desc,
            services={
                svc: replace(p, admin_port=host[f"admin:{svc}"]) for svc, p in desc.services.items()
            },
            gateway=GatewayPorts(self.port, host[f"admin:{GATEWAY}"]),
            listen_address=_LOOPBACK,
            service_hosts={},
        )
        return lambda: envoy_traffic(host_desc, app_ports)

    def write_manifest(self, image_id: str) -> None:
        """`stack.json`: what ran (compose file, image, containers, ports), like a local stack's."""
        dep = self.deployment
        manifest = {
            "mesh": self.mesh,
            "mode": "compose",
            "url": self.url,
            "project": self.project,
            "compose_command": list(compose_command()),
            "compose_file": str(dep.file),
            "image": {"tag": IMAGE, "id": image_id},
            "workmodel": str(dep.workmodel),
            "entry": dep.entry,
            "plan": {svc: {"workers": w, "threads": t} for svc, (w, t) in dep.plan.items()},
            "warnings": dep.warnings,
            "configs": {name: str(path) for name, path in self.configs.items()},
            "containers": [
                {"name": c.name, "id": c.id, "role": role, "service": c.labels.get(LABEL_SERVICE)}
                for role, containers in self.containers().items()
                for c in containers
            ],
        }
        self.manifest.write_text(json.dumps(manifest, indent=2) + "\n")

    def stop(self) -> None:
        """Save every container's log to the run dir, then `down -v`; nothing may remain.

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
                self._save_logs()
            finally:
                try:
                    _compose(self.project, self.deployment.file, *down)
                except ComposeError as exc:
                    failed = exc
                left = self._remove_leftovers()
        if left:
            raise ComposeError(f"{self.project}: still there after teardown: {left}") from failed
        if failed:
            raise failed

    def _save_logs(self) -> None:
        for containers in self.containers().values():
            for container in containers:
                service = container.labels.get(SERVICE_LABEL, container.name)
                with contextlib.suppress(docker.errors.NotFound):
                    (self.run_dir / f"{service}.log").write_bytes(container.logs())

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
    ready_timeout_s: float = 120.0,
    cpusets: CpuSets | None = None,
) -> ComposeStack:
    """`harness.deploy.local.start_stack` in containers: build, generate, `up`, wait until it answers.

    The image is built (from cache after the first time) once per process.
    The compose file and Envoy configs go to `run_dir`, with `stack.json` and
    every container's log at teardown. Raises `WorkmodelError` before starting
    anything, `StartError` (`ComposeError`) after tearing everything down.
    """
    run_dir = Path(run_dir).resolve()
    if not port_is_free(port):
        raise StartError(f"{mesh} compose stack: port {port} is already in use")
    deployment = generate(
        mesh,
        workmodel_path,
        run_dir,
        port=port,
        seed=seed,
        scale=scale,
        functions_dir=functions_dir,
        per_service_cap=per_service_cap,
        total_cap=total_cap,
        envoy_concurrency=envoy_concurrency,
        cpusets=cpusets,
    )
    for line in deployment.warnings:
        print(f"warning: {line}", file=sys.stderr)
    image_id = ensure_image()
    project = f"dpumesh-{mesh}-{os.getpid()}-{next(_projects)}"
    stack = ComposeStack(deployment, project=project, port=port, run_dir=run_dir)
    try:
        stack.start(ready_timeout_s)
        stack.write_manifest(image_id)
    except BaseException:
        stack.stop()
        raise
    return stack


# ---- CPU and memory per container -------------------------------------------------------------


@dataclass
class _Reading:
    cpu_ns: int
    user_ns: int
    system_ns: int
    memory: int
    pids: int


def _read(container: Container) -> _Reading | None:
    """One cgroup reading of a container through the Docker API (None once it is gone)."""
    try:
        stats = container.stats(stream=False, one_shot=True)
    except (docker.errors.NotFound, docker.errors.APIError):
        return None
    cpu = stats.get("cpu_stats", {}).get("cpu_usage", {})
    memory = stats.get("memory_stats", {})
    if "total_usage" not in cpu:
        return None  # a stopped container reports empty stats
    detail = memory.get("stats", {})
    cache = detail.get("total_inactive_file", detail.get("inactive_file", 0))
    return _Reading(
        cpu_ns=cpu["total_usage"],
        user_ns=cpu.get("usage_in_usermode", 0),
        system_ns=cpu.get("usage_in_kernelmode", 0),
        memory=max(memory.get("usage", 0) - cache, 0),
        pids=stats.get("pids_stats", {}).get("current", 0),
    )


class ContainerSampler:
    """`harness.measure.metrics.RoleSampler` for containers: the same `WindowUsage` per role.

    CPU per container is its cgroup's CPU time at the window's end minus at
    its start (a container gone meanwhile counts up to its last reading);
    memory is read every round (usage minus inactive page cache, as `docker
    stats` shows it, so /dev/shm pages count for the container that first
    touched them) and reported as mean and max per role. `extra_roles` are
    host processes (the load generator) measured by a `RoleSampler` over the
    same window and merged in.

    The engine refreshes container stats once a second and a reading waits
    for the next refresh, so every round reads all containers at once (one
    thread each) and gets one consistent snapshot. `start()` returns after its
    snapshot and `stop()` takes one after being called: the CPU window holds
    the measured one plus up to a second at each end, when a stack is idle.
    """

    def __init__(
        self,
        containers: Mapping[str, Sequence[Container]],
        interval_s: float = 1.0,
        extra_roles: Mapping[str, Iterable[psutil.Process]] | None = None,
    ) -> None:
        self._containers = {role: list(items) for role, items in containers.items()}
        self._all = [c for items in self._containers.values() for c in items]
        self.interval_s = interval_s
        self._extra = RoleSampler(extra_roles, interval_s=interval_s) if extra_roles else None
        self._pool = ThreadPoolExecutor(max(1, len(self._all)), "container-stats")
        self._first: dict[str, _Reading] = {}
        self._last: dict[str, _Reading] = {}
        self._memory: dict[str, list[int]] = {role: [] for role in self._containers}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._t0 = 0.0
        self._t0_wall = 0.0
        self._result: WindowUsage | None = None

    def start(self) -> None:
        """Window start: a CPU reading of every container, then the sampler thread."""
        if self._thread is not None:
            raise RuntimeError("ContainerSampler already started")
        self._sample(first=True)
        self._t0_wall = time.time()
        self._t0 = time.monotonic()
        if self._extra:
            self._extra.start()
        self._thread = threading.Thread(target=self._run, name="container-sampler", daemon=True)
        self._thread.start()

    def stop(self) -> WindowUsage:
        """Window end: final readings and the per-role result (idempotent)."""
        if self._result is not None:
            return self._result
        if self._thread is None:
            raise RuntimeError("ContainerSampler.stop() before start()")
        self._stop.set()
        extra = self._extra.stop() if self._extra else None
        self._thread.join()
        self._sample(first=False)
        window_s = time.monotonic() - self._t0
        self._pool.shutdown()
        roles = self._build()
        if extra:
            roles.update(extra.roles)
        self._result = WindowUsage(window_s, self._t0_wall, roles, extra.notes if extra else [])
        return self._result

    def __enter__(self) -> ContainerSampler:
        self.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self.stop()

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._sample(first=False)

    def _sample(self, *, first: bool) -> None:
        readings = dict(zip(self._all, self._pool.map(_read, self._all), strict=True))
        with self._lock:
            for role, containers in self._containers.items():
                total = 0
                for container in containers:
                    reading = readings[container]
                    if reading is None:
                        continue
                    if first:
                        self._first[container.id] = reading
                    self._last[container.id] = reading
                    total += reading.memory
                self._memory[role].append(total)

    def _build(self) -> dict[str, RoleUsage]:
        roles = {}
        for role, containers in self._containers.items():
            usage = RoleUsage(role=role, role_class=role_class(role))
            for container in containers:
                first, last = self._first.get(container.id), self._last.get(container.id)
                if first is None or last is None:
                    usage.notes.append(f"{container.name}: no CPU reading at window start")
                    continue
                usage.cpu_s += (last.cpu_ns - first.cpu_ns) / 1e9
                usage.cpu_user_s += (last.user_ns - first.user_ns) / 1e9
                usage.cpu_system_s += (last.system_ns - first.system_ns) / 1e9
                usage.processes += last.pids
            samples = self._memory[role]
            usage.samples = len(samples)
            usage.processes_at_end = usage.processes
            if samples and containers:
                usage.rss_mean_mb = sum(samples) / len(samples) / MIB
                usage.rss_max_mb = max(samples) / MIB
                usage.notes.append(
                    f"{len(containers)} container(s); processes = their tasks, threads included; "
                    "memory = cgroup usage minus inactive file cache, not RSS"
                )
            roles[role] = usage
        return roles


# ---- command line -----------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    """`build` the image or `generate` compose files."""
    parser = argparse.ArgumentParser(
        prog="python -m harness.deploy.compose.legacy",
        description="Docker Compose deployment of the dpumesh, envoy and nomesh stacks.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    build = sub.add_parser(
        "build",
        help=f"build {IMAGE} offline (base image and wheelhouse first, when missing)",
    )
    build.add_argument(
        "--base-image",
        metavar="IMAGE",
        help=f"base image (default: {DEFAULT_BASE_IMAGE} if here or pullable, "
        f"else {LOCAL_BASE_IMAGE}, built with debootstrap if missing)",
    )
    gen = sub.add_parser(
        "generate",
        help="write the compose files (and Envoy configs) of a workmodel",
        description="Write <out>/<mesh>.yml for each mesh, and <out>/configs/*.json for envoy. "
        "The defaults regenerate the checked-in compose/default/.",
    )
    gen.add_argument(
        "--workmodel",
        type=Path,
        default=DEFAULT_WORKMODEL,
        metavar="PATH",
        help="μBench workmodel.json (default: workmodels/default.json)",
    )
    gen.add_argument(
        "--out",
        type=Path,
        default=COMPOSE_DIR / "default",
        metavar="DIR",
        help="output directory (default: compose/default)",
    )
    gen.add_argument("--mesh", choices=MESHES, action="append", help="repeatable; default: all")
    gen.add_argument(
        "--port", type=int, default=DEFAULT_PORT, metavar="N", help="public port on 127.0.0.1"
    )
    gen.add_argument("--seed", type=int, default=0, metavar="S", help="μBench random seed")
    gen.add_argument("--scale", type=float, default=1.0, metavar="F", help="μBench work scale")
    gen.add_argument(
        "--offload-cpus",
        metavar="CPUS",
        help="cpuset of the DPU daemons, e.g. 1 (with --host-cpus; default: no cpusets)",
    )
    gen.add_argument("--host-cpus", metavar="CPUS", help="cpuset of every other container, e.g. 0")
    args = parser.parse_args(argv)
    if args.command == "build":
        print(f"{IMAGE} {ensure_image(args.base_image)}")
        return 0
    if (args.offload_cpus is None) != (args.host_cpus is None):
        parser.error("--offload-cpus and --host-cpus go together")
    cpusets = CpuSets(args.offload_cpus, args.host_cpus) if args.offload_cpus else None
    for mesh in args.mesh or MESHES:
        deployment = generate(
            mesh,
            args.workmodel,
            args.out,
            port=args.port,
            seed=args.seed,
            scale=args.scale,
            cpusets=cpusets,
        )
        print(deployment.file)
    return 0


if __name__ == "__main__":
    sys.exit(main())
