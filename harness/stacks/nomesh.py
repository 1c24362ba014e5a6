"""`nomesh`, the floor: one plain-HTTP app per service instance, calling the others directly.

The entry service's app on node 1 itself takes the public port: the floor has
no proxy, so nothing sits in front of it and the public port costs nothing.
An app calls a callee's instance on its own node, else those on the other
nodes round robin (`--upstream` once per target: `topology.targets`).
"""

from __future__ import annotations

from harness.stacks.cell import Cell, app_counters, http_app
from harness.stacks.model import Counters, StackDescription


def upstreams(cell: Cell, node: str) -> tuple[str, ...]:
    """The `--upstream` arguments of an app on `node`: each callee's nearest instances."""
    args = []
    for svc in cell.services:
        for target in cell.topology.targets(node, svc):
            name = cell.app_of(svc, target)
            args += ["--upstream", f"{svc}=http://{{host:{name}}}:{{port:{name}:http}}"]
    return tuple(args)


def describe(cell: Cell) -> StackDescription:
    entry_node = cell.topology.nodes[0]
    apps = tuple(
        http_app(
            cell,
            svc,
            upstreams(cell, node),
            public=svc == cell.entry and node == entry_node,
            node=node,
        )
        for svc, node in cell.instances()
    )
    front = (cell.app_of(cell.entry, entry_node),)
    return cell.stack("nomesh", apps, Counters("nomesh", app_counters(apps)), front)
