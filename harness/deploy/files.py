"""The generated files of a rendered stack (Envoy bootstraps, certificates), written where
deployers want them.

Every deployer writes them the same way, each checked by its validator before
anything starts, so a config Envoy would reject never reaches a process:

* a config goes to `<out_dir>/configs/<component><suffix>` (the suffix of the
  file's mount path) and is published with the results;
* a secret (`File.secret`: certificates and private keys) goes to
  `<out_dir>/secrets/<component>/<name of its mount>`, mode 0600 (its reader
  runs as this user; a container deployer hands it to the image's user), is
  never published, and is removed when a started stack stops (`remove_secrets`).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterable
from pathlib import Path, PurePosixPath

from harness.stacks.model import Component, Rendered

SECRET_MODE = 0o600
SECRETS_DIR = "secrets"


def generated_path(out_dir: Path, component: Component, name: str) -> Path:
    """Where `component`'s generated file `name` goes under `out_dir`."""
    spec = component.file(name)
    if spec.secret:
        return out_dir / SECRETS_DIR / component.name / PurePosixPath(spec.mount).name
    return out_dir / "configs" / f"{component.name}{PurePosixPath(spec.mount).suffix}"


def write_generated(rendered: Iterable[Rendered], out_dir: Path) -> dict[str, Path]:
    """Write every generated file, then check each (a config may name another, e.g. its
    certificates); the configs' paths by component name (to publish)."""
    written: dict[str, Path] = {}
    checks = []
    for item in rendered:
        here = {
            item.component.file(name).mount: generated_path(out_dir, item.component, name)
            for name in item.files
        }
        for name, content in item.files.items():
            spec = item.component.file(name)
            path = here[spec.mount]
            path.parent.mkdir(parents=True, exist_ok=True)
            if spec.secret:
                # Created 0600 (never readable by others, not even for a moment).
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, SECRET_MODE)
                with os.fdopen(fd, "w") as out:
                    out.write(content)
                os.chmod(path, SECRET_MODE)  # an existing file keeps its mode through O_CREAT
            else:
                path.write_text(content)
                written[item.component.name] = path
            if spec.check is not None:
                checks.append((spec.check, path, here))
    for check, path, here in checks:
        check(path, here)
    return written


def secrets(rendered: Iterable[Rendered], out_dir: Path) -> list[Path]:
    """The secret files `write_generated` wrote for `rendered` (e.g. to hand to another user)."""
    return [
        generated_path(out_dir, item.component, name)
        for item in rendered
        for name in item.files
        if item.component.file(name).secret
    ]


def remove_secrets(out_dir: Path) -> None:
    """Delete the secrets written under `out_dir`: once the stack is down they serve nothing
    here, and a results directory keeps no private key."""
    shutil.rmtree(out_dir / SECRETS_DIR, ignore_errors=True)
