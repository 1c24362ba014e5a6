"""Service placement on nodes (`harness.stacks.topology`) and what the stacks make of it."""

from __future__ import annotations

import json

import pytest

from harness.names import DEFAULT_WORKMODEL, LOCAL_NODE, MESHES
from harness.stacks import describe
from harness.stacks.model import Settings
from harness.stacks.topology import parse_place, place
from mubench.workmodel import WorkmodelError

SERVICES = ("s0", "s1", "s2", "s3", "s4")


def test_round_robin_puts_the_entry_on_node_one():
    topology = place(SERVICES, "s0", 2)
    assert topology.nodes == ("node1", "node2")
    assert topology.instances == {
        "s0": ("node1",),
        "s1": ("node2",),
        "s2": ("node1",),
        "s3": ("node2",),
        "s4": ("node1",),
    }
    assert topology.isolated
    assert topology.services_on("node2") == ("s1", "s3")


def test_the_entry_goes_first_wherever_the_workmodel_lists_it():
    topology = place(("a", "b", "entry"), "entry", 3)
    assert topology.nodes_of("entry") == ("node1",)
    assert (topology.nodes_of("a"), topology.nodes_of("b")) == (("node2",), ("node3",))


def test_an_explicit_map_wins_and_the_rest_go_round_robin():
    topology = place(SERVICES, "s0", 3, parse_place("s1=1, s4=3"))
    assert topology.nodes_of("s1") == ("node1",)
    assert topology.nodes_of("s4") == ("node3",)
    # The others round robin among themselves: s0, s2, s3 on nodes 1, 2, 3.
    assert (topology.nodes_of("s2"), topology.nodes_of("s3")) == (("node2",), ("node3",))
    assert topology.empty_nodes() == ()
    crowded = place(SERVICES[:2], "s0", 3, parse_place("s1=1"))
    assert crowded.empty_nodes() == ("node2", "node3")


def test_replicas_take_the_next_nodes_up_to_the_node_count():
    topology = place(SERVICES, "s0", 3, replicas={"s1": 2, "s2": 9})
    assert topology.nodes_of("s1") == ("node2", "node3")
    assert topology.nodes_of("s2") == ("node3", "node1", "node2")
    assert topology.replicated("s1") and not topology.replicated("s3")


def test_routing_prefers_the_callers_node_else_every_other_instance():
    topology = place(SERVICES, "s0", 3, replicas={"s1": 2})
    assert topology.targets("node2", "s1") == ("node2",)
    assert topology.targets("node1", "s1") == ("node2", "node3")
    assert not topology.crosses("node3", "s1")
    assert topology.crosses("node1", "s1")


def test_no_nodes_is_this_machine():
    topology = place(SERVICES, "s0", 0, replicas={"s1": 3})
    assert topology.nodes == (LOCAL_NODE,)
    assert not topology.isolated
    assert set(topology.instances.values()) == {(LOCAL_NODE,)}


@pytest.mark.parametrize(
    ("count", "placed", "message"),
    [
        (2, (("s0", 2),), "entry service s0 must be on node 1"),
        (2, (("s1", 3),), "on no node 1..2"),
        (2, (("nope", 1),), "not in the workmodel: nope"),
        (0, (("s1", 1),), "--place needs --nodes"),
        (33, (), "between 0 and 32"),
    ],
)
def test_impossible_placements_are_one_line_errors(count, placed, message):
    with pytest.raises(ValueError, match=message):
        place(SERVICES, "s0", count, placed)


@pytest.mark.parametrize("text", ["s1", "s1=x", "=2", "s1=2,s1=3"])
def test_bad_place_text(text):
    with pytest.raises(ValueError):
        parse_place(text)


def test_a_bad_place_in_a_description_names_the_workmodel():
    with pytest.raises(WorkmodelError, match=r"default\.json: .*entry service s0"):
        describe("nomesh", Settings(workmodel=DEFAULT_WORKMODEL, nodes=2, place=(("s0", 2),)))


def _replicated(tmp_path):
    doc = json.loads(DEFAULT_WORKMODEL.read_text())
    doc["s1"]["replicas"] = 2
    path = tmp_path / "replicated.json"
    path.write_text(json.dumps(doc))
    return path


@pytest.mark.parametrize("mesh", MESHES)
def test_every_component_is_on_a_node_of_the_topology(mesh, tmp_path):
    desc = describe(mesh, Settings(workmodel=_replicated(tmp_path), nodes=3))
    topology = desc.topology
    assert topology.nodes_of("s1") == ("node2", "node3")
    for component in desc.components:
        assert component.node in topology.nodes
        if component.service and component.role == "app":
            assert component.node in topology.nodes_of(component.service)
    apps = [c for c in desc.components if c.role == "app"]
    assert sorted((c.service, c.node) for c in apps) == sorted(
        (s, n) for s in desc.services for n in topology.nodes_of(s)
    )
    assert desc.public[0].node == "node1"


def test_dpumesh_runs_daemons_per_node_and_routes_what_is_not_local(tmp_path):
    desc = describe("dpumesh", Settings(workmodel=_replicated(tmp_path), nodes=3))
    daemons = {c.name: c for c in desc.components if c.role == "dpu-daemon"}
    assert set(daemons) == {"dpu-daemon-node1", "dpu-daemon-node2", "dpu-daemon-node3"}
    assert {c.name for c in desc.components if c.role == "dpa-daemon"} == {
        "dpa-daemon-node1",
        "dpa-daemon-node2",
        "dpa-daemon-node3",
    }
    routes = {
        name: [a for a in c.args if "=" in a and "{host:" in a] for name, c in daemons.items()
    }
    # s0 on node1; s1 on nodes 2 and 3; s2 on node 3: node1 routes s1 to both, s2 to node 3.
    assert routes["dpu-daemon-node1"] == [
        "s1=http://{host:dpu-daemon-node2}:{port:dpu-daemon-node2:public}",
        "s1=http://{host:dpu-daemon-node3}:{port:dpu-daemon-node3:public}",
        "s2=http://{host:dpu-daemon-node3}:{port:dpu-daemon-node3:public}",
    ]
    assert routes["dpu-daemon-node3"] == [
        "s0=http://{host:dpu-daemon-node1}:{port:dpu-daemon-node1:public}",
    ]
    for worker in (c for c in desc.components if c.role == "app"):
        dpa = f"dpa-daemon-{worker.node}"
        assert worker.ipc_of == dpa
        assert worker.probe.component == f"dpu-daemon-{worker.node}"
    assert [
        c.name for c in desc.components if c.ports.get("public", None) and c.ports["public"].public
    ] == ["dpu-daemon-node1"]


def test_one_node_keeps_todays_names():
    for nodes in (0, 1):
        desc = describe("dpumesh", Settings(workmodel=DEFAULT_WORKMODEL, nodes=nodes))
        names = [c.name for c in desc.components]
        assert names[:2] == ["dpa-daemon", "dpu-daemon"]
        assert "app-s1" in names


def test_envoy_counts_calls_leaving_a_node_at_the_callers_cluster(tmp_path):
    desc = describe("envoy", Settings(workmodel=DEFAULT_WORKMODEL, nodes=2))
    # s0, s2 on node1; s1 on node2. Every Envoy reaches every service.
    assert set(desc.counters.crossing) == {
        ("sidecar-s0", "cluster.to_s1.upstream_rq_total"),
        ("sidecar-s2", "cluster.to_s1.upstream_rq_total"),
        ("gateway", "cluster.to_s1.upstream_rq_total"),
        ("sidecar-s1", "cluster.to_s0.upstream_rq_total"),
        ("sidecar-s1", "cluster.to_s2.upstream_rq_total"),
    }
    nodeproxy = describe("nodeproxy", Settings(workmodel=DEFAULT_WORKMODEL, nodes=2))
    assert set(nodeproxy.counters.crossing) == {
        ("nodeproxy-node1", "cluster.to_s1.upstream_rq_total"),
        ("gateway", "cluster.to_s1.upstream_rq_total"),
        ("nodeproxy-node2", "cluster.to_s0.upstream_rq_total"),
        ("nodeproxy-node2", "cluster.to_s2.upstream_rq_total"),
    }


def test_nomesh_apps_call_the_nearest_instances(tmp_path):
    desc = describe("nomesh", Settings(workmodel=_replicated(tmp_path), nodes=3))
    app = desc.component("app-s0")
    upstreams = [app.args[i + 1] for i, a in enumerate(app.args) if a == "--upstream"]
    assert [u for u in upstreams if u.startswith("s1=")] == [
        "s1=http://{host:app-s1-node2}:{port:app-s1-node2:http}",
        "s1=http://{host:app-s1-node3}:{port:app-s1-node3:http}",
    ]
    on_node3 = desc.component("app-s1-node3")
    mine = [on_node3.args[i + 1] for i, a in enumerate(on_node3.args) if a == "--upstream"]
    assert [u for u in mine if u.startswith("s1=")] == [
        "s1=http://{host:app-s1-node3}:{port:app-s1-node3:http}"
    ]
