"""The compose deployer: a stack description (`harness.stacks`) as a Docker Compose project.

What runs is the description's, exactly what the local deployer runs as
processes: each component becomes one container of one image, its command
the rendered arguments (`render`: how addresses, ports, paths and namespaces
are decided in containers). So, for the stacks of `harness.stacks`:

* `dpumesh`: `dpa-daemon` owns the IPC namespace (`ipc: shareable`, one
  1 GiB /dev/shm for the rings, registry and semaphores); `dpu-daemon` (the
  bridge, published on `127.0.0.1:<port>`) and one `app-<svc>` per service
  (`dpumesh.server`, PN workers) join it, each in its own PID namespace. The
  workers and the DMA manager have no network at all (`network_mode: none`):
  every request reaches them through the shared-memory queues, across
  containers.
* `envoy`: per service a pod: `sidecar-<svc>` owns the network namespace and
  `app-<svc>` joins it (`network_mode: service:sidecar-<svc>`), so the app and
  its sidecar talk over loopback; `gateway` is published on the port.
* `nomesh`: one `app-<svc>` per service calling the others by container name;
  the entry one is published on the port.

Every container has the labels `dpumesh.role`, `dpumesh.service` and
`dpumesh.cpu-set`. Ports inside containers are fixed (`Port.number`), so
generated files are stable; the ports the harness reads (probes, counters)
are published on ephemeral loopback ports, found through the Docker SDK. Only
loopback is ever published.

Every container has Docker's restart policy of the start's `RestartPolicy`
(`restart: always` by default). A restarted container gets fresh
namespaces, so the containers sharing its network or IPC namespace are
restarted with it (`restarts`), as a pod sandbox would keep them together.

Modules: `cli` (Docker client, compose command), `image` (the offline image
build), `render` (description → compose file), `stack` (the running project:
readiness, traffic, manifest, teardown), `restarts` (restarts from the
engine's events, namespace joiners kept with their owner), `sampler` (CPU
and memory per container role); `python -m harness.deploy.compose
build|generate` is the command line.
"""

from __future__ import annotations

import itertools
import os
import sys
from pathlib import Path

from harness.deploy import check_placement
from harness.deploy.compose.cli import ComposeError, check_config, compose_command, docker_client
from harness.deploy.compose.image import ensure_image
from harness.deploy.compose.render import ComposeResolver, Deployment, generate
from harness.deploy.compose.sampler import ContainerSampler
from harness.deploy.compose.stack import MODE, ComposeStack
from harness.deploy.image import IMAGE
from harness.names import CPU_SETS
from harness.placement.apply import Placement
from harness.placement.layout import format_cpus
from harness.ports import port_is_free
from harness.procs import ALWAYS, RestartPolicy, StartError
from harness.stacks.model import StackDescription

__all__ = [
    "IMAGE",
    "ComposeError",
    "ComposeResolver",
    "ComposeStack",
    "ContainerSampler",
    "Deployment",
    "check_config",
    "compose_command",
    "docker_client",
    "ensure_image",
    "generate",
    "start",
]

_projects = itertools.count()


def start(
    desc: StackDescription,
    *,
    run_dir: str | Path,
    port: int,
    ready_timeout_s: float = 120.0,
    placement: Placement | None = None,
    restart: RestartPolicy = ALWAYS,
) -> ComposeStack:
    """Start `desc` in containers with its public port on `127.0.0.1:port`; once it answers.

    The image is built (from cache after the first time) once per process.
    The compose file and generated configs go to `run_dir`, with `stack.json`
    and every container's log at teardown. With `placement`, every container
    gets its CPU set's `cpuset:` (read back into `stack.json` afterwards).
    The DPU daemons' containers are made under the placement's dpu cgroup
    (`cgroup_parent:`), so they share its CPU bandwidth as local processes do.
    `restart`'s mode is every container's restart policy (Docker's back-off);
    a container that restarts before the stack is ready fails the start.
    Raises `StartError` before starting anything when the port is taken, and
    `ComposeError` (a `StartError`) after tearing everything down.
    """
    for line in desc.warnings:
        print(f"warning: {line}", file=sys.stderr)
    if not port_is_free(port):
        raise StartError(f"{desc.mesh} compose stack: port {port} is already in use")
    check_placement(MODE, placement)
    cpusets = cgroup_parents = None
    if placement is not None and not placement.layout.shared:
        cpusets = {s: format_cpus(placement.layout.cpus(s)) for s in CPU_SETS}
    if placement is not None and placement.group is not None:
        cgroup_parents = {"dpu": placement.group.parent_path("dpu")}
    run_dir = Path(run_dir).resolve()
    deployment = generate(
        desc,
        run_dir,
        port=port,
        cpusets=cpusets,
        cgroup_parents=cgroup_parents,
        restart=restart,
    )
    image_id = ensure_image()
    project = f"dpumesh-{desc.mesh}-{os.getpid()}-{next(_projects)}"
    stack = ComposeStack(
        deployment,
        project=project,
        port=port,
        run_dir=run_dir,
        placement=placement,
        restart=restart,
    )
    try:
        stack.start(ready_timeout_s)
        stack.write_manifest(image_id)
    except BaseException:
        stack.stop()
        raise
    return stack
