"""Self-checks of one measured level (DESIGN §5: "every run checks itself").

Each function judges one property and returns a `Check`; the runner records
every check in meta.json and marks the results row (`checks_ok`, `checks`).
A failed check never stops a run or hides its numbers: the row is written
and flagged. *Info* checks record findings that are results, not faults
(an open-loop rate a stack could not sustain); they never flip `checks_ok`.

* `loadgen_ran`: Locust exited normally and wrote its histograms.
* `counts_match`: the stack counted as many entry requests as Locust sent,
  up to the requests in flight when Locust stopped: completed - connection
  failures - slack <= stack <= started + slack (`COUNT_SLACK` covers a
  counter read racing a request).
* `error_rate`: failures / requests <= 0.1 %.
* `loadgen_cpu`: the load generator used < 80 % of a core per process over
  the window; a saturated generator sends late and inflates latency.
* `mesh_crossed`: every service the workmodel calls often enough to be
  certain (expected >= `MIN_EXPECTED_CALLS` calls over the level) received
  calls, counted by the mesh itself: Envoy sidecars' inbound listeners, a
  node proxy's cluster of each app (nodeproxy), the DPUmesh bridge's
  per-service counters, the apps' own counters for nomesh.
* `open_loop_delivery` (info): achieved / offered >= 0.98.
* `placement`: every process and thread of the stack has exactly its CPU set's
  CPUs, and the DPU daemons the dpu set's CPU bandwidth, as read back from the
  kernel after the level (`harness.placement.apply.Placement.verify`).
* `no_restarts`: no component of the stack was restarted during the window
  (`RunningStack.restarts()` before and after it): a restart means the level
  measured a recovery, not the stack, and its counters started over.

`is_clean` is DESIGN §5's clean level, the one rule the ladder climbs by and the
report judges by (`reports` imports it from here: `harness` never imports `reports`).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

MAX_ERROR_RATE = 0.001
MIN_DELIVERY = 0.98
MAX_LOADGEN_CORE = 0.8
COUNT_SLACK = 2
# Poisson: P(no call | 10 expected) = e^-10, so a zero count is a fault, not bad luck.
MIN_EXPECTED_CALLS = 10.0


@dataclass(frozen=True)
class Check:
    """One verdict; `info` checks are findings and never fail a row."""

    name: str
    ok: bool
    detail: str
    info: bool = False

    def record(self, mesh: str, rep: int, level: str) -> dict[str, Any]:
        """The meta.json entry."""
        return {
            "mesh": mesh,
            "rep": rep,
            "level": level,
            "name": self.name,
            "ok": self.ok,
            "detail": self.detail,
            "info": self.info,
        }


def failure_rate(requests: int, failures: int) -> float:
    """failures / requests; 1 (as bad as it gets) for a level without a request."""
    return failures / requests if requests > 0 else 1.0


def is_clean(
    offered_rps: float,
    achieved_rps: float,
    error_rate: float,
    p99_us: float,
    slo_p99_ms: float | None,
    checks_ok: bool,
) -> bool:
    """DESIGN §5's clean level: achieved/offered >= 0.98, `error_rate` (`failure_rate`) <=
    0.1 %, p99 <= the SLO, and its self-checks passed. No SLO: latency is not judged."""
    return (
        checks_ok
        and offered_rps > 0
        and achieved_rps / offered_rps >= MIN_DELIVERY
        and error_rate <= MAX_ERROR_RATE
        and (slo_p99_ms is None or p99_us <= slo_p99_ms * 1000)
    )


def verdict(checks: Iterable[Check]) -> tuple[bool, list[str]]:
    """(all non-info checks passed, names of the failed non-info checks)."""
    failed = [c.name for c in checks if not c.ok and not c.info]
    return not failed, failed


def loadgen_ran(returncode: int | None, histogram_files: int) -> Check:
    ok = returncode == 0 and histogram_files > 0
    return Check(
        "loadgen_ran", ok, f"Locust exit status {returncode}, {histogram_files} histogram file(s)"
    )


def counts_match(sidecar: Mapping[str, Any], stack_requests: int) -> Check:
    """Locust's started/completed totals (warm-up included) vs the stack's entry count."""
    started = int(sidecar.get("started_total", 0))
    completed = int(sidecar.get("completed_total", 0))
    unreached = int(sidecar.get("failures_connection", 0))
    low = completed - unreached - COUNT_SLACK
    high = started + COUNT_SLACK
    ok = low <= stack_requests <= high
    return Check(
        "counts_match",
        ok,
        f"stack counted {stack_requests}; Locust completed {completed} "
        f"({unreached} never reached it), started {started}",
    )


def error_rate(requests: int, failures: int, *, info: bool = False) -> Check:
    rate = failure_rate(requests, failures)
    return Check(
        "error_rate",
        rate <= MAX_ERROR_RATE,
        f"{failures} failures / {requests} requests = {rate:.3%} (limit {MAX_ERROR_RATE:.1%})",
        info=info,
    )


def loadgen_cpu(cpu_s: float, window_s: float, processes: int) -> Check:
    share = cpu_s / window_s / processes if window_s > 0 else 0.0
    return Check(
        "loadgen_cpu",
        share < MAX_LOADGEN_CORE,
        f"{share:.0%} of a core per load-generator process ({processes}; "
        f"limit {MAX_LOADGEN_CORE:.0%})",
    )


def observed_calls(traffic: Mapping[str, Any], entry: str) -> dict[str, int]:
    """Calls into each service (entry requests taken out of the entry service's count)."""
    per_service = dict(traffic["per_service"])
    per_service[entry] = per_service.get(entry, 0) - traffic["entry_requests"]
    return per_service


def mesh_crossed(
    traffic: Mapping[str, Any], entry: str, expected_per_request: Mapping[str, float]
) -> Check:
    """Every service that must have been called was called, by the mesh's own counters."""
    seen = observed_calls(traffic, entry)
    entries = traffic["entry_requests"]
    required = [svc for svc, e in expected_per_request.items() if e * entries >= MIN_EXPECTED_CALLS]
    missing = [svc for svc in required if seen.get(svc, 0) <= 0]
    counts = ", ".join(f"{svc}={seen.get(svc, 0)}" for svc in sorted(seen))
    if not required:
        return Check("mesh_crossed", True, f"no service expected >= {MIN_EXPECTED_CALLS:g} calls")
    detail = f"calls per service: {counts} for {entries} entry requests"
    if missing:
        detail = f"no calls reached {', '.join(missing)}; {detail}"
    return Check("mesh_crossed", not missing, detail)


def open_loop_delivery(offered_rps: float, achieved_rps: float) -> Check:
    ratio = achieved_rps / offered_rps if offered_rps > 0 else 0.0
    return Check(
        "open_loop_delivery",
        ratio >= MIN_DELIVERY,
        f"achieved {achieved_rps:.1f} of {offered_rps:g} req/s offered ({ratio:.1%}; "
        f"sustained if >= {MIN_DELIVERY:.0%})",
        info=True,
    )


def placement(mismatches: list[str], layout: str) -> Check:
    """The CPU layout and DPU bandwidth in force match the run's (`layout` as text)."""
    if not mismatches:
        return Check("placement", True, f"every process on its CPU set ({layout})")
    more = f" (+{len(mismatches) - 1} more)" if len(mismatches) > 1 else ""
    return Check("placement", False, f"{mismatches[0]}{more}")


def no_restarts(before: Mapping[str, int], after: Mapping[str, int]) -> Check:
    """No component restarted between two `RunningStack.restarts()` readings."""
    restarted = {
        name: count - before.get(name, 0)
        for name, count in after.items()
        if count > before.get(name, 0)
    }
    if not restarted:
        return Check("no_restarts", True, f"no restart of {len(after)} component(s)")
    named = ", ".join(f"{name} ({n}x)" for name, n in sorted(restarted.items()))
    return Check("no_restarts", False, f"restarted during the window: {named}")
