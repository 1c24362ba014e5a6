"""Envoy mesh configs: shape, Envoy's own validation, and real traffic through real Envoys."""

from __future__ import annotations

import http.client
import json
import sys
import textwrap

import pytest

from baselines.envoy import config
from baselines.envoy.runner import start_mesh
from harness.ports import free_ports, release_ports, wait_port_free
from harness.procs import Supervisor, http_ok
from tests.conftest import require_external

SERVICES = ("s0", "s1", "s2")


def _description(ports: list[int], **kwargs) -> config.MeshDescription:
    services = {s: config.ServicePorts(*ports[4 * i : 4 * i + 4]) for i, s in enumerate(SERVICES)}
    gateway = config.GatewayPorts(ports[12], ports[13])
    return config.MeshDescription(services=services, gateway=gateway, **kwargs)


def _cluster_port(bootstrap: dict, name: str) -> int:
    (cluster,) = [c for c in bootstrap["static_resources"]["clusters"] if c["name"] == name]
    (endpoint,) = cluster["load_assignment"]["endpoints"][0]["lb_endpoints"]
    return endpoint["endpoint"]["address"]["socket_address"]["port_value"]


def _envoy_available() -> bool:
    try:
        config.envoy_binary()
    except FileNotFoundError:
        return False
    return True


def test_description_rejects_bad_input():
    ports = list(range(20000, 20014))
    with pytest.raises(ValueError, match="distinct"):
        _description([*ports[:13], ports[0]])
    with pytest.raises(ValueError, match="entry"):
        _description(ports, entry="s9")
    with pytest.raises(ValueError, match="service ids"):
        config.MeshDescription(
            services={"a.b": config.ServicePorts(1, 2, 3, 4)}, gateway=config.GatewayPorts(5, 6)
        )


def test_calls_cross_the_callee_sidecar_not_its_app():
    desc = _description(list(range(20000, 20014)))
    sidecar = config.sidecar_config(desc, "s0")
    assert _cluster_port(sidecar, config.LOCAL_APP_CLUSTER) == desc.services["s0"].app_port
    for callee in SERVICES:
        assert _cluster_port(sidecar, f"to_{callee}") == desc.services[callee].inbound_port
    gateway = config.gateway_config(desc)
    assert _cluster_port(gateway, "to_s0") == desc.services["s0"].inbound_port
    text = json.dumps(config.render(desc))
    assert "access_log" not in text
    assert '"generate_request_id": false' in text


def test_generated_configs_pass_envoy_validation(tmp_path):
    require_external(_envoy_available(), "Envoy")
    paths = config.write_configs(_description(list(range(20000, 20014))), tmp_path)
    assert set(paths) == {"sidecar-s0", "sidecar-s1", "sidecar-s2", "gateway"}
    assert all(p.is_file() for p in paths.values())


def test_validate_raises_with_envoys_message(tmp_path):
    require_external(_envoy_available(), "Envoy")
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"static_resources": {"clusterz": []}}))
    with pytest.raises(config.EnvoyConfigError, match="clusterz"):
        config.validate(bad)


# Stand-in for a μBench cell: answers with what it saw and, when CALLS is set,
# first calls each listed service through its sidecar's outbound listener.
_APP = textwrap.dedent(
    """
    import http.client, json, os
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    NAME, CALLS = os.environ["NAME"], [c for c in os.environ.get("CALLS", "").split(",") if c]
    OUTBOUND = int(os.environ.get("OUTBOUND", "0"))

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        disable_nagle_algorithm = True  # headers and body are separate writes

        def do_GET(self):
            calls = {}
            if self.path != "/health":
                for callee in CALLS:
                    conn = http.client.HTTPConnection("127.0.0.1", OUTBOUND, timeout=10)
                    headers = {"Host": callee}
                    if self.headers.get("x-request-id"):
                        headers["x-request-id"] = self.headers["x-request-id"]
                    conn.request("GET", "/api/v1", headers=headers)
                    resp = conn.getresponse()
                    calls[callee] = [resp.status, json.loads(resp.read())]
                    conn.close()
            body = json.dumps({
                "service": NAME,
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
    require_external(_envoy_available(), "Envoy")
    ports = free_ports(14)
    desc = _description(ports, concurrency=1)
    app = tmp_path / "app.py"
    app.write_text(_APP)
    with Supervisor(tmp_path / "run", grace_s=2) as sup:
        for service, sp in desc.services.items():
            env = {"NAME": service, "PORT": str(sp.app_port), "OUTBOUND": str(sp.outbound_port)}
            if service == "s0":
                env["CALLS"] = "s1,s2"
            sup.start(
                service,
                [sys.executable, str(app)],
                role="app",
                env=env,
                ready=http_ok(f"http://127.0.0.1:{sp.app_port}/health"),
            )
        configs = start_mesh(sup, desc, tmp_path / "envoy")
        sup.wait_ready(timeout_s=30)
        assert len(sup.roles()["sidecar"]) == 3 and len(sup.roles()["gateway"]) == 1

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
        assert _get(public, "/api/v1", {"Host": "s2"})[1]["service"] == "s2"
        unknown_status, _ = _get(desc.services["s0"].outbound_port, "/", {"Host": "s9"})
        assert unknown_status == 404
        assert _get(public, "/")[1]["request_id"] is None  # Envoy generated none

        counts = config.mesh_counts(desc)
        totals = {prefix: c["downstream_rq_total"] for prefix, c in counts.items()}
        assert totals == {
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
    assert set(configs) == {"sidecar-s0", "sidecar-s1", "sidecar-s2", "gateway"}
    for port in ports:
        wait_port_free(port, timeout_s=5)
    release_ports(ports)
