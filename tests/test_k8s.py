"""The Kubernetes deployer (`harness.deploy.k8s`): manifests written, read back and validated.

No cluster, no process, no network: the manifests are generated from the
stack descriptions, read back with PyYAML and checked against the pinned
Kubernetes schemas (`kubernetes-validate`, strict), then their content is
compared with the descriptions.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kubernetes_validate.utils
import pytest
import yaml

from harness.deploy import k8s
from harness.names import DEFAULT_WORKMODEL, ENVOY_MESHES, MESHES, REPO
from harness.placement.profiles import resolve
from harness.run.loadgen import LocustSpec, locust_argv
from harness.stacks import describe
from harness.stacks.cell import FUNCTIONS_MOUNT, WORKMODEL_MOUNT, app_name
from harness.stacks.envoy import TLS_MOUNTS, sidecar_name
from harness.stacks.model import Settings, StackDescription, placeholders
from loadtests.options import USER_CLASS

SHARED_WORKMODELS = sorted((REPO.parent / "shared" / "workmodels").glob("*.json"))
WORKLOADS = ("Deployment", "DaemonSet", "Job")
SHM_VOLUME = {"name": "shm", "hostPath": {"path": "/dev/shm", "type": "Directory"}}
LABELS = (
    "app.kubernetes.io/part-of",
    "dpumesh.mesh",
    "dpumesh.role",
    "dpumesh.service",
    "dpumesh.cpu-set",
)


def descriptions(workmodel: Path, **settings: Any) -> list[StackDescription]:
    return [describe(mesh, Settings(workmodel=workmodel, **settings)) for mesh in MESHES]


def read(out: Path, mesh: str) -> dict[str, list[dict[str, Any]]]:
    """The documents of one stack directory by relative file name."""
    directory = out / mesh
    return {
        str(p.relative_to(directory)): list(yaml.safe_load_all(p.read_text()))
        for p in sorted(directory.rglob("*.yaml"))
    }


def objects(files: dict[str, list[dict[str, Any]]]) -> Iterator[dict[str, Any]]:
    for docs in files.values():
        yield from docs


def find(files: dict[str, list[dict]], kind: str, name: str) -> dict[str, Any]:
    (found,) = [o for o in objects(files) if o["kind"] == kind and o["metadata"]["name"] == name]
    return found


def pod_spec(workload: dict[str, Any]) -> dict[str, Any]:
    return workload["spec"]["template"]["spec"]


def containers(files: dict[str, list[dict]]) -> dict[str, dict[str, Any]]:
    """Every container of the stack's workloads by name (the component's)."""
    return {
        c["name"]: c
        for o in objects(files)
        if o["kind"] in WORKLOADS
        for c in pod_spec(o)["containers"]
    }


def env(container: dict[str, Any]) -> dict[str, str]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container.get("env", [])}


def service_names(files: dict[str, list[dict]]) -> set[str]:
    return {
        f"{o['metadata']['name']}.{o['metadata']['namespace']}.svc.cluster.local"
        for o in objects(files)
        if o["kind"] == "Service"
    }


@pytest.fixture(scope="module")
def default(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The default workmodel's manifests, with the Envoy bootstraps checked by Envoy itself off."""
    out = tmp_path_factory.mktemp("k8s")
    descs = descriptions(DEFAULT_WORKMODEL)
    written = k8s.write(descs, out, check=False)
    return {
        "out": out,
        "written": written,
        "descs": {d.mesh: d for d in descs},
        "files": {mesh: read(out, mesh) for mesh in MESHES},
    }


@pytest.mark.parametrize(
    "workmodel",
    [DEFAULT_WORKMODEL, *SHARED_WORKMODELS],
    ids=lambda p: p.stem,
)
def test_every_workmodel_validates(workmodel: Path, tmp_path: Path) -> None:
    written = k8s.write(descriptions(workmodel), tmp_path, check=False)
    counts = k8s.validate_all(tmp_path)
    assert sorted(counts) == sorted(p for paths in written.values() for p in paths)
    layout = {"stack.yaml", "locust/workers.yaml", "locust/master-ui.yaml"}
    layout.add("locust/master-headless.yaml")
    for mesh in MESHES:
        assert {str(p.relative_to(tmp_path / mesh)) for p in written[mesh]} == layout
    assert all(n > 0 for n in counts.values())


def test_the_shared_workmodels_are_there() -> None:
    assert len(SHARED_WORKMODELS) >= 5


def test_validation_is_strict(tmp_path: Path, default: dict[str, Any]) -> None:
    reader = kubernetes_validate.utils.schema_contents
    stack = default["written"]["nomesh"][0]
    docs = list(yaml.safe_load_all(stack.read_text()))
    docs[-1]["spec"]["colour"] = "blue"
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump_all(docs))
    with pytest.raises(k8s.ManifestError, match=r"bad\.yaml: Service/.*: spec: .*'colour'"):
        k8s.validate(bad)
    bad.write_text(yaml.safe_dump({"apiVersion": "v1", "kind": "Gizmo", "metadata": {}}))
    with pytest.raises(k8s.ManifestError, match="Gizmo"):
        k8s.validate(bad)
    with pytest.raises(k8s.ManifestError, match="no manifests"):
        k8s.validate_all(tmp_path / "empty")
    assert kubernetes_validate.utils.schema_contents is reader  # memoised only while validating


def test_dpumesh_has_the_seed_layout(default: dict[str, Any]) -> None:
    files = default["files"]["dpumesh"]
    desc = default["descs"]["dpumesh"]
    namespaces = {o["metadata"]["name"] for o in objects(files) if o["kind"] == "Namespace"}
    assert namespaces == {"dpumesh-system", "mubench-dpu"}
    for daemon in ("dpa-daemon", "dpu-daemon"):
        ds = find(files, "DaemonSet", daemon)
        assert ds["metadata"]["namespace"] == "dpumesh-system"
        assert [c["name"] for c in pod_spec(ds)["containers"]] == [daemon]
        assert ds["spec"]["template"]["metadata"]["labels"]["app"] == daemon  # the seed's -l app=
    for svc, (workers, _threads) in desc.plan.items():
        deployment = find(files, "Deployment", f"{svc}-worker")
        assert deployment["metadata"]["namespace"] == "mubench-dpu"
        assert deployment["spec"]["replicas"] == 1
        assert deployment["spec"]["template"]["metadata"]["labels"]["app"] == f"{svc}-worker"
        (container,) = pod_spec(deployment)["containers"]
        variables = env(container)
        assert variables["APP"] == svc
        assert variables["K8S_APP"] == f"{svc}-worker"
        assert variables["PN"] == str(workers)
        assert variables["ZONE"] == "$(NODE_NAME)"
        assert variables["NODE_NAME"] == {"fieldRef": {"fieldPath": "spec.nodeName"}}
        names = [e["name"] for e in container["env"]]
        assert names.index("NODE_NAME") < names.index("ZONE")  # Kubernetes expands in order
        probe = container["startupProbe"]["exec"]["command"]
        assert probe[-3:] == [
            "http://dpu-daemon.dpumesh-system.svc.cluster.local:5005/_dpumesh/stats",
            svc,
            str(workers),
        ]
        assert "readinessProbe" not in container
    workloads = [o for o in objects(files) if o["kind"] in ("Deployment", "DaemonSet")]
    assert len(workloads) == 2 + len(desc.services) + 2  # daemons, workers, Locust UI and workers


def test_daemons_and_workers_share_the_nodes_shm(default: dict[str, Any]) -> None:
    """One mechanism on every DPUmesh pod: the node's /dev/shm, mounted at /dev/shm."""
    files = default["files"]["dpumesh"]
    mesh_pods = [
        o
        for o in objects(files)
        if o["kind"] in WORKLOADS and o["metadata"]["labels"]["dpumesh.role"] != "loadgen"
    ]
    assert {o["metadata"]["name"] for o in mesh_pods} >= {"dpa-daemon", "dpu-daemon", "s0-worker"}
    for workload in mesh_pods:
        spec = pod_spec(workload)
        assert SHM_VOLUME in spec["volumes"]
        assert "hostIPC" not in spec and "hostNetwork" not in spec and "hostPID" not in spec
        for container in spec["containers"]:
            assert {"name": "shm", "mountPath": "/dev/shm"} in container["volumeMounts"]
            assert "privileged" not in container["securityContext"]
    ns = {o["metadata"]["name"]: o for o in objects(files) if o["kind"] == "Namespace"}
    for namespace in ns.values():
        assert namespace["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "privileged"
    for mesh in ("envoy", "nomesh"):
        other = default["files"][mesh]
        for workload in (o for o in objects(other) if o["kind"] in WORKLOADS):
            assert all("hostPath" not in v for v in pod_spec(workload).get("volumes", []))
        (namespace,) = [o for o in objects(other) if o["kind"] == "Namespace"]
        assert namespace["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"


def test_the_bridge_service_is_node_local_on_5005(default: dict[str, Any]) -> None:
    files = default["files"]["dpumesh"]
    service = find(files, "Service", "dpu-daemon")
    assert service["metadata"]["namespace"] == "dpumesh-system"
    assert service["spec"]["ports"] == [{"name": "public", "port": 5005, "targetPort": "public"}]
    assert service["spec"]["internalTrafficPolicy"] == "Local"
    pod_labels = find(files, "DaemonSet", "dpu-daemon")["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= pod_labels.items()
    ports = containers(files)["dpu-daemon"]["ports"]
    assert ports == [{"name": "public", "containerPort": 5005, "protocol": "TCP"}]
    # Workers and the DMA manager have no port, hence no Service.
    assert {o["metadata"]["name"] for o in objects(files) if o["kind"] == "Service"} == {
        "dpu-daemon",
        "locust-master",
    }


def test_each_envoy_pod_holds_its_app_and_sidecar(default: dict[str, Any]) -> None:
    files = default["files"]["envoy"]
    desc = default["descs"]["envoy"]
    services = service_names(files)
    configmaps = {o["metadata"]["name"]: o for o in objects(files) if o["kind"] == "ConfigMap"}
    for svc in desc.services:
        deployment = find(files, "Deployment", sidecar_name(svc))
        app, sidecar = pod_spec(deployment)["containers"]
        assert (app["name"], sidecar["name"]) == (app_name(svc), sidecar_name(svc))
        outbound = desc.component(sidecar_name(svc)).ports["outbound"].number
        egress = app["args"].index("--egress-proxy")
        assert app["args"][egress + 1] == f"http://127.0.0.1:{outbound}"
        assert sidecar["command"] == ["/usr/local/bin/envoy"]
        (mount,) = sidecar["volumeMounts"]
        assert mount["mountPath"] == "/etc/envoy/envoy.json"
        bootstrap = json.loads(configmaps[mount["name"]]["data"][mount["subPath"]])
        for cluster in bootstrap["static_resources"]["clusters"]:
            (endpoint,) = cluster["load_assignment"]["endpoints"][0]["lb_endpoints"]
            host = endpoint["endpoint"]["address"]["socket_address"]["address"]
            assert host == "127.0.0.1" or host in services
        service = find(files, "Service", sidecar_name(svc))
        inbound = desc.component(sidecar_name(svc)).ports["inbound"].number
        assert {"name": "inbound", "port": inbound, "targetPort": "inbound"} in service["spec"][
            "ports"
        ]
    gateway = find(files, "Deployment", "gateway")
    assert [c["name"] for c in pod_spec(gateway)["containers"]] == ["gateway"]
    gateway_service = find(files, "Service", "gateway")
    assert {"name": "public", "port": 5005, "targetPort": "public"} in gateway_service["spec"][
        "ports"
    ]


def test_nomesh_is_one_deployment_and_service_per_app(default: dict[str, Any]) -> None:
    files = default["files"]["nomesh"]
    desc = default["descs"]["nomesh"]
    services = service_names(files)
    for svc in desc.services:
        (app,) = pod_spec(find(files, "Deployment", app_name(svc)))["containers"]
        find(files, "Service", app_name(svc))
        upstreams = [app["args"][i + 1] for i, a in enumerate(app["args"]) if a == "--upstream"]
        assert len(upstreams) == len(desc.services)
        for upstream in upstreams:
            match = re.fullmatch(r"([^=]+)=http://([^:]+):\d+", upstream)
            assert match
            callee, host = match.groups()
            assert (host == "127.0.0.1") if callee == svc else (host in services)


def test_locust_master_and_workers(default: dict[str, Any]) -> None:
    for mesh in MESHES:
        files = default["files"][mesh]
        desc = default["descs"][mesh]
        namespace = k8s.stack_namespace(mesh)
        master = find(files, "Service", "locust-master")
        assert master["metadata"]["namespace"] == namespace
        assert {(p["name"], p["port"]) for p in master["spec"]["ports"]} == {
            ("master", 5557),
            ("web", 8089),
        }
        workers = find(files, "Deployment", "locust-worker")
        assert workers["spec"]["replicas"] == k8s.Load().workers
        (worker,) = pod_spec(workers)["containers"]
        args = worker["args"]
        assert "--worker" in args and args[-1] == USER_CLASS
        assert (
            args[args.index("--master-host") + 1] == f"locust-master.{namespace}.svc.cluster.local"
        )
        assert args[args.index("--master-port") + 1] == "5557"
        public, port = desc.public
        entry = find(files, "Service", k8s.K8sResolver(desc).pod(public.name))
        url = (
            f"http://{entry['metadata']['name']}.{entry['metadata']['namespace']}"
            f".svc.cluster.local:{public.ports[port].number}"
        )
        ui = find(files, "Deployment", "locust-master")
        job = find(files, "Job", "locust-headless")
        assert job["spec"]["template"]["spec"]["restartPolicy"] == "Never"
        for workload, headless in ((ui, False), (job, True)):
            labels = workload["spec"]["template"]["metadata"]["labels"]
            assert master["spec"]["selector"].items() <= labels.items()
            (container,) = pod_spec(workload)["containers"]
            args = container["args"]
            assert args[:5] == ["-m", "locust", "-f", "loadtests/locustfile.py", "--master"]
            assert args[args.index("--host") + 1] == url
            assert args[-1] == USER_CLASS
            assert ("--headless" in args) == headless


def test_the_headless_master_takes_the_runners_options(default: dict[str, Any]) -> None:
    """Every option the runner's Locust gets (but its live plugin's file) the Job gets too."""
    spec = LocustSpec(
        host="http://x:1",
        users=16,
        rate=0.0,
        excluded_s=10,
        measured_s=60,
        hdr_out=Path("/r/latency.hdr"),
        csv_prefix=Path("/r/locust"),
        request_id_prefix="req-",
    )
    runner = locust_argv(spec)
    job = find(default["files"]["envoy"], "Job", "locust-headless")
    (container,) = pod_spec(job)["containers"]
    args = container["args"]
    plugin = {"--events-out"}  # the runner's live plugin (harness.run.locust_live) only
    options = {a for a in runner if a.startswith("-")} - plugin
    assert options <= {a for a in args if a.startswith("-")}
    for option in ("-u", "-r", "-t", "--warmup-s", "--open-loop-rate", "--request-id-prefix"):
        assert args[args.index(option) + 1] == runner[runner.index(option) + 1]
    assert runner[-1] == args[-1] == USER_CLASS == k8s.USER_CLASS


def test_every_object_has_the_labels_and_every_container_resources(
    default: dict[str, Any],
) -> None:
    for mesh in MESHES:
        files = default["files"][mesh]
        desc = default["descs"][mesh]
        roles = {c.name: c.role for c in desc.components}
        for o in objects(files):
            labels = o["metadata"]["labels"]
            assert all(key in labels for key in LABELS), o["metadata"]
            assert labels["app.kubernetes.io/part-of"] == "dpumesh-bench"
            assert labels["dpumesh.mesh"] == mesh
            if o["kind"] not in WORKLOADS:
                continue
            pod_labels = o["spec"]["template"]["metadata"]["labels"]
            assert all(key in pod_labels for key in LABELS)
            for container in pod_spec(o)["containers"]:
                role = roles.get(container["name"], "loadgen")
                assert container["resources"] == k8s.RESOURCES[role].spec()
        for c in desc.components:
            owner = desc.network_owner(c.name)
            workload = find(
                files,
                "DaemonSet" if owner.role in k8s.NODE_ROLES else "Deployment",
                k8s.K8sResolver(desc).pod(c.name),
            )
            labels = workload["metadata"]["labels"]
            assert (labels["dpumesh.role"], labels["dpumesh.service"]) == (
                owner.role,
                owner.service,
            )
            assert labels["dpumesh.cpu-set"] == owner.cpu_set
    for role in k8s.DPU_ROLES:  # the `dpu` CPU set: whole cores, Guaranteed
        spec = k8s.RESOURCES[role].spec()
        assert spec["requests"] == spec["limits"]


def _template(template: str) -> tuple[re.Pattern[str], list[str]]:
    """`template` as a regex: literals escaped, each placeholder a group; and the placeholders."""
    found = placeholders([template])
    parts, rest = [], template
    for placeholder in found:
        before, _, rest = rest.partition(placeholder)
        parts += [re.escape(before), "(.+?)"]
    return re.compile("".join([*parts, re.escape(rest)])), found


def test_rendered_containers_are_the_descriptions_up_to_placeholders(
    default: dict[str, Any],
) -> None:
    for mesh in MESHES:
        files = default["files"][mesh]
        desc = default["descs"][mesh]
        resolver = k8s.K8sResolver(desc)
        services = service_names(files)
        rendered = containers(files)
        for c in desc.components:
            container = rendered[c.name]
            assert container["command"] == [k8s.EXECUTABLES[c.program]]
            values = env(container)
            pairs = list(zip(c.args, container["args"], strict=True))
            pairs += [(template, values[name]) for name, template in c.env.items()]
            for template, value in pairs:
                pattern, found = _template(template)
                match = pattern.fullmatch(value)
                assert match, (c.name, template, value)
                for placeholder, got in zip(found, match.groups(), strict=True):
                    kind, *ref = placeholder.strip("{}").split(":")
                    if kind == "bind":
                        assert got == "0.0.0.0"
                    elif kind == "port":
                        assert got == str(desc.component(ref[0]).ports[ref[1]].number)
                    elif kind == "host":
                        same_pod = resolver.pod(ref[0]) == resolver.pod(c.name)
                        assert (got == "127.0.0.1") if same_pod else (got in services)
                    elif kind == "file":
                        assert got == c.file(ref[0]).mount
                    elif kind == "ipc":
                        assert got == "default"
                    else:
                        assert (kind, got) == ("node", "$(NODE_NAME)")
            ports = {p["name"]: p["containerPort"] for p in container.get("ports", [])}
            assert ports == {name: port.number for name, port in c.ports.items()}


def test_generated_files_are_checked_before_anything_is_written(tmp_path: Path) -> None:
    desc = describe("envoy", Settings(workmodel=DEFAULT_WORKMODEL))
    checked: dict[str, str] = {}

    def record(path: Path, _files_here: Any) -> None:
        checked[path.name] = path.read_text()

    def fail(path: Path, _files_here: Any) -> None:
        raise RuntimeError(f"rejected {path.name}")

    def with_check(check: Any) -> StackDescription:
        components = tuple(
            dataclasses.replace(
                c,
                files=tuple(
                    dataclasses.replace(f, check=check) if f.generate else f for f in c.files
                ),
            )
            for c in desc.components
        )
        return dataclasses.replace(desc, components=components)

    (stack, *_locust) = k8s.write([with_check(record)], tmp_path / "ok")["envoy"]
    configmaps = {
        o["metadata"]["name"]: o["data"]["envoy.json"]
        for o in yaml.safe_load_all(stack.read_text())
        if o["kind"] == "ConfigMap" and o["metadata"]["name"] != "workmodel"
    }
    assert sorted(checked.values()) == sorted(configmaps.values())
    assert len(checked) == len(desc.services) + 1
    with pytest.raises(RuntimeError, match="rejected"):
        k8s.write([with_check(fail)], tmp_path / "bad")
    assert not (tmp_path / "bad").exists()


def test_functions_dir_is_a_mounted_configmap(tmp_path: Path) -> None:
    functions = tmp_path / "functions"
    functions.mkdir()
    (functions / "extra.py").write_text("def busy(params):\n    return 'x'\n")
    descs = descriptions(DEFAULT_WORKMODEL, functions_dir=functions)
    k8s.write(descs, tmp_path / "out", check=False)
    k8s.validate_all(tmp_path / "out")
    for mesh in MESHES:
        files = read(tmp_path / "out", mesh)
        (configmap,) = [
            o
            for o in objects(files)
            if o["kind"] == "ConfigMap" and o["metadata"]["name"] == "functions"
        ]
        assert configmap["data"] == {"extra.py": "def busy(params):\n    return 'x'\n"}
        apps = [c for c in descs[MESHES.index(mesh)].components if c.role == "app"]
        rendered = containers(files)
        for app in apps:
            mounts = {m["mountPath"]: m for m in rendered[app.name]["volumeMounts"]}
            assert mounts[FUNCTIONS_MOUNT] == {
                "name": "functions",
                "mountPath": FUNCTIONS_MOUNT,
                "readOnly": True,
            }
            assert mounts[WORKMODEL_MOUNT]["subPath"] == "workmodel.json"


def test_names_and_parameters_are_checked(tmp_path: Path) -> None:
    assert k8s.k8s_name("app-Big_1") == "app-big-1"
    with pytest.raises(ValueError, match="not valid in Kubernetes"):
        k8s.k8s_name("x" * 64)
    descs = descriptions(DEFAULT_WORKMODEL)
    with pytest.raises(ValueError, match="one description per mesh"):
        k8s.write([descs[0], descs[0]], tmp_path, check=False)
    with pytest.raises(ValueError, match="no resources for role 'sidecar'"):
        k8s.write(descs[1:2], tmp_path, check=False, resources={"app": k8s.RESOURCES["app"]})
    with pytest.raises(ValueError, match="workers <= users"):
        k8s.Load(workers=4, users=2)


def test_the_dpu_daemons_limits_follow_the_dpu_model():
    """Half the model's DPU capacity each, at most the one core an event loop uses."""
    slow = k8s.resources_for(resolve("ideal", {"dpu_speed": 0.25}))
    assert {slow[r].cpu_request for r in k8s.DPU_ROLES} == {"125m"}
    assert {slow[r].cpu_limit for r in k8s.DPU_ROLES} == {"125m"}
    assert slow["app"] == k8s.RESOURCES["app"] and slow["loadgen"] == k8s.RESOURCES["loadgen"]
    big = k8s.resources_for(resolve("bluefield3", {}))  # 0.5 x 16 cores: capped at one each
    assert {big[r].cpu_limit for r in k8s.DPU_ROLES} == {"1000m"}


def test_the_node_proxy_is_one_daemonset_its_apps_reach_on_their_node(
    default: dict[str, Any],
) -> None:
    files = default["files"]["nodeproxy"]
    desc = default["descs"]["nodeproxy"]
    namespace = k8s.stack_namespace("nodeproxy")
    (daemonset,) = [o for o in objects(files) if o["kind"] == "DaemonSet"]
    assert daemonset["metadata"]["name"] == "nodeproxy"
    assert daemonset["metadata"]["namespace"] == namespace
    assert [c["name"] for c in pod_spec(daemonset)["containers"]] == ["nodeproxy-node1"]
    service = find(files, "Service", "nodeproxy")
    assert service["spec"]["internalTrafficPolicy"] == "Local"  # each node's own node proxy
    host = f"nodeproxy.{namespace}.svc.cluster.local"
    for svc in desc.services:
        (app,) = pod_spec(find(files, "Deployment", app_name(svc)))["containers"]
        upstreams = [app["args"][i + 1] for i, a in enumerate(app["args"]) if a == "--upstream"]
        assert {u.split("//")[1].split(":")[0] for u in upstreams} == {host}


def test_mtls_keys_are_secrets_mounted_by_their_envoy(tmp_path: Path) -> None:
    descs = [
        describe(mesh, Settings(workmodel=DEFAULT_WORKMODEL, mtls=True)) for mesh in ENVOY_MESHES
    ]
    k8s.write(descs, tmp_path, check=False)
    k8s.validate_all(tmp_path)
    for desc in descs:
        files = read(tmp_path, desc.mesh)
        envoys = [c for c in desc.components if c.program == "envoy"]
        secrets = {o["metadata"]["name"]: o for o in objects(files) if o["kind"] == "Secret"}
        names = {k8s.k8s_name(f"{c.name}-{f}") for c in envoys for f in TLS_MOUNTS}
        assert set(secrets) == names
        assert all(s["type"] == "Opaque" for s in secrets.values())
        configmaps = [o for o in objects(files) if o["kind"] == "ConfigMap"]
        assert not any("PRIVATE KEY" in v for o in configmaps for v in o["data"].values())
        rendered = containers(files)
        for c in envoys:
            mounts = {m["mountPath"]: m for m in rendered[c.name]["volumeMounts"]}
            for name, mount in TLS_MOUNTS.items():
                secret = k8s.k8s_name(f"{c.name}-{name}")
                assert mounts[mount]["name"] == secret and mounts[mount]["readOnly"] is True
                assert "BEGIN" in next(iter(secrets[secret]["stringData"].values()))
            workload = next(
                o
                for o in objects(files)
                if o["kind"] in WORKLOADS
                and c.name in [x["name"] for x in pod_spec(o)["containers"]]
            )
            volumes = {v["name"]: v for v in pod_spec(workload)["volumes"]}
            for name in TLS_MOUNTS:
                secret = k8s.k8s_name(f"{c.name}-{name}")
                assert volumes[secret] == {"name": secret, "secret": {"secretName": secret}}


# Nodes (DESIGN §8): the description's placement as node affinity to labelled nodes.

# The Envoy generators (`baselines.envoy.config`) want every port of the mesh distinct, and the
# manifests' numbers are fixed per service: two instances of a service (envoy) or two node
# proxies (nodeproxy) repeat them, so those stacks do not render on several nodes yet.


def replicated_workmodel(directory: Path) -> Path:
    """The default workmodel with s1 on two nodes (μBench's `replicas`)."""
    doc = json.loads(DEFAULT_WORKMODEL.read_text())
    doc["s1"]["replicas"] = 2
    path = directory / "replicated.json"
    path.write_text(json.dumps(doc))
    return path


def placed(mesh: str, workmodel: Path, out: Path, nodes: int) -> tuple[StackDescription, dict]:
    """`mesh` on `nodes` nodes, written to `out` and validated."""
    desc = describe(mesh, Settings(workmodel=workmodel, nodes=nodes))
    k8s.write([desc], out, check=False)
    assert all(n > 0 for n in k8s.validate_all(out).values())
    return desc, read(out, mesh)


def affinity_node(spec: dict[str, Any]) -> str | None:
    """The one node a pod spec's required node affinity allows, None without affinity."""
    if "affinity" not in spec:
        return None
    assert "nodeSelector" not in spec
    assert spec["affinity"].keys() == {"nodeAffinity"}
    required = spec["affinity"]["nodeAffinity"]
    assert required.keys() == {"requiredDuringSchedulingIgnoredDuringExecution"}
    (term,) = required["requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"]
    (expression,) = term["matchExpressions"]
    assert (expression["key"], expression["operator"]) == (k8s.NODE_LABEL, "In")
    (node,) = expression["values"]
    return node


def workload_of(files: dict, desc: StackDescription, component: str) -> dict[str, Any]:
    owner = desc.network_owner(component)
    kind = "DaemonSet" if owner.role in k8s.NODE_ROLES else "Deployment"
    return find(files, kind, k8s.K8sResolver(desc).pod(component))


@pytest.mark.parametrize("nodes", [1, 3])
@pytest.mark.parametrize("mesh", MESHES)
def test_every_pod_has_affinity_to_its_components_node(
    mesh: str, nodes: int, tmp_path: Path
) -> None:
    desc, files = placed(mesh, replicated_workmodel(tmp_path), tmp_path / "out", nodes)
    assert desc.topology.isolated and len(desc.topology.nodes) == nodes
    pinned: dict[str, str] = {}
    for c in desc.components:
        workload = workload_of(files, desc, c.name)
        assert k8s.k8s_name(c.name) in [x["name"] for x in pod_spec(workload)["containers"]]
        assert affinity_node(pod_spec(workload)) == c.node, c.name
        pinned[workload["metadata"]["name"]] = c.node
    workloads = [o for o in objects(files) if o["kind"] in WORKLOADS]
    for workload in workloads:
        name = workload["metadata"]["name"]
        if workload["metadata"]["labels"]["dpumesh.role"] == "loadgen":
            assert affinity_node(pod_spec(workload)) == k8s.CLIENT_NODE == "client"
        else:
            assert name in pinned  # every other workload is a component's
    loadgen = {o["metadata"]["name"] for o in workloads if o["metadata"]["name"] not in pinned}
    assert loadgen == {"locust-master", "locust-worker", "locust-headless"}
    # A service on several nodes: one workload per instance, each on its node.
    if nodes == 3:
        instances = [c for c in desc.components if c.role == "app" and c.service == "s1"]
        assert sorted(c.node for c in instances) == ["node2", "node3"]
        assert len({workload_of(files, desc, c.name)["metadata"]["name"] for c in instances}) == 2
    # Per-node pods' Services answer callers on other nodes (the load generator's among them).
    for daemonset in (o for o in workloads if o["kind"] == "DaemonSet"):
        name = daemonset["metadata"]["name"]
        assert name in {k8s.k8s_name(c.name) for c in desc.components}  # one per component
        services = [o for o in objects(files) if o["kind"] == "Service"]
        for service in (s for s in services if s["metadata"]["name"] == name):
            assert service["spec"]["internalTrafficPolicy"] == "Cluster"
            assert service["spec"]["selector"] == {"app": name}


def test_dpumesh_has_a_daemonset_per_node_and_role_with_its_routes(tmp_path: Path) -> None:
    desc, files = placed("dpumesh", replicated_workmodel(tmp_path), tmp_path / "out", 3)
    topology = desc.topology
    assert dict(topology.instances) == {
        "s0": ("node1",),
        "s1": ("node2", "node3"),
        "s2": ("node3",),
    }
    daemonsets = {o["metadata"]["name"]: o for o in objects(files) if o["kind"] == "DaemonSet"}
    expected = {f"{role}-{node}" for role in k8s.DPU_ROLES for node in topology.nodes}
    assert set(daemonsets) == expected

    def bridge(node: str) -> str:
        return f"http://dpu-daemon-{node}.dpumesh-system.svc.cluster.local:5005"

    for node in topology.nodes:
        for role in k8s.DPU_ROLES:
            ds = daemonsets[f"{role}-{node}"]
            assert ds["metadata"]["namespace"] == "dpumesh-system"
            assert affinity_node(pod_spec(ds)) == node
            assert SHM_VOLUME in pod_spec(ds)["volumes"]
        # The services with no worker on this node, to the bridges of the nodes that have one.
        assert routes_of(daemonsets, node) == [
            f"{svc}={bridge(other)}"
            for svc in desc.services
            if node not in topology.nodes_of(svc)
            for other in topology.nodes_of(svc)
        ]
        service = find(files, "Service", f"dpu-daemon-{node}")
        assert service["spec"]["internalTrafficPolicy"] == "Cluster"
        assert service["spec"]["selector"] == {"app": f"dpu-daemon-{node}"}
        template = daemonsets[f"dpu-daemon-{node}"]["spec"]["template"]
        assert template["metadata"]["labels"]["app"] == f"dpu-daemon-{node}"
    assert routes_of(daemonsets, "node1") == [
        f"s1={bridge('node2')}",
        f"s1={bridge('node3')}",
        f"s2={bridge('node3')}",
    ]
    assert routes_of(daemonsets, "node3") == [f"s0={bridge('node1')}"]
    # Each worker's startup probe asks its own node's bridge; a replicated one per node.
    for c in (c for c in desc.components if c.role == "app"):
        (container,) = pod_spec(workload_of(files, desc, c.name))["containers"]
        assert container["startupProbe"]["exec"]["command"][-3] == (
            f"{bridge(c.node)}/_dpumesh/stats"
        )
    assert {o["metadata"]["name"] for o in objects(files) if o["kind"] == "Deployment"} >= {
        "s0-worker",
        "s1-worker-node2",
        "s1-worker-node3",
        "s2-worker",
    }
    # Locust, on the client node, calls the entry's bridge (node1's) through its Service.
    job = find(files, "Job", "locust-headless")
    (master,) = pod_spec(job)["containers"]
    assert master["args"][master["args"].index("--host") + 1] == bridge("node1")


def routes_of(daemonsets: dict[str, dict[str, Any]], node: str) -> list[str]:
    (daemon,) = pod_spec(daemonsets[f"dpu-daemon-{node}"])["containers"]
    return [daemon["args"][i + 1] for i, a in enumerate(daemon["args"]) if a == "--route"]


def test_envoy_on_three_nodes_pins_each_pod(tmp_path: Path) -> None:
    """One instance a service (the Envoy generator's ports stay distinct): every pod pinned."""
    desc, files = placed("envoy", DEFAULT_WORKMODEL, tmp_path / "out", 3)
    for c in desc.components:
        assert affinity_node(pod_spec(workload_of(files, desc, c.name))) == c.node
    assert {c.node for c in desc.components} == {"node1", "node2", "node3"}
    assert affinity_node(pod_spec(find(files, "Deployment", "locust-worker"))) == "client"


def test_no_affinity_without_nodes(default: dict[str, Any]) -> None:
    for mesh in MESHES:
        assert not default["descs"][mesh].topology.isolated
        for workload in (o for o in objects(default["files"][mesh]) if o["kind"] in WORKLOADS):
            assert affinity_node(pod_spec(workload)) is None
            assert "nodeSelector" not in pod_spec(workload)
