"""Rings and doorbells over real POSIX shared memory and real processes."""

from __future__ import annotations

import json
import os
import random
import stat
import subprocess
import sys
import time
from collections.abc import Iterator

import posix_ipc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dpumesh import naming, ring
from tests.mesh import corrupt

# Child producer: opens the ring by name, pushes payload(i, size) for every size.
PRODUCER = """
import json, sys, time
from dpumesh import ring
name, sizes = sys.argv[1], json.loads(sys.argv[2])
r = ring.Ring.open(name)
print("ready", flush=True)
t0 = time.monotonic()
for i, size in enumerate(sizes):
    r.push((i.to_bytes(4, "little") * (size // 4 + 1))[:size], route=i, timeout=20)
print(time.monotonic() - t0, flush=True)
r.close()
"""


def payload(i: int, size: int) -> bytes:
    """Content that differs per message, so reordering or mixing is visible."""
    return (i.to_bytes(4, "little") * (size // 4 + 1))[:size]


@pytest.fixture
def bell(ns: str) -> Iterator[ring.Doorbell]:
    b = ring.Doorbell.create(naming.sidecar_bell(ns))
    yield b
    b.close()


def make_ring(ns: str, bell: ring.Doorbell, **params: int) -> ring.Ring:
    return ring.Ring.create(naming.sidecar_sq(ns), doorbell=bell, **params)


def start_producer(name: str, sizes: list[int]) -> subprocess.Popen[str]:
    proc = subprocess.Popen(
        [sys.executable, "-c", PRODUCER, name, json.dumps(sizes)],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "ready"
    return proc


def consume(r: ring.Ring, bell: ring.Doorbell, count: int, timeout: float = 30.0) -> list:
    """Pop `count` entries, sleeping on the doorbell, batching like a real consumer."""
    got: list = []
    deadline = time.monotonic() + timeout
    while len(got) < count:
        assert time.monotonic() < deadline, f"only {len(got)} of {count} arrived"
        if not bell.wait(1.0):
            continue
        n = 0
        while (item := r.pop()) is not None:
            got.append(item)
            n += 1
        if n > 1:
            bell.absorb(n - 1)
    return got


def test_thousands_of_wraparounds_keep_order_and_content(ns: str, bell: ring.Doorbell) -> None:
    r = make_ring(ns, bell, slots=16, slot_size=128)
    assert r.max_inline == 4 * 128 - ring.ENTRY_HEADER.size
    # 0, one exact slot, just over, multi-slot, the inline limit, out of line
    sizes = [0, 1, 112, 113, 300, r.max_inline, r.max_inline + 1, 2000]
    rnd = random.Random(1)
    sent = received = 0
    expected: list[tuple[int, bytes]] = []
    while sent < 12_000:
        for _ in range(rnd.randint(1, 6)):
            size = rnd.choice(sizes) if rnd.random() < 0.95 else rnd.randint(0, 600)
            try:
                r.push(payload(sent, size), route=sent)
            except ring.RingFull:
                break
            expected.append((sent, payload(sent, size)))
            sent += 1
        for _ in range(rnd.randint(0, 6)):
            item = r.pop()
            if item is None:
                break
            route, flags, data = item
            assert (route, data) == expected[received] and flags == 0
            received += 1
    while (item := r.pop()) is not None:
        assert (item[0], item[2]) == expected[received]
        received += 1
    assert received == sent
    assert r.pop() is None and len(r) == 0 and r.free_slots == 16
    wraps = r._q[40] // 16  # tail counter / slots
    assert wraps > 1000
    assert not [o for o in naming.list_objects(ns) if naming.is_buffer(ns, o.name)]
    r.unlink()
    r.close()


def test_full_ring_never_overwrites(ns: str, bell: ring.Doorbell) -> None:
    r = make_ring(ns, bell, slots=8, slot_size=128)
    n = 0
    with pytest.raises(ring.RingFull):
        while True:
            r.push(payload(n, 100), route=n)
            n += 1
    assert n == 8 and len(r) == 8 and r.free_slots == 0
    t0 = time.monotonic()
    with pytest.raises(ring.RingFull):
        r.push(b"late", timeout=0.2)
    assert time.monotonic() - t0 >= 0.19
    got = [r.pop() for _ in range(n)]
    assert got == [(i, 0, payload(i, 100)) for i in range(n)]
    assert r.pop() is None
    r.unlink()
    r.close()


def test_five_mib_payload_out_of_line_and_buffer_removed(ns: str, bell: ring.Doorbell) -> None:
    r = make_ring(ns, bell)
    big = os.urandom(5 * 1024 * 1024)
    r.push(big, route=9)
    buffers = [o for o in naming.list_objects(ns) if naming.is_buffer(ns, o.name)]
    assert len(buffers) == 1
    assert stat.S_IMODE(buffers[0].path.stat().st_mode) == 0o600
    assert r.free_slots == r.slots - 1  # only the descriptor is in the ring
    route, flags, data = r.pop()
    assert (route, flags) == (9, 0) and data == big
    assert not [o for o in naming.list_objects(ns) if naming.is_buffer(ns, o.name)]
    r.unlink()
    r.close()


def test_over_max_payload_raises_and_leaves_nothing(ns: str, bell: ring.Doorbell) -> None:
    r = make_ring(ns, bell)
    assert r.max_payload == ring.DEFAULT_MAX_PAYLOAD
    with pytest.raises(ring.PayloadTooLarge):
        r.push(bytes(ring.DEFAULT_MAX_PAYLOAD + 1))
    r.push(bytes(ring.DEFAULT_MAX_PAYLOAD))  # the maximum itself is fine
    assert len(r.pop()[2]) == ring.DEFAULT_MAX_PAYLOAD
    r.unlink()
    r.close()
    small = ring.Ring.create(naming.sidecar_cq(ns), doorbell=bell, max_payload=1000)
    with pytest.raises(ring.PayloadTooLarge):
        small.push(bytes(1001))
    assert len(small) == 0
    small.unlink()
    small.close()
    assert not [o for o in naming.list_objects(ns) if naming.is_buffer(ns, o.name)]


def test_segments_are_private_and_unlinked(ns: str, bell: ring.Doorbell) -> None:
    r = make_ring(ns, bell)
    names = {o.name: o for o in naming.list_objects(ns)}
    seg = names[naming.sidecar_sq(ns)]
    assert stat.S_IMODE(seg.path.stat().st_mode) == 0o600
    (space,) = [o for o in names.values() if naming.is_ring_space(naming.sidecar_sq(ns), o.name)]
    assert stat.S_IMODE(space.path.stat().st_mode) == 0o600
    r.unlink()
    assert r.closed
    r.close()
    bell.unlink()
    assert naming.list_objects(ns) == []


def test_flags_route_and_reserved_flags(ns: str, bell: ring.Doorbell) -> None:
    r = make_ring(ns, bell)
    r.push(b"x", route=0xFFFFFFFF, flags=ring.BOUNCED | 0x0100)
    assert r.pop() == (0xFFFFFFFF, ring.BOUNCED | 0x0100, b"x")
    with pytest.raises(ValueError):
        r.push(b"x", flags=ring.BUFFER)
    r.push(memoryview(b"abcd").cast("B"))
    assert r.pop()[2] == b"abcd"
    r.unlink()
    r.close()


def test_doorbell_wait_and_absorb(ns: str, bell: ring.Doorbell) -> None:
    t0 = time.monotonic()
    assert bell.wait(0.1) is False
    assert time.monotonic() - t0 >= 0.09
    r = make_ring(ns, bell)
    for i in range(5):
        r.push(bytes([i]))
    assert bell.value == 5
    assert bell.wait(0) is True
    drained = 0
    while r.pop() is not None:
        drained += 1
    assert bell.absorb(drained - 1) == 4
    assert bell.value == 0
    r.unlink()
    r.close()


def test_forwarding_moves_buffer_descriptors_and_copies_inline(
    ns: str, bell: ring.Doorbell
) -> None:
    src = make_ring(ns, bell)
    dst = ring.Ring.create(naming.sidecar_cq(ns), doorbell=bell)
    big = os.urandom(1 << 20)
    src.push(big, route=5)
    src.push(b"small", route=6, flags=ring.BOUNCED)
    first = src.pop_entry()
    assert first.buffer is not None and first.flags & ring.BUFFER and first.length == len(big)
    inline = src.pop_entry()
    assert inline.buffer is None and inline.payload == b"small"
    dst.push_entry(first, route=50)
    dst.push_entry(inline)
    buffers = [o.name for o in naming.list_objects(ns) if naming.is_buffer(ns, o.name)]
    assert buffers == [first.buffer]  # forwarded, neither copied nor unlinked
    assert dst.pop() == (50, 0, big)
    assert dst.pop() == (6, ring.BOUNCED, b"small")
    for r in (src, dst):
        r.unlink()
        r.close()


def test_room_for_arms_space_wakeup(ns: str, bell: ring.Doorbell) -> None:
    producer_bell = ring.Doorbell.create(naming.dpa_bell(ns))
    r = ring.Ring.create(
        naming.sidecar_sq(ns), doorbell=bell, space_bell=producer_bell, slots=4, slot_size=128
    )
    entry = ring.Entry(route=1, flags=0, length=50, payload=bytes(50))
    for _ in range(4):
        assert r.room_for(entry)
        r.push_entry(entry)
    assert not r.room_for(entry)
    with pytest.raises(ValueError):  # shared space bell: blocking push would steal its tokens
        r.push(b"x", timeout=1.0)
    assert producer_bell.value == 0
    r.pop()
    assert producer_bell.value == 1  # consumer posted "space freed" exactly once
    r.pop()
    assert producer_bell.value == 1
    assert r.room_for(entry)
    r.unlink()
    r.close()
    producer_bell.unlink()
    producer_bell.close()


def test_blocked_producer_is_woken_when_space_frees(ns: str, bell: ring.Doorbell) -> None:
    r = make_ring(ns, bell, slots=4, slot_size=128)
    for i in range(4):
        r.push(payload(i, 10), route=i)
    proc = start_producer(r.name, [10])  # will block: ring is full
    try:
        time.sleep(0.4)
        assert proc.poll() is None, "producer did not block on the full ring"
        t_free = time.monotonic()
        assert r.pop() == (0, 0, payload(0, 10))
        out, _ = proc.communicate(timeout=10)
        woke_after = time.monotonic() - t_free
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == 0
    assert float(out.strip()) >= 0.35  # it really waited ...
    assert woke_after < 2.0  # ... and was woken promptly, not by its 20 s timeout
    got = [r.pop() for _ in range(4)]
    assert [g[0] for g in got] == [1, 2, 3, 0]
    assert got[3][2] == payload(0, 10)
    r.unlink()
    r.close()


@settings(
    max_examples=6,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(
    sizes=st.lists(
        st.one_of(st.integers(0, 300), st.integers(300, 1500), st.integers(1500, 5000)),
        min_size=1,
        max_size=400,
    )
)
def test_property_concurrent_producer_process(
    ns: str, bell: ring.Doorbell, sizes: list[int]
) -> None:
    r = make_ring(ns, bell, slots=16, slot_size=256)
    proc = start_producer(r.name, sizes)
    try:
        got = consume(r, bell, len(sizes))
        proc.communicate(timeout=20)
        assert proc.returncode == 0
        assert [g[0] for g in got] == list(range(len(sizes)))
        for i, (_route, flags, data) in enumerate(got):
            assert flags == 0 and data == payload(i, sizes[i]), f"entry {i} differs"
        assert r.pop() is None
    finally:
        proc.kill()
        proc.wait()
        r.unlink()
        r.close()


@settings(
    max_examples=400,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(
    ops=st.lists(
        st.one_of(
            st.just(-1),  # pop
            st.integers(0, 450),  # push a message of this many bytes (one or several slots)
            st.integers(600, 900),  # over max_inline: a buffer segment
        ),
        max_size=120,
    )
)
def test_property_ring_behaves_like_a_bounded_queue(
    ns: str, bell: ring.Doorbell, ops: list[int]
) -> None:
    """Any interleaving of pushes and pops: FIFO, nothing lost or overwritten, full refuses."""
    r = make_ring(ns, bell, slots=16, slot_size=128, max_payload=4096)
    assert r.max_inline < 600
    model: list[tuple[int, int, bytes]] = []
    try:
        for i, op in enumerate(ops):
            if op < 0:
                got = r.pop()
                if model:
                    assert got == model.pop(0)
                else:
                    assert got is None
                continue
            data = payload(i, op)
            free = r.free_slots
            try:
                r.push(data, route=i % 7, timeout=0)
            except ring.RingFull:
                assert r.free_slots == free  # a refused push changes nothing
                continue
            model.append((i % 7, 0, data))
            assert len(r) == len(model)
        while model:
            assert r.pop() == model.pop(0)
        assert r.pop() is None
    finally:
        while True:  # drain (unlinks buffers) whatever the assertion left behind
            try:
                if r.pop() is None:
                    break
            except ring.RingCorrupt:
                break
        r.unlink()
        r.close()
    assert not [o for o in naming.list_objects(ns) if naming.is_buffer(ns, o.name)]


def test_corrupt_header_raises_ring_corrupt(ns: str, bell: ring.Doorbell) -> None:
    r = make_ring(ns, bell)
    corrupt(r.name, 0, "=I", 0xDEADBEEF)
    with pytest.raises(ring.RingCorrupt, match="magic"):
        ring.Ring.open(r.name)
    corrupt(r.name, 0, "=I", ring.MAGIC)
    corrupt(r.name, 8, "=I", 7)  # slots no longer match the segment size
    with pytest.raises(ring.RingCorrupt):
        ring.Ring.open(r.name)
    corrupt(r.name, 8, "=I", r.slots)
    corrupt(r.name, 320, "=Q", 10_000)  # tail far beyond head + slots
    with pytest.raises(ring.RingCorrupt, match="out of range"):
        r.pop()
    r.unlink()
    r.close()


def test_corrupt_entries_raise(ns: str, bell: ring.Doorbell) -> None:
    r = make_ring(ns, bell)
    r.push(b"hello")
    # entry length field (offset 8 in the entry header) claims more than fits
    corrupt(r.name, ring.HEADER_SIZE + 8, "<I", 1 << 30)
    with pytest.raises(ring.RingCorrupt):
        r.pop()
    r.unlink()
    r.close()
    r = make_ring(ns, bell)
    r.push(bytes(r.max_inline + 1))
    real = [o.name for o in naming.list_objects(ns) if naming.is_buffer(ns, o.name)]
    # point the descriptor at another namespace's buffer
    corrupt(r.name, ring.HEADER_SIZE + ring.ENTRY_HEADER.size, "=24s", b"/dpumesh.other.buf.1.1\0")
    with pytest.raises(ring.BadEntry, match="outside namespace"):
        r.pop()
    assert r.pop() is None  # the bad entry was dropped, the ring still works
    posix_ipc.unlink_shared_memory(real[0])
    r.push(b"ok")
    assert r.pop()[2] == b"ok"
    r.unlink()
    r.close()


def test_open_validates_doorbell_and_namespace(ns: str, bell: ring.Doorbell) -> None:
    r = make_ring(ns, bell)
    other = ring.Doorbell.create(naming.dpa_bell(ns))
    with pytest.raises(ring.RingCorrupt, match="doorbell"):
        ring.Ring.open(r.name, doorbell=other)
    with pytest.raises(ValueError):
        ring.Ring.create("/not-dpumesh", doorbell=bell)
    reopened = ring.Ring.open(r.name)
    reopened.push(b"via second mapping")
    assert r.pop()[2] == b"via second mapping"
    reopened.close()
    other.unlink()
    other.close()
    r.unlink()
    r.close()


def test_a_ring_appears_fully_made_and_a_second_creator_leaves_nothing(
    ns: str, bell: ring.Doorbell
) -> None:
    r = make_ring(ns, bell)
    before = naming.list_objects(ns)
    with pytest.raises(posix_ipc.ExistentialError):
        make_ring(ns, bell)  # same name: refused without touching the live ring's objects
    assert naming.list_objects(ns) == before  # no second space bell, no staging buffer
    opened = ring.Ring.open(r.name, doorbell=bell)
    r.push(b"x")
    assert opened.pop() == (0, 0, b"x")  # the live ring still works
    opened.close()
    r.unlink()
    r.close()
    ring.unlink_ring(r.name)  # idempotent by name
    assert [o.name for o in naming.list_objects(ns)] == [bell.name]
