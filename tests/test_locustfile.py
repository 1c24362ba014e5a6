"""loadtests/: options, slots, recording, the JSON client, and real Locust runs.

Locust monkey-patches the interpreter with gevent when imported, so nothing
here imports `locust` or `loadtests.locustfile`: the Locust runs are
subprocesses (``python -m locust ...``) against `tests/loadgen_server.py`, a
tiny counting server (HTTP keep-alive and the seed JSON protocol on one port)
started per test. Every run is bounded (``-t``, subprocess timeouts).
"""

from __future__ import annotations

import argparse
import http.client
import itertools
import json
import os
import selectors
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from loadtests import latency, seedjson
from loadtests import options as opts
from loadtests.recorder import FAIL_CONNECTION, FAIL_STATUS, Recorder
from loadtests.schedule import SlotSchedule, WakeupBias, reference_ns
from tests.conftest import stop_process

ROOT = Path(__file__).resolve().parents[1]
LOCUSTFILE = "loadtests/locustfile.py"
SERVER = ROOT / "tests" / "loadgen_server.py"


# --- options ----------------------------------------------------------------------


def test_options_defaults_and_trace(tmp_path):
    o = opts.from_namespace(None)
    assert (o.request_mode, o.method, o.path, o.body) == ("get", "GET", "/", b"")
    assert not o.open_loop and o.request_id_prefix == "req-"
    ns = argparse.Namespace(request_mode="trace", trace_json=None, open_loop_rate="250")
    o = opts.from_namespace(ns)
    assert o.method == "POST" and o.open_loop and o.open_loop_rate == 250.0
    assert json.loads(o.body) == opts.DEFAULT_TRACE
    trace_file = tmp_path / "t.json"
    trace_file.write_text('{"s0": [{"s3": {}}]}')
    o = opts.from_namespace(argparse.Namespace(request_mode="TRACE", trace_json=f"@{trace_file}"))
    assert o.body == b'{"s0":[{"s3":{}}]}'


@pytest.mark.parametrize(
    "ns",
    [
        {"request_mode": "put"},
        {"open_loop_rate": -1},
        {"open_loop_rate": "fast"},
        {"warmup_s": float("nan")},
        {"request_path": "api"},
        {"request_mode": "trace", "trace_json": "{bad"},
        {"request_mode": "trace", "trace_json": "[1, 2]"},
        {"request_mode": "trace", "trace_json": "@/nonexistent/trace.json"},
    ],
)
def test_options_rejected(ns):
    with pytest.raises(opts.OptionError):
        opts.from_namespace(argparse.Namespace(**ns))


# --- slots -------------------------------------------------------------------------


class FakeClock:
    def __init__(self, t: int = 1_000_000_000) -> None:
        self.t = t

    def __call__(self) -> int:
        return self.t


def test_closed_loop_slots_are_numbered_per_process():
    s = SlotSchedule(0, index=1, count=3, clock=FakeClock())
    slots = [s.next_slot() for _ in range(4)]
    assert [x.seq for x in slots] == [1, 4, 7, 10]
    assert all(x.intended_ns is None for x in slots)


def test_open_loop_slots_across_processes():
    clock = FakeClock()
    rate, procs = 200.0, 3
    schedules = [SlotSchedule(rate, index=w, count=procs, clock=clock) for w in range(procs)]
    taken = {w: [s.next_slot() for _ in range(50)] for w, s in enumerate(schedules)}
    seqs = sorted(x.seq for slots in taken.values() for x in slots)
    assert seqs == list(range(150))  # disjoint, nothing skipped
    for w, slots in taken.items():
        for x in slots:
            assert x.seq % procs == w
            assert x.intended_ns == clock.t + round(x.seq * 1e9 / rate)
        gaps = {b.intended_ns - a.intended_ns for a, b in itertools.pairwise(slots)}
        assert gaps == {15_000_000}  # P / R apart within a process
    with pytest.raises(ValueError):
        SlotSchedule(10, index=2, count=2)


def test_reference_time():
    assert reference_ns(None, 500) == 500  # closed loop: actual send
    assert reference_ns(100, 500) == 100  # late: from the intended time
    assert reference_ns(600, 500) == 500  # early wake-up: from the actual send


def test_wakeup_bias_learns_timer_lateness():
    bias = WakeupBias()
    for _ in range(200):
        asked = bias.sleep_s(10_000_000, 0)
        bias.observe(asked, 0, int(asked * 1e9) + 900_000)  # timers fire 0.9 ms late
    assert bias.bias_ns == pytest.approx(900_000, rel=0.01)
    assert bias.sleep_s(10_000_000, 0) == pytest.approx(0.0091, rel=0.01)
    assert bias.sleep_s(100, 0) == 0.0


# --- recorder ----------------------------------------------------------------------


def _recorder(rate=0.0, warmup_s=0.0):
    mono = FakeClock(5_000_000_000)
    rec = Recorder(clock_ns=mono, wall_ns=lambda: mono.t + 1_700_000_000_000_000_000)
    rec.reset(intended_rate=rate, warmup_s=warmup_s, mode="open" if rate else "closed")
    return rec


def test_recorder_counts_and_latency(tmp_path):
    rec = _recorder(rate=100.0)
    ms = 1_000_000
    # slot at 0 ms sent on time, 2 ms latency; slot at 10 ms sent 5 ms late
    rec.sent(0, 0)
    rec.done(reference_ns(0, 0), 0, 2 * ms)
    rec.sent(10 * ms, 15 * ms)
    rec.done(reference_ns(10 * ms, 15 * ms), 15 * ms, 17 * ms)
    rec.sent(20 * ms, 20 * ms)
    rec.done(20 * ms, 20 * ms, 21 * ms, FAIL_STATUS)
    rec.sent(30 * ms, 30 * ms)
    rec.done(30 * ms, 30 * ms, 31 * ms, FAIL_CONNECTION)
    rec.sent(40 * ms, 40 * ms)  # in flight at stop
    s = rec.summary()
    assert s["requests"] == 4 and s["failures"] == 2
    assert s["failures_status"] == 1 and s["failures_connection"] == 1
    assert s["histogram_count"] == 2
    assert s["started_total"] == 5 and s["completed_total"] == 4 and s["in_flight_at_stop"] == 1
    lat = latency.summarize(rec.hist)
    assert lat.min_us == 2000 and 7000 <= lat.max_us <= 7008  # 7 ms: queueing counted
    service = latency.summarize(rec.service)
    assert 2000 <= service.max_us <= 2002  # actual send -> done
    assert s["send_lag_us"]["max"] >= 5000
    assert s["window_s"] == pytest.approx(0.031)
    assert s["achieved_rps"] == pytest.approx(4 / 0.031)
    hist_path, side_path = rec.write(tmp_path / "lat.hdr")
    assert side_path.name == "lat.hdr.json"
    side = json.loads(side_path.read_text())
    assert side["mode"] == "open" and side["intended_rate"] == 100.0
    assert latency.load_histogram(hist_path).get_total_count() == 2
    assert latency.decode(side["service_time_hdr"]).get_total_count() == 2


def test_recorder_warmup_and_clamping():
    rec = _recorder(warmup_s=1.0)
    s_ns = 1_000_000_000
    rec.sent(None, 0)
    rec.done(0, 0, 1000)  # inside the warm-up: not recorded
    rec.sent(None, 2 * s_ns)
    rec.done(2 * s_ns, 2 * s_ns, 2 * s_ns + 500)  # 0.5 µs -> clamped up to 1 µs bucket
    rec.sent(None, 3 * s_ns)
    rec.done(3 * s_ns, 3 * s_ns, 3 * s_ns + 70 * s_ns)  # 70 s -> clamped to 60 s
    s = rec.summary()
    assert s["completed_total"] == 3 and s["requests"] == 2
    assert s["clamped"] == 1
    assert rec.hist.get_total_count() == 2


# --- seed JSON client --------------------------------------------------------------


def _one_shot_server(handler):
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)

    def run():
        conn, _ = srv.accept()
        with conn:
            handler(conn)
        srv.close()

    threading.Thread(target=run, daemon=True).start()
    return srv.getsockname()[1]


def _read_json(conn):
    buf = b""
    while not buf.rstrip().endswith(b"}"):
        buf += conn.recv(4096)
    return json.loads(buf)


def test_seedjson_exchange_split_reply():
    got = {}

    def handler(conn):
        got["req"] = _read_json(conn)
        got["nodelay"] = conn.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
        reply = json.dumps({"req_id": 7, "status": 200, "headers": {}, "body": "é" * 10}).encode()
        conn.sendall(reply[:11])
        time.sleep(0.05)
        conn.sendall(reply[11:])
        time.sleep(0.2)  # keep the connection open: the client must stop at the object's end

    port = _one_shot_server(handler)
    payload = seedjson.encode_request("POST", "/api", {"x-request-id": "r1"}, '{"s0": []}')
    reply = seedjson.exchange("127.0.0.1", port, payload, timeout_s=10)
    assert reply["status"] == 200 and reply["body"] == "é" * 10
    assert got["req"] == {
        "method": "POST",
        "path": "/api",
        "headers": {"x-request-id": "r1"},
        "body": '{"s0": []}',
        "query_string": "",
    }


@pytest.mark.parametrize(
    "reply",
    [b"", b'{"status": 200', b'{"status": "200"}', b"[1, 2]"],
)
def test_seedjson_bad_replies(reply):
    def handler(conn):
        _read_json(conn)
        conn.sendall(reply)

    port = _one_shot_server(handler)
    with pytest.raises(seedjson.ProtocolError):
        seedjson.exchange("127.0.0.1", port, seedjson.encode_request("GET", "/", {}), 10)


# --- real Locust runs --------------------------------------------------------------


class Server:
    def __init__(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, str(SERVER)], stdout=subprocess.PIPE, text=True, cwd=ROOT
        )
        sel = selectors.DefaultSelector()
        sel.register(self.proc.stdout, selectors.EVENT_READ)
        if not sel.select(timeout=30):
            self.close()
            raise RuntimeError("test server did not start")
        line = self.proc.stdout.readline().split()
        assert line[0] == "PORT", line
        self.port = int(line[1])
        self.url = f"http://127.0.0.1:{self.port}"

    def stats(self) -> dict:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        try:
            conn.request("GET", "/_stats")
            return json.loads(conn.getresponse().read())
        finally:
            conn.close()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@pytest.fixture
def server():
    srv = Server()
    try:
        yield srv
    finally:
        srv.close()


def _locust_cmd(*args: str, locustfile: str = LOCUSTFILE) -> list[str]:
    return [sys.executable, "-m", "locust", "-f", locustfile, "--only-summary", *args]


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONUNBUFFERED": "1"}


def run_locust(*args: str, locustfile: str = LOCUSTFILE, timeout: float = 60, ok=(0,)):
    res = subprocess.run(
        _locust_cmd(*args, locustfile=locustfile),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=_env(),
    )
    assert res.returncode in ok, f"locust exited {res.returncode}:\n{res.stderr[-4000:]}"
    return res


def headless(server: Server, users: int, seconds: int, *args: str) -> list[str]:
    return [
        "--headless",
        "-u",
        str(users),
        "-r",
        str(users),
        "-t",
        f"{seconds}s",
        "--host",
        server.url,
        *args,
    ]


def _check_counts(side: dict, stats: dict, proto: str) -> None:
    """Generator and server agree (± requests in flight when the test stopped)."""
    assert side["completed_total"] <= stats[proto] <= side["started_total"]
    assert side["requests"] == side["completed_total"]  # no warm-up in these runs
    assert stats["dup_ids"] == 0 and stats["no_id"] == 0  # every x-request-id unique
    assert stats["ids"] == stats[proto]


def _sane(summary: latency.LatencySummary) -> None:
    assert summary.count > 0
    assert 0 < summary.min_us <= summary.p50_us <= summary.p90_us <= summary.p99_us
    assert summary.p99_us <= summary.p999_us <= summary.max_us


@pytest.mark.e2e
def test_closed_loop_http(server, tmp_path):
    hdr = tmp_path / "lat.hdr"
    run_locust(
        *headless(server, 4, 3),
        "--hdr-out",
        str(hdr),
        "--json-file",
        str(tmp_path / "locust"),  # Locust appends .json
        "HttpMeshUser",
    )
    stats = server.stats()
    hist, side = latency.load_run(hdr)
    assert side["files"] == [str(hdr)]
    one = latency.load_sidecar(hdr)
    assert one["mode"] == "closed" and one["user_classes"] == ["HttpMeshUser"]
    assert one["failures"] == 0 and one["worker_index"] is None
    assert hist.get_total_count() == one["requests"] > 100
    _check_counts(one, stats, "http")
    assert stats["json"] == 0
    summary = latency.summarize(hist)
    _sane(summary)
    # Locust's own stats saw the same requests with the same (unrounded) latencies
    entry = next(e for e in json.loads((tmp_path / "locust.json").read_text()) if e["name"] == "/")
    assert entry["num_requests"] == one["requests"] and entry["num_failures"] == 0
    locust_mean_us = entry["total_response_time"] / entry["num_requests"] * 1000
    assert locust_mean_us == pytest.approx(summary.mean_us, rel=0.02)


@pytest.mark.e2e
def test_json_user_trace_mode(server, tmp_path):
    hdr = tmp_path / "json.hdr"
    run_locust(
        *headless(server, 2, 2), "--hdr-out", str(hdr), "--request-mode", "trace", "JsonMeshUser"
    )
    stats = server.stats()
    hist, _ = latency.load_run(hdr)
    side = latency.load_sidecar(hdr)
    assert side["request_mode"] == "trace" and side["user_classes"] == ["JsonMeshUser"]
    assert side["failures"] == 0 and stats["http"] == 0
    _check_counts(side, stats, "json")
    assert hist.get_total_count() == side["requests"] > 50
    _sane(latency.summarize(hist))


@pytest.mark.e2e
def test_failures_are_counted_not_recorded(server, tmp_path):
    hdr = tmp_path / "fail.hdr"
    res = run_locust(
        *headless(server, 2, 2),
        "--hdr-out",
        str(hdr),
        "--request-path",
        "/fail",
        "HttpMeshUser",
        "JsonMeshUser",
        ok=(1,),  # Locust's exit code when requests failed
    )
    side = latency.load_sidecar(hdr)
    assert side["requests"] > 10
    assert side["failures"] == side["failures_status"] == side["requests"]
    assert side["failures_connection"] == 0
    assert latency.load_histogram(hdr).get_total_count() == 0
    stats = server.stats()
    assert stats["http"] > 0 and stats["json"] > 0
    assert "StatusError('HTTP 500')" in res.stderr + res.stdout


@pytest.mark.e2e
def test_open_loop_achieves_offered_rate(server, tmp_path):
    hdr = tmp_path / "open.hdr"
    run_locust(
        *headless(server, 8, 5), "--hdr-out", str(hdr), "--open-loop-rate", "200", "HttpMeshUser"
    )
    stats = server.stats()
    hist, merged = latency.load_run(hdr)
    side = latency.load_sidecar(hdr)
    assert side["mode"] == "open" and side["intended_rate"] == 200.0
    _check_counts(side, stats, "http")
    _sane(latency.summarize(hist))
    # achieved within 2 % of offered (the schedule runs from the first request)
    assert merged["achieved_rps"] == pytest.approx(200.0, rel=0.02), side
    assert side["requests"] == pytest.approx(200 * side["window_s"], rel=0.02)


@pytest.mark.e2e
def test_open_loop_shows_a_server_stall(server, tmp_path):
    """A 1 s SIGSTOP of the server must show in p99 (no coordinated omission)."""
    hdr = tmp_path / "stall.hdr"
    cmd = _locust_cmd(
        *headless(server, 20, 5), "--hdr-out", str(hdr), "--open-loop-rate", "200", "HttpMeshUser"
    )
    proc = subprocess.Popen(
        cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env()
    )
    try:
        deadline = time.monotonic() + 30
        while server.stats()["http"] < 150:  # ~0.75 s of traffic before the stall
            assert proc.poll() is None and time.monotonic() < deadline, "no traffic"
            time.sleep(0.05)
        os.kill(server.proc.pid, signal.SIGSTOP)
        try:
            time.sleep(1.0)
        finally:
            os.kill(server.proc.pid, signal.SIGCONT)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, err[-4000:]
    summary = latency.summarize(latency.load_run(hdr)[0])
    side = latency.load_sidecar(hdr)
    assert summary.p99_us >= 900_000, summary
    assert summary.max_us >= 950_000, summary
    assert side["failures"] == 0
    # the requests sent after the stall were late, and that is visible too
    assert side["send_lag_us"]["max"] >= 500_000


@pytest.mark.e2e
def test_distributed_two_processes_merge_exactly(server, tmp_path):
    hdr = tmp_path / "dist.hdr"
    run_locust(
        *headless(server, 4, 4),
        "--processes",
        "2",
        "--hdr-out",
        str(hdr),
        "--open-loop-rate",
        "100",
        "HttpMeshUser",
        timeout=90,
    )
    files = latency.histogram_files(hdr)
    assert [f.name for f in files] == ["dist.w0.hdr", "dist.w1.hdr"]
    parts = [latency.load_histogram(f) for f in files]
    sides = [latency.load_sidecar(f) for f in files]
    assert sorted((s["slot_index"], s["slot_count"]) for s in sides) == [(0, 2), (1, 2)]
    assert sorted(s["worker_index"] for s in sides) == [0, 1]
    assert all(p.get_total_count() > 50 for p in parts)
    hist, merged = latency.load_run(hdr)
    assert hist.get_total_count() == sum(p.get_total_count() for p in parts)
    assert merged["requests"] == sum(s["requests"] for s in sides)
    stats = server.stats()
    # the two processes' x-request-ids (slots) never collide
    assert stats["dup_ids"] == 0 and stats["ids"] == stats["http"]
    assert merged["completed_total"] <= stats["http"] <= merged["started_total"]
    assert merged["achieved_rps"] == pytest.approx(100.0, rel=0.05), merged


@pytest.mark.e2e
def test_step_shape_is_opt_in(server, tmp_path):
    hdr = tmp_path / "step.hdr"
    started = time.monotonic()
    run_locust(
        "--headless",
        "--host",
        server.url,
        "--hdr-out",
        str(hdr),
        "--csv",
        str(tmp_path / "step"),
        "--step-users",
        "2",
        "--step-time",
        "1",
        "--step-count",
        "2",
        "HttpMeshUser",
        locustfile=f"{LOCUSTFILE},loadtests/step_shape.py",
    )
    assert time.monotonic() - started < 30  # the shape ended the test by itself
    history = (tmp_path / "step_stats_history.csv").read_text().splitlines()
    col = history[0].split(",").index("User Count")
    counts = {int(line.split(",")[col]) for line in history[1:]}
    assert max(counts) == 4  # two steps of two users
    assert latency.load_sidecar(hdr)["requests"] > 0


@pytest.mark.e2e
def test_invalid_options_exit_early():
    res = run_locust(
        "--headless",
        "-t",
        "5s",
        "--host",
        "http://127.0.0.1:9",
        "--request-mode",
        "trace",
        "--trace-json",
        "{bad",
        ok=(2,),
        timeout=30,
    )
    assert "--trace-json is not valid JSON" in res.stderr


_NODELAY_PROBE = """
import json, socket, sys
sys.path.insert(0, sys.argv[2])
from loadtests import locustfile as lf
import locust
from locust.env import Environment
from geventhttpclient import HTTPClient

host = sys.argv[1]
env = Environment(user_classes=[lf.HttpMeshUser], host=host, events=locust.events)
lf.HttpMeshUser.host = host
user = lf.HttpMeshUser(env)
user.request()
pool = user.client.client.clientpool
socks = [s for c in pool.clients.values() for s in c._connection_pool._socket_queue.queue]
plain = HTTPClient.from_url(host)
plain.get("/").read()
def opt(s):
    return s.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
print(json.dumps({
    "user": [opt(s) for s in socks],
    "plain": [opt(s) for s in plain._connection_pool._socket_queue.queue],
    "pool": type(pool).__name__,
    "completed": lf.state(env).recorder.completed_total,
}))
"""


@pytest.mark.e2e
def test_tcp_nodelay_on_fasthttp_connections(server):
    res = subprocess.run(
        [sys.executable, "-c", _NODELAY_PROBE, server.url, str(ROOT)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert out["pool"] == "NodelayHTTPClientPool" and out["completed"] == 1
    assert out["user"] == [1]  # the user's pooled keep-alive connection has TCP_NODELAY
    assert out["plain"] == [0]  # geventhttpclient alone does not set it (the probe discriminates)


@pytest.mark.e2e
def test_web_ui_parameters(server, tmp_path):
    """Custom options show in the web UI and a swarm started there uses them."""
    web_port = _free_port()
    hdr = tmp_path / "ui.hdr"
    proc = subprocess.Popen(
        _locust_cmd(
            "--host",
            server.url,
            "--web-host",
            "127.0.0.1",
            "--web-port",
            str(web_port),
            "--hdr-out",
            str(hdr),
        ),
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=_env(),
    )
    try:
        page = _http(web_port, "GET", "/", deadline_s=30)
        for name in (
            "request_mode",
            "open_loop_rate",
            "hdr_out",
            "request_id_prefix",
            "trace_json",
            "warmup_s",
        ):
            assert name in page, name
        assert "mesh_status_url" not in page  # set by serve --locust-ui, not in the form
        form = "user_count=2&spawn_rate=2&host=" + server.url + "&open_loop_rate=50"
        assert json.loads(_http(web_port, "POST", "/swarm", form))["success"] is True
        deadline = time.monotonic() + 20
        while server.stats()["http"] < 40:
            assert time.monotonic() < deadline, "UI swarm sent no traffic"
            time.sleep(0.1)
        _http(web_port, "POST", "/stop", "")
        deadline = time.monotonic() + 20
        while not latency.sidecar_path(hdr).exists():
            assert time.monotonic() < deadline, "no histogram after stop"
            time.sleep(0.1)
        side = latency.load_sidecar(hdr)
        assert side["intended_rate"] == 50.0 and side["mode"] == "open"
        assert side["requests"] > 0
        mesh = json.loads(_http(web_port, "GET", "/mesh/stats"))  # the Mesh tab's numbers
        assert mesh["latency_us"]["count"] == side["histogram_count"]  # the same histogram
        assert mesh["latency_us"]["failures"] == side["failures"]
        assert mesh["load"] == {"loop": "open", "open_loop_rate": 50.0, "request_mode": "get"}
        assert mesh["mesh"] is None and "--mesh-status-url" in mesh["mesh_error"]
    finally:
        stop_process(proc)


@pytest.mark.e2e
def test_distributed_mesh_tab_merges_each_worker_once(server, tmp_path):
    """A master's Mesh tab: the workers' histograms, merged exactly, none counted twice."""
    web_port, closed_port = _free_port(), _free_port()  # nothing listens on closed_port
    hdr = tmp_path / "dist.hdr"
    with (tmp_path / "locust.log").open("wb") as log:
        proc = subprocess.Popen(
            _locust_cmd(
                *("--host", server.url, "--processes", "2", "--hdr-out", str(hdr)),
                *("--web-host", "127.0.0.1", "--web-port", str(web_port)),
                *("--mesh-status-url", f"http://127.0.0.1:{closed_port}/traffic"),
                "HttpMeshUser",
            ),
            cwd=ROOT,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=_env(),
        )
    try:
        _http(web_port, "GET", "/", deadline_s=30)
        deadline = time.monotonic() + 30
        while json.loads(_http(web_port, "GET", "/stats/requests")).get("worker_count") != 2:
            assert time.monotonic() < deadline, "the workers did not connect"
            time.sleep(0.2)
        form = "user_count=4&spawn_rate=4&host=" + server.url + "&open_loop_rate=100"
        assert json.loads(_http(web_port, "POST", "/swarm", form))["success"] is True
        deadline = time.monotonic() + 30
        while (mesh := json.loads(_http(web_port, "GET", "/mesh/stats")))["latency_us"][
            "processes"
        ] < 2:
            assert time.monotonic() < deadline, f"no report from both workers: {mesh}"
            time.sleep(0.2)
        assert mesh["mesh"] is None  # an unreachable status endpoint is an error field
        assert mesh["mesh_error"].startswith("no reading at the test start")
        polled = json.loads(_http(web_port, "GET", "/stats/requests"))
        assert [t["key"] for t in polled["extended_stats"]] == ["mesh"]
        _http(web_port, "POST", "/stop", "")
        deadline = time.monotonic() + 20
        while len(latency.histogram_files(hdr)) < 2:
            assert time.monotonic() < deadline, "no worker histograms after stop"
            time.sleep(0.1)
        hist, merged = latency.load_run(hdr)
        # Workers report their final histogram every few seconds after the stop too.
        deadline = time.monotonic() + 20
        while (mesh := json.loads(_http(web_port, "GET", "/mesh/stats")))["latency_us"][
            "count"
        ] != hist.get_total_count():
            assert time.monotonic() < deadline, (mesh["latency_us"], hist.get_total_count())
            time.sleep(0.2)
        assert mesh["latency_us"] == {
            **latency.summarize(hist).as_dict(),
            "failures": merged["failures"],
            "processes": 2,
        }
    finally:
        stop_process(proc)


@pytest.mark.e2e
def test_runner_sees_test_stopping_before_locust_exits(server, tmp_path):
    """The runner's CPU window ends on Locust's event, read from the plugin's events file
    while Locust still runs; Locust's log is gone from the start, so nothing reads it."""
    from harness.run.loadgen import EventsFile, LocustRun, LocustSpec

    spec = LocustSpec(
        host=server.url,
        users=2,
        rate=None,
        excluded_s=0,
        measured_s=2,
        hdr_out=tmp_path / "hist" / "x.hdr",
        csv_prefix=tmp_path / "locust" / "x",
        request_id_prefix="x-",
    )
    with LocustRun(spec) as run:
        spec.log_path.unlink()  # Locust writes on into the unlinked file; no one can read it
        deadline = time.monotonic() + 60
        while not run.stopping():
            assert not run.exited(), "Locust exited before its test_stopping event was seen"
            assert time.monotonic() < deadline, "no test_stopping event"
            time.sleep(0.005)
        alive_when_seen = not run.exited()
        assert run.wait(60) == 0
        last = run.live()
    assert alive_when_seen
    events = EventsFile(spec.events_path).read()
    names = [e.name for e in events]
    assert names[0] == "test_start" and names[-3:] == ["test_stopping", "test_stop", "quitting"]
    assert "tick" in names[1:-3] and set(names[1:-3]) == {"tick"}
    assert [e.t for e in events] == sorted(e.t for e in events)  # Locust's order, by time
    counts = [e.live.requests for e in events]
    assert counts == sorted(counts) and counts[-1] > 0
    assert last == events[-1].live
    http = server.stats()["http"]
    assert last.requests <= http <= last.requests + spec.users  # ± requests in flight at stop
    assert not spec.log_path.exists()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _http(port: int, method: str, path: str, form: str | None = None, deadline_s: float = 10):
    deadline = time.monotonic() + deadline_s
    while True:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        try:
            headers = {"content-type": "application/x-www-form-urlencoded"} if form else {}
            conn.request(method, path, body=form, headers=headers)
            resp = conn.getresponse()
            return resp.read().decode("utf-8", "replace")
        except ConnectionRefusedError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)
        finally:
            conn.close()
