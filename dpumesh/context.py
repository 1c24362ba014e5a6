"""High-level graph API for Flask handlers: `get_context()`, `ctx.call`, `ctx.run_internal`.

A handler describes what its request should do and returns `""`; the worker
runtime takes `ctx.build_graph()` and runs it with `dpumesh.graph.GraphRun`,
so no worker thread is held while downstream calls are in flight.

Steps added outside `ctx.parallel()` run in order; steps added inside one
`parallel()` block run concurrently (a `pipe`). A `parallel()` block nested
in another is allowed and adds nothing new: its steps simply run
concurrently with the rest of the enclosing block (a pipe inside a pipe).
Dependencies between concurrent steps are expressed with `inputs`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from types import MappingProxyType
from typing import Any

from dpumesh.graph import EgressStep, GraphError, InternalStep, Node, Request, order, pipe

_current_context: ContextVar[ExecutionContext | None] = ContextVar(
    "dpumesh_current_context", default=None
)


class ExecutionContext:
    """What one request should do: the steps its handler added, plus the request itself.

    Set `graph` to a low-level graph (`order`/`pipe`/steps) instead of using
    `call`/`run_internal`; mixing both in one request is a `GraphError`.
    """

    def __init__(
        self,
        *,
        method: str = "GET",
        path: str = "/",
        headers: Mapping[str, str] | Iterable[tuple[str, str]] | None = None,
        body: bytes = b"",
        request_id: str | None = None,
    ) -> None:
        self._method = method
        self._path = path
        self._headers: Mapping[str, str] = MappingProxyType(dict(headers or {}))
        self._body = body
        self._request_id = request_id
        # blocks[0] is the top-level sequence; each open parallel() pushes one more.
        self._blocks: list[list[Node]] = [[]]
        self._step_ids: set[str] = set()
        self._auto_ids = 0
        self._graph: Node | None = None

    @property
    def method(self) -> str:
        """HTTP method of the incoming request."""
        return self._method

    @property
    def path(self) -> str:
        """Request target of the incoming request (path and query)."""
        return self._path

    @property
    def headers(self) -> Mapping[str, str]:
        """Headers of the incoming request (read-only)."""
        return self._headers

    @property
    def body(self) -> bytes:
        """Body of the incoming request."""
        return self._body

    @property
    def request_id(self) -> str | None:
        """The request's `x-request-id`, if it carried one (for logs and tracing)."""
        return self._request_id

    @property
    def graph(self) -> Node | None:
        """The low-level graph assigned by the handler, or None (see `build_graph`)."""
        return self._graph

    @graph.setter
    def graph(self, graph: Node | None) -> None:
        self._graph = graph

    def run_internal(
        self,
        func: Callable[..., Any],
        *,
        args: Sequence[Any] = (),
        kwargs: dict[str, Any] | None = None,
        inputs: Sequence[str] | None = None,
        id: str | None = None,
    ) -> str:
        """Schedule `func(*args, **kwargs, <input id>=StepResult...)` in the thread pool.

        Returns the step id, for other steps' `inputs`.
        """
        step_id = self._claim_id(id, "internal")
        self._blocks[-1].append(InternalStep(step_id, func, args, kwargs, inputs))
        return step_id

    def call(
        self,
        method: str,
        url: str,
        *,
        headers: Mapping[str, str] | None = None,
        body: str | bytes | None = None,
        inputs: Sequence[str] | None = None,
        request_builder: Callable[..., Sequence[Request]] | None = None,
        id: str | None = None,
    ) -> str:
        """Schedule an HTTP call to another service; return its step id.

        With `request_builder`, `method` and `url` are ignored: the builder's
        list of (method, url, headers, body) is sent instead (`[]` skips).
        """
        step_id = self._claim_id(id, "call")
        if request_builder is not None:
            step = EgressStep(step_id, inputs=inputs, request_builder=request_builder)
        else:
            request = (method, url, dict(headers) if headers else {}, body)
            step = EgressStep(step_id, requests=[request], inputs=inputs)
        self._blocks[-1].append(step)
        return step_id

    @contextmanager
    def parallel(self) -> Iterator[None]:
        """Steps added inside the block run concurrently with each other."""
        block: list[Node] = []
        self._blocks.append(block)
        try:
            yield
        finally:
            self._blocks.pop()
            if block:
                self._blocks[-1].append(pipe(block))

    def build_graph(self) -> Node | None:
        """The graph to run for this request, or None if the handler built nothing."""
        steps = self._blocks[0]
        if self._graph is not None:
            if steps:
                raise GraphError("assign ctx.graph or use ctx.call/run_internal, not both")
            return self._graph
        return order(steps) if steps else None

    def _claim_id(self, step_id: str | None, prefix: str) -> str:
        """Reserve `step_id`, or make one up that no other step of this request uses."""
        if step_id is None:
            while True:
                self._auto_ids += 1
                step_id = f"{prefix}-{self._auto_ids}"
                if step_id not in self._step_ids:
                    break
        elif step_id in self._step_ids:
            raise GraphError(f"duplicate step id {step_id!r}")
        self._step_ids.add(step_id)
        return step_id


def get_context() -> ExecutionContext | None:
    """The current request's context, or None outside a DPUmesh request."""
    return _current_context.get()


get_current_context = get_context


@contextmanager
def bind_context(ctx: ExecutionContext) -> Iterator[ExecutionContext]:
    """Make `ctx` the current context while the runtime calls the handler."""
    token = _current_context.set(ctx)
    try:
        yield ctx
    finally:
        _current_context.reset(token)
