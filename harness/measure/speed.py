"""How fast this machine's host CPUs are right now: a fixed loop, timed.

A virtual machine's vCPU can run slower for minutes at a time (a busy
neighbour on the physical core, frequency changes) without reporting steal
time; every stack measured then looks slower, and the spread across
repetitions grows for no reason the harness controls. So before each stack
start the runner times the same pure-Python loop on the host CPUs and
records it with the segment (meta.json ``machine_speed``): a spread in the
results that follows the probe is the machine's, not the stack's.

The probe runs in the calling thread, moved to `cpus` for its duration (Linux
affinity is per thread), while nothing is under load.
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Iterable, Sequence

PROBE_S = 0.5
#: Probes spreading more than this: the report says the machine's speed varied.
NOTABLE_SPREAD = 0.10
_CHUNK = 10_000  # loop iterations between clock reads


def loop_rate(cpus: Iterable[int] | None, seconds: float = PROBE_S) -> float:
    """Millions of empty-loop iterations per second on `cpus` (None: wherever it runs)."""
    before = os.sched_getaffinity(0)
    if cpus is not None:
        os.sched_setaffinity(0, set(cpus))
    try:
        count = 0
        start = time.perf_counter()
        end = start + seconds
        while (now := time.perf_counter()) < end:
            for _ in range(_CHUNK):
                pass
            count += _CHUNK
        return count / (now - start) / 1e6
    finally:
        os.sched_setaffinity(0, before)


def spread(values: Sequence[float]) -> float | None:
    """(max - min) / median: how far repeated measurements of one thing disagree.

    None for fewer than two values or a zero median.
    """
    if len(values) < 2 or not statistics.median(values):
        return None
    return (max(values) - min(values)) / statistics.median(values)
