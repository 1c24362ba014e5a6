"""Statistics over repetitions: medians, bootstrap confidence intervals, clean throughput.

Every headline number is the **median over repetitions** of a per-repetition
value (e.g. each repetition's p99 at one load level). Its 95 % confidence
interval is a **percentile bootstrap over repetitions**: draw the repetitions
with replacement (as many as there are), recompute the statistic, repeat
`RESAMPLES` times, and take the 2.5th and 97.5th percentiles of the results.
Why bootstrap rather than a Student-t interval:

* it needs no normality assumption about per-repetition latencies, and it is
  an interval for the median (the reported value), not for the mean;
* the same procedure gives intervals for ratios (stack / baseline, run B /
  run A: the two sides are resampled independently), differences (mesh
  overhead) and derived statistics such as the maximum clean throughput.

The generator is seeded, so a report is reproducible byte for byte. With few
repetitions the interval approaches the min..max of the repetitions and
under-covers (with 2 it *is* that range); the report prints n next to every
interval. One repetition gives no interval. When the statistic is undefined
in any resample (e.g. a ratio to zero), no interval is given.

Maximum clean throughput (DESIGN §5): per repetition, the highest offered
rate whose achieved/offered >= 0.98, failures/requests <= 0.001, p99 <= the
SLO and whose self-checks passed (`harness.measure.checks.is_clean`, the rule
the harness climbs by, so the report and meta.json agree); 0 when no rate was
clean. The statistic is the median of those per-repetition values. A maximum
at the ladder's top rate is only a lower bound ("≥"): the ladder did not reach
that stack's knee. Repetitions are grouped with pandas (a *points frame*:
`POINT_FIELDS` and ``rep``); the bootstrap resamples plain lists.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, fields
from typing import Literal, TypeVar

import pandas as pd

from harness.measure import checks

CONFIDENCE = 0.95
RESAMPLES = 2000
SEED = 20_240_601


T = TypeVar("T")


#: How an estimate relates to the true value: "" exact, "≥" a lower bound, "≤" an upper bound.
Bound = Literal["", "≥", "≤"]


@dataclass(frozen=True)
class Estimate:
    """A statistic over `n` repetitions with its 95 % interval (None when not estimable).

    A bounded estimate (`bound` "≥" or "≤") has no interval: resampling a
    censored value says nothing about where the true value lies.
    """

    value: float | None
    low: float | None = None
    high: float | None = None
    n: int = 0
    bound: Bound = ""

    @property
    def has_ci(self) -> bool:
        return self.low is not None and self.high is not None


def lower_median(values: Iterable[float]) -> float:
    """The middle value, the lower of the two middle ones for an even count: a value that was
    measured (the maximum clean throughput is a rate that was offered)."""
    ordered = sorted(values)
    if not ordered:
        raise ValueError("median of no values")
    return ordered[(len(ordered) - 1) // 2]


def median(values: Iterable[float]) -> float:
    """The median (mean of the middle two for an even count); ValueError when empty."""
    ordered = sorted(values)
    if not ordered:
        raise ValueError("median of no values")
    mid = len(ordered) // 2
    if len(ordered) % 2:
        return ordered[mid]
    return (ordered[mid - 1] + ordered[mid]) / 2


def quantile(ordered: Sequence[float], q: float) -> float:
    """The `q` quantile of sorted `ordered`, linear interpolation between order statistics."""
    if not ordered:
        raise ValueError("quantile of no values")
    pos = q * (len(ordered) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def bootstrap(
    groups: Sequence[Sequence[T]],
    stat: Callable[[Sequence[Sequence[T]]], float | None],
    *,
    resamples: int = RESAMPLES,
    confidence: float = CONFIDENCE,
    seed: int = SEED,
) -> Estimate:
    """`stat(groups)` with a percentile-bootstrap interval, each group resampled on its own.

    A group is one stack's (or run's) per-repetition samples; `stat` gets the
    resampled groups in the same order and may return None (undefined).
    """
    n = min((len(g) for g in groups), default=0)
    value = stat(groups) if n else None
    if value is None or n < 2:
        return Estimate(value, n=n)
    rng = random.Random(seed)
    draws: list[float] = []
    for _ in range(resamples):
        drawn = stat([[g[rng.randrange(len(g))] for _ in g] for g in groups])
        if drawn is None:
            return Estimate(value, n=n)
        draws.append(drawn)
    draws.sort()
    tail = (1 - confidence) / 2
    return Estimate(value, quantile(draws, tail), quantile(draws, 1 - tail), n)


def ratio(a: float | None, b: float | None) -> float | None:
    """a / b, undefined (None) when a side is missing or b is zero.

    A zero numerator is a ratio of 0 (e.g. no clean rate against a baseline's maximum).
    """
    if a is None or not b:
        return None
    return a / b


def ratio_bound(a: Bound, b: Bound) -> Bound | None:
    """The bound of a / b from its sides' bounds; None when it is undetermined (both "≥")."""
    if a and b:
        return a if a != b else None
    flip: dict[Bound, Bound] = {"": "", "≥": "≤", "≤": "≥"}
    return a or flip[b]


def overhead_per_call(stack: Sequence[float], base: Sequence[float], calls: float) -> Estimate:
    """(median(stack) - median(base)) / calls: mesh overhead per downstream call."""
    if not stack or not base or calls <= 0:
        return Estimate(None)
    return bootstrap([stack, base], lambda g: (median(g[0]) - median(g[1])) / calls)


# --- load levels and maximum clean throughput ---------------------------------------


@dataclass(frozen=True)
class LevelPoint:
    """One open-loop load level: offered and achieved rate, error rate, latency (µs), checks."""

    offered_rps: float
    achieved_rps: float
    error_rate: float
    p50_us: float
    p99_us: float
    checks_ok: bool = True

    def clean(self, slo_p99_ms: float | None) -> bool:
        """DESIGN §5's clean level (`harness.measure.checks.is_clean`); no SLO: latency is
        not judged."""
        return checks.is_clean(
            self.offered_rps,
            self.achieved_rps,
            self.error_rate,
            self.p99_us,
            slo_p99_ms,
            self.checks_ok,
        )


#: A *points frame* has these columns: the fields of a `LevelPoint` and, per
#: repetition, ``rep`` (`reports.summary.open_loop_points`).
POINT_FIELDS = tuple(f.name for f in fields(LevelPoint))


def level_points(points: pd.DataFrame) -> list[LevelPoint]:
    """The rows of a points frame as `LevelPoint`s, in order."""
    return [
        LevelPoint(float(o), float(a), float(e), float(p50), float(p99), bool(ok))
        for o, a, e, p50, p99, ok in points[list(POINT_FIELDS)].itertuples(index=False)
    ]


def median_curve(points: pd.DataFrame) -> list[LevelPoint]:
    """Per offered rate, the median over repetitions of every field of a points frame.

    The median point passed its self-checks when more than half of its repetitions did.
    """
    by_rate = points.groupby("offered_rps", sort=True)
    medians = by_rate[["achieved_rps", "error_rate", "p50_us", "p99_us"]].median()
    medians["checks_ok"] = by_rate["checks_ok"].mean() > 0.5
    return level_points(medians.reset_index())


def max_clean_per_rep(points: pd.DataFrame, slo_p99_ms: float | None) -> list[float]:
    """Each repetition's highest clean offered rate (a points frame); 0.0 for one with none.

    Zero (rather than None) keeps the median defined in every bootstrap
    resample; the report prints a median of zero as "n/a".
    """
    clean = points.loc[[p.clean(slo_p99_ms) for p in level_points(points)]]
    best = clean.groupby("rep")["offered_rps"].max()
    return [float(best.get(rep, 0.0)) for rep in sorted(points["rep"].unique())]


def at_top(max_clean: float | None, top: float | None) -> bool:
    """Whether a maximum clean throughput is the ladder's top rate, hence only a lower bound."""
    return bool(max_clean and top and max_clean >= top)


def common_rate(
    curves: Iterable[Sequence[LevelPoint]], rates: Iterable[float], slo_p99_ms: float | None
) -> float | None:
    """The highest of `rates` at which every curve has a clean point; None when there is none.

    `rates` are the ladder's (every stack was offered them, as far as its
    climb went); a stack without a point at a rate stopped below it.
    """
    clean = [{p.offered_rps for p in curve if p.clean(slo_p99_ms)} for curve in curves]
    return max((r for r in rates if clean and all(r in c for c in clean)), default=None)
