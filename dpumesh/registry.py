"""Explicit worker registry with liveness, plus the endpoints that use it.

Why: the prototype found workers by scanning /dev/shm and never noticed dead
ones. Here workers claim a slot in one shared table, heartbeat it, and
release it; anyone can tell who is alive and collect what dead workers left.

Table `/dpumesh.<ns>.registry` (native byte order, host-local):

    header (64 B): magic u32, layout u16, state u16 (OPEN/CLOSED), slots u32,
                   pad u32, version u64, lock owner token u64
    slot (128 B):  state u16 (FREE/ACTIVE), gen u16, pid u32, heartbeat u64
                   (time.monotonic_ns: CLOCK_MONOTONIC is system-wide, so it
                   works across containers sharing IPC but not PIDs),
                   name length u8, service name (<= 63 bytes UTF-8)

Start order does not matter: `open_or_create` publishes the table already
initialised (`ring.create_initialised`: built under a private name, then
linked into place atomically), so losers simply open it and nobody waits. A
segment at the registry's name that is not a valid table is garbage and is
replaced.

Claim/release run under a POSIX semaphore mutex `/dpumesh.<ns>.registry.lock`.
`version` is a seqlock: odd while a writer is updating, bumped by two per
claim/release, so readers detect change cheaply and retry torn snapshots.
Heartbeats are single aligned 8-byte stores made without the lock.

Lock recovery: the critical section is a few microseconds with no I/O, so a
holder that keeps the lock for LOCK_TIMEOUT was killed inside it. The waiter
then takes the lock over (its token in the header marks it the owner), and a
version left odd by the dead writer is repaired. A slow holder that wakes up
afterwards sees a foreign token and does not post the semaphore, so the count
stays at one.

Liveness: a slot whose heartbeat is older than DEAD_AFTER is dead. Workers
heartbeat every HEARTBEAT_INTERVAL from a daemon thread. `collect_stale` frees
dead slots and unlinks objects of worker generations that no longer hold a
slot, and buffer segments older than BUFFER_MAX_AGE.

Workers and both daemons hold a slot while they run (daemons under names
starting with DAEMON_PREFIX, which `snapshot` hides unless asked). Shared
objects (registry, its lock, dpa doorbell, sidecar rings) are removed only by
`Registry.unlink_if_idle`, which `Membership.close` calls after releasing: the
last process out cleans up, whatever the start and stop order. It marks the
table CLOSED under the lock, so holders of the old mapping notice and re-open.
"""

from __future__ import annotations

import contextlib
import logging
import mmap
import os
import secrets
import struct
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import NamedTuple

import posix_ipc

from dpumesh import naming, ring

log = logging.getLogger(__name__)

HEARTBEAT_INTERVAL = 0.2  # seconds between worker heartbeats
DEAD_AFTER = 1.0  # heartbeat age (s) after which a worker is dead
BUFFER_MAX_AGE = 60.0  # buffer segments older than this (s) are stale
LOCK_TIMEOUT = 2.0  # a registry lock held this long (s) is taken over
DEFAULT_SLOTS = 256
MAX_SERVICE_BYTES = 63
DAEMON_PREFIX = "@"  # registry names of the daemons; never a service name
DMA_MANAGER_NAME = DAEMON_PREFIX + "dpa-daemon"  # the DMA manager's registry slot
SIDECAR_NAME = DAEMON_PREFIX + "dpu-daemon"  # the sidecar's

_MAGIC = 0x47525044  # "DPRG"
_LAYOUT = 1
_OPEN = 1
_CLOSED = 2
_HEADER = struct.Struct("=IHHII")  # magic layout state slots pad
_HEADER_SIZE = 64
_STATE_OFFSET = 6
_VERSION_IDX = 2  # u64 index of the version counter
_OWNER_IDX = 3  # u64 index of the lock owner token
_SLOT_SIZE = 128
_SLOT_HEAD = struct.Struct("=HHI")  # state gen pid
_SLOT_NAME = struct.Struct("=B63s")
_SLOT_NAME_OFFSET = 16
_SLOT = struct.Struct("=HHIQB63s48x")  # whole slot, for snapshots
FREE = 0
ACTIVE = 1


class RegistryError(Exception):
    """Registry cannot satisfy the request."""


class RegistryFull(RegistryError):
    """Every slot is held by a live worker."""


class WorkerKey(NamedTuple):
    """A worker's slot plus the generation that slot had when claimed."""

    slot: int
    gen: int

    @property
    def route(self) -> int:
        """u32 for a ring entry's route field: slot low 16 bits, gen high 16 bits."""
        return (self.gen << 16) | self.slot

    @classmethod
    def from_route(cls, route: int) -> WorkerKey:
        """Inverse of `route`."""
        return cls(route & 0xFFFF, (route >> 16) & 0xFFFF)


@dataclass(frozen=True, slots=True)
class WorkerInfo:
    """One ACTIVE slot as seen by `Registry.snapshot`."""

    slot: int
    gen: int
    pid: int
    service: str
    heartbeat_age_s: float
    alive: bool

    @property
    def key(self) -> WorkerKey:
        """The worker's key (for routing)."""
        return WorkerKey(self.slot, self.gen)

    @property
    def is_daemon(self) -> bool:
        """A daemon's presence slot rather than a worker."""
        return self.service.startswith(DAEMON_PREFIX)


def _age_s(heartbeat_ns: int, now_ns: int) -> float:
    return max(0, now_ns - heartbeat_ns) / 1e9


class Registry:
    """Handle on one namespace's registry table (see module docstring)."""

    def __init__(self, ns: str, mapped: tuple[mmap.mmap, posix_ipc.Semaphore]) -> None:
        """Use `open_or_create` or `open`."""
        self.ns = ns
        self.name = naming.registry(ns)
        self._mm, self._lock = mapped
        self._q = memoryview(self._mm).cast("Q")
        self.slots: int = _HEADER.unpack_from(self._mm, 0)[3]

    # -- opening -------------------------------------------------------------

    @classmethod
    def open_or_create(cls, ns: str, *, slots: int = DEFAULT_SLOTS) -> Registry:
        """Open the namespace's registry, creating it if nobody has yet."""
        naming.validate_namespace(ns)
        return cls(ns, _map(ns, create=True, slots=slots))

    @classmethod
    def open(cls, ns: str) -> Registry:
        """Open an existing registry; posix_ipc.ExistentialError if there is none."""
        naming.validate_namespace(ns)
        return cls(ns, _map(ns, create=False, slots=0))

    def _reopen_if_closed(self, *, create: bool = False) -> None:
        """Follow a table that was unlinked and re-created (see unlink_if_idle).

        Readers do not create: while no new table exists they keep seeing the
        closed one, which holds no ACTIVE slot.
        """
        if struct.unpack_from("=H", self._mm, _STATE_OFFSET)[0] != _CLOSED:
            return
        try:
            mapped = _map(self.ns, create=create, slots=self.slots)
        except posix_ipc.ExistentialError:
            return
        log.info("registry %s was re-created; re-opening", self.name)
        self.close()
        self._mm, self._lock = mapped
        self._q = memoryview(self._mm).cast("Q")
        self.slots = _HEADER.unpack_from(self._mm, 0)[3]

    def close(self) -> None:
        """Unmap and drop the lock handle (idempotent)."""
        if self._mm.closed:
            return
        self._q.release()
        self._mm.close()
        with contextlib.suppress(posix_ipc.ExistentialError):
            self._lock.close()

    # -- locking -------------------------------------------------------------

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        """Hold the claim/release mutex; take it over from a dead holder."""
        deadline = time.monotonic() + LOCK_TIMEOUT
        while True:
            try:
                self._lock.acquire(max(0.0, deadline - time.monotonic()))
                break
            except posix_ipc.SignalError:
                continue  # its handler already ran; keep waiting
            except posix_ipc.BusyError:
                log.warning("registry lock %s held > %ss: taking it over", self.name, LOCK_TIMEOUT)
                break
        token = secrets.randbits(63) | 1
        self._q[_OWNER_IDX] = token
        try:
            yield
        finally:
            if self._q[_OWNER_IDX] == token:
                self._q[_OWNER_IDX] = 0
                self._lock.release()

    def _begin_write(self) -> int:
        version = self._q[_VERSION_IDX]
        version += version & 1  # a writer died mid-update: repair
        self._q[_VERSION_IDX] = version + 1
        return version + 2

    def _slot_offset(self, slot: int) -> int:
        return _HEADER_SIZE + slot * _SLOT_SIZE

    def _hb_index(self, slot: int) -> int:
        return (self._slot_offset(slot) + 8) // 8

    # -- workers -------------------------------------------------------------

    def claim(self, service: str, pid: int) -> WorkerKey:
        """Take a free slot for `service`; bumps its generation.

        When no slot is free, dead workers' slots are reaped once before
        giving up with RegistryFull.
        """
        raw = service.encode("utf-8")
        if not raw or len(raw) > MAX_SERVICE_BYTES or b"\0" in raw:
            raise ValueError(f"service name must be 1-{MAX_SERVICE_BYTES} UTF-8 bytes, no NUL")
        reaped = False
        while True:
            self._reopen_if_closed(create=True)
            with self._locked():
                if struct.unpack_from("=H", self._mm, _STATE_OFFSET)[0] == _CLOSED:
                    continue  # closed while we waited for the lock: re-open
                key = self._claim_free_slot(raw, pid)
            if key is not None:
                return key
            if reaped:
                raise RegistryFull(f"all {self.slots} slots of {self.ns} are taken")
            reaped = True
            self.reap_dead()

    def _claim_free_slot(self, raw: bytes, pid: int) -> WorkerKey | None:
        """Take the first FREE slot (caller holds the lock); None if there is none."""
        for slot in range(self.slots):
            off = self._slot_offset(slot)
            state, gen, _pid = _SLOT_HEAD.unpack_from(self._mm, off)
            if state != FREE:
                continue
            gen = gen % 0xFFFF + 1  # 1..65535: route 0 never names a worker
            done = self._begin_write()
            _SLOT_NAME.pack_into(self._mm, off + _SLOT_NAME_OFFSET, len(raw), raw)
            self._q[self._hb_index(slot)] = time.monotonic_ns()
            _SLOT_HEAD.pack_into(self._mm, off, ACTIVE, gen, pid)
            self._q[_VERSION_IDX] = done
            return WorkerKey(slot, gen)
        return None

    def heartbeat(self, key: WorkerKey) -> bool:
        """Refresh `key`'s heartbeat; False if the slot is no longer ours."""
        state, gen, _pid = _SLOT_HEAD.unpack_from(self._mm, self._slot_offset(key.slot))
        if state != ACTIVE or gen != key.gen:
            return False
        self._q[self._hb_index(key.slot)] = time.monotonic_ns()
        return True

    def _free(self, slot: int) -> None:
        """Mark `slot` FREE (caller holds the lock and has begun a write)."""
        off = self._slot_offset(slot)
        gen = _SLOT_HEAD.unpack_from(self._mm, off)[1]
        _SLOT_HEAD.pack_into(self._mm, off, FREE, gen, 0)

    def release(self, key: WorkerKey) -> bool:
        """Give `key`'s slot back; False if it was not ours any more."""
        if not 0 <= key.slot < self.slots:
            return False
        with self._locked():
            state, gen, _pid = _SLOT_HEAD.unpack_from(self._mm, self._slot_offset(key.slot))
            if state != ACTIVE or gen != key.gen:
                return False
            done = self._begin_write()
            self._free(key.slot)
            self._q[_VERSION_IDX] = done
            return True

    def release_pid(self, pid: int) -> list[WorkerKey]:
        """Free every slot held by `pid`, a process its parent has just seen die.

        Why: the heartbeat says a worker is dead only DEAD_AFTER later, and until
        then the sidecar keeps routing to it; the parent knows at once (SIGCHLD).
        """
        self._reopen_if_closed()
        freed: list[WorkerKey] = []
        with self._locked():
            done = 0
            for slot in range(self.slots):
                state, gen, owner = _SLOT_HEAD.unpack_from(self._mm, self._slot_offset(slot))
                if state != ACTIVE or owner != pid:
                    continue
                if not done:
                    done = self._begin_write()
                self._free(slot)
                freed.append(WorkerKey(slot, gen))
            if done:
                self._q[_VERSION_IDX] = done
        return freed

    def reap_dead(self) -> list[WorkerKey]:
        """Free every slot whose heartbeat is older than DEAD_AFTER; returns their keys."""
        self._reopen_if_closed()
        # Daemon slots too: a killed daemon's slot left ACTIVE would keep the namespace's
        # last process from removing its shared objects (`unlink_if_idle`).
        if not any(not info.alive for info in self.snapshot(include_daemons=True)):
            return []
        reaped: list[WorkerKey] = []
        with self._locked():
            done = 0
            now = time.monotonic_ns()
            for slot in range(self.slots):
                state, gen, _pid = _SLOT_HEAD.unpack_from(self._mm, self._slot_offset(slot))
                if state != ACTIVE or _age_s(self._q[self._hb_index(slot)], now) <= DEAD_AFTER:
                    continue
                if not done:
                    done = self._begin_write()
                self._free(slot)
                reaped.append(WorkerKey(slot, gen))
            if done:
                self._q[_VERSION_IDX] = done
        return reaped

    # -- readers -------------------------------------------------------------

    @property
    def version(self) -> int:
        """Changes on every claim/release (and when the table is re-created)."""
        self._reopen_if_closed()
        return self._q[_VERSION_IDX]

    def snapshot(self, *, include_daemons: bool = False) -> list[WorkerInfo]:
        """Every ACTIVE worker slot (and daemon slots if asked), with liveness."""
        self._reopen_if_closed()
        q = self._q
        end = _HEADER_SIZE + self.slots * _SLOT_SIZE
        for attempt in range(1000):
            before = q[_VERSION_IDX]
            raw = self._mm[_HEADER_SIZE:end]
            if not before & 1 and q[_VERSION_IDX] == before:
                break
            if attempt > 10:
                os.sched_yield()  # a writer is mid-update (or died there: take what we have)
        now = time.monotonic_ns()
        found: list[WorkerInfo] = []
        for slot, (state, gen, pid, _hb, nlen, name) in enumerate(_SLOT.iter_unpack(raw)):
            if state != ACTIVE:
                continue
            # heartbeat via an aligned 8-byte load: the copy above may be torn
            age = _age_s(q[self._hb_index(slot)], now)
            service = name[: min(nlen, MAX_SERVICE_BYTES)].decode("utf-8", "replace")
            if service.startswith(DAEMON_PREFIX) and not include_daemons:
                continue
            found.append(WorkerInfo(slot, gen, pid, service, age, age <= DEAD_AFTER))
        return found

    def unlink_if_idle(self) -> bool:
        """Remove every shared object of the namespace if no slot is ACTIVE.

        That is the registry, its lock, the dpa doorbell and the sidecar rings
        with their doorbell: workers and both daemons each hold a slot while
        they run, so whoever leaves last cleans up, whatever the start order.

        Marks the table CLOSED first so holders of the old mapping re-open.
        """
        self._reopen_if_closed()
        with self._locked():
            for slot in range(self.slots):
                if _SLOT_HEAD.unpack_from(self._mm, self._slot_offset(slot))[0] == ACTIVE:
                    return False
            struct.pack_into("=H", self._mm, _STATE_OFFSET, _CLOSED)
            with contextlib.suppress(posix_ipc.ExistentialError):
                posix_ipc.unlink_shared_memory(self.name)
            with contextlib.suppress(posix_ipc.ExistentialError):
                posix_ipc.unlink_semaphore(naming.registry_lock(self.ns))
            with contextlib.suppress(posix_ipc.ExistentialError):
                posix_ipc.unlink_semaphore(naming.dpa_bell(self.ns))
            ring.unlink_ring(naming.sidecar_sq(self.ns))
            ring.unlink_ring(naming.sidecar_cq(self.ns))
            with contextlib.suppress(posix_ipc.ExistentialError):
                posix_ipc.unlink_semaphore(naming.sidecar_bell(self.ns))
            return True


def _map(ns: str, *, create: bool, slots: int) -> tuple[mmap.mmap, posix_ipc.Semaphore]:
    """(mmap, lock semaphore) of the registry, creating both if `create`."""
    name = naming.registry(ns)
    size = _HEADER_SIZE + slots * _SLOT_SIZE
    while True:
        if create:
            try:
                mm = ring.create_initialised(name, size, lambda mm: _init_table(mm, slots))
            except posix_ipc.ExistentialError:
                pass
            else:
                return mm, _open_lock(ns)
        try:
            shm = posix_ipc.SharedMemory(name)
        except posix_ipc.ExistentialError:
            if create:
                continue  # unlinked between our two calls
            raise
        try:
            mm = _check_table(shm)
        finally:
            shm.close_fd()
        if mm is not None:
            return mm, _open_lock(ns)
        if not create:
            raise RegistryError(f"registry {name} is not a registry table")
        log.warning("registry %s is not a registry table: replacing it", name)
        with contextlib.suppress(posix_ipc.ExistentialError):
            posix_ipc.unlink_shared_memory(name)


def _open_lock(ns: str) -> posix_ipc.Semaphore:
    # O_CREAT without O_EXCL is atomic in sem_open: the first caller sets 1.
    return posix_ipc.Semaphore(
        naming.registry_lock(ns), posix_ipc.O_CREAT, mode=0o600, initial_value=1
    )


def _init_table(mm: mmap.mmap, slots: int) -> None:
    _HEADER.pack_into(mm, 0, _MAGIC, _LAYOUT, _OPEN, slots, 0)


def _check_table(shm: posix_ipc.SharedMemory) -> mmap.mmap | None:
    """Map and validate an existing table; None if it is not a table at all."""
    if shm.size < _HEADER_SIZE:
        return None
    mm = mmap.mmap(shm.fd, shm.size)
    magic, layout, state, slots, _pad = _HEADER.unpack_from(mm, 0)
    if magic != _MAGIC:
        mm.close()
        return None
    if layout != _LAYOUT or state not in (_OPEN, _CLOSED) or not 0 < slots <= 0xFFFF:
        mm.close()
        raise RegistryError(f"registry header is corrupt (layout {layout}, slots {slots})")
    if shm.size != _HEADER_SIZE + slots * _SLOT_SIZE:
        mm.close()
        raise RegistryError(f"registry size {shm.size} does not match {slots} slots")
    return mm


def collect_stale(ns: str, registry: Registry | None = None) -> list[str]:
    """Free dead workers' slots and unlink provably stale objects of `ns`.

    Stale: objects of a worker generation `w<slot>g<gen>` that does not hold
    its slot (released, reaped, or never finished claiming), and buffer
    segments older than BUFFER_MAX_AGE. The /dev/shm listing is taken before
    the registry is read: a worker creates its objects only after claiming,
    so anything listed belongs to a claim the snapshot already shows. Safe to
    call from any process, at start-up and periodically. Returns the names
    removed.
    """
    naming.validate_namespace(ns)
    objects = naming.list_objects(ns)
    reg = registry
    if reg is None:
        try:
            reg = Registry.open(ns)
        except (posix_ipc.ExistentialError, RegistryError):
            reg = None
    held: set[tuple[int, int]] = set()
    try:
        if reg is not None:
            for key in reg.reap_dead():
                log.warning("worker slot %d gen %d missed its heartbeats: freed", *key)
            held = {(info.slot, info.gen) for info in reg.snapshot(include_daemons=True)}
    finally:
        if registry is None and reg is not None:
            reg.close()
    removed: list[str] = []
    now = time.time()
    for obj in objects:
        worker = naming.worker_of(obj.name)
        if worker is not None:
            if worker in held:
                continue
        elif naming.is_buffer(ns, obj.name):
            try:
                if now - obj.path.stat().st_mtime <= BUFFER_MAX_AGE:
                    continue
            except FileNotFoundError:
                continue
        else:
            continue
        unlink = (
            posix_ipc.unlink_shared_memory if obj.kind == naming.SHM else posix_ipc.unlink_semaphore
        )
        try:
            unlink(obj.name)
        except posix_ipc.ExistentialError:
            continue
        removed.append(obj.name)
    return removed


def wait_for_predecessor(
    registry: Registry, name: str, timeout: float = DEAD_AFTER + 2 * HEARTBEAT_INTERVAL
) -> WorkerInfo | None:
    """Wait until no live slot called `name` is left; returns the live one if it stays.

    Why: a daemon restarted right after a kill -9 finds its predecessor's slot
    fresh for up to DEAD_AFTER, and two consumers of one single-consumer ring
    would corrupt it. So a daemon waits (at start, never on a data path) for the
    old heartbeat to stop, frees the dead slot, and gives up if it stays alive.
    """
    deadline = time.monotonic() + timeout
    while True:
        live = [
            info
            for info in registry.snapshot(include_daemons=True)
            if info.service == name and info.alive
        ]
        if not live:
            registry.reap_dead()
            return None
        if time.monotonic() >= deadline:
            return live[0]
        time.sleep(HEARTBEAT_INTERVAL / 4)


def _recv(
    sq: ring.Ring, bell: ring.Doorbell, timeout: float | None
) -> tuple[int, int, bytes] | None:
    """Pop from `sq`, sleeping on its doorbell; None after `timeout` s."""
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        got = sq.pop()
        if got is not None:
            return got
        remaining = None if deadline is None else deadline - time.monotonic()
        if remaining is not None and remaining <= 0:
            return None
        bell.wait(remaining)


class Membership:
    """A process's slot in the registry, kept alive by heartbeats from a thread.

    Workers claim under their service name, daemons under DAEMON_PREFIX
    names. `close()` releases the slot and, if it was the last one, removes the
    namespace's shared objects. If heartbeats stall past DEAD_AFTER (a stopped or
    starved process) someone may reap the slot: `lost` turns True and `on_lost`
    runs on the heartbeat thread. A daemon (`rejoin=True`) then claims a new slot
    and goes on, since nothing is named after its slot; a worker's queues are
    named after it, so a worker must leave and be restarted (`on_lost`).
    """

    def __init__(
        self,
        registry: Registry,
        name: str,
        *,
        rejoin: bool = False,
        on_lost: Callable[[], None] | None = None,
    ) -> None:
        """Claim a slot called `name` and start heartbeating it."""
        self.registry = registry
        self.name = name
        self.key = registry.claim(name, os.getpid())
        self.lost = False
        self._rejoin = rejoin
        self._on_lost = on_lost
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._beat, name=f"dpumesh-heartbeat-{self.key.slot}", daemon=True
        )
        self._thread.start()

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_INTERVAL):
            if self.registry.heartbeat(self.key):
                continue
            if self._rejoin:
                log.warning("slot %d gen %d was reaped; claiming a new one", *self.key)
                try:
                    self.key = self.registry.claim(self.name, os.getpid())
                    continue
                except RegistryError as exc:
                    log.error("cannot rejoin the registry: %s", exc)
            else:
                log.error("slot %d gen %d was reaped: this process is lost", *self.key)
            self.lost = True
            if self._on_lost is not None:
                self._on_lost()
            return

    def close(self) -> None:
        """Stop heartbeats, release the slot, clean the namespace if we were last."""
        if self._stop.is_set():
            return
        self._stop.set()
        self._thread.join()
        self.registry.release(self.key)
        if self.registry.unlink_if_idle():
            log.info("namespace %s idle: shared objects removed", self.registry.ns)


class WorkerEndpoint:
    """A worker process's attachment to the mesh.

    Claims a registry slot (a `Membership`), creates its doorbell, `worker_sq`
    (consumer: this worker, space bell: the dpa doorbell) and `worker_cq`
    (consumer: the dpa daemon, so it uses the dpa doorbell, created here if
    the daemon is not up yet) and rings the dpa doorbell to announce itself.
    `close()` releases the slot and unlinks its own objects.
    """

    def __init__(
        self,
        ns: str,
        service: str,
        *,
        slots: int = ring.DEFAULT_SLOTS,
        slot_size: int = ring.DEFAULT_SLOT_SIZE,
        max_payload: int = ring.DEFAULT_MAX_PAYLOAD,
        on_lost: Callable[[], None] | None = None,
    ) -> None:
        """Join the mesh of namespace `ns` as `service` (`on_lost`: see Membership)."""
        if service.startswith(DAEMON_PREFIX):
            raise ValueError(f"service names may not start with {DAEMON_PREFIX!r}")
        self.ns = naming.validate_namespace(ns)
        self.service = service
        self.registry = Registry.open_or_create(self.ns)
        try:
            self.membership = Membership(self.registry, service, on_lost=on_lost)
        except BaseException:
            self.registry.close()
            raise
        self.key = self.membership.key
        try:
            self._cleanup = self._attach(slots, slot_size, max_payload)
        except BaseException:
            self.membership.close()
            self.registry.close()
            raise
        self.dpa_bell.ring()

    @property
    def lost(self) -> bool:
        """True if the registry slot was taken away (see Membership)."""
        return self.membership.lost

    def _attach(self, slots: int, slot_size: int, max_payload: int) -> contextlib.ExitStack:
        """Create doorbell and rings; returns their cleanup."""
        slot, gen = self.key
        names = (
            naming.worker_bell(self.ns, slot, gen),
            naming.worker_sq(self.ns, slot, gen),
            naming.worker_cq(self.ns, slot, gen),
        )
        # We hold (slot, gen): any object with these names is a leftover.
        ring.unlink_ring(names[1])
        ring.unlink_ring(names[2])
        with contextlib.suppress(posix_ipc.ExistentialError):
            posix_ipc.unlink_semaphore(names[0])
        params = {"slots": slots, "slot_size": slot_size, "max_payload": max_payload}
        with contextlib.ExitStack() as stack:
            self.bell = ring.Doorbell.create(names[0])
            stack.callback(self.bell.close)
            stack.callback(self.bell.unlink)
            self.dpa_bell = ring.Doorbell.open_or_create(naming.dpa_bell(self.ns))
            stack.callback(self.dpa_bell.close)
            self.worker_sq = ring.Ring.create(
                names[1], doorbell=self.bell, space_bell=self.dpa_bell, **params
            )
            stack.callback(self.worker_sq.close)
            stack.callback(self.worker_sq.unlink)
            self.worker_cq = ring.Ring.create(names[2], doorbell=self.dpa_bell, **params)
            stack.callback(self.worker_cq.close)
            stack.callback(self.worker_cq.unlink)
            return stack.pop_all()

    def send(
        self,
        payload: bytes | memoryview,
        *,
        route: int = 0,
        flags: int = 0,
        timeout: float | None = None,
    ) -> None:
        """Push to worker_cq (towards the sidecar); waits for space up to `timeout`."""
        self.worker_cq.push(payload, route=route, flags=flags, timeout=timeout)

    def recv(self, timeout: float | None = None) -> tuple[int, int, bytes] | None:
        """Next (route, flags, payload) from worker_sq, or None after `timeout` s."""
        return _recv(self.worker_sq, self.bell, timeout)

    def close(self) -> None:
        """Leave: release the slot (last out cleans up), unlink own rings and doorbell."""
        if self._cleanup is None:
            return
        self.membership.close()  # first, so the daemons stop routing here
        self._cleanup.close()
        self._cleanup = None
        self.registry.close()

    def __enter__(self) -> WorkerEndpoint:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class SidecarRings:
    """`sidecar_sq`/`sidecar_cq` with their doorbells, opened or created by either side.

    The sidecar (consumer of sidecar_sq, producer of sidecar_cq) uses
    `send`/`recv`; the dpa daemon uses `sq`/`cq` directly. Whoever comes first
    creates them with the same layout: sidecar_sq rings the sidecar doorbell
    and uses the dpa doorbell as its space bell (the daemon is the producer);
    sidecar_cq rings the dpa doorbell. The dpa daemon unlinks them on exit;
    `closed` then tells a sidecar to re-open.
    """

    def __init__(
        self,
        ns: str,
        *,
        slots: int = ring.DEFAULT_SLOTS,
        slot_size: int = ring.DEFAULT_SLOT_SIZE,
        max_payload: int = ring.DEFAULT_MAX_PAYLOAD,
    ) -> None:
        """Open (or create) the sidecar rings of namespace `ns`."""
        self.ns = naming.validate_namespace(ns)
        params = {"slots": slots, "slot_size": slot_size, "max_payload": max_payload}
        with contextlib.ExitStack() as stack:
            self.dpa_bell = ring.Doorbell.open_or_create(naming.dpa_bell(self.ns))
            stack.callback(self.dpa_bell.close)
            self.bell = ring.Doorbell.open_or_create(naming.sidecar_bell(self.ns))
            stack.callback(self.bell.close)
            self.sq = ring.Ring.open_or_create(
                naming.sidecar_sq(self.ns), doorbell=self.bell, space_bell=self.dpa_bell, **params
            )
            stack.callback(self.sq.close)
            self.cq = ring.Ring.open_or_create(
                naming.sidecar_cq(self.ns), doorbell=self.dpa_bell, **params
            )
            stack.callback(self.cq.close)
            self._cleanup = stack.pop_all()

    def send(
        self,
        payload: bytes | memoryview,
        *,
        route: int,
        flags: int = 0,
        timeout: float | None = None,
    ) -> None:
        """Push to sidecar_cq for the worker whose key encodes to `route`."""
        self.cq.push(payload, route=route, flags=flags, timeout=timeout)

    def recv(self, timeout: float | None = None) -> tuple[int, int, bytes] | None:
        """Next (route, flags, payload) from sidecar_sq, or None after `timeout` s."""
        return _recv(self.sq, self.bell, timeout)

    @property
    def closed(self) -> bool:
        """True once the dpa daemon unlinked the rings (re-open to follow a new one)."""
        return self.sq.closed or self.cq.closed

    def unlink(self) -> None:
        """Remove both rings (and their own space bells) and the sidecar doorbell."""
        self.sq.unlink()
        self.cq.unlink()
        self.bell.unlink()

    def close(self) -> None:
        """Unmap the rings and close the doorbells (idempotent)."""
        self._cleanup.close()
