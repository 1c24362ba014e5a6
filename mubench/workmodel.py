"""Load and validate a μBench `workmodel.json`, and size the processes that serve it.

A workmodel is `{service_id: spec}` (DESIGN.md §4). Real μBench workmodels carry
many keys this project does not use (`image`, `namespace`, `cpu-requests`,
`teastore_ref`, `function_id`, ...): those are ignored, so upstream files load
unchanged. Everything the cell relies on is checked here, once, so a bad file
fails at start-up with one line naming the file, the service and the key
instead of failing every request. That includes the parameters of the built-in
internal functions (`mubench/internal.py`): `_BUILTIN_PARAMS` lists every key
they read and what each accepts.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from typing import Any

DEFAULT_PATH = "/api/v1"
# Used when a spec has no `workers`/`threads` (μBench's generators always write both).
DEFAULT_WORKERS = 1
DEFAULT_THREADS = 16
# Real workmodels ask for 4-9 workers x up to 20 services; on a 2-core machine
# that is hundreds of processes fighting for two CPUs, which measures the
# scheduler, not the mesh. Two per service and 24 in total keep every service
# multi-process where it matters and the whole topology under ~1 GiB RSS.
DEFAULT_PER_SERVICE_CAP = 2
DEFAULT_TOTAL_CAP = 24
# A service id is a URL path segment (`/<id>/...` on the sidecar), a Host name and
# part of Envoy cluster, listener and stat names: no dots, colons or slashes.
# The one definition of a valid id, for the Envoy config (baselines/envoy) too.
SERVICE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,62}")


class WorkmodelError(ValueError):
    """A workmodel that cannot be used; `str()` is one line naming file, service and key."""


@dataclass(frozen=True)
class Group:
    """One external-service group: called in parallel with the other groups."""

    seq_len: int
    services: tuple[str, ...]
    # Only entries for services of this group are kept (others are ignored, as in μBench).
    probabilities: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class Behavior:
    """What a service does for one behaviour id: its internal function and its call groups."""

    function: str
    params: dict[str, Any]
    groups: tuple[Group, ...]


@dataclass(frozen=True)
class Service:
    """One service of the workmodel, with defaults filled in."""

    id: str
    url: str
    path: str
    behavior: Behavior
    # `?bid=<id>` selects one of these instead of `behavior` (see cell.py).
    alternatives: dict[str, Behavior] = field(default_factory=dict)
    workers: int | None = None
    threads: int | None = None
    # μBench's pods of the service, each with `workers`: instances on that many nodes
    # (`harness.stacks.topology`).
    replicas: int | None = None

    def behavior_for(self, bid: str | None) -> Behavior:
        """The behaviour selected by a request's `bid` (the default one when it matches none)."""
        if bid is None:
            return self.behavior
        return self.alternatives.get(bid, self.behavior)


Workmodel = dict[str, Service]


def load_workmodel(path: str, custom: Collection[str] = ()) -> Workmodel:
    """Read, validate and normalise the workmodel at `path`.

    `custom` names custom functions: their parameters are free-form, also when
    one replaces a built-in of the same name.
    """
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as e:
        reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
        raise WorkmodelError(f"{path}: cannot read: {reason}") from None
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as e:
        raise WorkmodelError(
            f"{path}: invalid JSON: {e.msg} at line {e.lineno} column {e.colno}"
        ) from None
    return parse_workmodel(raw, source=path, custom=custom)


def parse_workmodel(
    raw: Any, source: str = "workmodel.json", custom: Collection[str] = ()
) -> Workmodel:
    """Validate an already-decoded workmodel; `source` names it in errors."""
    if not isinstance(raw, dict):
        raise WorkmodelError(f"{source}: top level must be an object of services, got {_kind(raw)}")
    if not raw:
        raise WorkmodelError(f"{source}: no services defined")
    for sid in raw:
        if not SERVICE_ID.fullmatch(sid):
            raise WorkmodelError(
                f"{source}: service id {json.dumps(sid)} must match {SERVICE_ID.pattern} "
                "(it is a URL path segment, a Host name and an Envoy cluster name)"
            )
    defined = set(raw)
    custom = frozenset(custom)
    return {sid: _Parser(source, sid, defined, custom).service(spec) for sid, spec in raw.items()}


def plan_processes(
    workmodel: Workmodel,
    per_service_cap: int = DEFAULT_PER_SERVICE_CAP,
    total_cap: int = DEFAULT_TOTAL_CAP,
) -> tuple[dict[str, tuple[int, int]], list[str]]:
    """Decide `(workers, threads)` per service under the caps; say what was cut.

    Each service first gets `min(workers, per_service_cap)`; while the total is
    above `total_cap`, the service with the most workers (the last in file
    order on ties, so the entry service keeps its share longest) loses one.
    No service goes below one worker. Threads are not capped: gunicorn's
    gthread pool starts threads on demand, so idle ones cost nothing.
    """
    if per_service_cap < 1 or total_cap < 1:
        raise ValueError("process caps must be at least 1")
    wanted = {sid: s.workers or DEFAULT_WORKERS for sid, s in workmodel.items()}
    alloc = {sid: min(w, per_service_cap) for sid, w in wanted.items()}
    order = list(reversed(alloc))
    while sum(alloc.values()) > total_cap:
        biggest = max(order, key=alloc.__getitem__)
        if alloc[biggest] == 1:
            break
        alloc[biggest] -= 1

    total = sum(alloc.values())
    warnings = []
    for sid, want in wanted.items():
        if alloc[sid] < want:
            reasons = []
            if want > per_service_cap:
                reasons.append(f"per-service cap {per_service_cap}")
            if alloc[sid] < min(want, per_service_cap):
                reasons.append(f"total cap {total_cap} over {len(alloc)} services")
            warnings.append(
                f"service '{sid}': workers {want} -> {alloc[sid]} ({', '.join(reasons)})"
            )
    if total > total_cap:
        warnings.append(
            f"total cap {total_cap} is below one worker per service: using {total} workers"
        )
    plan = {sid: (alloc[sid], workmodel[sid].threads or DEFAULT_THREADS) for sid in workmodel}
    return plan, warnings


def _kind(value: Any) -> str:
    """A short, one-line description of a JSON value for error messages."""
    if isinstance(value, dict):
        return "an object"
    if isinstance(value, list):
        return "an array"
    text = json.dumps(value)
    return text if len(text) <= 40 else text[:37] + "..."


# What a built-in internal function accepts, key by key, as (test, description).
_Check = tuple[Callable[[Any], bool], str]
_FLAG: _Check = (lambda v: isinstance(v, bool), "true or false")
_COUNT: _Check = (lambda v: _is_int(v) and v >= 0, "a non-negative integer")
_POSITIVE: _Check = (lambda v: _is_int(v) and v >= 1, "a positive integer")
_SECONDS: _Check = (lambda v: _is_finite(v) and v >= 0, "a number >= 0 (seconds)")
_DIGITS: _Check = (
    lambda v: (
        isinstance(v, list)
        and len(v) == 2
        and all(_is_int(d) and d >= 0 for d in v)
        and v[0] <= v[1]
    ),
    "[low, high] with integers 0 <= low <= high (pi digits)",
)

# The parameters mubench/internal.py's built-ins read: a nested dict is an
# object of parameters (a loader stage), a leaf says what its value accepts.
# Absent keys take the built-in defaults; keys not listed are ignored, as
# μBench does (`function_id`, `tmp_file_name`, ...). `mean_response_size` is
# checked for every function. `colosseum` ignores its parameters.
_BUILTIN_PARAMS: dict[str, dict[str, Any]] = {
    "compute_pi": {"range_complexity": _DIGITS},
    "loader": {
        "cpu_stress": {
            "run": _FLAG,
            "range_complexity": _DIGITS,
            "thread_pool_size": _POSITIVE,
            "trials": _COUNT,
        },
        "memory_stress": {"run": _FLAG, "memory_size": _COUNT, "memory_io": _COUNT},
        "disk_stress": {
            "run": _FLAG,
            "disk_write_block_count": _COUNT,
            "disk_write_block_size": _COUNT,
        },
        "sleep_stress": {"run": _FLAG, "sleep_time": _SECONDS},
    },
    "colosseum": {},
}


class _Parser:
    """Validates one service spec; every error names file, service and key."""

    def __init__(self, source: str, sid: str, defined: set[str], custom: frozenset[str]) -> None:
        self.source = source
        self.sid = sid
        self.defined = defined
        self.custom = custom

    def fail(self, message: str) -> WorkmodelError:
        return WorkmodelError(f"{self.source}: service '{self.sid}': {message}")

    def bad(self, key: str, expected: str, value: Any) -> WorkmodelError:
        return self.fail(f"'{key}' must be {expected}, got {_kind(value)}")

    def service(self, spec: Any) -> Service:
        if not isinstance(spec, dict):
            raise self.fail(f"spec must be an object, got {_kind(spec)}")
        if "internal_service" not in spec:
            raise self.fail("missing 'internal_service'")
        default = Behavior(
            *self.internal(spec["internal_service"], "internal_service"),
            self.groups(spec.get("external_services", []), "external_services"),
        )
        return Service(
            id=self.sid,
            url=self.string(spec.get("url", self.sid), "url"),
            path=self.url_path(spec.get("path", DEFAULT_PATH)),
            behavior=default,
            alternatives=self.alternatives(spec.get("alternative_behaviors", {}), default),
            workers=self.positive(spec.get("workers"), "workers"),
            threads=self.positive(spec.get("threads"), "threads"),
            replicas=self.positive(spec.get("replicas"), "replicas"),
        )

    def internal(self, value: Any, key: str) -> tuple[str, dict[str, Any]]:
        """`{function_name: params}`; μBench uses the first key."""
        if not isinstance(value, dict) or not value:
            raise self.bad(key, "an object {function_name: params}", value)
        name, params = next(iter(value.items()))
        if not isinstance(params, dict):
            raise self.bad(f"{key}.{name}", "an object of parameters", params)
        params = dict(params)
        if "mean_bandwidth" in params:
            # Legacy name; μBench lets it override mean_response_size.
            params["mean_response_size"] = params.pop("mean_bandwidth")
        size = params.get("mean_response_size", 0)
        if not _is_finite(size) or size < 0:
            raise self.bad(f"{key}.{name}.mean_response_size", "a number >= 0 (kB)", size)
        if name not in self.custom:
            self.params(params, _BUILTIN_PARAMS.get(name, {}), f"{key}.{name}")
        return name, params

    def params(self, params: Mapping[str, Any], schema: Mapping[str, Any], key: str) -> None:
        """Check the keys of `schema` present in `params`, recursing into stages."""
        for name, rule in schema.items():
            if name not in params:
                continue
            value, where = params[name], f"{key}.{name}"
            if isinstance(rule, dict):
                if not isinstance(value, dict):
                    raise self.bad(where, "an object", value)
                self.params(value, rule, where)
            elif not rule[0](value):
                raise self.bad(where, rule[1], value)

    def groups(self, value: Any, key: str) -> tuple[Group, ...]:
        if not isinstance(value, list):
            raise self.bad(key, "an array of groups", value)
        return tuple(self.group(g, f"{key}[{i}]") for i, g in enumerate(value))

    def group(self, value: Any, key: str) -> Group:
        if not isinstance(value, dict):
            raise self.bad(key, "an object", value)
        if "seq_len" not in value:
            raise self.fail(f"missing '{key}.seq_len'")
        seq_len = value["seq_len"]
        if not _is_int(seq_len) or seq_len < 0:
            raise self.bad(f"{key}.seq_len", "a non-negative integer", seq_len)
        services = value.get("services")
        if not isinstance(services, list) or not all(isinstance(s, str) for s in services):
            raise self.bad(f"{key}.services", "an array of service ids", services)
        for callee in services:
            if callee not in self.defined:
                raise self.fail(f"'{key}.services' calls undefined service '{callee}'")
        probabilities = value.get("probabilities", {})
        if not isinstance(probabilities, dict):
            raise self.bad(f"{key}.probabilities", "an object", probabilities)
        kept = {}
        for callee, p in probabilities.items():
            if callee not in services:
                continue
            if not _is_number(p):
                raise self.bad(f"{key}.probabilities.{callee}", "a number", p)
            kept[callee] = float(p)
        return Group(seq_len, tuple(services), kept)

    def alternatives(self, value: Any, default: Behavior) -> dict[str, Behavior]:
        """Each alternative replaces the internal service and/or the groups it names."""
        key = "alternative_behaviors"
        if not isinstance(value, dict):
            raise self.bad(key, "an object", value)
        result = {}
        for bid, alt in value.items():
            where = f"alternative_behaviors.{bid}"
            if not isinstance(alt, dict):
                raise self.bad(where, "an object", alt)
            function, params = default.function, default.params
            if "internal_service" in alt:
                key = f"{where}.internal_service"
                function, params = self.internal(alt["internal_service"], key)
            groups = default.groups
            if "external_services" in alt:
                groups = self.groups(alt["external_services"], f"{where}.external_services")
            result[bid] = Behavior(function, params, groups)
        return result

    def string(self, value: Any, key: str) -> str:
        if not isinstance(value, str) or not value:
            raise self.bad(key, "a non-empty string", value)
        return value

    def url_path(self, value: Any) -> str:
        if not isinstance(value, str) or not value.startswith("/"):
            raise self.bad("path", "a string starting with '/'", value)
        return value

    def positive(self, value: Any, key: str) -> int | None:
        if value is None:
            return None
        if not _is_int(value) or value < 1:
            raise self.bad(key, "a positive integer", value)
        return value


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _is_finite(value: Any) -> bool:
    """A number other than NaN and ±Infinity (which Python's JSON parser accepts)."""
    return _is_number(value) and (isinstance(value, int) or math.isfinite(value))
