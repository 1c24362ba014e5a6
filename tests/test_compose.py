"""Docker Compose deployment (`harness.deploy.compose.legacy`): files, offline image, the stacks in containers.

The Docker tests need an engine and `docker compose` or `docker-compose`: they
skip locally without them and fail in CI (`require_external`). The image is
built once per session (from scratch on a fresh machine: a debootstrap base
image, the wheelhouse, then the image; afterwards from Docker's cache). Every
stack publishes on a port of its own, so nothing collides with local stacks.
"""

from __future__ import annotations

import csv
import http.client
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import docker
import psutil
import pytest

from dpumesh.dpu_daemon import STATS_PATH as BRIDGE_STATS_PATH
from harness.deploy.local import DEFAULT_WORKMODEL, MESHES, REPO
from harness.measure.accounting import get_json
from harness.ports import free_ports
from harness.procs import StartError
from tests.conftest import require_external

CHECKED_IN = REPO / "compose" / "default"
# 20 services: the worker caps of a 2-core machine apply.
BIG_WORKMODEL = REPO.parent / "shared" / "workmodels" / "workmodelA.json"
REQUESTS = 30
# Roles whose containers must have used CPU while serving, per stack.
BUSY_ROLES = {
    "dpumesh": ("app", "dpu-daemon", "dpa-daemon"),
    "envoy": ("app", "sidecar", "gateway"),
    "nomesh": ("app",),
}


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
    labelled = {"label": compose.PROJECT_LABEL}
    # (name, labels): containers come inspected, networks and volumes as listed.
    items = [(c.name, c.labels) for c in engine.containers.list(all=True, filters=labelled)]
    for other in (*engine.networks.list(filters=labelled), *engine.volumes.list(filters=labelled)):
        items.append((other.name, other.attrs["Labels"]))
    return [
        name for name, labels in items if labels[compose.PROJECT_LABEL].startswith(project_prefix)
    ]


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


def test_checked_in_files_are_generated_from_the_default_workmodel(tmp_path: Path) -> None:
    """compose/default/ is exactly what `python -m harness.deploy.compose.legacy generate` writes today."""
    workmodel = tmp_path / "workmodels" / "default.json"
    workmodel.parent.mkdir()
    shutil.copy(DEFAULT_WORKMODEL, workmodel)
    out = tmp_path / "compose" / "default"  # same relative path to the workmodel as in the repo
    for mesh in MESHES:
        compose.generate(mesh, workmodel, out)
    generated = sorted(p.relative_to(out) for p in out.rglob("*") if p.is_file())
    checked_in = sorted(p.relative_to(CHECKED_IN) for p in CHECKED_IN.rglob("*") if p.is_file())
    assert generated == checked_in
    for rel in generated:
        assert (out / rel).read_text() == (CHECKED_IN / rel).read_text(), rel


def test_port_in_use_fails_before_anything_starts(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(StartError, match="already in use"):
            compose.start_stack("nomesh", run_dir=tmp_path, port=port)


@pytest.mark.docker
def test_every_compose_file_passes_compose_config(tmp_path: Path) -> None:
    """Checked-in files, and generated ones with every option (cpusets, functions dir)."""
    require_external(_compose_ready(), "docker compose or docker-compose")
    files = sorted(CHECKED_IN.glob("*.yml"))
    (tmp_path / "functions").mkdir()
    for mesh in MESHES:
        files.append(
            compose.generate(
                mesh,
                BIG_WORKMODEL,
                tmp_path / "options",
                port=15999,
                seed=7,
                scale=0.5,
                functions_dir=tmp_path / "functions",
                cpusets=compose.CpuSets(offload="1", host="0"),
            ).file
        )
    assert len(files) == 2 * len(MESHES)
    for file in files:
        compose.check_config(file)


def _assert_dpumesh_crosses_containers(stack: compose.ComposeStack) -> None:
    """Workers, DMA manager and sidecar are separate containers sharing only IPC."""
    containers = stack.containers()
    (dpa,) = containers["dpa-daemon"]
    (dpu,) = containers["dpu-daemon"]
    workers = containers["app"]
    assert len(workers) == len(stack.deployment.services)
    for container in (*workers, dpa):
        assert container.attrs["HostConfig"]["NetworkMode"] == "none", container.name
    for container in (*workers, dpu):
        assert container.attrs["HostConfig"]["IpcMode"] == f"container:{dpa.id}", container.name
    # The bridge sees every worker registered from the worker containers...
    live = get_json(stack.port, BRIDGE_STATS_PATH)["workers"]
    assert {svc: len(pids) for svc, pids in live.items()} == {
        svc: workers for svc, (workers, _threads) in stack.deployment.plan.items()
    }
    # ... and their rings, created in those containers, are in its own /dev/shm.
    listing = dpu.exec_run(["ls", "/dev/shm"]).output.decode().split()
    rings = [name for name in listing if name.endswith(".worker_sq")]
    assert len(rings) == sum(len(pids) for pids in live.values()), listing


def _assert_envoy_apps_live_in_their_sidecars_network(stack: compose.ComposeStack) -> None:
    """Each app shares its sidecar's network namespace, as a pod would (DESIGN §7)."""
    containers = stack.containers()
    sidecars = {c.labels["com.docker.compose.service"]: c for c in containers["sidecar"]}
    apps = containers["app"]
    assert len(apps) == len(sidecars) == len(stack.deployment.services)
    for app in apps:
        service = app.labels["com.docker.compose.service"].removeprefix("app-")
        sidecar = sidecars[f"sidecar-{service}"]
        assert app.attrs["HostConfig"]["NetworkMode"] == f"container:{sidecar.id}", app.name


@pytest.mark.docker
@pytest.mark.slow
@pytest.mark.parametrize("mesh", MESHES)
def test_stack_answers_from_containers(
    mesh: str, engine: docker.DockerClient, image: str, tmp_path: Path
) -> None:
    """Requests through the published port reach every service; CPU is measured per role."""
    port = free_ports(1)[0]
    # DPUmesh with its daemons on a core of their own (the optional cpusets), the others without.
    cpusets = compose.CpuSets(offload="1", host="0") if mesh == "dpumesh" else None
    if cpusets and (os.cpu_count() or 1) < 2:
        cpusets = None
    with compose.start_stack(mesh, run_dir=tmp_path, port=port, cpusets=cpusets) as stack:
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
        assert traffic["per_service"] == {svc: REQUESTS for svc in stack.deployment.services}
        for role in BUSY_ROLES[mesh]:
            assert usage.roles[role].cpu_s > 0, role
            assert usage.roles[role].rss_mean_mb > 0, role
        assert set(usage.roles) >= set(BUSY_ROLES[mesh]) | {"loadgen"}
        assert usage.roles["loadgen"].cpu_s > 0
        if mesh == "dpumesh":
            _assert_dpumesh_crosses_containers(stack)
        if mesh == "envoy":
            _assert_envoy_apps_live_in_their_sidecars_network(stack)
        for role, containers in stack.containers().items():
            for container in containers:
                wanted = ""
                if cpusets:
                    wanted = cpusets.offload if role.endswith("-daemon") else cpusets.host
                assert container.attrs["HostConfig"]["CpusetCpus"] == wanted, container.name
        assert stack.manifest.is_file()
    assert compose.project_resources(engine, project) == {
        "containers": [],
        "networks": [],
        "volumes": [],
    }
    assert (tmp_path / "app-s0.log").is_file()


@pytest.mark.docker
@pytest.mark.slow
def test_a_stack_that_never_gets_ready_leaves_nothing(
    engine: docker.DockerClient, image: str, tmp_path: Path
) -> None:
    with pytest.raises(compose.ComposeError, match="not ready"):
        compose.start_stack("dpumesh", run_dir=tmp_path, port=free_ports(1)[0], ready_timeout_s=0)
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
        compose.start_stack(
            "nomesh", run_dir=tmp_path / "run", port=free_ports(1)[0], functions_dir=functions
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
