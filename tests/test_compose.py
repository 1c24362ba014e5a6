"""The compose deployer (`harness.deploy.compose`): files, offline image, the stacks in containers.

The Docker tests need an engine and `docker compose` or `docker-compose`: they
skip locally without them and fail in CI (`require_external`). The image is
built once per session (from scratch on a fresh machine: a debootstrap base
image, the wheelhouse, then the image; afterwards from Docker's cache). Every
stack publishes on a port of its own, so nothing collides with local stacks.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import http.client
import io
import json
import os
import re
import shutil
import socket
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import docker
import psutil
import pytest
import yaml

from dpumesh.dpu_daemon import STATS_PATH as BRIDGE_STATS_PATH
from harness.deploy import compose, start_stack
from harness.deploy.compose import __main__ as compose_cli
from harness.deploy.compose import cli
from harness.deploy.compose.cli import PROJECT_LABEL, SERVICE_LABEL, project_resources
from harness.deploy.compose.render import command
from harness.deploy.image import LABEL_CPU_SET
from harness.measure.accounting import get_json
from harness.names import DEFAULT_WORKMODEL, MESHES, REPO
from harness.placement import readback
from harness.placement.apply import prepare
from harness.ports import free_ports
from harness.procs import StartError
from harness.stacks import describe
from harness.stacks.model import Settings, StackDescription
from mubench.fingerprint import fingerprint
from tests.conftest import require_external

CHECKED_IN = REPO / "compose" / "default"
SHARED_WORKMODELS = sorted((REPO.parent / "shared" / "workmodels").glob("*.json"))
# 20 services: the worker caps of a 2-core machine apply.
BIG_WORKMODEL = REPO.parent / "shared" / "workmodels" / "workmodelA.json"
REQUESTS = 30
# Roles whose containers must have used CPU while serving, per stack.
BUSY_ROLES = {
    "dpumesh": ("app", "dpu-daemon", "dpa-daemon"),
    "envoy": ("app", "sidecar", "gateway"),
    "nodeproxy": ("app", "nodeproxy", "gateway"),
    "nomesh": ("app",),
}


def _describe(mesh: str, workmodel: Path = DEFAULT_WORKMODEL, **settings) -> StackDescription:
    return describe(mesh, Settings(workmodel=workmodel.resolve(), **settings))


def _compose_ready() -> bool:
    try:
        compose.compose_command()
    except compose.ComposeError:
        return False
    return True


@pytest.fixture(scope="module")
def engine() -> docker.DockerClient:
    try:
        client = compose.docker_client(timeout_s=30)
    except compose.ComposeError:
        client = None
    require_external(client is not None and _compose_ready(), "Docker engine with compose")
    assert client is not None
    return client


@pytest.fixture(scope="module")
def image(engine: docker.DockerClient) -> str:
    return compose.ensure_image()


def _leftovers(engine: docker.DockerClient, project_prefix: str) -> list[str]:
    """Containers, networks and volumes of every compose project whose name starts so."""
    labelled = {"label": PROJECT_LABEL}
    # (name, labels): containers come inspected, networks and volumes as listed.
    items = [(c.name, c.labels) for c in engine.containers.list(all=True, filters=labelled)]
    for other in (*engine.networks.list(filters=labelled), *engine.volumes.list(filters=labelled)):
        items.append((other.name, other.attrs["Labels"]))
    return [name for name, labels in items if labels[PROJECT_LABEL].startswith(project_prefix)]


def _our_projects(mesh: str) -> str:
    return f"dpumesh-{mesh}-{os.getpid()}-"


def _get(port: int, path: str, request_id: str) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request("GET", path, headers={"x-request-id": request_id})
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


@pytest.fixture(scope="module")
def generated(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Compose files of every mesh: every shared workmodel, and one with every option."""
    out = tmp_path_factory.mktemp("generated")
    files = [
        compose.generate(_describe(mesh, workmodel), out / workmodel.stem, port=15999).file
        for workmodel in SHARED_WORKMODELS
        for mesh in MESHES
    ]
    functions = out / "functions"
    functions.mkdir()
    for mesh in MESHES:
        desc = _describe(mesh, BIG_WORKMODEL, seed=7, scale=0.5, functions_dir=functions)
        cpusets = {"dpu": "1", "host": "0"}
        files.append(compose.generate(desc, out / "options", port=15998, cpusets=cpusets).file)
    return files


def test_checked_in_files_are_generated_from_the_default_workmodel(tmp_path: Path) -> None:
    """compose/default/ is exactly what `python -m harness.deploy.compose generate` writes today."""
    workmodel = tmp_path / "workmodels" / "default.json"
    workmodel.parent.mkdir()
    shutil.copy(DEFAULT_WORKMODEL, workmodel)
    out = tmp_path / "compose" / "default"  # same relative path to the workmodel as in the repo
    with contextlib.redirect_stdout(io.StringIO()):  # the command's own defaults and settings
        assert compose_cli.main(["generate", "--out", str(out), "--workmodel", str(workmodel)]) == 0
    generated = sorted(p.relative_to(out) for p in out.rglob("*") if p.is_file())
    checked_in = sorted(p.relative_to(CHECKED_IN) for p in CHECKED_IN.rglob("*") if p.is_file())
    assert generated == checked_in
    for rel in generated:
        assert (out / rel).read_text() == (CHECKED_IN / rel).read_text(), rel


def test_compose_files_publish_only_loopback_and_carry_no_version(generated: list[Path]) -> None:
    """No obsolete `version:` key; every published port on 127.0.0.1; the public one as asked."""
    for file in [*sorted(CHECKED_IN.glob("*.yml")), *generated]:
        document = yaml.safe_load(file.read_text())
        assert list(document) == ["services"], file
        published = [p for spec in document["services"].values() for p in spec.get("ports", [])]
        assert all(p.startswith("127.0.0.1:") for p in published), (file, published)
        public = [p for p in published if not p.startswith("127.0.0.1::")]
        assert len(public) == 1 and public[0].split(":")[1] in ("5005", "15999", "15998"), file


def test_cpusets_pin_each_component_to_its_cpu_set(tmp_path: Path) -> None:
    desc = _describe("dpumesh")
    cpusets = {"dpu": "1", "host": "0"}
    services = yaml.safe_load(
        compose.generate(desc, tmp_path, port=1, cpusets=cpusets).file.read_text()
    )
    for c in desc.components:
        spec = services["services"][c.name]
        assert spec["cpuset"] == cpusets[c.cpu_set] and spec["labels"][LABEL_CPU_SET] == c.cpu_set
    with pytest.raises(ValueError, match="unknown CPU sets"):
        compose.generate(desc, tmp_path, port=1, cpusets={"gpu": "0"})


@pytest.mark.docker
def test_dollar_signs_are_escaped_for_compose(tmp_path: Path) -> None:
    """Compose interpolates `$VAR` in the file: a `$` of the description is written `$$`."""
    require_external(_compose_ready(), "docker compose or docker-compose")
    desc = _describe("nomesh")
    first = dataclasses.replace(desc.components[0], env={"PRICE": "5$", "REF": "${HOME}"})
    desc = dataclasses.replace(desc, components=(first, *desc.components[1:]))
    file = compose.generate(desc, tmp_path, port=1).file
    environment = yaml.safe_load(file.read_text())["services"][first.name]["environment"]
    assert environment == {"PRICE": "5$$", "REF": "$${HOME}"}
    # Compose reads them as literal text, not as variables (v1 prints them escaped again).
    shown = cli.compose("config-check", file, "config", timeout_s=60)
    assert re.search(r"PRICE: '?5\$\$?'?\n", shown), shown
    assert re.search(r"REF: '?\$?\$\{HOME\}'?\n", shown), shown


def test_port_in_use_fails_before_anything_starts(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(StartError, match="already in use"):
            start_stack("nomesh", mode="compose", run_dir=tmp_path, port=port)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.docker
def test_every_compose_file_passes_compose_config(generated: list[Path]) -> None:
    """Checked-in files, every shared workmodel, and every option (cpusets, functions dir)."""
    require_external(_compose_ready(), "docker compose or docker-compose")
    files = [*sorted(CHECKED_IN.glob("*.yml")), *generated]
    assert len(files) == (2 + len(SHARED_WORKMODELS)) * len(MESHES)
    # One compose process per core: each is mostly interpreter start-up (v1).
    with ThreadPoolExecutor(os.cpu_count() or 1) as pool:
        list(pool.map(compose.check_config, files))


def _assert_dpumesh_crosses_containers(stack: compose.ComposeStack) -> None:
    """Workers, DMA manager and sidecar are separate containers sharing only IPC."""
    containers = stack.containers()
    (dpa,) = containers["dpa-daemon"]
    (dpu,) = containers["dpu-daemon"]
    workers = containers["app"]
    assert len(workers) == len(stack.desc.services)
    for container in (*workers, dpa):
        assert container.attrs["HostConfig"]["NetworkMode"] == "none", container.name
    for container in (*workers, dpu):
        assert container.attrs["HostConfig"]["IpcMode"] == f"container:{dpa.id}", container.name
    # The bridge sees every worker registered from the worker containers...
    live = get_json(("127.0.0.1", stack.port), BRIDGE_STATS_PATH)["workers"]
    assert {svc: len(pids) for svc, pids in live.items()} == {
        svc: workers for svc, (workers, _threads) in stack.desc.plan.items()
    }
    # ... and their rings, created in those containers, are in its own /dev/shm.
    listing = dpu.exec_run(["ls", "/dev/shm"]).output.decode().split()
    rings = [name for name in listing if name.endswith(".worker_sq")]
    assert len(rings) == sum(len(pids) for pids in live.values()), listing


def _assert_envoy_apps_live_in_their_sidecars_network(stack: compose.ComposeStack) -> None:
    """Each app shares its sidecar's network namespace, as a pod would (DESIGN §7)."""
    containers = stack.containers()
    sidecars = {c.labels[SERVICE_LABEL]: c for c in containers["sidecar"]}
    apps = containers["app"]
    assert len(apps) == len(sidecars) == len(stack.desc.services)
    for app in apps:
        service = app.labels[SERVICE_LABEL].removeprefix("app-")
        sidecar = sidecars[f"sidecar-{service}"]
        assert app.attrs["HostConfig"]["NetworkMode"] == f"container:{sidecar.id}", app.name


def _assert_manifest_says_what_ran(stack: compose.ComposeStack) -> None:
    """stack.json: the rendered commands, the settings, the code the containers really ran."""
    recorded = json.loads(stack.manifest.read_text())
    assert recorded["mode"] == "compose" and recorded["seed"] == 0
    assert recorded["url"] == stack.url
    commands = {item.component.name: command(item) for item in stack.deployment.rendered}
    assert {c["name"]: c["argv"] for c in recorded["components"]} == commands
    assert recorded["app_code"]["mubench_sha256"] == fingerprint()["mubench_sha256"]
    assert recorded["deployment"]["project"] == stack.project
    names = {c["component"] for c in recorded["deployment"]["containers"]}
    assert names == {c.name for c in stack.desc.components}


@pytest.mark.docker
@pytest.mark.slow
@pytest.mark.parametrize("mesh", MESHES)
def test_stack_answers_from_containers(
    mesh: str, engine: docker.DockerClient, image: str, tmp_path: Path
) -> None:
    """Requests through the published port reach every service; CPU is measured per role."""
    port = free_ports(1)[0]
    # DPUmesh with its daemons on a core of their own (a placement), the others without.
    cpusets = {"dpu": "1", "host": "0"} if mesh == "dpumesh" else None
    if cpusets and (os.cpu_count() or 1) < 2:
        cpusets = None
    placement = prepare("host=0,dpu=1,loadgen=1", "ideal", {}) if cpusets else None
    with compose.start(_describe(mesh), run_dir=tmp_path, port=port, placement=placement) as stack:
        project = stack.project
        assert stack.url == f"http://127.0.0.1:{port}"
        compose.check_config(stack.deployment.file)
        loadgen = {"loadgen": [psutil.Process()]}
        with stack.sampler(interval_s=0.5, extra_roles=loadgen) as sampler:
            answers = [_get(port, "/", f"compose-{mesh}-{i}") for i in range(REQUESTS)]
        usage = sampler.stop()
        traffic = stack.traffic()
        assert [status for status, _ in answers] == [200] * REQUESTS
        assert traffic["entry_requests"] == REQUESTS
        # default.json: s0 calls s1 and s2 on every request.
        assert traffic["per_service"] == {svc: REQUESTS for svc in stack.desc.services}
        for role in BUSY_ROLES[mesh]:
            assert usage.roles[role].cpu_s > 0, role
            assert usage.roles[role].rss_mean_mb > 0, role
        assert set(usage.roles) >= set(BUSY_ROLES[mesh]) | {"loadgen"}
        assert usage.roles["loadgen"].cpu_s > 0
        if mesh == "dpumesh":
            _assert_dpumesh_crosses_containers(stack)
        if mesh == "envoy":
            _assert_envoy_apps_live_in_their_sidecars_network(stack)
        for containers in stack.containers().values():
            for container in containers:
                wanted = cpusets[container.labels[LABEL_CPU_SET]] if cpusets else ""
                assert container.attrs["HostConfig"]["CpusetCpus"] == wanted, container.name
        _assert_manifest_says_what_ran(stack)
    assert project_resources(engine, project) == {"containers": [], "networks": [], "volumes": []}
    assert (tmp_path / "app-s0.log").is_file()


@pytest.mark.docker
@pytest.mark.slow
def test_a_stack_that_never_gets_ready_leaves_nothing(
    engine: docker.DockerClient, image: str, tmp_path: Path
) -> None:
    with pytest.raises(compose.ComposeError, match="not ready"):
        start_stack(
            "dpumesh", mode="compose", run_dir=tmp_path, port=free_ports(1)[0], ready_timeout_s=0
        )
    assert _leftovers(engine, _our_projects("dpumesh")) == []


@pytest.mark.docker
@pytest.mark.slow
def test_a_crashing_container_fails_the_start_with_its_log_and_leaves_nothing(
    engine: docker.DockerClient, image: str, tmp_path: Path
) -> None:
    functions = tmp_path / "functions"
    functions.mkdir(mode=0o755)
    functions.chmod(0o755)  # readable by the containers' user
    # Imports fine here (the harness reads the function names), crashes in a container,
    # where the directory is mounted elsewhere.
    (functions / "broken.py").write_text(
        f"if not __file__.startswith({str(functions)!r}):\n"
        "    raise RuntimeError('broken on purpose')\n"
        "def broken(params):\n"
        "    return ''\n"
    )
    (functions / "broken.py").chmod(0o644)
    with pytest.raises(compose.ComposeError, match="broken on purpose"):
        start_stack(
            "nomesh",
            mode="compose",
            run_dir=tmp_path / "run",
            port=free_ports(1)[0],
            functions_dir=functions,
        )
    assert _leftovers(engine, _our_projects("nomesh")) == []


@pytest.mark.docker
@pytest.mark.slow
def test_short_compose_run_writes_results_with_container_cpu(
    engine: docker.DockerClient, image: str, tmp_path: Path
) -> None:
    """`run_bench.py run --mode compose`: the same results contract, CPU per container role."""
    out = tmp_path / "results"
    args = ["--mode", "compose", "--duration", "4", "--warmup", "2", "--repeat", "1"]
    args += ["--users", "4", "--rate", "", "--meshes", "dpumesh,envoy", "--out", str(out)]
    proc = subprocess.Popen(
        [sys.executable, "run_bench.py", "run", *args],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    output, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, output[-4000:]
    (run_dir,) = [p for p in out.iterdir() if p.is_dir() and not p.is_symlink()]
    with (run_dir / "results.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert {(r["mesh"], r["mode"]) for r in rows} == {("dpumesh", "compose"), ("envoy", "compose")}
    for row in rows:
        assert float(row["achieved_rps"]) > 0 and float(row["cpu_host_ms_per_req"]) > 0
        assert (float(row["cpu_offload_ms_per_req"]) > 0) == (row["mesh"] == "dpumesh")
    with (run_dir / "roles.csv").open() as f:
        roles = {(r["mesh"], r["role"]) for r in csv.DictReader(f) if float(r["cpu_s"]) > 0}
    assert {("dpumesh", "app"), ("dpumesh", "dpu-daemon"), ("dpumesh", "dpa-daemon")} <= roles
    assert {("envoy", "app"), ("envoy", "sidecar"), ("envoy", "gateway")} <= roles
    for mesh in ("dpumesh", "envoy"):  # compose projects are named after the runner's pid
        assert _leftovers(engine, f"dpumesh-{mesh}-{proc.pid}-") == []


@pytest.mark.docker
@pytest.mark.slow
def test_the_dpu_containers_share_one_cpu_bandwidth_limit(
    engine: docker.DockerClient, image: str, tmp_path: Path
) -> None:
    """A DPU speed below 1: both daemon containers under the placement's cgroup, read back."""
    require_external((os.cpu_count() or 1) >= 2 and os.geteuid() == 0, "two CPUs and root")
    with prepare("host=0,dpu=1,loadgen=1", "ideal", {"dpu_speed": 0.5}) as placement:
        name, parent = placement.group.name, placement.group.parent_path("dpu")
        with compose.start(
            _describe("dpumesh"), run_dir=tmp_path, port=free_ports(1)[0], placement=placement
        ) as stack:
            recorded = json.loads(stack.manifest.read_text())["placement"]
            daemons = stack.containers()["dpu-daemon"] + stack.containers()["dpa-daemon"]
            parents = {c.attrs["HostConfig"]["CgroupParent"] for c in daemons}
            pids = stack.pids_by_set()["dpu"]
            limits = {readback.cgroup_limit(pid, placement.group.hierarchy) for pid in pids}
    assert parents == {parent}
    assert recorded["readback"] == [] and recorded["dpu_quota_cores"] == 0.5
    assert pids and limits == {0.5}
    # Docker made the parent in every hierarchy it uses; nothing of it is left.
    assert [p for p in Path("/sys/fs/cgroup").glob(f"*/{name}")] == []
