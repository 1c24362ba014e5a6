"""The plain-HTTP runtime with real gunicorn processes on OS-assigned loopback ports."""

from __future__ import annotations

import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import ClassVar

import psutil
import pytest
import urllib3

from mubench.cell import Cell, Request
from mubench.http_app import SharedCounters
from mubench.internal import loader
from mubench.workmodel import load_workmodel
from tests.cellcases import REPO, check_seq_len_sampling, http_app_cli

SHARED_WORKMODELS = sorted((REPO.parent / "shared" / "workmodels").glob("*.json"))
SEED = 11
QUIET = {"loader": {"sleep_stress": {"run": False}, "mean_response_size": 1}}
SLEEPY = {"loader": {"sleep_stress": {"run": True, "sleep_time": 0.2}, "mean_response_size": 1}}

http = urllib3.PoolManager(retries=False, timeout=urllib3.Timeout(connect=5, read=60))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Cluster:
    """One `python -m mubench.http_app` per service, wired with --upstream, torn down cleanly."""

    def __init__(self, workmodel: Path, logs: Path) -> None:
        self.workmodel = workmodel
        self.logs = logs
        self.ports: dict[str, int] = {}
        self.procs: dict[str, subprocess.Popen] = {}

    def start(
        self, services: list[str], *extra: str, absent: tuple[str, ...] = (), wire: bool = True
    ) -> None:
        """Start `services` wired to each other with --upstream (unless `wire` is false).

        Calls to `absent` services go to a port nobody listens on.
        """
        self.ports = {svc: free_port() for svc in (*services, *absent)}
        upstreams = [f"--upstream={s}=http://127.0.0.1:{p}" for s, p in self.ports.items()]
        if not wire:
            upstreams = []
        for svc in services:
            log = open(self.logs / f"{svc}.log", "wb")  # noqa: SIM115 - owned by the child
            self.procs[svc] = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "mubench.http_app",
                    "--workmodel",
                    str(self.workmodel),
                    "--service",
                    svc,
                    "--port",
                    str(self.ports[svc]),
                    "--seed",
                    str(SEED),
                    *upstreams,
                    *extra,
                ],
                cwd=REPO,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
            log.close()
        for svc in services:
            self.wait_healthy(svc)

    def wait_healthy(self, svc: str, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.procs[svc].poll() is not None:
                raise AssertionError(f"{svc} exited: {(self.logs / f'{svc}.log').read_text()}")
            try:
                if self.get(svc, "/_mubench/health").status == 200:
                    return
            except urllib3.exceptions.HTTPError:
                time.sleep(0.1)
        raise AssertionError(f"{svc} not healthy after {timeout}s")

    def url(self, svc: str, path: str = "/") -> str:
        return f"http://127.0.0.1:{self.ports[svc]}{path}"

    def get(self, svc: str, path: str = "/", **headers: str) -> urllib3.BaseHTTPResponse:
        return http.request("GET", self.url(svc, path), headers=headers)

    def stats(self, svc: str) -> dict[str, int]:
        return json.loads(self.get(svc, "/_mubench/stats").data)

    def requests(self) -> Counter[str]:
        return Counter({svc: self.stats(svc)["requests"] for svc in self.procs})

    def stop(self, sig: signal.Signals = signal.SIGTERM) -> None:
        """Signal every service; assert it and all its workers are gone."""
        children = {
            svc: psutil.Process(p.pid).children(recursive=True) for svc, p in self.procs.items()
        }
        http.clear()  # idle keep-alive connections make gunicorn linger 2 s before exiting
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.send_signal(sig)
        leftovers = []
        for svc, proc in self.procs.items():
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
                leftovers.append(svc)
            _, alive = psutil.wait_procs(children[svc], timeout=5)
            for child in alive:
                child.kill()
            leftovers += [f"{svc} worker {c.pid}" for c in alive]
        self.procs.clear()
        assert not leftovers, f"not stopped by {sig.name}: {leftovers}"


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Callable[[dict | Path], Cluster]]:
    made: list[Cluster] = []

    def make(workmodel: dict | Path) -> Cluster:
        if isinstance(workmodel, dict):
            path = tmp_path / f"workmodel{len(made)}.json"
            path.write_text(json.dumps(workmodel))
            workmodel = path
        made.append(Cluster(workmodel, tmp_path))
        return made[-1]

    yield make
    for c in made:
        c.stop()


# -- every real workmodel serves ----------------------------------------------------------


@pytest.mark.parametrize("path", SHARED_WORKMODELS, ids=lambda p: p.stem)
def test_real_workmodel_serves_through_the_entry_service(cluster, path: Path) -> None:
    services = list(load_workmodel(str(path)))
    cell = Cell(load_workmodel(str(path)), "s0", seed=SEED)
    c = cluster(path)
    c.start(services, "--scale", "0.01")  # process cap: defaults
    planned: Counter[str] = Counter()
    for rid in ("smoke-1", "smoke-2"):
        response = c.get("s0", "/", **{"x-request-id": rid})
        assert response.status == 200, response.data[:200]
        assert len(response.data) >= 1
        plan = cell.plan(Request("GET", headers={"x-request-id": rid}))
        planned.update(call.service for group in plan.groups for call in group)
    assert c.stats("s0") == {
        "service": "s0",
        "requests": 2,
        "errors": 0,
        "downstream_calls": planned.total(),
        "calls": dict(planned),
    }


# -- one topology, several behaviours (?bid=) ---------------------------------------------

TOPOLOGY = {
    "s0": {
        "internal_service": QUIET,
        "external_services": [
            {"seq_len": 1, "services": ["s1"]},
            {"seq_len": 1, "services": ["s2"]},
        ],
        "alternative_behaviors": {
            "seq": {"external_services": [{"seq_len": 2, "services": ["s1", "s2"]}]},
            "sample": {"external_services": [{"seq_len": 2, "services": ["s3", "s4", "s5", "s6"]}]},
            "prob": {
                "external_services": [
                    {"seq_len": 9, "services": ["s3", "s4"], "probabilities": {"s3": 0, "s4": 1}}
                ]
            },
            "dead": {"external_services": [{"seq_len": 1, "services": ["sdead"]}]},
            "fail": {"external_services": [{"seq_len": 1, "services": ["sfail"]}]},
        },
    },
    "s1": {"internal_service": SLEEPY},
    "s2": {"internal_service": SLEEPY},
    **{f"s{i}": {"internal_service": QUIET} for i in range(3, 7)},
    "sfail": {
        "internal_service": QUIET,
        "external_services": [{"seq_len": 1, "services": ["sdead"]}],
    },
    "sdead": {"internal_service": QUIET},
}
RUNNING = ["s0", "s1", "s2", "s3", "s4", "s5", "s6", "sfail"]


@pytest.fixture(scope="module")
def topo(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    tmp = tmp_path_factory.mktemp("topo")
    path = tmp / "workmodel.json"
    path.write_text(json.dumps(TOPOLOGY))
    c = Cluster(path, tmp)
    try:
        c.start(RUNNING, "--workers", "1", "--threads", "8", absent=("sdead",))
        yield c
    finally:
        c.stop()


def timed(c: Cluster, query: str, runs: int = 5) -> float:
    c.get("s0", f"/api/v1?{query}")  # warm the keep-alive connections
    durations = []
    for _ in range(runs):
        start = time.perf_counter()
        assert c.get("s0", f"/api/v1?{query}").status == 200
        durations.append(time.perf_counter() - start)
    return statistics.median(durations)


def test_groups_run_in_parallel(topo: Cluster) -> None:
    assert 0.19 <= timed(topo, "bid=default") < 0.34  # two 200 ms callees, one each group


def test_calls_in_a_group_are_sequential(topo: Cluster) -> None:
    assert 0.39 <= timed(topo, "bid=seq") < 0.6


def test_seq_len_sampling_matches_the_cell_core(topo: Cluster) -> None:
    check_seq_len_sampling(
        topo.workmodel,
        SEED,
        lambda rid: topo.get("s0", "/api/v1?bid=sample", **{"x-request-id": rid}).status,
        topo.requests,
    )


def test_probability_zero_never_and_one_always(topo: Cluster) -> None:
    before = topo.requests()
    for _ in range(10):
        assert topo.get("s0", "/?bid=prob").status == 200
    delta = topo.requests() - before
    assert (delta["s3"], delta["s4"]) == (0, 10)


def test_trace_post_calls_exactly_the_services_in_the_trace(topo: Cluster) -> None:
    trace = {"s0": [{"s3": {}, "s4": [{"s5": {}}]}, {"s6": {}}]}
    before = {svc: topo.stats(svc) for svc in RUNNING}
    response = http.request(
        "POST",
        topo.url("s0", "/api/v1"),
        body=json.dumps(trace),
        headers={"content-type": "application/json"},
    )
    assert response.status == 200
    after = {svc: topo.stats(svc) for svc in RUNNING}
    requests = {svc: after[svc]["requests"] - before[svc]["requests"] for svc in RUNNING}
    assert requests == {"s0": 1, "s1": 0, "s2": 0, "s3": 1, "s4": 1, "s5": 1, "s6": 1, "sfail": 0}
    calls = {
        svc: after[svc]["downstream_calls"] - before[svc]["downstream_calls"] for svc in RUNNING
    }
    assert (calls["s0"], calls["s4"], calls["s3"]) == (3, 1, 0)
    per_callee = {
        svc: Counter(after[svc]["calls"]) - Counter(before[svc]["calls"]) for svc in RUNNING
    }
    assert per_callee["s0"] == {"s3": 1, "s4": 1, "s6": 1}
    assert per_callee["s4"] == {"s5": 1}
    assert per_callee["s3"] == {}


def test_bad_trace_is_400(topo: Cluster) -> None:
    response = http.request("POST", topo.url("s0"), body=b'{"s9": []}')
    assert response.status == 400


@pytest.mark.parametrize("bid", ["dead", "fail"])
def test_downstream_failure_gives_500(topo: Cluster, bid: str) -> None:
    """`dead`: callee port closed; `fail`: callee answers 500 (its own callee is dead)."""
    errors = topo.stats("s0")["errors"]
    response = topo.get("s0", f"/?bid={bid}")
    assert response.status == 500
    assert topo.stats("s0")["errors"] == errors + 1


def test_response_body_is_reproducible_from_seed_and_request_id(topo: Cluster) -> None:
    workmodel = load_workmodel(str(topo.workmodel))
    plan = Cell(workmodel, "s3", seed=SEED).plan(Request("GET", headers={"x-request-id": "abc"}))
    expected = loader(plan.params, plan.rng)
    for _ in range(2):
        response = topo.get("s3", "/api/v1", **{"x-request-id": "abc", "x-b3-traceid": "t1"})
        assert response.data.decode() == expected
        assert response.headers["x-b3-traceid"] == "t1"


# -- egress proxy, stats across workers, shutdown, CLI --------------------------------------


class _RecordingProxy(BaseHTTPRequestHandler):
    """Records every request (Host, path, request id) and counts them per server port."""

    seen: ClassVar[list[tuple[str, str, str | None]]] = []
    hits: ClassVar[Counter[int]] = Counter()

    def do_GET(self) -> None:
        self.seen.append((self.headers["Host"], self.path, self.headers["x-request-id"]))
        self.hits[self.server.server_port] += 1
        self.send_response(200)
        self.send_header("content-length", "2")
        self.end_headers()
        self.wfile.write(b"ok")

    def log_message(self, *args: object) -> None:
        pass


def test_egress_proxy_gets_every_call_with_the_callee_as_host(cluster) -> None:
    _RecordingProxy.seen.clear()
    proxy = ThreadingHTTPServer(("127.0.0.1", 0), _RecordingProxy)
    threading.Thread(target=proxy.serve_forever, daemon=True).start()
    try:
        c = cluster(REPO / "workmodels" / "default.json")
        proxy_url = f"http://127.0.0.1:{proxy.server_port}"
        c.start(["s0"], "--workers", "1", "--egress-proxy", proxy_url, wire=False)
        assert c.get("s0", "/", **{"x-request-id": "via-proxy"}).status == 200
        assert sorted(_RecordingProxy.seen) == [
            ("s1", "/api/v1", "via-proxy"),
            ("s2", "/api/v1", "via-proxy"),
        ]
    finally:
        proxy.shutdown()
        proxy.server_close()


def test_several_upstreams_of_one_service_take_turns(cluster) -> None:
    peers = [ThreadingHTTPServer(("127.0.0.1", 0), _RecordingProxy) for _ in range(2)]
    for peer in peers:
        threading.Thread(target=peer.serve_forever, daemon=True).start()
    try:
        c = cluster(
            {
                "s0": {
                    "internal_service": QUIET,
                    "external_services": [{"seq_len": 1, "services": ["s1"]}],
                },
                "s1": {"internal_service": QUIET},
            }
        )
        urls = [f"--upstream=s1=http://127.0.0.1:{p.server_port}" for p in peers]
        c.start(["s0"], "--workers", "1", *urls, wire=False)  # one process: one rotation
        for _ in range(6):
            assert c.get("s0").status == 200
        assert [_RecordingProxy.hits[p.server_port] for p in peers] == [3, 3]
        stats = c.stats("s0")
        assert (stats["downstream_calls"], stats["calls"]) == (6, {"s1": 6})
    finally:
        for peer in peers:
            peer.shutdown()
            peer.server_close()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=lambda s: s.name)
def test_stats_sum_over_workers_and_signals_stop_everything(cluster, sig) -> None:
    c = cluster({"s0": {"internal_service": {"loader": {"sleep_stress": {"sleep_time": 0.05}}}}})
    c.start(["s0"], "--workers", "2", "--threads", "2")
    arbiter = psutil.Process(c.procs["s0"].pid)
    deadline = time.monotonic() + 20
    while len(arbiter.children()) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)  # healthy = one worker up; the second may still be booting
    assert len(arbiter.children()) == 2

    def hit() -> None:
        fresh = urllib3.PoolManager(retries=False)  # a new connection each time
        assert fresh.request("GET", c.url("s0")).status == 200

    threads = [threading.Thread(target=hit) for _ in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert c.stats("s0") == {
        "service": "s0",
        "requests": 16,
        "errors": 0,
        "downstream_calls": 0,
        "calls": {},
    }
    c.stop(sig)


def test_shared_counters_sum_over_forked_processes_and_survive_their_death() -> None:
    class TwoSlots(SharedCounters):
        SLOTS = 2

    counters = TwoSlots(callees=["s1", "s2", "s3"])
    for n in range(4):  # more processes than slots: dead owners' slots are taken over
        pid = os.fork()
        if pid == 0:
            for _ in range(100):
                counters.add("requests")
            counters.add("errors")
            counters.add_call("s1")
            for _ in range(n):
                counters.add_call("s2")
            os._exit(0)
        os.waitpid(pid, 0)
    assert counters.snapshot() == {
        "requests": 400,
        "errors": 4,
        "downstream_calls": 10,
        "calls": {"s1": 4, "s2": 6},  # callees never called are left out
    }


def test_cli_help() -> None:
    proc = http_app_cli("--help")
    assert proc.returncode == 0
    for option in ("--workmodel", "--service", "--port", "--egress-proxy", "--upstream", "--scale"):
        assert option in proc.stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--service", "s9"], "no service 's9'"),
        (["--service", "s0", "--upstream", "s7=http://127.0.0.1:1"], "not in the workmodel: s7"),
        (["--service", "s0", "--scale", "-1"], "--scale must be a finite number >= 0, got -1.0"),
        (["--service", "s0", "--scale", "nan"], "--scale must be a finite number >= 0, got nan"),
    ],
)
def test_cli_configuration_errors_exit_2_in_one_line(args: list[str], message: str) -> None:
    proc = http_app_cli(
        "--workmodel", str(REPO / "workmodels" / "default.json"), "--port", "1", *args
    )
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and message in proc.stderr, proc.stderr
