"""DMA manager ("DPA daemon"): moves entries between the sidecar and the workers.

    sidecar_cq --(route = worker key)--> worker_sq[key]
    worker_cq[*] --(route := that worker's key)--> sidecar_sq

Why a separate process: it stands in for the DPU's DMA engine, so the sidecar
and the workers never touch each other's rings.

Event-driven: the daemon sleeps on its doorbell `/dpumesh.<ns>.dpa.bell`,
which producers of sidecar_cq and every worker_cq ring, and which consumers of
sidecar_sq and every worker_sq post when they free space the daemon asked
for (those rings use the dpa doorbell as their space bell). A wake-up drains
every source; a timer tick every TICK_S (a timeout on the same wait, not
data-path polling) handles liveness: dead workers are reaped, registry changes
re-scanned.

Never overwrite, never lose: every destination has a bounded backlog. An
entry whose destination ring is full waits in the backlog and the ring's
space wake-up is armed. An entry for an unknown key (stale generation, dead
or departed worker) or whose worker backlog is full goes back to the sidecar
in sidecar_sq with flag BOUNCED, so the sidecar can answer 503 at once. When
the sidecar backlog is full the daemon stops draining sources, so producers
see back-pressure (full rings) instead of loss. When a worker departs, its
backlog and the entries it never read are bounced and the replies it already
wrote are delivered.

DMA cost model (off by default): every move between host memory and DPU
memory is one transfer, in both directions: sidecar_cq -> worker_sq (DPU to
host) and worker_cq -> sidecar_sq (host to DPU), delivered at once or later
from a backlog. A bounce (an entry handed back to the sidecar because no
worker takes it) is not charged: it never left DPU memory (except the few a
departing worker left unread in its worker_sq). Before an entry of
`length` bytes shows at its destination, the daemon waits

    delay = latency + length / (gbps * 1e9 / 8)   seconds

(latency = --dma-latency-us / 1e6, gbps = --dma-gbps; 0 turns a term off),
one transfer after the other like one serial engine; `DmaCost` counts the
transfers and the charged time. A DMA engine does not use the DPU's cores
while it copies, and the daemon runs under the DPU speed limit (a CPU
bandwidth limit on its cores), so the wait must not burn that CPU: a spin
would make the DMA cost and the speed limit compound. Delays from 20 us up
are therefore slept, with the thread's timer slack set to 1 ns (the default
50 us makes every sleep ~50 us late). Measured on these 2-core VMs (Python
3.11, sleeps of 0.2 us to 1 ms): with 1 ns slack a sleep still ends 17-33 us
late (p50, idle machine; 22-49 us with the other core busy; p99 25-90 us idle)
and costs 18-30 us of kernel CPU time whatever its length; with the default
slack it ends 77-100 us late. Below 20 us a spin costs less CPU than that and
is exact, so shorter delays are spun. Either way a transfer costs the DPU at
most about 20-30 us of CPU; a slept one shows up 17-49 us after its delay.

The daemon holds a registry slot of its own while it runs. On SIGINT/SIGTERM
it exits 0 after discarding its backlogs and releasing that slot; if it was
the namespace's last process, the shared objects (registry, its lock, dpa
doorbell, sidecar rings) are removed with it.

Restarts: a DMA manager killed with -9 can be replaced by a new one started
the same way while the sidecar and the workers run. The newcomer waits (at
most about 1.4 s, `registry.wait_for_predecessor`) for the old slot's
heartbeat to stop, since two consumers of one ring would corrupt it, frees
that slot, opens the existing registry, rings and doorbells, takes over the
doorbell rings that piled up while nobody listened, attaches every live
worker and drains what waited in the queues. Entries the dead process held in
its own memory (a move in progress, backlogs) are lost; their requests end at
the sidecar (module docstring of `dpu_daemon`). A daemon that stalled until
its slot was taken over and finds another DMA manager alive when it wakes up
exits with status 1 instead of becoming a second consumer.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import logging
import os
import signal
import threading
import time
from collections import deque
from dataclasses import dataclass, field

import posix_ipc

from dpumesh import naming, ring
from dpumesh.registry import (
    DMA_MANAGER_NAME,
    Membership,
    Registry,
    SidecarRings,
    WorkerKey,
    collect_stale,
    wait_for_predecessor,
)

log = logging.getLogger("dpumesh.dpa_daemon")

TICK_S = 0.25  # liveness housekeeping period
COLLECT_EVERY_S = 10.0  # full stale collection (buffers) period
BATCH = 64  # entries taken from one source before visiting the next
WORKER_BACKLOG = 256  # entries held per worker whose worker_sq is full
SIDECAR_BACKLOG = 4096  # entries held while sidecar_sq is full
_SPIN_BELOW_S = 20e-6  # shorter DMA delays are spun (module docstring: measured)
_PR_SET_TIMERSLACK = 29  # linux/prctl.h


class Superseded(RuntimeError):
    """Another DMA manager serves the namespace: this one must not consume its rings."""


@dataclass(slots=True)
class _Worker:
    """One attached worker: its rings and the entries waiting for its worker_sq."""

    key: WorkerKey
    bell: ring.Doorbell
    sq: ring.Ring
    cq: ring.Ring
    backlog: deque[tuple[ring.Entry, int, int]] = field(default_factory=deque)
    corrupt: bool = False  # its worker_cq is unreadable: no longer drained

    def close(self) -> None:
        self.sq.close()
        self.cq.close()
        self.bell.close()


class DmaCost:
    """Per-transfer delay of the DMA engine (formula in the module docstring), counted."""

    def __init__(self, latency_us: float = 0.0, gbps: float = 0.0) -> None:
        """latency_us <= 0 and gbps <= 0 both mean "free".

        When enabled, sets this thread's timer slack to 1 ns so that sleeps end
        on time: construct it in the thread that charges.
        """
        self.latency_s = max(0.0, latency_us) / 1e6
        self.bytes_per_s = gbps * 1e9 / 8 if gbps > 0 else 0.0
        self.enabled = self.latency_s > 0 or self.bytes_per_s > 0
        self.transfers = 0
        self.charged_s = 0.0
        if self.enabled and ctypes.CDLL(None).prctl(_PR_SET_TIMERSLACK, 1, 0, 0, 0) != 0:
            log.warning("cannot set the timer slack: short DMA delays will run long")

    def delay_s(self, nbytes: int) -> float:
        """Seconds one transfer of `nbytes` takes: latency + nbytes / bandwidth."""
        return self.latency_s + (nbytes / self.bytes_per_s if self.bytes_per_s else 0.0)

    def charge(self, nbytes: int) -> None:
        """Count one transfer of `nbytes` and spend its time."""
        delay = self.delay_s(nbytes)
        self.transfers += 1
        self.charged_s += delay
        if delay >= _SPIN_BELOW_S:
            time.sleep(delay)
            return
        end = time.perf_counter() + delay
        while time.perf_counter() < end:
            pass


class DmaManager:
    """The daemon's state and loop; `run()` until `stop` is set, then `close()`."""

    def __init__(
        self, ns: str, cost: DmaCost | None = None, *, stop: threading.Event | None = None
    ) -> None:
        """Attach to (or create) the namespace's sidecar rings, doorbell and registry."""
        self.ns = naming.validate_namespace(ns)
        self.cost = cost or DmaCost()
        self.stop = stop or threading.Event()
        self.registry = Registry.open_or_create(self.ns)
        try:
            other = wait_for_predecessor(self.registry, DMA_MANAGER_NAME)
            if other is not None:
                raise Superseded(f"another dpa-daemon (pid {other.pid}) serves namespace {ns}")
            collect_stale(self.ns, self.registry)
            self.sidecar = SidecarRings(self.ns)
        except BaseException:
            self.registry.close()
            raise
        self.bell = self.sidecar.dpa_bell
        self.membership = Membership(self.registry, DMA_MANAGER_NAME, rejoin=True)
        self._key = self.membership.key
        self.superseded: str | None = None  # set when another DMA manager took over
        self.workers: dict[int, _Worker] = {}  # by route (key as u32)
        self._pending: set[WorkerKey] = set()  # live but rings not openable yet
        self._sidecar_backlog: deque[tuple[ring.Entry, int, int]] = deque()
        self._seen_version = -1
        self.moved = 0  # entries delivered (diagnostics)
        self.bounced = 0

    # -- main loop -------------------------------------------------------------

    def run(self) -> None:
        """Serve until `stop` is set (signal handlers set it and the wait returns)."""
        # Rings posted while no DMA manager listened (a predecessor died): the first
        # pump below drains everything they announced, so they are only wake-ups.
        stale = self.bell.absorb(self.bell.value)
        if stale:
            log.info("took over %d doorbell rings posted while no DMA manager ran", stale)
        now = time.monotonic()
        next_tick = now
        next_collect = now + COLLECT_EVERY_S
        while not self.stop.is_set():
            woke = self.bell.wait(max(0.0, next_tick - time.monotonic()))
            if self.stop.is_set() or not self._still_ours():
                break
            if self._pending or self.registry.version != self._seen_version:
                self._rescan()
            consumed = self.pump()
            if woke and consumed > 1:
                self.bell.absorb(consumed - 1)
            now = time.monotonic()
            if now >= next_tick:
                next_tick = now + TICK_S
                dead = self.registry.reap_dead()
                for key in dead:
                    log.warning("worker %d/%d stopped heartbeating: reaped", *key)
                self._rescan()
                if dead or now >= next_collect:
                    next_collect = now + COLLECT_EVERY_S
                    for name in collect_stale(self.ns, self.registry):
                        log.info("collected stale %s", name)

    def _still_ours(self) -> bool:
        """False if this daemon stalled, lost its slot and another DMA manager took over.

        Checked before every pump (one aligned load and store): after a stall the
        heartbeat thread may already have claimed a new slot, so a changed key
        counts as a lost slot too.
        """
        if self.membership.key == self._key and self.registry.heartbeat(self._key):
            return True
        others = [
            info
            for info in self.registry.snapshot(include_daemons=True)
            if info.service == DMA_MANAGER_NAME and info.alive and info.key != self.membership.key
        ]
        if others:
            self.superseded = f"dpa-daemon pid {others[0].pid} took over while this one stalled"
            log.error("%s: exiting without touching the queues", self.superseded)
            self.stop.set()
            return False
        log.warning("this DMA manager stalled past its heartbeat expiry; going on")
        self._key = self.membership.key
        return True

    def pump(self) -> int:
        """Move everything that can move now; returns entries taken from sources."""
        consumed = 0
        progress = True
        while progress:
            progress = self._flush_sidecar()
            for worker in self.workers.values():
                if worker.backlog:
                    progress |= self._flush_worker(worker)
            for worker in self.workers.values():
                taken = 0 if worker.corrupt else self._drain_worker_cq(worker)
                consumed += taken
                progress |= taken > 0
            taken = self._drain_sidecar_cq()
            consumed += taken
            progress |= taken > 0
        return consumed

    # -- sources ---------------------------------------------------------------

    def _room_for_sidecar(self) -> bool:
        return len(self._sidecar_backlog) < SIDECAR_BACKLOG

    def _drain_worker_cq(self, worker: _Worker) -> int:
        taken = 0
        route = worker.key.route
        while taken < BATCH and self._room_for_sidecar():
            try:
                entry = worker.cq.pop_entry()
            except ring.BadEntry as exc:
                log.warning("dropped bad entry from worker %d/%d: %s", *worker.key, exc)
                continue
            except ring.RingCorrupt as exc:
                log.error("worker %d/%d corrupted its worker_cq: %s", *worker.key, exc)
                worker.corrupt = True
                return taken
            if entry is None:
                break
            taken += 1
            self._to_sidecar(entry, route, entry.flags)
        return taken

    def _drain_sidecar_cq(self) -> int:
        taken = 0
        cq = self.sidecar.cq
        # Each entry may need to bounce, so only take what the sidecar backlog can hold.
        while taken < BATCH and self._room_for_sidecar():
            try:
                entry = cq.pop_entry()
            except ring.BadEntry as exc:
                log.warning("dropped bad entry from the sidecar: %s", exc)
                continue
            if entry is None:
                break
            taken += 1
            worker = self.workers.get(entry.route)
            if worker is None:
                self._bounce(entry)
            elif worker.backlog:
                if len(worker.backlog) < WORKER_BACKLOG:
                    worker.backlog.append((entry, entry.route, entry.flags))
                else:
                    self._bounce(entry)
            elif not self._deliver(worker.sq, entry, entry.route, entry.flags):
                worker.backlog.append((entry, entry.route, entry.flags))
        return taken

    # -- destinations ------------------------------------------------------------

    def _deliver(self, dst: ring.Ring, entry: ring.Entry, route: int, flags: int) -> bool:
        """Copy one entry into `dst`; False (space wake-up armed) if it is full."""
        try:
            if not dst.room_for(entry):
                return False  # the destination's space bell wakes us for a retry
            if self.cost.enabled and not flags & ring.BOUNCED:
                # The transfer takes its time before the entry shows at the destination;
                # a bounce never left DPU memory.
                self.cost.charge(entry.length)
            dst.push_entry(entry, route=route, flags=flags, timeout=0.0)
        except ring.PayloadTooLarge as exc:  # destination has a smaller limit
            log.warning("cannot deliver %d bytes to %s: %s", entry.length, dst.name, exc)
            if flags & ring.BOUNCED:
                entry.discard()
                return True
            self._bounce(entry)
            return True
        self.moved += 1
        return True

    def _to_sidecar(self, entry: ring.Entry, route: int, flags: int) -> None:
        if self._sidecar_backlog or not self._deliver(self.sidecar.sq, entry, route, flags):
            self._sidecar_backlog.append((entry, route, flags))

    def _bounce(self, entry: ring.Entry) -> None:
        self.bounced += 1
        self._to_sidecar(entry, entry.route, entry.flags | ring.BOUNCED)

    def _flush_sidecar(self) -> bool:
        backlog = self._sidecar_backlog
        moved = False
        while backlog and self._deliver(self.sidecar.sq, *backlog[0]):
            backlog.popleft()
            moved = True
        return moved

    def _flush_worker(self, worker: _Worker) -> bool:
        backlog = worker.backlog
        moved = False
        while backlog and self._deliver(worker.sq, *backlog[0]):
            backlog.popleft()
            moved = True
        return moved

    # -- membership -------------------------------------------------------------

    def _rescan(self) -> None:
        """Attach new live workers; detach those that no longer hold their slot.

        A worker that stopped heartbeating stays attached until it is reaped
        (next tick): only then is it safe to consume its worker_sq.
        """
        self._seen_version = self.registry.version
        infos = self.registry.snapshot()
        active = {info.key.route for info in infos}
        for route in [r for r in self.workers if r not in active]:
            self._detach(route)
        self._pending.clear()
        for info in infos:
            if info.alive and info.key.route not in self.workers and not self._attach(info.key):
                self._pending.add(info.key)

    def _attach(self, key: WorkerKey) -> bool:
        """Open a worker's doorbell and rings; False if they are not (all) there yet."""
        slot, gen = key
        with contextlib.ExitStack() as opened:
            try:
                bell = ring.Doorbell.open(naming.worker_bell(self.ns, slot, gen))
                opened.callback(bell.close)
                sq = ring.Ring.open(naming.worker_sq(self.ns, slot, gen), space_bell=self.bell)
                opened.callback(sq.close)
                cq = ring.Ring.open(naming.worker_cq(self.ns, slot, gen), doorbell=self.bell)
            except (posix_ipc.ExistentialError, ring.RingCorrupt):
                return False  # what was opened is closed on the way out
            opened.pop_all()
        self.workers[key.route] = _Worker(key, bell, sq, cq)
        log.info("worker %d/%d attached", slot, gen)
        return True

    def _detach(self, route: int) -> None:
        """Forget a worker: deliver its replies, bounce what it will never read."""
        worker = self.workers.pop(route)
        while not worker.corrupt and self._drain_worker_cq(worker):
            pass
        while worker.backlog:
            self._bounce(worker.backlog.popleft()[0])
        # We produce worker_sq, so our handle's read position is where we opened it,
        # not where the worker got to: read its rest through a fresh consumer's view.
        # (Through our own handle, entries the worker had consumed long ago came back
        # as bounces, their buffers gone.) No ring left: the worker removed it on exit.
        try:
            unread = ring.Ring.open(worker.sq.name, space_bell=self.bell)
        except (posix_ipc.ExistentialError, ring.RingCorrupt):
            unread = None
        if unread is not None:
            try:
                while True:
                    try:
                        entry = unread.pop_entry()
                    except ring.BadEntry:
                        continue
                    except ring.RingCorrupt:
                        break
                    if entry is None:
                        break
                    self._bounce(entry)
            finally:
                unread.close()
        worker.close()
        log.info("worker %d/%d detached", *worker.key)

    # -- shutdown ----------------------------------------------------------------

    def close(self) -> None:
        """Discard backlogs, close worker rings, leave the registry (if this was
        the last process of the namespace, its shared objects go too)."""
        for entry, _route, _flags in self._sidecar_backlog:
            entry.discard()
        self._sidecar_backlog.clear()
        for worker in self.workers.values():
            for entry, _route, _flags in worker.backlog:
                entry.discard()
            worker.close()
        self.workers.clear()
        collect_stale(self.ns, self.registry)
        self.sidecar.close()
        self.membership.close()  # the last process of the namespace removes its objects
        self.registry.close()


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m dpumesh.dpa_daemon",
        description=(
            "DPUmesh DMA manager: moves entries sidecar_cq -> worker_sq[key] and "
            "worker_cq[*] -> sidecar_sq over POSIX shared memory, bouncing entries for "
            "dead or unknown workers back to the sidecar. Sleeps on a semaphore when idle."
        ),
    )
    p.add_argument(
        "--ns",
        default=None,
        help="instance namespace [A-Za-z0-9_]{1,24} (default: $DPUMESH_NS or 'default')",
    )
    p.add_argument(
        "--dma-latency-us",
        type=float,
        default=0.0,
        metavar="N",
        help="simulated DMA latency per transfer in microseconds (default 0 = off)",
    )
    p.add_argument(
        "--dma-gbps",
        type=float,
        default=0.0,
        metavar="G",
        help="simulated DMA bandwidth in Gbit/s, adds length/bandwidth per transfer "
        "(default 0 = unlimited)",
    )
    p.add_argument(
        "--log-level",
        default="INFO",
        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
        help="logging level (default INFO)",
    )
    return p


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; returns the exit status."""
    args = _parser().parse_args(argv)
    logging.basicConfig(
        level=args.log_level, format="%(asctime)s %(levelname)s dpa_daemon: %(message)s"
    )
    try:
        ns = naming.namespace_from_env() if args.ns is None else naming.validate_namespace(args.ns)
    except ValueError as exc:
        _parser().error(str(exc))
    stop = threading.Event()

    def _on_signal(signum: int, _frame: object) -> None:
        log.info("signal %d: shutting down", signum)
        stop.set()

    # Before creating anything, so a signal during start-up still cleans up.
    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)
    try:
        manager = DmaManager(ns, DmaCost(args.dma_latency_us, args.dma_gbps), stop=stop)
    except Superseded as exc:
        log.error("not starting: %s", exc)
        return 1
    announce("dpa-daemon pid %d up (namespace %s)", os.getpid(), ns)
    try:
        manager.run()
    finally:
        manager.close()
    announce(
        "dpa-daemon pid %d stopped: %d moved, %d bounced",
        os.getpid(),
        manager.moved,
        manager.bounced,
    )
    if manager.cost.enabled:
        log.info(
            "DMA cost: %d transfers, %.6f s charged", manager.cost.transfers, manager.cost.charged_s
        )
    return 0 if manager.superseded is None else 1


def announce(msg: str, *args: object) -> None:
    """Log at INFO whatever the configured level: a (re)start must show in the log."""
    log.handle(log.makeRecord(log.name, logging.INFO, __file__, 0, msg, args, None))


if __name__ == "__main__":
    raise SystemExit(main())
