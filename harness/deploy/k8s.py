"""The Kubernetes deployer: stack descriptions written as manifests (nothing here applies them).

`write(descs, out_dir)` renders each description through a `K8sResolver` and
writes ``<out>/<mesh>/``; `validate_all(out_dir)` checks every document
offline against the OpenAPI schemas of Kubernetes `KUBERNETES_VERSION` with
`kubernetes_validate.validate(doc, version, strict=True)` (unknown fields
are errors). That is all that was exercised: no manifest was ever applied to
a cluster, so scheduling (node affinity to labelled nodes included), DNS,
probes and shared memory on a real node are untested.

Files (`kubectl apply -f` keeps document order; ``-R`` would start both masters):

``stack.yaml``
    Namespaces, ConfigMaps, then per pod its workload and Service, in the
    description's start order.
``locust/workers.yaml``
    The Locust master Service (5557 for workers, 8089 for the web UI) and the
    worker Deployment (`Load.workers` pods, one Locust process each).
``locust/master-ui.yaml`` | ``locust/master-headless.yaml``
    The master, one of the two: a Deployment with the web UI, or a Job that
    runs one headless test of `Load` and exits (summary in its log; each
    worker pod keeps its histogram in /results). Both carry the label the
    Service selects.

On a cluster: load the image on every node (``docker save dpumesh-bench:latest
| ctr -n k8s.io images import -``, or ``kind load docker-image``); ``kubectl
apply -f <mesh>/stack.yaml``; wait until it is ready (``kubectl -n <ns> wait
--for=condition=Available deployment --all``, ``rollout status`` for the
DaemonSets); ``kubectl apply -f <mesh>/locust/workers.yaml -f
<mesh>/locust/master-headless.yaml`` (or ``master-ui.yaml``, then ``kubectl
-n <ns> port-forward svc/locust-master 8089``). With nodes, label the nodes
first (below).

Nodes (DESIGN §8). Without nodes (`Settings.nodes` 0) no pod says where it
runs: the scheduler places them, and one node is what such manifests are
for. With nodes (N >= 1, `Topology.isolated`) the description puts every
component on a node ``node1``..``nodeN`` and the load generator on a node of
its own, and the manifests say the same with a label on the cluster's nodes:
`NODE_LABEL` ``dpumesh.node`` = the description's node name, exactly one
Kubernetes node per value, and `CLIENT_NODE` ``client`` for the node of
Locust's master and workers::

    kubectl label node worker-a dpumesh.node=node1
    kubectl label node worker-b dpumesh.node=node2
    kubectl label node worker-c dpumesh.node=node3
    kubectl label node loadgen dpumesh.node=client
    kubectl get nodes -L dpumesh.node

Every pod of a component then has required node affinity to its
component's node (`node_affinity`: under ``affinity.nodeAffinity``,
``requiredDuringSchedulingIgnoredDuringExecution`` with one term,
``dpumesh.node In [node2]``), and Locust's pods to ``client``. Node
affinity rather than a `nodeSelector`, which would constrain the same: it is
what DESIGN §8 and the issue name, it leaves `nodeSelector` to the cluster's
own constraints (a patch adding e.g. ``kubernetes.io/arch`` does not replace
ours), and ``In`` takes several nodes should a pod ever be allowed on more
than one. A pod
whose node is not labelled stays Pending (nothing runs elsewhere); labels
are read at scheduling only, so relabelling a node moves nothing already
running. Two Kubernetes nodes with one value would run a per-node
DaemonSet twice, on two /dev/shm, behind one Service: label one node per
value. (A DaemonSet's controller picks its nodes with the template's
affinity, then writes its pods' required affinity as the node's name, so
``kubectl get pod -o yaml`` shows ``metadata.name`` there, not the label.)
Port numbers are fixed per service, so two pods of one service, or two node
proxies, bind the same numbers, each in its own pod.

Where and how, decided here (what runs is the description's):

* components sharing a network namespace (`network_of`) are containers of
  one pod named after the owner, and reach each other on 127.0.0.1; any
  other component is reached through its pod's Service,
  ``<pod>.<namespace>.svc.cluster.local`` (always the full name: dpumesh
  spans two namespaces), at its port's fixed number; everything listens on
  0.0.0.0. A Service exposes every port its pod's containers declare. A
  component whose environment has `K8S_APP` names its pod so, and that is
  the pod's `app` label (the seed's ``s0-worker``; ``s1-worker-node2`` for
  the instance on node2 of a service with instances on several nodes, the
  variable itself keeping the description's value);
* the seed's layout: the `NODE_ROLES` (dpa-daemon, dpu-daemon, and the
  nodeproxy stack's node proxy) are DaemonSets, the DPU daemons' in
  `dpumesh-system`: without nodes one per role, named after it; with nodes
  one per node and role, named after the component (``dpu-daemon-node2``,
  ``nodeproxy-node2``) and pinned to its node, since each has its own
  arguments (a dpu-daemon's routes, a node proxy's bootstrap). Every other
  pod is a one-replica Deployment in the stack's namespace
  (`stack_namespace`: `mubench-dpu`, `mubench-envoy`, `mubench-nodeproxy`,
  `mubench-nomesh`), one per instance of a service, and so is Locust;
* files are read-only ConfigMap mounts at their `mount`: a source file (the
  workmodel, the functions directory's files) is one ConfigMap per
  namespace, shared by its readers; a generated one (an Envoy bootstrap) is
  one per reader, generated with its resolver and passed to its `check` on
  a temporary copy before anything is written; a secret one (`--mtls`: an
  Envoy's certificates and key) is a Secret per reader instead. Those are
  made when the manifests are written and expire after
  `baselines.envoy.tls.LIFETIME` (24 h): write the manifests again to renew
  them (a cluster would issue them itself, e.g. cert-manager or Istio's CA);
* `{ipc}` is DPUmesh's `default` namespace (a node's /dev/shm holds one
  mesh); `{node}` is ``$(NODE_NAME)``, the downward API's `spec.nodeName`
  declared first (so ``ZONE`` names the node);
* every pod runs as the image's user (`IMAGE_UID`) with no privilege
  escalation, capabilities, service-account token or service links (the
  environment is the description's, plus ``NODE_NAME`` where used);
* labels on every object: ``app.kubernetes.io/part-of: dpumesh-bench``,
  ``dpumesh.mesh``, ``dpumesh.role``, ``dpumesh.service``,
  ``dpumesh.cpu-set`` (a pod's are its owner's; a Namespace's role, service
  and CPU set are empty); requests and limits per role from `RESOURCES`.

Shared memory. DPUmesh's rings, registry and doorbells are POSIX shared
memory and POSIX named semaphores, which Linux keeps as files in /dev/shm
(``dpumesh.default.*``, ``sem.dpumesh.default.*``). So every daemon and
worker pod mounts the node's /dev/shm (`hostPath`, type Directory) at
/dev/shm: one mechanism on all of them. `hostIPC: true` would work too
(containerd and CRI-O give a host-IPC pod the host's /dev/shm) but grants
more: the host's System V shared memory, semaphores and message queues and
its POSIX message queues, none of which DPUmesh uses. Both are privileged in
Pod Security terms, so the dpumesh namespaces are labelled `enforce:
privileged`, the others `restricted`. The seed mounted the same hostPath,
and also ran its daemons privileged with `hostNetwork` and `hostPID`; none
of that is needed: the bridge is reached through its Service, and worker
liveness is a heartbeat in the registry (CLOCK_MONOTONIC is node-wide), not
a pid. The objects are created mode 0600, hence one uid for every pod; their
pages count against the memory limit of the container that first touches
them.

Probes. A `Probe` is an httpGet readiness probe on the named port. A
`WorkersProbe` (a worker has no port: it is ready once registered) is a
startup probe that asks its node's bridge (the dpu-daemon its description
names: ``dpu-daemon``, with nodes ``dpu-daemon-<its node>``) for its stats
and counts the service's live workers, as the local deployer does; it stops once passed,
so no probe process competes with the measured workers during a run.

Services of per-node pods. Without nodes, the bridge Service
(`dpu-daemon`, 5005) has `internalTrafficPolicy: Local`, as every Service of
a one-per-role DaemonSet: a client reaches the dpu-daemon of its own node,
the one sharing /dev/shm with that node's workers (DESIGN §8: a call leaves
through the local sidecar; a worker's startup probe must ask its own node's
bridge). With `Cluster`, kube-proxy would spread connections over every
node's dpu-daemon, and one on a node without the callee's worker answers
503; a headless Service hands out every daemon's address with no node
preference, the same problem. On one node the policies agree.

With nodes, the description carries the per-node addresses itself: each
node's dpu-daemon is its own component, and its fallback names the
dpu-daemons of the nodes that have a service it lacks (``--route
s2=http://{host:dpu-daemon-node3}:{port:dpu-daemon-node3:public}``); a
worker's `WorkersProbe` names its own node's dpu-daemon; the load generator
calls the entry's (node1's). So each per-node DaemonSet's Service selects
its one pod, and has `internalTrafficPolicy: Cluster`: that pod is the right
one from whichever node calls, and the caller already chose the node by
name. `Local` would leave every caller on another node with no endpoint,
its connections dropped, which is all the fallback's traffic (node1 to
``dpu-daemon-node3``) and Locust's (from ``client``). The same holds for
the node proxies (``nodeproxy-node2``: its node's apps and other node
proxies call it).
(`externalTrafficPolicy: Local` is the same choice for a NodePort or
LoadBalancer Service; a ClusterIP Service has no such field.)

Restarts (DESIGN §9). The harness's `RestartPolicy` maps onto the
controllers: every component is a Deployment or DaemonSet pod, whose
`restartPolicy` can only be `Always` (the API rejects anything else), and
the kubelet restarts a dead container with its CrashLoopBackOff (10 s,
doubling up to 5 min, reset after 10 min of running); a pod's sandbox
keeps its network and IPC namespaces across container restarts, so
nothing else needs restarting. Mode `never` cannot be expressed for
controller-managed pods, so these manifests ignore the policy
(`restart_note` says so, for the command line to print). The one pod with
`restartPolicy: Never` is the headless Locust master's Job (`backoffLimit:
0`): a finished or failed load run is a result, not something to repeat.

`kubernetes_validate.validate` re-reads its 1.4 MB schema definitions for
every document (about 50 ms each); `validate` memoises those reads while it
runs, so a directory costs one read.
"""

from __future__ import annotations

import contextlib
import functools
import os
import re
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path, PurePosixPath
from typing import Any

import kubernetes_validate
import kubernetes_validate.utils
import yaml

from dpumesh.naming import DEFAULT_NS
from harness.deploy import files
from harness.deploy.image import (
    EXECUTABLES,
    IMAGE,
    IMAGE_UID,
    LABEL_CPU_SET,
    LABEL_MESH,
    LABEL_ROLE,
    LABEL_SERVICE,
)
from harness.names import ROLE_CPU_SET
from harness.placement.profiles import DpuModel
from harness.procs import RestartPolicy
from harness.stacks.model import (
    Component,
    File,
    Probe,
    Rendered,
    StackDescription,
    WorkersProbe,
    placeholders,
    render,
)
from loadtests.options import DEFAULT_REQUEST_ID_PREFIX, REQUEST_MODES, USER_CLASS

#: The Kubernetes release whose OpenAPI schemas the manifests are checked against.
KUBERNETES_VERSION = "1.33.0"
PART_OF = "dpumesh-bench"
SYSTEM_NAMESPACE = "dpumesh-system"
#: Roles that run once per node: DaemonSets (one named after the role, or, with nodes, one per
#: node named after the component).
NODE_ROLES = ("dpa-daemon", "dpu-daemon", "nodeproxy")
#: The label of the placement (DESIGN §8): a cluster node labelled ``dpumesh.node=node2`` runs
#: what the description puts on ``node2`` (one Kubernetes node per value).
NODE_LABEL = "dpumesh.node"
#: `NODE_LABEL`'s value for the load generator's node (Locust's master and workers).
CLIENT_NODE = "client"
DPU_ROLES = tuple(role for role, cpu_set in ROLE_CPU_SET.items() if cpu_set == "dpu")
#: Roles whose pods live in `SYSTEM_NAMESPACE` (the seed's layout of the DPU daemons).
SYSTEM_ROLES = DPU_ROLES
ANY = "0.0.0.0"
LOOPBACK = "127.0.0.1"
NODE_NAME = "NODE_NAME"
SHM = "/dev/shm"
LOCUSTFILE = "loadtests/locustfile.py"  # relative to the image's WORKDIR
LOCUST_MASTER = "locust-master"
LOCUST_WORKER = "locust-worker"
LOCUST_JOB = "locust-headless"
LOCUST_PORTS = {"master": 5557, "web": 8089}
RESULTS = "/results"  # Locust's histograms and CSVs (emptyDir)
MAX_CONFIGMAP_BYTES = 1 << 20  # the API server's limit for one object

_DNS_LABEL = re.compile(r"[a-z]([-a-z0-9]{0,61}[a-z0-9])?")
_LABEL_VALUE = re.compile(r"(([A-Za-z0-9][-A-Za-z0-9_.]{0,61})?[A-Za-z0-9])?")
_PORT_NAME = re.compile(r"(?=.{1,15}$)(?=.*[a-z])(?!.*--)[a-z0-9]([-a-z0-9]*[a-z0-9])?")
_CONFIG_KEY = re.compile(r"[-._a-zA-Z0-9]{1,253}")
_YAML_WIDTH = 1 << 16  # one line per value, however long
# A WorkersProbe as a command: exit 0 once the bridge lists COUNT live workers of SERVICE.
_WORKERS_CHECK = (
    "import json, sys, urllib.request; "
    "w = json.load(urllib.request.urlopen(sys.argv[1], timeout=2))['workers']; "
    "sys.exit(len(w.get(sys.argv[2], [])) != int(sys.argv[3]))"
)


class ManifestError(ValueError):
    """A manifest does not validate against the pinned Kubernetes schemas."""


@dataclass(frozen=True)
class Resources:
    """Requests and limits of one container (Kubernetes quantities)."""

    cpu_request: str
    cpu_limit: str
    memory_request: str
    memory_limit: str

    def spec(self) -> dict[str, dict[str, str]]:
        return {
            "requests": {"cpu": self.cpu_request, "memory": self.memory_request},
            "limits": {"cpu": self.cpu_limit, "memory": self.memory_limit},
        }


#: Per role. `dpu` roles: request = limit in whole cores and memory, so their pods are
#: Guaranteed and a kubelet with the static CPU manager gives them exclusive cores (the `dpu`
#: CPU set of DESIGN §5; a DPU speed below 1 would be a fractional limit instead). Each daemon
#: is one event loop, so one core. Host roles: small requests so a 20-service workmodel
#: schedules on one node, limits at what they can use: an app up to `Settings.per_service_cap`
#: (2) worker processes, an Envoy (sidecar, node proxy, gateway) its `--concurrency` (2)
#: worker threads. Locust: one process per pod is one core, Guaranteed so the load generator
#: is not the bottleneck.
_ENVOY = Resources("100m", "2", "64Mi", "256Mi")
RESOURCES: Mapping[str, Resources] = {
    "app": Resources("100m", "2", "128Mi", "1Gi"),
    "sidecar": _ENVOY,
    "gateway": _ENVOY,
    "nodeproxy": _ENVOY,
    "dpu-daemon": Resources("1", "1", "512Mi", "512Mi"),
    "dpa-daemon": Resources("1", "1", "256Mi", "256Mi"),
    "loadgen": Resources("1", "1", "512Mi", "512Mi"),
}


def resources_for(
    model: DpuModel, base: Mapping[str, Resources] = RESOURCES
) -> dict[str, Resources]:
    """`base` with the DPU daemons' CPU taken from a DPU model (DESIGN §5).

    The model gives the DPU `dpu_speed` x `dpu_cores` host cores of work. A
    cluster has no one limit over two pods, so each daemon gets half of it,
    capped at the one core its single event loop can use; request = limit keeps
    the pods Guaranteed. (A speed below 1 on one core gives a fractional limit.)
    """
    share = min(1.0, model.dpu_speed * model.dpu_cores / len(DPU_ROLES))
    cpu = f"{max(1, round(share * 1000))}m"
    return {
        role: replace(spec, cpu_request=cpu, cpu_limit=cpu) if role in DPU_ROLES else spec
        for role, spec in base.items()
    }


@dataclass(frozen=True)
class Load:
    """The load of the headless master (the web UI's form starts from it too).

    The same options as the runner's Locust (`harness.run.loadgen.locust_argv`):
    `users` spawned at once, `warmup_s` sent but not recorded, then
    `measured_s`; `rate` requests/s for the whole test (open loop), 0 = closed loop.
    """

    workers: int = 2
    users: int = 16
    rate: float = 0.0
    warmup_s: int = 10
    measured_s: int = 60
    request_mode: str = "get"
    request_id_prefix: str = DEFAULT_REQUEST_ID_PREFIX

    def __post_init__(self) -> None:
        if not 1 <= self.workers <= self.users:
            raise ValueError(f"need 1 <= workers <= users, not {self.workers} and {self.users}")
        if self.rate < 0 or self.warmup_s < 0 or self.measured_s <= 0:
            raise ValueError("rate and warm-up must be >= 0 and the measured time > 0")
        if self.request_mode not in REQUEST_MODES:
            raise ValueError(f"request mode {self.request_mode!r} not in {REQUEST_MODES}")


def restart_note(policy: RestartPolicy) -> str | None:
    """Why the manifests differ from `policy`, or None when they carry it (see the docstring)."""
    if policy.restarts:
        return None
    return (
        "restart policy 'never' is not in the manifests: Deployments and DaemonSets always "
        "restart their containers (restartPolicy Always is the only value they accept)"
    )


def k8s_name(name: str) -> str:
    """`name` as an object, container or volume name (service ids may have `_` and capitals)."""
    return _checked(name.lower().replace("_", "-"), _DNS_LABEL, "name")


def stack_namespace(mesh: str) -> str:
    """The namespace of a stack's pods (the seed's `mubench-dpu` for dpumesh)."""
    return "mubench-dpu" if mesh == "dpumesh" else f"mubench-{mesh}"


class K8sResolver:
    """Addresses, ports and paths of one stack's pods (see the module docstring)."""

    def __init__(self, desc: StackDescription) -> None:
        self.desc = desc
        #: Whether the run asked for nodes: pods pinned to them, a DaemonSet per node component.
        self.placed = desc.topology.isolated

    def bind(self, component: Component) -> str:
        return ANY

    def port(self, component: Component, target: str, port: str) -> int:
        return self.desc.component(target).ports[port].number

    def host(self, component: Component, target: str) -> str:
        if self.desc.network_owner(component.name).name == self.desc.network_owner(target).name:
            return LOOPBACK
        return self.dns(target)

    def file(self, component: Component, name: str) -> str:
        return component.file(name).mount

    def ipc(self, component: Component) -> str:
        return DEFAULT_NS

    def node(self, component: Component) -> str:
        return f"$({NODE_NAME})"

    def pod(self, name: str) -> str:
        """The pod (workload and Service name) that holds component `name`.

        Without nodes, a per-node role's pods are one DaemonSet named after
        the role (the description's `nodeproxy-node1` is the DaemonSet's pod
        on each node). With nodes, every component is its own workload,
        named after it (`dpu-daemon-node2`); a `K8S_APP` name gets the node
        when the service has instances on several nodes (``s1-worker-node2``).
        """
        owner = self.desc.network_owner(name)
        if owner.role in NODE_ROLES and not self.placed:
            return k8s_name(owner.role)
        app = owner.env.get("K8S_APP")
        if app is None:
            return k8s_name(owner.name)
        if owner.service and self.desc.topology.replicated(owner.service):
            return k8s_name(f"{app}-{owner.node}")
        return k8s_name(app)

    def node_of(self, name: str) -> str | None:
        """The `NODE_LABEL` value component `name`'s pod must run on; None without nodes."""
        if not self.placed:
            return None
        members = [
            c.node
            for c in self.desc.components
            if self.desc.network_owner(c.name).name == self.desc.network_owner(name).name
        ]
        if len(set(members)) != 1:
            raise ValueError(f"pod of {name}: its components are on nodes {sorted(set(members))}")
        return members[0]

    def namespace(self, name: str) -> str:
        """The namespace of component `name`'s pod."""
        if self.desc.network_owner(name).role in SYSTEM_ROLES:
            return SYSTEM_NAMESPACE
        return stack_namespace(self.desc.mesh)

    def dns(self, name: str) -> str:
        """The Service name of component `name`'s pod, as any pod of the cluster resolves it."""
        return _dns(self.pod(name), self.namespace(name))


def manifests(
    desc: StackDescription,
    *,
    image: str = IMAGE,
    locust: bool = True,
    load: Load | None = None,
    resources: Mapping[str, Resources] = RESOURCES,
    pull_policy: str = "IfNotPresent",
    check: bool = True,
) -> dict[str, list[dict[str, Any]]]:
    """The documents of one stack by file name (relative to its directory), in apply order.

    `check=False` skips the generated files' checks (Envoy's own validation, a process each).
    """
    resolver = K8sResolver(desc)
    rendered = [render(c, resolver) for c in desc.components]
    if check:
        _check_files(rendered)
    build = _Build(desc, resolver, image, pull_policy, resources)
    pods: dict[str, list[Rendered]] = {}
    for item in rendered:
        pods.setdefault(desc.network_owner(item.component.name).name, []).append(item)
    workloads = [doc for members in pods.values() for doc in build.pod(members)]
    configs = build.configmaps(rendered)
    namespaces = sorted({resolver.namespace(c.name) for c in desc.components})
    files = {"stack.yaml": [*build.namespaces(namespaces, pods), *configs, *workloads]}
    if locust:
        files |= build.locust(load or Load())
    _check_unique([doc for docs in files.values() for doc in docs])
    return files


def write(
    descs: Sequence[StackDescription], out_dir: Path, **options: Any
) -> dict[str, list[Path]]:
    """Write every stack's manifests to ``<out_dir>/<mesh>/``; paths by mesh.

    `options` are `manifests`' keywords (image, locust, load, resources, ...).
    """
    meshes = [d.mesh for d in descs]
    if len(set(meshes)) != len(meshes):
        raise ValueError(f"one description per mesh, not {meshes}")
    stacks = [(d, manifests(d, **options)) for d in descs]  # all checked before any write
    written: dict[str, list[Path]] = {}
    for desc, documents in stacks:
        written[desc.mesh] = []
        for name, docs in documents.items():
            path = out_dir / desc.mesh / name
            path.parent.mkdir(parents=True, exist_ok=True)
            secret = any(d.get("kind") == "Secret" for d in docs)  # --mtls keys: owner only
            mode = 0o600 if secret else 0o644
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
            os.fchmod(fd, mode)  # also when the file was there before
            with os.fdopen(fd, "w", encoding="utf-8") as fh:
                fh.write(_header(desc, name) + _to_yaml(docs))
            written[desc.mesh].append(path)
    return written


def _to_yaml(docs: Sequence[Mapping[str, Any]]) -> str:
    """Documents as one YAML stream, keys in their order, file contents as literal blocks."""
    return yaml.dump_all(
        docs, Dumper=_Dumper, sort_keys=False, allow_unicode=True, width=_YAML_WIDTH
    )


def validate(path: Path, version: str = KUBERNETES_VERSION) -> int:
    """Check every document of `path` against `version`'s schemas, strictly; how many.

    Raises `ManifestError` naming the file, the object and the field.
    """
    docs = [doc for doc in yaml.load_all(path.read_text(), Loader=_SAFE_LOADER) if doc is not None]
    with _schemas_memoised():
        for doc in docs:
            try:
                kubernetes_validate.validate(doc, version, strict=True)
            except kubernetes_validate.ValidationError as exc:
                field = ".".join(str(p) for p in exc.path) or "(document)"
                what = f"{doc.get('kind')}/{doc.get('metadata', {}).get('name')}"
                raise ManifestError(f"{path}: {what}: {field}: {exc.message}") from None
            except kubernetes_validate.SchemaNotFoundError as exc:
                raise ManifestError(f"{path}: {exc.message}") from None
    return len(docs)


def validate_all(out_dir: Path, version: str = KUBERNETES_VERSION) -> dict[Path, int]:
    """`validate` every ``*.yaml`` under `out_dir`; documents per file (none: `ManifestError`)."""
    paths = sorted(out_dir.rglob("*.yaml"))
    if not paths:
        raise ManifestError(f"{out_dir}: no manifests")
    with _schemas_memoised():
        return {path: validate(path, version) for path in paths}


class _Build:
    """Builds the objects of one stack; `manifests` puts them in files and in order."""

    def __init__(
        self,
        desc: StackDescription,
        resolver: K8sResolver,
        image: str,
        pull_policy: str,
        resources: Mapping[str, Resources],
    ) -> None:
        self.desc = desc
        self.resolver = resolver
        self.image = image
        self.pull_policy = pull_policy
        self.resources = resources

    def labels(self, component: Component | None, role: str = "") -> dict[str, str]:
        """The labels every object carries: those of `component`, or of `role`, or empty."""
        role = component.role if component else role
        values = {
            "app.kubernetes.io/part-of": PART_OF,
            LABEL_MESH: self.desc.mesh,
            LABEL_ROLE: role,
            LABEL_SERVICE: component.service if component else "",
            LABEL_CPU_SET: ROLE_CPU_SET[role] if role else "",
        }
        return {k: _checked(v, _LABEL_VALUE, f"label {k}") for k, v in values.items()}

    def container(
        self,
        name: str,
        role: str,
        command: str,
        args: Sequence[str],
        *,
        env: Sequence[Mapping[str, Any]] = (),
        ports: Mapping[str, int] | None = None,
        mounts: Sequence[Mapping[str, Any]] = (),
        probes: Mapping[str, Any] | None = None,
    ) -> dict[str, Any]:
        """One container of the image (components' and Locust's alike)."""
        if role not in self.resources:
            raise ValueError(f"no resources for role {role!r} (have {sorted(self.resources)})")
        spec: dict[str, Any] = {
            "name": k8s_name(name),
            "image": self.image,
            "imagePullPolicy": self.pull_policy,
            "command": [command],
            "args": list(args),
        }
        if env:
            spec["env"] = list(env)
        if ports:
            spec["ports"] = [
                {
                    "name": _checked(p, _PORT_NAME, "port name"),
                    "containerPort": n,
                    "protocol": "TCP",
                }
                for p, n in ports.items()
            ]
        if mounts:
            spec["volumeMounts"] = list(mounts)
        return {
            **spec,
            **(probes or {}),
            "resources": self.resources[role].spec(),
            "securityContext": {
                "allowPrivilegeEscalation": False,
                "capabilities": {"drop": ["ALL"]},
            },
        }

    def component_container(self, item: Rendered) -> dict[str, Any]:
        """A rendered component as its pod's container: the one place a component is rendered."""
        c = item.component
        env = [{"name": k, "value": v} for k, v in item.env.items()]
        if "{node}" in placeholders([*c.args, *c.env.values()]):
            env.insert(0, _field_env(NODE_NAME, "spec.nodeName"))  # before the $(NODE_NAME) uses
        mounts = [
            {
                "name": self.configmap_name(c, f),
                "mountPath": f.mount,
                "readOnly": True,
                **({} if f.directory else {"subPath": _key(f)}),
            }
            for f in c.files
        ]
        if _shares_shm(c):
            mounts.append({"name": "shm", "mountPath": SHM})
        return self.container(
            c.name,
            c.role,
            EXECUTABLES[c.program],
            item.args,
            env=env,
            ports={name: port.number for name, port in c.ports.items()},
            mounts=mounts,
            probes=self.probe(c),
        )

    def probe(self, c: Component) -> dict[str, Any]:
        """`c`'s probe as the container's readiness or startup probe (see the module docstring)."""
        probe = c.probe
        if isinstance(probe, Probe):
            get = {"path": probe.path, "port": probe.port}
            return {"readinessProbe": {"httpGet": get, "periodSeconds": 5}}
        if isinstance(probe, WorkersProbe):
            host = self.resolver.host(c, probe.component)
            port = self.resolver.port(c, probe.component, probe.port)
            argv = ["python", "-c", _WORKERS_CHECK, f"http://{host}:{port}{probe.path}"]
            check = {"exec": {"command": [*argv, probe.service, str(probe.count)]}}
            return {
                "startupProbe": {
                    **check,
                    "periodSeconds": 1,
                    "timeoutSeconds": 3,
                    "failureThreshold": 60,  # the local deployer's start timeout
                }
            }
        return {}

    def pod(self, members: Sequence[Rendered]) -> list[dict[str, Any]]:
        """One pod's workload (its owner and the components in its network), and its Service."""
        owner = self.desc.network_owner(members[0].component.name)
        name = self.resolver.pod(owner.name)
        namespace = self.resolver.namespace(owner.name)
        labels = self.labels(owner)
        containers = [self.component_container(item) for item in members]
        ports = [p for c in containers for p in c.get("ports", [])]
        if len({p["name"] for p in ports}) != len(ports):
            raise ValueError(f"pod {name}: its containers' port names repeat")
        volumes: dict[str, dict[str, Any]] = {
            self.configmap_name(i.component, f): _file_volume(
                self.configmap_name(i.component, f), f
            )
            for i in members
            for f in i.component.files
        }
        if any(_shares_shm(item.component) for item in members):
            volumes["shm"] = {"hostPath": {"path": SHM, "type": "Directory"}}
        per_node = owner.role in NODE_ROLES
        kind = "DaemonSet" if per_node else "Deployment"
        spec = _pod_spec(
            containers,
            [{"name": n, **v} for n, v in volumes.items()],
            node=self.resolver.node_of(owner.name),
        )
        workload = _workload(kind, name, namespace, labels, spec)
        if not ports:
            return [workload]
        service: dict[str, Any] = {
            "selector": {"app": name},
            "ports": [
                {"name": p["name"], "port": p["containerPort"], "targetPort": p["name"]}
                for p in ports
            ],
        }
        if per_node:
            # One DaemonSet on every node: the client's node's pod. One per node (with nodes):
            # its one pod, from any node (see the module docstring).
            service["internalTrafficPolicy"] = "Cluster" if self.resolver.placed else "Local"
        return [workload, _object("v1", "Service", name, namespace, labels, spec=service)]

    def configmap_name(self, component: Component, file: File) -> str:
        """A source file's ConfigMap is shared by the namespace, a generated one (ConfigMap or
        Secret) is its reader's."""
        return k8s_name(file.name if file.source else f"{component.name}-{file.name}")

    def configmaps(self, rendered: Sequence[Rendered]) -> list[dict[str, Any]]:
        """Every file the components read, as ConfigMaps or, for a secret file, Secrets
        (contents read or generated now)."""
        found: dict[tuple[str, str], tuple[dict[str, str], list[Component], File]] = {}
        for item in rendered:
            c = item.component
            for f in c.files:
                key = (self.resolver.namespace(c.name), self.configmap_name(c, f))
                if key in found:
                    if found[key][2] != f:
                        raise ValueError(f"{c.name}: file {f.name} differs from another reader's")
                    found[key][1].append(c)
                else:
                    data = _file_data(f) if f.source else {_key(f): item.files[f.name]}
                    found[key] = (data, [c], f)
        return [
            (_secret if f.secret else _configmap)(
                name, namespace, self.shared_labels(readers), data
            )
            for (namespace, name), (data, readers, f) in found.items()
        ]

    def shared_labels(self, components: Sequence[Component]) -> dict[str, str]:
        """The labels of an object several components use: theirs where they agree."""
        labels = self.labels(components[0])
        for c in components[1:]:
            labels = {k: v if v == self.labels(c)[k] else "" for k, v in labels.items()}
        return labels

    def namespaces(
        self, names: Sequence[str], pods: Mapping[str, Sequence[Rendered]]
    ) -> list[dict[str, Any]]:
        """The stack's Namespaces, `privileged` where a pod mounts the node's /dev/shm."""
        privileged = {
            self.resolver.namespace(owner)
            for owner, members in pods.items()
            if any(_shares_shm(item.component) for item in members)
        }
        docs = []
        for name in names:
            labels = self.labels(None)
            level = "privileged" if name in privileged else "restricted"
            labels["pod-security.kubernetes.io/enforce"] = level
            docs.append(_object("v1", "Namespace", name, None, labels))
        return docs

    def locust(self, load: Load) -> dict[str, list[dict[str, Any]]]:
        """Locust's master Service and workers, and the two ways to run the master."""
        namespace = stack_namespace(self.desc.mesh)
        public, port = self.desc.public
        url = f"http://{self.resolver.dns(public.name)}:{public.ports[port].number}"
        labels = self.labels(None, "loadgen")
        results = {"name": "results", "mountPath": RESULTS}
        volumes = [{"name": "results", "emptyDir": {}}]
        node = CLIENT_NODE if self.resolver.placed else None  # a node of its own (DESIGN §8)
        worker = self.container(
            LOCUST_WORKER,
            "loadgen",
            "python",
            [
                *("-m", "locust", "-f", LOCUSTFILE, "--worker"),
                *("--master-host", _dns(LOCUST_MASTER, namespace)),
                *("--master-port", str(LOCUST_PORTS["master"]), USER_CLASS),
            ],
            mounts=[results],
        )
        service = {
            "selector": {"app": LOCUST_MASTER},
            "ports": [{"name": p, "port": n, "targetPort": p} for p, n in LOCUST_PORTS.items()],
        }
        ui = self.container(
            LOCUST_MASTER,
            "loadgen",
            "python",
            _locust_master_args(load, url, headless=False),
            ports=LOCUST_PORTS,
            mounts=[results],
            probes={"readinessProbe": {"httpGet": {"path": "/", "port": "web"}}},
        )
        headless = self.container(
            LOCUST_MASTER,
            "loadgen",
            "python",
            _locust_master_args(load, url, headless=True),
            ports={"master": LOCUST_PORTS["master"]},
            mounts=[results],
        )
        job_spec = {
            "backoffLimit": 0,  # a failed run is a result to read, not to repeat
            "template": {
                "metadata": {"labels": {**labels, "app": LOCUST_MASTER}},
                "spec": {**_pod_spec([headless], volumes, node=node), "restartPolicy": "Never"},
            },
        }
        return {
            "locust/workers.yaml": [
                _object("v1", "Service", LOCUST_MASTER, namespace, labels, spec=service),
                _workload(
                    "Deployment",
                    LOCUST_WORKER,
                    namespace,
                    labels,
                    _pod_spec([worker], volumes, node=node),
                    replicas=load.workers,
                ),
            ],
            "locust/master-ui.yaml": [
                _workload(
                    "Deployment",
                    LOCUST_MASTER,
                    namespace,
                    labels,
                    _pod_spec([ui], volumes, node=node),
                )
            ],
            "locust/master-headless.yaml": [
                _object("batch/v1", "Job", LOCUST_JOB, namespace, labels, spec=job_spec)
            ],
        }


def _locust_master_args(load: Load, url: str, *, headless: bool) -> list[str]:
    """The runner's options (`harness.run.loadgen.locust_argv`), paths in the pod."""
    args = [
        *("-m", "locust", "-f", LOCUSTFILE, "--master", "--host", url),
        *("-u", str(load.users), "-r", str(load.users)),
        *("--hdr-out", f"{RESULTS}/latency.hdr", "--warmup-s", str(load.warmup_s)),
        *("--open-loop-rate", f"{load.rate:g}"),
        *("--request-id-prefix", load.request_id_prefix, "--request-mode", load.request_mode),
    ]
    if headless:
        args += [
            *("--headless", "--only-summary", "--expect-workers", str(load.workers)),
            *("-t", f"{load.warmup_s + load.measured_s}s"),
            *("--csv", f"{RESULTS}/locust", "--csv-full-history"),
            *("--exit-code-on-error", "0"),  # failures are results, counted in the sidecar
        ]
    return [*args, USER_CLASS]


def _object(
    api: str, kind: str, name: str, namespace: str | None, labels: Mapping[str, str], **body: Any
) -> dict[str, Any]:
    metadata: dict[str, Any] = {"name": name}
    if namespace:
        metadata["namespace"] = namespace
    return {
        "apiVersion": api,
        "kind": kind,
        "metadata": {**metadata, "labels": dict(labels)},
        **body,
    }


def _workload(
    kind: str,
    name: str,
    namespace: str,
    labels: Mapping[str, str],
    pod_spec: Mapping[str, Any],
    *,
    replicas: int = 1,
) -> dict[str, Any]:
    """A Deployment of `replicas` pods or a DaemonSet (one per node), pods labelled app=name."""
    pod_labels = {**labels, "app": name}
    spec: dict[str, Any] = {} if kind == "DaemonSet" else {"replicas": replicas}
    spec |= {
        "selector": {"matchLabels": {"app": name}},
        "template": {"metadata": {"labels": pod_labels}, "spec": dict(pod_spec)},
    }
    return _object("apps/v1", kind, name, namespace, pod_labels, spec=spec)


def _pod_spec(
    containers: Sequence[Mapping[str, Any]],
    volumes: Sequence[Mapping[str, Any]],
    *,
    node: str | None = None,
) -> dict[str, Any]:
    """A pod's spec; `node`: required node affinity to `NODE_LABEL` = `node`."""
    spec: dict[str, Any] = {
        "enableServiceLinks": False,  # the environment is the description's
        "automountServiceAccountToken": False,  # nothing here talks to the API server
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": IMAGE_UID,  # one uid: the shared-memory objects are mode 0600
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "containers": list(containers),
    }
    if volumes:
        spec["volumes"] = list(volumes)
    if node is not None:
        spec["affinity"] = node_affinity(node)
    return spec


def node_affinity(node: str) -> dict[str, Any]:
    """The affinity of a pod that must run on the node labelled `NODE_LABEL` = `node`."""
    term = {"key": NODE_LABEL, "operator": "In", "values": [_checked(node, _LABEL_VALUE, "node")]}
    return {
        "nodeAffinity": {
            "requiredDuringSchedulingIgnoredDuringExecution": {
                "nodeSelectorTerms": [{"matchExpressions": [term]}]
            }
        }
    }


def _configmap(
    name: str, namespace: str, labels: Mapping[str, str], data: Mapping[str, str]
) -> dict[str, Any]:
    size = sum(len(k) + len(v.encode()) for k, v in data.items())
    if size > MAX_CONFIGMAP_BYTES:
        raise ValueError(f"ConfigMap {name}: {size} bytes, over Kubernetes' {MAX_CONFIGMAP_BYTES}")
    return _object("v1", "ConfigMap", name, namespace, labels, data=dict(data))


def _secret(
    name: str, namespace: str, labels: Mapping[str, str], data: Mapping[str, str]
) -> dict[str, Any]:
    """An Opaque Secret holding `data` as text (`stringData`: the API server encodes it)."""
    return _object("v1", "Secret", name, namespace, labels, type="Opaque", stringData=dict(data))


def _file_volume(name: str, file: File) -> dict[str, Any]:
    """The volume of a file's ConfigMap or Secret (read by the image's user: default modes)."""
    if file.secret:
        return {"secret": {"secretName": name}}
    return {"configMap": {"name": name}}


def _file_data(file: File) -> dict[str, str]:
    """A source file's ConfigMap data: the file, or a directory's top-level files."""
    assert file.source is not None
    if file.directory:
        paths = sorted(p for p in file.source.iterdir() if p.is_file())
        return {_checked(p.name, _CONFIG_KEY, "file name"): p.read_text() for p in paths}
    return {_key(file): file.source.read_text()}


def _key(file: File) -> str:
    """The ConfigMap key of a single file: its name in the container."""
    return _checked(PurePosixPath(file.mount).name, _CONFIG_KEY, "file name")


def _shares_shm(component: Component) -> bool:
    return component.ipc_owner or component.ipc_of is not None


def _field_env(name: str, field: str) -> dict[str, Any]:
    return {"name": name, "valueFrom": {"fieldRef": {"fieldPath": field}}}


def _dns(service: str, namespace: str) -> str:
    return f"{service}.{namespace}.svc.cluster.local"


def _checked(value: str, pattern: re.Pattern[str], what: str) -> str:
    if not pattern.fullmatch(value):
        raise ValueError(f"{what} {value!r} is not valid in Kubernetes ({pattern.pattern})")
    return value


def _check_files(rendered: Sequence[Rendered]) -> None:
    """Run every generated file's check on a temporary copy (before anything is written)."""
    with tempfile.TemporaryDirectory(prefix="k8s-files-") as tmp:
        files.write_generated(rendered, Path(tmp))


def _check_unique(docs: Sequence[Mapping[str, Any]]) -> None:
    seen = set()
    for doc in docs:
        meta = doc["metadata"]
        key = (doc["kind"], meta.get("namespace"), meta["name"])
        if key in seen:
            raise ValueError(
                f"two objects {key}: component names collide once made Kubernetes names"
            )
        seen.add(key)


def _header(desc: StackDescription, name: str) -> str:
    s = desc.settings
    lines = [
        f"{desc.mesh} stack, {name}: {s.workmodel.name} (seed {s.seed}, scale {s.scale:g}).",
        "Generated by harness.deploy.k8s; do not edit. Validated offline, never applied here.",
        *(f"warning: {w}" for w in desc.warnings),
    ]
    return "".join(f"# {line}\n" for line in lines)


# PyYAML's safe dumper and loader (what `yaml.safe_dump` and `safe_load` use), with libyaml
# when PyYAML has it: the pure-Python loader takes seconds over a 20-service workmodel.
_SAFE_DUMPER = getattr(yaml, "CSafeDumper", yaml.SafeDumper)
_SAFE_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


class _Dumper(_SAFE_DUMPER):
    """The safe dumper with multi-line strings (file contents) as `|` blocks."""


def _represent_str(dumper: _Dumper, value: str) -> yaml.ScalarNode:
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_Dumper.add_representer(str, _represent_str)


@contextlib.contextmanager
def _schemas_memoised() -> Iterator[None]:
    """Read each schema file once while validating (see the module docstring)."""
    utils = kubernetes_validate.utils
    original = utils.schema_contents
    utils.schema_contents = functools.cache(original)
    try:
        yield
    finally:
        utils.schema_contents = original
