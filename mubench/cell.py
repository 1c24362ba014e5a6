"""The μBench cell semantics core: what one request makes a service do (DESIGN.md §4).

Pure decision logic shared by both runtimes (`http_app`, `dpumesh_app`): given
a service, a request and a seed it returns a `Plan` (internal function +
parameters, then call groups). Runtimes only execute plans, so the mesh under
test is the only thing that differs between stacks.

Rules, as in μBench's `CellController`/`ExternalServiceExecutor`:

- GET (and a POST with an empty body or `request-type: iot`) is stochastic: per
  group, if `seq_len < len(services)` pick `seq_len` distinct services with
  `random.sample`, else take all in file order; then keep each one only if
  `random() < probabilities.get(svc, 1)` (one draw per service, always).
- POST `{"<own id>": [ {callee: subtrace, ...}, ... ]}` is trace-driven: each
  list element is a group calling exactly its keys in key order, each callee
  receiving `{callee: subtrace}`. A key may carry a `__suffix` (μBench's escape
  to call one service twice in a group); the callee is the part before `__`.
  A `"dummy"` key (μBench's padding) is ignored.
- `?bid=<id>` selects `alternative_behaviors[id]`, which replaces the internal
  service and/or the external services it defines (the external ones only for
  stochastic requests: a trace says what to call). The query string is
  forwarded on every call, so the behaviour id reaches the callees (μBench
  does the same).
- Trace headers are forwarded unchanged on every call.

Randomness: a request carrying `x-request-id` gets `Random(sha256(seed, service,
request id))`, so every runtime makes the same choices for it. Other requests
draw their seed from a per-process stream seeded from (seed, service, pid), so
forked workers do not mirror each other. The plan's `rng` continues into the
internal function.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs

from mubench.workmodel import Behavior, Group, Service, Workmodel

TRACE_HEADERS = (
    "x-request-id",
    "x-b3-traceid",
    "x-b3-spanid",
    "x-b3-parentspanid",
    "x-b3-sampled",
    "x-b3-flags",
    "x-ot-span-context",
    "traceparent",
    "tracestate",
)
TRACE_KEY_ESCAPE = "__"
_DUMMY_KEY = "dummy"


class TraceError(ValueError):
    """A trace-driven request whose body is not a usable trace (answered with 400)."""


@dataclass(frozen=True)
class Request:
    """The parts of an incoming HTTP request the cell looks at."""

    method: str
    body: bytes = b""
    headers: Mapping[str, str] = field(default_factory=dict)
    query_string: str = ""


@dataclass(frozen=True)
class Call:
    """One downstream call. `path` already carries the forwarded query string."""

    service: str
    method: str
    path: str
    body: str | None
    headers: dict[str, str]

    @property
    def url(self) -> str:
        """The mesh-style URL: the callee's service id is the host."""
        return f"http://{self.service}{self.path}"


@dataclass(frozen=True)
class Plan:
    """What to do for one request: internal function first, then the groups in parallel."""

    function: str
    params: dict[str, Any]
    # Groups run in parallel; calls inside a group run one after another.
    # Groups left empty by sampling are dropped.
    groups: tuple[tuple[Call, ...], ...]
    # Trace headers of the request, echoed on the response like μBench does.
    headers: dict[str, str]
    rng: random.Random = field(compare=False, repr=False)


class Cell:
    """Plans requests for one service of a workmodel."""

    def __init__(self, workmodel: Workmodel, service_id: str, seed: int = 0) -> None:
        if service_id not in workmodel:
            raise KeyError(f"service '{service_id}' is not in the workmodel")
        self.workmodel = workmodel
        self.service: Service = workmodel[service_id]
        self.seed = seed
        self._lock = threading.Lock()
        self._stream_pid = -1
        self._stream = random.Random()

    def plan(self, request: Request) -> Plan:
        """Decide the internal work and the downstream calls for `request`."""
        headers = {k.lower(): v for k, v in request.headers.items()}
        forwarded = {h: headers[h] for h in TRACE_HEADERS if h in headers}
        bid = parse_qs(request.query_string).get("bid", ["default"])[0]
        behavior = self.service.behavior_for(None if bid == "default" else bid)
        suffix = f"?{request.query_string}" if request.query_string else ""
        rng = self.request_rng(headers.get("x-request-id"))

        if self._is_trace(request, headers):
            groups = self._trace_groups(request.body, forwarded, suffix)
        else:
            groups = self._sampled_groups(behavior, rng, forwarded, suffix)
        return Plan(
            behavior.function,
            behavior.params,
            tuple(g for g in groups if g),
            forwarded,
            rng,
        )

    def request_rng(self, request_id: str | None) -> random.Random:
        """The random stream for one request (reproducible when it has an id)."""
        if request_id is not None:
            return random.Random(_derive_seed(self.seed, self.service.id, request_id))
        with self._lock:
            pid = os.getpid()
            if pid != self._stream_pid:
                self._stream.seed(_derive_seed(self.seed, self.service.id, str(pid)))
                self._stream_pid = pid
            return random.Random(self._stream.getrandbits(64))

    @staticmethod
    def _is_trace(request: Request, headers: Mapping[str, str]) -> bool:
        return (
            request.method.upper() == "POST"
            and bool(request.body.strip())
            and headers.get("request-type", "tracedriven").lower() != "iot"
        )

    def _sampled_groups(
        self,
        behavior: Behavior,
        rng: random.Random,
        headers: dict[str, str],
        suffix: str,
    ) -> list[tuple[Call, ...]]:
        return [
            tuple(
                Call(svc, "GET", self.workmodel[svc].path + suffix, None, dict(headers))
                for svc in _sample_group(group, rng)
            )
            for group in behavior.groups
        ]

    def _trace_groups(
        self, body: bytes, headers: dict[str, str], suffix: str
    ) -> list[tuple[Call, ...]]:
        post_headers = {**headers, "content-type": "application/json"}
        groups = []
        for group in self._parse_trace(body):
            calls = []
            for key, subtrace in group.items():
                callee = key.split(TRACE_KEY_ESCAPE)[0]
                if callee not in self.workmodel:
                    raise TraceError(f"trace calls undefined service '{callee}'")
                path = self.workmodel[callee].path + suffix
                try:
                    payload = json.dumps({key: subtrace})
                except RecursionError:
                    raise TraceError("trace is nested too deeply") from None
                calls.append(Call(callee, "POST", path, payload, dict(post_headers)))
            groups.append(tuple(calls))
        return groups

    def _parse_trace(self, body: bytes) -> list[dict[str, Any]]:
        """The groups of a trace addressed to this service."""
        try:
            trace = json.loads(body)
        except (ValueError, UnicodeDecodeError):
            raise TraceError("trace body is not valid JSON") from None
        except RecursionError:  # hostile nesting: a 400, never a 500 with a traceback
            raise TraceError("trace is nested too deeply") from None
        if not isinstance(trace, dict):
            raise TraceError("trace must be a JSON object")
        keys = [k for k in trace if k != _DUMMY_KEY]
        if len(keys) != 1:
            raise TraceError(f"trace must have exactly one service key, got {len(keys)}")
        key = keys[0]
        if key.split(TRACE_KEY_ESCAPE)[0] != self.service.id:
            raise TraceError(f"trace is for '{key}', this service is '{self.service.id}'")
        groups = trace[key]
        if groups in ({}, [], None):
            return []
        if not isinstance(groups, list) or not all(isinstance(g, dict) for g in groups):
            raise TraceError(f"trace['{key}'] must be an array of objects")
        return groups


def _sample_group(group: Group, rng: random.Random) -> list[str]:
    """μBench's per-group choice: sample `seq_len` if fewer, then one coin per service."""
    if group.seq_len < len(group.services):
        chosen = rng.sample(group.services, group.seq_len)
    else:
        chosen = list(group.services)
    return [svc for svc in chosen if rng.random() < group.probabilities.get(svc, 1.0)]


def _derive_seed(seed: int, service: str, key: str) -> int:
    """A stable 64-bit seed (sha256, unlike `hash()`, is the same in every process)."""
    digest = hashlib.sha256(f"{seed}\0{service}\0{key}".encode()).digest()
    return int.from_bytes(digest[:8], "big")
