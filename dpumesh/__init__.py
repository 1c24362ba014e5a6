"""DPUmesh: a DPU-offloaded service mesh (simulated), and its execution-graph API.

Handlers use `get_context()` and the context's `call`/`run_internal`/
`parallel`, or assign a low-level graph built from `order`, `pipe`,
`EgressStep` and `InternalStep` to `ctx.graph`.
"""

from dpumesh.context import ExecutionContext, get_context, get_current_context
from dpumesh.graph import EgressStep, GraphError, InternalStep, StepResult, order, pipe

__all__ = [
    "EgressStep",
    "ExecutionContext",
    "GraphError",
    "InternalStep",
    "StepResult",
    "get_context",
    "get_current_context",
    "order",
    "pipe",
]
