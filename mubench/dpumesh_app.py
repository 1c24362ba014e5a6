"""DPUmesh runtime of the μBench cell: `python -m dpumesh.server mubench.dpumesh_app:app`.

The handler asks the cell core (`mubench.cell`) for a plan and hands the
worker runtime an execution graph instead of doing any work itself:

    order([
        InternalStep("internal"),                  # the internal function
        pipe([order([EgressStep, ...]), ...]),     # one order per call group
        InternalStep("response", inputs=["internal"]),
    ])

The result of an order is its last child's result (DESIGN.md §3), so the
final step hands back the internal step's output as the response body; any
failed call fails its group's order, the pipe and the root, which answers 500.
Egress URLs are `http://<callee id><callee path>`: the DPUmesh sidecar routes
by the URL host.

Configuration comes from the environment, read when `app` is first used:
`APP` (service id), `MUBENCH_WORKMODEL` (path, required), `MUBENCH_SEED`
(integer, default 0), `MUBENCH_SCALE` (finite number >= 0, default 1),
`MUBENCH_FUNCTIONS_DIR` (optional); an empty variable counts as unset. A bad
value ends the process with one line naming it (`SystemExit`), not a traceback
from every worker.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

from flask import Flask, jsonify

from dpumesh import EgressStep, InternalStep, StepResult, get_context, order, pipe
from dpumesh.graph import Node
from mubench.cell import Cell, Plan, TraceError
from mubench.flask_glue import add_cell_routes, incoming_request
from mubench.internal import (
    FunctionsError,
    InternalFunction,
    check_functions,
    check_scale,
    custom_names,
    load_functions,
)
from mubench.workmodel import Workmodel, WorkmodelError, load_workmodel

INTERNAL_STEP = "internal"
RESPONSE_STEP = "response"
_T = TypeVar("_T")


class ConfigError(ValueError):
    """A missing or bad environment variable; `str()` is one line naming it."""


def build_graph(plan: Plan, function: InternalFunction, scale: float = 1.0) -> Node:
    """The execution graph that carries out `plan` (internal work, then the groups)."""
    steps: list[Node] = [
        InternalStep(INTERNAL_STEP, func=_run_internal, args=(function, plan, scale))
    ]
    if plan.groups:
        steps.append(
            pipe(
                order(
                    EgressStep(
                        f"g{g}.{c}.{call.service}",
                        requests=[(call.method, call.url, call.headers, call.body)],
                    )
                    for c, call in enumerate(group)
                )
                for g, group in enumerate(plan.groups)
            )
        )
        steps.append(InternalStep(RESPONSE_STEP, func=_respond, inputs=[INTERNAL_STEP]))
    return order(steps)


def _run_internal(function: InternalFunction, plan: Plan, scale: float) -> StepResult:
    body = function(plan.params, plan.rng, scale)
    return StepResult(headers={"content-type": "text/plain", **plan.headers}, body=body)


def _respond(internal: StepResult) -> StepResult:
    """The internal service's output is the response, once every call succeeded."""
    return internal


def create_app(
    workmodel: Workmodel,
    service_id: str,
    *,
    seed: int = 0,
    scale: float = 1.0,
    functions: Mapping[str, InternalFunction] | None = None,
) -> Flask:
    """The Flask app the DPUmesh worker runtime calls for one service."""
    cell = Cell(workmodel, service_id, seed)
    functions = functions if functions is not None else load_functions()
    check_functions(cell.service, functions)
    app = Flask(__name__)

    def handle() -> Any:
        ctx = get_context()
        if ctx is None:
            return jsonify(message="no DPUmesh context: run under dpumesh.server"), 500
        try:
            plan = cell.plan(incoming_request())
        except TraceError as e:
            return jsonify(message=f"bad trace: {e}"), 400
        ctx.graph = build_graph(plan, functions[plan.function], scale)
        return ""

    add_cell_routes(app, cell.service.path, handle)
    return app


def app_from_env(environ: Mapping[str, str] = os.environ) -> Flask:
    """Build the app from `APP`, `MUBENCH_WORKMODEL`, `MUBENCH_SEED`, `MUBENCH_SCALE`, ..."""
    missing = [name for name in ("APP", "MUBENCH_WORKMODEL") if not environ.get(name)]
    if missing:
        raise ConfigError(f"{' and '.join(missing)} must be set in the environment")
    seed = _env(environ, "MUBENCH_SEED", "0", int, "an integer")
    scale = _env(
        environ, "MUBENCH_SCALE", "1", lambda t: check_scale(float(t)), "a finite number >= 0"
    )
    functions = load_functions(environ.get("MUBENCH_FUNCTIONS_DIR") or None)
    path, service = environ["MUBENCH_WORKMODEL"], environ["APP"]
    workmodel = load_workmodel(path, custom=custom_names(functions))
    if service not in workmodel:
        have = ", ".join(workmodel)
        raise ConfigError(f"APP {service!r} is not a service of {path} (have: {have})")
    check_functions(workmodel[service], functions, path)  # an error naming the real file
    return create_app(workmodel, service, seed=seed, scale=scale, functions=functions)


def _env(
    environ: Mapping[str, str], name: str, default: str, parse: Callable[[str], _T], expected: str
) -> _T:
    """`parse` of variable `name` (`default` when unset or empty), or a ConfigError naming it."""
    raw = environ.get(name) or default
    try:
        return parse(raw)
    except ValueError:
        raise ConfigError(f"{name} must be {expected}, got {raw!r}") from None


_app: Flask | None = None


def __getattr__(name: str) -> Flask:
    """Module attribute `app`, built from the environment on first access (PEP 562)."""
    global _app
    if name != "app":
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    if _app is None:
        try:
            _app = app_from_env()
        except (ConfigError, WorkmodelError, FunctionsError) as e:
            # Raised while dpumesh.server imports the app: one line and exit 1.
            raise SystemExit(f"mubench.dpumesh_app: {e}") from None
    return _app
