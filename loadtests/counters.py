"""A stack's request counters: the delta between two readings, and readings from the network.

A reading is a `Traffic` dict (`harness.measure.accounting` documents the
shape: ``entry_requests``, ``per_service``, ``errors``, ``cross_node``, ``raw``). The harness
and the Locust web UI's Mesh tab (`loadtests.webui`) both count "requests
since then" with `since`, so a counter that restarted is handled by one rule;
it lives here, below both, because `loadtests` never imports `harness`.
No Locust import.
"""

from __future__ import annotations

from typing import Any

Traffic = dict[str, Any]
#: The fields of a reading that cross the network (`raw` stays with its reader).
MESH_FIELDS = ("entry_requests", "per_service", "errors", "cross_node")

#: At most this many services in a reading from the network (a workmodel has tens).
MAX_SERVICES = 1024
MAX_NAME_CHARS = 256


def since(after: Traffic, before: Traffic) -> Traffic:
    """The requests counted between two readings; `raw` stays `after`'s absolute counters.

    A counter's process may have restarted in between: `counted_since`."""
    per_service = {
        svc: counted_since(n, before["per_service"].get(svc, 0))
        for svc, n in after["per_service"].items()
    }
    errors = {
        svc: counted_since(n, before["errors"].get(svc, 0)) for svc, n in after["errors"].items()
    }
    entry = counted_since(after["entry_requests"], before["entry_requests"])
    cross = counted_since(after["cross_node"], before["cross_node"])
    return traffic(entry, per_service, after["raw"], errors, cross)


def counted_since(after: int, before: int) -> int:
    """A counter's increase; a counter below its earlier reading restarted from zero
    (its process was restarted), so all of `after` is new (what the dead one counted
    after `before` is lost: a lower bound)."""
    return after - before if after >= before else after


def traffic(
    entry: int,
    per_service: dict[str, int],
    raw: dict[str, Any],
    errors: dict[str, int],
    cross_node: int = 0,
) -> Traffic:
    """A `Traffic` reading from its parts (`cross_node`: requests carried between nodes)."""
    return {
        "entry_requests": entry,
        "per_service": per_service,
        "errors": errors,
        "cross_node": cross_node,
        "raw": raw,
    }


def parse_traffic(doc: Any) -> Traffic:
    """A reading received as JSON (its `MESH_FIELDS`), checked.

    Raises `ValueError` unless every count is a non-negative integer and every
    service name a short string; the reading's `raw` is empty (never sent).
    """
    if not isinstance(doc, dict):
        raise ValueError("counters: not a JSON object")
    entry = _count(doc.get("entry_requests"), "entry_requests")
    per_service = _counts(doc.get("per_service"), "per_service")
    errors = _counts(doc.get("errors"), "errors")
    return traffic(entry, per_service, {}, errors, _count(doc.get("cross_node"), "cross_node"))


def _count(value: Any, what: str) -> int:
    if type(value) is not int or value < 0:  # bool is an int subclass: not a count
        raise ValueError(f"counters: {what} is not a count: {value!r:.40}")
    return value


def _counts(value: Any, what: str) -> dict[str, int]:
    if not isinstance(value, dict) or len(value) > MAX_SERVICES:
        raise ValueError(f"counters: {what} is not an object of at most {MAX_SERVICES} services")
    out = {}
    for name, n in value.items():
        if not isinstance(name, str) or not 0 < len(name) <= MAX_NAME_CHARS:
            raise ValueError(f"counters: bad service name in {what}: {name!r:.40}")
        out[name] = _count(n, f"{what}[{name}]")
    return out
