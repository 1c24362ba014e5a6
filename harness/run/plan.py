"""What a run does, in which order, and how long that should take.

A run compares *stacks*: one per mesh, or, in a what-if sweep, the
baselines once and the dpumesh stack at every value of one DPU model
parameter (`Stack`, labelled ``dpumesh@dpu_speed=0.5``). Unless the config
names its rates, it first *calibrates*: each stack started once for a short
closed-loop level, whose throughput sets the common open-loop ladder
(`harness.run.ladder`); that start also warms every stack's code and files.

Then a list of *segments*, one per (repetition, stack), interleaved across
stacks: rep 1 A B C, rep 2 A B C, ... so slow drift of a shared machine
(thermal, other tenants) hits every stack alike (DESIGN §5). A segment
starts its stack once and keeps it up across its load *levels*:

* ``closed-<U>``: closed loop, U users sending back to back;
* ``open-<R>``: open loop at R requests/s (the ladder, lowest rate first,
  until two rates in a row were not clean);
* ``refine-<R>``: an open-loop probe between the segment's highest clean and
  lowest unclean ladder rate.

Each level is one Locust run. Its first seconds are excluded from the
histogram and from the CPU window: the warm-up for the first level after a
stack start, the shorter settle (ramp-up, connection set-up) for the others.

Request ids are ``r<rep>-<level>-<n>``: the same for every stack at the same
repetition and level, so μBench's sampling (a function of the id) makes the
same choices in every stack.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

from harness.placement import profiles
from harness.run.config import BenchConfig

# Open loop needs users >= rate x latency (Little's law) to send on schedule: rate x the
# p99 objective covers every rate that can be clean, so a knee is the stack's, not the
# generator's; late sends are measured from their intended time anyway.
OPEN_LOOP_MIN_USERS = 8

# Costs (s) measured on a busy 2-core machine, only for the progress display's estimate.
# nodeproxy: 0.91 x envoy's (medians of 3 local starts each on an idle machine: 0.63 s, 0.69 s).
STACK_START_S = {"nomesh": 1.5, "envoy": 2.0, "nodeproxy": 1.8, "dpumesh": 2.5}
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
class Stack:
    """One compared stack: a mesh, and DPU model values that differ from the run's."""

    mesh: str
    overrides: tuple[tuple[str, float], ...] = field(default=())

    @property
    def label(self) -> str:
        """`mesh`, or `mesh@param=value,...` for a what-if variant (rows, files, the report)."""
        if not self.overrides:
            return self.mesh
        return self.mesh + "@" + ",".join(f"{k}={v:g}" for k, v in self.overrides)


@dataclass(frozen=True)
class Segment:
    """One stack start: which stack, which repetition (1-based; 0 = calibration)."""

    rep: int
    stack: Stack

    @property
    def mesh(self) -> str:
        return self.stack.mesh

    @property
    def label(self) -> str:
        return self.stack.label


WHATIF_PARAMS = profiles.KEYS  # every number of a DPU profile


def stacks(config: BenchConfig) -> list[Stack]:
    """The stacks of an ordinary run: one per mesh, in the config's order."""
    return [Stack(mesh) for mesh in config.meshes]


def whatif_stacks(baselines: Sequence[str], param: str, values: Sequence[float]) -> list[Stack]:
    """The baselines once, then dpumesh at every value of `param` (ValueError if unusable)."""
    if param not in WHATIF_PARAMS:
        raise ValueError(f"--param must be one of {', '.join(WHATIF_PARAMS)}, not {param!r}")
    if "dpumesh" in baselines:
        raise ValueError("--baselines: dpumesh is the swept stack, not a baseline")
    if len(set(baselines)) != len(baselines):
        raise ValueError(f"--baselines lists a stack twice: {', '.join(baselines)}")
    if len(set(values)) != len(values) or not values:
        raise ValueError(f"--values needs distinct values, got {list(values)}")
    if param == "dpu_cores" and any(v != int(v) for v in values):
        raise ValueError(f"dpu_cores values must be whole numbers, got {list(values)}")
    stacks = [
        *(Stack(mesh) for mesh in baselines),
        *(Stack("dpumesh", ((param, v),)) for v in sorted(values)),
    ]
    labels = [s.label for s in stacks]
    if len(set(labels)) != len(labels):
        raise ValueError(f"--values too close to tell apart in a label: {', '.join(labels)}")
    return stacks


def closed_level(users: int) -> Level:
    return Level(f"closed-{users}", users, None)


def open_level(rate: float, config: BenchConfig, prefix: str = "open") -> Level:
    """An open-loop level with enough users for `rate` (and one per Locust process at least)."""
    budget_s = config.slo_p99_ms / 1000
    users = max(OPEN_LOOP_MIN_USERS, math.ceil(rate * budget_s), config.processes)
    return Level(f"{prefix}-{rate:g}", users, rate)


def closed(config: BenchConfig) -> Level:
    """The closed-loop level of every segment (and of the calibration)."""
    return closed_level(max(config.users, config.processes))


def sweep(config: BenchConfig, ladder: Sequence[float]) -> list[Level]:
    """The levels of a segment that climbs the whole ladder: closed loop, then each rate."""
    return [closed(config), *(open_level(r, config) for r in ladder)]


def segments(config: BenchConfig, compared: Sequence[Stack]) -> list[Segment]:
    """Stack starts, repetitions interleaved across stacks: A B C A B C ..."""
    return [Segment(rep, stack) for rep in range(1, config.repeat + 1) for stack in compared]


def calibrations(config: BenchConfig, compared: Sequence[Stack]) -> list[Segment]:
    """The calibration starts (rep 0), one per stack, when the ladder is not given."""
    return [] if config.rates is not None else [Segment(0, stack) for stack in compared]


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


def ladder_size(config: BenchConfig) -> int:
    """How many open-loop rates a segment may run (the given rates, or the ladder's count)."""
    return len(config.rates) if config.rates is not None else config.ladder_rates


def calibration_s(config: BenchConfig, mesh: str) -> float:
    """Estimated wall time of one calibration start."""
    level = LOCUST_OVERHEAD_S + excluded_s(config, True) + config.calibrate
    return stack_start_s(mesh) + level + STACK_STOP_S


def segment_s(config: BenchConfig, mesh: str) -> float:
    """Estimated wall time of one segment, climbing the whole ladder and refining."""
    levels = 1 + ladder_size(config) + (config.refine if ladder_size(config) else 0)
    return (
        stack_start_s(mesh)
        + level_s(config, first=True)
        + (levels - 1) * level_s(config, first=False)
        + STACK_STOP_S
    )


def estimate_s(config: BenchConfig, compared: Sequence[Stack]) -> float:
    """Estimated wall time of the whole run (an upper bound: slow stacks stop early)."""
    return sum(calibration_s(config, s.mesh) for s in calibrations(config, compared)) + sum(
        segment_s(config, seg.mesh) for seg in segments(config, compared)
    )
