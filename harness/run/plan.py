"""What a run does, in which order, and how long that should take.

A run is a list of *segments*, one per (repetition, stack), interleaved
across stacks: rep 1 A B C, rep 2 A B C, ... so slow drift of a shared
machine (thermal, other tenants) hits every stack alike (DESIGN §5). A
segment starts its stack once and keeps it up across its load *levels*:

* ``closed-<U>``: closed loop, U users sending back to back;
* ``open-<R>``: open loop at R requests/s (the sweep, lowest rate first);
* ``max-<R>``: an open-loop probe of the maximum-clean-throughput search.

Each level is one Locust run. Its first seconds are excluded from the
histogram and from the CPU window: the warm-up for the first level after a
stack start, the shorter settle (ramp-up, connection set-up) for the others.

Request ids are ``r<rep>-<level>-<n>``: the same for every stack at the same
repetition and level, so μBench's sampling (a function of the id) makes the
same choices in every stack.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from harness.run.config import BenchConfig

# Open loop needs users >= rate x worst latency; 50 ms covers this machine's
# usual tail, and late sends are measured from their intended time anyway.
OPEN_LOOP_LATENCY_BUDGET_S = 0.05
OPEN_LOOP_MIN_USERS = 8

# Costs (s) measured on a busy 2-core machine, only for the progress display's estimate.
STACK_START_S = {"nomesh": 1.5, "envoy": 2.0, "dpumesh": 2.5}
STACK_STOP_S = 1.0
LOCUST_OVERHEAD_S = 1.2  # process start-up to first request, and shutdown


@dataclass(frozen=True)
class Level:
    """One load level: a name for files and rows, the users, the offered rate (None = closed)."""

    name: str
    users: int
    rate: float | None

    @property
    def open_loop(self) -> bool:
        return self.rate is not None


@dataclass(frozen=True)
class Segment:
    """One stack start: which stack, which repetition (1-based)."""

    rep: int
    mesh: str


def closed_level(users: int) -> Level:
    return Level(f"closed-{users}", users, None)


def open_level(rate: float, processes: int, prefix: str = "open") -> Level:
    """An open-loop level with enough users for `rate` (and one per Locust process at least)."""
    users = max(OPEN_LOOP_MIN_USERS, math.ceil(rate * OPEN_LOOP_LATENCY_BUDGET_S), processes)
    return Level(f"{prefix}-{rate:g}", users, rate)


def sweep(config: BenchConfig) -> list[Level]:
    """The fixed levels of every segment: the closed-loop level, then the open-loop rates."""
    return [
        closed_level(max(config.users, config.processes)),
        *(open_level(r, config.processes) for r in config.rates),
    ]


def segments(config: BenchConfig) -> list[Segment]:
    """Stack starts, repetitions interleaved across stacks: A B C A B C ..."""
    return [Segment(rep, mesh) for rep in range(1, config.repeat + 1) for mesh in config.meshes]


def request_id_prefix(rep: int, level: Level) -> str:
    return f"r{rep}-{level.name}-"


def excluded_s(config: BenchConfig, first: bool) -> int:
    """Seconds excluded at the start of a level: warm-up after a stack start, else settle."""
    return max(config.warmup, config.settle) if first else config.settle


def stack_start_s(mesh: str) -> float:
    """Estimated time to start `mesh`."""
    return STACK_START_S.get(mesh, 3.0)


def level_s(config: BenchConfig, first: bool) -> float:
    """Estimated wall time of one level."""
    return LOCUST_OVERHEAD_S + excluded_s(config, first) + config.duration


def segment_s(config: BenchConfig, mesh: str) -> float:
    """Estimated wall time of one segment (find-max assumed to use all its steps)."""
    levels = len(sweep(config)) + (config.find_max_steps if config.find_max else 0)
    return (
        stack_start_s(mesh)
        + level_s(config, first=True)
        + (levels - 1) * level_s(config, first=False)
        + STACK_STOP_S
    )


def estimate_s(config: BenchConfig) -> float:
    """Estimated wall time of the whole run."""
    return sum(segment_s(config, seg.mesh) for seg in segments(config))
