"""The run's live display: phase, stack, repetition, time elapsed and left, req/s, errors.

On a terminal it is a rich `Live` panel redrawn four times a second, with
finished levels printed above it; elsewhere (CI logs, pipes) every phase
and every finished level is one plain line, so logs stay readable.

Time left comes from the plan's estimate (`harness.run.plan`), corrected as the
run goes: finished steps take their real duration, the current step
whichever is larger of its estimate and its elapsed time, and steps not yet
started their estimate scaled by how far off the finished ones were
(damped, so the first quick steps do not swing it).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from rich.console import Console, Group
from rich.live import Live
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

from harness.run.loadgen import Live as LiveStats

PRIOR_S = 60.0


def _clock(seconds: float) -> str:
    seconds = max(0, round(seconds))
    return f"{seconds // 60}:{seconds % 60:02d}"


@dataclass
class _Step:
    phase: str
    mesh: str
    rep: int
    estimate_s: float
    started: float


class RunProgress:
    """Call `step()` at each phase, `live()` with Locust's numbers, `print()` for results."""

    def __init__(self, console: Console, total_estimate_s: float, repeat: int) -> None:
        self.console = console
        self.repeat = repeat
        self._total = total_estimate_s
        self._t0 = time.monotonic()
        self._done_estimate = 0.0
        self._done_actual = 0.0
        self._step: _Step | None = None
        self._live_stats: LiveStats | None = None
        self._live: Live | None = None

    def __enter__(self) -> RunProgress:
        if self.console.is_terminal:
            self._live = Live(
                get_renderable=self._render, console=self.console, refresh_per_second=4
            )
            self._live.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._finish_step()
        if self._live is not None:
            self._live.stop()
            self._live = None

    def step(self, phase: str, mesh: str, rep: int, estimate_s: float) -> None:
        """A new phase begins (the previous one is over)."""
        self._finish_step()
        self._step = _Step(phase, mesh, rep, estimate_s, time.monotonic())
        self._live_stats = None
        if self._live is None:
            self.console.print(
                f"[{_clock(self.elapsed_s())} / ~{_clock(self.remaining_s())} left] "
                f"{mesh} rep {rep}/{self.repeat}: {phase}",
                highlight=False,
            )

    def skip(self, estimate_s: float) -> None:
        """Take planned work that will not run (levels past a stack's knee) off the estimate."""
        self._total = max(self._done_estimate, self._total - estimate_s)

    def live(self, stats: LiveStats | None) -> None:
        if stats is not None:
            self._live_stats = stats

    def print(self, *objects: object) -> None:
        """Print above the live panel (or plainly)."""
        self.console.print(*objects, highlight=False)

    def elapsed_s(self) -> float:
        return time.monotonic() - self._t0

    def remaining_s(self) -> float:
        # How far off finished steps were, damped by a prior of PRIOR_S on-time seconds so a
        # few quick first steps do not swing the estimate.
        drift = (self._done_actual + PRIOR_S) / (self._done_estimate + PRIOR_S)
        current_estimate = current_spent = 0.0
        if self._step is not None:
            current_estimate = self._step.estimate_s
            current_spent = time.monotonic() - self._step.started
        future = self._total - self._done_estimate - current_estimate
        return max(0.0, future) * drift + max(0.0, current_estimate - current_spent)

    def _finish_step(self) -> None:
        if self._step is not None:
            self._done_estimate += self._step.estimate_s
            self._done_actual += time.monotonic() - self._step.started
            self._step = None

    def _render(self) -> Group:
        elapsed, left = self.elapsed_s(), self.remaining_s()
        head = Table.grid(padding=(0, 2))
        step = self._step
        phase = f"{step.mesh} rep {step.rep}/{self.repeat}: {step.phase}" if step else "…"
        stats = self._live_stats
        load = (
            f"{stats.rps:7.1f} req/s  {stats.requests} requests  {stats.failures} errors"
            if stats
            else ""
        )
        head.add_row(Text(phase, style="bold"), Text(load, style="cyan"))
        bar = ProgressBar(total=max(elapsed + left, 1e-9), completed=elapsed, width=50)
        foot = Table.grid(padding=(0, 2))
        foot.add_row(bar, Text(f"{_clock(elapsed)} elapsed, ~{_clock(left)} left"))
        return Group(head, foot)
