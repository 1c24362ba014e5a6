"""`nomesh`, the floor: one plain-HTTP app per service, calling the others directly.

The entry service's app itself takes the public port: the floor has no proxy,
so nothing sits in front of it and the public port costs nothing.
"""

from __future__ import annotations

from harness.stacks.cell import Cell, app_counters, app_name, http_app
from harness.stacks.model import Counters, StackDescription


def describe(cell: Cell) -> StackDescription:
    routing = tuple(
        arg
        for svc in cell.services
        for arg in (
            "--upstream",
            f"{svc}=http://{{host:{app_name(svc)}}}:{{port:{app_name(svc)}:http}}",
        )
    )
    apps = tuple(http_app(cell, svc, routing, public=svc == cell.entry) for svc in cell.services)
    return cell.stack(
        "nomesh", apps, Counters("nomesh", app_counters(cell)), (app_name(cell.entry),)
    )
