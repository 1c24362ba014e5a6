"""Stack descriptions (DESIGN §7): each stack described once, as data.

`describe(mesh, settings)` builds the `StackDescription` of `dpumesh`,
`envoy` or `nomesh` from the workmodel and the cell settings. Deployers
(`harness.deploy`) run a description; they never decide what runs.
"""

from __future__ import annotations

from collections.abc import Callable

from harness.names import MESHES
from harness.stacks import dpumesh, envoy, nomesh
from harness.stacks.cell import Cell, load_cell
from harness.stacks.model import Settings, StackDescription

_BUILDERS: dict[str, Callable[[Cell], StackDescription]] = {
    "dpumesh": dpumesh.describe,
    "envoy": envoy.describe,
    "nomesh": nomesh.describe,
}
assert tuple(_BUILDERS) == MESHES


def describe(mesh: str, settings: Settings, cell: Cell | None = None) -> StackDescription:
    """The description of `mesh` (`WorkmodelError` for an unusable workmodel).

    Pass `cell` to reuse one loaded workmodel for several stacks.
    """
    if mesh not in _BUILDERS:
        raise ValueError(f"mesh {mesh!r} is not one of {', '.join(MESHES)}")
    return _BUILDERS[mesh](cell or load_cell(settings))
