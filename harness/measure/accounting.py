"""How many requests crossed a stack, read from the stack's own counters.

A run compares these counts with the load generator's (DESIGN §5: "requests
counted by the stack match requests counted by the load generator"). Every
reader returns the same shape, a `Traffic` dict::

    {"entry_requests": N,           # requests that came in on the public port
     "per_service": {svc: n, ...},  # requests each service received (entry + calls)
     "errors": {svc: n, ...},       # of those, answered with a 5xx (fault blast radius)
     "cross_node": N,               # requests the stack carried from one node to another
     "raw": {...}}                  # the counters they were taken from (absolute)

A service with instances on several nodes (`harness.stacks.topology`) is
counted over all of them. Cross-node requests rely on the one routing rule
(`topology.crosses`): a request leaves a node exactly when its service has
no instance there, so each stack counts them where they leave: the sidecars'
`fallback` (DPUmesh), each Envoy's `to_<svc>` cluster for a service with no
instance on its node (`Counters.crossing`), the apps' calls per callee
(`calls`, nomesh). Service calls and requests a gateway or bridge sent to
another node both count; the load generator's requests to the entry point
do not (it is a client, on a node of its own).

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
* `dpumesh`: every node's bridge `/_dpumesh/stats`: entry = the requests the
  entry node's bridge routed to a service for clients (`ingress`, summed; not
  its own `/_dpumesh/*` endpoints, nor what other nodes' sidecars sent it),
  per service = `requests` (ingress + egress) on the nodes it runs on.
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
from harness.stacks.model import ServedAt, StackDescription
from loadtests.counters import Traffic as Traffic  # the counter arithmetic, re-exported
from loadtests.counters import counted_since as counted_since
from loadtests.counters import since as since
from loadtests.counters import traffic as _traffic
from mubench.http_app import STATS_PATH as APP_STATS_PATH

#: Where a reader finds a counter endpoint: (component, port name) -> (address, port).
AddressOf = Callable[[str, str], tuple[str, int]]
Address = tuple[str, int]


def get_json(address: Address, path: str, timeout_s: float = 5.0) -> Any:
    """`GET address/path` as JSON (plain http.client: proxy variables never apply)."""
    host, port = address
    conn = http.client.HTTPConnection(host, port, timeout=timeout_s)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        body = resp.read()
    finally:
        conn.close()
    if resp.status != 200:
        raise RuntimeError(f"GET {host}:{port}{path} answered {resp.status}: {body[:200]!r}")
    return json.loads(body)


def app_counters(apps: Mapping[str, Address]) -> dict[str, dict[str, Any]]:
    """Each plain-HTTP app's counters (summed over its gunicorn workers), by component."""
    return {name: get_json(address, APP_STATS_PATH) for name, address in apps.items()}


def _per_service(
    desc: StackDescription, apps: Mapping[str, Mapping[str, Any]], field: str
) -> dict[str, int]:
    """One app counter summed over each service's instances."""
    totals = dict.fromkeys(desc.services, 0)
    for name, counters in apps.items():
        totals[desc.component(name).service] += counters[field]
    return totals


def app_crossings(desc: StackDescription, apps: Mapping[str, Mapping[str, Any]]) -> int:
    """Calls the apps made to services with no instance on their node (`calls` per callee)."""
    topology = desc.topology
    node_of = {name: desc.component(name).node for name in apps}
    return sum(
        n
        for name, counters in apps.items()
        for callee, n in counters["calls"].items()
        if callee in topology.instances and topology.crosses(node_of[name], callee)
    )


def nomesh_traffic(desc: StackDescription, apps: Mapping[str, Address]) -> Traffic:
    """Traffic of the no-mesh stack, from the apps' own counters."""
    counters = app_counters(apps)
    public = desc.public[0].name
    return _traffic(
        counters[public]["requests"],
        _per_service(desc, counters, "requests"),
        {"apps": counters},
        _per_service(desc, counters, "errors"),
        app_crossings(desc, counters),
    )


def envoy_traffic(
    desc: StackDescription, admin: Mapping[str, Address], apps: Mapping[str, Address]
) -> Traffic:
    """Traffic of an Envoy stack, from every Envoy's admin stats (plus the apps').

    `admin` is each Envoy's admin address by name (the gateway's included); one read each.
    """
    served = desc.counters.served
    wanted: dict[str, list[str]] = {name: [] for name in admin}
    for instances in served.values():
        for at in instances:
            wanted[at.proxy] += [*at.requests, *at.errors]
    for proxy, stat in desc.counters.crossing:
        wanted[proxy].append(stat)
    stats = {
        name: counted_stats(port, wanted[name], host=host) for name, (host, port) in admin.items()
    }

    def total(instances: tuple[ServedAt, ...], field: str) -> int:
        return sum(stats[at.proxy].get(name, 0) for at in instances for name in getattr(at, field))

    per_service = {svc: total(at, "requests") for svc, at in served.items()}
    errors = {svc: total(at, "errors") for svc, at in served.items()}
    crossed = sum(stats[proxy].get(stat, 0) for proxy, stat in desc.counters.crossing)
    every = mesh_listeners(stats.values())
    raw = {"listeners": every, "apps": app_counters(apps)}
    return _traffic(every[GATEWAY]["downstream_rq_total"], per_service, raw, errors, crossed)


def dpumesh_traffic(desc: StackDescription, bridges: Mapping[str, Address]) -> Traffic:
    """Traffic of the DPUmesh stack, from every node's bridge counters.

    A service's requests and 5xx answers are counted by the sidecars of the nodes it
    runs on (a request another node's sidecar sent on through its fallback is counted
    there too, as `fallback`: the requests carried between nodes), plus the fallbacks
    that got no answer from the peer (`fallback_errors`, 502/504, counted by the
    sender only); entry requests are the entry node's bridge `ingress`, which leaves
    out what other sidecars sent it (`peer_ingress`).
    """
    topology = desc.topology
    stats = {node: get_json(address, BRIDGE_STATS_PATH) for node, address in bridges.items()}

    def counted(field: str) -> dict[str, int]:
        return {
            svc: sum(
                stats[node]["services"].get(svc, {}).get(field, 0)
                for node in topology.nodes_of(svc)
            )
            for svc in desc.services
        }

    def everywhere(svc: str, field: str) -> int:
        return sum(one["services"].get(svc, {}).get(field, 0) for one in stats.values())

    errors = {svc: n + everywhere(svc, "fallback_errors") for svc, n in counted("errors").items()}
    entry = sum(c.get("ingress", 0) for c in stats[topology.nodes[0]]["services"].values())
    crossed = sum(c.get("fallback", 0) for one in stats.values() for c in one["services"].values())
    raw = {"bridge": stats[topology.nodes[0]], "bridges": stats}
    return _traffic(entry, counted("requests"), raw, errors, crossed)


def reader(desc: StackDescription, address_of: AddressOf) -> Callable[[], Traffic]:
    """A no-argument reader of a stack's `Traffic`, its counter endpoints resolved once.

    `address_of` is the deployer's: where (component, port) is reachable from here.
    """
    counters = desc.counters
    where = {key: address_of(*at) for key, at in counters.endpoints.items()}

    def of(kind: str) -> dict[str, Address]:
        return {k.removeprefix(kind): a for k, a in where.items() if k.startswith(kind)}

    if counters.kind == "dpumesh":
        return lambda: dpumesh_traffic(desc, of("bridge:"))
    if counters.kind == "nomesh":
        return lambda: nomesh_traffic(desc, of("app:"))
    if counters.kind == "envoy":
        return lambda: envoy_traffic(desc, of("admin:"), of("app:"))
    raise ValueError(f"no traffic reader for {counters.kind!r}")
