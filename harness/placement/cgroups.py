"""Real cgroups for the CPU sets: cpuset pinning plus CPU bandwidth (the DPU's speed).

One `CgroupSet` is one directory `dpumesh-<owner pid>-<random>` per cgroup
hierarchy, holding one child cgroup per CPU set (`host`, `dpu`, `loadgen`).
Each child gets `cpuset.cpus` and, when a quota is given, a CPU bandwidth
limit of `quota_cores` x PERIOD_US per PERIOD_US:

    cgroup v2:  cpu.max = "<quota_us> <period_us>"
    cgroup v1:  cpu.cfs_period_us = period_us, cpu.cfs_quota_us = quota_us
                (and cpuset.mems copied from the parent: v1 starts it empty)

v2 is used when a cgroup2 mount under the root offers both `cpu` and
`cpuset` in cgroup.controllers; otherwise v1 `cpu` and `cpuset` mounts under
the root. Hybrid machines such as these test machines have a cgroup2 mount at
/sys/fs/cgroup/unified whose controllers are all bound to v1, so v1 is used.

The owner pid in the name lets `remove_stale` collect the cgroups of a
harness that died; a before-stop check can look for `*dpumesh*` leftovers.
The root is injectable so that tests can point it at a directory that is not
a cgroup mount: the missing controller is then reported, and nothing is made.
"""

from __future__ import annotations

import errno
import os
import re
import secrets
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from harness.placement.layout import CPU_SETS, PlacementError, format_cpus

DEFAULT_ROOT = Path("/sys/fs/cgroup")
PERIOD_US = 100_000
_MIN_QUOTA_US = 1000  # the kernel refuses smaller quotas
_NAME = re.compile(r"dpumesh-(\d+)-[0-9a-f]+")
_RMDIR_TRIES = 40  # x _RMDIR_WAIT_S: tasks that just exited can keep a cgroup busy briefly
_RMDIR_WAIT_S = 0.05


@dataclass(frozen=True)
class Mount:
    """One line of /proc/self/mountinfo, as far as cgroups care."""

    path: Path
    fstype: str
    options: frozenset[str]  # super options: the controllers of a v1 mount


@dataclass(frozen=True)
class Hierarchy:
    """Where cpu and cpuset cgroups are made (the same directory on v2 or co-mounted v1)."""

    version: int
    cpu: Path
    cpuset: Path
    # Every other hierarchy of a v1 (or hybrid) machine: a container runtime asked for a
    # cgroup parent of ours makes it there too (memory, pids, the unified one...), so
    # removal looks there as well.
    others: tuple[Path, ...] = field(default=(), compare=False)

    @property
    def dirs(self) -> tuple[Path, ...]:
        """The distinct directories a cgroup must be made in."""
        return (self.cpu,) if self.cpu == self.cpuset else (self.cpu, self.cpuset)


def parse_mountinfo(text: str) -> list[Mount]:
    """The mounts listed in /proc/self/mountinfo text (man 5 proc)."""
    mounts = []
    for line in text.splitlines():
        fields = line.split()
        if "-" not in fields:
            continue
        sep = fields.index("-")
        path = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m[1], 8)), fields[4])
        mounts.append(Mount(Path(path), fields[sep + 1], frozenset(fields[sep + 3].split(","))))
    return mounts


def detect(root: Path = DEFAULT_ROOT, mounts: Iterable[Mount] | None = None) -> Hierarchy:
    """The cgroup hierarchy under `root` that has both cpu and cpuset controllers."""
    root = Path(root)
    if mounts is None:
        mounts = parse_mountinfo(Path("/proc/self/mountinfo").read_text())
    under = [m for m in mounts if m.path == root or root in m.path.parents]
    have: set[str] = set()
    for mount in under:
        if mount.fstype == "cgroup2":
            controllers = set(_read(mount.path / "cgroup.controllers").split())
            if {"cpu", "cpuset"} <= controllers:
                return Hierarchy(2, mount.path, mount.path)
            have |= controllers
    v1 = {c: m.path for m in under if m.fstype == "cgroup" for c in m.options & {"cpu", "cpuset"}}
    if len(v1) == 2:
        others = {m.path for m in under if m.fstype in ("cgroup", "cgroup2")} - set(v1.values())
        return Hierarchy(1, v1["cpu"], v1["cpuset"], tuple(sorted(others)))
    have |= set(v1)
    if not under:
        raise PlacementError(f"no cgroup mounted at {root} (cgroup v1 cpu or v2 cpu.max needed)")
    if "cpu" not in have:
        raise PlacementError(
            f"no cgroup cpu controller at {root} (cgroup v1 cpu or v2 cpu.max needed)"
        )
    if "cpuset" not in have:
        raise PlacementError(
            f"no cgroup cpuset controller at {root} (cgroup v1 cpuset or v2 cpuset.cpus needed)"
        )
    raise PlacementError(f"cgroup cpu and cpuset controllers at {root} are split over v1 and v2")


def limit_at(directory: Path, version: int) -> float | None:
    """Cores of CPU bandwidth set on one cgroup directory; None = unlimited."""
    if version == 2:
        quota, period = _read(directory / "cpu.max").split()
        return None if quota == "max" else int(quota) / int(period)
    quota_us = int(_read(directory / "cpu.cfs_quota_us"))
    if quota_us < 0:
        return None
    return quota_us / int(_read(directory / "cpu.cfs_period_us"))


class CgroupSet:
    """One cgroup per CPU set; `remove()` (or leaving the `with` block) takes them away."""

    def __init__(self, hierarchy: Hierarchy, name: str) -> None:
        """Refer to the cgroups `name` in `hierarchy` (use `create` to make new ones)."""
        self.hierarchy = hierarchy
        self.name = name

    @classmethod
    def create(
        cls,
        limits: Mapping[str, tuple[Iterable[int], float | None]],
        *,
        root: Path = DEFAULT_ROOT,
        hierarchy: Hierarchy | None = None,
    ) -> CgroupSet:
        """Make `{set_name: (cpus, quota_cores or None)}`; nothing is left behind on error."""
        wanted = {name: (frozenset(cpus), quota) for name, (cpus, quota) in limits.items()}
        for name, (cpus, quota) in wanted.items():
            if name not in CPU_SETS:
                raise PlacementError(f"unknown CPU set {name!r} (known: {', '.join(CPU_SETS)})")
            if not cpus:
                raise PlacementError(f"CPU set {name} is empty")
            if quota is not None and quota * PERIOD_US < _MIN_QUOTA_US:
                raise PlacementError(
                    f"CPU set {name}: quota {quota:g} cores is below the kernel's minimum "
                    f"{_MIN_QUOTA_US / PERIOD_US:g}"
                )
        group = cls(hierarchy or detect(root), f"dpumesh-{os.getpid()}-{secrets.token_hex(4)}")
        try:
            group._make(wanted)
        except BaseException:
            group.remove()
            raise
        return group

    def _make(self, wanted: Mapping[str, tuple[frozenset[int], float | None]]) -> None:
        h = self.hierarchy
        if h.version == 2:
            _write(h.cpu / "cgroup.subtree_control", "+cpu +cpuset")
        for base in h.dirs:
            _mkdir(base / self.name)
        top = h.cpuset / self.name
        if h.version == 2:
            _write(top / "cgroup.subtree_control", "+cpu +cpuset")
        else:  # v1 children may only use what their parent has
            for knob in ("cpuset.cpus", "cpuset.mems"):
                _write(top / knob, _read(h.cpuset / knob))
        for name, (cpus, quota) in wanted.items():
            for base in h.dirs:
                _mkdir(base / self.name / name)
            if h.version == 1:
                _write(top / name / "cpuset.mems", _read(top / "cpuset.mems"))
            _write(top / name / "cpuset.cpus", format_cpus(cpus))
            if quota is None:
                continue
            quota_us = round(quota * PERIOD_US)
            cpu_dir = h.cpu / self.name / name
            if h.version == 2:
                _write(cpu_dir / "cpu.max", f"{quota_us} {PERIOD_US}")
            else:
                _write(cpu_dir / "cpu.cfs_period_us", str(PERIOD_US))
                _write(cpu_dir / "cpu.cfs_quota_us", str(quota_us))

    def procs_files(self, set_name: str) -> tuple[Path, ...]:
        """The files a process writes its pid into to join a set (one per hierarchy)."""
        files = tuple(base / self.name / set_name / "cgroup.procs" for base in self.hierarchy.dirs)
        if not files[0].parent.is_dir():
            raise PlacementError(f"no cgroup for CPU set {set_name!r} in {self.name}")
        return files

    def read_limit(self, set_name: str) -> float | None:
        """Cores of CPU bandwidth in force on a set's cgroup (None = unlimited)."""
        return limit_at(self.hierarchy.cpu / self.name / set_name, self.hierarchy.version)

    def parent_path(self, set_name: str) -> str:
        """A set's cgroup relative to the hierarchy roots: a container's `cgroup_parent`.

        A container made under it shares the set's CPU bandwidth with every other
        process in it (Docker's cgroupfs driver makes `<parent>/<container id>`).
        """
        self.procs_files(set_name)  # the set exists
        return f"/{self.name}/{set_name}"

    def remove(self) -> None:
        """Move any remaining tasks to the parent, then remove the cgroups; idempotent.

        Directories below ours (a container runtime's, in any hierarchy) go first.
        """
        for base in (*self.hierarchy.dirs, *self.hierarchy.others):
            top = base / self.name
            if top.is_dir():
                _rmtree(top, base)

    def __enter__(self) -> CgroupSet:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()


def remove_stale(root: Path = DEFAULT_ROOT, hierarchy: Hierarchy | None = None) -> list[str]:
    """Remove `dpumesh-*` cgroups whose owner process is dead; returns their names."""
    h = hierarchy or detect(root)
    stale = {
        p.name
        for base in h.dirs
        for p in base.iterdir()
        if p.is_dir() and (m := _NAME.fullmatch(p.name)) and not _alive(int(m[1]))
    }
    for name in sorted(stale):
        CgroupSet(h, name).remove()
    return sorted(stale)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by someone else
        pass
    return True


def _rmtree(cgroup: Path, root: Path) -> None:
    """Remove `cgroup` and every cgroup below it, deepest first (tasks go to `root`)."""
    for child in [p for p in cgroup.iterdir() if p.is_dir()]:
        _rmtree(child, root)
    _rmdir(cgroup, root)


def _rmdir(cgroup: Path, parent: Path) -> None:
    """Move the tasks of `cgroup` to `parent` and remove it, retrying while busy."""
    for _ in range(_RMDIR_TRIES):
        if not cgroup.is_dir():
            return
        for pid in _read(cgroup / "cgroup.procs").split():
            try:
                (parent / "cgroup.procs").write_text(pid)
            except ProcessLookupError:  # exited meanwhile
                pass
            except OSError as exc:
                raise PlacementError(
                    f"cannot move pid {pid} out of {cgroup}: {exc.strerror}"
                ) from None
        try:
            cgroup.rmdir()
            return
        except FileNotFoundError:
            return
        except OSError as exc:
            if exc.errno != errno.EBUSY:
                raise PlacementError(f"cannot remove cgroup {cgroup}: {exc.strerror}") from None
        time.sleep(_RMDIR_WAIT_S)
    raise PlacementError(f"cannot remove cgroup {cgroup}: still busy")


def _mkdir(path: Path) -> None:
    try:
        path.mkdir()
    except PermissionError:
        raise PlacementError(
            f"cannot create cgroup {path}: permission denied (needs root)"
        ) from None
    except OSError as exc:
        raise PlacementError(f"cannot create cgroup {path}: {exc.strerror}") from None


def _read(path: Path) -> str:
    try:
        return path.read_text().strip()
    except OSError as exc:
        raise PlacementError(f"cannot read {path}: {exc.strerror}") from None


def _write(path: Path, text: str) -> None:
    try:
        path.write_text(text)
    except OSError as exc:
        raise PlacementError(f"cannot write {text!r} to {path}: {exc.strerror}") from None
