"""Read back the placement really in force, and compare it with the layout.

What a run records and checks comes from the kernel, not from what the
harness meant to do: each thread's `Cpus_allowed_list` in
/proc/PID/task/TID/status, and the CPU bandwidth of the cgroup in
/proc/PID/cgroup (the tightest limit on the way up to the hierarchy's root).
Parsers and checks are pure functions; the readers are thin I/O around them.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path

from harness.placement.cgroups import Hierarchy, limit_at
from harness.placement.layout import PlacementError, format_cpus, parse_cpus

PROC = Path("/proc")
_ONLINE = Path("/sys/devices/system/cpu/online")

Observed = Mapping[int, Mapping[int, frozenset[int]]]  # pid -> tid -> allowed CPUs


def online_cpus(path: Path = _ONLINE) -> frozenset[int]:
    """The machine's online CPUs."""
    return parse_cpus(path.read_text())


def parse_cpus_allowed(status: str) -> frozenset[int]:
    """`Cpus_allowed_list` of a /proc/.../status text."""
    for line in status.splitlines():
        key, _, value = line.partition(":")
        if key == "Cpus_allowed_list":
            return parse_cpus(value)
    raise PlacementError("no Cpus_allowed_list in status")


def parse_proc_cgroup(text: str) -> dict[str, str]:
    """Controller -> cgroup path of a /proc/PID/cgroup text; `""` is the v2 unified one."""
    paths: dict[str, str] = {}
    for line in text.splitlines():
        _hier, _, rest = line.partition(":")
        controllers, _, path = rest.partition(":")
        for controller in controllers.split(","):
            paths[controller] = path
    return paths


def thread_cpus(pid: int, proc: Path = PROC) -> dict[int, frozenset[int]]:
    """Allowed CPUs of every thread of `pid` (threads that exit meanwhile are left out)."""
    found = {}
    for task in (proc / str(pid) / "task").iterdir():
        try:
            found[int(task.name)] = parse_cpus_allowed((task / "status").read_text())
        except (FileNotFoundError, ProcessLookupError):
            continue
    return found


def observe(pids: Iterable[int], proc: Path = PROC) -> dict[int, dict[int, frozenset[int]]]:
    """Allowed CPUs per thread of each live process in `pids`."""
    observed = {}
    for pid in pids:
        try:
            observed[pid] = thread_cpus(pid, proc)
        except (FileNotFoundError, ProcessLookupError):
            continue  # exited: liveness is checked elsewhere, not a placement mismatch
    return observed


def cgroup_limit(pid: int, hierarchy: Hierarchy, proc: Path = PROC) -> float | None:
    """Cores of CPU bandwidth in force for `pid`: the tightest limit of its cgroup and parents."""
    paths = parse_proc_cgroup((proc / str(pid) / "cgroup").read_text())
    key = "" if hierarchy.version == 2 else "cpu"
    if key not in paths:
        raise PlacementError(f"pid {pid} is in no cgroup {key or 'v2'} hierarchy")
    leaf = hierarchy.cpu / paths[key].lstrip("/")
    chain = [leaf, *leaf.parents]
    if hierarchy.cpu not in chain:
        raise PlacementError(f"cgroup {paths[key]} of pid {pid} is not under {hierarchy.cpu}")
    # up to the hierarchy's root, which has cfs files on v1 but no cpu.max on v2
    chain = chain[: chain.index(hierarchy.cpu) + (1 if hierarchy.version == 1 else 0)]
    limits = [limit for d in chain if (limit := limit_at(d, hierarchy.version)) is not None]
    return min(limits, default=None)


def check_processes(expected: frozenset[int], observed: Observed, label: str = "") -> list[str]:
    """One line per thread whose allowed CPUs differ from `expected`.

    For a `shared` layout, `expected` is every online CPU: the processes must be
    unrestricted.
    """
    what = f"{label} " if label else ""
    return [
        f"{what}pid {pid} thread {tid}: allowed cpus {format_cpus(cpus)}, "
        f"expected {format_cpus(expected)}"
        for pid, threads in sorted(observed.items())
        for tid, cpus in sorted(threads.items())
        if cpus != expected
    ]


def check_limit(
    expected: float | None, observed: float | None, label: str = "", tolerance: float = 0.005
) -> list[str]:
    """One line if the CPU bandwidth in force is not the expected one (None = unlimited)."""
    if expected is None and observed is None:
        return []
    if expected is not None and observed is not None and abs(expected - observed) <= tolerance:
        return []
    what = f"{label}: " if label else ""
    return [f"{what}CPU bandwidth {_cores(observed)} in force, expected {_cores(expected)}"]


def _cores(limit: float | None) -> str:
    return "unlimited" if limit is None else f"{limit:g} cores"
