"""The run's progress display: plain lines in logs, a live panel on a terminal, time left."""

from __future__ import annotations

import io

import pytest
from rich.console import Console

from harness.run import progress
from harness.run.loadgen import Live
from harness.run.progress import PRIOR_S, RunProgress


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch) -> Clock:
    c = Clock()
    monkeypatch.setattr(progress.time, "monotonic", c)
    return c


def plain_console() -> tuple[Console, io.StringIO]:
    out = io.StringIO()
    return Console(file=out, force_terminal=False, width=120), out


def test_time_left_follows_the_plan_then_the_measured_drift(clock):
    console, _ = plain_console()
    with RunProgress(console, total_estimate_s=300, repeat=3) as p:
        assert p.remaining_s() == 300
        p.step("warm-up", "dpumesh", 1, estimate_s=60)
        clock.now += 20
        assert p.remaining_s() == pytest.approx(280)  # on plan: the rest as estimated
        clock.now += 100  # the step took 120 s instead of 60
        assert p.remaining_s() == pytest.approx(240)  # overrunning step: no time left on it
        p.step("closed-8", "dpumesh", 1, estimate_s=60)
        drift = (120 + PRIOR_S) / (60 + PRIOR_S)  # damped, not the raw 2x
        assert p.remaining_s() == pytest.approx(180 * drift + 60)
        assert p.elapsed_s() == pytest.approx(120)


def test_plain_output_has_one_line_per_phase(clock):
    console, out = plain_console()
    with RunProgress(console, total_estimate_s=125, repeat=2) as p:
        p.step("closed-8", "envoy", 2, estimate_s=10)
        clock.now += 10
        p.live(Live(rps=99.5, requests=995, failures=0))
        p.print("envoy rep 2 closed-8: 99.5 req/s")
    lines = out.getvalue().splitlines()
    assert lines == [
        "[0:00 / ~2:05 left] envoy rep 2/2: closed-8",
        "envoy rep 2 closed-8: 99.5 req/s",
    ]


def test_terminal_panel_shows_phase_rate_and_errors(clock):
    out = io.StringIO()
    console = Console(file=out, force_terminal=True, width=120)
    p = RunProgress(console, total_estimate_s=60, repeat=1)
    p.step("open-100", "nomesh", 1, estimate_s=30)
    clock.now += 15
    p.live(Live(rps=100.2, requests=1503, failures=2))
    console.print(p._render())
    text = out.getvalue()
    assert "nomesh rep 1/1: open-100" in text
    assert "100.2 req/s  1503 requests  2 errors" in text
    assert "0:15 elapsed, ~0:45 left" in text
