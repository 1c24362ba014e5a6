"""Envoy mesh configs: shape, Envoy's own validation, and real traffic through real Envoys."""

from __future__ import annotations

import copy
import dataclasses
import http.client
import itertools
import json
import sys
import textwrap
from pathlib import Path

import pytest

from baselines.envoy import config
from harness.names import DEFAULT_WORKMODEL
from harness.ports import free_ports, release_ports, wait_port_free
from harness.procs import Supervisor, http_ok
from harness.stacks import describe
from harness.stacks.model import Settings
from mubench.http_app import KEEPALIVE_S
from tests.conftest import require_external

SERVICES = ("s0", "s1", "s2")
UNLIMITED = 1_000_000_000  # the circuit-breaker value Envoy's FAQ suggests
UPSTREAM_HTTP = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"
BREAKER_LIMITS = ("max_connections", "max_pending_requests", "max_requests", "max_retries")

# Where each sidecar (service instance) runs, (service, node) per sidecar.
ONE_EACH = (("s0", "node1"), ("s1", "node2"), ("s2", "node3"))
# s1 on node2 and node3, s2 on node1 and node2: s0's sidecar (node1) calls s2 on its own
# node only and s1 round robin on both; s1's sidecar on node3 calls both s2.
SPREAD = (("s0", "node1"), ("s1", "node2"), ("s1", "node3"), ("s2", "node1"), ("s2", "node2"))
FIXED_PORTS = list(range(20000, 20000 + 4 * len(SPREAD) + 2))  # for configs never started


def _mesh_ports(layout=ONE_EACH) -> int:
    return 4 * len(layout) + 2


def _sidecar_key(layout, service: str, node: str) -> str:
    """A sidecar's config name as the harness names it: with its node when replicated."""
    replicated = sum(s == service for s, _ in layout) > 1
    return f"{config.sidecar_name(service)}-{node}" if replicated else config.sidecar_name(service)


def _description(ports: list[int], layout=ONE_EACH, **kwargs) -> config.MeshDescription:
    sidecars = {
        _sidecar_key(layout, s, node): config.Sidecar(s, node, *ports[4 * i : 4 * i + 4])
        for i, (s, node) in enumerate(layout)
    }
    gateway = config.GatewayPorts(*ports[4 * len(layout) : 4 * len(layout) + 2])
    return config.MeshDescription(sidecars=sidecars, gateway=gateway, **kwargs)


def _cluster_of(bootstrap: dict, name: str) -> dict:
    (cluster,) = [c for c in bootstrap["static_resources"]["clusters"] if c["name"] == name]
    return cluster


def _endpoints(bootstrap: dict, name: str) -> list[tuple[str, int]]:
    """The (host, port) of every endpoint of cluster `name`, in order."""
    (group,) = _cluster_of(bootstrap, name)["load_assignment"]["endpoints"]
    return [
        (
            e["endpoint"]["address"]["socket_address"]["address"],
            e["endpoint"]["address"]["socket_address"]["port_value"],
        )
        for e in group["lb_endpoints"]
    ]


def _cluster_port(bootstrap: dict, name: str) -> int:
    ((_, port),) = _endpoints(bootstrap, name)
    return port


def _clusters(desc: config.MeshDescription) -> list[dict]:
    """Every cluster of every Envoy of the mesh."""
    return [c for b in config.render(desc).values() for c in b["static_resources"]["clusters"]]


def _http_filters(desc: config.MeshDescription) -> list[dict]:
    """The HTTP connection manager of every listener of every Envoy."""
    return [
        f["typed_config"]
        for b in config.render(desc).values()
        for listener in b["static_resources"]["listeners"]
        for chain in listener["filter_chains"]
        for f in chain["filters"]
    ]


def _concurrency_flag(argv: list[str]) -> str:
    return argv[argv.index("--concurrency") + 1]


def _envoy_available() -> bool:
    try:
        config.envoy_binary()
    except FileNotFoundError:
        return False
    return True


def test_description_rejects_bad_input():
    with pytest.raises(ValueError, match="gateway: ports must be distinct"):
        _description([*FIXED_PORTS[:13], FIXED_PORTS[12]])
    with pytest.raises(ValueError, match="sidecar-s0: ports must be distinct"):
        _description([FIXED_PORTS[1], *FIXED_PORTS[1:14]])
    # Pods of one service bind the same numbers, each in its own network namespace.
    same = [*FIXED_PORTS[:8], *FIXED_PORTS[4:8], *FIXED_PORTS[12:22]]
    assert _description(same, SPREAD).sidecars
    with pytest.raises(ValueError, match="entry"):
        _description(FIXED_PORTS, entry="s9")
    with pytest.raises(ValueError, match="concurrency"):
        _description(FIXED_PORTS, concurrency=0)
    with pytest.raises(ValueError, match="service ids"):
        config.MeshDescription(
            sidecars={"sidecar-a.b": config.Sidecar("a.b", "node1", 1, 2, 3, 4)},
            gateway=config.GatewayPorts(5, 6),
            entry="a.b",
        )
    with pytest.raises(ValueError, match="must not be named"):
        config.MeshDescription(
            sidecars={config.GATEWAY: config.Sidecar("s0", "node1", 1, 2, 3, 4)},
            gateway=config.GatewayPorts(5, 6),
        )
    desc = _description(FIXED_PORTS, SPREAD)
    files = config.MtlsFiles("ca", "cert", "key")
    with pytest.raises(ValueError, match="mtls needs the files of every Envoy"):
        dataclasses.replace(desc, mtls={"gateway": files, "sidecar-s0": files})


def test_calls_cross_the_callee_sidecar_not_its_app():
    desc = _description(FIXED_PORTS)
    sidecar = config.sidecar_config(desc, config.sidecar_name("s0"))
    ports = {p.service: p for p in desc.sidecars.values()}
    assert _cluster_port(sidecar, config.LOCAL_APP_CLUSTER) == ports["s0"].app_port
    for callee in SERVICES:
        assert config.callee_cluster(callee) == f"to_{callee}"
        assert _cluster_port(sidecar, f"to_{callee}") == ports[callee].inbound_port
    gateway = config.gateway_config(desc)
    assert _cluster_port(gateway, "to_s0") == ports["s0"].inbound_port
    text = json.dumps(config.render(desc))
    assert "access_log" not in text
    assert '"generate_request_id": false' in text


def test_a_sidecar_calls_the_instance_on_its_own_node_else_every_instance():
    desc = _description(FIXED_PORTS, SPREAD)
    configs = config.render(desc)
    assert list(configs) == [
        "sidecar-s0",
        "sidecar-s1-node2",
        "sidecar-s1-node3",
        "sidecar-s2-node1",
        "sidecar-s2-node2",
        "gateway",
    ]
    inbound = {name: (p.host, p.inbound_port) for name, p in desc.sidecars.items()}
    s1_both = [inbound["sidecar-s1-node2"], inbound["sidecar-s1-node3"]]
    s2_both = [inbound["sidecar-s2-node1"], inbound["sidecar-s2-node2"]]
    # s0 on node1: s2 has an instance there, s1 does not (both, round robin).
    s0 = configs["sidecar-s0"]
    assert _endpoints(s0, "to_s2") == [inbound["sidecar-s2-node1"]]
    assert _endpoints(s0, "to_s1") == s1_both
    assert _endpoints(s0, "to_s0") == [inbound["sidecar-s0"]]
    # s1 on node3: s2 has no instance there; s1 on node2: it has.
    assert _endpoints(configs["sidecar-s1-node3"], "to_s2") == s2_both
    assert _endpoints(configs["sidecar-s1-node2"], "to_s2") == [inbound["sidecar-s2-node2"]]
    assert _endpoints(configs["sidecar-s1-node3"], "to_s1") == [inbound["sidecar-s1-node3"]]
    # Every instance's Envoy has its own service's stat prefixes and its app.
    for name, p in desc.sidecars.items():
        listeners = [x["name"] for x in configs[name]["static_resources"]["listeners"]]
        assert listeners == [f"inbound_{p.service}", f"outbound_{p.service}"]
        assert _cluster_port(configs[name], config.LOCAL_APP_CLUSTER) == p.app_port
        assert configs[name]["node"]["id"] == name
    # The gateway (node1 by default) follows the same rule.
    assert desc.gateway_node == "node1"
    gateway = configs["gateway"]
    assert _endpoints(gateway, "to_s2") == [inbound["sidecar-s2-node1"]]
    assert _endpoints(gateway, "to_s1") == s1_both
    far = config.gateway_config(dataclasses.replace(desc, gateway_node="node3"))
    assert _endpoints(far, "to_s2") == s2_both
    assert _endpoints(far, "to_s1") == [inbound["sidecar-s1-node3"]]
    # Round robin is Envoy's default; loopback endpoints need no DNS.
    for cluster in _cluster_of(s0, "to_s1"), _cluster_of(gateway, "to_s1"):
        assert cluster["type"] == "STATIC" and "lb_policy" not in cluster
    found = config.tuning(_argv(desc), configs)
    assert found["ok"] is True and found["envoys"] == sorted(configs)


def test_a_cluster_of_named_hosts_resolves_them_by_dns():
    desc = _description(FIXED_PORTS, SPREAD)
    named = {
        name: dataclasses.replace(p, host=name if p.node == "node3" else "10.0.0.2")
        for name, p in desc.sidecars.items()
    }
    s0 = config.sidecar_config(dataclasses.replace(desc, sidecars=named), "sidecar-s0")
    to_s1 = _cluster_of(s0, "to_s1")  # one IP endpoint, one name: DNS for all
    assert (to_s1["type"], to_s1["dns_lookup_family"]) == ("STRICT_DNS", "V4_ONLY")
    assert [host for host, _ in _endpoints(s0, "to_s1")] == ["10.0.0.2", "sidecar-s1-node3"]
    assert _cluster_of(s0, "to_s2")["type"] == "STATIC"


def test_circuit_breakers_are_raised_for_both_priorities():
    clusters = _clusters(_description(FIXED_PORTS))
    assert len(clusters) == 3 * 4 + 3  # each sidecar: local_app + to_<svc> x3; gateway: x3
    for cluster in clusters:
        thresholds = cluster["circuit_breakers"]["thresholds"]
        assert sorted(t["priority"] for t in thresholds) == ["DEFAULT", "HIGH"]
        for threshold in thresholds:
            assert {k: threshold[k] for k in BREAKER_LIMITS} == dict.fromkeys(
                BREAKER_LIMITS, UNLIMITED
            ), cluster["name"]


def test_router_and_connection_manager_tuning():
    hcms = _http_filters(_description(FIXED_PORTS))
    assert len(hcms) == 3 * 2 + 1  # inbound + outbound per sidecar, the gateway
    for hcm in hcms:
        assert hcm["generate_request_id"] is False
        assert "access_log" not in hcm and "tracing" not in hcm
        (router,) = hcm["http_filters"]
        assert router["typed_config"]["dynamic_stats"] is False
        assert router["typed_config"]["suppress_envoy_headers"] is True
        routes = [r for vh in hcm["route_config"]["virtual_hosts"] for r in vh["routes"]]
        assert routes and all("retry_policy" not in r["route"] for r in routes)


@pytest.mark.parametrize("layout", [ONE_EACH, SPREAD])
def test_upstreams_are_http11_with_connection_reuse(layout):
    for cluster in _clusters(_description(FIXED_PORTS, layout)):
        options = cluster["typed_extension_protocol_options"][UPSTREAM_HTTP]
        # HTTP/1.1 (keep-alive by default), nothing capping requests per connection.
        assert options["explicit_http_config"] == {"http_protocol_options": {}}
        common = options.get("common_http_protocol_options", {})
        assert "max_requests_per_connection" not in common
        assert "max_requests_per_connection" not in cluster
        if cluster["name"].startswith(config.LOCAL_APP_CLUSTER):
            # Idle connections to the app close before the app's own keep-alive does.
            assert set(common) == {"idle_timeout"}
            assert float(common["idle_timeout"].removesuffix("s")) < KEEPALIVE_S
        else:
            assert common == {}


def _argv(desc: config.MeshDescription, path: str = "gateway.json") -> list[str]:
    """An Envoy command line of the mesh `desc`, as a deployer runs it."""
    return ["envoy", *config.envoy_args(desc.concurrency, path)]


def test_envoy_args_carry_the_configured_concurrency():
    argv = config.envoy_args(3, "/tmp/gateway.json")
    assert _concurrency_flag(argv) == "3"
    assert argv[argv.index("-c") + 1] == "/tmp/gateway.json"


def test_tuning_reads_back_the_generated_mesh():
    desc = _description(FIXED_PORTS, concurrency=3)
    found = config.tuning(_argv(desc), config.render(desc))
    assert found == {
        "flags": ["--concurrency", "3", "--log-level", "warn", "--disable-hot-restart"],
        "envoys": ["gateway", "sidecar-s0", "sidecar-s1", "sidecar-s2"],
        "concurrency": 3,
        "access_log": False,
        "tracing": False,
        "retries": False,
        "generate_request_id": False,
        "dynamic_stats": False,
        "suppress_envoy_headers": True,
        "circuit_breakers": dict.fromkeys(BREAKER_LIMITS, UNLIMITED),
        "upstream_protocol": "HTTP/1.1",
        "upstream_connection_reuse": True,
        "app_idle_timeout": "1.000s",
        "mtls": False,
        "ok": True,
    }


def _hcm(bootstraps: dict) -> dict:
    filters = bootstraps["sidecar-s1"]["static_resources"]["listeners"][0]["filter_chains"][0]
    return filters["filters"][0]["typed_config"]


def _cluster(bootstraps: dict) -> dict:
    return bootstraps["gateway"]["static_resources"]["clusters"][0]


def _options(bootstraps: dict) -> dict:
    return _cluster(bootstraps)["typed_extension_protocol_options"][UPSTREAM_HTTP]


# One drifted setting in one Envoy, and how the read-back must show it.
DRIFTS = {
    "access_log": (
        lambda b: _hcm(b).update(access_log=[{"name": "envoy.access_loggers.stdout"}]),
        {"access_log": True},
    ),
    "dynamic_stats": (
        lambda b: _hcm(b)["http_filters"][0]["typed_config"].pop("dynamic_stats"),
        {"dynamic_stats": [False, True]},  # absent = Envoy's default, true
    ),
    "request_id": (
        lambda b: _hcm(b).update(generate_request_id=True),
        {"generate_request_id": [False, True]},
    ),
    "breakers": (
        lambda b: _cluster(b)["circuit_breakers"]["thresholds"].pop(),  # HIGH: defaults
        {
            "circuit_breakers": {
                "max_connections": 1024,
                "max_pending_requests": 1024,
                "max_requests": 1024,
                "max_retries": 3,
            }
        },
    ),
    "one_request_per_connection": (
        lambda b: _options(b).update(
            common_http_protocol_options={"max_requests_per_connection": 1}
        ),
        {"upstream_connection_reuse": False},
    ),
    "http2": (
        lambda b: _options(b).update(explicit_http_config={"http2_protocol_options": {}}),
        {"upstream_protocol": ["HTTP/1.1", "HTTP/2"]},
    ),
}


@pytest.mark.parametrize("drift", DRIFTS)
def test_tuning_shows_a_drifted_setting(drift):
    desc = _description(FIXED_PORTS)
    bootstraps = copy.deepcopy(config.render(desc))
    change, expected = DRIFTS[drift]
    change(bootstraps)
    found = config.tuning(_argv(desc), bootstraps)
    assert {k: found[k] for k in expected} == expected
    assert found["ok"] is False


def test_tuning_without_explicit_concurrency_is_not_ok():
    desc = _description(FIXED_PORTS)
    argv = _argv(desc)
    at = argv.index("--concurrency")
    del argv[at : at + 2]
    found = config.tuning(argv, config.render(desc))
    assert found["concurrency"] is None and found["ok"] is False


def test_generated_configs_pass_envoy_validation(tmp_path):
    require_external(_envoy_available(), "Envoy")
    paths = _write_configs(_description(FIXED_PORTS), tmp_path)
    assert set(paths) == {"sidecar-s0", "sidecar-s1", "sidecar-s2", "gateway"}


def test_several_instances_per_service_pass_envoy_validation(tmp_path):
    require_external(_envoy_available(), "Envoy")
    (tmp_path / "sidecars").mkdir()
    (tmp_path / "nodes").mkdir()
    paths = _write_configs(_description(FIXED_PORTS, SPREAD), tmp_path / "sidecars")
    assert len(paths) == len(SPREAD) + 1
    paths = _write_configs(_node_description(NODE_FIXED_PORTS), tmp_path / "nodes")
    assert set(paths) == {*map(config.node_proxy_name, NODES), "gateway"}


def _write_configs(
    desc: config.MeshDescription | config.NodeMeshDescription, out: Path
) -> dict[str, Path]:
    """Every Envoy's bootstrap written to `out`, each checked by Envoy itself."""
    paths = {}
    nodes = isinstance(desc, config.NodeMeshDescription)
    for name, bootstrap in (config.render_nodes if nodes else config.render)(desc).items():
        paths[name] = out / f"{name}.json"
        paths[name].write_text(json.dumps(bootstrap))
        config.validate(paths[name])
    return paths


def test_validate_raises_with_envoys_message(tmp_path):
    require_external(_envoy_available(), "Envoy")
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"static_resources": {"clusterz": []}}))
    with pytest.raises(config.EnvoyConfigError, match="clusterz"):
        config.validate(bad)


# Stand-in for a μBench cell: answers with what it saw (and which INSTANCE it is) and, when
# CALLS is set, first calls each listed service through its sidecar's outbound listener
# (OUTBOUND, by Host) or the port UPSTREAMS names for it (a node proxy's listener for it).
_APP = textwrap.dedent(
    """
    import http.client, json, os
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    NAME, CALLS = os.environ["NAME"], [c for c in os.environ.get("CALLS", "").split(",") if c]
    INSTANCE = os.environ.get("INSTANCE", NAME)
    OUTBOUND = int(os.environ.get("OUTBOUND", "0"))
    UPSTREAMS = dict(u.split("=") for u in os.environ.get("UPSTREAMS", "").split(",") if u)

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        disable_nagle_algorithm = True  # headers and body are separate writes

        def do_GET(self):
            calls = {}
            if self.path != "/health":
                for callee in CALLS:
                    port = int(UPSTREAMS.get(callee, OUTBOUND))
                    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
                    headers = {"Host": callee}
                    if self.headers.get("x-request-id"):
                        headers["x-request-id"] = self.headers["x-request-id"]
                    conn.request("GET", "/api/v1", headers=headers)
                    resp = conn.getresponse()
                    calls[callee] = [resp.status, json.loads(resp.read())]
                    conn.close()
            body = json.dumps({
                "service": NAME,
                "instance": INSTANCE,
                "path": self.path,
                "request_id": self.headers.get("x-request-id"),
                "envoy_headers": sorted(h for h in self.headers if h.lower().startswith("x-envoy")),
                "calls": calls,
            }).encode()
            ok = all(status == 200 for status, _ in calls.values())
            self.send_response(200 if ok else 500)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    ThreadingHTTPServer(("127.0.0.1", int(os.environ["PORT"])), Handler).serve_forever()
    """
)


def _get(port: int, path: str, headers: dict[str, str] | None = None) -> tuple[int, dict]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("GET", path, headers=headers or {})
        resp = conn.getresponse()
        body = resp.read()
    finally:
        conn.close()
    return resp.status, json.loads(body) if body.startswith(b"{") else {}


@pytest.mark.e2e
def test_requests_cross_gateway_and_both_sidecars(tmp_path):
    """Sidecars of SPREAD on loopback: s0 (node1) calls s2 on its node, s1 round robin."""
    require_external(_envoy_available(), "Envoy")
    ports = free_ports(_mesh_ports(SPREAD))
    desc = _description(ports, SPREAD, concurrency=1)
    app = tmp_path / "app.py"
    app.write_text(_APP)
    with Supervisor(tmp_path / "run", grace_s=2) as sup:
        for name, sp in desc.sidecars.items():
            env = {
                "NAME": sp.service,
                "INSTANCE": name,
                "PORT": str(sp.app_port),
                "OUTBOUND": str(sp.outbound_port),
            }
            if sp.service == "s0":
                env["CALLS"] = "s1,s2"
            sup.start(
                f"app-{name}",
                [sys.executable, str(app)],
                role="app",
                env=env,
                ready=http_ok(f"http://127.0.0.1:{sp.app_port}/health"),
            )
        (tmp_path / "envoy").mkdir()
        configs = _write_configs(desc, tmp_path / "envoy")
        admin = {name: p.admin_port for name, p in desc.sidecars.items()}
        admin[config.GATEWAY] = desc.gateway.admin_port
        for name, path in configs.items():
            sup.start(
                name,
                [config.envoy_binary(), *config.envoy_args(desc.concurrency, str(path))],
                role="gateway" if name == config.GATEWAY else "sidecar",
                ready=http_ok(f"http://127.0.0.1:{admin[name]}/ready"),
            )
        sup.wait_ready(timeout_s=30)
        assert len(sup.roles()["sidecar"]) == len(SPREAD) and len(sup.roles()["gateway"]) == 1
        assert {_concurrency_flag(sup.procs[name].argv) for name in configs} == {"1"}

        public = desc.gateway.listen_port
        status, body = _get(public, "/", {"x-request-id": "rid-1"})
        assert status == 200 and body["service"] == "s0"
        assert {c: (s, b["service"]) for c, (s, b) in body["calls"].items()} == {
            "s1": (200, "s1"),
            "s2": (200, "s2"),
        }
        # The id crossed gateway + 2 sidecars untouched; no x-envoy-* headers added.
        assert body["calls"]["s1"][1]["request_id"] == "rid-1"
        assert body["envoy_headers"] == body["calls"]["s1"][1]["envoy_headers"] == []

        assert _get(public, "/s1/api/v1?x=1")[1]["service"] == "s1"
        assert _get(public, "/s1/api/v1?x=1")[1]["path"] == "/api/v1?x=1"
        assert _get(public, "/s1")[1]["path"] == "/"
        by_host = _get(public, "/api/v1", {"Host": "s2"})[1]
        assert (by_host["service"], by_host["instance"]) == ("s2", "sidecar-s2-node1")
        unknown_status, _ = _get(desc.sidecars["sidecar-s0"].outbound_port, "/", {"Host": "s9"})
        assert unknown_status == 404
        assert _get(public, "/")[1]["request_id"] is None  # Envoy generated none

        counts = config.mesh_listeners(map(config.counted_stats, admin.values()))
        totals = {prefix: c["downstream_rq_total"] for prefix, c in counts.items()}
        assert totals == {  # summed over each service's instances
            "gateway": 6,
            "inbound_s0": 2,
            "outbound_s0": 5,
            "inbound_s1": 5,
            "inbound_s2": 3,
            "outbound_s1": 0,
            "outbound_s2": 0,
        }
        assert counts["outbound_s0"]["downstream_rq_4xx"] == 1
        assert counts["gateway"]["downstream_rq_2xx"] == 6

        # s0's calls to s1 alternate between its two instances; to s2 they stay on node1.
        calls = [_get(public, "/")[1]["calls"] for _ in range(4)]
        s1_seen = [c["s1"][1]["instance"] for c in calls]
        assert set(s1_seen) == {"sidecar-s1-node2", "sidecar-s1-node3"}
        assert all(a != b for a, b in itertools.pairwise(s1_seen)), s1_seen
        assert {c["s2"][1]["instance"] for c in calls} == {"sidecar-s2-node1"}
        # The callee clusters count what they carried: the accounting's cross-node calls.
        to_s1, to_s2 = (
            config.cluster_stat(config.callee_cluster(s), "upstream_rq_total") for s in ("s1", "s2")
        )
        absent = config.cluster_stat(config.callee_cluster("ms-1"), "upstream_rq_total")
        s0 = config.counted_stats(admin["sidecar-s0"], [to_s1, to_s2, absent], host="127.0.0.1")
        assert (s0[to_s1], s0[to_s2], absent in s0) == (6, 6, False)
        assert s0[config.listener_stat("outbound_s0", "downstream_rq_total")] == 13
        gateway = config.counted_stats(admin[config.GATEWAY], [to_s1, to_s2])
        assert (gateway[to_s1], gateway[to_s2]) == (3, 1)
        per_s1 = [
            config.counted_stats(admin[n])["http.inbound_s1.downstream_rq_total"]
            for n in ("sidecar-s1-node2", "sidecar-s1-node3")
        ]
        assert sorted(per_s1) == [4, 5]  # s0's 6 calls 3 + 3, the gateway's 3 2 + 1
    assert set(configs) == {*desc.sidecars, "gateway"}
    for port in ports:
        wait_port_free(port, timeout_s=5)
    release_ports(ports)


def test_every_envoy_of_the_description_gets_the_configured_concurrency():
    desc = describe("envoy", Settings(workmodel=DEFAULT_WORKMODEL, envoy_concurrency=3))
    envoys = [c for c in desc.components if c.program == "envoy"]
    assert [c.name for c in envoys] == ["sidecar-s0", "sidecar-s1", "sidecar-s2", "gateway"]
    assert {_concurrency_flag(list(c.args)) for c in envoys} == {"3"}


# --- the node-proxy mesh and mTLS -------------------------------------------------------------

# Three nodes: s0 on node1, s1 on node2 and node3, s2 on node1 and node2. So s0's calls
# (node1) go to s2 on its own node and round robin to s1 on the other two; node3's proxy
# sends calls to s2 to both of its instances.
NODES = ("node1", "node2", "node3")
NODES_OF = {"s0": ("node1",), "s1": ("node2", "node3"), "s2": ("node1", "node2")}
# apps 5; node1 2 in + 3 out + admin, node2 2 + 3 + 1, node3 1 + 3 + 1; gateway 2
NODE_PORTS = 24
NODE_FIXED_PORTS = list(range(20100, 20100 + NODE_PORTS))  # for configs never started


def _node_description(ports: list[int], **kwargs) -> config.NodeMeshDescription:
    taken = iter(ports)
    apps = {s: {n: config.AppAddress(next(taken)) for n in nodes} for s, nodes in NODES_OF.items()}
    nodes = {
        node: config.NodeProxyPorts(
            inbound={s: next(taken) for s, ns in NODES_OF.items() if node in ns},
            outbound={s: next(taken) for s in NODES_OF},
            admin_port=next(taken),
        )
        for node in NODES
    }
    gateway = config.GatewayPorts(next(taken), next(taken))
    assert next(taken, None) is None
    return config.NodeMeshDescription(apps=apps, nodes=nodes, gateway=gateway, **kwargs)


def _listener(bootstrap: dict, name: str) -> dict:
    (found,) = [x for x in bootstrap["static_resources"]["listeners"] if x["name"] == name]
    return found


def _routed_cluster(listener: dict) -> str:
    (vhost,) = listener["filter_chains"][0]["filters"][0]["typed_config"]["route_config"][
        "virtual_hosts"
    ]
    (route,) = vhost["routes"]
    return route["route"]["cluster"]


def _pki(out: Path, envoys: list[str]) -> dict[str, config.MtlsFiles]:
    """A fresh mesh CA's files for `envoys`, written under `out` (as a deployer would)."""
    from baselines.envoy.tls import MeshCa

    ca = MeshCa("test")
    files = {}
    for name in envoys:
        issued = ca.issue(name)
        (out / name).mkdir(parents=True)
        for file, text in (("ca", ca.ca_pem), ("cert", issued.cert_pem), ("key", issued.key_pem)):
            (out / name / f"{file}.pem").write_text(text)
        files[name] = config.MtlsFiles(
            *(str(out / name / f"{f}.pem") for f in ("ca", "cert", "key"))
        )
    return files


def _tls(holder: dict) -> dict | None:
    socket = holder.get("transport_socket")
    return None if socket is None else socket["typed_config"]


def test_node_proxies_route_same_node_calls_to_the_app_and_others_to_its_node():
    desc = _node_description(NODE_FIXED_PORTS)
    configs = config.render_nodes(desc)
    assert list(configs) == ["nodeproxy-node1", "nodeproxy-node2", "nodeproxy-node3", "gateway"]
    n1, n2, n3 = (configs[config.node_proxy_name(n)] for n in NODES)
    outbound = ["outbound_to_s0", "outbound_to_s1", "outbound_to_s2"]
    # An inbound listener per local service, an outbound one per service.
    names = {
        n: [x["name"] for x in configs[config.node_proxy_name(n)]["static_resources"]["listeners"]]
        for n in NODES
    }
    assert names == {
        "node1": ["inbound_s0", "inbound_s2", *outbound],
        "node2": ["inbound_s1", "inbound_s2", *outbound],
        "node3": ["inbound_s1", *outbound],
    }
    assert desc.local("node2") == ["s1", "s2"]
    # Same node: straight to the app (once through the node proxy); else the proxies of the
    # nodes that have an instance, round robin.
    assert _routed_cluster(_listener(n1, "outbound_to_s2")) == config.app_cluster("s2")
    assert _cluster_port(n1, config.app_cluster("s2")) == desc.apps["s2"]["node1"].port
    assert _cluster_port(n2, config.app_cluster("s2")) == desc.apps["s2"]["node2"].port
    assert _routed_cluster(_listener(n1, "outbound_to_s1")) == "to_s1"
    inbound = {
        s: {n: ("127.0.0.1", desc.nodes[n].inbound[s]) for n in ns} for s, ns in NODES_OF.items()
    }
    assert _endpoints(n1, "to_s1") == [inbound["s1"]["node2"], inbound["s1"]["node3"]]
    assert _routed_cluster(_listener(n3, "outbound_to_s2")) == "to_s2"
    assert _endpoints(n3, "to_s2") == [inbound["s2"]["node1"], inbound["s2"]["node2"]]
    assert _endpoints(n2, "to_s0") == _endpoints(n3, "to_s0") == [inbound["s0"]["node1"]]
    assert _routed_cluster(_listener(n3, "outbound_to_s1")) == config.app_cluster("s1")
    assert _routed_cluster(_listener(n2, "inbound_s1")) == config.app_cluster("s1")
    # The gateway (node1) calls the inbound listeners by the same rule.
    gateway = configs["gateway"]
    assert _endpoints(gateway, "to_s0") == [inbound["s0"]["node1"]]
    assert _endpoints(gateway, "to_s1") == [inbound["s1"]["node2"], inbound["s1"]["node3"]]
    assert _endpoints(gateway, "to_s2") == [inbound["s2"]["node1"]]
    far = config.node_gateway_config(dataclasses.replace(desc, gateway_node="node3"))
    assert _endpoints(far, "to_s1") == [inbound["s1"]["node3"]]
    assert _endpoints(far, "to_s2") == [inbound["s2"]["node1"], inbound["s2"]["node2"]]
    found = config.tuning(_argv(desc), configs)
    assert found["ok"] is True and found["mtls"] is False
    assert found["app_idle_timeout"] == "1.000s"


def test_node_description_rejects_bad_input():
    ports = NODE_FIXED_PORTS
    desc = _node_description(ports)
    with pytest.raises(ValueError, match="no described node"):
        dataclasses.replace(desc, apps={**desc.apps, "s3": {"c": config.AppAddress(20500)}})
    with pytest.raises(ValueError, match="without instances"):
        dataclasses.replace(desc, apps={**desc.apps, "s1": {}})
    missing = {**desc.nodes, "node2": dataclasses.replace(desc.nodes["node2"], inbound={})}
    with pytest.raises(ValueError, match="an inbound port per local service"):
        dataclasses.replace(desc, nodes=missing)
    with pytest.raises(ValueError, match="gateway: ports must be distinct"):
        _node_description([*ports[:-1], ports[-2]])
    with pytest.raises(ValueError, match="mtls needs the files of every Envoy"):
        files = config.MtlsFiles("ca", "cert", "key")
        dataclasses.replace(desc, mtls={"gateway": files})


@pytest.mark.parametrize("mesh", ["sidecars", "nodes"])
def test_mtls_on_every_hop_between_envoys_and_only_there(mesh, tmp_path):
    desc, render = _mtls_description(mesh, tmp_path)
    plain = dataclasses.replace(desc, mtls={})
    files = desc.mtls
    configs = render(desc)
    # Which Envoy listens on each inbound port.
    if mesh == "sidecars":
        owner = {p.inbound_port: name for name, p in desc.sidecars.items()}
    else:
        owner = {
            port: config.node_proxy_name(n)
            for n, p in desc.nodes.items()
            for port in p.inbound.values()
        }
    several = 0
    for name, bootstrap in configs.items():
        for cluster in bootstrap["static_resources"]["clusters"]:
            tls = _tls(cluster)
            if cluster["name"].startswith(config.LOCAL_APP_CLUSTER):
                assert tls is None, (name, cluster["name"])  # to its own app: plaintext
                continue
            common = tls["common_tls_context"]
            assert common["tls_certificates"] == [
                {
                    "certificate_chain": {"filename": files[name].cert},
                    "private_key": {"filename": files[name].key},
                }
            ]
            # Any one of the cluster's peers is accepted, and only those.
            peers = [owner[port] for _, port in _endpoints(bootstrap, cluster["name"])]
            assert common["validation_context"]["match_typed_subject_alt_names"] == [
                {"san_type": "URI", "matcher": {"exact": config.spiffe_id(peer)}} for peer in peers
            ]
            several += len(peers) > 1
            assert common["validation_context"]["trusted_ca"] == {"filename": files[name].ca}
        for listener in bootstrap["static_resources"]["listeners"]:
            tls = _tls(listener["filter_chains"][0])
            if listener["name"].startswith("inbound_"):  # other Envoys call it: mTLS only
                assert tls["require_client_certificate"] is True, (name, listener["name"])
            else:  # the public port, and what apps call
                assert tls is None, (name, listener["name"])
    assert several >= 2  # clusters of two peers, with mTLS
    found = config.tuning(_argv(desc), configs, mtls=True)
    assert found["ok"] is True and found["mtls"] is True
    assert config.tuning(_argv(desc), configs)["ok"] is False  # mTLS where none was asked for
    assert config.tuning(_argv(desc), {**configs, "gateway": render(plain)["gateway"]})["mtls"] == [
        False,
        True,
    ]


@pytest.mark.parametrize("mesh", ["sidecars", "nodes"])
def test_mtls_configs_pass_envoy_validation(mesh, tmp_path):
    require_external(_envoy_available(), "Envoy")
    desc, render = _mtls_description(mesh, tmp_path)
    (tmp_path / "configs").mkdir()
    paths = _write_configs(desc, tmp_path / "configs")  # Envoy loads every certificate and key
    assert set(paths) == set(render(desc))


def _mtls_description(mesh: str, out: Path):
    """A mesh with mTLS (`mesh`: sidecars or nodes) and its renderer, certificates in `out`."""
    if mesh == "sidecars":
        plain, render = _description(FIXED_PORTS, SPREAD), config.render
    else:
        plain, render = _node_description(NODE_FIXED_PORTS), config.render_nodes
    return dataclasses.replace(plain, mtls=_pki(out / "tls", list(render(plain)))), render


def test_certificates_name_each_envoy_and_chain_to_the_mesh_ca():
    from cryptography import x509

    from baselines.envoy.tls import CLOCK_SKEW, LIFETIME, MeshCa

    ca = MeshCa("envoy")
    root = x509.load_pem_x509_certificate(ca.ca_pem.encode())
    issued = ca.issue("sidecar-s1")
    assert ca.issue("sidecar-s1") == issued  # one certificate per Envoy, however often asked
    cert = x509.load_pem_x509_certificate(issued.cert_pem.encode())
    cert.verify_directly_issued_by(root)
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == [
        config.spiffe_id("sidecar-s1")
    ]
    assert cert.not_valid_after_utc - cert.not_valid_before_utc == LIFETIME + CLOCK_SKEW
    assert root.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is True
    assert ca.issue("gateway").key_pem != issued.key_pem


@pytest.mark.e2e
def test_a_call_to_another_node_crosses_both_node_proxies_over_mtls(tmp_path):
    """Three node proxies, a gateway and five stand-in apps on loopback, mTLS on: s0's calls
    to s1 alternate between node2 and node3, each proxy accepted by its own identity."""
    require_external(_envoy_available(), "Envoy")
    ports = free_ports(NODE_PORTS)
    plain = _node_description(ports, concurrency=1)
    desc = dataclasses.replace(plain, mtls=_pki(tmp_path / "tls", list(config.render_nodes(plain))))
    app = tmp_path / "app.py"
    app.write_text(_APP)
    admin = {config.node_proxy_name(n): p.admin_port for n, p in desc.nodes.items()}
    admin[config.GATEWAY] = desc.gateway.admin_port
    with Supervisor(tmp_path / "run", grace_s=2) as sup:
        for service, by_node in desc.apps.items():
            for node, where in by_node.items():
                env = {"NAME": service, "INSTANCE": f"{service}-{node}", "PORT": str(where.port)}
                if service == "s0":  # through its node proxy's listener for each callee
                    outbound = desc.nodes[node].outbound
                    env |= {
                        "CALLS": "s1,s2",
                        "UPSTREAMS": f"s1={outbound['s1']},s2={outbound['s2']}",
                    }
                sup.start(
                    f"{service}-{node}",
                    [sys.executable, str(app)],
                    role="app",
                    env=env,
                    ready=http_ok(f"http://127.0.0.1:{where.port}/health"),
                )
        (tmp_path / "envoy").mkdir()
        for name, path in _write_configs(desc, tmp_path / "envoy").items():
            sup.start(
                name,
                [config.envoy_binary(), *config.envoy_args(desc.concurrency, str(path))],
                role="gateway" if name == config.GATEWAY else "nodeproxy",
                ready=http_ok(f"http://127.0.0.1:{admin[name]}/ready"),
            )
        sup.wait_ready(timeout_s=30)
        seen = []
        for rid in ("rid-n", "rid-m"):
            status, body = _get(desc.gateway.listen_port, "/", {"x-request-id": rid})
            assert status == 200 and body["service"] == "s0"
            assert {c: (s, b["service"]) for c, (s, b) in body["calls"].items()} == {
                "s1": (200, "s1"),
                "s2": (200, "s2"),
            }
            assert body["calls"]["s1"][1]["request_id"] == rid
            assert body["envoy_headers"] == body["calls"]["s1"][1]["envoy_headers"] == []
            seen.append((body["calls"]["s1"][1]["instance"], body["calls"]["s2"][1]["instance"]))
        to_s1 = config.cluster_stat(config.callee_cluster("s1"), "upstream_rq_total")
        per_envoy = {
            name: {
                p: c["downstream_rq_total"]
                for p, c in config.listeners(config.counted_stats(port)).items()
            }
            for name, port in admin.items()
        }
        carried = config.counted_stats(admin["nodeproxy-node1"], [to_s1], host="127.0.0.1")
        tls = {
            name: config.read_stats(port, r"\.ssl\.handshake$", host="127.0.0.1")
            for name, port in admin.items()
        }
    # s2 on s0's own node; s1 round robin over its two nodes.
    assert sorted(seen) == [("s1-node2", "s2-node1"), ("s1-node3", "s2-node1")]
    assert carried[to_s1] == 2
    none_out = {"outbound_to_s0": 0, "outbound_to_s1": 0, "outbound_to_s2": 0}
    assert per_envoy == {
        # s0's node: the gateway's requests in, then one call to each callee out per request.
        "nodeproxy-node1": {
            "inbound_s0": 2,
            "inbound_s2": 0,
            "outbound_to_s0": 0,
            "outbound_to_s1": 2,
            "outbound_to_s2": 2,
        },
        # s1's nodes: one call from node1 in each (the destination node proxy), nothing out.
        "nodeproxy-node2": {"inbound_s1": 1, "inbound_s2": 0, **none_out},
        "nodeproxy-node3": {"inbound_s1": 1, **none_out},
        "gateway": {"gateway": 2},
    }
    # Every hop between Envoys was TLS: gateway -> node1, node1 -> node2 and node3; none else.
    assert {name: {k for k, v in stats.items() if v} for name, stats in tls.items()} == {
        "gateway": {"cluster.to_s0.ssl.handshake"},
        "nodeproxy-node1": {"listener.inbound_s0.ssl.handshake", "cluster.to_s1.ssl.handshake"},
        "nodeproxy-node2": {"listener.inbound_s1.ssl.handshake"},
        "nodeproxy-node3": {"listener.inbound_s1.ssl.handshake"},
    }
    for port in ports:
        wait_port_free(port, timeout_s=5)
    release_ports(ports)
