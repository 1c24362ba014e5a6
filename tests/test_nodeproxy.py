"""The `nodeproxy` stack (one Envoy per node, ambient-like), and mTLS in both Envoy stacks.

Real processes: `run_bench.py serve`, real Envoys of the pinned wheel, the μBench
apps, real TLS with certificates of a fresh mesh CA. Every count is read from the
Envoys' admin stats and the apps' own counters.
"""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import ssl
import stat
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from baselines.envoy import config as envoy
from harness.deploy import files, start_stack
from harness.measure.accounting import get_json
from harness.names import DEFAULT_WORKMODEL, ENVOY_MESHES, LOCAL_NODE, MANIFEST, MESHES, REPO
from harness.ports import free_ports
from harness.stacks import describe
from harness.stacks.envoy import TLS_CA, TLS_CERT, TLS_KEY, TLS_MOUNTS
from harness.stacks.model import Rendered, Settings, render
from mubench.http_app import STATS_PATH as APP_STATS_PATH
from tests.conftest import require_external
from tests.test_stacks import assert_nothing_left, read_lines

SHARED_WORKMODELS = sorted((REPO.parent / "shared" / "workmodels").glob("*.json"))
# The default workmodel quickly; the shared ones (up to 20 services) in the slow group.
WORKMODELS = [
    DEFAULT_WORKMODEL,
    *(pytest.param(w, marks=pytest.mark.slow, id=w.stem) for w in SHARED_WORKMODELS),
]
REQUESTS = 12
NODE_PROXY = envoy.node_proxy_name(LOCAL_NODE)


def _envoy_available() -> bool:
    try:
        envoy.envoy_binary()
    except FileNotFoundError:
        return False
    return True


def _get(port: int, path: str = "/", **headers: str) -> int:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        conn.request("GET", path, headers=headers)
        resp = conn.getresponse()
        resp.read()
        return resp.status
    finally:
        conn.close()


def _ports(manifest: dict[str, Any], role: str, port: str) -> dict[str, int]:
    """`port` of every component of `role` in a stack.json, by component name."""
    return {c["name"]: c["ports"][port] for c in manifest["components"] if c["role"] == role}


def _counts(manifest: dict[str, Any]) -> dict[str, Any]:
    """Every Envoy listener's counters and every app's own, read now."""
    admins = [*_ports(manifest, "nodeproxy", "admin").values()]
    admins += _ports(manifest, "gateway", "admin").values()
    apps = {
        c["service"]: {
            k: v
            for k, v in get_json(("127.0.0.1", c["ports"]["http"]), APP_STATS_PATH).items()
            if k not in ("service", "calls")
        }
        for c in manifest["components"]
        if c["role"] == "app"
    }
    return {"listeners": envoy.mesh_listeners(map(envoy.counted_stats, admins)), "apps": apps}


def _since(after: dict[str, Any], before: dict[str, Any]) -> dict[str, Any]:
    return {
        group: {
            name: {k: v - before[group][name][k] for k, v in counters.items()}
            for name, counters in after[group].items()
        }
        for group in after
    }


# --- the description ---------------------------------------------------------------------------


def test_one_node_proxy_per_node_plus_the_gateway_and_apps_call_through_it():
    desc = describe("nodeproxy", Settings(workmodel=DEFAULT_WORKMODEL))
    roles = {c.name: c.role for c in desc.components}
    assert [n for n, r in roles.items() if r == "nodeproxy"] == [NODE_PROXY]  # one node
    assert [n for n, r in roles.items() if r == "gateway"] == ["gateway"]
    assert sorted(n for n, r in roles.items() if r == "app") == ["app-s0", "app-s1", "app-s2"]
    assert desc.component(NODE_PROXY).cpu_set == "host"
    # An app calls every service through the node proxy's listener for it, nothing else.
    for app in (c for c in desc.components if c.role == "app"):
        upstreams = [a for i, a in enumerate(app.args) if i and app.args[i - 1] == "--upstream"]
        assert upstreams == [
            f"{s}=http://{{host:{NODE_PROXY}}}:{{port:{NODE_PROXY}:out-{i}}}"
            for i, s in enumerate(desc.services)
        ]
        assert "--egress-proxy" not in app.args
    # The same cell and Envoy tuning as the envoy stack.
    sidecars = describe("envoy", Settings(workmodel=DEFAULT_WORKMODEL))
    assert desc.plan == sidecars.plan
    assert desc.component(NODE_PROXY).args == sidecars.component("sidecar-s0").args
    for svc in desc.services:
        mine, theirs = desc.component(f"app-{svc}").args, sidecars.component(f"app-{svc}").args
        assert mine[: mine.index("--upstream")] == theirs[: theirs.index("--egress-proxy")]


def test_mtls_files_are_secrets_of_each_envoy_and_only_with_mtls():
    plain = describe("nodeproxy", Settings(workmodel=DEFAULT_WORKMODEL))
    assert [f.name for c in plain.components for f in c.files if f.secret] == []
    for mesh in ENVOY_MESHES:
        desc = describe(mesh, Settings(workmodel=DEFAULT_WORKMODEL, mtls=True))
        assert desc.warnings == plain.warnings
        for c in desc.components:
            secret = {f.name: f.mount for f in c.files if f.secret}
            assert secret == (TLS_MOUNTS if c.program == "envoy" else {}), c.name
    for mesh in sorted(set(MESHES) - set(ENVOY_MESHES)):
        desc = describe(mesh, Settings(workmodel=DEFAULT_WORKMODEL, mtls=True))
        assert desc.warnings[-1].startswith(f"mtls applies to envoy and nodeproxy only: {mesh} ")
        assert not any(f.secret for c in desc.components for f in c.files)


class _Loopback:
    """A resolver of fixed loopback ports (for rendering files only)."""

    def __init__(self, out: Path) -> None:
        self.out = out
        self.numbers: dict[tuple[str, str], int] = {}

    def bind(self, component):
        return "127.0.0.1"

    def port(self, component, target, port):
        return self.numbers.setdefault((target, port), 21000 + len(self.numbers))

    def host(self, component, target):
        return "127.0.0.1"

    def file(self, component, name):
        return str(files.generated_path(self.out, component, name))

    def ipc(self, component):
        return "x"

    def node(self, component):
        return LOCAL_NODE


def test_secrets_are_written_for_their_reader_only_and_never_published(tmp_path):
    require_external(_envoy_available(), "Envoy")  # the bootstraps are checked by Envoy
    desc = describe("nodeproxy", Settings(workmodel=DEFAULT_WORKMODEL, mtls=True))
    resolver = _Loopback(tmp_path)
    rendered: list[Rendered] = [render(c, resolver) for c in desc.components]
    configs = files.write_generated(rendered, tmp_path)
    assert set(configs) == {NODE_PROXY, "gateway"}  # the bootstraps, published
    secrets = files.secrets(rendered, tmp_path)
    assert sorted(str(p.relative_to(tmp_path)) for p in secrets) == sorted(
        f"secrets/{name}/{Path(TLS_MOUNTS[f]).name}"
        for name in (NODE_PROXY, "gateway")
        for f in (TLS_CA, TLS_CERT, TLS_KEY)
    )
    assert {stat.S_IMODE(p.stat().st_mode) for p in secrets} == {files.SECRET_MODE}
    bootstrap = json.loads(configs[NODE_PROXY].read_text())
    assert str(tmp_path / "secrets" / NODE_PROXY / "key.pem") in json.dumps(bootstrap)
    files.remove_secrets(tmp_path)
    assert not (tmp_path / "secrets").exists() and configs[NODE_PROXY].exists()


# --- serve, counters, parity --------------------------------------------------------------------


@pytest.mark.e2e
@pytest.mark.parametrize("workmodel", WORKMODELS, ids=lambda p: getattr(p, "stem", p))
def test_serve_answers_every_request_and_every_call_crosses_the_node_proxy(workmodel, tmp_path):
    """`run_bench.py serve --mesh nodeproxy`: all 200, and the node proxy's listeners counted
    exactly what the apps counted (every request into an app came through it) and every
    call an app made; one node proxy on the one node, plus the gateway."""
    require_external(_envoy_available(), "Envoy")
    (port,) = free_ports(1)
    argv = [sys.executable, "run_bench.py", "serve", "--mesh", "nodeproxy", "--port", str(port)]
    argv += ["--workmodel", str(workmodel), "--scale", "0.01", "--envoy-concurrency", "1"]
    proc = subprocess.Popen(
        [*argv, "--run-dir", str(tmp_path)],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        lines, output = read_lines(proc.stdout), []
        deadline = time.monotonic() + 120
        while not any("ready" in line for line in output):
            line = lines.get(timeout=max(0.1, deadline - time.monotonic()))
            assert line is not None, "".join(output)
            output.append(line)
        manifest = json.loads((tmp_path / MANIFEST).read_text())
        roles = [c["role"] for c in manifest["components"]]
        assert roles.count("nodeproxy") == 1 and roles.count("gateway") == 1
        assert set(roles) == {"app", "nodeproxy", "gateway"}
        assert list(_ports(manifest, "nodeproxy", "admin")) == [NODE_PROXY]
        before = _counts(manifest)
        statuses = [_get(port, "/", **{"x-request-id": f"np-{i}"}) for i in range(REQUESTS)]
        delta = _since(_counts(manifest), before)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:  # SIGKILL would orphan the stack: let serve tear it down
            proc.terminate()
            proc.wait(timeout=60)
    assert statuses == [200] * REQUESTS
    listeners, apps = delta["listeners"], delta["apps"]
    entry = manifest["entry"]
    assert listeners["gateway"]["downstream_rq_total"] == REQUESTS
    for svc, counted in apps.items():
        into = listeners[f"inbound_{svc}"]["downstream_rq_total"]
        calls = listeners[f"outbound_to_{svc}"]["downstream_rq_total"]
        assert into + calls == counted["requests"], svc  # nothing reached an app around it
        assert into == (REQUESTS if svc == entry else 0), svc  # only the gateway calls in
        assert counted["errors"] == 0, svc
    made = sum(c["downstream_calls"] for c in apps.values())
    assert sum(listeners[f"outbound_to_{s}"]["downstream_rq_total"] for s in apps) == made
    assert all(c["downstream_rq_5xx"] == 0 for c in listeners.values())
    assert_nothing_left(manifest)


@pytest.mark.e2e
@pytest.mark.parametrize("workmodel", WORKMODELS, ids=lambda p: getattr(p, "stem", p))
def test_same_call_tree_as_nomesh_for_the_same_request_ids(workmodel, tmp_path):
    require_external(_envoy_available(), "Envoy")
    per_service = {}
    for mesh in ("nomesh", "nodeproxy"):
        (port,) = free_ports(1)
        with start_stack(
            mesh, workmodel, port=port, run_dir=tmp_path / mesh, scale=0.01, envoy_concurrency=1
        ) as stack:
            statuses = [_get(port, "/", **{"x-request-id": f"tree-{i}"}) for i in range(REQUESTS)]
            traffic = stack.traffic()
        assert statuses == [200] * REQUESTS, mesh
        assert traffic["entry_requests"] >= REQUESTS, mesh
        per_service[mesh] = traffic["per_service"]
    assert per_service["nodeproxy"] == per_service["nomesh"]
    assert sum(per_service["nomesh"].values()) > REQUESTS  # the services called each other


# --- mTLS --------------------------------------------------------------------------------------


def _callee_inbound(manifest: dict[str, Any], mesh: str) -> tuple[int, int]:
    """The mTLS port that takes calls into s1 from other Envoys, and its Envoy's admin port."""
    by_name = {c["name"]: c for c in manifest["components"]}
    proxy = by_name["sidecar-s1" if mesh == "envoy" else NODE_PROXY]
    return proxy["ports"]["inbound" if mesh == "envoy" else "in-1"], proxy["ports"]["admin"]


def _no_http_answer(port: int, context: ssl.SSLContext | None = None) -> bytes:
    """Send a request for s1 to `port` (over TLS with `context`), return whatever came back."""
    request = b"GET /api/v1 HTTP/1.1\r\nHost: s1\r\n\r\n"
    reply = b""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        try:
            sock = context.wrap_socket(raw) if context else raw
            sock.sendall(request)
            while chunk := sock.recv(4096):
                reply += chunk
        except (ssl.SSLError, ConnectionError):
            pass  # refused: the handshake (or the alert after it) ends the connection
    return reply


@pytest.mark.e2e
@pytest.mark.parametrize("mesh", ENVOY_MESHES)
def test_mtls_between_proxies_and_a_plaintext_client_is_refused(mesh, tmp_path):
    require_external(_envoy_available(), "Envoy")
    (port,) = free_ports(1)
    with start_stack(mesh, port=port, run_dir=tmp_path, mtls=True, envoy_concurrency=1) as stack:
        manifest = json.loads(stack.manifest.read_text())
        assert manifest["settings"]["mtls"] is True
        assert [_get(port, "/s1/api/v1"), *(_get(port) for _ in range(5))] == [200] * 6
        admins = {
            c["name"]: c["ports"]["admin"] for c in manifest["components"] if "admin" in c["ports"]
        }
        shook = {
            name: {k for k, v in envoy.read_stats(p, r"\.ssl\.handshake$").items() if v}
            for name, p in admins.items()
        }
        # A client bypassing the app's proxy: plaintext, then TLS without a client certificate.
        inbound, admin = _callee_inbound(manifest, mesh)
        s1_app = ("127.0.0.1", _ports(manifest, "app", "http")["app-s1"])
        s1_before = get_json(s1_app, APP_STATS_PATH)
        ca = tmp_path / "secrets" / "gateway" / "ca.pem"
        trusting = ssl.create_default_context(cafile=str(ca))
        trusting.check_hostname = False  # the peer is named by a SPIFFE URI, not a host name
        replies = [_no_http_answer(inbound), _no_http_answer(inbound, trusting)]
        refused = envoy.read_stats(admin, r"^listener\.inbound_s1\.ssl\.")
        s1_after = get_json(s1_app, APP_STATS_PATH)
        fairness = envoy.tuning(
            ["envoy", *envoy.envoy_args(1, "x")],
            {name: json.loads(Path(p).read_text()) for name, p in stack.configs.items()},
            mtls=True,
        )
    # Every hop between two Envoys handshook TLS: the gateway to the entry's proxy, and (with
    # sidecars) s0's sidecar to the callees'; the node proxy's hops to apps are plaintext.
    if mesh == "envoy":
        assert shook == {
            "gateway": {"cluster.to_s0.ssl.handshake", "cluster.to_s1.ssl.handshake"},
            "sidecar-s0": {
                "listener.inbound_s0.ssl.handshake",
                "cluster.to_s1.ssl.handshake",
                "cluster.to_s2.ssl.handshake",
            },
            "sidecar-s1": {"listener.inbound_s1.ssl.handshake"},
            "sidecar-s2": {"listener.inbound_s2.ssl.handshake"},
        }
    else:
        assert shook == {
            "gateway": {"cluster.to_s0.ssl.handshake", "cluster.to_s1.ssl.handshake"},
            NODE_PROXY: {"listener.inbound_s0.ssl.handshake", "listener.inbound_s1.ssl.handshake"},
        }
    assert replies == [b"", b""]  # no HTTP answer, not even an error page
    assert refused["listener.inbound_s1.ssl.connection_error"] >= 1  # the plaintext one
    assert refused["listener.inbound_s1.ssl.fail_verify_no_cert"] == 1
    assert s1_after["requests"] == s1_before["requests"]  # neither reached the app
    assert fairness["mtls"] is True and fairness["ok"] is True
    assert not (tmp_path / "secrets").exists()  # no private key outlives the stack
    assert os.listdir(tmp_path / "configs")  # the bootstraps stay, published
