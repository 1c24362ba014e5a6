"""The micro-benchmarks still run and report numbers (their speed is not judged here).

Each runs as a real subprocess with tiny counts; it must exit 0, print every
figure it promises as a positive number, and leave no shared-memory object or
temporary directory behind.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.mesh import shm_objects

pytestmark = pytest.mark.e2e

NUMBER = r"([0-9][0-9,]*(?:\.[0-9]+)?)"


def run_bench(module: str, *args: str, tmp_path: Path) -> tuple[str, int]:
    """(stdout, pid) of `python -m module args` with TMPDIR inside `tmp_path`."""
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    proc = subprocess.Popen(
        [sys.executable, "-m", module, *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "TMPDIR": str(tmp)},
    )
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert list(tmp.iterdir()) == [], "temporary files left behind"
    return out, proc.pid


def figures(out: str, pattern: str) -> list[float]:
    """Every number matched by `pattern` (groups) in `out`; fails if it is absent."""
    match = re.search(pattern, out)
    assert match, f"{pattern!r} not in:\n{out}"
    return [float(g.replace(",", "")) for g in match.groups()]


def test_queue_benchmark(tmp_path: Path) -> None:
    out, pid = run_bench(
        "dpumesh.bench.queues", "--count", "2000", "--round-trips", "200", tmp_path=tmp_path
    )
    for size in (1, 64):
        assert all(v > 0 for v in figures(out, rf"{size} KiB:\s+{NUMBER} msg/s\s+{NUMBER} MB/s"))
    p50, p99 = figures(
        out, rf"worker->dpa->sidecar->dpa->worker.*\n\s+p50 {NUMBER} us\s+p99 {NUMBER}"
    )
    assert 0 < p50 <= p99
    for reference in ("ping-pong between two processes", "relay, same 4 hops over 3 processes"):
        p50, p99 = figures(out, rf"{reference}\n\s+p50 {NUMBER} us\s+p99 {NUMBER}")
        assert 0 < p50 <= p99
    assert shm_objects(f"qb{pid}") == []


def test_graph_benchmark(tmp_path: Path) -> None:
    out, _ = run_bench(
        "dpumesh.bench.graph", "--requests", "50", "--repeats", "2", tmp_path=tmp_path
    )
    rows = re.findall(rf"(run|build\+run)\s+{NUMBER}\s+{NUMBER}", out)
    assert len(rows) == 4, out
    assert all(0 < float(low) <= float(mid) for _, low, mid in rows)


def test_bridge_benchmark(tmp_path: Path) -> None:
    out, _ = run_bench(
        "harness.run.bridge_bench", "--requests", "50", "--warmup", "10", tmp_path=tmp_path
    )
    p50, p99, count = figures(out, rf"p50 {NUMBER} us\s+p99 {NUMBER} us\s+\({NUMBER} requests")
    assert 0 < p50 <= p99 and count == 50
    (namespace,) = re.findall(r"namespace (\w+)\)", out)
    assert shm_objects(namespace) == []
