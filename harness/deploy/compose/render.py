"""A stack description rendered as a compose file: one compose service per component.

Where and how, decided here (what runs is the description's):

* every component is a container of `IMAGE`, its command the rendered
  arguments after the image's executable of its program; it listens on
  0.0.0.0 at its port's fixed number (`Port.number`);
* a component that joins another's network (`network_of`) gets
  `network_mode: service:<owner>` and reaches it over loopback; others reach
  a component by its compose service name (the owner of its network); a
  component with `network=False` gets `network_mode: none`;
* the IPC owner is `ipc: shareable` with a 1 GiB /dev/shm, its group joins
  it (`ipc: service:<owner>`); each group has /dev/shm to itself, so its
  DPUmesh namespace is `default`;
* files are read-only bind mounts at their `mount`, paths relative to the
  compose file (the tree can move); generated ones (Envoy bootstraps) are
  written to `<mesh>/configs/<component>.json` next to it (stacks generated
  into one directory share component names, `gateway`) and checked first,
  secrets (mTLS certificates and keys) to `<mesh>/secrets/<component>/`, made
  readable by the image's user (`IMAGE_UID`);
* ports are published on the service owning the network namespace, on
  loopback only: the public one on the caller's port, every `read` one on an
  ephemeral port (found through the Docker SDK);
* labels `dpumesh.role`, `dpumesh.service` and `dpumesh.cpu-set` name what a
  container is; with `cpusets`, its CPU set's cores become its `cpuset:`, and
  with `cgroup_parents` its set's cgroup its `cgroup_parent:` (so the DPU
  daemons' containers share one CPU bandwidth limit, the DPU speed);
* the restart policy (`harness.procs.RestartPolicy`) is Docker's: `restart:
  always` or `"no"` on every service. Only the mode carries over: Docker
  backs off by itself (100 ms, doubling up to 1 min, reset after 10 s of
  running), and does not restart a container stopped through its API
  (`docker stop`/`kill`), only one whose process died.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from harness.deploy import files
from harness.deploy.image import (
    EXECUTABLES,
    IMAGE,
    IMAGE_UID,
    LABEL_CPU_SET,
    LABEL_ROLE,
    LABEL_SERVICE,
)
from harness.names import CPU_SETS, LOCAL_NODE
from harness.procs import ALWAYS, RestartPolicy
from harness.stacks.model import Component, Rendered, StackDescription, render

ANY = "0.0.0.0"
LOOPBACK = "127.0.0.1"
IPC_NAMESPACE = "default"
SHM_SIZE = "1g"
_YAML_WIDTH = 1 << 16  # one line per value, however long


class ComposeResolver:
    """Addresses, ports and paths inside the containers of one compose project."""

    def __init__(self, desc: StackDescription, out_dir: Path) -> None:
        self.desc = desc
        self.out_dir = out_dir
        self.files_dir = out_dir / desc.mesh  # this stack's generated files

    def bind(self, component: Component) -> str:
        return ANY

    def port(self, component: Component, target: str, port: str) -> int:
        return self.desc.component(target).ports[port].number

    def host(self, component: Component, target: str) -> str:
        owner = self.desc.network_owner(target).name
        return LOOPBACK if self.desc.network_owner(component.name).name == owner else owner

    def file(self, component: Component, name: str) -> str:
        return component.file(name).mount

    def ipc(self, component: Component) -> str:
        return IPC_NAMESPACE

    def node(self, component: Component) -> str:
        return LOCAL_NODE

    def generated_path(self, component: Component, name: str) -> Path:
        """Where the generated file `name` of `component` is written, beside the compose file."""
        return files.generated_path(self.files_dir, component, name)


@dataclass(frozen=True)
class Deployment:
    """One generated compose project: the description, its file and what it renders to."""

    desc: StackDescription
    file: Path
    rendered: tuple[Rendered, ...]
    configs: Mapping[str, Path]  # generated configs by component name
    files_dir: Path  # where the generated files (configs, secrets) are


def command(item: Rendered) -> list[str]:
    """A rendered component's command in the image."""
    return [EXECUTABLES[item.component.program], *item.args]


def generate(
    desc: StackDescription,
    out_dir: str | Path,
    *,
    port: int,
    image: str = IMAGE,
    cpusets: Mapping[str, str] | None = None,
    cgroup_parents: Mapping[str, str] | None = None,
    restart: RestartPolicy = ALWAYS,
) -> Deployment:
    """Write `<out_dir>/<mesh>.yml` (and checked `<mesh>/configs/*`) running `desc` on
    `127.0.0.1:port`.

    `cpusets` maps CPU-set names (`harness.names.CPU_SETS`) to cpuset strings
    ("0", "1-2"); a component whose set is not in it is not pinned.
    `cgroup_parents` maps them to a cgroup path (`CgroupSet.parent_path`).
    `restart`'s mode becomes every service's `restart:`. Raises what a file's
    `check` raises (`EnvoyConfigError`) for a rejected config.
    """
    per_set: dict[str, dict[str, str]] = {s: {} for s in CPU_SETS}
    for key, values in (("cpuset", cpusets), ("cgroup_parent", cgroup_parents)):
        unknown = set(values or {}) - set(CPU_SETS)
        if unknown:
            raise ValueError(f"unknown CPU sets {sorted(unknown)} (known: {', '.join(CPU_SETS)})")
        for cpu_set, value in (values or {}).items():
            per_set[cpu_set][key] = value
    out = Path(out_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    resolver = ComposeResolver(desc, out)
    rendered = [render(c, resolver) for c in desc.components]
    configs = files.write_generated(rendered, resolver.files_dir)
    for path in files.secrets(rendered, resolver.files_dir):
        _hand_to_image(path)
    services = {
        item.component.name: _service(
            item, resolver, port, image, per_set[item.component.cpu_set], restart
        )
        for item in rendered
    }
    file = out / f"{desc.mesh}.yml"
    settings = desc.settings
    header = (
        f"# {desc.mesh} stack for {os.path.relpath(settings.workmodel, out)} "
        f"(seed {settings.seed}, scale {settings.scale:g}), public port {LOOPBACK}:{port}.\n"
        "# Generated by harness/deploy/compose (python -m harness.deploy.compose generate); "
        "do not edit.\n"
    )
    body = yaml.safe_dump(
        {"services": _escape(services)},
        sort_keys=False,
        default_flow_style=False,
        allow_unicode=True,
        width=_YAML_WIDTH,
    )
    file.write_text(header + body)
    return Deployment(desc, file, tuple(rendered), configs, resolver.files_dir)


def restart_value(policy: RestartPolicy) -> str:
    """Compose's `restart:` for `policy` ("no" must stay a string: YAML reads no as false)."""
    return "always" if policy.restarts else "no"


def _service(
    item: Rendered,
    resolver: ComposeResolver,
    port: int,
    image: str,
    placed: Mapping[str, str],
    restart: RestartPolicy,
) -> dict[str, Any]:
    """The compose service of one rendered component (see the module docstring)."""
    c = item.component
    spec: dict[str, Any] = {"image": image, "command": command(item)}
    if item.env:
        spec["environment"] = dict(item.env)
    spec["labels"] = {LABEL_ROLE: c.role, LABEL_SERVICE: c.service, LABEL_CPU_SET: c.cpu_set}
    spec["init"] = True  # a real PID 1: signals reach the program, children are reaped
    spec["restart"] = restart_value(restart)
    spec.update(placed)  # cpuset, cgroup_parent of the component's CPU set
    mounts = [
        _mount(f.source or resolver.generated_path(c, f.name), f.mount, resolver.out_dir)
        for f in c.files
    ]
    if mounts:
        spec["volumes"] = mounts
    if not c.network:
        spec["network_mode"] = "none"
    elif c.network_of:
        spec["network_mode"] = f"service:{c.network_of}"
    if c.ipc_owner:
        spec["ipc"] = "shareable"
        spec["shm_size"] = SHM_SIZE
    elif c.ipc_of:
        spec["ipc"] = f"service:{c.ipc_of}"
    published = _published(resolver.desc, c, port)
    if published:
        spec["ports"] = published
    return spec


def _hand_to_image(path: Path) -> None:
    """Make a secret (mode 0600) readable by the image's user, who reads it in the container:
    its owner becomes `IMAGE_UID` when we may give files away (root), else it must be
    readable by all (no other user can read a 0600 file of ours)."""
    if os.geteuid() == 0:
        os.chown(path, IMAGE_UID, IMAGE_UID)
    else:
        path.chmod(0o644)


def _mount(host: Path, target: str, out: Path) -> str:
    """A read-only bind mount, relative to the compose file so the tree can move."""
    rel = os.path.relpath(host, out)
    return f"{rel if rel.startswith('.') else './' + rel}:{target}:ro"


def _published(desc: StackDescription, owner: Component, port: int) -> list[str]:
    """Loopback publications of every port in `owner`'s network namespace (none if it joins one)."""
    if owner.network_of:
        return []
    members = [c for c in desc.components if desc.network_owner(c.name).name == owner.name]
    published = []
    for member in members:
        for spec in member.ports.values():
            if spec.public:
                published.append(f"{LOOPBACK}:{port}:{spec.number}")
            elif spec.read:
                published.append(f"{LOOPBACK}::{spec.number}")
    return published


def _escape(value: Any) -> Any:
    """`$` doubled in every string: Compose interpolates variables in the file."""
    if isinstance(value, str):
        return value.replace("$", "$$")
    if isinstance(value, Mapping):
        return {key: _escape(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_escape(item) for item in value]
    return value
