"""The numbers a report shows, computed from a `Run` with `reports.stats`.

A *metric* turns one stack's repetitions into samples (one per repetition)
and a statistic over them, so the same bootstrap gives its value, its ratio
to a baseline stack and its ratio between two runs. Stacks are keyed by
their label (`Run.stacks`), so what-if variants are stacks of their own.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import pandas as pd

from harness.measure.checks import failure_rate
from reports import stats
from reports.load import ResultsError, Run
from reports.stats import POINT_FIELDS, Bound, Estimate, LevelPoint

BASELINES = ("envoy", "nodeproxy", "nomesh")
#: Max clean throughput of meta.json and of results.csv agree within this (req/s).
RECORDED_TOLERANCE_RPS = 0.5


@dataclass(frozen=True)
class Metric:
    """A per-stack quantity: how to sample it per repetition and summarise the samples.

    `lower_bound(run, stack)` says the statistic is only a lower bound there
    (a maximum clean throughput at the ladder's top rate).
    """

    key: str
    label: str
    unit: str
    samples: Callable[[Run, str, str], list[Any]]  # (run, stack, level) -> per-repetition
    stat: Callable[[Run], Callable[[Sequence[Any]], float | None]]  # run -> statistic
    lower_bound: Callable[[Run, str], bool] | None = None

    def bound(self, run: Run, stack: str) -> Bound:
        """ "≥" when the metric of `stack` is only a lower bound there, else "" (exact)."""
        return "≥" if self.lower_bound is not None and self.lower_bound(run, stack) else ""

    def estimate(self, run: Run, stack: str, level: str) -> Estimate:
        """The metric of `stack` at `level` with its bootstrap interval over repetitions."""
        stat = self.stat(run)
        e = stats.bootstrap([self.samples(run, stack, level)], lambda g: stat(g[0]))
        return _bounded(e, self.bound(run, stack))


def _bounded(e: Estimate, bound: Bound) -> Estimate:
    """`e` as a bound (no interval) when `bound` says it is one."""
    return Estimate(e.value, n=e.n, bound=bound) if bound and e.value is not None else e


def _column(name: str) -> Callable[[Run, str, str], list[float]]:
    def samples(run: Run, stack: str, level: str) -> list[float]:
        return run.at(stack, level)[name].dropna().tolist()

    return samples


def _median_stat(_run: Run) -> Callable[[Sequence[float]], float | None]:
    return stats.median


def open_loop_points(run: Run, stack: str) -> pd.DataFrame:
    """The open-loop levels (ladder and refinement) of `stack` as a points frame
    (`stats.POINT_FIELDS` and ``rep``).

    A level without a successful request has no achieved rate and no latency: it
    counts as achieving nothing at an infinite p99, an unclean point, so a
    repetition that collapsed still counts (0 clean throughput, its rate's median
    over repetitions judged with it) instead of dropping out in the stack's favour.
    """
    df = run.results
    rows = df[(df["stack"] == stack) & df["offered_rps"].notna()]
    rows = rows.fillna({"achieved_rps": 0.0, "p50_us": math.inf, "p99_us": math.inf})
    rates = [failure_rate(n, f) for n, f in zip(rows["requests"], rows["failures"], strict=True)]
    return rows.assign(error_rate=rates)[["rep", *POINT_FIELDS]]


def _max_clean_samples(run: Run, stack: str, _level: str = "") -> list[float]:
    """Each repetition's maximum clean throughput (the level is irrelevant)."""
    return stats.max_clean_per_rep(open_loop_points(run, stack), run.slo_p99_ms)


def _max_clean_at_top(run: Run, stack: str) -> bool:
    """meta.json's at_top when recorded, else whether the median is the ladder's top."""
    recorded = run.recorded_at_top(stack)
    if recorded is not None:
        return recorded
    samples = _max_clean_samples(run, stack)
    return bool(samples) and stats.at_top(stats.lower_median(samples), run.ladder_top)


P50 = Metric("p50_us", "p50 latency", "µs", _column("p50_us"), _median_stat)
P90 = Metric("p90_us", "p90 latency", "µs", _column("p90_us"), _median_stat)
P99 = Metric("p99_us", "p99 latency", "µs", _column("p99_us"), _median_stat)
P999 = Metric("p999_us", "p99.9 latency", "µs", _column("p999_us"), _median_stat)
THROUGHPUT = Metric(
    "max_clean_rps",
    "max clean throughput",
    "req/s",
    _max_clean_samples,
    lambda _run: stats.lower_median,
    _max_clean_at_top,
)
CPU_HOST = Metric(
    "cpu_host_ms_per_req", "host CPU", "ms/req", _column("cpu_host_ms_per_req"), _median_stat
)
CPU_OFFLOAD = Metric(
    "cpu_offload_ms_per_req",
    "offload CPU",
    "ms/req",
    _column("cpu_offload_ms_per_req"),
    _median_stat,
)


def _cross_share_samples(run: Run, stack: str, level: str) -> list[float]:
    """Per repetition, the share of the requests the stack carried that crossed nodes: its
    cross-node requests over every request a service received (the entry's and the calls)."""
    rows = run.at(stack, level)[["cross_node_per_req", "downstream_calls_per_req"]].dropna()
    return [
        cross / (1 + calls)
        for cross, calls in zip(
            rows["cross_node_per_req"], rows["downstream_calls_per_req"], strict=True
        )
    ]


CROSS_SHARE = Metric(
    "cross_node_share", "cross-node share", "of requests", _cross_share_samples, _median_stat
)

PERCENTILES = (P50, P90, P99, P999)
HEADLINE = (THROUGHPUT, P50, P99, CPU_HOST, CPU_OFFLOAD)


def ratio_of(metric: Metric, a: tuple[Run, str, str], b: tuple[Run, str, str]) -> Estimate:
    """metric(a) / metric(b), each given as (run, stack, level), with a bootstrap interval.

    A side that is only a lower bound makes the ratio a bound; both: undetermined.
    """
    bound = stats.ratio_bound(metric.bound(*a[:2]), metric.bound(*b[:2]))
    groups = [metric.samples(*a), metric.samples(*b)]
    if bound is None:
        return Estimate(None, n=min(len(g) for g in groups))
    stat_a, stat_b = metric.stat(a[0]), metric.stat(b[0])
    e = stats.bootstrap(groups, lambda g: stats.ratio(stat_a(g[0]), stat_b(g[1])))
    return _bounded(e, bound)


@dataclass
class StackSummary:
    """One stack of one run: headline estimates, ratios to baselines, open-loop curve."""

    label: str
    modes: str
    values: dict[str, Estimate]
    vs: dict[str, dict[str, Estimate]]  # baseline stack -> metric key -> ratio
    curve: list[LevelPoint]
    calls_per_req: float | None = None
    calls_source: str = "unknown"
    overhead_per_call: Estimate | None = None


@dataclass(frozen=True)
class HeadlineLevel:
    """The level the headline compares latency and CPU at, and why that one."""

    level: str
    why: str
    common_rate: float | None = None  # the common open-loop rate, when that is the level
    fallback: bool = False  # no common rate: a closed-loop (or lowest) level instead


@dataclass
class RunSummary:
    """A run with the level its headline uses and a summary per stack."""

    run: Run
    headline: HeadlineLevel
    stacks: dict[str, StackSummary] = field(default_factory=dict)

    @property
    def level(self) -> str:
        return self.headline.level

    @property
    def baselines(self) -> list[str]:
        return [b for b in BASELINES if b in self.stacks]


def headline_level(run: Run, requested: str | None = None) -> HeadlineLevel:
    """The level the headline compares at: `requested`, else the common rate, else a fallback.

    The common rate is the highest ladder rate (``open-<R>``) at which every
    stack's median point over repetitions is clean: the fastest load every
    stack carried within its SLO, so latency and CPU compare like with like.
    Without one: the closed-loop level with the most users every stack ran,
    else the lowest level every stack ran.
    """
    levels = run.levels()
    if requested is not None:
        if requested not in levels:
            raise ResultsError(f"level {requested!r} not in {run.label}: {', '.join(levels)}")
        return HeadlineLevel(requested, "the level asked for")
    stacks = run.stacks()
    ladder = run.ladder_levels()
    curves = [stats.median_curve(open_loop_points(run, s)) for s in stacks]
    rate = stats.common_rate(curves, ladder, run.slo_p99_ms)
    if rate is not None:
        why = (
            f"the common rate, {rate:g} req/s: the highest ladder rate at which every "
            "stack's median over repetitions was clean"
        )
        return HeadlineLevel(ladder[rate], why, common_rate=rate)
    common = [lv for lv in levels if all(not run.at(s, lv).empty for s in stacks)] or levels
    closed = [lv for lv in common if not run.is_open_loop(lv)]
    chosen, kind = (closed[-1], "closed-loop level") if closed else (common[0], "lowest level")
    why = f"no ladder rate was clean for every stack, so the {kind} every stack ran"
    return HeadlineLevel(chosen, why, fallback=True)


def summarize(run: Run, level: str | None = None) -> RunSummary:
    """Every estimate the report shows for `run` (headline at `level` or the default)."""
    out = RunSummary(run, headline_level(run, level))
    at = out.level
    modes = run.results.groupby("stack")["mode"].agg(lambda m: ", ".join(sorted(set(m))))
    for stack in run.stacks():
        out.stacks[stack] = StackSummary(
            label=stack,
            modes=modes[stack],
            values={
                m.key: m.estimate(run, stack, at)
                for m in dict.fromkeys((*PERCENTILES, *HEADLINE, CROSS_SHARE))
            },
            vs={},
            curve=stats.median_curve(open_loop_points(run, stack)),
        )
        _check_recorded_max(run, stack, out.stacks[stack].values[THROUGHPUT.key])
    for base in out.baselines:
        for stack, summary in out.stacks.items():
            if stack != base:
                summary.vs[base] = {
                    m.key: ratio_of(m, (run, stack, at), (run, base, at)) for m in HEADLINE
                }
    _add_overhead(out)
    return out


def _check_recorded_max(run: Run, stack: str, computed: Estimate) -> None:
    """A data problem when meta.json's max clean throughput differs from results.csv's."""
    record = run.meta.get("max_clean_throughput")
    entry = record.get(stack) if isinstance(record, dict) else None
    if not isinstance(entry, dict) or "rps" not in entry:
        return
    recorded = entry["rps"] or 0.0
    value = computed.value or 0.0
    if not isinstance(recorded, int | float) or abs(recorded - value) > RECORDED_TOLERANCE_RPS:
        run.problem(
            f"max clean throughput of {stack}: meta.json records {entry['rps']!r} req/s,"
            f" results.csv gives {value:g} req/s (the report shows the latter)"
        )


def _add_overhead(summary: RunSummary) -> None:
    """Mesh overhead per downstream call, (p50 - nomesh p50) / calls per request."""
    run, at = summary.run, summary.level
    if "nomesh" not in summary.stacks:
        return
    base = P50.samples(run, "nomesh", at)
    meta_calls = run.config_number("downstream_calls_per_req")
    for label, stack in summary.stacks.items():
        if label == "nomesh":
            continue
        column = run.at(label, at)["downstream_calls_per_req"].dropna().tolist()
        if column:
            stack.calls_per_req, stack.calls_source = stats.median(column), "results.csv"
        elif meta_calls is not None:
            stack.calls_per_req, stack.calls_source = meta_calls, "meta.json config"
        if stack.calls_per_req:
            stack.overhead_per_call = stats.overhead_per_call(
                P50.samples(run, label, at), base, stack.calls_per_req
            )


def difference_of(metric: Metric, a: tuple[Run, str, str], b: tuple[Run, str, str]) -> Estimate:
    """metric(a) - metric(b), each given as (run, stack, level), with a bootstrap interval
    (each side's repetitions resampled on their own); undetermined for a bound."""
    if metric.bound(*a[:2]) or metric.bound(*b[:2]):
        return Estimate(None, n=0)
    stat_a, stat_b = metric.stat(a[0]), metric.stat(b[0])

    def difference(groups: Sequence[Sequence[Any]]) -> float | None:
        one, two = stat_a(groups[0]), stat_b(groups[1])
        return None if one is None or two is None else one - two

    return stats.bootstrap([metric.samples(*a), metric.samples(*b)], difference)


#: What a comparison of runs with different node counts shows as differences.
LATENCY_DIFFERENCES = (P50, P99)


def compare_latency(base: RunSummary, other: RunSummary) -> dict[str, dict[str, Estimate]]:
    """Per stack present in both runs: other's p50 and p99 minus base's, in µs."""
    return _compare(base, other, LATENCY_DIFFERENCES, difference_of)


def compare_runs(base: RunSummary, other: RunSummary) -> dict[str, dict[str, Estimate]]:
    """Per stack present in both runs and headline metric: other / base, with intervals."""
    return _compare(base, other, HEADLINE, ratio_of)


def _compare(
    base: RunSummary,
    other: RunSummary,
    metrics: Sequence[Metric],
    how: Callable[[Metric, tuple[Run, str, str], tuple[Run, str, str]], Estimate],
) -> dict[str, dict[str, Estimate]]:
    return {
        stack: {
            m.key: how(m, (other.run, stack, other.level), (base.run, stack, base.level))
            for m in metrics
        }
        for stack in other.stacks
        if stack in base.stacks
    }
