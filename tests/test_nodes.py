"""Stacks spread over nodes (DESIGN §8): real network namespaces, real traffic between them.

Every stack on two nodes of the default workmodel (s0 and s2 on node 1, s1 on
node 2): each entry request makes one call that crosses nodes (s0 -> s1), so
each stack's cross-node counter must equal the entry requests, whichever way
it counts (DPUmesh sidecars' fallback, Envoy clusters, the apps' calls). The
requests come from the client namespace, as Locust's do. Needs root and
iproute2: fails in CI when missing (`require_external`).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import subprocess
import sys
import time

import pytest

from harness.deploy import start_stack
from harness.measure import checks
from harness.names import DEFAULT_WORKMODEL, MESHES, REPO
from harness.ports import free_ports
from harness.run import runner
from harness.run.loadgen import LocustRun, LocustSpec
from tests.conftest import require_external

pytestmark = pytest.mark.e2e

REQUESTS = 12
PREFIX = "dmb"  # harness.deploy.netns: every name starts with it

# Sends REQUESTS sequential GETs to argv[1] and prints the statuses as JSON.
CLIENT = """
import http.client, json, sys, urllib.parse
url = urllib.parse.urlsplit(sys.argv[1])
statuses = []
for i in range(int(sys.argv[2])):
    conn = http.client.HTTPConnection(url.hostname, url.port, timeout=30)
    conn.request("GET", "/api/v1", headers={"x-request-id": f"nodes-{i}"})
    resp = conn.getresponse(); resp.read(); statuses.append(resp.status); conn.close()
print(json.dumps(statuses))
"""


def _netns_ready() -> None:
    require_external(
        os.geteuid() == 0 and shutil.which("ip") and shutil.which("nsenter"),
        "root, iproute2 and nsenter (network namespaces)",
    )


def _ours() -> tuple[list[str], list[str]]:
    """Namespaces and links of this process's node networks (the netns naming scheme)."""
    names = subprocess.run(
        ["ip", "netns", "list"], capture_output=True, text=True, timeout=10, check=True
    ).stdout.split()
    links = json.loads(
        subprocess.run(
            ["ip", "-j", "link"], capture_output=True, text=True, timeout=10, check=True
        ).stdout
    )
    mine = re.compile(rf"{PREFIX}{os.getpid()}\D")  # not pid 12 claiming pid 123's
    return (
        [n for n in names if mine.match(n)],
        [link["ifname"] for link in links if mine.match(link["ifname"])],
    )


@pytest.mark.parametrize("mesh", MESHES)
def test_a_stack_on_two_nodes_counts_the_calls_that_cross(mesh, tmp_path):
    _netns_ready()
    port = free_ports(1)[0]
    with start_stack(
        mesh, DEFAULT_WORKMODEL, run_dir=tmp_path / mesh, port=port, nodes=2, scale=0.0
    ) as stack:
        manifest = json.loads(stack.manifest.read_text())
        network = manifest["deployment"]["nodes"]
        assert set(network["nodes"]) == {"node1", "node2"}
        assert stack.url == f"http://{network['nodes']['node1']['address']}:{port}"
        # The requests come from the client namespace, as Locust's do.
        argv = stack.client_argv([sys.executable, "-c", CLIENT, stack.url, str(REQUESTS)])
        done = subprocess.run(argv, capture_output=True, text=True, timeout=120, cwd=REPO)
        assert done.returncode == 0, done.stderr
        assert json.loads(done.stdout) == [200] * REQUESTS
        traffic = stack.traffic()
        assert traffic["entry_requests"] == REQUESTS
        assert traffic["per_service"] == {"s0": REQUESTS, "s1": REQUESTS, "s2": REQUESTS}
        assert traffic["cross_node"] == REQUESTS, traffic
        placed = {c["name"]: c for c in manifest["components"]}
        app_s1 = next(c for c in placed.values() if c["service"] == "s1" and c["role"] == "app")
        assert app_s1["node"] == "node2"
        # Loopback isolation: node 1's loopback does not reach node 2's app.
        s1_port = next(iter(app_s1["ports"].values()), None) if app_s1["ports"] else None
        if s1_port is not None:
            probe = stack.client_argv(
                [
                    sys.executable,
                    "-c",
                    f"import socket; socket.create_connection(('127.0.0.1', {s1_port}), timeout=2)",
                ]
            )
            assert subprocess.run(probe, capture_output=True, timeout=30).returncode != 0
    assert _ours() == ([], [])


@pytest.mark.parametrize("mesh", MESHES)
def test_a_call_back_into_the_entry_node_is_no_entry_request(mesh, tmp_path):
    """s0 (node 1) -> s1 (node 2) -> s2 (node 1): two crossings per request, and the call
    arriving back on node 1 is not counted as a client's request."""
    _netns_ready()
    doc = json.loads(DEFAULT_WORKMODEL.read_text())
    doc["s0"]["external_services"] = [{"seq_len": 1, "services": ["s1"]}]
    doc["s1"]["external_services"] = [{"seq_len": 1, "services": ["s2"]}]
    workmodel = tmp_path / "chain.json"
    workmodel.write_text(json.dumps(doc))
    with start_stack(
        mesh,
        workmodel,
        run_dir=tmp_path / "run",
        port=free_ports(1)[0],
        nodes=2,
        place=(("s1", 2), ("s2", 1)),
        scale=0.0,
    ) as stack:
        argv = stack.client_argv([sys.executable, "-c", CLIENT, stack.url, str(REQUESTS)])
        done = subprocess.run(argv, capture_output=True, text=True, timeout=120, cwd=REPO)
        assert json.loads(done.stdout) == [200] * REQUESTS, done.stderr
        traffic = stack.traffic()
        assert traffic["entry_requests"] == REQUESTS
        assert traffic["per_service"] == {"s0": REQUESTS, "s1": REQUESTS, "s2": REQUESTS}
        assert traffic["cross_node"] == 2 * REQUESTS
    assert _ours() == ([], [])


def test_a_service_on_two_nodes_serves_its_own_nodes_callers(tmp_path):
    """A replicated callee: a caller on a node with an instance calls only that one."""
    _netns_ready()
    doc = json.loads(DEFAULT_WORKMODEL.read_text())
    doc["s1"]["replicas"] = 2  # s1 on nodes 2 and 1 (its own first, then the next)
    workmodel = tmp_path / "replicated.json"
    workmodel.write_text(json.dumps(doc))
    with start_stack(
        "nomesh", workmodel, run_dir=tmp_path / "run", port=free_ports(1)[0], nodes=2, scale=0.0
    ) as stack:
        argv = stack.client_argv([sys.executable, "-c", CLIENT, stack.url, str(REQUESTS)])
        done = subprocess.run(argv, capture_output=True, text=True, timeout=120, cwd=REPO)
        assert json.loads(done.stdout) == [200] * REQUESTS
        traffic = stack.traffic()
        apps = traffic["raw"]["apps"]
        assert apps["app-s1-node1"]["requests"] == REQUESTS  # s0 (node 1) calls its neighbour
        assert apps["app-s1-node2"]["requests"] == 0
        assert traffic["cross_node"] == 0
    assert _ours() == ([], [])


def test_nodes_without_root_is_one_line(tmp_path, monkeypatch, capsys):
    """Without root the start refuses in one line, before any process or namespace."""
    import run_bench
    from harness.deploy import netns

    monkeypatch.setattr(netns.os, "geteuid", lambda: 1000)
    code = run_bench.main(
        [
            *("serve", "--mesh", "nomesh", "--nodes", "2", "--port", "0"),
            *("--placement", "shared", "--dpu-profile", "ideal", "--run-dir", str(tmp_path)),
        ]
    )
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 1
    assert len(lines) == 1 and "--nodes needs root" in lines[0], lines
    assert _ours() == ([], [])


def test_locust_runs_in_the_client_namespace(tmp_path):
    """The runner's load generator sits on a node of its own: its network namespace is the
    client's, and what it sent is what the stack counted."""
    _netns_ready()
    with start_stack(
        "dpumesh", DEFAULT_WORKMODEL, run_dir=tmp_path / "stack", port=free_ports(1)[0], nodes=2
    ) as stack:
        client = json.loads(stack.manifest.read_text())["deployment"]["nodes"]["client"]
        spec = LocustSpec(
            host=stack.url,
            users=4,
            rate=20.0,
            excluded_s=1,
            measured_s=2,
            hdr_out=tmp_path / "hist" / "nodes.hdr",
            csv_prefix=tmp_path / "locust" / "nodes",
            request_id_prefix="nodes-",
            inside=stack.client_argv,
        )
        with LocustRun(spec) as run:
            deadline = time.monotonic() + 30
            while run.process.cmdline()[:3] != [sys.executable, "-m", "locust"]:  # exec'd
                assert time.monotonic() < deadline and not run.exited()
                time.sleep(0.01)
            seen = os.stat(f"/proc/{run.process.pid}/ns/net").st_ino
            assert seen == os.stat(f"/run/netns/{client['namespace']}").st_ino
            assert run.wait(60) == 0
        m = runner.measure_level(stack, dataclasses.replace(spec, request_id_prefix="again-"))
    assert m.returncode == 0 and m.sidecar["failures"] == 0
    assert checks.counts_match(m.sidecar, m.level_traffic["entry_requests"]).ok
    assert m.level_traffic["cross_node"] == m.level_traffic["entry_requests"]  # s0 -> s1
