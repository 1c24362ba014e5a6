"""Stack descriptions (DESIGN §7): each stack described once, as data.

`describe(mesh, settings)` builds the `StackDescription` of `dpumesh`,
`envoy`, `nodeproxy` or `nomesh` from the workmodel and the cell settings.
Deployers (`harness.deploy`) run a description; they never decide what runs.

`Settings.mtls` applies to the Envoy stacks (`ENVOY_MESHES`); the others
have no hop between two proxies to encrypt, so they run as without it, and
their description says so in its warnings (printed at start, recorded in
`stack.json`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from harness.names import ENVOY_MESHES, MESHES
from harness.stacks import dpumesh, envoy, nodeproxy, nomesh
from harness.stacks.cell import Cell, load_cell
from harness.stacks.model import Settings, StackDescription

_BUILDERS: dict[str, Callable[[Cell], StackDescription]] = {
    "dpumesh": dpumesh.describe,
    "envoy": envoy.describe,
    "nodeproxy": nodeproxy.describe,
    "nomesh": nomesh.describe,
}
assert tuple(_BUILDERS) == MESHES


def describe(mesh: str, settings: Settings, cell: Cell | None = None) -> StackDescription:
    """The description of `mesh` (`WorkmodelError` for an unusable workmodel).

    Pass `cell` to reuse one loaded workmodel for several stacks.
    """
    if mesh not in _BUILDERS:
        raise ValueError(f"mesh {mesh!r} is not one of {', '.join(MESHES)}")
    desc = _BUILDERS[mesh](cell or load_cell(settings))
    if desc.settings.mtls and not desc.mtls:  # asked for, but no Envoy-to-Envoy hop here
        note = (
            f"mtls applies to {' and '.join(ENVOY_MESHES)} only: {mesh} has no hop between "
            "two proxies to encrypt and runs plaintext, as without it"
        )
        desc = dataclasses.replace(desc, warnings=(*desc.warnings, note))
    return desc
