"""Sidecar routing rules: service resolution, least-outstanding worker choice, nearest node."""

from __future__ import annotations

from collections import Counter

from dpumesh.routing import WorkerTable, egress_target, host_service, nearest, split_prefix

KNOWN = {"s0", "s1", "ms-001"}


def test_host_service_forms():
    assert host_service("s1", KNOWN) == "s1"
    assert host_service("s1:8080", KNOWN) == "s1"
    assert host_service("S1.default.svc.cluster.local", KNOWN) == "s1"
    assert host_service("ms-001.mubench.svc", KNOWN) == "ms-001"
    assert host_service("127.0.0.1:5005", KNOWN) is None
    assert host_service(None, KNOWN) is None


def test_split_prefix():
    assert split_prefix("/s1/api/v1", KNOWN) == ("s1", "/api/v1")
    assert split_prefix("/s1", KNOWN) == ("s1", "/")
    assert split_prefix("/api/v1", KNOWN) == (None, "/api/v1")
    assert split_prefix("/ms-001/x", KNOWN) == ("ms-001", "/x")


def test_egress_target():
    t = egress_target("http://s1.default.svc.cluster.local:80/api/v1?a=b", KNOWN)
    assert (t.service, t.path) == ("s1", "/api/v1?a=b")
    t = egress_target("http://unknown-svc/x", KNOWN)
    assert (t.service, t.host, t.path) == ("unknown-svc", "unknown-svc", "/x")
    assert egress_target("s1/api", KNOWN).service == "s1"
    assert egress_target("http:///nohost", KNOWN) is None


def test_least_outstanding_and_rotation():
    table = WorkerTable()
    table.update([(1, "s1"), (2, "s1"), (3, "s2")])
    picks = Counter(table.pick("s1") for _ in range(10))
    assert set(picks) == {1, 2}  # ties rotate
    table.started(1)
    table.started(1)
    assert table.pick("s1") == 2
    table.finished(1)
    table.finished(1)
    assert table.pick("nope") is None


def test_update_reports_removed_and_remembers_services():
    table = WorkerTable(services=["s9"])
    table.update([(1, "s1"), (2, "s1")])
    assert table.update([(2, "s1")]) == [1]
    assert table.workers("s1") == [2]
    table.update([])
    assert table.workers("s1") == []
    assert {"s1", "s9"} <= table.known


def test_nearest_prefers_the_callers_own_node():
    assert nearest("n1", ["n0", "n1", "n2"]) == ("n1",)
    assert nearest("n1", ["n1", "n1"]) == ("n1",)


def test_nearest_else_every_other_node_in_order_once():
    assert nearest("n9", ["n2", "n0", "n2", "n1"]) == ("n2", "n0", "n1")
    assert nearest("n0", ["n1"]) == ("n1",)
    assert nearest("n0", []) == ()
    assert nearest("n0", ("n1", "n2")) == ("n1", "n2")  # any sequence
