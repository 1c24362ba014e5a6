"""The open-loop ladder of a run: one list of rates for every stack, past the fastest knee.

A mesh comparison is read from latency-against-rate curves (DESIGN §5), so
the ladder must reach past every stack's capacity and be dense where the
knees are. The run calibrates first: a short closed-loop level of every stack
gives its capacity C (requests/s it completes with the run's users sending
back to back). `build` then places, for every stack, rates at
`KNEE_FRACTIONS` x C (where its open-loop p99 turns up), a low rate every
stack sustains, and a top rate `REACH` x the fastest C; rates closer than
`MIN_GAP` merge, and the closest pairs merge until at most `count` remain.

Each stack climbs the ladder until `STOP_AFTER_DIRTY` rates in a row were
not clean (`harness.measure.checks.is_clean`, the one rule; the rates above
are past its knee: clean-ness is taken to be monotonic in the rate, as any
knee search does). `refine` then bisects
between a repetition's highest clean and the lowest dirty rate above it.

Everything here is pure: rates in, rates out.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from harness.measure.checks import MAX_ERROR_RATE, MIN_DELIVERY

KNEE_FRACTIONS = (0.55, 0.7, 0.85, 1.0)
LOW_FRACTION = 0.4  # of the slowest capacity: a rate every stack sustains cleanly
REACH = 1.5  # the top rate, as a multiple of the fastest capacity (a cold calibration reads low)
MIN_GAP = 0.06  # rates closer than this (relative) are one rate
STOP_AFTER_DIRTY = 2
BRACKET = 0.05  # refinement stops when clean and dirty are this close (relative)

METHOD = (
    "Calibration: each stack started once for a closed-loop level (the run's users, warm-up "
    "excluded). Ladder: rates at "
    + ", ".join(f"{f:g}" for f in KNEE_FRACTIONS)
    + f" x each stack's calibrated throughput, {LOW_FRACTION:g} x the slowest and a top at "
    f"{REACH:g} x the fastest, the closest merged. Each stack climbs it until "
    f"{STOP_AFTER_DIRTY} rates in a row are not clean (achieved/offered >= {MIN_DELIVERY:g}, "
    f"errors <= {MAX_ERROR_RATE:.1%}, p99 <= SLO, self-checks passed), then refines between its "
    "highest clean and lowest unclean rate. Max clean throughput: the highest clean rate of "
    "each repetition, median over repetitions; at_top = clean at the top rate (a lower bound)."
)


def nice(rate: float) -> float:
    """`rate` rounded to a readable step: 1 req/s below 50, 5 below 200, 10 above."""
    step = 1 if rate < 50 else 5 if rate < 200 else 10
    return float(max(1, round(rate / step) * step))


def build(capacities: Mapping[str, float], count: int) -> list[float]:
    """The common ladder for stacks whose calibrated capacities are `capacities` (req/s).

    Sorted, at most `count` (>= 2) rates, the lowest below every stack's
    capacity and the top above the fastest one. ValueError without a usable capacity.
    """
    if count < 2:
        raise ValueError(f"a ladder needs at least 2 rates, not {count}")
    usable = [c for c in capacities.values() if c > 0]
    if not usable:
        raise ValueError("no stack completed a request during calibration")
    low = nice(LOW_FRACTION * min(usable))
    top = nice(REACH * max(usable))
    inner = sorted({nice(f * c) for c in usable for f in KNEE_FRACTIONS})
    rates = [low, *(r for r in inner if low < r < top), top]
    rates = _merge_close(rates)
    while len(rates) > count:
        rates = _merge_closest(rates)
    return rates


def _merge_close(rates: list[float]) -> list[float]:
    """Drop inner rates within MIN_GAP of the rate kept before them (the ends stay)."""
    kept = [rates[0]]
    for rate in rates[1:-1]:
        if rate / kept[-1] - 1 >= MIN_GAP and rates[-1] / rate - 1 >= MIN_GAP:
            kept.append(rate)
    return [*kept, rates[-1]]


def _merge_closest(rates: list[float]) -> list[float]:
    """Replace the closest pair of inner rates (relative gap) by one; the ends stay."""
    if len(rates) <= 3:
        return [rates[0], rates[-1]]
    _, i = min((rates[i + 1] / rates[i], i) for i in range(1, len(rates) - 2))
    merged = nice((rates[i] * rates[i + 1]) ** 0.5)
    return [*rates[:i], merged, *rates[i + 2 :]]


class Climb:
    """One stack's way up the ladder in one repetition: feed it each rate's verdict."""

    def __init__(self, rates: Sequence[float]) -> None:
        self.rates = list(rates)
        self.results: dict[float, bool] = {}

    def next_rate(self) -> float | None:
        """The next ladder rate to run, None when the ladder is done or past the knee."""
        verdicts = [self.results[r] for r in self.rates if r in self.results]
        if len(verdicts) >= STOP_AFTER_DIRTY and not any(verdicts[-STOP_AFTER_DIRTY:]):
            return None
        remaining = [r for r in self.rates if r not in self.results]
        return remaining[0] if remaining else None

    def record(self, rate: float, clean: bool) -> None:
        self.results[rate] = clean

    @property
    def skipped(self) -> list[float]:
        """Ladder rates not run: above two dirty ones."""
        return [r for r in self.rates if r not in self.results]


def refine(results: Mapping[float, bool]) -> float | None:
    """A rate between the highest clean rate and the lowest dirty rate above it, or None.

    None when there is no such bracket or it is already within BRACKET (or 1 req/s).
    """
    clean = [r for r, ok in results.items() if ok]
    if not clean:
        return None
    best = max(clean)
    above = [r for r, ok in results.items() if not ok and r > best]
    if not above:
        return None
    worst = min(above)
    if worst - best <= max(1.0, BRACKET * best):
        return None
    rate = float(round((best + worst) / 2))
    return rate if best < rate < worst else None


@dataclass(frozen=True)
class MaxClean:
    """A repetition's maximum clean throughput: the rate, and whether it is the ladder's top."""

    rps: float | None
    at_top: bool


def max_clean(results: Mapping[float, bool], top: float) -> MaxClean:
    """The highest clean rate of one repetition (DESIGN §5); `at_top`: it is only a bound."""
    clean = [r for r, ok in results.items() if ok]
    best = max(clean, default=None)
    return MaxClean(best, best is not None and best >= top)


def median_max_clean(reps: Sequence[MaxClean]) -> MaxClean:
    """The lower median over repetitions (no clean rate counts as 0).

    The lower median of an even count, not the mean of the middle two, so the
    value is always a rate that was measured, and it is at the top (a bound)
    only when that repetition's was.
    """
    ordered = sorted(reps, key=lambda r: (r.rps or 0.0, r.at_top))
    if not ordered:
        return MaxClean(None, False)
    return ordered[(len(ordered) - 1) // 2]
