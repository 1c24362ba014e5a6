"""The high-level graph API: building graphs from handlers, binding the current context."""

from __future__ import annotations

import importlib
import threading

import pytest
from flask import Flask

import dpumesh
from dpumesh.context import ExecutionContext, bind_context, get_context, get_current_context
from dpumesh.graph import (
    DoneAction,
    EgressAction,
    EgressStep,
    GraphError,
    GraphRun,
    InternalAction,
    InternalStep,
    Order,
    Pipe,
    StepResult,
    order,
    pipe,
)


def run_graph(graph, bodies: dict[str, str] | None = None) -> tuple[StepResult, list[list[str]]]:
    """Run `graph` answering egress by URL (default body "<METHOD> <url>").

    Returns the final result and the waves of work: each wave lists the steps
    that were outstanding together, which shows what ran concurrently.
    """
    bodies = bodies or {}
    run = GraphRun(graph)
    pending = run.start()
    waves: list[list[str]] = []
    final = None
    while pending:
        waves.append([f"{a.step_id}:{getattr(a, 'url', '')}".rstrip(":") for a in pending])
        following = []
        for action in pending:
            if isinstance(action, InternalAction):
                try:
                    value = action.func(*action.args, **action.kwargs)
                except Exception as exc:
                    value = exc
                produced = run.on_internal_done(action.step_id, value)
            else:
                body = bodies.get(action.url, f"{action.method} {action.url}")
                produced = run.on_egress_response(action.step_id, action.seq, StepResult(body=body))
            for item in produced:
                if isinstance(item, DoneAction):
                    assert final is None
                    final = item.result
                else:
                    following.append(item)
        pending = following
    assert final is not None
    return final, waves


# -- the current context --------------------------------------------------------------------


def test_no_context_outside_a_request():
    assert get_context() is None
    assert get_current_context is get_context
    assert dpumesh.get_current_context is get_context


def test_bind_context_sets_and_restores():
    outer, inner = ExecutionContext(), ExecutionContext()
    with bind_context(outer) as bound:
        assert bound is outer and get_context() is outer
        with bind_context(inner):
            assert get_context() is inner
        assert get_context() is outer
    assert get_context() is None


def test_bind_context_restores_after_an_exception():
    with pytest.raises(RuntimeError), bind_context(ExecutionContext()):
        raise RuntimeError("handler crashed")
    assert get_context() is None


def test_contexts_of_concurrent_requests_do_not_mix():
    seen = {}
    ready = threading.Barrier(2)

    def handle(name: str) -> None:
        with bind_context(ExecutionContext(request_id=name)):
            ready.wait()
            seen[name] = get_context().request_id

    threads = [threading.Thread(target=handle, args=(name,)) for name in ("r1", "r2")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert seen == {"r1": "r1", "r2": "r2"}


def test_request_info_is_read_only():
    ctx = ExecutionContext(
        method="POST",
        path="/api/v1",
        headers=[("x-request-id", "abc")],
        body=b"{}",
        request_id="abc",
    )
    assert (ctx.method, ctx.path, ctx.body, ctx.request_id) == ("POST", "/api/v1", b"{}", "abc")
    assert ctx.headers["x-request-id"] == "abc"
    with pytest.raises(AttributeError):
        ctx.method = "GET"
    with pytest.raises(TypeError):
        ctx.headers["x-new"] = "1"


def test_request_defaults():
    ctx = ExecutionContext()
    assert (ctx.method, ctx.path, dict(ctx.headers), ctx.body, ctx.request_id) == (
        "GET",
        "/",
        {},
        b"",
        None,
    )


@pytest.mark.parametrize("module_name", ["dpumesh", "dpumesh.server"])
def test_public_names_are_the_same_objects(module_name):
    module = importlib.import_module(module_name)
    expected = {
        "get_context": get_context,
        "get_current_context": get_current_context,
        "order": order,
        "pipe": pipe,
        "EgressStep": EgressStep,
        "InternalStep": InternalStep,
        "StepResult": StepResult,
        "ExecutionContext": ExecutionContext,
    }
    for name, obj in expected.items():
        assert getattr(module, name) is obj, name


# -- seed README examples (high-level API) --------------------------------------------------


def test_basic_usage_internal_then_parallel_calls():
    config = {"complexity": 10}
    ctx = ExecutionContext()
    ctx.run_internal(lambda cfg: f"processed {cfg['complexity']}", args=(config,), id="process")
    with ctx.parallel():
        a = ctx.call("GET", "http://svc-a/api/v1")
        b = ctx.call("GET", "http://svc-b/api/v1")
    graph = ctx.build_graph()
    assert isinstance(graph, Order)
    assert [type(node) for node in graph.children] == [InternalStep, Pipe]
    assert [step.id for step in graph.children[1].children] == [a, b]
    result, waves = run_graph(graph)
    assert waves == [["process"], [f"{a}:http://svc-a/api/v1", f"{b}:http://svc-b/api/v1"]]
    assert result.body == "GET http://svc-b/api/v1"


def test_data_chaining_passes_results_by_step_id():
    def process_user_data(get_user):
        return f"Hello, {get_user.body}"

    ctx = ExecutionContext()
    step1 = ctx.call("GET", "http://user-service/me", id="get_user")
    step2 = ctx.run_internal(process_user_data, inputs=[step1])
    assert step1 == "get_user" and step2 != step1
    result, _ = run_graph(ctx.build_graph(), {"http://user-service/me": "kim"})
    assert result.body == "Hello, kim"


def test_dynamic_request_builder_replaces_method_and_url():
    def build_req(config_step):
        target_host = config_step.body.strip()
        return [("POST", f"http://{target_host}/api", {}, "data")]

    ctx = ExecutionContext()
    s1 = ctx.call("GET", "http://config-service/target", id="config_step")
    ctx.call("GET", "dummy", request_builder=build_req, inputs=[s1])
    run = GraphRun(ctx.build_graph())
    (config,) = run.start()
    (dynamic,) = run.on_egress_response(config.step_id, 0, StepResult(body=" orders \n"))
    assert (dynamic.method, dynamic.url, dynamic.body) == ("POST", "http://orders/api", "data")


@pytest.mark.parametrize(("auth_status", "calls_secure"), [(200, True), (302, False)])
def test_conditional_execution_by_empty_builder(auth_status, calls_secure):
    def check_and_call(auth_step):
        if auth_step.status_code != 200:
            return []
        return [("GET", "http://secure-service/data", {}, "")]

    ctx = ExecutionContext()
    auth = ctx.call("GET", "http://auth/check", id="auth_step")
    ctx.call("GET", "unused", request_builder=check_and_call, inputs=[auth])
    run = GraphRun(ctx.build_graph())
    run.start()
    actions = run.on_egress_response("auth_step", 0, StepResult(status_code=auth_status))
    if calls_secure:
        assert [a.url for a in actions] == ["http://secure-service/data"]
    else:
        assert actions == [DoneAction(StepResult())]


def test_fan_out_sends_builder_requests_in_sequence():
    ctx = ExecutionContext()
    ctx.call(
        "GET",
        "unused",
        request_builder=lambda: [("GET", f"http://shard-{n}/q", {}, None) for n in range(3)],
    )
    result, waves = run_graph(ctx.build_graph())
    assert [wave[0].split(":", 1)[1] for wave in waves] == [
        "http://shard-0/q",
        "http://shard-1/q",
        "http://shard-2/q",
    ]
    assert result.body == "GET http://shard-2/q"


def test_low_level_graph_registration():
    def preprocess():
        return "pre"

    def postprocess(svc_a, svc_b):
        return f"{svc_a.body}|{svc_b.body}"

    app = Flask(__name__)

    @app.route("/api/v1", methods=["GET", "POST"])
    def handler():
        ctx = get_context()
        if ctx is not None:
            ctx.graph = order(
                [
                    InternalStep("preprocess", func=preprocess),
                    pipe(
                        [
                            EgressStep("svc_a", requests=[("GET", "http://svc-a/api", {}, None)]),
                            EgressStep("svc_b", requests=[("GET", "http://svc-b/api", {}, None)]),
                        ]
                    ),
                    InternalStep("postprocess", func=postprocess, inputs=["svc_a", "svc_b"]),
                ]
            )
        return ""

    ctx = ExecutionContext(method="GET", path="/api/v1")
    with bind_context(ctx):
        reply = app.test_client().get("/api/v1")
    assert reply.status_code == 200 and reply.data == b""
    assert ctx.build_graph() is ctx.graph
    result, waves = run_graph(ctx.build_graph(), {"http://svc-a/api": "A", "http://svc-b/api": "B"})
    assert waves == [
        ["preprocess"],
        ["svc_a:http://svc-a/api", "svc_b:http://svc-b/api"],
        ["postprocess"],
    ]
    assert result.body == "A|B"


def test_flask_handler_builds_the_graph_through_get_context():
    app = Flask(__name__)

    @app.route("/api/v1")
    def handler():
        ctx = get_context()
        with ctx.parallel():
            ctx.call("GET", "http://s1/api/v1", id="s1")
            ctx.call("GET", "http://s2/api/v1", id="s2")
        ctx.run_internal(lambda s1, s2: f"s0[{s1.body}|{s2.body}]", inputs=["s1", "s2"])
        return ""

    ctx = ExecutionContext()
    with bind_context(ctx):
        app.test_client().get("/api/v1")
    result, _ = run_graph(ctx.build_graph(), {"http://s1/api/v1": "one", "http://s2/api/v1": "two"})
    assert result.body == "s0[one|two]"


# -- building rules -------------------------------------------------------------------------


def test_nothing_built_means_no_graph():
    ctx = ExecutionContext()
    assert ctx.graph is None
    assert ctx.build_graph() is None
    with ctx.parallel():
        pass
    assert ctx.build_graph() is None, "an empty parallel block adds nothing"


def test_calls_outside_parallel_run_in_order():
    ctx = ExecutionContext()
    for name in ("a", "b", "c"):
        ctx.call("GET", f"http://{name}", id=name)
    _, waves = run_graph(ctx.build_graph())
    assert waves == [["a:http://a"], ["b:http://b"], ["c:http://c"]]


def test_nested_parallel_joins_the_enclosing_concurrent_block():
    ctx = ExecutionContext()
    with ctx.parallel():
        ctx.call("GET", "http://a", id="a")
        with ctx.parallel():
            ctx.call("GET", "http://b", id="b")
            ctx.call("GET", "http://c", id="c")
        ctx.call("GET", "http://d", id="d")
    ctx.call("GET", "http://e", id="e")
    graph = ctx.build_graph()
    outer = graph.children[0]
    assert isinstance(outer, Pipe)
    assert isinstance(outer.children[1], Pipe)
    result, waves = run_graph(graph)
    assert waves == [["a:http://a", "b:http://b", "c:http://c", "d:http://d"], ["e:http://e"]]
    assert result.body == "GET http://e"


def test_inputs_order_steps_inside_one_parallel_block():
    ctx = ExecutionContext()
    with ctx.parallel():
        source = ctx.call("GET", "http://source", id="source")
        ctx.run_internal(lambda source: source.body.upper(), inputs=[source], id="upper")
        ctx.call("GET", "http://other", id="other")
    result, waves = run_graph(ctx.build_graph())
    assert waves == [["source:http://source", "other:http://other"], ["upper"]]
    assert result.body == "GET http://other", "a pipe's result is its last child's"


def test_parallel_block_is_closed_even_when_the_handler_raises():
    ctx = ExecutionContext()
    with pytest.raises(ValueError), ctx.parallel():
        ctx.call("GET", "http://a", id="a")
        raise ValueError("oops")
    ctx.call("GET", "http://b", id="b")
    graph = ctx.build_graph()
    assert [type(node) for node in graph.children] == [Pipe, EgressStep]


def test_auto_ids_are_unique_and_avoid_explicit_ones():
    ctx = ExecutionContext()
    explicit = ctx.call("GET", "http://x", id="call-2")
    ids = [ctx.call("GET", "http://x") for _ in range(3)]
    ids.append(ctx.run_internal(print))
    assert explicit == "call-2"
    assert len({explicit, *ids}) == 5
    GraphRun(ctx.build_graph())


def test_duplicate_explicit_id_is_rejected_at_once():
    ctx = ExecutionContext()
    ctx.call("GET", "http://x", id="same")
    with pytest.raises(GraphError, match="duplicate step id 'same'"):
        ctx.run_internal(print, id="same")


def test_call_copies_headers_and_keeps_body():
    headers = {"x-b3-traceid": "t1"}
    body = b"\x00raw"
    ctx = ExecutionContext()
    ctx.call("POST", "http://x", headers=headers, body=body, id="c")
    ctx.call("GET", "http://y", id="d")
    run = GraphRun(ctx.build_graph())
    (first,) = run.start()
    assert isinstance(first, EgressAction)
    assert first.headers == headers and first.headers is not headers
    assert first.body is body
    (second,) = run.on_egress_response("c", 0, StepResult())
    assert second.headers == {} and second.body is None


def test_run_internal_passes_args_and_kwargs():
    ctx = ExecutionContext()
    ctx.run_internal(lambda a, b, c=0: a + b + c, args=(1, 2), kwargs={"c": 4}, id="sum")
    result, _ = run_graph(ctx.build_graph())
    assert result.body == "7"


def test_assigned_graph_and_high_level_steps_do_not_mix():
    ctx = ExecutionContext()
    ctx.graph = order([EgressStep("a", requests=[("GET", "http://a", {}, None)])])
    ctx.call("GET", "http://b")
    with pytest.raises(GraphError, match="not both"):
        ctx.build_graph()


def test_build_graph_is_repeatable():
    ctx = ExecutionContext()
    ctx.call("GET", "http://a", id="a")
    first, second = ctx.build_graph(), ctx.build_graph()
    assert first.children == second.children
