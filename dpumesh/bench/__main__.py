"""`python -m dpumesh.bench`: every DPUmesh micro-benchmark, one after another.

Prints numbers; asserts nothing (timing goals belong here, not in tests).
Run the parts on their own with `python -m dpumesh.bench.queues` and
`python -m dpumesh.bench.graph`. The bridge end to end starts a whole stack,
so it is the harness's: `python -m harness.run.bridge_bench`.
"""

from __future__ import annotations

import argparse

from dpumesh.bench import graph, queues


def main() -> None:
    """Queues, then the graph engine."""
    argparse.ArgumentParser(prog="python -m dpumesh.bench", description=__doc__).parse_args()
    for title, run in (
        ("shared-memory queues", queues.main),
        ("execution-graph engine", graph.main),
    ):
        print(f"== {title}", flush=True)
        run([])


if __name__ == "__main__":
    main()
