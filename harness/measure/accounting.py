"""How many requests crossed a stack, read from the stack's own counters.

A run compares these counts with the load generator's (DESIGN §5: "requests
counted by the stack match requests counted by the load generator"). Every
reader returns the same shape, a `Traffic` dict::

    {"entry_requests": N,           # requests that came in on the public port
     "per_service": {svc: n, ...},  # requests each service received (entry + calls)
     "errors": {svc: n, ...},       # of those, answered with a 5xx (fault blast radius)
     "raw": {...}}                  # the counters they were taken from (absolute)

Differences between two readings (`since`, `counted_since`) live in
`loadtests.counters`, which the Locust web UI's Mesh tab uses too.

Errors per service are the callee side's count of 5xx answers: the bridge's
per-service `errors` (DPUmesh: 5xx routed to the service, its 503s and 504s
included), the 5xx count of the Envoy in front of the service's app (Envoy
stacks: also counts a dead app behind a live proxy) and the app's own
`errors` (nomesh). A caller answering 500 because a callee failed counts too,
so a fault's errors show how far it spread.

Sources:

* `envoy` (the `envoy` and `nodeproxy` stacks): Envoy admin stats. Entry
  requests: the gateway listener's `downstream_rq_total`. Per service: the
  stats the description names (`Counters.served`): a sidecar's `inbound_<svc>`
  listener, or on the service's node proxy its `inbound_<svc>` (from other
  Envoys) plus `outbound_to_<svc>` (from the node's apps) listeners.
  `raw["listeners"]` holds every listener of every Envoy, a prefix found on
  several summed (a sidecar's `outbound_<svc>`, a node proxy's
  `outbound_to_<svc>` too, so a run can prove calls left through the
  proxies), `raw["apps"]` the apps' own counters, which equal the
  per-service counts when every request into an app came through the Envoy
  in front of it (the stack tests assert it, `tests/test_nodeproxy.py`,
  `tests/test_stacks.py`; a run's self-checks do not, since requests in
  flight at a window's edges make them differ by a few).
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

from baselines.envoy.config import GATEWAY, counted_stats, mesh_listeners
from dpumesh.dpu_daemon import STATS_PATH as BRIDGE_STATS_PATH
from harness.stacks.model import Counters, ServedAt
from loadtests.counters import Traffic as Traffic  # the counter arithmetic, re-exported
from loadtests.counters import counted_since as counted_since
from loadtests.counters import since as since
from loadtests.counters import traffic as _traffic
from mubench.http_app import STATS_PATH as APP_STATS_PATH

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
    admin: Mapping[str, int], served: Mapping[str, ServedAt], app_ports: Mapping[str, int]
) -> Traffic:
    """Traffic of an Envoy stack, from every Envoy's admin stats (plus the apps').

    `admin` is each Envoy's admin port by name (the gateway's included); one read each.
    """
    wanted: dict[str, list[str]] = {name: [] for name in admin}
    for at in served.values():
        wanted[at.proxy] += [*at.requests, *at.errors]
    stats = {name: counted_stats(port, wanted[name]) for name, port in admin.items()}

    def total(proxy: str, names: tuple[str, ...]) -> int:
        return sum(stats[proxy].get(name, 0) for name in names)

    per_service = {svc: total(at.proxy, at.requests) for svc, at in served.items()}
    errors = {svc: total(at.proxy, at.errors) for svc, at in served.items()}
    every = mesh_listeners(stats.values())
    raw = {"listeners": every, "apps": app_counters(app_ports)}
    return _traffic(every[GATEWAY]["downstream_rq_total"], per_service, raw, errors)


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
        admin = {
            key.removeprefix("admin:"): p for key, p in ports.items() if key.startswith("admin:")
        }
        return lambda: envoy_traffic(admin, counters.served, apps)
    raise ValueError(f"no traffic reader for {counters.kind!r}")
