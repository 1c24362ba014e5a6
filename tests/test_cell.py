"""The cell semantics core (plans), and the DPUmesh app's graphs driven through GraphRun."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest
from flask import Flask

from dpumesh.context import ExecutionContext, bind_context
from dpumesh.graph import DoneAction, EgressAction, GraphRun, InternalAction, StepResult
from mubench import dpumesh_app
from mubench.cell import Cell, Plan, Request, TraceError, _derive_seed
from mubench.internal import BUILTINS, loader
from mubench.workmodel import Workmodel, load_workmodel, parse_workmodel

REPO = Path(__file__).resolve().parents[1]
DERIVED_0_S0_ABC = 0x9D6F47643A144792
QUIET = {"loader": {"sleep_stress": {"run": False}, "mean_response_size": 1}}


def svc(*groups: dict, **extra) -> dict:
    return {"external_services": list(groups), "internal_service": QUIET, **extra}


def group(*services: str, seq_len: int = 100, **probabilities: float) -> dict:
    g: dict = {"seq_len": seq_len, "services": list(services)}
    if probabilities:
        g["probabilities"] = probabilities
    return g


def model(s0: dict, leaves: str = "s1 s2 s3 s4 s5") -> Workmodel:
    return parse_workmodel({"s0": s0, **{name: svc() for name in leaves.split()}})


def get(request_id: str | None = None, query: str = "", **headers: str) -> Request:
    if request_id is not None:
        headers["X-Request-Id"] = request_id
    return Request("GET", b"", headers, query)


def post(trace: object, **headers: str) -> Request:
    return Request("POST", json.dumps(trace).encode(), headers)


def called(plan: Plan) -> list[list[str]]:
    return [[c.service for c in g] for g in plan.groups]


# -- reproducibility ---------------------------------------------------------------------


def test_same_seed_service_and_request_id_give_identical_plans() -> None:
    wm = model(svc(group("s1", "s2", "s3", "s4", seq_len=2), group("s5", s5=0.5)))
    for rid in ("a", "b", "c", "req-42"):
        first = Cell(wm, "s0", seed=7).plan(get(rid))
        second = Cell(wm, "s0", seed=7).plan(get(rid))
        assert first == second
        assert first.rng.random() == second.rng.random()


def test_plans_vary_with_request_id_and_seed() -> None:
    wm = model(svc(group("s1", "s2", "s3", "s4", seq_len=2)))
    by_id = {tuple(called(Cell(wm, "s0", 1).plan(get(f"r{i}")))[0]) for i in range(40)}
    by_seed = {tuple(called(Cell(wm, "s0", s).plan(get("r")))[0]) for s in range(40)}
    assert len(by_id) > 5 and len(by_seed) > 5


def test_derived_seed_is_stable_across_processes_and_versions() -> None:
    # sha256 of "seed\0service\0request id": must never change, or runs stop being comparable.
    assert _derive_seed(0, "s0", "abc") == DERIVED_0_S0_ABC


def test_requests_without_id_use_a_per_process_stream() -> None:
    wm = model(svc(group("s1", "s2", "s3", "s4", seq_len=1)))
    cell = Cell(wm, "s0", seed=3)
    picks = Counter(called(cell.plan(get()))[0][0] for _ in range(200))
    assert set(picks) == {"s1", "s2", "s3", "s4"}


def test_per_process_stream_is_reproducible_within_a_process() -> None:
    wm = model(svc(group("s1", "s2", "s3", "s4", seq_len=1)))
    one, two = Cell(wm, "s0", seed=3), Cell(wm, "s0", seed=3)
    assert [called(one.plan(get())) for _ in range(30)] == [
        called(two.plan(get())) for _ in range(30)
    ]


def test_internal_function_continues_the_request_stream() -> None:
    wm = model(svc())
    bodies = {loader(p.params, p.rng) for p in (Cell(wm, "s0", 1).plan(get("x")) for _ in "ab")}
    assert len(bodies) == 1


# -- stochastic (GET) rules ----------------------------------------------------------------


def test_seq_len_picks_that_many_distinct_services() -> None:
    wm = model(svc(group("s1", "s2", "s3", "s4", "s5", seq_len=3)))
    cell = Cell(wm, "s0", seed=1)
    seen: Counter[str] = Counter()
    for i in range(300):
        (calls,) = called(cell.plan(get(f"r{i}")))
        assert len(calls) == len(set(calls)) == 3
        seen.update(calls)
    assert set(seen) == {"s1", "s2", "s3", "s4", "s5"}
    assert all(150 < n < 210 for n in seen.values())  # 3/5 of 300 = 180 each


def test_seq_len_at_least_group_size_calls_all_in_file_order() -> None:
    wm = model(svc(group("s3", "s1", "s2", seq_len=3), group("s5", "s4", seq_len=100)))
    assert called(Cell(wm, "s0").plan(get("r"))) == [["s3", "s1", "s2"], ["s5", "s4"]]


def test_seq_len_zero_calls_nothing() -> None:
    wm = model(svc(group("s1", "s2", seq_len=0)))
    assert Cell(wm, "s0").plan(get("r")).groups == ()


def test_probability_zero_never_calls_and_one_always_calls() -> None:
    wm = model(svc(group("s1", "s2", "s3", s1=0, s2=1)))
    cell = Cell(wm, "s0", seed=5)
    for i in range(200):
        assert called(cell.plan(get(f"r{i}"))) == [["s2", "s3"]]


def test_probability_half_calls_about_half_the_time() -> None:
    wm = model(svc(group("s1", s1=0.5)))
    cell = Cell(wm, "s0", seed=5)
    hits = sum(bool(cell.plan(get(f"r{i}")).groups) for i in range(1000))
    assert 430 < hits < 570


def test_empty_groups_are_dropped_and_calls_are_gets_to_the_callee_path() -> None:
    wm = parse_workmodel(
        {
            "s0": svc(group(), group("s1"), group("s2", s2=0)),
            "s1": svc(path="/custom/p"),
            "s2": svc(),
        }
    )
    plan = Cell(wm, "s0").plan(get("r", query="a=1&b=2"))
    (call,) = [c for g in plan.groups for c in g]
    assert (call.service, call.method, call.path, call.body) == (
        "s1",
        "GET",
        "/custom/p?a=1&b=2",
        None,
    )
    assert call.url == "http://s1/custom/p?a=1&b=2"


def test_trace_headers_are_forwarded_case_insensitively() -> None:
    wm = model(svc(group("s1")))
    request = get(
        "rid",
        **{"X-B3-TraceId": "t", "traceparent": "00-x", "Tracestate": "k=v", "Cookie": "no"},
    )
    plan = Cell(wm, "s0").plan(request)
    expected = {
        "x-request-id": "rid",
        "x-b3-traceid": "t",
        "traceparent": "00-x",
        "tracestate": "k=v",
    }
    assert plan.headers == expected
    assert plan.groups[0][0].headers == expected


# -- alternative behaviours ----------------------------------------------------------------


def test_bid_selects_the_alternative_behaviour() -> None:
    wm = model(
        svc(
            group("s1"),
            alternative_behaviors={
                "b1": {"external_services": [group("s2"), group("s3")]},
                "b2": {"internal_service": {"colosseum": {}}},
            },
        )
    )
    cell = Cell(wm, "s0")
    default = cell.plan(get("r"))
    b1 = cell.plan(get("r", query="bid=b1"))
    b2 = cell.plan(get("r", query="x=1&bid=b2"))
    assert (default.function, called(default)) == ("loader", [["s1"]])
    assert (b1.function, called(b1)) == ("loader", [["s2"], ["s3"]])
    assert (b2.function, called(b2)) == ("colosseum", [["s1"]])
    assert b1.groups[0][0].path == "/api/v1?bid=b1"  # the bid reaches the callees
    assert called(cell.plan(get("r", query="bid=unknown"))) == [["s1"]]
    assert called(cell.plan(get("r", query="bid=default"))) == [["s1"]]


# -- trace-driven (POST) -------------------------------------------------------------------


def test_trace_post_calls_exactly_the_services_in_the_trace() -> None:
    wm = model(svc(group("s5")))
    sub = [{"s4": {}}]
    plan = Cell(wm, "s0").plan(post({"s0": [{"s2": {}, "s1": sub}, {"s3": {}}]}))
    assert called(plan) == [["s2", "s1"], ["s3"]]
    bodies = [[json.loads(c.body) for c in g] for g in plan.groups]
    assert bodies == [[{"s2": {}}, {"s1": sub}], [{"s3": {}}]]
    for call in (c for g in plan.groups for c in g):
        assert call.method == "POST" and call.headers["content-type"] == "application/json"


def test_trace_escape_suffix_calls_one_service_twice_and_dummy_is_ignored() -> None:
    wm = model(svc())
    trace = {"s0__1": [{"s1__a": {}, "s1__b": [{"s2": {}}]}], "dummy": "MMMM"}
    plan = Cell(wm, "s0").plan(post(trace))
    assert called(plan) == [["s1", "s1"]]
    assert [json.loads(c.body) for c in plan.groups[0]] == [{"s1__a": {}}, {"s1__b": [{"s2": {}}]}]


def test_leaf_trace_calls_nothing_and_bid_still_selects_internal() -> None:
    wm = model(
        svc(group("s1"), alternative_behaviors={"b": {"internal_service": {"colosseum": {}}}})
    )
    plan = Cell(wm, "s0").plan(Request("POST", b'{"s0": {}}', {}, "bid=b"))
    assert (plan.function, plan.groups) == ("colosseum", ())


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"not json", "not valid JSON"),
        (b"[1]", "must be a JSON object"),
        (b'{"s1": []}', "trace is for 's1'"),
        (b'{"s0": [], "s1": []}', "exactly one service key"),
        (b'{"s0": [1]}', "must be an array of objects"),
        (b'{"s0": [{"s9": {}}]}', "undefined service 's9'"),
        (b'{"s0": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", "nested too deeply"),
    ],
)
def test_malformed_traces_are_rejected(body: bytes, message: str) -> None:
    with pytest.raises(TraceError, match=message):
        Cell(model(svc()), "s0").plan(Request("POST", body))


@pytest.mark.parametrize(
    "request_",
    [Request("POST", b""), Request("POST", b'{"s0": []}', {"Request-Type": "iot"})],
    ids=["empty-body", "iot"],
)
def test_post_without_trace_is_stochastic(request_: Request) -> None:
    wm = model(svc(group("s1")))
    assert called(Cell(wm, "s0").plan(request_)) == [["s1"]]


# -- the DPUmesh app: graph shape, driven through the pure engine -------------------------


class Drive:
    """Call the app with a bound context, then run its graph through GraphRun."""

    def __init__(
        self,
        app: Flask,
        method: str = "GET",
        body: bytes = b"",
        headers: dict[str, str] | None = None,
        respond: Callable[[EgressAction], StepResult] = lambda a: StepResult(body="ok"),
    ) -> None:
        ctx = ExecutionContext(method=method, path="/", headers=headers, body=body)
        with bind_context(ctx), app.test_client() as client:
            self.reply = client.open("/api/v1", method=method, data=body, headers=headers)
        self.graph = ctx.build_graph()
        self.batches: list[list] = []
        self.done: StepResult | None = None
        if self.graph is None:
            return
        run = GraphRun(self.graph)
        pending = [run.start()]
        while pending:
            batch = pending.pop(0)
            self.batches.append(batch)
            for action in batch:
                if isinstance(action, InternalAction):
                    try:
                        value = action.func(*action.args, **action.kwargs)
                    except Exception as e:  # what the worker runtime does
                        value = e
                    pending.append(run.on_internal_done(action.step_id, value))
                elif isinstance(action, EgressAction):
                    pending.append(
                        run.on_egress_response(action.step_id, action.seq, respond(action))
                    )
                else:
                    assert isinstance(action, DoneAction)
                    self.done = action.result

    def egress(self) -> list[list[tuple[str, str]]]:
        """Egress (method, url) per batch: one batch = in flight at the same time."""
        return [
            [(a.method, a.url) for a in batch if isinstance(a, EgressAction)]
            for batch in self.batches
            if any(isinstance(a, EgressAction) for a in batch)
        ]


@pytest.fixture
def default_app() -> Flask:
    return dpumesh_app.create_app(load_workmodel(str(REPO / "workmodels" / "default.json")), "s0")


def test_dpumesh_get_runs_internal_then_groups_in_parallel(default_app: Flask) -> None:
    run = Drive(default_app, headers={"x-request-id": "r1", "x-b3-traceid": "t"})
    assert run.reply.status_code == 200 and run.reply.data == b""
    assert [a.step_id for a in run.batches[0]] == ["internal"]
    assert run.egress()[0] == [("GET", "http://s1/api/v1"), ("GET", "http://s2/api/v1")]
    egress = [a for b in run.batches for a in b if isinstance(a, EgressAction)]
    assert all(a.headers == {"x-request-id": "r1", "x-b3-traceid": "t"} for a in egress)
    assert run.done is not None and run.done.status_code == 200
    expected = Cell(load_workmodel(str(REPO / "workmodels" / "default.json")), "s0").plan(
        get("r1", **{"x-b3-traceid": "t"})
    )
    assert run.done.body == loader(expected.params, expected.rng)
    assert run.done.headers["content-type"] == "text/plain"


def test_dpumesh_calls_in_one_group_are_sequential() -> None:
    app = dpumesh_app.create_app(model(svc(group("s1", "s2"), group("s3"))), "s0")
    run = Drive(app, headers={"x-request-id": "r"})
    assert run.egress() == [
        [("GET", "http://s1/api/v1"), ("GET", "http://s3/api/v1")],
        [("GET", "http://s2/api/v1")],
    ]
    assert run.done.status_code == 200


def test_dpumesh_trace_post_calls_exactly_the_trace() -> None:
    app = dpumesh_app.create_app(model(svc(group("s5"))), "s0")
    trace = {"s0": [{"s1": {}, "s2": [{"s3": {}}]}, {"s4": {}}]}
    run = Drive(app, "POST", json.dumps(trace).encode(), {"content-type": "application/json"})
    posts = [a for b in run.batches for a in b if isinstance(a, EgressAction)]
    assert [(a.method, a.url, json.loads(a.body)) for a in posts] == [
        ("POST", "http://s1/api/v1", {"s1": {}}),
        ("POST", "http://s4/api/v1", {"s4": {}}),
        ("POST", "http://s2/api/v1", {"s2": [{"s3": {}}]}),
    ]
    assert run.done.status_code == 200


def test_dpumesh_downstream_failure_is_500_and_hides_the_internal_body(default_app: Flask) -> None:
    def respond(action: EgressAction) -> StepResult:
        return StepResult(status_code=500 if "s1" in action.url else 200, body="x")

    run = Drive(default_app, headers={"x-request-id": "r"}, respond=respond)
    assert run.done.status_code == 500
    assert "g0.0.s1" in run.done.body
    # The other group still ran (pipe semantics).
    assert ("GET", "http://s2/api/v1") in run.egress()[0]


def test_dpumesh_failure_in_a_group_stops_that_group() -> None:
    app = dpumesh_app.create_app(model(svc(group("s1", "s2"))), "s0")
    run = Drive(app, headers={"x-request-id": "r"}, respond=lambda a: StepResult(status_code=503))
    assert run.egress() == [[("GET", "http://s1/api/v1")]]
    assert run.done.status_code == 500


def test_dpumesh_no_calls_answers_with_the_internal_output() -> None:
    app = dpumesh_app.create_app(model(svc(), leaves="s1"), "s1")
    run = Drive(app, headers={"x-request-id": "r"})
    assert run.egress() == []
    assert run.done.status_code == 200 and run.done.body.startswith("m")


def test_dpumesh_internal_failure_is_500() -> None:
    """A bad built-in parameter fails at load time, so a custom function raises instead."""

    def boom(params: object, rng: random.Random, scale: float = 1.0) -> str:
        raise RuntimeError("internal function failed")

    wm = parse_workmodel({"s0": {"internal_service": {"boom": {}}}}, custom={"boom"})
    run = Drive(dpumesh_app.create_app(wm, "s0", functions={**BUILTINS, "boom": boom}))
    assert run.done.status_code == 500


def test_dpumesh_bad_trace_is_400_without_a_graph(default_app: Flask) -> None:
    run = Drive(default_app, "POST", b'{"s7": []}')
    assert run.reply.status_code == 400 and run.graph is None


def test_dpumesh_without_context_is_500(default_app: Flask) -> None:
    assert default_app.test_client().get("/").status_code == 500


def test_dpumesh_app_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(dpumesh_app, "_app", None)
    monkeypatch.delenv("APP", raising=False)
    with pytest.raises(
        SystemExit,
        match=r"^mubench\.dpumesh_app: APP and MUBENCH_WORKMODEL must be set in the environment$",
    ):
        _ = dpumesh_app.app
    monkeypatch.setenv("APP", "s2")
    monkeypatch.setenv("MUBENCH_WORKMODEL", str(REPO / "workmodels" / "default.json"))
    monkeypatch.setenv("MUBENCH_SEED", "5")
    monkeypatch.setenv("MUBENCH_SCALE", "0.5")
    app = dpumesh_app.app
    assert isinstance(app, Flask) and dpumesh_app.app is app
    run = Drive(app, headers={"x-request-id": "q"})
    plan = Cell(load_workmodel(str(REPO / "workmodels" / "default.json")), "s2", seed=5).plan(
        get("q")
    )
    assert run.done.body == loader(plan.params, plan.rng, 0.5)


DEFAULT_ENV = {"APP": "s0", "MUBENCH_WORKMODEL": str(REPO / "workmodels" / "default.json")}


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"MUBENCH_SEED": "abc"}, "MUBENCH_SEED must be an integer, got 'abc'"),
        ({"MUBENCH_SEED": "1.5"}, "MUBENCH_SEED must be an integer, got '1.5'"),
        ({"MUBENCH_SCALE": "x"}, "MUBENCH_SCALE must be a finite number >= 0, got 'x'"),
        ({"MUBENCH_SCALE": "-1"}, "MUBENCH_SCALE must be a finite number >= 0, got '-1'"),
        ({"MUBENCH_SCALE": "inf"}, "MUBENCH_SCALE must be a finite number >= 0, got 'inf'"),
        ({"APP": "s9"}, "APP 's9' is not a service of "),
    ],
)
def test_dpumesh_app_environment_errors_name_the_variable(env: dict, message: str) -> None:
    with pytest.raises(dpumesh_app.ConfigError) as info:
        dpumesh_app.app_from_env({**DEFAULT_ENV, **env})
    assert message in str(info.value) and "\n" not in str(info.value)


def test_dpumesh_app_empty_seed_and_scale_take_the_defaults() -> None:
    env = {**DEFAULT_ENV, "MUBENCH_SEED": "", "MUBENCH_SCALE": ""}
    assert isinstance(dpumesh_app.app_from_env(env), Flask)


def test_dpumesh_server_reports_a_bad_environment_in_one_line() -> None:
    """What an operator sees: the worker runtime exits at once, no traceback."""
    env = {**os.environ, **DEFAULT_ENV, "MUBENCH_SEED": "abc", "PN": "1"}
    env.pop("DPUMESH_NS", None)
    proc = subprocess.run(
        [sys.executable, "-m", "dpumesh.server", "mubench.dpumesh_app:app"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 1
    assert proc.stderr == "mubench.dpumesh_app: MUBENCH_SEED must be an integer, got 'abc'\n"


def test_both_runtimes_share_the_rng_derivation() -> None:
    rng = random.Random(_derive_seed(0, "s0", "abc"))
    assert Cell(model(svc()), "s0").plan(get("abc")).rng.random() == rng.random()
