"""Small facts shared across the harness, importable without pulling in any heavy module.

Mesh names, roles and CPU sets, default paths and ports, and the names of the
files every stack start writes. Modules that need one of these import it from
here, so a command-line parser does not have to import Docker or Envoy code.
"""

from __future__ import annotations

from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DEFAULT_WORKMODEL = REPO / "workmodels" / "default.json"
DEFAULT_PORT = 5005

#: Every stack, in the order runs and reports list them (one place defines it).
MESHES = ("dpumesh", "envoy", "nodeproxy", "nomesh")
#: The default comparison: what fits about 10 minutes on 2 cores (`nodeproxy` adds 3-4 by
#: `harness.run.plan.estimate_s`; README shows the command that includes it).
DEFAULT_MESHES = ("dpumesh", "envoy", "nomesh")
#: The stacks whose proxies are Envoys: `--mtls` applies to them.
ENVOY_MESHES = ("envoy", "nodeproxy")
#: The node every component runs on: this machine is one node (DESIGN §8).
LOCAL_NODE = "node1"
#: Deployers of a stack description (DESIGN §7); `k8s` only writes manifests.
MODES = ("local", "compose")
#: Restart policies of a stack's components (DESIGN §9), like Kubernetes' Always / Never.
RESTART_MODES = ("always", "never")

#: Every role a process can have; `loadgen` is the load generator, never part of a stack.
ROLES = ("app", "sidecar", "gateway", "nodeproxy", "dpu-daemon", "dpa-daemon", "loadgen")
STACK_ROLES = tuple(role for role in ROLES if role != "loadgen")

#: CPU sets (DESIGN §5): which cores a role may run on.
CPU_SETS = ("host", "dpu", "loadgen")
ROLE_CPU_SET = {
    "app": "host",
    "sidecar": "host",
    "gateway": "host",
    "nodeproxy": "host",
    "dpu-daemon": "dpu",
    "dpa-daemon": "dpu",
    "loadgen": "loadgen",
}

#: What each stack start writes into its run directory: what ran, how.
MANIFEST = "stack.json"
