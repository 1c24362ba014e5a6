"""Which node each service's instances run on (DESIGN §8): pure, shared by every stack.

A run on `nodes` N >= 1 spreads the workmodel's services over nodes
`node1`..`nodeN`: where `--place SVC=K` puts them, the others round robin in
the workmodel's order from node 1 (the entry service first, so on node 1). A service
whose workmodel spec asks for `replicas` R (μBench's key: pods of the
service, each with the spec's `workers`) runs one instance on each of
min(R, N) nodes, its own node first, then the next ones round robin; every
instance runs the service's planned workers. The entry point (bridge,
gateway, entry app) is on node 1, so the entry service must be there.

`nodes` 0 is the machine itself: one node, `LOCAL_NODE`, no namespaces;
replicas are then one instance (its workers are already several processes).

Routing between instances is the one rule of `dpumesh.routing.nearest`,
which every stack applies: an instance on the caller's node, else round
robin over the callee's other nodes. So a call from node `a` to service S
crosses nodes exactly when S has no instance on `a` (`crosses`), which is
what the stacks' counters of cross-node calls rely on.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from dpumesh.routing import nearest
from harness.names import LOCAL_NODE

MAX_NODES = 32  # addresses of one /24 (harness.deploy.netns)


def node_name(number: int) -> str:
    """The name of node `number` (1-based): `node1`, `node2`, ..."""
    return f"node{number}"


def node_names(count: int) -> tuple[str, ...]:
    """The names of `count` nodes, in order."""
    return tuple(node_name(k) for k in range(1, count + 1))


def parse_place(text: str) -> tuple[tuple[str, int], ...]:
    """`s0=1,s1=2` as ((service, node number), ...); ValueError naming the bad item."""
    pairs = []
    for item in (part.strip() for part in text.split(",")):
        if not item:
            continue
        service, sep, number = item.partition("=")
        if not sep or not service.strip() or not number.strip().isdigit():
            raise ValueError(f"expected SVC=NODE (e.g. s1=2), not {item!r}")
        pairs.append((service.strip(), int(number)))
    services = [s for s, _ in pairs]
    if len(set(services)) != len(services):
        raise ValueError(f"a service is placed twice: {','.join(services)}")
    return tuple(pairs)


@dataclass(frozen=True)
class Topology:
    """The nodes of a run and, per service, the nodes its instances run on (first = its own)."""

    nodes: tuple[str, ...]
    instances: Mapping[str, tuple[str, ...]]
    isolated: bool  # True: nodes are network namespaces (`--nodes N`), False: this machine

    def nodes_of(self, service: str) -> tuple[str, ...]:
        return self.instances[service]

    def services_on(self, node: str) -> tuple[str, ...]:
        """The services with an instance on `node`, in workmodel order."""
        return tuple(s for s, nodes in self.instances.items() if node in nodes)

    def targets(self, caller: str, service: str) -> tuple[str, ...]:
        """The nodes a call from `caller` to `service` goes to (`dpumesh.routing.nearest`)."""
        return nearest(caller, self.instances[service])

    def crosses(self, caller: str, service: str) -> bool:
        """Whether a call from `caller` to `service` leaves the caller's node."""
        return caller not in self.instances[service]

    def replicated(self, service: str) -> bool:
        """Whether `service` runs more than one instance (its components' names carry the node)."""
        return len(self.instances[service]) > 1

    def empty_nodes(self) -> tuple[str, ...]:
        """Nodes no service runs on (their per-node parts still start: say so)."""
        return tuple(n for n in self.nodes if not self.services_on(n))

    def as_dict(self) -> dict[str, object]:
        return {
            "nodes": list(self.nodes),
            "isolated": self.isolated,
            "services": {s: list(n) for s, n in self.instances.items()},
        }


def place(
    services: Sequence[str],
    entry: str,
    count: int,
    placed: Sequence[tuple[str, int]] = (),
    replicas: Mapping[str, int] | None = None,
) -> Topology:
    """Where each service runs on `count` nodes (0: this machine); ValueError if impossible."""
    if not 0 <= count <= MAX_NODES:
        raise ValueError(f"nodes must be between 0 and {MAX_NODES}, not {count}")
    if count == 0:
        if placed:
            raise ValueError("--place needs --nodes N (N >= 1)")
        return Topology((LOCAL_NODE,), dict.fromkeys(services, (LOCAL_NODE,)), isolated=False)
    explicit = dict(placed)
    unknown = sorted(set(explicit) - set(services))
    if unknown:
        raise ValueError(f"--place names services not in the workmodel: {', '.join(unknown)}")
    beyond = sorted(s for s, n in explicit.items() if not 1 <= n <= count)
    if beyond:
        raise ValueError(f"--place puts {', '.join(beyond)} on no node 1..{count}")
    if explicit.get(entry, 1) != 1:
        raise ValueError(f"the entry service {entry} must be on node 1 (the entry point's node)")
    order = [entry, *(s for s in services if s != entry)]
    unplaced = [s for s in order if s not in explicit]
    instances = {}
    for service in order:
        first = explicit.get(service) or unplaced.index(service) % count + 1
        wanted = min(max(1, (replicas or {}).get(service, 1)), count)
        numbers = [(first - 1 + k) % count + 1 for k in range(wanted)]
        instances[service] = tuple(node_name(n) for n in numbers)
    return Topology(node_names(count), {s: instances[s] for s in services}, isolated=True)
