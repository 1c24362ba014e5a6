"""Worker registry, liveness, stale collection and naming, across real processes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator

import posix_ipc
import pytest

from dpumesh import naming, registry, ring
from dpumesh.registry import Registry, WorkerEndpoint, WorkerKey

# Child: joins as a worker, reports its key, then waits to be killed.
WORKER = """
import json, sys, time
from dpumesh.registry import WorkerEndpoint
ep = WorkerEndpoint(sys.argv[1], sys.argv[2])
print(json.dumps(list(ep.key)), flush=True)
time.sleep(60)
"""

# Child: claims N slots (racing its siblings, maybe creating the registry).
CLAIMER = """
import json, os, sys
from dpumesh.registry import Registry
reg = Registry.open_or_create(sys.argv[1])
keys = [list(reg.claim("svc", os.getpid())) for _ in range(int(sys.argv[2]))]
print(json.dumps(keys), flush=True)
reg.close()
"""


@pytest.fixture
def reg(ns: str) -> Iterator[Registry]:
    r = Registry.open_or_create(ns)
    yield r
    r.close()


def test_naming() -> None:
    assert naming.validate_namespace("a_B9") == "a_B9"
    for bad in ("", "a-b", "x" * 25, "a.b", "a/b"):
        with pytest.raises(ValueError):
            naming.validate_namespace(bad)
    assert naming.registry("n1") == "/dpumesh.n1.registry"
    assert naming.sidecar_sq("n1") == "/dpumesh.n1.sidecar_sq"
    assert naming.worker_cq("n1", 3, 7) == "/dpumesh.n1.w3g7.worker_cq"
    assert naming.worker_bell("n1", 3, 7) == "/dpumesh.n1.w3g7.bell"
    assert naming.dpa_bell("n1") == "/dpumesh.n1.dpa.bell"
    assert naming.buffer("n1", "a1b2", 5) == "/dpumesh.n1.buf.a1b2.5"
    assert naming.is_buffer("n1", "/dpumesh.n1.buf.42.5")
    assert not naming.is_buffer("n1", "/dpumesh.n12.buf.42.5")
    assert not naming.is_buffer("n1", "/dpumesh.n1.buf.42.5/../x")
    assert naming.worker_of("/dpumesh.n1.w3g7.worker_cq.space") == (3, 7)
    assert naming.ns_of("/dpumesh.n1.sidecar_sq") == "n1"
    longest = naming.ring_space(naming.worker_cq("x" * 24, 65535, 65535), "f" * 16 + ".9" * 10)
    assert len(longest) < ring.SPACE_NAME_FIELD  # fits the ring header's name field
    assert naming.is_ring_space(naming.sidecar_cq("n1"), "/dpumesh.n1.sidecar_cq.space.ab.1")
    assert not naming.is_ring_space(naming.sidecar_cq("n1"), "/dpumesh.n1.sidecar_cq")


def test_namespace_from_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DPUMESH_NS", raising=False)
    assert naming.namespace_from_env() == "default"
    monkeypatch.setenv("DPUMESH_NS", "bench_1")
    assert naming.namespace_from_env() == "bench_1"
    monkeypatch.setenv("DPUMESH_NS", "bad-ns")
    with pytest.raises(ValueError):
        naming.namespace_from_env()


def test_worker_key_route_round_trip() -> None:
    key = WorkerKey(slot=255, gen=65535)
    assert key.route == 0xFFFF00FF
    assert WorkerKey.from_route(key.route) == key


def test_claim_release_version_and_generation(reg: Registry) -> None:
    v0 = reg.version
    key = reg.claim("ms-001.api", 1234)
    assert key == WorkerKey(0, 1)
    v1 = reg.version
    assert v1 != v0 and v1 % 2 == 0
    [info] = reg.snapshot()
    assert (info.slot, info.gen, info.pid, info.service) == (0, 1, 1234, "ms-001.api")
    assert info.alive and info.heartbeat_age_s < 0.5 and info.key == key
    assert reg.heartbeat(key)
    assert reg.release(key)
    assert reg.version != v1
    assert reg.snapshot() == []
    assert not reg.release(key) and not reg.heartbeat(key)
    again = reg.claim("ms-001.api", 1234)
    assert again == WorkerKey(0, 2)  # same slot, new generation
    second = reg.claim("é" * 31, 1)  # 62 UTF-8 bytes
    assert second.slot == 1
    assert {i.service for i in reg.snapshot()} == {"ms-001.api", "é" * 31}
    for bad in ("", "x" * 64, "a\0b"):
        with pytest.raises(ValueError):
            reg.claim(bad, 1)


def test_registry_full_reaps_dead_slots_first(ns: str, monkeypatch: pytest.MonkeyPatch) -> None:
    small = Registry.open_or_create(ns, slots=2)
    small.claim("a", 1)
    b = small.claim("b", 2)
    with pytest.raises(registry.RegistryFull):
        small.claim("c", 3)
    monkeypatch.setattr(registry, "DEAD_AFTER", 0.05)
    time.sleep(0.1)
    small.heartbeat(b)  # only "a" stopped heartbeating
    assert small.claim("c", 3) == WorkerKey(0, 2)
    assert sorted(i.service for i in small.snapshot()) == ["b", "c"]
    small.close()


def test_a_dead_daemons_slot_is_reaped_so_the_last_one_out_cleans_up(
    ns: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    table = Registry.open_or_create(ns)
    table.claim(registry.DAEMON_PREFIX + "dpa-daemon", 1)  # killed: never heartbeats again
    live = table.claim("s0", 2)
    monkeypatch.setattr(registry, "DEAD_AFTER", 0.05)
    time.sleep(0.1)
    table.heartbeat(live)
    assert [k.slot for k in table.reap_dead()] == [0]
    assert table.release(live)
    assert table.unlink_if_idle()  # nothing ACTIVE is left: the namespace is removed
    table.close()


def test_concurrent_claims_from_processes_get_distinct_slots(ns: str) -> None:
    procs = [
        subprocess.Popen([sys.executable, "-c", CLAIMER, ns, "8"], stdout=subprocess.PIPE)
        for _ in range(5)
    ]
    keys = []
    for proc in procs:
        out, _ = proc.communicate(timeout=30)
        assert proc.returncode == 0
        keys += [tuple(k) for k in json.loads(out)]
    assert len(keys) == 40
    assert len({slot for slot, _gen in keys}) == 40
    reg = Registry.open(ns)
    assert len(reg.snapshot()) == 40
    reg.close()


def test_killed_worker_reported_dead_and_collected(ns: str) -> None:
    proc = subprocess.Popen([sys.executable, "-c", WORKER, ns, "ms-002"], stdout=subprocess.PIPE)
    try:
        key = WorkerKey(*json.loads(proc.stdout.readline()))
        reg = Registry.open(ns)
        base = naming.worker_base(ns, *key)
        names = {o.name for o in naming.list_objects(ns)}
        assert {base + ".bell", base + ".worker_sq", base + ".worker_cq"} <= names
        time.sleep(0.5)
        assert [i.alive for i in reg.snapshot()] == [True]  # heartbeats keep it alive
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        t_kill = time.monotonic()
        while reg.snapshot()[0].alive:
            assert time.monotonic() - t_kill < 3.0
            time.sleep(0.02)
        assert time.monotonic() - t_kill <= 1.2 + 0.3  # ~1 s, with slack for a loaded box
        removed = registry.collect_stale(ns)
        assert {base + ".bell", base + ".worker_sq", base + ".worker_cq"} <= set(removed)
        assert not [o for o in naming.list_objects(ns) if naming.worker_of(o.name)]
        assert reg.snapshot() == []
        reg.close()
    finally:
        proc.kill()
        proc.wait()


def test_collect_stale_keeps_live_objects_and_fresh_buffers(ns: str) -> None:
    with WorkerEndpoint(ns, "live") as ep:
        # an orphan of a generation that never held (or no longer holds) a slot
        orphan = ring.Doorbell.create(naming.worker_bell(ns, 7, 3))
        orphan.close()
        old = posix_ipc.SharedMemory(naming.buffer(ns, "ab", 1), posix_ipc.O_CREX, size=10)
        fresh = posix_ipc.SharedMemory(naming.buffer(ns, "ab", 2), posix_ipc.O_CREX, size=10)
        for shm in (old, fresh):
            shm.close_fd()
        stamp = time.time() - registry.BUFFER_MAX_AGE - 5
        os.utime(f"/dev/shm/{old.name[1:]}", (stamp, stamp))
        removed = registry.collect_stale(ns)
        assert sorted(removed) == sorted([old.name, naming.worker_bell(ns, 7, 3)])
        names = {o.name for o in naming.list_objects(ns)}
        assert fresh.name in names
        assert naming.worker_sq(ns, *ep.key) in names
        fresh.unlink()
    assert not [o for o in naming.list_objects(ns) if naming.worker_of(o.name)]


def test_worker_endpoint_close_releases_and_unlinks(ns: str) -> None:
    ep = WorkerEndpoint(ns, "svc")
    reg = Registry.open(ns)
    assert [i.key for i in reg.snapshot()] == [ep.key]
    assert ep.dpa_bell.value == 1  # announced itself to the dpa daemon
    ep.close()
    assert reg.snapshot() == []
    reg.close()
    # It was the namespace's only member, so it removed the shared objects too.
    assert naming.list_objects(ns) == []


def test_unlink_if_idle_and_reopen(ns: str, reg: Registry) -> None:
    key = reg.claim("svc", 1)
    assert not reg.unlink_if_idle()
    reg.release(key)
    other = Registry.open(ns)
    assert reg.unlink_if_idle()
    assert naming.list_objects(ns) == []
    assert other.snapshot() == []  # reader keeps the closed table, creates nothing
    assert naming.list_objects(ns) == []
    key2 = other.claim("svc", 2)  # a claimant re-creates the table
    assert Registry.open(ns).snapshot()[0].key == key2
    other.close()


def test_lock_held_by_dead_process_is_taken_over(
    ns: str, reg: Registry, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(registry, "LOCK_TIMEOUT", 0.2)
    lock = posix_ipc.Semaphore(naming.registry_lock(ns))
    lock.acquire()  # a "holder" that will never release
    t0 = time.monotonic()
    key = reg.claim("svc", 1)
    assert 0.15 < time.monotonic() - t0 < 2.0
    assert lock.value == 1  # ownership passed to us and given back: a working mutex again
    assert reg.release(key)
    lock.close()


def test_uninitialised_registry_from_dead_creator_is_replaced(ns: str) -> None:
    posix_ipc.SharedMemory(naming.registry(ns), posix_ipc.O_CREX, size=4096).close_fd()
    with pytest.raises(registry.RegistryError):
        Registry.open(ns)
    reg = Registry.open_or_create(ns)
    assert reg.claim("svc", 1) == WorkerKey(0, 1)
    reg.close()
