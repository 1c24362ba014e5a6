"""Nodes on one machine (DESIGN §8): Linux network namespaces on a bridge of their own.

`create(N)` makes one network namespace per node and one for the load
generator (the client), each with loopback up and one IPv4 address on its
``eth0``, a veth whose peer is a port of one Linux bridge. The bridge lives in
a namespace of its own (the switch); the harness, in the host namespace,
joins it through one more veth pair whose host end (the uplink) holds the
subnet's first address, so it reaches every node and every node reaches it.
Components of one node talk over that namespace's loopback, which no other
node shares; nodes talk through the switch. `remove` undoes all of it (and
kills anything still inside); the local deployer calls it at teardown, on a
failed start and on Ctrl-C. A harness killed before it could clean up leaves
names carrying its pid: the next `create` removes those whose pid is not
alive (`reap_stale`; pids of this pid namespace, so a recycled pid only
defers the reaping until that process ends).

Why a switch namespace: where br_netfilter is loaded, bridged IPv4 frames
pass the iptables FORWARD chain of the bridge's namespace, which a Docker
engine sets to DROP. The per-bridge ``nf_call_iptables 0`` option does not
help: the kernel calls iptables when the option *or* the namespace's
``net.bridge.bridge-nf-call-iptables`` sysctl is on, and Docker needs that
sysctl. The switch namespace's own tables are empty, so none of the host's
firewall applies to node-to-node traffic, and none of it is changed.

Names and addresses are the harness's own, recorded in `stack.json`
(``<pid>`` is the harness's pid, at most 7 digits):

* namespaces ``dmb<pid>-<host>`` (``dmb4711-node1``, ``dmb4711-client``) and
  ``dmb<pid>-switch``;
* in the host namespace one interface only, the uplink ``dmb<pid>h`` (at most
  11 characters; IFNAMSIZ allows 15): every other veth is made directly in
  its namespace, so a failed or killed harness leaves nothing else behind;
* in the switch: the bridge ``br0``, its port ``host`` (the uplink's peer) and
  one port per namespace, ``dmb<pid>v<k>`` (`Host.veth`; k = 0 for the client,
  K for node K: at most 13 characters); in a node, its end is ``eth0``;
* one /24 of 10.213.0.0/16 that overlaps no route or address of this machine
  (`host_networks`), chosen and claimed (by the uplink's address) under a
  lock, so two harnesses never take the same: uplink .1, client .2, node K
  .(10 + K).

One network per harness process at a time (the names are the pid's). Needs
root (`require_root`: one line otherwise).
"""

from __future__ import annotations

import contextlib
import fcntl
import ipaddress
import json
import os
import re
import shutil
import signal
import subprocess
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil

from harness.procs import StartError, signals_deferred
from harness.stacks.topology import MAX_NODES, node_names

PREFIX = "dmb"
RANGE = ipaddress.IPv4Network("10.213.0.0/16")
CLIENT = "client"
LOCK_PATH = Path("/run/dpumesh-bench-netns.lock")
NETNS_DIR = "/run/netns"  # where `ip netns add` keeps a namespace's handle
BRIDGE = "br0"  # inside the switch namespace
UPLINK_PORT = "host"  # the uplink's peer, a port of the bridge
NODE_DEVICE = "eth0"  # a node's (or the client's) end of its veth pair
_PEER = ("type", "veth", "peer", "name")  # `ip link add A <_PEER> B netns N`: both ends at once
_OURS = re.compile(rf"{PREFIX}(\d+)(?:-[a-z0-9]+|h)")  # a namespace or the uplink
_IP_TIMEOUT_S = 10.0
_KILL_TIMEOUT_S = 5.0


class NetnsError(StartError):
    """Nodes cannot be made; `str()` is one line a user can act on."""


@dataclass(frozen=True)
class Host:
    """One namespace on the bridge: a node, or the client."""

    name: str
    namespace: str
    address: str
    veth: str  # its port on the bridge, in the switch namespace


@dataclass(frozen=True)
class NodeNetwork:
    """The namespaces of one stack start, their addresses and the switch joining them."""

    subnet: str
    switch: str  # the namespace holding the bridge
    uplink: str  # the host namespace's veth into the switch
    bridge_address: str  # the uplink's address: the harness as the nodes reach it
    nodes: Mapping[str, Host]
    client: Host

    @property
    def hosts(self) -> list[Host]:
        """The client, then every node."""
        return [self.client, *self.nodes.values()]

    def host_of(self, name: str) -> Host:
        """The node `name`, or the client."""
        return self.client if name == CLIENT else self.nodes[name]

    def argv(self, name: str, argv: Sequence[str]) -> list[str]:
        """`argv` run inside the network namespace of node (or client) `name`.

        `nsenter --net` enters it and execs the program (no fork): the pid a caller
        starts is the program's own, so signals and pid reads reach it. Unlike `ip
        netns exec` it leaves the mount namespace alone (that one remounts /sys,
        hiding the cgroup a placed process joins).
        """
        path = f"{NETNS_DIR}/{self.host_of(name).namespace}"
        return ["nsenter", f"--net={path}", "--", *map(str, argv)]

    def as_dict(self) -> dict[str, Any]:
        """For stack.json: the subnet, the switch and every namespace with its address."""

        def one(host: Host) -> dict[str, str]:
            return {"namespace": host.namespace, "address": host.address, "veth": host.veth}

        return {
            "subnet": self.subnet,
            "switch": self.switch,
            "bridge": BRIDGE,
            "uplink": self.uplink,
            "bridge_address": self.bridge_address,
            "nodes": {name: one(host) for name, host in self.nodes.items()},
            "client": one(self.client),
        }


def plan(count: int, *, owner_pid: int, taken: Iterable[ipaddress.IPv4Network]) -> NodeNetwork:
    """The names and addresses of `count` nodes for the harness of `owner_pid` (pure)."""
    if not 1 <= count <= MAX_NODES:
        raise ValueError(f"nodes must be between 1 and {MAX_NODES}, not {count}")
    taken = [t for t in taken if t.prefixlen > 0]  # a default route takes nothing
    subnet = next((s for s in RANGE.subnets(new_prefix=24) if not _overlaps(s, taken)), None)
    if subnet is None:
        raise NetnsError(
            f"no free /24 in {RANGE} for the nodes: every one overlaps a route or address "
            "of this machine (ip route show table all)"
        )
    base = f"{PREFIX}{owner_pid}"

    def host(name: str, index: int, last_octet: int) -> Host:
        return Host(name, f"{base}-{name}", str(subnet[last_octet]), f"{base}v{index}")

    return NodeNetwork(
        subnet=str(subnet),
        switch=f"{base}-switch",
        uplink=f"{base}h",
        bridge_address=str(subnet[1]),
        nodes={name: host(name, k, 10 + k) for k, name in enumerate(node_names(count), 1)},
        client=host(CLIENT, 0, 2),
    )


def _overlaps(subnet: ipaddress.IPv4Network, taken: list[ipaddress.IPv4Network]) -> bool:
    return any(subnet.overlaps(t) for t in taken)


def host_networks() -> list[ipaddress.IPv4Network]:
    """Every IPv4 network this machine routes (any table) or has an address in."""
    networks = []
    for entry in _ip_json("-4", "route", "show", "table", "all"):
        dst = entry.get("dst", "")
        if dst and dst != "default":
            with contextlib.suppress(ValueError):
                networks.append(ipaddress.IPv4Network(dst, strict=False))
    for link in _ip_json("-4", "addr"):
        for addr in link.get("addr_info", []):
            with contextlib.suppress(ValueError, KeyError):
                networks.append(
                    ipaddress.IPv4Network(f"{addr['local']}/{addr['prefixlen']}", strict=False)
                )
    return networks


def require_root() -> None:
    """NetnsError unless this process can make network namespaces."""
    if os.geteuid() != 0:
        raise NetnsError(
            "--nodes needs root (it makes network namespaces, veth pairs and a bridge): run "
            "as root, or without --nodes"
        )
    if shutil.which("ip") is None:
        raise NetnsError("--nodes needs iproute2's `ip` (install iproute2)")
    if shutil.which("nsenter") is None:
        raise NetnsError("--nodes needs util-linux's `nsenter` (install util-linux)")


def create(count: int) -> NodeNetwork:
    """Make the namespaces, veths and switch of `count` nodes and a client (module docstring).

    On any failure (Ctrl-C included) whatever was made is removed before the
    error propagates: a NetnsError names the `ip` command that failed.
    """
    require_root()
    with _locked():  # stale subnets freed, then ours chosen and claimed, one harness at a time
        reap_stale()
        network = plan(count, owner_pid=os.getpid(), taken=host_networks())
        try:
            _build(network)
        except BaseException:
            with signals_deferred():
                remove(network)
            raise
    return network


def _build(network: NodeNetwork) -> None:
    switch = network.switch
    _ip("netns", "add", switch)
    _ip("-n", switch, "link", "add", BRIDGE, "type", "bridge")
    _ip("-n", switch, "link", "set", BRIDGE, "up")
    _ip("link", "add", network.uplink, *_PEER, UPLINK_PORT, "netns", switch)
    _ip("-n", switch, "link", "set", UPLINK_PORT, "master", BRIDGE, "up")
    _ip("addr", "add", f"{network.bridge_address}/24", "dev", network.uplink)
    _ip("link", "set", network.uplink, "up")
    for host in network.hosts:
        inside = ("-n", host.namespace)
        _ip("netns", "add", host.namespace)
        _ip(*inside, "link", "add", NODE_DEVICE, *_PEER, host.veth, "netns", switch)
        _ip("-n", switch, "link", "set", host.veth, "master", BRIDGE, "up")
        _ip(*inside, "addr", "add", f"{host.address}/24", "dev", NODE_DEVICE)
        _ip(*inside, "link", "set", NODE_DEVICE, "up")
        _ip(*inside, "link", "set", "lo", "up")


def remove(network: NodeNetwork) -> list[str]:
    """Kill what still runs inside, delete the namespaces and the uplink; the problems.

    Idempotent: what is already gone is no problem. Deleting a namespace
    deletes its veths and their peers.
    """
    problems = []
    for namespace in [*(h.namespace for h in network.hosts), network.switch]:
        problems += _empty(namespace)
        problems += _delete("netns", "del", namespace)
    problems += _delete("link", "del", network.uplink)  # its switch may outlive a stuck process
    return problems


def reap_stale() -> list[str]:
    """Remove the namespaces and uplinks of harnesses whose pid is not alive; their names."""
    names = [
        *(("netns", entry.get("name", "")) for entry in _ip_json("netns", "list")),
        *(("link", link.get("ifname", "")) for link in _ip_json("link")),
    ]
    removed = []
    for kind, name in names:
        match = _OURS.fullmatch(name)
        if match is None or psutil.pid_exists(int(match.group(1))):
            continue
        if kind == "netns":
            _empty(name)
        if not _delete(kind, "del", name):
            removed.append(name)
    return removed


def _empty(namespace: str) -> list[str]:
    """SIGKILL every process still in `namespace` (one its supervisor missed); wait for it."""
    problems: list[str] = []
    killed: set[int] = set()
    deadline = time.monotonic() + _KILL_TIMEOUT_S
    while True:
        listed = _run(["ip", "netns", "pids", namespace])  # fails once the namespace is gone
        pids = {int(p) for p in listed.stdout.split()} if listed.returncode == 0 else set()
        if not pids:
            return problems
        if time.monotonic() > deadline:
            return [*problems, f"pids {sorted(pids)} still in network namespace {namespace}"]
        for pid in pids - killed:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
                problems.append(f"killed pid {pid} left in network namespace {namespace}")
        killed |= pids
        time.sleep(0.02)


def _delete(*args: str) -> list[str]:
    """`ip <args>`; "already gone" is no problem."""
    done = _run(["ip", *args])
    error = _one_line(done.stderr)
    if done.returncode == 0 or "No such file" in error or "Cannot find device" in error:
        return []
    return [f"ip {' '.join(args)}: {error}"]


def _ip(*args: str) -> None:
    done = _run(["ip", *args])
    if done.returncode != 0:
        raise NetnsError(f"cannot make the nodes: ip {' '.join(args)}: {_one_line(done.stderr)}")


def _ip_json(*args: str) -> list[dict[str, Any]]:
    done = _run(["ip", "-j", *args])
    if done.returncode != 0:
        command = " ".join(["ip", "-j", *args])
        raise NetnsError(f"cannot read the network: {command}: {_one_line(done.stderr)}")
    return json.loads(done.stdout) if done.stdout.strip() else []


def _run(argv: list[str]) -> subprocess.CompletedProcess[str]:
    """`argv`, bounded; a timeout is a failed command, like any other."""
    try:
        return subprocess.run(argv, capture_output=True, text=True, timeout=_IP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        return subprocess.CompletedProcess(argv, 124, "", f"timed out after {_IP_TIMEOUT_S:g} s")


def _one_line(text: str) -> str:
    return "; ".join(line.strip() for line in text.splitlines() if line.strip()) or "failed"


@contextlib.contextmanager
def _locked() -> Iterator[None]:
    """One harness at a time picks a subnet and claims it with its uplink's address."""
    with open(LOCK_PATH, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
