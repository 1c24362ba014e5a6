"""Checks and helpers shared by the tests of both μBench runtimes (one copy, two callers)."""

from __future__ import annotations

import subprocess
import sys
from collections import Counter
from collections.abc import Callable
from pathlib import Path

from mubench.cell import Cell, Request
from mubench.workmodel import load_workmodel

REPO = Path(__file__).resolve().parents[1]


def http_app_cli(*args: str) -> subprocess.CompletedProcess[str]:
    """`python -m mubench.http_app ARGS` from the repo, output captured as text."""
    return subprocess.run(
        [sys.executable, "-m", "mubench.http_app", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=30,
    )


def check_seq_len_sampling(
    workmodel: Path,
    seed: int,
    get_status: Callable[[str], int],
    requests: Callable[[], Counter[str]],
) -> None:
    """A runtime calls exactly what the core plans for each request id.

    `bid=sample` of the shared topology picks 2 of 4 services per request;
    `get_status(request_id)` sends `GET s0 /api/v1?bid=sample` with that id and
    returns the status; `requests()` reads the per-service request counters.
    """
    cell = Cell(load_workmodel(str(workmodel)), "s0", seed=seed)
    expected: Counter[str] = Counter()
    before = requests()
    for i in range(20):
        rid = f"sample-{i}"
        plan = cell.plan(Request("GET", headers={"x-request-id": rid}, query_string="bid=sample"))
        (calls,) = plan.groups
        assert len({call.service for call in calls}) == 2
        expected.update(call.service for call in calls)
        assert get_status(rid) == 200
    assert requests() - before == expected + Counter(s0=20)
    assert sum(expected.values()) == 40
