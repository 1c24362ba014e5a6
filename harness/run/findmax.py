"""Search for a stack's maximum clean throughput (DESIGN §5).

A rate is *clean* when achieved/offered >= 0.98, failures <= 0.1 % of
requests and p99 <= the SLO. The search doubles the offered rate from a
start value until a rate is not clean (or halves it until one is), then
bisects between the highest clean and the lowest unclean rate, in at most
`max_steps` probes; rates are whole requests/s and the bisection stops when
the bracket is within 5 % (or 1 req/s). Clean-ness is assumed monotonic in
the rate, as every search of this kind does; the probes are all reported,
so a non-monotonic stack shows.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from harness.measure.checks import MAX_ERROR_RATE, MIN_DELIVERY

BRACKET = 0.05


def is_clean(
    offered_rps: float,
    achieved_rps: float,
    requests: int,
    failures: int,
    p99_us: float,
    slo_p99_ms: float,
) -> bool:
    return (
        requests > 0
        and achieved_rps / offered_rps >= MIN_DELIVERY
        and failures / requests <= MAX_ERROR_RATE
        and p99_us <= slo_p99_ms * 1000
    )


@dataclass
class MaxSearch:
    """Feed it results one probe at a time: `next_rate()`, probe, `record(rate, clean)`."""

    start: float
    max_steps: int
    best: float | None = None  # highest clean rate so far
    worst: float | None = None  # lowest unclean rate so far
    probes: list[tuple[float, bool]] = field(default_factory=list)

    def next_rate(self) -> float | None:
        """The rate to probe next, or None when the search is over."""
        if len(self.probes) >= self.max_steps:
            return None
        if not self.probes:
            return float(max(1, round(self.start)))
        if self.worst is None:
            rate = 2 * (self.best or 0)
        elif self.best is None:
            rate = self.worst / 2
            if rate < 1:
                return None
        else:
            if self.worst - self.best <= max(1.0, BRACKET * self.best):
                return None
            rate = (self.best + self.worst) / 2
        rate = float(max(1, round(rate)))
        return None if any(rate == r for r, _ in self.probes) else rate

    def record(self, rate: float, clean: bool) -> None:
        self.probes.append((rate, clean))
        if clean:
            self.best = rate if self.best is None else max(self.best, rate)
        else:
            self.worst = rate if self.worst is None else min(self.worst, rate)
