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
(default 0), `MUBENCH_SCALE` (default 1), `MUBENCH_FUNCTIONS_DIR` (optional).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from flask import Flask, jsonify

from dpumesh import EgressStep, InternalStep, StepResult, get_context, order, pipe
from dpumesh.graph import Node
from mubench.cell import Cell, Plan, TraceError
from mubench.flask_glue import add_cell_routes, incoming_request
from mubench.internal import InternalFunction, check_functions, load_functions
from mubench.workmodel import Workmodel, load_workmodel

INTERNAL_STEP = "internal"
RESPONSE_STEP = "response"


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
        raise RuntimeError(f"mubench.dpumesh_app needs {' and '.join(missing)} in the environment")
    workmodel_path = environ["MUBENCH_WORKMODEL"]
    return create_app(
        load_workmodel(workmodel_path),
        environ["APP"],
        seed=int(environ.get("MUBENCH_SEED", "0")),
        scale=float(environ.get("MUBENCH_SCALE", "1")),
        functions=load_functions(environ.get("MUBENCH_FUNCTIONS_DIR") or None),
    )


_app: Flask | None = None


def __getattr__(name: str) -> Flask:
    """Module attribute `app`, built from the environment on first access (PEP 562)."""
    global _app
    if name != "app":
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    if _app is None:
        _app = app_from_env()
    return _app
