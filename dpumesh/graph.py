"""Execution-graph engine: pure and sans-IO (in the style of h11).

A graph is a tree of `order`/`pipe` nodes whose leaves are `EgressStep`s and
`InternalStep`s. `GraphRun` turns events (start, egress response, internal
step done, deadline expired) into actions (`EgressAction`, `InternalAction`,
`DoneAction`). It never blocks, sleeps, reads a clock or touches a socket, so
the worker runtime owns all I/O and every ordering of events can be tested
without processes.

Semantics (DESIGN.md §3), plus the decisions this module makes:

- `order`: children one after another; the first error stops it and is its
  error. Steps after the error never run.
- `pipe`: children concurrently; all run to completion; the pipe fails if any
  child failed, whatever order they finished in.
- The result of an `order`/`pipe` is the result of its last child in graph
  order, so the final response does not depend on completion order.
- `inputs` are dependencies as well as arguments: a step runs once its
  position allows it *and* every input has finished (a failed input is passed
  as its failed `StepResult`). An input that will never run (it sits after an
  error in a stopped `order`) fails the waiting step with status 500 and an
  error naming the input, instead of hanging.
- An `EgressStep` whose requests are empty (static `[]` or a
  `request_builder` returning `[]`) is skipped: its result is `StepResult()`
  (status 200, no headers, empty body) and it is not an error.
- A failed graph answers 500 with a text body naming the first failed step in
  graph order (`step 'x' failed: <error or status>`) and the header
  `x-dpumesh-failed-step: x`. An expired graph answers 504.
- Unknown input ids, duplicate step ids and dependency cycles (through
  `inputs` and `order` positions) raise `GraphError` when the run is built.
"""

from __future__ import annotations

import inspect
import json
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from itertools import pairwise, repeat
from typing import Any

Request = tuple[str, str, dict[str, str] | None, str | bytes | None]
"""One egress request: (method, url, headers, body). Bodies pass through untouched."""

FAILED_STEP_HEADER = "x-dpumesh-failed-step"
_TEXT_PLAIN = "text/plain; charset=utf-8"


class GraphError(ValueError):
    """A graph that cannot run: bad ids, unknown inputs or a dependency cycle."""


@dataclass(slots=True)
class StepResult:
    """Outcome of one step; also what a downstream step receives as an input."""

    status_code: int = 200
    headers: dict[str, str] = field(default_factory=dict)
    body: str = ""
    error: str | None = None

    @property
    def ok(self) -> bool:
        """True for a 2xx/3xx status without an error."""
        return 200 <= self.status_code < 400 and self.error is None


def _check_step(step_id: object, inputs: object) -> None:
    """Reject ids and inputs that would only fail confusingly later."""
    if not isinstance(step_id, str) or not step_id:
        raise GraphError(f"a step id must be a non-empty string, got {step_id!r}")
    if isinstance(inputs, str):
        raise GraphError(f"step {step_id!r}: inputs must be a list of step ids, not {inputs!r}")


def _check_requests(requests: Iterable[Request]) -> list[Request]:
    """Return `requests` as a list, rejecting anything that is not 4-tuples."""
    checked = list(requests)
    for request in checked:
        if not isinstance(request, tuple | list) or len(request) != 4:
            raise GraphError(f"a request must be (method, url, headers, body), got {request!r}")
    return checked


@dataclass(slots=True, eq=False)
class EgressStep:
    """HTTP calls to other services, sent in sequence; the last response is the result.

    Give either `requests` or `request_builder`; the builder is called with
    one keyword argument per input (a `StepResult`) when the step becomes
    ready. A response with status >= 400 stops the step and fails it.
    """

    id: str
    requests: list[Request] | None = None
    inputs: Sequence[str] | None = None
    request_builder: Callable[..., Sequence[Request]] | None = None

    def __post_init__(self) -> None:
        _check_step(self.id, self.inputs)
        if (self.requests is None) == (self.request_builder is None):
            raise GraphError(
                f"EgressStep {self.id!r} needs exactly one of requests/request_builder"
            )
        if self.requests is not None:
            self.requests = _check_requests(self.requests)


@dataclass(slots=True, eq=False)
class InternalStep:
    """A local function run in the worker's thread pool.

    It is called as `func(*args, **kwargs, <input id>=StepResult, ...)`. When
    that call would give a parameter twice, positional args instead fill the
    parameters not given by keyword (the seed's `merge_results` example).
    """

    id: str
    func: Callable[..., Any]
    args: Sequence[Any] = ()
    kwargs: dict[str, Any] | None = None
    inputs: Sequence[str] | None = None

    def __post_init__(self) -> None:
        _check_step(self.id, self.inputs)
        if self.kwargs and self.inputs:
            clash = set(self.kwargs).intersection(self.inputs)
            if clash:
                raise GraphError(
                    f"InternalStep {self.id!r}: inputs {sorted(clash)} clash with kwargs"
                )


@dataclass(slots=True, eq=False)
class Order:
    """Children one after another (build with `order`)."""

    children: tuple[Node, ...]


@dataclass(slots=True, eq=False)
class Pipe:
    """Children concurrently (build with `pipe`)."""

    children: tuple[Node, ...]


Node = EgressStep | InternalStep | Order | Pipe


def order(steps: Iterable[Node]) -> Order:
    """Run `steps` one after another; the first error stops the sequence."""
    return Order(tuple(steps))


def pipe(steps: Iterable[Node]) -> Pipe:
    """Run `steps` concurrently; every one runs, any error fails the pipe."""
    return Pipe(tuple(steps))


@dataclass(slots=True)
class EgressAction:
    """Send one request of step `step_id`; answer with `on_egress_response(step_id, seq, ...)`."""

    step_id: str
    seq: int
    method: str
    url: str
    headers: dict[str, str] | None
    body: str | bytes | None


@dataclass(slots=True)
class InternalAction:
    """Call `func(*args, **kwargs)` off the event loop; answer with `on_internal_done`."""

    step_id: str
    func: Callable[..., Any]
    args: Sequence[Any]
    kwargs: dict[str, Any]


@dataclass(slots=True)
class DoneAction:
    """The graph finished: `result` is the response to send."""

    result: StepResult


Action = EgressAction | InternalAction | DoneAction

_RESULT_KEYS = ("body", "status_code", "headers")


def _decode(body: bytes) -> str:
    return body.decode("utf-8", errors="surrogateescape")


def to_step_result(value: object) -> StepResult:
    """Convert an internal step's return value (or raised exception) to a `StepResult`.

    `StepResult` as is; `str` is the body; `bytes` are decoded as UTF-8
    (surrogateescape, so no byte is lost); a `dict` with any of the keys
    body/status_code/headers sets those fields (a non-str body is JSON-encoded),
    a `dict` with none of them is itself the body as JSON; an exception is a
    500 with `error` set; anything else is `str(value)`.
    """
    if isinstance(value, StepResult):
        return value
    if isinstance(value, str):
        return StepResult(body=value)
    if isinstance(value, bytes):
        return StepResult(body=_decode(value))
    if isinstance(value, dict):
        if not any(key in value for key in _RESULT_KEYS):
            return StepResult(body=json.dumps(value))
        body = value.get("body", "")
        if isinstance(body, bytes):
            body = _decode(body)
        elif not isinstance(body, str):
            body = json.dumps(body)
        headers = value.get("headers") or {}
        return StepResult(
            status_code=int(value.get("status_code", 200)),
            headers={str(name): str(text) for name, text in headers.items()},
            body=body,
        )
    if isinstance(value, BaseException):
        message = str(value) or type(value).__name__
        return StepResult(status_code=500, body=f"{type(value).__name__}: {message}", error=message)
    return StepResult(body=str(value))


def _call_arguments(
    func: Callable[..., Any], args: Sequence[Any], kwargs: dict[str, Any]
) -> tuple[Sequence[Any], dict[str, Any]]:
    """Arguments for `func(*args, **kwargs)` where positional args skip keyword-given parameters.

    The seed's `merge_results(fetch_user, fetch_order, config, timeout=30)` with
    `args=(config,)` and inputs fetch_user/fetch_order only works this way. Calls
    whose positional args do not collide with keywords are returned unchanged.
    """
    try:
        parameters = list(inspect.signature(func).parameters.values())
    except (TypeError, ValueError):
        return args, kwargs
    positional = [
        p.name for p in parameters if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
    ]
    if not any(name in kwargs for name in positional[: len(args)]):
        return args, kwargs
    free = [
        p.name for p in parameters if p.kind is p.POSITIONAL_OR_KEYWORD and p.name not in kwargs
    ]
    if len(args) > len(free):
        return args, kwargs
    return (), {**kwargs, **dict(zip(free, args, strict=False))}


def _failure(message: str) -> StepResult:
    return StepResult(
        status_code=500, headers={"content-type": _TEXT_PLAIN}, body=message, error=message
    )


# Node kinds.
_EGRESS, _INTERNAL, _ORDER, _PIPE = range(4)
_KIND_OF_TYPE: dict[type, int] = {
    EgressStep: _EGRESS,
    InternalStep: _INTERNAL,
    Order: _ORDER,
    Pipe: _PIPE,
}
# Node states.
_IDLE, _BLOCKED, _RUNNING, _FINISHED, _CANCELLED = range(5)


def _kind_of_subclass(node: object) -> int:
    """Kind of a node whose type is a subclass of a node type (slow path)."""
    for cls, cls_kind in _KIND_OF_TYPE.items():
        if isinstance(node, cls):
            return cls_kind
    raise GraphError(f"not a graph node (use order/pipe/EgressStep/InternalStep): {node!r}")


class GraphRun:
    """One execution of a graph: feed it events, perform the actions it returns.

    The tree is flattened at construction into preorder arrays: node n's
    subtree is [n, subtree_end[n]), its first child is n + 1 and its next
    sibling is subtree_end[n]. Each event costs O(1) plus the steps it starts.
    Exactly one `DoneAction` is ever returned; after it, every event returns
    `[]`. Events for unknown or already finished steps are ignored, never raised.
    """

    __slots__ = (
        "_actions",
        "_dependents",
        "_done",
        "_egress_requests",
        "_egress_seq",
        "_failed",
        "_index",
        "_inputs",
        "_kinds",
        "_nodes",
        "_outstanding",
        "_parents",
        "_results",
        "_started",
        "_state",
        "_subtree_ends",
        "_work",
    )

    def __init__(self, graph: Node) -> None:
        nodes: list[Any] = []
        kinds: list[int] = []
        parents: list[int] = []
        index: dict[str, int] = {}
        with_inputs: list[int] = []
        kind_of_type = _KIND_OF_TYPE
        stack: list[tuple[Any, int]] = [(graph, -1)]
        pop, push = stack.pop, stack.extend
        while stack:
            node, parent = pop()
            number = len(nodes)
            nodes.append(node)
            parents.append(parent)
            kind = kind_of_type.get(type(node))
            if kind is None:
                kind = _kind_of_subclass(node)
            kinds.append(kind)
            if kind >= _ORDER:
                push(zip(reversed(node.children), repeat(number)))
            else:
                step_id = node.id
                if step_id in index:
                    raise GraphError(f"duplicate step id {step_id!r}")
                index[step_id] = number
                if node.inputs:
                    with_inputs.append(number)
        count = len(nodes)
        subtree_ends = list(range(1, count + 1))
        for number in range(count - 1, 0, -1):
            parent = parents[number]
            if subtree_ends[number] > subtree_ends[parent]:
                subtree_ends[parent] = subtree_ends[number]

        inputs: list[tuple[int, ...]] = [()] * count
        dependents: dict[int, list[int]] = {}
        for number in with_inputs:
            step = nodes[number]
            resolved = []
            for input_id in dict.fromkeys(step.inputs):
                source = index.get(input_id)
                if source is None:
                    raise GraphError(f"step {step.id!r} lists unknown input {input_id!r}")
                resolved.append(source)
                dependents.setdefault(source, []).append(number)
            inputs[number] = tuple(resolved)

        self._nodes = nodes
        self._kinds = kinds
        self._parents = parents
        self._subtree_ends = subtree_ends
        self._index = index
        self._inputs = inputs
        self._dependents = dependents
        if dependents:
            self._check_acyclic()

        self._state = bytearray(count)
        self._failed = bytearray(count)
        self._results: list[StepResult | None] = [None] * count
        # Pipe: children not finished yet. Blocked step: inputs not finished yet.
        self._outstanding = [0] * count
        self._egress_requests: dict[int, list[Request]] = {}
        self._egress_seq: dict[int, int] = {}
        self._work: deque[tuple[Callable[[int], None], int]] = deque()
        self._actions: list[Action] = []
        self._started = False
        self._done = False

    @property
    def done(self) -> bool:
        """True once the `DoneAction` has been returned."""
        return self._done

    def start(self) -> list[Action]:
        """Begin the run: the actions for every step that can start right away."""
        if self._started or self._done:
            return []
        self._started = True
        actions = self._actions = []
        self._activate(0)
        self._drain()
        return actions

    def on_egress_response(self, step_id: str, seq: int, result: StepResult) -> list[Action]:
        """The response to request `seq` of egress step `step_id` arrived."""
        if self._done:
            return []
        number = self._index.get(step_id)
        if (
            number is None
            or self._kinds[number] != _EGRESS
            or self._state[number] != _RUNNING
            or self._egress_seq[number] != seq
        ):
            return []
        actions = self._actions = []
        requests = self._egress_requests[number]
        following = seq + 1
        if result.ok and following < len(requests):
            self._egress_seq[number] = following
            actions.append(EgressAction(step_id, following, *requests[following]))
            return actions
        self._finish_step(number, result)
        self._drain()
        return actions

    def on_internal_done(self, step_id: str, value: object) -> list[Action]:
        """Internal step `step_id` returned `value` (or raised it, if an exception)."""
        if self._done:
            return []
        number = self._index.get(step_id)
        if number is None or self._kinds[number] != _INTERNAL or self._state[number] != _RUNNING:
            return []
        actions = self._actions = []
        try:
            result = to_step_result(value)
        except Exception as exc:
            result = _failure(
                f"step {step_id!r} returned a value that is not a valid result: "
                f"{type(exc).__name__}: {exc}"
            )
        self._finish_step(number, result)
        self._drain()
        return actions

    def expire(self) -> list[Action]:
        """The request's deadline passed: answer 504 and forget the run."""
        if self._done:
            return []
        self._done = True
        self._release()
        return [
            DoneAction(
                StepResult(
                    status_code=504,
                    headers={"content-type": _TEXT_PLAIN},
                    body="dpumesh: deadline exceeded",
                    error="deadline exceeded",
                )
            )
        ]

    # -- internals -----------------------------------------------------------

    def _check_acyclic(self) -> None:
        """Reject graphs where steps wait on each other through inputs and order positions.

        Each node has a start event (2n) and an end event (2n+1); edges say
        "must happen before". The graph can finish iff this event graph is a DAG.
        """
        kinds, inputs = self._kinds, self._inputs
        count = len(kinds)
        successors: list[list[int]] = [[] for _ in range(2 * count)]
        indegree = [0] * (2 * count)

        def before(first: int, second: int) -> None:
            successors[first].append(second)
            indegree[second] += 1

        for number in range(count):
            start, end = 2 * number, 2 * number + 1
            own = self._children_of(number)
            if kinds[number] < _ORDER:
                before(start, end)
                for source in inputs[number]:
                    before(2 * source + 1, start)
            elif not own:
                before(start, end)
            elif kinds[number] == _ORDER:
                before(start, 2 * own[0])
                for earlier, later in pairwise(own):
                    before(2 * earlier + 1, 2 * later)
                before(2 * own[-1] + 1, end)
            else:
                for child in own:
                    before(start, 2 * child)
                    before(2 * child + 1, end)

        ready = [event for event, degree in enumerate(indegree) if degree == 0]
        while ready:
            for successor in successors[ready.pop()]:
                indegree[successor] -= 1
                if indegree[successor] == 0:
                    ready.append(successor)
        stuck = [
            self._nodes[number].id
            for number in range(count)
            if kinds[number] < _ORDER and indegree[2 * number] > 0
        ]
        if stuck:
            raise GraphError(f"dependency cycle through inputs: steps {stuck} could never start")

    def _activate(self, number: int) -> None:
        """Node `number` may start as far as its position in the tree is concerned."""
        kinds, ends = self._kinds, self._subtree_ends
        kind = kinds[number]
        while kind == _ORDER and number + 1 < ends[number]:
            number += 1  # an order starts by starting its first child
            kind = kinds[number]
        if kind >= _ORDER:
            if number + 1 == ends[number]:
                self._finish_composite(number)
                return
            own = self._children_of(number)
            self._outstanding[number] = len(own)
            for child in own:
                self._activate(child)
        else:
            sources = self._inputs[number]
            if sources:
                state = self._state
                missing = 0
                for source in sources:
                    if state[source] == _CANCELLED:
                        self._finish_step(number, self._never_runs(source, number))
                        return
                    if state[source] != _FINISHED:
                        missing += 1
                if missing:
                    state[number] = _BLOCKED
                    self._outstanding[number] = missing
                    return
            self._launch(number)

    def _children_of(self, number: int) -> list[int]:
        ends = self._subtree_ends
        own = []
        child, end = number + 1, ends[number]
        while child < end:
            own.append(child)
            child = ends[child]
        return own

    def _input_results(self, number: int) -> dict[str, StepResult | None]:
        return {self._nodes[source].id: self._results[source] for source in self._inputs[number]}

    def _launch(self, number: int) -> None:
        """Start step `number`: its position and all its inputs allow it."""
        self._state[number] = _RUNNING
        step = self._nodes[number]
        if self._kinds[number] == _INTERNAL:
            kwargs = dict(step.kwargs) if step.kwargs else {}
            if self._inputs[number]:
                kwargs.update(self._input_results(number))
            args = step.args
            if args and kwargs:
                args, kwargs = _call_arguments(step.func, args, kwargs)
            self._actions.append(InternalAction(step.id, step.func, args, kwargs))
            return
        requests = step.requests
        if requests is None:
            try:
                requests = _check_requests(step.request_builder(**self._input_results(number)))
            except Exception as exc:
                self._finish_step(
                    number,
                    _failure(
                        f"request_builder of step {step.id!r} raised {type(exc).__name__}: {exc}"
                    ),
                )
                return
        if not requests:
            self._finish_step(number, StepResult())
            return
        self._egress_requests[number] = requests
        self._egress_seq[number] = 0
        self._actions.append(EgressAction(step.id, 0, *requests[0]))

    def _finish_step(self, number: int, result: StepResult) -> None:
        self._state[number] = _FINISHED
        self._results[number] = result
        if not result.ok:
            self._failed[number] = 1
        state, outstanding = self._state, self._outstanding
        for waiter in self._dependents.get(number, ()):
            if state[waiter] == _BLOCKED:
                outstanding[waiter] -= 1
                if not outstanding[waiter]:
                    self._work.append((self._launch, waiter))
        self._work.append((self._child_finished, number))

    def _finish_composite(self, number: int) -> None:
        """An empty order/pipe finished as soon as it was started."""
        self._state[number] = _FINISHED
        self._work.append((self._child_finished, number))

    def _child_finished(self, number: int) -> None:
        """Node `number` finished: move its parent on, climbing while parents finish too."""
        parents, kinds, ends, failed = self._parents, self._kinds, self._subtree_ends, self._failed
        while True:
            parent = parents[number]
            if parent < 0:
                self._finish_run()
                return
            if kinds[parent] == _ORDER:
                following, parent_end = ends[number], ends[parent]
                if failed[number]:
                    failed[parent] = 1
                    self._cancel(following, parent_end)
                elif following < parent_end:
                    self._activate(following)
                    return
            else:
                if failed[number]:
                    failed[parent] = 1
                self._outstanding[parent] -= 1
                if self._outstanding[parent]:
                    return
            self._state[parent] = _FINISHED
            number = parent

    def _cancel(self, begin: int, end: int) -> None:
        """Nodes [begin, end) will never run: an earlier sibling stopped their order."""
        state = self._state
        for number in range(begin, end):
            state[number] = _CANCELLED
        if not self._dependents:
            return
        for number in range(begin, end):
            for waiter in self._dependents.get(number, ()):
                if state[waiter] == _BLOCKED:
                    self._finish_step(waiter, self._never_runs(number, waiter))

    def _never_runs(self, source: int, waiter: int) -> StepResult:
        """The failure of a step whose input `source` was cancelled."""
        failed_child = self._cancelled_by(source)
        culprit = self._first_failed_step(failed_child, self._subtree_ends[failed_child])
        nodes = self._nodes
        return _failure(
            f"input {nodes[source].id!r} of step {nodes[waiter].id!r} will never run: "
            f"step {nodes[culprit].id!r} failed before it"
        )

    def _cancelled_by(self, number: int) -> int:
        """The failed child of the stopped order that cancelled `number`."""
        parent = self._parents[number]
        while self._state[parent] == _CANCELLED:
            parent = self._parents[parent]
        return next(child for child in self._children_of(parent) if self._failed[child])

    def _first_failed_step(self, begin: int, end: int) -> int:
        """The first failed step in graph order among nodes [begin, end)."""
        kinds, failed = self._kinds, self._failed
        return next(n for n in range(begin, end) if failed[n] and kinds[n] < _ORDER)

    def _finish_run(self) -> None:
        self._done = True
        if self._failed[0]:
            culprit = self._first_failed_step(0, len(self._nodes))
            step_result = self._results[culprit]
            reason = step_result.error or f"status {step_result.status_code}"
            step_id = self._nodes[culprit].id
            message = f"step {step_id!r} failed: {reason}"
            result = StepResult(
                status_code=500,
                headers={"content-type": _TEXT_PLAIN, FAILED_STEP_HEADER: step_id},
                body=message,
                error=message,
            )
        else:
            result = self._last_result()
        self._actions.append(DoneAction(result))

    def _last_result(self) -> StepResult:
        """The result of the root's last step in graph order (empty if it ends in an empty node)."""
        number = 0
        while self._kinds[number] >= _ORDER:
            own = self._children_of(number)
            if not own:
                return StepResult()
            number = own[-1]
        result = self._results[number]
        assert result is not None
        return result

    def _drain(self) -> None:
        work = self._work
        while work:
            handler, number = work.popleft()
            handler(number)
        if self._done:
            self._release()

    def _release(self) -> None:
        """Drop everything the run holds (results, user callables) once it is done."""
        self._nodes = []
        self._results = []
        self._index = {}
        self._dependents = {}
        self._egress_requests = {}
