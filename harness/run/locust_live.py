"""Locust plugin the runner loads next to the locustfile: Locust's progress as events in a file.

With ``--events-out PATH`` (not shown in the web UI) the local runner or
master appends one JSON line to PATH, flushed at once, at each of Locust's
events ``test_start``, ``test_stopping`` (the ``-t`` limit expired or the UI's
stop: users are about to be stopped; the end of the runner's CPU window),
``test_stop`` and ``quitting``, and a ``tick`` every second while a test
runs::

    {"event": "tick", "t": <wall-clock s>, "requests": N, "failures": N, "rps": R}

with Locust's live totals (``environment.runner.stats.total``; ``rps`` its
current req/s). `harness.run.loadgen.LocustRun` reads them, so no control
flow depends on Locust's log wording or CSV files. Workers write nothing
(their master's totals include them). No users, no other change.
"""

from __future__ import annotations

import functools
import json
import time
from pathlib import Path
from typing import IO, Any

import gevent
from locust import events
from locust.runners import WorkerRunner

from harness.run.loadgen import EVENTS  # importable: the locustfile, loaded first, set sys.path

TICK = "tick"
TICK_S = 1.0


class EventsOut:
    """The events file of one Locust process, and its ticker while a test runs."""

    def __init__(self, environment: Any, path: Path) -> None:
        self.environment = environment
        # Never closed: Locust may fire events after `quitting` (a test still running is
        # stopped after it); every line is flushed, the process's exit closes the file.
        self.file: IO[str] = path.open("a", encoding="utf-8")
        self.ticker: gevent.Greenlet | None = None

    def write(self, event: str) -> None:
        total = self.environment.runner.stats.total
        line = {
            "event": event,
            "t": time.time(),
            "requests": total.num_requests,
            "failures": total.num_failures,
            "rps": float(total.current_rps),
        }
        self.file.write(json.dumps(line) + "\n")
        self.file.flush()

    def _tick(self) -> None:
        while True:  # until the test's next event kills it
            gevent.sleep(TICK_S)
            self.write(TICK)

    def on_event(self, event: str, **_: Any) -> None:
        """Locust fired `event`: one line; a ticker from ``test_start`` to the next event."""
        if self.ticker is not None:
            self.ticker.kill(block=False)
            self.ticker = None
        self.write(event)
        if event == "test_start":
            self.ticker = gevent.spawn(self._tick)


@events.init_command_line_parser.add_listener
def _add_options(parser: Any, **_: Any) -> None:
    parser.add_argument(
        "--events-out",
        default="",
        help="append Locust's test_start/test_stopping/test_stop/quitting events and a tick "
        "a second as JSON lines to this file (harness.run.locust_live)",
        include_in_web_ui=False,  # Locust's default is True
    )


@events.init.add_listener
def _on_init(environment: Any, runner: Any = None, **_: Any) -> None:
    path = getattr(environment.parsed_options, "events_out", "")
    if not path or isinstance(runner, WorkerRunner):
        return
    out = EventsOut(environment, Path(path))
    for event in EVENTS:
        if event != TICK:
            hook = getattr(environment.events, event)
            hook.add_listener(functools.partial(out.on_event, event))
