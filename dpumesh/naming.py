"""POSIX object names of one DPUmesh namespace.

Shared memory and semaphores are machine-wide, so every object name carries
an instance namespace (`DPUMESH_NS`, default `default`): two meshes, or two
test runs, can then share one machine without touching each other's objects.
All names have the form `/dpumesh.<ns>.<object>` (see ARCHITECTURE.md).

On Linux a shared-memory object `/x` appears as `/dev/shm/x` and a named
semaphore `/x` as `/dev/shm/sem.x`; `list_objects` relies on that to find a
namespace's objects for stale collection and for tests.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

DEFAULT_NS = "default"
SHM_DIR = Path("/dev/shm")
_NS_RE = re.compile(r"[A-Za-z0-9_]{1,24}")
_BUFFER_RE = re.compile(r"/dpumesh\.([A-Za-z0-9_]{1,24})\.buf\.([0-9a-f]{1,16})\.(\d{1,20})")
_WORKER_RE = re.compile(r"/dpumesh\.[A-Za-z0-9_]{1,24}\.w(\d{1,5})g(\d{1,5})\.")
_SEM_PREFIX = "sem."
SHM = "shm"
SEM = "sem"


def validate_namespace(ns: str) -> str:
    """Return `ns` if it is a legal namespace; raise ValueError otherwise."""
    if not isinstance(ns, str) or not _NS_RE.fullmatch(ns):
        raise ValueError(f"invalid DPUmesh namespace {ns!r}: need [A-Za-z0-9_]{{1,24}}")
    return ns


def namespace_from_env() -> str:
    """The namespace of this process, from `DPUMESH_NS` (validated)."""
    return validate_namespace(os.environ.get("DPUMESH_NS", DEFAULT_NS))


def prefix(ns: str) -> str:
    """Common prefix of every object name in `ns` (ends with a dot, so `a` != `ab`)."""
    return f"/dpumesh.{validate_namespace(ns)}."


def ns_of(name: str) -> str:
    """The namespace embedded in a DPUmesh object name; ValueError if none."""
    parts = name.split(".", 2)
    if len(parts) < 3 or parts[0] != "/dpumesh":
        raise ValueError(f"{name!r} is not a DPUmesh object name")
    return validate_namespace(parts[1])


def registry(ns: str) -> str:
    """Shared-memory segment of the worker registry table."""
    return prefix(ns) + "registry"


def registry_lock(ns: str) -> str:
    """Semaphore used as the registry's claim/release mutex."""
    return prefix(ns) + "registry.lock"


def sidecar_sq(ns: str) -> str:
    """Ring DMA manager -> sidecar."""
    return prefix(ns) + "sidecar_sq"


def sidecar_cq(ns: str) -> str:
    """Ring sidecar -> DMA manager."""
    return prefix(ns) + "sidecar_cq"


def dpa_bell(ns: str) -> str:
    """Doorbell of the DMA manager (consumer of sidecar_cq and every worker_cq)."""
    return prefix(ns) + "dpa.bell"


def sidecar_bell(ns: str) -> str:
    """Doorbell of the sidecar (consumer of sidecar_sq)."""
    return prefix(ns) + "sidecar.bell"


def worker_base(ns: str, slot: int, gen: int) -> str:
    """Common part of a worker's object names; the generation keeps reused slots apart."""
    return f"{prefix(ns)}w{slot}g{gen}"


def worker_sq(ns: str, slot: int, gen: int) -> str:
    """Ring DMA manager -> worker."""
    return worker_base(ns, slot, gen) + ".worker_sq"


def worker_cq(ns: str, slot: int, gen: int) -> str:
    """Ring worker -> DMA manager."""
    return worker_base(ns, slot, gen) + ".worker_cq"


def worker_bell(ns: str, slot: int, gen: int) -> str:
    """Doorbell of one worker (consumer of its worker_sq)."""
    return worker_base(ns, slot, gen) + ".bell"


def ring_space(ring_name: str, instance: str) -> str:
    """Semaphore a ring's producer sleeps on while the ring is full.

    `instance` is unique per ring created under `ring_name` (the ring's header
    records the full name), so a new ring never meets a dead one's bell.
    """
    return f"{ring_name}.space.{instance}"


def is_ring_space(ring_name: str, name: str) -> bool:
    """True if `name` is a space bell of some ring created as `ring_name`."""
    return name.startswith(ring_name + ".space.")


def shm_path(name: str) -> Path:
    """Where Linux shows the shared-memory segment `name` (see module docstring)."""
    return SHM_DIR / name[1:]


def buffer(ns: str, token: str, seq: int) -> str:
    """Out-of-line body segment, unique per (creating process's token, sequence number).

    The token is random per process rather than its pid: processes in
    different PID namespaces (containers sharing only IPC) may share a pid.
    """
    return f"{prefix(ns)}buf.{token}.{seq}"


def is_buffer(ns: str, name: str) -> bool:
    """True if `name` is a well-formed buffer name of namespace `ns`."""
    match = _BUFFER_RE.fullmatch(name)
    return match is not None and match.group(1) == ns


def worker_of(name: str) -> tuple[int, int] | None:
    """(slot, gen) if `name` is one of a worker's objects, else None."""
    match = _WORKER_RE.match(name)
    return (int(match.group(1)), int(match.group(2))) if match else None


@dataclass(frozen=True, slots=True)
class ShmObject:
    """One POSIX object of a namespace as seen in /dev/shm."""

    name: str  # POSIX name, with the leading slash
    kind: str  # SHM or SEM
    path: Path


def list_objects(ns: str) -> list[ShmObject]:
    """Every shared-memory segment and semaphore of `ns` currently in /dev/shm."""
    stem = prefix(ns)[1:]
    found: list[ShmObject] = []
    try:
        entries = list(os.scandir(SHM_DIR))
    except FileNotFoundError:
        return found
    for entry in entries:
        fname = entry.name
        if fname.startswith(stem):
            found.append(ShmObject("/" + fname, SHM, Path(entry.path)))
        elif fname.startswith(_SEM_PREFIX + stem):
            found.append(ShmObject("/" + fname[len(_SEM_PREFIX) :], SEM, Path(entry.path)))
    return sorted(found, key=lambda obj: obj.name)


def remove_all(ns: str) -> list[ShmObject]:
    """Unlink every object of `ns`; only for a namespace nobody uses any more.

    For test and benchmark teardown and for a harness whose processes have
    exited: running members clean up after themselves (see registry).
    Returns what was removed.
    """
    found = list_objects(ns)
    for obj in found:
        obj.path.unlink(missing_ok=True)
    return found
