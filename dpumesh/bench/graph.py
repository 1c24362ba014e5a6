"""Micro-benchmark of the execution-graph engine: µs of CPU per request.

Builds a μBench-shaped graph per request (one InternalStep, then a pipe of
groups, each an order of EgressSteps), runs it through `GraphRun` with a
synchronous driver that answers every action at once, and reports the
min/median over repetitions. This is the engine's share of a worker's
per-request cost, without queues, threads or HTTP. Time is process CPU time,
so other load on a shared machine inflates it less than wall-clock would.

    python -m dpumesh.bench.graph [--requests N] [--repeats R]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

from dpumesh.graph import (
    DoneAction,
    EgressAction,
    EgressStep,
    GraphRun,
    InternalStep,
    Node,
    StepResult,
    order,
    pipe,
)

_OK = StepResult(body="x" * 100)


def _internal_service(config: dict) -> str:
    return "payload"


def mubench_graph(groups: int, calls_per_group: int) -> Node:
    """The graph a μBench cell builds: internal service, then groups in parallel."""
    return order(
        [
            InternalStep("internal", func=_internal_service, args=({"loader": {}},)),
            pipe(
                [
                    order(
                        [
                            EgressStep(
                                f"g{group}c{call}",
                                requests=[("GET", f"http://s{call}/api/v1", {}, None)],
                            )
                            for call in range(calls_per_group)
                        ]
                    )
                    for group in range(groups)
                ]
            ),
        ]
    )


def drive(graph: Node) -> StepResult:
    """Run `graph` to completion, answering every action immediately."""
    run = GraphRun(graph)
    pending = run.start()
    while pending:
        action = pending.pop()
        if isinstance(action, EgressAction):
            pending.extend(run.on_egress_response(action.step_id, action.seq, _OK))
        elif isinstance(action, DoneAction):
            return action.result
        else:
            value = action.func(*action.args, **action.kwargs)
            pending.extend(run.on_internal_done(action.step_id, value))
    raise RuntimeError("graph ended without a DoneAction")


def measure(per_request: Callable[[], object], requests: int, repeats: int) -> list[float]:
    """CPU µs per request for each repetition of `requests` calls."""
    timings = []
    for _ in range(repeats):
        started = time.process_time()
        for _ in range(requests):
            per_request()
        timings.append((time.process_time() - started) / requests * 1e6)
    return timings


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=5000, help="requests per repetition")
    parser.add_argument("--repeats", type=int, default=7, help="repetitions (min/median)")
    args = parser.parse_args(argv)
    shapes = [
        ("1 internal + 2 groups x 1 egress", 2, 1),
        ("1 internal + 10 groups x 1 egress", 10, 1),
    ]
    print(f"{'graph':<36} {'phase':<11} {'min CPU µs':>10} {'median CPU µs':>13}")
    for label, groups, calls in shapes:
        prebuilt = mubench_graph(groups, calls)
        cases = [
            ("run", lambda graph=prebuilt: drive(graph)),
            ("build+run", lambda g=groups, c=calls: drive(mubench_graph(g, c))),
        ]
        for phase, per_request in cases:
            timings = measure(per_request, args.requests, args.repeats)
            print(
                f"{label:<36} {phase:<11} {min(timings):>10.2f} {statistics.median(timings):>13.2f}"
            )


if __name__ == "__main__":
    main()
