"""`python -m dpumesh.bench`: every DPUmesh micro-benchmark, one after another.

Prints numbers; asserts nothing (timing goals belong here, not in tests).
Run the parts on their own with `python -m dpumesh.bench.queues`,
`python -m dpumesh.bench.graph` and `python -m dpumesh.bench.bridge`.
"""

from __future__ import annotations

import argparse

from dpumesh.bench import bridge, graph, queues


def main() -> None:
    """Queues, then the graph engine, then the bridge end to end."""
    argparse.ArgumentParser(prog="python -m dpumesh.bench", description=__doc__).parse_args()
    for title, run in (
        ("shared-memory queues", queues.main),
        ("execution-graph engine", graph.main),
        ("port-5005 bridge", bridge.main),
    ):
        print(f"== {title}", flush=True)
        run([])


if __name__ == "__main__":
    main()
