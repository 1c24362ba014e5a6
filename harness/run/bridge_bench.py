"""Bridge latency: HTTP keep-alive client -> dpu-daemon -> dpa-daemon -> worker and back.

Starts the `dpumesh` stack (its description, through the local deployer)
with one service whose handler does nothing (`dpumesh.bench.null_app`), sends
sequential requests over one keep-alive connection and prints p50/p99 in
microseconds: the mesh's own path length. A micro-benchmark (numbers, no
assertions): `python -m harness.run.bridge_bench [--requests N]`.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

from harness.deploy import local
from harness.ports import free_ports, release_ports
from harness.run.latency_probe import sequential_latencies
from harness.stacks import dpumesh
from harness.stacks.model import Settings

NULL_APP = "dpumesh.bench.null_app:app"
THREADS = 16


def _percentile(sorted_values: list[float], q: float) -> float:
    return sorted_values[min(len(sorted_values) - 1, int(q * len(sorted_values)))]


def measure(requests: int, warmup: int, processes: int) -> dict[str, float]:
    """Start the null-handler mesh, time `requests` sequential requests, stop it."""
    plan = {"s0": (processes, THREADS)}
    desc = dpumesh.assemble(
        Settings(workmodel=None),
        "s0",
        plan,
        (dpumesh.worker("s0", processes, THREADS, app=NULL_APP),),
    )
    logs = Path(tempfile.mkdtemp(prefix="dpumesh-bench-"))  # kept only if the run fails
    (port,) = free_ports(1)
    try:
        with local.start(desc, run_dir=logs, port=port) as stack:
            samples = [ns / 1000 for ns in sequential_latencies(port, requests, warmup)]
            namespace = stack.namespace
    except BaseException:
        print(f"bridge benchmark failed; process logs in {logs}", file=sys.stderr)
        raise
    else:
        shutil.rmtree(logs)
    finally:
        release_ports([port])
    samples.sort()
    return {
        "p50_us": _percentile(samples, 0.50),
        "p99_us": _percentile(samples, 0.99),
        "requests": len(samples),
        "namespace": namespace,
    }


def main(argv: list[str] | None = None) -> None:
    """Print bridge latency for a do-nothing handler."""
    p = argparse.ArgumentParser(
        prog="python -m harness.run.bridge_bench", description=__doc__.splitlines()[0]
    )
    p.add_argument("--requests", type=int, default=3000)
    p.add_argument("--warmup", type=int, default=300)
    p.add_argument("--processes", type=int, default=1, help="worker processes (PN)")
    args = p.parse_args(argv)
    r = measure(args.requests, args.warmup, args.processes)
    print(
        f"bridge (HTTP keep-alive, null handler, PN={args.processes}): "
        f"p50 {r['p50_us']:.0f} us  p99 {r['p99_us']:.0f} us  ({r['requests']} requests, "
        f"namespace {r['namespace']})"
    )


if __name__ == "__main__":
    main()
