"""The generated files of a rendered stack (Envoy bootstraps), written where deployers want them.

Every deployer writes them the same way: `<out_dir>/configs/<component><suffix>`
(the suffix of the file's mount path), each checked by its validator before
anything starts, so a config Envoy would reject never reaches a process.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from harness.stacks.model import Component, Rendered


def generated_path(out_dir: Path, component: Component, name: str) -> Path:
    """Where `component`'s generated file `name` goes under `out_dir`."""
    suffix = Path(component.file(name).mount).suffix
    return out_dir / "configs" / f"{component.name}{suffix}"


def write_generated(rendered: Iterable[Rendered], out_dir: Path) -> dict[str, Path]:
    """Write and check every generated file; their paths by component name (to publish)."""
    written = {}
    for item in rendered:
        for name, content in item.files.items():
            path = generated_path(out_dir, item.component, name)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(content)
            check = item.component.file(name).check
            if check is not None:
                check(path)
            written[item.component.name] = path
    return written
