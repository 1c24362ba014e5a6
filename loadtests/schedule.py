"""Request slots: who sends the next request, and when (open loop) - no Locust import.

Closed loop: a slot is just the next sequence number; the user sends at once.

Open loop at rate R (requests/s for the whole test): the test's requests are
numbered 0, 1, 2, ... and request ``i`` is *intended* to be sent at
``t0 + i / R``. With P load-generator processes, process ``w`` (0 <= w < P)
owns the numbers ``i = k*P + w`` (k = 0, 1, ...), i.e. every P-th slot, so
each process offers R/P and together they offer R. Inside a process the users
share one `SlotSchedule`: whichever user is free takes the process's next
slot (work-conserving; a user stuck on a slow request never holds back slots
other users could send). With U users per process this is the same spacing as
"each user handles every (U*P)-th slot" while all users keep up, and strictly
better when one of them falls behind.

A user that takes a slot sleeps until its intended time, sends, and the
latency is measured FROM THE INTENDED SEND TIME when the send is late: a
user that falls behind (all users busy, server stalled) sends immediately and
the queueing delay is part of the recorded latency (no coordinated
omission). See `reference_ns`.

The sequence number is also the request's id (``x-request-id``), so the set
of ids a run sends does not depend on timing or on how slots were spread over
users: μBench's sampling (a function of the id) is the same in every stack.

``t0`` is process-local: the monotonic time at which the process's first slot
is taken. Processes therefore do not start at exactly the same instant;
their rates still add up to R (`loadtests.latency.merge_sidecars` sums
per-process achieved rates for that reason).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

Clock = Callable[[], int]


#: At most this many Locust processes share a test's slots.
MAX_PROCESSES = 1024


@dataclass(frozen=True)
class Assignment:
    """What the master tells each worker at a test start (`loadtests.locustfile`).

    ``index`` of ``count``: the worker's slots. ``test``: the master's number
    for the test, which the worker's histogram reports carry so the master
    never counts one from an earlier test; ``report``: whether the master
    wants them (it has a web UI, `loadtests.webui`).
    """

    index: int
    count: int
    test: int
    report: bool

    def as_message(self) -> dict[str, int | bool]:
        return {"index": self.index, "count": self.count, "test": self.test, "report": self.report}


def parse_assignment(data: object) -> Assignment:
    """An `Assignment` from the master's message, checked (`ValueError` otherwise)."""
    if not isinstance(data, dict):
        raise ValueError(f"slot assignment is not an object: {data!r:.60}")
    index, count, test = (data.get(k) for k in ("index", "count", "test"))
    ints = all(type(v) is int for v in (index, count, test))
    if not ints or not 0 <= index < count <= MAX_PROCESSES or test < 0:
        raise ValueError(f"bad slot assignment: {data!r:.120}")
    report = data.get("report", False)
    if type(report) is not bool:
        raise ValueError(f"bad slot assignment: report is {report!r:.20}")
    return Assignment(index, count, test, report)


@dataclass(frozen=True)
class Slot:
    """One request to send: global sequence number and intended send time (or None)."""

    seq: int
    intended_ns: int | None


class SlotSchedule:
    """The slots of one load-generator process (`index` of `count`)."""

    def __init__(
        self,
        rate: float = 0.0,
        index: int = 0,
        count: int = 1,
        clock: Clock = time.perf_counter_ns,
    ) -> None:
        if count < 1 or not 0 <= index < count:
            raise ValueError(f"bad slot assignment: index {index} of {count}")
        if rate < 0:
            raise ValueError(f"rate must be >= 0, not {rate}")
        self.rate = float(rate)
        self.index = index
        self.count = count
        self.clock = clock
        self.t0_ns: int | None = None
        self._k = 0

    @property
    def open_loop(self) -> bool:
        return self.rate > 0

    @property
    def taken(self) -> int:
        """Slots handed out so far by this process."""
        return self._k

    def intended_ns(self, seq: int) -> int:
        """Intended send time of global slot `seq` (monotonic ns); open loop only."""
        assert self.t0_ns is not None and self.rate > 0
        return self.t0_ns + round(seq * 1e9 / self.rate)

    def next_slot(self) -> Slot:
        """The process's next slot; starts the clock on the first call."""
        if self.t0_ns is None:
            self.t0_ns = self.clock()
        seq = self._k * self.count + self.index
        self._k += 1
        if self.rate <= 0:
            return Slot(seq, None)
        return Slot(seq, self.intended_ns(seq))


def reference_ns(intended_ns: int | None, send_ns: int) -> int:
    """The instant a request's latency is measured from: the earlier of the two.

    Closed loop: the actual send. Open loop: the intended send time when the
    send was late (the queueing counts), the actual send when the timer woke
    a little early (the system is never credited with time it did not spend).
    """
    if intended_ns is None:
        return send_ns
    return min(intended_ns, send_ns)


class WakeupBias:
    """Compensates the event loop's timer lateness when sleeping until a slot.

    gevent's timers (libev/epoll, millisecond timeouts) fire on average about
    1 ms late. Sleeping until ``target - bias`` with ``bias`` an average of
    the observed lateness centres the wake-ups on the target instead of ~1 ms
    after it (which would add ~1 ms to every open-loop latency). Wake-ups that
    end up early are measured from the actual send (`reference_ns`), late
    ones from the intended time.
    """

    def __init__(self, initial_ns: int = 0, alpha: float = 0.1, max_ns: int = 2_000_000) -> None:
        self.bias_ns = float(initial_ns)
        self.alpha = alpha
        self.max_ns = max_ns

    def sleep_s(self, target_ns: int, now_ns: int) -> float:
        """How long to sleep now (seconds, >= 0) to wake at about `target_ns`."""
        return max(0.0, (target_ns - self.bias_ns - now_ns) / 1e9)

    def observe(self, asked_s: float, slept_from_ns: int, woke_ns: int) -> None:
        """Update the bias from one sleep of `asked_s` seconds."""
        lateness = woke_ns - slept_from_ns - asked_s * 1e9
        lateness = min(max(lateness, 0.0), float(self.max_ns))
        self.bias_ns += self.alpha * (lateness - self.bias_ns)
