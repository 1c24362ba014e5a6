"""`nodeproxy`: one Envoy per node shared by every app on it (ambient-like), plus the gateway.

The design between per-pod sidecars and a DPU: Istio's ambient mode (one
ztunnel per node) and Cilium's per-node Envoy take the proxy out of every pod
but keep it on the host's cores. Here each node of the run
(`harness.stacks.topology`; one, this machine, without `--nodes`) has one
node proxy, `nodeproxy-<node>` (role `nodeproxy`, CPU set `host`), and
nothing else of the stack differs from `envoy`: the same apps, gateway and
Envoy tuning.

* An app sends a call for service S to its node proxy's outbound listener
  for S (`--upstream S=<node proxy>:<out port of S>`: the explicit stand-in
  for ambient's redirection by destination address), which hands it to S's
  app when S has an instance on the same node, so a call crosses the node
  proxy once each way (ambient's same-node path), and else to the inbound
  listener for S on the proxies of S's nodes, round robin (source node
  proxy, then destination node proxy).
* The gateway calls the inbound listener for the service on its node's proxy.
* With `Settings.mtls`, every Envoy-to-Envoy hop (the gateway's, and node to
  node) is mutual TLS; app to node proxy and node proxy to app stay plaintext.

Counted per service by its node's proxy: the requests and 5xx answers of its
inbound and outbound listeners (`inbound_<svc>`, `outbound_to_<svc>`). The
apps' own counters agree when every request into an app came through its
node proxy (asserted by `tests/test_nodeproxy.py`). One listener per service
and direction rather than one routing by `Host`: with the router's
`dynamic_stats` off (the fairness tuning), only a listener counts a
service's 5xx answers, Envoy's own 503s for a dead app included; a request
takes one listener either way.
Bootstraps: `baselines.envoy.config.render_nodes`, checked by Envoy itself.
"""

from __future__ import annotations

from typing import Any

from baselines.envoy import config as envoy
from harness.stacks.cell import Cell, http_app, service_port
from harness.stacks.envoy import (
    GATEWAY,
    crossing_stats,
    envoy_component,
    envoy_counters,
    gateway_ports,
    mesh_ca,
    served_at,
    shared_view,
)
from harness.stacks.model import Component, Port, Resolver, StackDescription

ROLE = "nodeproxy"
ADMIN_PORT = 15000  # Istio's number for a proxy's admin port (istio.io, "Ports used by Istio")


def inbound_port(cell: Cell, service: str) -> str:
    """The name of a node proxy's port for calls into `service` from other Envoys."""
    return f"in-{cell.services.index(service)}"


def outbound_port(cell: Cell, service: str) -> str:
    """The name of a node proxy's port for its apps' calls to `service`."""
    return f"out-{cell.services.index(service)}"


def node_mesh_description(
    cell: Cell, resolver: Resolver, reader: Component, envoys: dict[str, Component]
) -> envoy.NodeMeshDescription:
    """The Envoy generator's view of the rendered stack, as the Envoy `reader` sees it."""

    def port(component: str, name: str) -> int:
        return resolver.port(reader, component, name)

    topology = cell.topology
    apps = {
        svc: {
            node: envoy.AppAddress(
                port(cell.app_of(svc, node), "http"), resolver.host(reader, cell.app_of(svc, node))
            )
            for node in topology.nodes_of(svc)
        }
        for svc in cell.services
    }
    proxies = {node: envoy.node_proxy_name(node) for node in topology.nodes}
    return envoy.NodeMeshDescription(
        apps=apps,
        nodes={
            node: envoy.NodeProxyPorts(
                inbound={s: port(name, inbound_port(cell, s)) for s in topology.services_on(node)},
                outbound={s: port(name, outbound_port(cell, s)) for s in cell.services},
                admin_port=port(name, "admin"),
            )
            for node, name in proxies.items()
        },
        node_hosts={node: resolver.host(reader, name) for node, name in proxies.items()},
        **shared_view(cell, resolver, reader, envoys),
    )


def describe(cell: Cell) -> StackDescription:
    ca = mesh_ca(cell, "nodeproxy")
    topology = cell.topology
    envoys: dict[str, Component] = {}  # filled below; read when a bootstrap is rendered

    def bootstraps(resolver: Resolver, reader: Component) -> dict[str, dict[str, Any]]:
        return envoy.render_nodes(node_mesh_description(cell, resolver, reader, envoys))

    apps = []
    for svc, node in cell.instances():
        proxy = envoy.node_proxy_name(node)
        routing = tuple(
            arg
            for callee in cell.services
            for arg in (
                "--upstream",
                f"{callee}=http://{{host:{proxy}}}:{{port:{proxy}:{outbound_port(cell, callee)}}}",
            )
        )
        apps.append(http_app(cell, svc, routing, node=node))
    for node in topology.nodes:
        name = envoy.node_proxy_name(node)
        # The sidecars' port numbers (in a container of its own, nothing else binds them).
        ports = {
            **{
                inbound_port(cell, s): Port(service_port(cell, s, 1))
                for s in topology.services_on(node)
            },
            **{outbound_port(cell, s): Port(service_port(cell, s, 2)) for s in cell.services},
            "admin": Port(ADMIN_PORT, read=True),
        }
        envoys[name] = envoy_component(cell, name, ROLE, ports, bootstraps, ca, node=node)
    entry_node = topology.nodes[0]
    envoys[GATEWAY] = envoy_component(
        cell, GATEWAY, "gateway", gateway_ports(), bootstraps, ca, node=entry_node
    )
    served = {
        svc: tuple(
            served_at(
                envoy.node_proxy_name(node),
                [envoy.inbound_stat_prefix(svc), envoy.outbound_to_stat_prefix(svc)],
            )
            for node in topology.nodes_of(svc)
        )
        for svc in cell.services
    }
    crossing = crossing_stats(cell, envoys)
    return cell.stack(
        "nodeproxy",
        (*apps, *envoys.values()),
        envoy_counters(apps, envoys, served, crossing),
        (
            GATEWAY,
            envoy.node_proxy_name(entry_node),
            cell.app_of(cell.entry, entry_node),
        ),
    )
