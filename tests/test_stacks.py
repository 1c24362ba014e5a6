"""The stacks started from a workmodel: they answer, count traffic and leave nothing behind."""

from __future__ import annotations

import http.client
import json
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.parse

import psutil
import pytest

import run_bench
from baselines.envoy.config import read_stats
from harness.deploy import RunningStack, start_stack
from harness.names import MANIFEST, MESHES, REPO
from harness.ports import free_ports, port_is_free
from harness.procs import StartError
from tests.conftest import stop_process

pytestmark = pytest.mark.e2e

SHARED_WORKMODELS = REPO.parent / "shared" / "workmodels"
TRACE = json.dumps({"s0": [{"s1": {}}, {"s2": {}}]})
# Roles that must have processes in each stack.
ROLES_OF = {
    "nomesh": {"app"},
    "envoy": {"app", "sidecar", "gateway"},
    "nodeproxy": {"app", "nodeproxy", "gateway"},
    "dpumesh": {"app", "dpu-daemon", "dpa-daemon"},
}


def request(url: str, method: str = "GET", body: str | None = None, **headers: str):
    parts = urllib.parse.urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=60)
    try:
        conn.request(method, parts.path or "/", body=body, headers=headers)
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def assert_nothing_left(manifest: dict) -> None:
    """No recorded process alive, no port bound, no shared memory of the namespace."""
    survivors = []
    deployment = manifest["deployment"]
    for entries in deployment["pids"].values():
        for entry in entries:
            try:
                proc = psutil.Process(entry["pid"])
                if proc.create_time() == entry["create_time"]:
                    survivors.append((entry["pid"], proc.status(), proc.cmdline()))
            except psutil.NoSuchProcess:
                pass
    assert survivors == []
    assert [p for p in deployment["ports"] if not port_is_free(p)] == []
    if manifest["mesh"] == "dpumesh":
        marker = f"dpumesh.{deployment['namespace']}."
        assert [n for n in os.listdir("/dev/shm") if marker in n] == []


def read_manifest(stack: RunningStack) -> dict:
    return json.loads(stack.manifest.read_text())


def envoy_concurrency(manifest: dict) -> set[str]:
    """The `--concurrency` values on the recorded command lines of a stack's Envoys."""
    return {
        p["argv"][p["argv"].index("--concurrency") + 1]
        for p in manifest["components"]
        if p["role"] in ("sidecar", "nodeproxy", "gateway")
    }


@pytest.mark.parametrize("mesh", MESHES)
def test_default_workmodel_answers_and_counts(mesh, tmp_path):
    (port,) = free_ports(1)
    with start_stack(mesh, port=port, run_dir=tmp_path) as stack:
        manifest = read_manifest(stack)
        assert stack.url == f"http://127.0.0.1:{port}"
        assert request(stack.url + "/")[0] == 200
        status, _ = request(stack.url + "/", "POST", TRACE, **{"content-type": "application/json"})
        assert status == 200

        traffic = stack.traffic()
        assert traffic["entry_requests"] == 2
        assert traffic["per_service"] == {"s0": 2, "s1": 2, "s2": 2}
        roles = stack.roles()
        assert {role for role, procs in roles.items() if procs} == ROLES_OF[mesh]
        if mesh == "envoy":
            listeners = traffic["raw"]["listeners"]
            # Nothing but our two requests left s0 through its sidecar (readiness
            # probes only go in), and the apps agree with their sidecars.
            assert listeners["outbound_s0"]["downstream_rq_total"] == 4
            assert listeners["outbound_s0"]["downstream_rq_2xx"] == 4
            assert listeners["inbound_s1"]["downstream_rq_total"] == 2
            assert listeners["inbound_s2"]["downstream_rq_total"] == 2
            assert listeners["outbound_s1"]["downstream_rq_total"] == 0
            assert {s: c["requests"] for s, c in traffic["raw"]["apps"].items()} == {
                "app-s0": 2,
                "app-s1": 2,
                "app-s2": 2,
            }
            assert set(stack.configs) == {"gateway", "sidecar-s0", "sidecar-s1", "sidecar-s2"}
            for path in stack.configs.values():
                assert path.parent == tmp_path / "configs"
                assert json.loads(path.read_text())["static_resources"]["listeners"]
        elif mesh == "nodeproxy":
            totals = {p: c["downstream_rq_total"] for p, c in traffic["raw"]["listeners"].items()}
            # s0's calls left through the node proxy's outbound listeners for s1 and s2, and
            # everything the gateway took (our requests and its readiness probe) entered
            # through the node proxy's inbound listener for s0: once through each way.
            assert totals == {
                "gateway": totals["inbound_s0"],
                "inbound_s0": totals["gateway"],
                "inbound_s1": 0,
                "inbound_s2": 0,
                "outbound_to_s0": 0,
                "outbound_to_s1": 2,
                "outbound_to_s2": 2,
            }
            assert {s: c["requests"] for s, c in traffic["raw"]["apps"].items()} == {
                "app-s0": 2,
                "app-s1": 2,
                "app-s2": 2,
            }
            assert set(stack.configs) == {"gateway", "nodeproxy-node1"}
        else:
            assert stack.configs == {}
    assert_nothing_left(manifest)
    assert (tmp_path / "app-s0.log").exists()


@pytest.mark.slow
@pytest.mark.parametrize("mesh", MESHES)
@pytest.mark.parametrize("name", ["workmodel-serial-10services.json", "workmodelA.json"])
def test_real_workmodels_start_quickly(mesh, name, tmp_path):
    (port,) = free_ports(1)
    began = time.monotonic()
    with start_stack(
        mesh, SHARED_WORKMODELS / name, port=port, run_dir=tmp_path, scale=0.01
    ) as stack:
        manifest = read_manifest(stack)
        status, _ = request(stack.url + "/")
        elapsed = time.monotonic() - began
        print(f"{mesh} {name}: started and answered in {elapsed:.1f} s")
        assert status == 200
        # Every call group has seq_len >= its size and no probabilities: each service once.
        assert stack.traffic()["per_service"] == dict.fromkeys(manifest["plan"], 1)
        assert elapsed < 60
    assert sum(p["workers"] for p in manifest["plan"].values()) <= 24
    assert_nothing_left(manifest)


def read_lines(stream) -> queue.Queue:
    lines: queue.Queue = queue.Queue()

    def pump() -> None:
        for line in stream:
            lines.put(line)
        lines.put(None)

    threading.Thread(target=pump, daemon=True).start()
    return lines


@pytest.mark.slow
@pytest.mark.parametrize("mesh", MESHES)
def test_serve_until_sigint(mesh, tmp_path):
    (port,) = free_ports(1)
    argv = [sys.executable, "run_bench.py", "serve", "--mesh", mesh, "--port", str(port)]
    proc = subprocess.Popen(
        [*argv, "--envoy-concurrency", "1", "--run-dir", str(tmp_path)],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        lines = read_lines(proc.stdout)
        deadline = time.monotonic() + 60
        output = []
        while not any("ready" in line for line in output):
            line = lines.get(timeout=max(0.1, deadline - time.monotonic()))
            assert line is not None, "".join(output)
            output.append(line)
        url = f"http://127.0.0.1:{port}"
        assert url in output[-1]
        assert request(url + "/")[0] == 200
        manifest = json.loads((tmp_path / MANIFEST).read_text())
        if mesh == "envoy":
            assert envoy_concurrency(manifest) == {"1"}
            assert sorted(p.name for p in (tmp_path / "configs").iterdir()) == [
                "gateway.json",
                "sidecar-s0.json",
                "sidecar-s1.json",
                "sidecar-s2.json",
            ]
        if mesh == "nodeproxy":
            assert envoy_concurrency(manifest) == {"1"}
            configs = sorted(p.name for p in (tmp_path / "configs").iterdir())
            assert configs == ["gateway.json", "nodeproxy-node1.json"]
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=60) == 0
    finally:
        stop_process(proc, timeout_s=60)  # SIGTERM first: SIGKILL would orphan the stack
    assert_nothing_left(manifest)


@pytest.mark.slow
def test_serve_interrupted_while_starting(tmp_path):
    (port,) = free_ports(1)
    workmodel = str(SHARED_WORKMODELS / "workmodelA.json")
    argv = [sys.executable, "run_bench.py", "serve", "--mesh", "envoy", "--port", str(port)]
    output = tmp_path / "serve.out"
    with output.open("wb") as sink:
        proc = subprocess.Popen(
            [*argv, "--workmodel", workmodel, "--scale", "0.01", "--run-dir", str(tmp_path)],
            cwd=REPO,
            stdout=sink,
            stderr=subprocess.STDOUT,
        )
    try:
        # Interrupt once most processes run: mid-start (a loaded machine may take a while).
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, output.read_text()
            started = psutil.Process(proc.pid).children(recursive=True)
            if len(started) > 20:
                break
            assert time.monotonic() < deadline, output.read_text()
            time.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=60) == 130
    finally:
        if proc.poll() is None:
            proc.terminate()
            proc.wait(timeout=60)
    assert psutil.wait_procs(started, timeout=5)[1] == []
    # Also none started after we looked (every Envoy's command line names the run dir).
    assert [
        p.pid
        for p in psutil.process_iter(["cmdline"])
        if str(tmp_path) in " ".join(p.info["cmdline"] or [])
    ] == []
    assert port_is_free(port)
    assert not (tmp_path / MANIFEST).exists()  # it never became ready


def test_failed_start_reports_the_log_and_cleans_up(tmp_path):
    workmodel = json.loads((REPO / "workmodels" / "default.json").read_text())
    workmodel["s2"]["internal_service"] = {"no_such_function": {}}
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(workmodel))
    (port,) = free_ports(1)
    before = {p.pid for p in psutil.Process().children(recursive=True)}
    with pytest.raises(StartError) as failure:
        start_stack("nomesh", path, port=port, run_dir=tmp_path / "run")
    assert "app-s2" in str(failure.value) and "no_such_function" in str(failure.value)
    assert {p.pid for p in psutil.Process().children(recursive=True)} <= before
    assert port_is_free(port)


def test_busy_port_is_refused(tmp_path):
    (port,) = free_ports(1)
    with (
        socket.create_server(("127.0.0.1", port)),
        pytest.raises(StartError, match=f"port {port} is already in use"),
    ):
        start_stack("nomesh", port=port, run_dir=tmp_path)


def test_envoy_stack_reuses_connections(tmp_path):
    """Keep-alive end to end: 30 requests, a handful of connections on every hop.

    Hops: each app to its sidecar's outbound listener (`http.outbound_<svc>.downstream_*`)
    and each Envoy to its upstreams (`cluster.<name>.upstream_*`: the gateway and
    sidecar-s0 to the callees' inbound listeners, every sidecar to its app).
    """
    (port,) = free_ports(1)
    with start_stack("envoy", port=port, run_dir=tmp_path, envoy_concurrency=1) as stack:
        for _ in range(30):
            assert request(stack.url + "/")[0] == 200
        pattern = r"^(cluster\.[^.]+\.upstream|http\.outbound_[^.]+\.downstream)_(cx|rq)_total$"
        stats = {
            name: read_stats(_admin_port(path), pattern) for name, path in stack.configs.items()
        }
        manifest = read_manifest(stack)
    assert envoy_concurrency(manifest) == {"1"}
    hops = {}
    for name, counters in stats.items():
        for stat, requests in counters.items():
            if stat.endswith("_rq_total") and requests:
                connections = counters[stat.replace("_rq_total", "_cx_total")]
                hops[f"{name} {stat.removesuffix('_rq_total')}"] = (requests, connections)
    assert sorted(hops) == [
        "gateway cluster.to_s0.upstream",
        "sidecar-s0 cluster.local_app.upstream",
        "sidecar-s0 cluster.to_s1.upstream",
        "sidecar-s0 cluster.to_s2.upstream",
        "sidecar-s0 http.outbound_s0.downstream",
        "sidecar-s1 cluster.local_app.upstream",
        "sidecar-s2 cluster.local_app.upstream",
    ]
    for hop, (requests, connections) in hops.items():
        assert requests >= 30 and 1 <= connections <= requests / 10, (hop, requests, connections)


def _admin_port(config_path) -> int:
    return json.loads(config_path.read_text())["admin"]["address"]["socket_address"]["port_value"]


@pytest.mark.parametrize("command", [[], ["run"], ["serve"], ["report"]])
def test_help_exits_0(command):
    done = subprocess.run(
        [sys.executable, "run_bench.py", *command, "--help"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("usage: run_bench.py")


def test_bad_service_id_is_a_one_line_error(tmp_path, capsys):
    workmodel = json.loads((REPO / "workmodels" / "default.json").read_text())
    workmodel["s.1"] = workmodel.pop("s1")
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(workmodel))
    (port,) = free_ports(1)
    argv = ["serve", "--mesh", "envoy", "--workmodel", str(path), "--port", str(port)]
    assert run_bench.main([*argv, "--run-dir", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and 'service id "s.1"' in err
    assert err.count("\n") == 1
