"""`stack.json`: what one stack start ran, written the same way by every deployer.

The runner's fairness checklist and a reader rebuilding the stack by hand
read this file, so every deployer records the same facts under the same keys:
the settings, the worker plan, every component as rendered (argv, environment,
ports, node, CPU set), where each service ran (`topology`) and the code the
apps ran (`mubench.fingerprint`, asked of the apps' own interpreter). A
deployer adds what only it knows under `deployment` (pids, or the compose
project and its containers).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from harness.names import MANIFEST
from harness.stacks.model import Rendered, StackDescription


def component_record(item: Rendered, argv: Sequence[str], ports: Mapping[str, int]) -> dict:
    """One component as it ran: `argv` with the deployer's executable, its bound ports."""
    c = item.component
    return {
        "name": c.name,
        "role": c.role,
        "service": c.service,
        "node": c.node,
        "cpu_set": c.cpu_set,
        "argv": list(argv),
        "env": dict(item.env),
        "ports": dict(ports),
    }


def build(
    desc: StackDescription,
    *,
    mode: str,
    url: str,
    components: Sequence[dict[str, Any]],
    configs: Mapping[str, Path],
    app_code: Mapping[str, Any],
    deployment: Mapping[str, Any],
    placement: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The manifest of one started stack (see the module docstring)."""
    settings = desc.settings
    return {
        "mesh": desc.mesh,
        "mode": mode,
        "url": url,
        "workmodel": settings.as_dict()["workmodel"],
        "entry": desc.entry,
        "seed": settings.seed,
        "scale": settings.scale,
        "settings": settings.as_dict(),
        "plan": {svc: {"workers": w, "threads": t} for svc, (w, t) in desc.plan.items()},
        "topology": desc.topology.as_dict(),
        "warnings": list(desc.warnings),
        "app_code": dict(app_code),
        "configs": {name: str(path) for name, path in configs.items()},
        "components": list(components),
        "deployment": dict(deployment),
        "placement": None if placement is None else dict(placement),
    }


def write(run_dir: Path, manifest: Mapping[str, Any]) -> Path:
    path = run_dir / MANIFEST
    path.write_text(json.dumps(manifest, indent=2) + "\n")
    return path
