"""Node namespaces (`harness.deploy.netns`): the plan is pure; the network is real Linux.

The real tests mean most where a Docker engine runs (`make test` starts one):
its FORWARD policy DROP is what the switch namespace keeps out of the nodes' way.
"""

from __future__ import annotations

import http.server
import ipaddress
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time

import psutil
import pytest

from harness.deploy import netns
from tests.conftest import require_external

IFNAMSIZ = 15
FETCH = "import sys, urllib.request; print(urllib.request.urlopen(sys.argv[1], timeout=2).status)"
LISTENERS = (
    "import psutil, sys; print([c.pid for c in psutil.net_connections('tcp')"
    " if c.status == 'LISTEN' and c.laddr.port == int(sys.argv[1])])"
)


def _real() -> None:
    require_external(
        os.geteuid() == 0
        and shutil.which("ip") is not None
        and shutil.which("nsenter") is not None,
        "root, iproute2 and nsenter (network namespaces)",
    )


def _ip_json(*args: str) -> list[dict]:
    done = subprocess.run(["ip", "-j", *args], capture_output=True, text=True, timeout=10)
    return json.loads(done.stdout or "[]")


def _left(pid: int) -> list[str]:
    """Namespaces and host links named for harness `pid` (exactly that pid, not a prefix)."""
    names = [n["name"] for n in _ip_json("netns", "list")]
    links = [link["ifname"] for link in _ip_json("link")]
    return [n for n in [*names, *links] if re.match(rf"{netns.PREFIX}{pid}\D", n)]


def _fetch(wrap: list[str], url: str) -> subprocess.CompletedProcess[str]:
    """`urlopen(url)` from a fresh interpreter, in a namespace when `wrap` says so."""
    argv = [*wrap, sys.executable, "-c", FETCH, url]
    return subprocess.run(argv, capture_output=True, text=True, timeout=10)


def _wait_ok(wrap: list[str], url: str) -> subprocess.CompletedProcess[str]:
    deadline = time.monotonic() + 10
    while True:
        done = _fetch(wrap, url)
        if done.returncode == 0 or time.monotonic() > deadline:
            return done
        time.sleep(0.05)


def _server(network: netns.NodeNetwork, node: str, bind: str, port: int) -> subprocess.Popen:
    argv = [sys.executable, "-m", "http.server", "--bind", bind, str(port)]
    return subprocess.Popen(
        network.argv(node, argv), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )


def test_the_plan_skips_taken_subnets_and_names_fit_interfaces():
    taken = [ipaddress.IPv4Network("10.213.0.0/24"), ipaddress.IPv4Network("10.213.1.128/25")]
    network = netns.plan(32, owner_pid=4194304, taken=taken)  # the largest pid_max: 7 digits
    assert network.subnet == "10.213.2.0/24"
    assert network.bridge_address == "10.213.2.1"
    assert network.client.address == "10.213.2.2"
    assert network.nodes["node1"].address == "10.213.2.11"
    assert network.nodes["node32"].address == "10.213.2.42"
    assert list(network.nodes) == [f"node{k}" for k in range(1, 33)]
    assert network.host_of("client") is network.client
    assert network.host_of("node3") is network.nodes["node3"]
    interfaces = [network.uplink, *(h.veth for h in network.hosts)]
    assert max(map(len, interfaces)) <= IFNAMSIZ
    assert len(set(interfaces)) == len(interfaces)
    assert network.uplink == "dmb4194304h"
    assert network.switch == "dmb4194304-switch"
    assert network.as_dict() == {
        "subnet": "10.213.2.0/24",
        "switch": "dmb4194304-switch",
        "bridge": "br0",
        "uplink": "dmb4194304h",
        "bridge_address": "10.213.2.1",
        "nodes": {
            f"node{k}": {
                "namespace": f"dmb4194304-node{k}",
                "address": f"10.213.2.{10 + k}",
                "veth": f"dmb4194304v{k}",
            }
            for k in range(1, 33)
        },
        "client": {
            "namespace": "dmb4194304-client",
            "address": "10.213.2.2",
            "veth": "dmb4194304v0",
        },
    }


def test_the_default_route_takes_no_subnet_and_a_full_range_is_an_error():
    default = ipaddress.IPv4Network("0.0.0.0/0")
    assert netns.plan(1, owner_pid=1, taken=[default]).subnet == "10.213.0.0/24"
    wide = ipaddress.IPv4Network("10.0.0.0/8")
    with pytest.raises(netns.NetnsError, match="no free /24"):
        netns.plan(1, owner_pid=1, taken=[wide])
    for count in (0, 33):
        with pytest.raises(ValueError):
            netns.plan(count, owner_pid=1, taken=[])


def test_the_wrapper_enters_the_namespace_and_execs():
    network = netns.plan(1, owner_pid=7, taken=[])
    assert network.argv("node1", ["python", "-V"]) == [
        "nsenter",
        "--net=/run/netns/dmb7-node1",
        "--",
        "python",
        "-V",
    ]
    assert network.argv("client", ["x"])[1] == "--net=/run/netns/dmb7-client"


def test_nodes_reach_each_other_and_the_host_but_not_each_others_loopback():
    _real()
    network = netns.create(2)
    servers: list[subprocess.Popen] = []
    host = None
    try:
        (uplink,) = _ip_json("-4", "addr", "show", "dev", network.uplink)
        assert [a["local"] for a in uplink["addr_info"]] == [network.bridge_address]
        assert ipaddress.IPv4Network(network.subnet) in netns.host_networks()  # claimed
        node2 = network.nodes["node2"].address
        servers.append(_server(network, "node2", node2, 18391))
        servers.append(_server(network, "node2", "127.0.0.1", 18392))
        # The harness's view: the host namespace reaches the node through the uplink.
        assert _wait_ok([], f"http://{node2}:18391/").stdout.strip() == "200"
        # The pid started is the listener's own: the wrapper execs, it does not fork.
        listeners = subprocess.run(
            network.argv("node2", [sys.executable, "-c", LISTENERS, "18391"]),
            capture_output=True,
            text=True,
            timeout=10,
        )
        assert json.loads(listeners.stdout) == [servers[0].pid], listeners.stderr
        for who in ("node1", "client"):
            reached = _fetch(network.argv(who, []), f"http://{node2}:18391/")
            assert reached.stdout.strip() == "200", (who, reached.stderr)
        # Each node's loopback is its own: node 2 reaches its 127.0.0.1 server, node 1 cannot.
        own = _wait_ok(network.argv("node2", []), "http://127.0.0.1:18392/")
        assert own.stdout.strip() == "200", own.stderr
        assert _fetch(network.argv("node1", []), "http://127.0.0.1:18392/").returncode != 0
        # The nodes reach the harness at the bridge address.
        host = http.server.ThreadingHTTPServer(
            (network.bridge_address, 0), http.server.SimpleHTTPRequestHandler
        )
        threading.Thread(target=host.serve_forever, daemon=True).start()
        url = f"http://{network.bridge_address}:{host.server_address[1]}/"
        reached = _fetch(network.argv("node1", []), url)
        assert reached.stdout.strip() == "200", reached.stderr
        # A SIGKILLed process (a zombie until its parent waits) is no problem for `remove`.
        killed = subprocess.Popen(network.argv("node1", ["sleep", "60"]))
        killed.send_signal(signal.SIGKILL)
        servers.append(killed)
    finally:
        if host is not None:
            host.shutdown()
            host.server_close()
        problems = netns.remove(network)
        for server in servers:
            server.wait(timeout=10)  # killed by `remove` if still inside
    assert sorted(problems) == sorted(
        f"killed pid {s.pid} left in network namespace {network.nodes['node2'].namespace}"
        for s in servers[:2]
    )
    assert _left(os.getpid()) == []
    assert netns.remove(network) == []  # twice is fine


def test_a_half_made_network_is_removed_and_the_error_names_the_command():
    _real()
    planted = f"{netns.PREFIX}{os.getpid()}-node2"
    subprocess.run(["ip", "netns", "add", planted], check=True, timeout=10)
    try:
        with pytest.raises(netns.NetnsError) as failed:
            netns.create(2)
        message = str(failed.value)
        assert f"ip netns add {planted}: " in message and "File exists" in message
        assert "\n" not in message
        assert _left(os.getpid()) == []  # the switch, the uplink, the client, node 1: gone
    finally:
        subprocess.run(["ip", "netns", "del", planted], capture_output=True, timeout=10)


def test_leftovers_of_a_dead_harness_are_reaped_and_a_live_ones_kept():
    _real()
    start = 4_000_000 + os.getpid() % 100_000  # 7 digits, another one per concurrent run
    dead = next(p for p in range(start, start + 10_000) if not psutil.pid_exists(p))
    alive = f"{netns.PREFIX}{os.getpid()}-keep"
    leftover = orphan = None
    try:
        with netns._locked():  # no other harness's `create` reaps the plant first
            leftover = netns.plan(1, owner_pid=dead, taken=netns.host_networks())
            netns._build(leftover)  # what a harness SIGKILLed mid-run leaves, a component too
            orphan = subprocess.Popen(leftover.argv("node1", ["sleep", "60"]))
            subprocess.run(["ip", "netns", "add", alive], check=True, timeout=10)
            removed = netns.reap_stale()
        assert sorted(removed) == sorted(
            [leftover.switch, leftover.uplink, *(h.namespace for h in leftover.hosts)]
        )
        assert orphan.wait(timeout=10) == -signal.SIGKILL
        assert _left(dead) == []
        assert alive in [n["name"] for n in _ip_json("netns", "list")]
    finally:
        if leftover is not None:
            netns.remove(leftover)
        if orphan is not None and orphan.poll() is None:
            orphan.kill()
            orphan.wait(timeout=10)
        subprocess.run(["ip", "netns", "del", alive], capture_output=True, timeout=10)
