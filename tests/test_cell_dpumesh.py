"""The μBench cell on the DPUmesh runtime, with real daemons and worker processes.

The same behaviours `test_http_app.py` checks on the plain-HTTP runtime, so
both runtimes are held to one semantics (DESIGN §4). Requests per service are
read from the sidecar's own counters.
"""

from __future__ import annotations

import json
import statistics
import time
import urllib.error
import urllib.request
from collections import Counter
from pathlib import Path

import pytest

from mubench.cell import Cell, Request
from mubench.workmodel import load_workmodel, plan_processes
from tests.cellcases import check_seq_len_sampling
from tests.mesh import Mesh, shm_objects
from tests.test_http_app import RUNNING, SEED, SHARED_WORKMODELS, TOPOLOGY

pytestmark = pytest.mark.e2e


class DpuCluster:
    """A mesh serving every service of a workmodel with mubench.dpumesh_app."""

    def __init__(self, mesh: Mesh, workmodel: Path) -> None:
        self.mesh = mesh
        self.workmodel = workmodel

    def start(self, services: list[str], processes: dict[str, int], scale: float = 1.0):
        self.mesh.start_dpa()
        self.mesh.start_dpu(*(arg for svc in services for arg in ("--service", svc)))
        for svc in services:
            self.mesh.start_service(
                svc,
                processes=processes.get(svc, 1),
                app="mubench.dpumesh_app:app",
                MUBENCH_WORKMODEL=str(self.workmodel),
                MUBENCH_SEED=str(SEED),
                MUBENCH_SCALE=str(scale),
            )
        self.mesh.wait_workers({svc: processes.get(svc, 1) for svc in services}, timeout=60)

    def request(self, svc: str, path: str = "/", body: bytes | None = None, **headers: str):
        url = self.mesh.url(f"/{svc}{path}" if svc != "s0" else path)
        req = urllib.request.Request(url, data=body, headers=headers)
        try:
            with urllib.request.urlopen(req, timeout=60) as resp:
                return resp.status, resp.read()
        except urllib.error.HTTPError as err:
            return err.code, err.read()

    def requests(self) -> Counter[str]:
        services = self.mesh.stats()["services"]
        return Counter({svc: s["requests"] for svc, s in services.items()})


@pytest.fixture
def dpu_cluster(namespace, tmp_path):
    made: list[DpuCluster] = []

    def make(workmodel: dict | Path) -> DpuCluster:
        if isinstance(workmodel, dict):
            path = tmp_path / "workmodel.json"
            path.write_text(json.dumps(workmodel))
            workmodel = path
        made.append(DpuCluster(Mesh(namespace, tmp_path), workmodel))
        return made[-1]

    yield make
    for cluster in made:
        cluster.mesh.close()
    assert shm_objects(namespace) == []


@pytest.mark.slow
@pytest.mark.parametrize("path", SHARED_WORKMODELS, ids=lambda p: p.stem)
def test_real_workmodel_serves_through_the_entry_service(dpu_cluster, path: Path) -> None:
    workmodel = load_workmodel(str(path))
    plan, warnings = plan_processes(workmodel, per_service_cap=1, total_cap=24)
    assert warnings or all(workers == 1 for workers, _ in plan.values())
    cluster = dpu_cluster(path)
    cluster.start(list(workmodel), {svc: w for svc, (w, _t) in plan.items()}, scale=0.01)
    cell = Cell(workmodel, "s0", seed=SEED)
    planned: Counter[str] = Counter()
    for rid in ("smoke-1", "smoke-2"):
        status, body = cluster.request("s0", "/", **{"x-request-id": rid})
        assert status == 200, body[:200]
        for group in cell.plan(Request("GET", headers={"x-request-id": rid})).groups:
            planned.update(call.service for call in group)
    counts = cluster.requests()
    assert counts["s0"] == 2
    # First-level callees are called exactly as the core planned for these request ids.
    assert all(counts[svc] >= n for svc, n in planned.items())


@pytest.fixture(scope="module")
def topo(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dputopo")
    path = tmp / "workmodel.json"
    path.write_text(json.dumps(TOPOLOGY))
    mesh = Mesh(f"topo{int(time.time() * 1000) % 10**8}", tmp)
    cluster = DpuCluster(mesh, path)
    try:
        cluster.start(RUNNING, {})
        yield cluster
    finally:
        mesh.close()
    assert shm_objects(mesh.ns) == []


def timed(c: DpuCluster, query: str, runs: int = 5) -> float:
    c.request("s0", f"/api/v1?{query}")  # warm-up
    durations = []
    for _ in range(runs):
        start = time.perf_counter()
        assert c.request("s0", f"/api/v1?{query}")[0] == 200
        durations.append(time.perf_counter() - start)
    return statistics.median(durations)


def test_groups_run_in_parallel(topo) -> None:
    assert 0.19 <= timed(topo, "bid=default") < 0.34  # two 200 ms callees, one each group


def test_calls_in_a_group_are_sequential(topo) -> None:
    assert 0.39 <= timed(topo, "bid=seq") < 0.6


def test_seq_len_sampling_matches_the_cell_core(topo) -> None:
    check_seq_len_sampling(
        topo.workmodel,
        SEED,
        lambda rid: topo.request("s0", "/api/v1?bid=sample", **{"x-request-id": rid})[0],
        topo.requests,
    )


def test_probability_zero_never_and_one_always(topo) -> None:
    before = topo.requests()
    for _ in range(10):
        assert topo.request("s0", "/?bid=prob")[0] == 200
    delta = topo.requests() - before
    assert (delta["s3"], delta["s4"]) == (0, 10)


def test_trace_post_calls_exactly_the_services_in_the_trace(topo) -> None:
    trace = {"s0": [{"s3": {}, "s4": [{"s5": {}}]}, {"s6": {}}]}
    before = topo.requests()
    status, _ = topo.request(
        "s0", "/api/v1", body=json.dumps(trace).encode(), **{"content-type": "application/json"}
    )
    assert status == 200
    delta = topo.requests() - before
    assert delta == Counter({"s0": 1, "s3": 1, "s4": 1, "s5": 1, "s6": 1})


@pytest.mark.parametrize("bid", ["dead", "fail"])
def test_downstream_failure_gives_500(topo, bid: str) -> None:
    """`dead`: the callee has no worker (503 from the mesh); `fail`: the callee answers 500."""
    assert topo.request("s0", f"/?bid={bid}")[0] == 500


def test_same_decisions_as_the_http_runtime_for_the_same_request_id(topo) -> None:
    from mubench.internal import loader

    workmodel = load_workmodel(str(topo.workmodel))
    plan = Cell(workmodel, "s3", seed=SEED).plan(Request("GET", headers={"x-request-id": "abc"}))
    status, body = topo.request("s3", "/api/v1", **{"x-request-id": "abc"})
    assert (status, body.decode()) == (200, loader(plan.params, plan.rng))
