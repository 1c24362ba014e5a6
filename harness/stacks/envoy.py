"""`envoy`: per service a pod of the app and its Envoy sidecar, plus an Envoy ingress gateway.

The app sends every call to its sidecar's outbound listener (`--egress-proxy`,
over the pod's loopback); the outbound listener routes by `Host` to the
callee's sidecar's inbound listener, which hands it to the callee's app. The
gateway on the public port routes like the DPUmesh bridge. Every Envoy's
bootstrap is generated from the rendered stack (`baselines.envoy.config`), so
its addresses are the deployer's, and is checked by Envoy's own validation.
"""

from __future__ import annotations

import json

from baselines.envoy import config as envoy
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
    StackDescription,
)
from mubench.http_app import HEALTH_PATH as APP_HEALTH_PATH

GATEWAY = envoy.GATEWAY
CONFIG = "envoy-config"
CONFIG_MOUNT = "/etc/envoy/envoy.json"
GATEWAY_ADMIN_PORT = 9901


def sidecar_name(service: str) -> str:
    return envoy.sidecar_name(service)


def mesh_description(cell: Cell, resolver: Resolver, reader: Component) -> envoy.MeshDescription:
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
        services,
        envoy.GatewayPorts(port(GATEWAY, "public"), port(GATEWAY, "admin")),
        entry=cell.entry,
        concurrency=cell.settings.envoy_concurrency,
        listen_address=resolver.bind(reader),
        service_hosts={svc: resolver.host(reader, sidecar_name(svc)) for svc in cell.services},
    )


def _bootstrap(cell: Cell) -> File:
    def generate(resolver: Resolver, reader: Component) -> str:
        config = envoy.render(mesh_description(cell, resolver, reader))[reader.name]
        return json.dumps(config, indent=2) + "\n"

    return File(CONFIG, CONFIG_MOUNT, generate=generate, check=envoy.validate)


def _envoy(
    cell: Cell, name: str, role: str, ports: dict[str, Port], service: str = ""
) -> Component:
    return Component(
        name=name,
        role=role,
        service=service,
        program="envoy",
        args=tuple(envoy.envoy_args(cell.settings.envoy_concurrency, "{file:envoy-config}")),
        ports=ports,
        probe=Probe("admin", "/ready"),
        files=(_bootstrap(cell),),
    )


def describe(cell: Cell) -> StackDescription:
    components: list[Component] = []
    for svc in cell.services:
        pod = sidecar_name(svc)
        egress = ("--egress-proxy", f"http://{{host:{pod}}}:{{port:{pod}:outbound}}")
        components.append(http_app(cell, svc, egress, network_of=pod))
    for svc in cell.services:
        ports = {
            "inbound": Port(service_port(cell, svc, 1)),
            "outbound": Port(service_port(cell, svc, 2)),
            "admin": Port(service_port(cell, svc, 3), read=True),
        }
        components.append(_envoy(cell, sidecar_name(svc), "sidecar", ports, svc))
    gateway_ports = {
        "public": Port(PUBLIC_PORT, public=True, read=True),
        "admin": Port(GATEWAY_ADMIN_PORT, read=True),
    }
    components.append(_envoy(cell, GATEWAY, "gateway", gateway_ports))
    endpoints = app_counters(cell)
    endpoints |= {
        f"admin:{sidecar_name(svc)}": (sidecar_name(svc), "admin") for svc in cell.services
    }
    endpoints[f"admin:{GATEWAY}"] = (GATEWAY, "admin")
    return StackDescription(
        mesh="envoy",
        settings=cell.settings,
        entry=cell.entry,
        services=cell.services,
        plan=cell.plan,
        warnings=cell.warnings,
        components=tuple(components),
        probe_path=APP_HEALTH_PATH,
        counters=Counters("envoy", endpoints),
        front=(GATEWAY, sidecar_name(cell.entry), app_name(cell.entry)),
    )
