"""Bounded single-producer/single-consumer rings in POSIX shared memory.

Why: every DPUmesh queue (DESIGN §2) has exactly one producer and one
consumer, so a lock-free SPSC ring with semaphore wake-ups gives event-driven
delivery (no sleep-polling, ~0 idle CPU) and back-pressure instead of the
prototype's overwrite-on-wrap.

API
---
``Doorbell`` - a counting POSIX semaphore a consumer sleeps on:
    Doorbell.create(name) / .open(name) / .open_or_create(name)
    bell.ring() ; bell.wait(timeout) -> bool ; bell.absorb(n) -> int
    bell.close() ; bell.unlink()
One consumer may read several rings that share its doorbell. Every push posts
the doorbell once, after publishing, and a consumer takes at most one token
per message it consumed (``wait`` + ``absorb(n - 1)`` after draining ``n``),
so once producers have posted, the count is never below the number of unread
messages. Consumers must tolerate waking to find nothing.

``Ring``:
    Ring.create(name, *, doorbell, space_bell=None, slots=256, slot_size=8192,
                max_payload=8 MiB, max_inline=None)
    Ring.open(name, *, doorbell=None, space_bell=None)
    Ring.open_or_create(name, *, doorbell, space_bell=None, **params)
    ring.push(payload, *, route=0, flags=0, timeout=0.0)   # RingFull / PayloadTooLarge
    ring.pop() -> (route, flags, payload) | None           # non-blocking
    ring.pop_entry() -> Entry | None ; ring.push_entry(entry, *, route, flags, timeout)
    ring.room_for(entry) -> bool                           # non-blocking, arms space wake-up
    len(ring) (unread entries) ; ring.free_slots ; ring.closed
    ring.close() ; ring.unlink()
``timeout``: 0 fails at once with ``RingFull``, None waits forever, > 0 waits
up to that many seconds.

Layout
------
One segment: a 512-byte header, then ``slots`` slots of ``slot_size`` bytes.
The header holds magic/version/state, geometry, limits, the names of the
consumer doorbell and of the space bell, and (each on its own cache line) the
consumer's ``head``/``popped``, the producer's ``tail``/``pushed`` and the
space wake-up words. Counters are free-running u64 slot counts in native
byte order (the segment never leaves the host), accessed through a
``memoryview`` cast to ``Q``: CPython stores such an item with one 8-byte
``memcpy`` (a single aligned ``mov``), so a reader never sees it torn, unlike
``struct`` with an explicit byte order, which writes byte by byte.

Each entry starts at a slot boundary with a 16-byte entry header
``<HHIII``: flags, reserved, route, length, span (slots used). Flags:
BUFFER (set by the ring), BOUNCED (for the dpa daemon), an internal PAD bit;
bits 8-15 are free for applications. ``route`` is opaque to the ring. The
payload follows the header and continues into the next ``span - 1`` slots,
so an entry is always contiguous. Wrap-around: when an entry would run past
the last slot the producer first writes a PAD entry covering the rest of the
ring and starts the entry at slot 0 (the consumer skips PAD entries).

Payloads larger than ``max_inline`` go out of line (default limit: the
smallest of 256 KiB, ``max_payload`` and a quarter of the ring, so an inline
entry plus its worst-case padding always fits an empty ring): the producer
writes them to a fresh segment ``/dpumesh.<ns>.buf.<token>.<seq>`` (mode
0600; the token is random per process) and the entry (flag BUFFER) holds
the segment's name and the payload length;
``pop`` reads and unlinks it, ``pop_entry``/``push_entry`` forward the
descriptor without copying. Payloads over ``max_payload`` raise
``PayloadTooLarge``.

Waiting for space
-----------------
A producer that finds the ring full writes how many slots it needs and bumps
a ``wait_seq`` word, issues a full fence, re-checks the free space and then
sleeps on the ring's *space bell*. After advancing ``head`` the consumer
issues a full fence and, if ``wait_seq`` differs from the last one it
acknowledged and enough space is free, acknowledges it and posts the space
bell once. The two fences close the store->load race (Dekker), so a wake-up is
never lost; spurious wake-ups are re-checked. By default the space bell is a
dedicated semaphore ``<ring>.space.<instance>`` owned by the ring. A producer that
multiplexes many rings (the dpa daemon) instead passes its own doorbell as
``space_bell`` and uses ``room_for``, so "space freed" simply wakes its main
loop; such rings refuse blocking ``push`` (it would steal doorbell tokens).

Memory ordering
---------------
Producer: entry header and payload are stored before ``tail`` (program
order); x86-64 TSO keeps stores in order, so a consumer that sees the new
``tail`` sees the payload. The doorbell post (a locked atomic in glibc) then
also acts as a full barrier before the consumer can be woken. Consumer: it
loads ``tail`` before the payload; TSO keeps loads in order. The consumer
copies an entry out before advancing ``head``, so the producer never reuses a
slot that is still being read. ``_fence`` is a lock acquire/release pair
(``lock cmpxchg``/``lock xadd``), a full barrier on x86-64. This module
assumes x86-64 (TSO); weaker architectures would need real acquire/release
atomics.

Throughput: a consumer drains everything available per wake-up and absorbs
the tokens of what it drained, so under load one ``sem_wait`` covers many
entries; glibc's ``sem_post`` only enters the kernel when someone sleeps. A
bounded spin before sleeping was measured and brought no gain, so there is none.

Everything read from shared memory is validated; a malformed header or entry
raises ``RingCorrupt`` (``BadEntry`` when only one entry was lost and the ring
is still usable) instead of being misread.
"""

from __future__ import annotations

import contextlib
import itertools
import mmap
import os
import secrets
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import posix_ipc

from dpumesh import naming

BUFFER = 0x0001  # body is out of line, in a buffer segment (set by the ring)
BOUNCED = 0x0002  # reserved for the dpa daemon: entry could not be delivered
_PAD = 0x0080  # ring-internal: filler up to the end of the ring
_RING_ONLY = BUFFER | _PAD

MAGIC = 0x524D5044  # "DPMR"
VERSION = 2  # 2: space bell names carry a per-ring instance (longer field)
_OPEN = 1
_CLOSED = 2

HEADER_SIZE = 512
ENTRY_HEADER = struct.Struct("<HHIII")  # flags, reserved, route, length, span
_ENTRY_SIZE = ENTRY_HEADER.size
_NAME_FIELD = 64
SPACE_NAME_FIELD = 128  # `<ring>.space.<token>.<seq>`
# magic, version, state, slots, slot_size, max_payload, max_inline, options,
# consumer doorbell name, space bell name
_META = struct.Struct(f"=IHHIIQII{_NAME_FIELD}s{SPACE_NAME_FIELD}s")
_STATE_OFFSET = 6
_OPT_OWN_SPACE = 1
# u64 indexes into the header (each group on its own 64-byte line)
_HEAD, _POPPED = 32, 33  # consumer-owned
_TAIL, _PUSHED = 40, 41  # producer-owned
_NEED, _WAIT_SEQ = 48, 49  # producer-owned
_ACK = 56  # consumer-owned

DEFAULT_SLOTS = 256
DEFAULT_SLOT_SIZE = 8192
MAX_BODY = 8 * 1024 * 1024  # largest HTTP body the mesh carries by default
# A message is a body plus its method, URL and headers: leave room for them.
DEFAULT_MAX_PAYLOAD = MAX_BODY + 64 * 1024
INLINE_CAP = 256 * 1024
_MAX_U32 = 0xFFFFFFFF
_buffer_seq = itertools.count()
_BUFFER_TOKEN = secrets.token_hex(8)  # names this process's buffer segments


class RingError(Exception):
    """Base class of ring errors."""


class RingFull(RingError):
    """No room for the entry (and the timeout, if any, expired)."""


class PayloadTooLarge(RingError):
    """Payload exceeds the ring's configured maximum."""


class RingCorrupt(RingError):
    """Shared memory holds something that is not a valid ring or entry."""


class BadEntry(RingCorrupt):
    """One entry was malformed and has been dropped; the ring is still usable."""


class Doorbell:
    """Counting POSIX semaphore a consumer sleeps on (see module docstring)."""

    __slots__ = ("_sem", "name", "ring")

    def __init__(self, sem: posix_ipc.Semaphore) -> None:
        self._sem = sem
        self.name: str = sem.name
        # Bound method: ring() is on every push, skip one Python call level.
        self.ring = sem.release

    @classmethod
    def create(cls, name: str) -> Doorbell:
        """Create a new doorbell (count 0, mode 0600); fails if it exists."""
        naming.ns_of(name)
        return cls(posix_ipc.Semaphore(name, posix_ipc.O_CREX, mode=0o600, initial_value=0))

    @classmethod
    def open(cls, name: str) -> Doorbell:
        """Open an existing doorbell; posix_ipc.ExistentialError if absent."""
        naming.ns_of(name)
        return cls(posix_ipc.Semaphore(name))

    @classmethod
    def open_or_create(cls, name: str) -> Doorbell:
        """Open `name`, creating it if absent (start order does not matter)."""
        while True:
            try:
                return cls.create(name)
            except posix_ipc.ExistentialError:
                pass
            try:
                return cls.open(name)
            except posix_ipc.ExistentialError:
                continue  # unlinked between our two calls: try again

    def wait(self, timeout: float | None = None) -> bool:
        """Take one token, sleeping up to `timeout` s (None = forever); False if none.

        A signal interrupting the wait also returns False (after its Python
        handler ran), so callers can re-check their stop flag.
        """
        try:
            self._sem.acquire(timeout)
        except (posix_ipc.BusyError, posix_ipc.SignalError):
            return False
        return True

    def absorb(self, n: int) -> int:
        """Take up to `n` already-posted tokens without sleeping; returns how many.

        Call after draining n+1 messages on one wake-up to skip the spurious
        wake-ups their tokens would otherwise cause.
        """
        take = min(n, self._sem.value)
        if take <= 0:
            return 0
        for _ in range(take):
            self._sem.acquire(0)  # cannot fail: only the consumer decrements
        return take

    @property
    def value(self) -> int:
        """Current token count (diagnostics and tests)."""
        return self._sem.value

    def close(self) -> None:
        """Drop this process's handle (the semaphore lives on)."""
        with contextlib.suppress(posix_ipc.ExistentialError):
            self._sem.close()

    def unlink(self) -> None:
        """Remove the name; processes holding it open keep a working handle."""
        _unlink_sem(self.name)


def _unlink_sem(name: str) -> None:
    with contextlib.suppress(posix_ipc.ExistentialError):
        posix_ipc.unlink_semaphore(name)


def _unlink_shm(name: str) -> None:
    with contextlib.suppress(posix_ipc.ExistentialError):
        posix_ipc.unlink_shared_memory(name)


@dataclass(frozen=True, slots=True)
class Entry:
    """An entry taken off a ring for forwarding: inline bytes or a buffer descriptor."""

    route: int
    flags: int  # includes BUFFER when `buffer` is set
    length: int  # payload length in bytes
    payload: bytes  # inline payload, b"" for BUFFER entries
    buffer: str | None = None  # out-of-line segment name

    def discard(self) -> None:
        """Drop an entry that will never be delivered (unlinks its buffer)."""
        if self.buffer is not None:
            _unlink_shm(self.buffer)


_fence_lock = threading.Lock()


def _fence() -> None:
    """Full memory barrier: two locked atomics on x86-64 (see module docstring)."""
    _fence_lock.acquire()
    _fence_lock.release()


def _encode_name(name: str, field: int = _NAME_FIELD) -> bytes:
    raw = name.encode("ascii")
    if len(raw) >= field:
        raise ValueError(f"name {name!r} is too long")
    return raw


def _buffer_field(name: str) -> bytes:
    """A buffer name NUL-padded to its fixed field (the slot may hold older bytes)."""
    return _encode_name(name).ljust(_NAME_FIELD, b"\0")


def _decode_name(raw: bytes) -> str:
    try:
        return raw.rstrip(b"\0").decode("ascii")
    except UnicodeDecodeError:
        raise RingCorrupt("non-ASCII name in ring header") from None


def _inline_bound(slots: int, slot_size: int) -> int:
    return min(INLINE_CAP, (slots // 4) * slot_size - _ENTRY_SIZE)


def _instance() -> str:
    """A name part no other segment or bell of any process has used."""
    return f"{_BUFFER_TOKEN}.{next(_buffer_seq)}"


def _new_buffer_name(ns: str) -> str:
    """A fresh buffer segment name of this process (see `naming.buffer`)."""
    return naming.buffer(ns, _BUFFER_TOKEN, next(_buffer_seq))


def create_initialised(name: str, size: int, init: Callable[[mmap.mmap], None]) -> mmap.mmap:
    """Create segment `name` (mode 0600) already initialised by `init`; return its mapping.

    The segment is built under a private buffer name, then hard-linked to
    `name` in /dev/shm: the link is atomic and fails if `name` exists (raised
    as posix_ipc.ExistentialError, like O_CREX). An opener therefore finds
    either no segment or a complete one and never waits for a creator; a
    creator that dies before the link leaves an old buffer, which stale
    collection removes.
    """
    staging = _new_buffer_name(naming.ns_of(name))
    shm = posix_ipc.SharedMemory(staging, posix_ipc.O_CREX, mode=0o600, size=size)
    try:
        mm = mmap.mmap(shm.fd, size)
        try:
            init(mm)
            os.link(naming.shm_path(staging), naming.shm_path(name))
        except BaseException:
            mm.close()
            raise
    except FileExistsError:
        raise posix_ipc.ExistentialError(f"{name} already exists") from None
    finally:
        shm.close_fd()
        _unlink_shm(staging)
    return mm


def _read_buffer(name: str, length: int) -> bytes:
    """Copy a buffer segment out and unlink it (the consumer owns it now)."""
    try:
        shm = posix_ipc.SharedMemory(name)
    except posix_ipc.ExistentialError:
        raise BadEntry(f"buffer {name} vanished") from None
    try:
        if shm.size < length:
            raise BadEntry(f"buffer {name} holds {shm.size} bytes, entry says {length}")
        parts: list[bytes] = []
        done = 0
        while done < length:
            chunk = os.pread(shm.fd, length - done, done)
            if not chunk:
                raise BadEntry(f"buffer {name} ended early")
            parts.append(chunk)
            done += len(chunk)
        return parts[0] if len(parts) == 1 else b"".join(parts)
    finally:
        shm.close_fd()
        _unlink_shm(name)


class Ring:
    """SPSC ring of fixed-size slots in one shared-memory segment (module docstring)."""

    __slots__ = (
        "_ack",
        "_buf_ns",
        "_doorbell",
        "_entry_pack",
        "_entry_unpack",
        "_fence_acquire",
        "_fence_release",
        "_head",
        "_mm",
        "_owned",
        "_popped",
        "_pushed",
        "_q",
        "_ring_doorbell",
        "_space",
        "_tail",
        "_wait_seq",
        "max_inline",
        "max_payload",
        "name",
        "own_space",
        "slot_size",
        "slots",
    )

    def __init__(
        self,
        name: str,
        mm: mmap.mmap,
        doorbell: Doorbell | None,
        space_bell: Doorbell | None,
    ) -> None:
        """Attach to an initialised mapping; validates the header (use create/open)."""
        self.name = name
        self._buf_ns = naming.ns_of(name)
        self._mm = mm
        self._owned: list[Doorbell] = []
        try:
            self._validate_header(doorbell, space_bell)
        except BaseException:
            self._close_owned()
            mm.close()
            raise
        self._q = memoryview(mm).cast("Q")
        self._ring_doorbell = self._doorbell.ring
        self._fence_acquire = _fence_lock.acquire
        self._fence_release = _fence_lock.release
        self._entry_pack = ENTRY_HEADER.pack_into
        self._entry_unpack = ENTRY_HEADER.unpack_from
        q = self._q
        self._head, self._popped = q[_HEAD], q[_POPPED]
        self._tail, self._pushed = q[_TAIL], q[_PUSHED]
        self._wait_seq, self._ack = q[_WAIT_SEQ], q[_ACK]
        if not 0 <= self._tail - self._head <= self.slots:
            self.close()
            raise RingCorrupt(f"{name}: head {self._head} / tail {self._tail} out of range")

    def _validate_header(self, doorbell: Doorbell | None, space_bell: Doorbell | None) -> None:
        mm = self._mm
        if len(mm) < HEADER_SIZE:
            raise RingCorrupt(f"{self.name}: segment of {len(mm)} bytes is too small")
        (
            magic,
            version,
            state,
            slots,
            slot_size,
            max_payload,
            max_inline,
            options,
            bell_raw,
            space_raw,
        ) = _META.unpack_from(mm, 0)
        if magic != MAGIC:
            raise RingCorrupt(f"{self.name}: bad magic {magic:#x}")
        if version != VERSION:
            raise RingCorrupt(f"{self.name}: unsupported version {version}")
        if state not in (_OPEN, _CLOSED):
            raise RingCorrupt(f"{self.name}: bad state {state}")
        if not 4 <= slots <= 1 << 20 or slot_size % 64 or not 128 <= slot_size <= 1 << 24:
            raise RingCorrupt(f"{self.name}: bad geometry {slots}x{slot_size}")
        if len(mm) != HEADER_SIZE + slots * slot_size:
            raise RingCorrupt(f"{self.name}: segment size {len(mm)} does not match geometry")
        if not 0 < max_payload <= _MAX_U32 or not (
            0 <= max_inline <= min(_inline_bound(slots, slot_size), max_payload)
        ):
            raise RingCorrupt(f"{self.name}: bad limits {max_inline}/{max_payload}")
        self.slots = slots
        self.slot_size = slot_size
        self.max_payload = max_payload
        self.max_inline = max_inline
        self.own_space = bool(options & _OPT_OWN_SPACE)
        prefix = naming.prefix(self._buf_ns)
        bell_name = _decode_name(bell_raw)
        space_name = _decode_name(space_raw)
        for bname in (bell_name, space_name):
            if not bname.startswith(prefix):
                raise RingCorrupt(f"{self.name}: bell {bname!r} outside namespace")
        if self.own_space and not naming.is_ring_space(self.name, space_name):
            raise RingCorrupt(f"{self.name}: own space bell has the wrong name {space_name!r}")
        self._doorbell = self._bell(bell_name, doorbell, "doorbell")
        self._space = self._bell(space_name, space_bell, "space bell")

    def _bell(self, name: str, given: Doorbell | None, what: str) -> Doorbell:
        if given is not None:
            if given.name != name:
                raise RingCorrupt(f"{self.name}: {what} is {name!r}, caller passed {given.name!r}")
            return given
        try:
            bell = Doorbell.open(name)
        except posix_ipc.ExistentialError:
            raise RingCorrupt(f"{self.name}: {what} {name!r} does not exist") from None
        self._owned.append(bell)
        return bell

    # -- construction --------------------------------------------------------

    @classmethod
    def create(
        cls,
        name: str,
        *,
        doorbell: Doorbell,
        space_bell: Doorbell | None = None,
        slots: int = DEFAULT_SLOTS,
        slot_size: int = DEFAULT_SLOT_SIZE,
        max_payload: int = DEFAULT_MAX_PAYLOAD,
        max_inline: int | None = None,
    ) -> Ring:
        """Create a new ring (mode 0600); posix_ipc.ExistentialError if it exists.

        `doorbell` is the consumer's; `space_bell` is the producer's bell for
        "space freed" (default: a dedicated `<name>.space.<instance>` semaphore).
        """
        naming.ns_of(name)
        if not 4 <= slots <= 1 << 20:
            raise ValueError("slots must be in [4, 2**20]")
        if slot_size % 64 or not 128 <= slot_size <= 1 << 24:
            raise ValueError("slot_size must be a multiple of 64 in [128, 2**24]")
        if not 0 < max_payload <= _MAX_U32:
            raise ValueError("max_payload must be in [1, 2**32)")
        bound = min(_inline_bound(slots, slot_size), max_payload)
        if max_inline is None:
            max_inline = bound
        elif not 0 <= max_inline <= bound:
            raise ValueError(f"max_inline must be in [0, {bound}] for this geometry and limit")
        own_space = space_bell is None
        space_name = naming.ring_space(name, _instance()) if own_space else space_bell.name
        meta = _META.pack(
            MAGIC,
            VERSION,
            _OPEN,
            slots,
            slot_size,
            max_payload,
            max_inline,
            _OPT_OWN_SPACE if own_space else 0,
            _encode_name(doorbell.name),
            _encode_name(space_name, SPACE_NAME_FIELD),
        )
        with contextlib.ExitStack() as on_error:
            created_space = None
            if own_space:  # before the ring is visible: openers look it up by name
                created_space = Doorbell.create(space_name)
                on_error.callback(created_space.close)
                on_error.callback(created_space.unlink)

            def init(mm: mmap.mmap) -> None:
                mm[: len(meta)] = meta

            mm = create_initialised(name, HEADER_SIZE + slots * slot_size, init)
            on_error.callback(_unlink_shm, name)
            ring = cls(name, mm, doorbell, created_space or space_bell)
            on_error.pop_all()
        if created_space is not None:
            ring._owned.append(created_space)
        return ring

    @classmethod
    def open(
        cls,
        name: str,
        *,
        doorbell: Doorbell | None = None,
        space_bell: Doorbell | None = None,
    ) -> Ring:
        """Map an existing ring; bells not passed are opened by the names in its header.

        posix_ipc.ExistentialError if the ring does not exist; RingCorrupt if its
        header is bad (rings appear fully initialised: see `create_initialised`).
        """
        naming.ns_of(name)
        shm = posix_ipc.SharedMemory(name)
        try:
            mm = mmap.mmap(shm.fd, shm.size) if shm.size else None
        finally:
            shm.close_fd()
        if mm is None:
            raise RingCorrupt(f"{name}: empty segment")
        return cls(name, mm, doorbell, space_bell)

    @classmethod
    def open_or_create(
        cls,
        name: str,
        *,
        doorbell: Doorbell,
        space_bell: Doorbell | None = None,
        **params: int,
    ) -> Ring:
        """Open `name` or create it with `params` (an existing ring keeps its own)."""
        while True:
            try:
                return cls.create(name, doorbell=doorbell, space_bell=space_bell, **params)
            except posix_ipc.ExistentialError:
                pass
            try:
                return cls.open(name, doorbell=doorbell, space_bell=space_bell)
            except posix_ipc.ExistentialError:
                continue

    # -- producer ------------------------------------------------------------

    def push(
        self,
        payload: bytes | bytearray | memoryview,
        *,
        route: int = 0,
        flags: int = 0,
        timeout: float | None = 0.0,
    ) -> None:
        """Append one entry and ring the consumer's doorbell.

        Raises PayloadTooLarge over `max_payload`, RingFull when no room
        appears within `timeout` (0 = fail at once, None = wait forever).
        """
        if flags & _RING_ONLY:
            raise ValueError("BUFFER and PAD flags are set by the ring itself")
        if type(payload) is memoryview and payload.format != "B":
            payload = payload.cast("B")
        length = len(payload)
        if length > self.max_inline:
            self._push_out_of_line(payload, route, flags, timeout)
            return
        self._publish(route, flags, length, payload, timeout)

    def _push_out_of_line(
        self,
        payload: bytes | bytearray | memoryview,
        route: int,
        flags: int,
        timeout: float | None,
    ) -> None:
        length = len(payload)
        if length > self.max_payload:
            raise PayloadTooLarge(f"{length} bytes > max_payload {self.max_payload}")
        name = self._write_buffer(payload)
        try:
            self._publish(route, flags | BUFFER, length, _buffer_field(name), timeout)
        except BaseException:
            _unlink_shm(name)
            raise

    def push_entry(
        self,
        entry: Entry,
        *,
        route: int | None = None,
        flags: int | None = None,
        timeout: float | None = 0.0,
    ) -> None:
        """Forward an entry from `pop_entry`: a buffer moves as its descriptor, inline
        bytes are copied slot to slot. `route`/`flags` default to the entry's."""
        route = entry.route if route is None else route
        flags = (entry.flags if flags is None else flags) & ~_RING_ONLY
        if entry.buffer is None:
            self.push(entry.payload, route=route, flags=flags, timeout=timeout)
            return
        if not naming.is_buffer(self._buf_ns, entry.buffer):
            raise ValueError(f"buffer {entry.buffer!r} is not in namespace {self._buf_ns}")
        if entry.length > self.max_payload:
            raise PayloadTooLarge(f"{entry.length} bytes > max_payload {self.max_payload}")
        self._publish(route, flags | BUFFER, entry.length, _buffer_field(entry.buffer), timeout)

    def room_for(self, entry: Entry) -> bool:
        """True if `entry` fits now; else arm the space wake-up and return False.

        For a producer that multiplexes many rings: the consumer posts this ring's
        space bell once the entry fits, so the caller can retry then. Room cannot
        shrink before the (single) producer pushes, so a True stays true.
        """
        inline = entry.buffer is None and entry.length <= self.max_inline
        need = self._need(self._span(entry.length if inline else -1))
        if self.slots - (self._tail - self._q[_HEAD]) >= need:
            return True
        return self._arm(need)  # True if space appeared while arming

    def _span(self, length: int) -> int:
        """Slots used by an inline payload of `length` bytes (-1: buffer descriptor)."""
        if length < 0:
            return 1
        return (_ENTRY_SIZE + length + self.slot_size - 1) // self.slot_size

    def _need(self, span: int) -> int:
        """Slots an entry of `span` needs at the current tail, padding included."""
        idx = self._tail % self.slots
        return span + (self.slots - idx if idx + span > self.slots else 0)

    def _arm(self, need: int) -> bool:
        """Ask the consumer to post the space bell once `need` slots are free.

        Returns True if that much space is already free (re-check after the
        fence, which closes the race with a consumer that just freed space).
        """
        q = self._q
        self._wait_seq += 1
        q[_NEED] = need
        q[_WAIT_SEQ] = self._wait_seq
        _fence()
        return self.slots - (self._tail - q[_HEAD]) >= need

    def _publish(
        self,
        route: int,
        flags: int,
        length: int,
        data: bytes | bytearray | memoryview,
        timeout: float | None,
    ) -> None:
        slots = self.slots
        slot_size = self.slot_size
        span = 1 if flags & BUFFER else (_ENTRY_SIZE + length + slot_size - 1) // slot_size
        tail = self._tail
        idx = tail % slots
        pad = slots - idx if idx + span > slots else 0
        need = pad + span
        q = self._q
        if slots - (tail - q[_HEAD]) < need:
            self._wait_space(need, timeout)
        mm = self._mm
        if pad:
            self._entry_pack(mm, HEADER_SIZE + idx * slot_size, _PAD, 0, 0, 0, pad)
            idx = 0
        off = HEADER_SIZE + idx * slot_size
        self._entry_pack(mm, off, flags, 0, route, length, span)
        start = off + _ENTRY_SIZE
        mm[start : start + len(data)] = data
        self._tail = tail = tail + need
        q[_TAIL] = tail
        self._pushed += 1
        q[_PUSHED] = self._pushed
        self._ring_doorbell()

    def _wait_space(self, need: int, timeout: float | None) -> None:
        if timeout is not None and timeout <= 0:
            raise RingFull(f"{self.name}: full ({self.free_slots} of {need} slots free)")
        if not self.own_space:
            raise ValueError(f"{self.name}: shared space bell, use room_for/timeout=0")
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self._arm(need):
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                raise RingFull(f"{self.name}: still full after {timeout} s")
            self._space.wait(remaining)

    def _write_buffer(self, payload: bytes | bytearray | memoryview) -> str:
        name = _new_buffer_name(self._buf_ns)
        length = len(payload)
        shm = posix_ipc.SharedMemory(name, posix_ipc.O_CREX, mode=0o600, size=length)
        try:
            view = memoryview(payload)
            done = 0
            while done < length:
                done += os.pwrite(shm.fd, view[done:], done)
        except BaseException:
            _unlink_shm(name)
            raise
        finally:
            shm.close_fd()
        return name

    # -- consumer ------------------------------------------------------------

    def _take(self) -> tuple[int, int, bytes] | None:
        """Copy the next entry out and free its slots: (route, flags, data).

        For a BUFFER entry `data` is the raw descriptor: entry header + name field.
        """
        q = self._q
        head = self._head
        tail = q[_TAIL]
        if tail == head:
            return None
        slots = self.slots
        slot_size = self.slot_size
        if not 0 < tail - head <= slots:
            raise RingCorrupt(f"{self.name}: head {head} / tail {tail} out of range")
        mm = self._mm
        idx = head % slots
        off = HEADER_SIZE + idx * slot_size
        flags, _, route, length, span = self._entry_unpack(mm, off)
        if flags & _PAD:
            if span != slots - idx or head + span >= tail:
                raise RingCorrupt(f"{self.name}: bad padding entry at slot {idx}")
            head += span
            idx = 0
            off = HEADER_SIZE
            flags, _, route, length, span = self._entry_unpack(mm, off)
        if flags & BUFFER:
            if span != 1 or length > self.max_payload or flags & _PAD:
                raise RingCorrupt(f"{self.name}: bad buffer entry at slot {idx}")
            data = mm[off : off + _ENTRY_SIZE + _NAME_FIELD]
        else:
            if (
                flags & _PAD
                or length > self.max_inline
                or span != (_ENTRY_SIZE + length + slot_size - 1) // slot_size
                or idx + span > slots
            ):
                raise RingCorrupt(f"{self.name}: bad entry at slot {idx} (length {length})")
            off += _ENTRY_SIZE
            data = mm[off : off + length]
        head += span
        if head > tail:
            raise RingCorrupt(f"{self.name}: entry at slot {idx} runs past tail")
        # Data is copied out: hand the slots back to the producer.
        self._head = head
        q[_HEAD] = head
        self._popped = popped = self._popped + 1
        q[_POPPED] = popped
        self._fence_acquire()  # full fence between the head store and the
        self._fence_release()  # wait_seq load (see "Waiting for space")
        seq = q[_WAIT_SEQ]
        if seq != self._ack and slots - (q[_TAIL] - head) >= q[_NEED]:
            self._ack = seq
            q[_ACK] = seq
            self._space.ring()
        return route, flags, data

    def _descriptor(self, raw: bytes) -> tuple[int, str]:
        """(length, buffer name) of a BUFFER entry's raw descriptor."""
        length = ENTRY_HEADER.unpack_from(raw)[3]
        name = raw[_ENTRY_SIZE:].split(b"\0", 1)[0].decode("ascii", "replace")
        if not naming.is_buffer(self._buf_ns, name):
            raise BadEntry(f"{self.name}: buffer name {name!r} outside namespace")
        return length, name

    def pop(self) -> tuple[int, int, bytes] | None:
        """Take the next entry without blocking: (route, flags, payload) or None.

        Out-of-line payloads are read and their buffer unlinked; BUFFER is not
        reported in `flags`. Drain until None before sleeping on the doorbell.
        """
        got = self._take()
        if got is None or not got[1] & BUFFER:
            return got
        route, flags, raw = got
        length, name = self._descriptor(raw)
        return route, flags & ~BUFFER, _read_buffer(name, length)

    def pop_entry(self) -> Entry | None:
        """Take the next entry for forwarding; a buffer is neither read nor unlinked."""
        got = self._take()
        if got is None:
            return None
        route, flags, data = got
        if flags & BUFFER:
            length, name = self._descriptor(data)
            return Entry(route, flags, length, b"", name)
        return Entry(route, flags, len(data), data)

    # -- state ---------------------------------------------------------------

    def __len__(self) -> int:
        """Unread entries."""
        return self._q[_PUSHED] - self._q[_POPPED]

    @property
    def free_slots(self) -> int:
        """Slots the producer could fill right now."""
        return self.slots - (self._q[_TAIL] - self._q[_HEAD])

    @property
    def closed(self) -> bool:
        """True once someone unlinked this ring: peers should re-open it by name."""
        return struct.unpack_from("=H", self._mm, _STATE_OFFSET)[0] == _CLOSED

    def _close_owned(self) -> None:
        for bell in self._owned:
            bell.close()
        self._owned.clear()

    def close(self) -> None:
        """Unmap the ring and close bells it opened itself (idempotent)."""
        if self._mm.closed:
            return
        q = getattr(self, "_q", None)
        if q is not None:
            q.release()
        self._mm.close()
        self._close_owned()

    def unlink(self) -> None:
        """Mark the ring CLOSED and remove its names (ring and own space bell)."""
        if not self._mm.closed:
            struct.pack_into("=H", self._mm, _STATE_OFFSET, _CLOSED)
        _unlink_shm(self.name)
        if self.own_space:
            _unlink_sem(self._space.name)


def unlink_ring(name: str) -> None:
    """Remove a ring and its dedicated space bells by name (stale collection)."""
    _unlink_shm(name)
    for obj in naming.list_objects(naming.ns_of(name)):
        if obj.kind == naming.SEM and naming.is_ring_space(name, obj.name):
            _unlink_sem(obj.name)
