"""A what-if sweep's sensitivity: dpumesh's advantage over a baseline against one DPU parameter.

A what-if run (meta.json ``whatif``) measures dpumesh at several values of one
DPU model parameter, each value its own stack (``dpumesh@dpu_speed=0.5``),
beside the baselines. For every variant three ratios are formed so that
**> 1 always means dpumesh is better**:

* throughput: dpumesh max clean throughput / baseline max clean throughput;
* p99: baseline p99 / dpumesh p99 at the headline level (the common rate);
* host CPU: baseline host CPU per request / dpumesh host CPU per request, same level.

The throughput ratio's *break-even* is where it crosses 1: linear
interpolation between adjacent swept values (`break_even`).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass

from harness.output.schema import DPU_MODEL
from reports.stats import Estimate
from reports.summary import CPU_HOST, P99, THROUGHPUT, Metric, RunSummary, ratio_of

#: Baselines in order of preference: dpumesh is compared with the first one in the run.
BASELINE_PREFERENCE = ("envoy", "nodeproxy", "nomesh")
#: (metric, key, label, dpumesh is the numerator): each advantage, oriented so > 1 is better.
ADVANTAGES: tuple[tuple[Metric, str, str, bool], ...] = (
    (THROUGHPUT, "throughput", "max clean throughput: dpumesh / {base}", True),
    (P99, "p99", "p99: {base} / dpumesh", False),
    (CPU_HOST, "cpu_host", "host CPU per request: {base} / dpumesh", False),
)
#: The parameters a sweep may vary that every results.csv row carries (the DPU model's numbers).
SWEPT_COLUMNS = tuple(c.name for c in DPU_MODEL if c.kind is not str)
#: A log x axis only for a sweep spanning more than this factor.
LOG_SPAN = 10.0


@dataclass(frozen=True)
class BreakEven:
    """Where a ratio crosses 1 over the swept values, and whether it is above 1 everywhere."""

    crossings: tuple[float, ...]  # parameter values where the ratio is 1 (interpolated)
    always: bool  # > 1 at every value: dpumesh better over the whole range
    never: bool  # < 1 at every value: dpumesh never better in range


def break_even(points: Sequence[tuple[float, float]]) -> BreakEven:
    """The break-even of (parameter value, ratio) points, by linear interpolation.

    A point exactly at 1 is a crossing at its own value (also at an end of the range).
    """
    ordered = sorted(points)
    crossings: list[float] = [x for x, r in ordered if r == 1]
    for (x0, r0), (x1, r1) in itertools.pairwise(ordered):
        if (r0 - 1) * (r1 - 1) < 0:
            crossings.append(x0 + (1 - r0) * (x1 - x0) / (r1 - r0))
    return BreakEven(
        crossings=tuple(sorted(crossings)),
        always=bool(ordered) and all(r > 1 for _, r in ordered),
        never=bool(ordered) and all(r < 1 for _, r in ordered),
    )


def verdict(be: BreakEven, param: str, baseline: str) -> str:
    """The sentence the report prints about a break-even (plain text)."""
    if be.always:
        return f"dpumesh beats {baseline} over the whole range of {param}"
    if be.never:
        return f"dpumesh never beats {baseline} in the range of {param}"
    if not be.crossings:
        return f"no break-even against {baseline}: too few defined ratios"
    where = " and ".join(f"{x:.3g}" for x in be.crossings)
    return f"dpumesh stops beating {baseline} at {param} ≈ {where}"


def log_axis(values: Sequence[float]) -> bool:
    """A log x axis: every value positive and the sweep spanning more than `LOG_SPAN`."""
    return bool(values) and min(values) > 0 and max(values) / min(values) > LOG_SPAN


@dataclass(frozen=True)
class Variant:
    """One swept value: dpumesh's advantages over the baseline (> 1: dpumesh better)."""

    label: str
    value: float
    advantages: dict[str, Estimate]  # ADVANTAGES key -> ratio
    unmet: tuple[str, ...] = ()  # model lines this machine could not give


@dataclass(frozen=True)
class Sensitivity:
    """The sweep of one run against one baseline, at the run's headline level."""

    param: str
    baseline: str
    level: str
    variants: list[Variant]
    break_even: BreakEven

    @property
    def log_x(self) -> bool:
        return log_axis([v.value for v in self.variants])

    def label(self, key: str) -> str:
        """The axis/legend label of one advantage."""
        return next(lab for _, k, lab, _ in ADVANTAGES if k == key).format(base=self.baseline)


def baseline_of(summary: RunSummary) -> str | None:
    """The stack dpumesh is compared with: envoy when it ran, else nomesh, else None."""
    return next((b for b in BASELINE_PREFERENCE if b in summary.stacks), None)


def sensitivity(summary: RunSummary) -> Sensitivity | None:
    """The what-if sensitivity of `summary`'s run; None for a run that is not a sweep.

    A variant's value comes from meta.json ``whatif.values``; results.csv rows
    of that variant carrying a different value for the parameter are a data problem.
    """
    run, at = summary.run, summary.level
    record = run.whatif
    base = baseline_of(summary)
    if record is None or base is None:
        return None
    param = str(record.get("param", "value"))
    values = record.get("values") if isinstance(record.get("values"), dict) else {}
    models = record.get("models") if isinstance(record.get("models"), dict) else {}
    base_model = run.meta.get("dpu_model")
    shared_unmet = set(base_model.get("unmet", [])) if isinstance(base_model, dict) else set()
    variants = []
    for label, value in values.items():
        if label not in summary.stacks or not isinstance(value, int | float):
            continue
        _check_rows(summary, label, param, float(value))
        dpumesh, baseline = (run, label, at), (run, base, at)
        advantages = {
            key: ratio_of(metric, dpumesh, baseline) if up else ratio_of(metric, baseline, dpumesh)
            for metric, key, _, up in ADVANTAGES
        }
        model = models.get(label)
        unmet = model.get("unmet", []) if isinstance(model, dict) else []
        # What the run's own model already could not give is stated in its headline; a
        # variant is marked for what its value adds (e.g. a speed above 1x).
        own = [str(u) for u in unmet if u not in shared_unmet]
        variants.append(Variant(label, float(value), advantages, tuple(own)))
    variants.sort(key=lambda v: v.value)
    # A value this machine could not give ran as the nearest one it could (a speed above 1x
    # as 1x): a crossing there would be noise, so those values do not place the break-even.
    points = [
        (v.value, e.value)
        for v in variants
        if not v.unmet and (e := v.advantages["throughput"]).value is not None
    ]
    return Sensitivity(param, base, at, variants, break_even(points))


def _check_rows(summary: RunSummary, label: str, param: str, value: float) -> None:
    """Every row of a variant must carry the variant's value of the swept parameter."""
    results = summary.run.results
    if param not in SWEPT_COLUMNS:
        return
    seen = set(results.loc[results["stack"] == label, param].dropna().tolist())
    if any(not math.isclose(v, value) for v in seen):
        shown = ", ".join(f"{v:g}" for v in sorted(seen))
        summary.run.problem(
            f"{label}: results.csv has {param} = {shown}, meta.json whatif says {value:g}"
        )
