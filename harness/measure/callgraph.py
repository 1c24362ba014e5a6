"""Expected calls into each service per entry request, from the workmodel or the trace.

The runner needs them twice: `downstream_calls_per_req` (meta.json, and the
report's "overhead per call") and the self-check that traffic really crossed
the mesh (a service expected to be called must have been called).

Stochastic GET (DESIGN §4): a group of n services with `seq_len` s calls each
service with probability min(s, n)/n times its `probabilities` entry
(default 1), and every call a service receives makes its own calls, so
E[calls into c] = sum over callers of P(call) x (1 + ...) recursively.
Trace-driven POST: exactly the callees written in the trace.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from mubench.cell import TRACE_KEY_ESCAPE
from mubench.workmodel import Workmodel


class CycleError(ValueError):
    """The workmodel's services call each other in a cycle: the expectation is unbounded."""


def stochastic_calls(workmodel: Workmodel, entry: str) -> dict[str, float]:
    """Expected calls into each service (entry excluded unless called) per entry request."""
    calls: dict[str, float] = dict.fromkeys(workmodel, 0.0)

    def visit(service: str, weight: float, path: tuple[str, ...]) -> None:
        if service in path:
            raise CycleError(f"call cycle: {' -> '.join((*path, service))}")
        for group in workmodel[service].behavior.groups:
            if not group.services:
                continue
            chosen = min(group.seq_len, len(group.services)) / len(group.services)
            for callee in group.services:
                p = weight * chosen * group.probabilities.get(callee, 1.0)
                if p > 0:
                    calls[callee] += p
                    visit(callee, p, (*path, service))

    visit(entry, 1.0, ())
    return calls


def trace_calls(trace: Mapping[str, Any]) -> dict[str, float]:
    """Calls into each service made by one trace-driven request (`{entry: [groups]}`)."""
    calls: dict[str, float] = {}

    def visit(groups: Any) -> None:
        if not isinstance(groups, list):
            return  # {} or [] : a leaf
        for group in groups:
            for key, subtrace in group.items():
                callee = key.split(TRACE_KEY_ESCAPE)[0]
                calls[callee] = calls.get(callee, 0.0) + 1.0
                visit(subtrace)

    for groups in trace.values():
        visit(groups)
    return calls


def expected_calls(
    workmodel: Workmodel, entry: str, request_mode: str, trace: Mapping[str, Any]
) -> dict[str, float]:
    """Per service, expected calls per entry request for the runner's request mode."""
    if request_mode == "trace":
        return trace_calls(trace)
    return stochastic_calls(workmodel, entry)
