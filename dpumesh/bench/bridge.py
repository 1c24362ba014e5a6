"""Bridge latency: HTTP keep-alive client -> dpu-daemon -> dpa-daemon -> worker and back.

Starts a private mesh (its own namespace and port), sends sequential requests
to a handler that does nothing over one keep-alive connection, and prints
p50/p99 in microseconds. Run: `python -m dpumesh.bench.bridge [--requests N]`.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _percentile(sorted_values: list[float], q: float) -> float:
    return sorted_values[min(len(sorted_values) - 1, int(q * len(sorted_values)))]


def _wait_ready(port: int, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=1)
            conn.request("GET", "/_dpumesh/stats")
            stats = json.loads(conn.getresponse().read())
            conn.close()
            if stats["workers"].get("s0"):
                return
        except OSError:
            pass
        time.sleep(0.1)
    raise TimeoutError("mesh did not become ready")


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


def measure(requests: int, warmup: int, processes: int) -> dict[str, float]:
    """Start a mesh, time `requests` sequential keep-alive requests, stop the mesh."""
    ns = f"bench{os.getpid()}"
    port = _free_port()
    env = dict(os.environ, DPUMESH_NS=ns, APP="s0", PN=str(processes))
    logs = tempfile.mkdtemp(prefix="dpumesh-bench-")  # kept only if the run fails
    argvs = [
        ["-m", "dpumesh.dpa_daemon", "--ns", ns],
        ["-m", "dpumesh.dpu_daemon", "--ns", ns, "--port", str(port), "--log-level", "WARNING"],
        ["-m", "dpumesh.server", "dpumesh.bench.null_app:app", "--log-level", "WARNING"],
    ]
    procs = []
    try:
        for i, argv in enumerate(argvs):
            with open(os.path.join(logs, f"{i}.log"), "wb") as log:
                procs.append(
                    subprocess.Popen([sys.executable, *argv], env=env, stdout=log, stderr=log)
                )
        _wait_ready(port)
        samples = [ns / 1000 for ns in sequential_latencies(port, requests, warmup)]
    except BaseException:
        print(f"bridge benchmark failed; process logs in {logs}", file=sys.stderr)
        raise
    else:
        shutil.rmtree(logs)
    finally:
        for proc in reversed(procs):
            proc.send_signal(signal.SIGTERM)
        for proc in reversed(procs):
            proc.wait(10)
    samples.sort()
    return {
        "p50_us": _percentile(samples, 0.50),
        "p99_us": _percentile(samples, 0.99),
        "requests": len(samples),
    }


def main(argv: list[str] | None = None) -> None:
    """Print bridge latency for a do-nothing handler."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--requests", type=int, default=3000)
    p.add_argument("--warmup", type=int, default=300)
    p.add_argument("--processes", type=int, default=1, help="worker processes (PN)")
    args = p.parse_args(argv)
    r = measure(args.requests, args.warmup, args.processes)
    print(
        f"bridge (HTTP keep-alive, null handler, PN={args.processes}): "
        f"p50 {r['p50_us']:.0f} us  p99 {r['p99_us']:.0f} us  ({r['requests']} requests)"
    )


if __name__ == "__main__":
    main()
