"""`envoy`: per service a pod of the app and its Envoy sidecar, plus an Envoy ingress gateway.

The app sends every call to its sidecar's outbound listener (`--egress-proxy`,
over the pod's loopback); the outbound listener routes by `Host` to the
callee's sidecar's inbound listener, which hands it to the callee's app. The
gateway on the public port routes like the DPUmesh bridge. Every Envoy's
bootstrap is generated from the rendered stack (`baselines.envoy.config`), so
its addresses are the deployer's, and is checked by Envoy's own validation.

Also what both Envoy stacks (this one and `nodeproxy`) build their Envoys
from: `envoy_component` (the program, its tuning, its bootstrap and, with
`Settings.mtls`, its certificates), the gateway's ports and the counters.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from typing import Any

from baselines.envoy import config as envoy
from baselines.envoy.tls import MeshCa
from harness.names import LOCAL_NODE
from harness.stacks.cell import (
    PUBLIC_PORT,
    Cell,
    app_counters,
    http_app,
    service_port,
)
from harness.stacks.model import (
    Component,
    Counters,
    File,
    Port,
    Probe,
    Resolver,
    ServedAt,
    StackDescription,
)

GATEWAY = envoy.GATEWAY
CONFIG = "envoy-config"
CONFIG_MOUNT = "/etc/envoy/envoy.json"
GATEWAY_ADMIN_PORT = 9901
# Certificate files of an Envoy with mTLS (all secret): the mesh CA's, its own and its key.
TLS_CA, TLS_CERT, TLS_KEY = "tls-ca", "tls-cert", "tls-key"
TLS_MOUNTS = {
    TLS_CA: "/etc/envoy/tls/ca.pem",
    TLS_CERT: "/etc/envoy/tls/cert.pem",
    TLS_KEY: "/etc/envoy/tls/key.pem",
}
# The Envoys' bootstraps as one reader sees the stack: config name -> bootstrap.
Bootstraps = Callable[[Resolver, Component], Mapping[str, Mapping[str, Any]]]


def sidecar_name(service: str) -> str:
    return envoy.sidecar_name(service)


def mesh_ca(cell: Cell, mesh: str) -> MeshCa | None:
    """A fresh CA for the stack's Envoys when the settings ask for mTLS."""
    return MeshCa(mesh) if cell.settings.mtls else None


def tls_files(ca: MeshCa | None) -> tuple[File, ...]:
    """An Envoy's certificate files: the CA's certificate, its own certificate and key."""
    if ca is None:
        return ()
    contents = {
        TLS_CA: lambda _resolver, _reader: ca.ca_pem,
        TLS_CERT: lambda _resolver, reader: ca.issue(reader.name).cert_pem,
        TLS_KEY: lambda _resolver, reader: ca.issue(reader.name).key_pem,
    }
    return tuple(
        File(name, TLS_MOUNTS[name], generate=generate, secret=True)
        for name, generate in contents.items()
    )


def mtls_paths(resolver: Resolver, envoys: Mapping[str, Component]) -> dict[str, envoy.MtlsFiles]:
    """Where each Envoy reads its certificate files (none without mTLS)."""
    return {
        name: envoy.MtlsFiles(*(resolver.file(c, f) for f in (TLS_CA, TLS_CERT, TLS_KEY)))
        for name, c in envoys.items()
        if any(f.name == TLS_CA for f in c.files)
    }


def envoy_component(
    cell: Cell,
    name: str,
    role: str,
    ports: dict[str, Port],
    bootstraps: Bootstraps,
    ca: MeshCa | None,
    service: str = "",
    node: str = LOCAL_NODE,
) -> Component:
    """One Envoy of an Envoy stack: tuned command line, bootstrap (checked by Envoy), certificates.

    `bootstraps` renders the mesh's Envoys as this one sees the stack; its own is written.
    """

    def generate(resolver: Resolver, reader: Component) -> str:
        return json.dumps(bootstraps(resolver, reader)[reader.name], indent=2) + "\n"

    return Component(
        name=name,
        role=role,
        service=service,
        program="envoy",
        args=tuple(envoy.envoy_args(cell.settings.envoy_concurrency, f"{{file:{CONFIG}}}")),
        ports=ports,
        probe=Probe("admin", "/ready"),
        files=(File(CONFIG, CONFIG_MOUNT, generate=generate, check=envoy.validate), *tls_files(ca)),
        node=node,
    )


def gateway_ports() -> dict[str, Port]:
    """The gateway's ports: the stack's public port and its admin."""
    return {
        "public": Port(PUBLIC_PORT, public=True, read=True),
        "admin": Port(GATEWAY_ADMIN_PORT, read=True),
    }


def served_at(proxy: str, listeners: list[str]) -> ServedAt:
    """An instance counted by the listeners (stat prefixes) of `proxy` that lead to its app."""
    return ServedAt(
        proxy,
        tuple(envoy.listener_stat(p, "downstream_rq_total") for p in listeners),
        tuple(envoy.listener_stat(p, "downstream_rq_5xx") for p in listeners),
    )


def crossing_stats(cell: Cell, envoys: Mapping[str, Component]) -> tuple[tuple[str, str], ...]:
    """The (Envoy, stat) pairs counting requests carried to another node: each Envoy's
    `to_<svc>` cluster for a service with no instance on its node (every Envoy of both
    stacks, gateway included, reaches every service)."""
    topology = cell.topology
    return tuple(
        (name, envoy.cluster_stat(envoy.callee_cluster(svc), "upstream_rq_total"))
        for name, component in envoys.items()
        for svc in cell.services
        if topology.crosses(component.node, svc)
    )


def envoy_counters(
    apps: list[Component],
    envoys: Mapping[str, Component],
    served: Mapping[str, tuple[ServedAt, ...]],
    crossing: tuple[tuple[str, str], ...],
) -> Counters:
    """The counters of an Envoy stack: every Envoy's admin, the apps', and per service `served`."""
    endpoints = app_counters(apps)
    endpoints |= {f"admin:{name}": (name, "admin") for name in envoys}
    return Counters("envoy", endpoints, dict(served), crossing)


def shared_view(
    cell: Cell, resolver: Resolver, reader: Component, envoys: Mapping[str, Component]
) -> dict[str, Any]:
    """What both meshes' generator descriptions hold alike (the gateway, its node, entry,
    tuning, listening address and mTLS files), as the Envoy `reader` sees the rendered stack."""
    return {
        "gateway": envoy.GatewayPorts(
            resolver.port(reader, GATEWAY, "public"), resolver.port(reader, GATEWAY, "admin")
        ),
        "gateway_node": envoys[GATEWAY].node,
        "entry": cell.entry,
        "concurrency": cell.settings.envoy_concurrency,
        "listen_address": resolver.bind(reader),
        "mtls": mtls_paths(resolver, envoys),
    }


def mesh_description(
    cell: Cell, resolver: Resolver, reader: Component, envoys: Mapping[str, Component]
) -> envoy.MeshDescription:
    """The Envoy generator's view of the rendered stack, as the Envoy `reader` sees it."""

    def port(component: str, name: str) -> int:
        return resolver.port(reader, component, name)

    sidecars = {
        name: envoy.Sidecar(
            service=c.service,
            node=c.node,
            app_port=port(cell.app_of(c.service, c.node), "http"),
            inbound_port=port(name, "inbound"),
            outbound_port=port(name, "outbound"),
            admin_port=port(name, "admin"),
            host=resolver.host(reader, name),
        )
        for name, c in envoys.items()
        if c.role == "sidecar"
    }
    return envoy.MeshDescription(sidecars=sidecars, **shared_view(cell, resolver, reader, envoys))


def sidecar_of(cell: Cell, service: str, node: str) -> str:
    """The component name of `service`'s sidecar on `node`."""
    return cell.instance_name(sidecar_name(service), service, node)


def describe(cell: Cell) -> StackDescription:
    ca = mesh_ca(cell, "envoy")
    envoys: dict[str, Component] = {}  # filled below; read when a bootstrap is rendered

    def bootstraps(resolver: Resolver, reader: Component) -> dict[str, dict[str, Any]]:
        return envoy.render(mesh_description(cell, resolver, reader, envoys))

    apps = []
    for svc, node in cell.instances():
        pod = sidecar_of(cell, svc, node)
        egress = ("--egress-proxy", f"http://{{host:{pod}}}:{{port:{pod}:outbound}}")
        apps.append(http_app(cell, svc, egress, network_of=pod, node=node))
    for svc, node in cell.instances():
        ports = {
            "inbound": Port(service_port(cell, svc, 1)),
            "outbound": Port(service_port(cell, svc, 2)),
            "admin": Port(service_port(cell, svc, 3), read=True),
        }
        name = sidecar_of(cell, svc, node)
        envoys[name] = envoy_component(cell, name, "sidecar", ports, bootstraps, ca, svc, node)
    entry_node = cell.topology.nodes[0]
    envoys[GATEWAY] = envoy_component(
        cell, GATEWAY, "gateway", gateway_ports(), bootstraps, ca, node=entry_node
    )
    served = {
        svc: tuple(
            served_at(sidecar_of(cell, svc, node), [envoy.inbound_stat_prefix(svc)])
            for node in cell.topology.nodes_of(svc)
        )
        for svc in cell.services
    }
    crossing = crossing_stats(cell, envoys)
    return cell.stack(
        "envoy",
        (*apps, *envoys.values()),
        envoy_counters(apps, envoys, served, crossing),
        (
            GATEWAY,
            sidecar_of(cell, cell.entry, entry_node),
            cell.app_of(cell.entry, entry_node),
        ),
    )
