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
from harness.stacks.cell import (
    PUBLIC_PORT,
    Cell,
    app_counters,
    app_name,
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
    )


def gateway_ports() -> dict[str, Port]:
    """The gateway's ports: the stack's public port and its admin."""
    return {
        "public": Port(PUBLIC_PORT, public=True, read=True),
        "admin": Port(GATEWAY_ADMIN_PORT, read=True),
    }


def served_at(proxy: str, listeners: list[str]) -> ServedAt:
    """A service counted by the listeners (stat prefixes) of `proxy` that lead to its app."""
    return ServedAt(
        proxy,
        tuple(envoy.listener_stat(p, "downstream_rq_total") for p in listeners),
        tuple(envoy.listener_stat(p, "downstream_rq_5xx") for p in listeners),
    )


def envoy_counters(
    cell: Cell, envoys: Mapping[str, Component], served: Mapping[str, ServedAt]
) -> Counters:
    """The counters of an Envoy stack: every Envoy's admin, the apps', and per service `served`."""
    endpoints = app_counters(cell)
    endpoints |= {f"admin:{name}": (name, "admin") for name in envoys}
    return Counters("envoy", endpoints, dict(served))


def shared_view(
    cell: Cell, resolver: Resolver, reader: Component, envoys: Mapping[str, Component]
) -> dict[str, Any]:
    """What both meshes' generator descriptions hold alike (the gateway, entry, tuning,
    listening address and mTLS files), as the Envoy `reader` sees the rendered stack."""
    return {
        "gateway": envoy.GatewayPorts(
            resolver.port(reader, GATEWAY, "public"), resolver.port(reader, GATEWAY, "admin")
        ),
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

    services = {
        svc: envoy.ServicePorts(
            app_port=port(app_name(svc), "http"),
            inbound_port=port(sidecar_name(svc), "inbound"),
            outbound_port=port(sidecar_name(svc), "outbound"),
            admin_port=port(sidecar_name(svc), "admin"),
        )
        for svc in cell.services
    }
    return envoy.MeshDescription(
        services=services,
        service_hosts={svc: resolver.host(reader, sidecar_name(svc)) for svc in cell.services},
        **shared_view(cell, resolver, reader, envoys),
    )


def describe(cell: Cell) -> StackDescription:
    ca = mesh_ca(cell, "envoy")
    envoys: dict[str, Component] = {}  # filled below; read when a bootstrap is rendered

    def bootstraps(resolver: Resolver, reader: Component) -> dict[str, dict[str, Any]]:
        return envoy.render(mesh_description(cell, resolver, reader, envoys))

    apps = []
    for svc in cell.services:
        pod = sidecar_name(svc)
        egress = ("--egress-proxy", f"http://{{host:{pod}}}:{{port:{pod}:outbound}}")
        apps.append(http_app(cell, svc, egress, network_of=pod))
    for svc in cell.services:
        ports = {
            "inbound": Port(service_port(cell, svc, 1)),
            "outbound": Port(service_port(cell, svc, 2)),
            "admin": Port(service_port(cell, svc, 3), read=True),
        }
        name = sidecar_name(svc)
        envoys[name] = envoy_component(cell, name, "sidecar", ports, bootstraps, ca, svc)
    envoys[GATEWAY] = envoy_component(cell, GATEWAY, "gateway", gateway_ports(), bootstraps, ca)
    served = {
        svc: served_at(sidecar_name(svc), [envoy.inbound_stat_prefix(svc)]) for svc in cell.services
    }
    return cell.stack(
        "envoy",
        (*apps, *envoys.values()),
        envoy_counters(cell, envoys, served),
        (GATEWAY, sidecar_name(cell.entry), app_name(cell.entry)),
    )
