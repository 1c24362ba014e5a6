"""What a fault did to the load, from the load generator's completion timeline (pure).

The timeline (`loadtests.recorder`) counts every completion by the wall-clock
100 ms it completed in: completed, failed, worst latency (µs, from the
intended send time, so a stall shows as latency, not as missing requests).
From it and the fault's injection time:

* **recovery**: the time from the fault until the rate is back for a second:
  the start of the first 100 ms bucket from which every one-second window
  starting in the next second holds completions within `TOLERANCE` of the
  offered rate (at least one request either way, for low rates) and no
  failure. One good window is not enough: a catch-up burst right after a gap
  averages out to the offered rate. None when that never happened before
  the run ended.
* the worst latency and the failures after the fault, and the series the
  report draws (rate and errors per 100 ms, time relative to the fault).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

TOLERANCE = 0.05
WINDOW_S = 1.0


@dataclass(frozen=True)
class Timeline:
    """Dense per-bucket series from `start` (a bucket number: wall ns // bucket)."""

    bucket_ns: int
    start: int
    completed: tuple[int, ...]
    failed: tuple[int, ...]
    worst_us: tuple[int, ...]

    @classmethod
    def from_record(cls, record: Mapping[str, Any]) -> Timeline:
        """From a sidecar's `timeline` (sparse buckets keyed by number)."""
        bucket_ms = record.get("bucket_ms")
        buckets = {int(k): v for k, v in (record.get("buckets") or {}).items()}
        if not bucket_ms or not buckets:
            return cls(int((bucket_ms or 100) * 1_000_000), 0, (), (), ())
        first, last = min(buckets), max(buckets)
        rows = [buckets.get(i, (0, 0, 0)) for i in range(first, last + 1)]
        return cls(
            int(bucket_ms * 1_000_000),
            first,
            tuple(int(r[0]) for r in rows),
            tuple(int(r[1]) for r in rows),
            tuple(int(r[2]) for r in rows),
        )

    @property
    def bucket_s(self) -> float:
        return self.bucket_ns / 1e9

    def index(self, wall_ns: int) -> int:
        """The bucket holding wall-clock time `wall_ns` (may be outside the series)."""
        return wall_ns // self.bucket_ns - self.start

    def since_s(self, index: int, wall_ns: int) -> float:
        """Start of bucket `index`, in seconds after wall-clock time `wall_ns`."""
        return ((self.start + index) * self.bucket_ns - wall_ns) / 1e9


def recovery_s(
    timeline: Timeline,
    offered_rps: float,
    fault_wall_ns: int,
    *,
    window_s: float = WINDOW_S,
    tolerance: float = TOLERANCE,
) -> float | None:
    """Seconds from the fault to the start of the first clean full window (see module doc).

    The series' last bucket is left out: Locust stopping its users cuts it short.
    """
    n = max(1, round(window_s / timeline.bucket_s))
    usable = len(timeline.completed) - 1
    if offered_rps <= 0:
        return None
    need = offered_rps * n * timeline.bucket_s
    slack = max(tolerance * need, 1.0)
    done = _prefix(timeline.completed)
    failed = _prefix(timeline.failed)
    good_run = 0  # consecutive good windows ending at the current start
    for j in range(max(0, timeline.index(fault_wall_ns)), usable - n + 1):
        got = done[j + n] - done[j]
        good = failed[j + n] - failed[j] == 0 and abs(got - need) <= slack
        good_run = good_run + 1 if good else 0
        if good_run == n + 1:
            return max(0.0, timeline.since_s(j - n, fault_wall_ns))
    return None


def _prefix(values: tuple[int, ...]) -> list[int]:
    out = [0]
    for v in values:
        out.append(out[-1] + v)
    return out


def after_fault(timeline: Timeline, fault_wall_ns: int) -> dict[str, int]:
    """Completions, failures and the worst latency (µs) from the fault's bucket on."""
    first = max(0, timeline.index(fault_wall_ns))
    return {
        "completed": sum(timeline.completed[first:]),
        "failed": sum(timeline.failed[first:]),
        "worst_us": max(timeline.worst_us[first:], default=0),
    }


def series(timeline: Timeline, fault_wall_ns: int) -> dict[str, list[float]]:
    """The report's series: bucket start relative to the fault (s), req/s and errors/s."""
    per_s = 1 / timeline.bucket_s
    return {
        "t_s": [
            round(timeline.since_s(i, fault_wall_ns), 3) for i in range(len(timeline.completed))
        ],
        "rps": [c * per_s for c in timeline.completed],
        "errors_per_s": [f * per_s for f in timeline.failed],
        "worst_ms": [w / 1000 for w in timeline.worst_us],
    }
