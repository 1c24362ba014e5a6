"""Step load: add users in steps, as a second locustfile.

Locust applies any `LoadTestShape` found in a locustfile automatically, so the
shape lives here, outside ``locustfile.py``: a default run is never shaped,
and a step run opts in by listing this file too::

    locust -f loadtests/locustfile.py,loadtests/step_shape.py --headless \\
        --host http://127.0.0.1:5005 HttpMeshUser \\
        --step-users 10 --step-time 20 --step-count 5

Step ``n`` (0-based) runs ``(n + 1) * step_users`` users for ``step_time``
seconds; after ``step_count`` steps the test stops (a shape ignores
``-u``/``-r``/``-t``). Users are added at ``--step-spawn-rate`` per second
(0 = all at once). The options are in the web UI too. Combined with
``--open-loop-rate`` the rate stays fixed and the steps only change how many
users may be in flight.
"""

from __future__ import annotations

from typing import Any

from locust import LoadTestShape, events


@events.init_command_line_parser.add_listener
def _add_step_options(parser: Any, **_: Any) -> None:
    ui = {"include_in_web_ui": True}
    parser.add_argument("--step-users", type=int, default=10, help="Users added per step", **ui)
    parser.add_argument("--step-time", type=float, default=10.0, help="Seconds per step", **ui)
    parser.add_argument("--step-count", type=int, default=5, help="Number of steps", **ui)
    parser.add_argument(
        "--step-spawn-rate",
        type=float,
        default=0.0,
        help="Users started per second within a step (0 = all at once)",
        **ui,
    )


def step_at(
    run_time_s: float, step_users: int, step_time_s: float, step_count: int, spawn_rate: float
) -> tuple[int, float] | None:
    """(users, spawn rate) at `run_time_s`, or None when the steps are over."""
    if step_users < 1 or step_time_s <= 0 or step_count < 1:
        raise ValueError("--step-users, --step-time and --step-count must be positive")
    step = int(run_time_s // step_time_s)
    if step >= step_count:
        return None
    users = (step + 1) * step_users
    return users, (spawn_rate if spawn_rate > 0 else float(users))


class StepLoadShape(LoadTestShape):
    """`step_users` more users every `step_time` seconds, `step_count` times."""

    def tick(self) -> tuple[int, float] | None:
        po = self.runner.environment.parsed_options if self.runner else None
        return step_at(
            self.get_run_time(),
            int(getattr(po, "step_users", 10)),
            float(getattr(po, "step_time", 10.0)),
            int(getattr(po, "step_count", 5)),
            float(getattr(po, "step_spawn_rate", 0.0)),
        )
