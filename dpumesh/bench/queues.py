"""Micro-benchmark of the shared-memory queues: throughput and round-trip latency.

1. One-way ring throughput between two processes (a producer subprocess and
   this process as consumer) for 1 KiB and 64 KiB payloads: msgs/s and MB/s,
   timed from the first to the last message received.
2. Round trip through a real dpa daemon subprocess:
   worker -> worker_cq -> dpa -> sidecar_sq -> echoing sidecar subprocess ->
   sidecar_cq -> dpa -> worker_sq -> worker; p50/p99 in microseconds.
3. References: a bare POSIX-semaphore ping-pong between two processes, and a
   bare semaphore relay with the round trip's 4 hops over 3 processes (the
   wake-up floor of 2., with no ring work).

    python -m dpumesh.bench.queues [--count N] [--round-trips N]

Objects live in a private namespace `qb<pid>` that is removed afterwards.
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import subprocess
import sys
import time

import posix_ipc

from dpumesh import naming, ring
from dpumesh.registry import WorkerEndpoint

_PRODUCER = """
import sys
from dpumesh import ring
r = ring.Ring.open(sys.argv[1])
data = bytes(int(sys.argv[2]))
push = r.push
for _ in range(int(sys.argv[3])):
    push(data, timeout=None)
r.close()
"""

_ECHO_SIDECAR = """
import sys
from dpumesh.registry import SidecarRings
sc = SidecarRings(sys.argv[1])
send, sq, bell = sc.send, sc.sq, sc.bell
print("ready", flush=True)
for _ in range(int(sys.argv[2])):
    while (got := sq.pop()) is None:
        bell.wait(None)
    route, _flags, payload = got
    send(payload, route=route)
sc.close()
"""

_RELAY = """
import sys, posix_ipc
count, names = int(sys.argv[1]), sys.argv[2:]
pairs = [(posix_ipc.Semaphore(a), posix_ipc.Semaphore(b)) for a, b in zip(names[::2], names[1::2])]
for _ in range(count):
    for wait_on, pass_to in pairs:
        wait_on.acquire()
        pass_to.release()
"""


def one_way(ns: str, size: int, count: int) -> tuple[float, float]:
    """(msgs/s, MB/s) for `count` payloads of `size` bytes, producer -> consumer process."""
    bell = ring.Doorbell.create(naming.sidecar_bell(ns))
    r = ring.Ring.create(naming.sidecar_sq(ns), doorbell=bell)
    proc = subprocess.Popen([sys.executable, "-c", _PRODUCER, r.name, str(size), str(count)])
    try:
        received = 0
        pop, wait, absorb = r.pop, bell.wait, bell.absorb
        start = 0.0
        while received < count:
            wait(None)
            n = 0
            while pop() is not None:
                n += 1
            if n and not received:
                start = time.perf_counter()
                n -= 1  # time from the first message on
                received = 1
            received += n
            if n > 1:
                absorb(n - 1)
        elapsed = time.perf_counter() - start
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
        r.unlink()
        r.close()
        bell.unlink()
        bell.close()
    rate = (count - 1) / elapsed
    return rate, rate * size / 1e6


def round_trip(ns: str, count: int, size: int = 256, warmup: int = 200) -> list[float]:
    """Round-trip times (us) worker -> dpa -> sidecar -> dpa -> worker."""
    total = count + warmup
    daemon = subprocess.Popen(
        [sys.executable, "-m", "dpumesh.dpa_daemon", "--ns", ns, "--log-level", "WARNING"]
    )
    sidecar = subprocess.Popen(
        [sys.executable, "-c", _ECHO_SIDECAR, ns, str(total)], stdout=subprocess.PIPE, text=True
    )
    worker = None
    try:
        assert sidecar.stdout is not None and sidecar.stdout.readline().strip() == "ready"
        worker = WorkerEndpoint(ns, "bench")
        payload = bytes(size)
        times: list[float] = []
        for i in range(total):
            t0 = time.perf_counter()
            worker.send(payload)
            worker.recv(None)
            if i >= warmup:
                times.append((time.perf_counter() - t0) * 1e6)
        sidecar.wait(timeout=30)
        return times
    finally:
        if worker is not None:
            worker.close()
        for proc in (sidecar, daemon):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                proc.wait(timeout=10)


def semaphore_relay(ns: str, count: int, receivers: list[int]) -> list[float]:
    """Reference round trip: a token handed over semaphores along `receivers`.

    Hop i wakes process `receivers[i]` (0 = this process, the last hop's
    receiver); each helper process passes the token on to the next hop.
    [1, 0] is a two-process ping-pong; [1, 2, 1, 0] has the shape of the mesh
    round trip (worker -> dpa -> sidecar -> dpa -> worker): its wake-up floor.
    """
    names = [f"{naming.prefix(ns)}relay{i}" for i in range(len(receivers))]
    sems = [posix_ipc.Semaphore(n, posix_ipc.O_CREX, mode=0o600) for n in names]
    procs = []
    times: list[float] = []
    try:
        for helper in sorted(set(receivers) - {0}):
            argv = [str(count)]
            for hop, receiver in enumerate(receivers):
                if receiver == helper:
                    argv += [names[hop], names[hop + 1]]
            procs.append(subprocess.Popen([sys.executable, "-c", _RELAY, *argv]))
        first, last = sems[0], sems[-1]
        for _ in range(count):
            t0 = time.perf_counter()
            first.release()
            last.acquire()
            times.append((time.perf_counter() - t0) * 1e6)
        for proc in procs:
            proc.wait(timeout=30)
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        for sem in sems:
            sem.unlink()
            sem.close()
    return times[100:]


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def main(argv: list[str] | None = None) -> int:
    """Run all queue benchmarks and print their numbers."""
    p = argparse.ArgumentParser(prog="python -m dpumesh.bench.queues", description=__doc__)
    p.add_argument("--count", type=int, default=200_000, help="messages per one-way run")
    p.add_argument("--round-trips", type=int, default=5000, help="timed round trips")
    args = p.parse_args(argv)
    ns = f"qb{os.getpid()}"
    try:
        print("one-way ring throughput (producer process -> consumer process)")
        for size, count in ((1024, args.count), (64 * 1024, max(2, args.count // 10))):
            rate, mbps = one_way(ns, size, count)
            print(f"  {size // 1024:>3} KiB: {rate:>10,.0f} msg/s {mbps:>9,.1f} MB/s  (n={count})")
        rtt = round_trip(ns, args.round_trips)
        print(f"round trip worker->dpa->sidecar->dpa->worker, 256 B (n={len(rtt)})")
        print(
            f"  p50 {_pct(rtt, 0.5):.1f} us  p99 {_pct(rtt, 0.99):.1f} us  "
            f"mean {statistics.fmean(rtt):.1f} us"
        )
        for what, receivers in (
            ("bare semaphore ping-pong between two processes", [1, 0]),
            ("bare semaphore relay, same 4 hops over 3 processes", [1, 2, 1, 0]),
        ):
            ref = semaphore_relay(ns, args.round_trips, receivers)
            print(f"reference: {what}")
            print(f"  p50 {_pct(ref, 0.5):.1f} us  p99 {_pct(ref, 0.99):.1f} us")
    finally:
        naming.remove_all(ns)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
