"""Start the Envoy mesh of a stack under a `Supervisor`."""

from __future__ import annotations

from pathlib import Path

from baselines.envoy.config import GATEWAY, MeshDescription, admin_ports, envoy_argv, write_configs
from harness.procs import Supervisor, http_ok


def start_mesh(
    sup: Supervisor, desc: MeshDescription, config_dir: Path, *, timeout_s: float = 30.0
) -> dict[str, Path]:
    """Write and validate every config, start all Envoys, wait until each admin `/ready` is 200.

    Envoys start in parallel and do not need their upstreams up (clusters are
    static), so apps may start before or after. Returns the config paths by
    process name (`sidecar-<svc>`, `gateway`) for publishing with the results.
    """
    configs = write_configs(desc, config_dir)
    admin = admin_ports(desc)
    for name, path in configs.items():
        sup.start(
            name,
            envoy_argv(desc, path),
            role="gateway" if name == GATEWAY else "sidecar",
            ready=http_ok(f"http://127.0.0.1:{admin[name]}/ready"),
        )
    sup.wait_ready(configs, timeout_s=timeout_s)
    return configs
