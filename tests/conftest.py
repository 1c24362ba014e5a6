"""Shared test fixtures.

`DPUMESH_REQUIRE_EXTERNAL=1` (set by .ci/run) turns "external part missing"
skips into failures, so CI cannot pass by silently skipping Envoy, Docker or
Chromium tests.
"""

from __future__ import annotations

import itertools
import os
import subprocess
from collections.abc import Iterator

import pytest

from dpumesh import naming

_counter = itertools.count()


def require_external(available: bool, what: str) -> None:
    """Skip when `what` is missing locally; fail in CI where it must exist."""
    if available:
        return
    if os.environ.get("DPUMESH_REQUIRE_EXTERNAL") == "1":
        pytest.fail(f"{what} is required in CI but missing")
    pytest.skip(f"{what} not available")


def stop_process(proc: subprocess.Popen, timeout_s: float = 15.0) -> None:
    """SIGTERM `proc` (its own teardown runs), SIGKILL if it has not exited in `timeout_s`."""
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()


@pytest.fixture
def namespace() -> str:
    """A DPUmesh namespace unique to this test (POSIX objects are machine-wide)."""
    return f"t{os.getpid()}n{next(_counter)}"


@pytest.fixture
def ns(namespace: str) -> Iterator[str]:
    """A unique namespace whose objects are removed even if the test fails."""
    yield namespace
    naming.remove_all(namespace)
