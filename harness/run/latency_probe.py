"""Latency of single sequential requests through one stack: the mesh's cost at zero load.

`python -m harness.run.latency_probe --mesh envoy` starts the stack, sends
`--warmup` then `--requests` `GET /` one after another over one keep-alive
connection (http.client, TCP_NODELAY), timing each with `perf_counter_ns`,
and prints percentiles of the measured ones in microseconds. No load
generator is involved, so the numbers are the per-request path length of
the stack, not its behaviour under load.
"""

from __future__ import annotations

import argparse
import http.client
import socket
import statistics
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path

from harness.deploy import start_stack
from harness.names import DEFAULT_WORKMODEL, MESHES
from harness.ports import free_ports


def sequential_latencies(port: int, requests: int, warmup: int, path: str = "/") -> list[int]:
    """Nanoseconds per request for `requests` sequential GETs after `warmup` untimed ones.

    One keep-alive connection with TCP_NODELAY: the path length of whatever
    listens on `port`, with no load generator in the way.
    """
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    conn.connect()
    conn.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    timings = []
    try:
        for n in range(warmup + requests):
            began = time.perf_counter_ns()
            conn.request("GET", path)
            resp = conn.getresponse()
            resp.read()
            elapsed = time.perf_counter_ns() - began
            if resp.status != 200:
                raise RuntimeError(f"request {n} answered {resp.status}")
            if n >= warmup:
                timings.append(elapsed)
    finally:
        conn.close()
    return timings


def summary(timings_ns: Sequence[int]) -> dict[str, float]:
    """p50/p90/p99/mean in microseconds."""
    cuts = statistics.quantiles(timings_ns, n=100, method="inclusive")
    return {
        "p50_us": cuts[49] / 1e3,
        "p90_us": cuts[89] / 1e3,
        "p99_us": cuts[98] / 1e3,
        "mean_us": statistics.fmean(timings_ns) / 1e3,
    }


def main(argv: Sequence[str] | None = None) -> None:
    """Start the stack, measure, print one line, tear the stack down."""
    parser = argparse.ArgumentParser(
        prog="python -m harness.run.latency_probe",
        description="Sequential single-request latency (GET /) through one stack.",
    )
    parser.add_argument("--mesh", required=True, choices=MESHES)
    parser.add_argument("--workmodel", type=Path, default=DEFAULT_WORKMODEL, metavar="PATH")
    parser.add_argument("--requests", type=int, default=1000, metavar="N")
    parser.add_argument("--warmup", type=int, default=100, metavar="N")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--scale", type=float, default=1.0)
    parser.add_argument(
        "--run-dir",
        type=Path,
        metavar="DIR",
        help="logs and configs (default runs/latency-<mesh>-<UTC timestamp>)",
    )
    args = parser.parse_args(argv)
    stamp = f"{datetime.now(UTC):%Y%m%dT%H%M%SZ}"
    run_dir = args.run_dir or Path("runs", f"latency-{args.mesh}-{stamp}")
    (port,) = free_ports(1)
    with start_stack(
        args.mesh, args.workmodel, port=port, run_dir=run_dir, seed=args.seed, scale=args.scale
    ) as stack:
        stats = summary(sequential_latencies(port, args.requests, args.warmup))
        traffic = stack.traffic()
    print(
        f"{args.mesh}: {args.requests} sequential GET / after {args.warmup} warm-up: "
        + ", ".join(f"{k} {v:.0f}" for k, v in stats.items())
        + f" (stack counted {traffic['entry_requests']} entry requests)"
    )


if __name__ == "__main__":
    main()
