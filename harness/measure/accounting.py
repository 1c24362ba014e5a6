"""How many requests crossed a stack, read from the stack's own counters.

A run compares these counts with the load generator's (DESIGN §5: "requests
counted by the stack match requests counted by the load generator"). Every
reader returns the same shape, a `Traffic` dict::

    {"entry_requests": N,           # requests that came in on the public port
     "per_service": {svc: n, ...},  # requests each service received (entry + calls)
     "errors": {svc: n, ...},       # of those, answered with a 5xx (fault blast radius)
     "raw": {...}}                  # the counters they were taken from (absolute)

Errors per service are the callee side's count of 5xx answers: the bridge's
per-service `errors` (DPUmesh: 5xx routed to the service, its 503s and 504s
included), the service's inbound sidecar listener's `downstream_rq_5xx`
(Envoy: also counts a dead app behind a live sidecar) and the app's own
`errors` (nomesh). A caller answering 500 because a callee failed counts too,
so a fault's errors show how far it spread.

Sources:

* `envoy`: Envoy admin stats, `downstream_rq_total` per listener: the gateway
  listener for entry requests, each sidecar's `inbound_<svc>` per service.
  `raw["listeners"]` holds every listener (`outbound_<svc>` too, so a run can
  prove calls left through the sidecars) and `raw["apps"]` the apps' own
  counters, which must equal the inbound counts.
* `dpumesh`: the bridge's `/_dpumesh/stats`: entry = the requests the bridge
  routed to a service (`ingress`, summed; the bridge's own `/_dpumesh/*`
  endpoints are not in it), per service = `requests` (ingress + egress).
* `nomesh`: each app's `/_mubench/stats` (`requests`, which excludes the
  health and stats endpoints); entry = the entry service's count, so any call
  a service makes *to* the entry service counts too (there is no proxy to
  tell them apart).
"""

from __future__ import annotations

import http.client
import json
from collections.abc import Callable, Mapping
from typing import Any

from baselines.envoy.config import GATEWAY, inbound_stat_prefix, mesh_counts, sidecar_name
from dpumesh.dpu_daemon import STATS_PATH as BRIDGE_STATS_PATH
from harness.stacks.model import Counters
from mubench.http_app import STATS_PATH as APP_STATS_PATH

Traffic = dict[str, Any]
#: Where a reader finds a counter endpoint: (component, port name) -> port on 127.0.0.1.
PortOf = Callable[[str, str], int]


def get_json(port: int, path: str, timeout_s: float = 5.0) -> Any:
    """`GET 127.0.0.1:port/path` as JSON (plain http.client: proxy variables never apply)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout_s)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        body = resp.read()
    finally:
        conn.close()
    if resp.status != 200:
        raise RuntimeError(f"GET :{port}{path} answered {resp.status}: {body[:200]!r}")
    return json.loads(body)


def app_counters(app_ports: Mapping[str, int]) -> dict[str, dict[str, int]]:
    """Each plain-HTTP app's counters (summed over its gunicorn workers)."""
    return {svc: get_json(port, APP_STATS_PATH) for svc, port in app_ports.items()}


def nomesh_traffic(app_ports: Mapping[str, int], entry: str) -> Traffic:
    """Traffic of the no-mesh stack, from the apps' own counters."""
    apps = app_counters(app_ports)
    per_service = {svc: c["requests"] for svc, c in apps.items()}
    errors = {svc: c["errors"] for svc, c in apps.items()}
    return _traffic(per_service[entry], per_service, {"apps": apps}, errors)


def envoy_traffic(
    gateway_admin: int, sidecar_admin: Mapping[str, int], app_ports: Mapping[str, int]
) -> Traffic:
    """Traffic of the Envoy stack, from every proxy's admin stats (plus the apps')."""
    listeners = mesh_counts(gateway_admin, sidecar_admin)
    inbound = {svc: listeners[inbound_stat_prefix(svc)] for svc in sidecar_admin}
    per_service = {svc: c["downstream_rq_total"] for svc, c in inbound.items()}
    errors = {svc: c["downstream_rq_5xx"] for svc, c in inbound.items()}
    entry = listeners[GATEWAY]["downstream_rq_total"]
    raw = {"listeners": listeners, "apps": app_counters(app_ports)}
    return _traffic(entry, per_service, raw, errors)


def dpumesh_traffic(bridge_port: int, services: list[str]) -> Traffic:
    """Traffic of the DPUmesh stack, from the bridge's counters."""
    stats = get_json(bridge_port, BRIDGE_STATS_PATH)
    counters = stats["services"]
    per_service = {svc: counters.get(svc, {}).get("requests", 0) for svc in services}
    errors = {svc: counters.get(svc, {}).get("errors", 0) for svc in services}
    entry = sum(c.get("ingress", 0) for c in counters.values())
    return _traffic(entry, per_service, {"bridge": stats}, errors)


def reader(counters: Counters, services: tuple[str, ...], entry: str, port_of: PortOf):
    """A no-argument reader of a stack's `Traffic`, its counter endpoints resolved once.

    `port_of` is the deployer's: where (component, port) is reachable from here.
    """
    ports = {key: port_of(*where) for key, where in counters.endpoints.items()}
    apps = {svc: ports[f"app:{svc}"] for svc in services if f"app:{svc}" in ports}
    if counters.kind == "dpumesh":
        return lambda: dpumesh_traffic(ports["bridge"], list(services))
    if counters.kind == "nomesh":
        return lambda: nomesh_traffic(apps, entry)
    if counters.kind == "envoy":
        sidecars = {svc: ports[f"admin:{sidecar_name(svc)}"] for svc in services}
        return lambda: envoy_traffic(ports[f"admin:{GATEWAY}"], sidecars, apps)
    raise ValueError(f"no traffic reader for {counters.kind!r}")


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
    return _traffic(entry, per_service, after["raw"], errors)


def counted_since(after: int, before: int) -> int:
    """A counter's increase; a counter below its earlier reading restarted from zero
    (its process was restarted), so all of `after` is new (what the dead one counted
    after `before` is lost: a lower bound)."""
    return after - before if after >= before else after


def _traffic(
    entry: int, per_service: dict[str, int], raw: dict[str, Any], errors: dict[str, int]
) -> Traffic:
    return {"entry_requests": entry, "per_service": per_service, "errors": errors, "raw": raw}
