"""CPU and memory per container role, from the containers' cgroups through the Docker SDK."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import docker.errors
import psutil
from docker.models.containers import Container

from harness.measure.metrics import MIB, RoleSampler, RoleUsage, WindowUsage, role_class


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
