"""The numbers a report shows, computed from a `Run` with `reports.stats`.

A *metric* turns one stack's repetitions into samples (one per repetition)
and a statistic over them, so the same bootstrap gives its value, its ratio
to a baseline stack and its ratio between two runs.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from reports import stats
from reports.load import ResultRow, ResultsError, Run
from reports.stats import Estimate, LevelPoint

BASELINES = ("envoy", "nomesh")


@dataclass(frozen=True)
class Metric:
    """A per-stack quantity: how to sample it per repetition and summarise the samples."""

    key: str
    label: str
    unit: str
    samples: Callable[[Run, str, str], list[Any]]  # (run, mesh, level) -> per-repetition
    stat: Callable[[Run], Callable[[Sequence[Any]], float | None]]  # run -> statistic

    def estimate(self, run: Run, mesh: str, level: str) -> Estimate:
        """The metric of `mesh` at `level` with its bootstrap interval over repetitions."""
        stat = self.stat(run)
        return stats.bootstrap([self.samples(run, mesh, level)], lambda g: stat(g[0]))


def _column(name: str) -> Callable[[Run, str, str], list[float]]:
    def samples(run: Run, mesh: str, level: str) -> list[float]:
        values = (getattr(r, name) for r in run.rows_at(mesh, level))
        return [v for v in values if v is not None]

    return samples


def _median_stat(_run: Run) -> Callable[[Sequence[float]], float | None]:
    return stats.median


def level_point(row: ResultRow) -> LevelPoint | None:
    """An open-loop row as a `LevelPoint`; None for closed loop or missing numbers."""
    offered, achieved, p50, p99 = row.offered_rps, row.achieved_rps, row.p50_us, row.p99_us
    if offered is None or achieved is None or p50 is None or p99 is None:
        return None
    error_rate = row.failures / row.requests if row.requests else 1.0
    return LevelPoint(offered, achieved, error_rate, p50, p99)


def open_loop_reps(run: Run, mesh: str, _level: str = "") -> list[list[LevelPoint]]:
    """Per repetition, the open-loop level points of `mesh` (the level is irrelevant)."""
    reps: dict[int, list[LevelPoint]] = {}
    for row in run.rows:
        point = level_point(row) if row.mesh == mesh else None
        if point is not None:
            reps.setdefault(row.rep, []).append(point)
    return [reps[k] for k in sorted(reps)]


def _throughput_stat(run: Run) -> Callable[[Sequence[Sequence[LevelPoint]]], float | None]:
    slo = run.slo_p99_ms
    return lambda reps: stats.max_clean_throughput(reps, slo)


P50 = Metric("p50_us", "p50 latency", "µs", _column("p50_us"), _median_stat)
P90 = Metric("p90_us", "p90 latency", "µs", _column("p90_us"), _median_stat)
P99 = Metric("p99_us", "p99 latency", "µs", _column("p99_us"), _median_stat)
P999 = Metric("p999_us", "p99.9 latency", "µs", _column("p999_us"), _median_stat)
THROUGHPUT = Metric(
    "max_clean_rps", "max clean throughput", "req/s", open_loop_reps, _throughput_stat
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

PERCENTILES = (P50, P90, P99, P999)
HEADLINE = (P50, P99, THROUGHPUT, CPU_HOST, CPU_OFFLOAD)


def ratio_of(metric: Metric, a: tuple[Run, str, str], b: tuple[Run, str, str]) -> Estimate:
    """metric(a) / metric(b), each given as (run, mesh, level), with a bootstrap interval."""
    stat_a, stat_b = metric.stat(a[0]), metric.stat(b[0])
    return stats.bootstrap(
        [metric.samples(*a), metric.samples(*b)],
        lambda g: stats.ratio(stat_a(g[0]), stat_b(g[1])),
    )


@dataclass
class StackSummary:
    """One stack of one run: headline estimates, ratios to baselines, open-loop curve."""

    mesh: str
    modes: str
    values: dict[str, Estimate]
    vs: dict[str, dict[str, Estimate]]  # baseline mesh -> metric key -> ratio
    curve: list[LevelPoint]
    knee: LevelPoint | None
    calls_per_req: float | None = None
    calls_source: str = "unknown"
    overhead_per_call: Estimate | None = None


@dataclass
class RunSummary:
    """A run with the level its headline uses and a summary per stack."""

    run: Run
    level: str
    stacks: dict[str, StackSummary] = field(default_factory=dict)

    @property
    def baselines(self) -> list[str]:
        return [b for b in BASELINES if b in self.stacks]


def headline_level(run: Run, requested: str | None = None) -> str:
    """The level the headline compares at: `requested`, else a level every stack ran.

    Preference: the closed-loop level with the most users (DESIGN's headline
    is closed loop), else the lowest open-loop rate (every stack should be
    below saturation there, so latencies compare like with like).
    """
    levels = run.levels()
    if requested is not None:
        if requested not in levels:
            raise ResultsError(f"level {requested!r} not in {run.label}: {', '.join(levels)}")
        return requested
    meshes = run.meshes()
    common = [lv for lv in levels if all(run.rows_at(m, lv) for m in meshes)] or levels
    closed = [lv for lv in common if not run.is_open_loop(lv)]
    return closed[-1] if closed else common[0]


def summarize(run: Run, level: str | None = None) -> RunSummary:
    """Every estimate the report shows for `run` (headline at `level` or the default)."""
    out = RunSummary(run, headline_level(run, level))
    at = out.level
    for mesh in run.meshes():
        curve = stats.median_curve(open_loop_reps(run, mesh))
        out.stacks[mesh] = StackSummary(
            mesh=mesh,
            modes=", ".join(sorted({r.mode for r in run.rows if r.mesh == mesh})),
            values={
                m.key: m.estimate(run, mesh, at) for m in dict.fromkeys((*PERCENTILES, *HEADLINE))
            },
            vs={},
            curve=curve,
            knee=stats.knee(curve, run.slo_p99_ms),
        )
    for base in out.baselines:
        for mesh, stack in out.stacks.items():
            if mesh != base:
                stack.vs[base] = {
                    m.key: ratio_of(m, (run, mesh, at), (run, base, at)) for m in HEADLINE
                }
    _add_overhead(out)
    return out


def _add_overhead(summary: RunSummary) -> None:
    """Mesh overhead per downstream call, (p50 - nomesh p50) / calls per request."""
    run, at = summary.run, summary.level
    if "nomesh" not in summary.stacks:
        return
    base = P50.samples(run, "nomesh", at)
    meta_calls = run.config_number("downstream_calls_per_req")
    for mesh, stack in summary.stacks.items():
        if mesh == "nomesh":
            continue
        column = [
            r.downstream_calls_per_req
            for r in run.rows_at(mesh, at)
            if r.downstream_calls_per_req is not None
        ]
        if column:
            stack.calls_per_req, stack.calls_source = stats.median(column), "results.csv"
        elif meta_calls is not None:
            stack.calls_per_req, stack.calls_source = meta_calls, "meta.json config"
        if stack.calls_per_req:
            stack.overhead_per_call = stats.overhead_per_call(
                P50.samples(run, mesh, at), base, stack.calls_per_req
            )


def compare_runs(base: RunSummary, other: RunSummary) -> dict[str, dict[str, Estimate]]:
    """Per stack present in both runs and headline metric: other / base, with intervals."""
    return {
        mesh: {
            m.key: ratio_of(m, (other.run, mesh, other.level), (base.run, mesh, base.level))
            for m in HEADLINE
        }
        for mesh in other.stacks
        if mesh in base.stacks
    }
