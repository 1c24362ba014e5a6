"""The pure execution-graph engine, driven without processes in chosen completion orders."""

from __future__ import annotations

import itertools
import json
import random
from collections import Counter
from collections.abc import Callable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dpumesh.graph import (
    FAILED_STEP_HEADER,
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
    to_step_result,
)

Pending = EgressAction | InternalAction
Picker = Callable[[list[Pending]], int]


def fifo(pending: list[Pending]) -> int:
    return 0


def lifo(pending: list[Pending]) -> int:
    return len(pending) - 1


def by_rank(*step_ids: str) -> Picker:
    """Complete outstanding work of `step_ids` in that order (others afterwards, FIFO)."""
    rank = {step_id: n for n, step_id in enumerate(step_ids)}
    return lambda pending: min(
        range(len(pending)), key=lambda i: rank.get(pending[i].step_id, len(rank))
    )


def default_response(action: EgressAction) -> StepResult:
    return StepResult(body=f"{action.method} {action.url}")


class Driver:
    """Runs a GraphRun synchronously, completing outstanding actions in the order `pick` chooses.

    Internal actions run when they are completed; egress actions are answered
    by `respond` (a table by URL, or a function). Records when each step
    started and finished (a logical clock) to check ordering invariants.
    """

    def __init__(
        self,
        graph,
        respond: dict[str, StepResult | int | str]
        | Callable[[EgressAction], StepResult]
        | None = None,
        pick: Picker = fifo,
    ) -> None:
        self.run = GraphRun(graph)
        self.respond = respond or {}
        self.pick = pick
        self.pending: list[Pending] = []
        self.done: list[StepResult] = []
        self.clock = 0
        self.starts: dict[str, int] = {}
        self.finishes: dict[str, int] = {}
        self.start_count: Counter[str] = Counter()
        self.sent: list[EgressAction] = []
        self.calls: dict[str, InternalAction] = {}

    def answer(self, action: EgressAction) -> StepResult:
        if callable(self.respond):
            return self.respond(action)
        answer = self.respond.get(action.url)
        if answer is None:
            return default_response(action)
        if isinstance(answer, int):
            return StepResult(status_code=answer, body=f"status {answer} from {action.url}")
        if isinstance(answer, str):
            return StepResult(body=answer)
        return answer

    def take(self, actions: list) -> None:
        for action in actions:
            assert not self.done, f"actions after DoneAction: {actions}"
            self.clock += 1
            if isinstance(action, DoneAction):
                self.done.append(action.result)
                continue
            if isinstance(action, EgressAction):
                self.sent.append(action)
            else:
                self.calls[action.step_id] = action
            if isinstance(action, InternalAction) or action.seq == 0:
                self.start_count[action.step_id] += 1
                self.starts[action.step_id] = self.clock
            self.pending.append(action)

    def complete_one(self) -> None:
        action = self.pending.pop(self.pick(self.pending))
        self.clock += 1
        self.finishes[action.step_id] = self.clock
        if isinstance(action, InternalAction):
            try:
                value = action.func(*action.args, **action.kwargs)
            except Exception as exc:
                value = exc
            self.take(self.run.on_internal_done(action.step_id, value))
        else:
            self.take(self.run.on_egress_response(action.step_id, action.seq, self.answer(action)))

    def run_all(self) -> StepResult:
        self.take(self.run.start())
        while self.pending:
            self.complete_one()
        assert len(self.done) == 1, "exactly one DoneAction"
        assert self.run.done
        return self.done[0]

    def urls(self) -> list[str]:
        return [action.url for action in self.sent]


def get(step_id: str, url: str | None = None) -> EgressStep:
    return EgressStep(step_id, requests=[("GET", url or f"http://{step_id}/api", {}, None)])


def ok_internal(step_id: str, body: str | None = None, **extra) -> InternalStep:
    return InternalStep(step_id, func=lambda **_: body if body is not None else step_id, **extra)


def assert_failed(result: StepResult, step_id: str, *words: str) -> None:
    assert result.status_code == 500
    assert not result.ok
    assert result.headers[FAILED_STEP_HEADER] == step_id
    assert f"step {step_id!r} failed" in result.body
    for word in words:
        assert word in result.body


# -- seed README: low-level API examples ----------------------------------------------------


def test_order_runs_children_one_after_another():
    calls = []
    graph = order(
        [
            EgressStep("A", requests=[("GET", "http://svc-a/api", {}, None)]),
            InternalStep("B", func=lambda: calls.append("B") or "b-done"),
            EgressStep("C", requests=[("POST", "http://svc-c/api", {}, None)]),
        ]
    )
    run = GraphRun(graph)
    first = run.start()
    assert [(a.step_id, a.url) for a in first] == [("A", "http://svc-a/api")]
    second = run.on_egress_response("A", 0, StepResult(body="a"))
    assert [type(a) for a in second] == [InternalAction]
    assert second[0].step_id == "B"
    third = run.on_internal_done("B", second[0].func())
    assert [(a.step_id, a.method) for a in third] == [("C", "POST")]
    last = run.on_egress_response("C", 0, StepResult(body="c"))
    assert last == [DoneAction(StepResult(body="c"))]
    assert run.done


def test_pipe_starts_all_children_at_once():
    graph = pipe([get("A"), get("B"), get("C")])
    run = GraphRun(graph)
    assert [a.step_id for a in run.start()] == ["A", "B", "C"]
    assert run.on_egress_response("B", 0, StepResult(body="b")) == []
    assert run.on_egress_response("C", 0, StepResult(body="c")) == []
    assert run.on_egress_response("A", 0, StepResult(body="a")) == [
        DoneAction(StepResult(body="c"))
    ]


def test_egress_step_with_several_requests_sends_them_in_sequence():
    step = EgressStep(
        "chain",
        requests=[("GET", "http://svc-a/api", {}, None), ("POST", "http://svc-b/api", {}, None)],
    )
    run = GraphRun(step)
    assert [(a.seq, a.url) for a in run.start()] == [(0, "http://svc-a/api")]
    after_first = run.on_egress_response("chain", 0, StepResult(body="a"))
    assert [(a.seq, a.method, a.url) for a in after_first] == [(1, "POST", "http://svc-b/api")]
    assert run.on_egress_response("chain", 1, StepResult(body="b")) == [
        DoneAction(StepResult(body="b"))
    ]


def test_egress_sequence_stops_at_first_failing_request():
    step = EgressStep(
        "chain",
        requests=[("GET", "http://a", {}, None), ("GET", "http://b", {}, None)],
    )
    driver = Driver(step, {"http://a": 503})
    result = driver.run_all()
    assert driver.urls() == ["http://a"]
    assert_failed(result, "chain", "status 503")


def test_egress_static_and_dynamic_modes():
    def build_save_request(process_result):
        url = f"http://storage/api/v1/{process_result.body}"
        return [("POST", url, {}, process_result.body)]

    graph = order(
        [
            InternalStep("process_result", func=lambda: "item-7"),
            EgressStep("save", request_builder=build_save_request, inputs=["process_result"]),
        ]
    )
    driver = Driver(graph)
    result = driver.run_all()
    assert [(a.method, a.url, a.body) for a in driver.sent] == [
        ("POST", "http://storage/api/v1/item-7", "item-7")
    ]
    assert result.body == "POST http://storage/api/v1/item-7"


def test_internal_step_gets_args_kwargs_and_inputs():
    def merge_results(fetch_user, fetch_order, config, timeout=30):
        assert isinstance(fetch_user, StepResult)
        user_data = json.loads(fetch_user.body)
        order_data = json.loads(fetch_order.body)
        return {"merged": {**user_data, **order_data}, "config": config, "timeout": timeout}

    kwargs = {"timeout": 5}
    graph = order(
        [
            pipe([get("fetch_user"), get("fetch_order")]),
            InternalStep(
                "merge",
                func=merge_results,
                args=({"c": 1},),
                kwargs=kwargs,
                inputs=["fetch_user", "fetch_order"],
            ),
        ]
    )
    driver = Driver(
        graph,
        {"http://fetch_user/api": '{"user": "kim"}', "http://fetch_order/api": '{"order": 3}'},
    )
    result = driver.run_all()
    assert json.loads(result.body) == {
        "merged": {"user": "kim", "order": 3},
        "config": {"c": 1},
        "timeout": 5,
    }
    assert kwargs == {"timeout": 5}, "the step's kwargs are not mutated"


def launched(step: InternalStep, *inputs: EgressStep) -> InternalAction:
    """The InternalAction for `step` once its egress inputs answered."""
    run = GraphRun(order([*inputs, step]))
    actions = run.start()
    for source in inputs:
        actions = run.on_egress_response(source.id, 0, StepResult(body=source.id))
    (action,) = actions
    return action


def test_positional_args_that_do_not_collide_are_passed_unchanged():
    def func(a, b, src):
        return f"{a}{b}{src.body}"

    action = launched(InternalStep("f", func=func, args=(1, 2), inputs=["src"]), get("src"))
    assert (action.args, list(action.kwargs)) == ((1, 2), ["src"])
    assert action.func(*action.args, **action.kwargs) == "12src"


def test_positional_args_skip_parameters_given_by_keyword():
    def func(src, config, extra=0, *, flag=False):
        return (src.body, config, extra, flag)

    action = launched(
        InternalStep("f", func=func, args=("cfg", 5), kwargs={"flag": True}, inputs=["src"]),
        get("src"),
    )
    assert action.args == ()
    assert action.func(*action.args, **action.kwargs) == ("src", "cfg", 5, True)


@pytest.mark.parametrize(
    "func",
    [
        max,  # no introspectable signature: called as given
        lambda src, config: config,  # more args than free parameters: called as given
    ],
)
def test_uncorrectable_collisions_are_left_to_python(func):
    action = launched(InternalStep("f", func=func, args=(1, 2), inputs=["src"]), get("src"))
    assert action.args == (1, 2)


def test_subclassed_steps_are_graph_nodes():
    class TracedEgress(EgressStep):
        pass

    assert Driver(TracedEgress("t", requests=[("GET", "http://t", {}, None)])).run_all().ok


def test_nesting_example_1_internal_then_parallel_calls():
    graph = order(
        [
            InternalStep("compute", func=lambda config: f"pi {config}", args=("cfg",)),
            pipe([get("call_a"), get("call_b")]),
        ]
    )
    run = GraphRun(graph)
    (compute,) = run.start()
    assert isinstance(compute, InternalAction)
    calls = run.on_internal_done("compute", "pi cfg")
    assert [a.step_id for a in calls] == ["call_a", "call_b"]
    assert run.on_egress_response("call_b", 0, StepResult(body="b")) == []
    assert run.on_egress_response("call_a", 0, StepResult(body="a")) == [
        DoneAction(StepResult(body="b"))
    ]


def test_nesting_example_2_fan_out_fan_in():
    def merge_fn(fetch_user, fetch_order):
        return f"{fetch_user.body}+{fetch_order.body}"

    graph = order(
        [
            pipe([get("fetch_user"), get("fetch_order")]),
            InternalStep("merge", func=merge_fn, inputs=["fetch_user", "fetch_order"]),
        ]
    )
    for pick in (fifo, lifo):
        driver = Driver(graph, {"http://fetch_user/api": "U", "http://fetch_order/api": "O"}, pick)
        assert driver.run_all() == StepResult(body="U+O")
        assert driver.starts["merge"] > max(
            driver.finishes["fetch_user"], driver.finishes["fetch_order"]
        )


def complex_pipeline() -> Order:
    def parse(fetch_user):
        return fetch_user.body.upper()

    def build_detail(parse_user):
        return [("GET", f"http://detail/{parse_user.body}", {}, None)]

    def merge_all(fetch_detail, fetch_payment, compute):
        return {"detail": fetch_detail.body, "payment": fetch_payment.body, "compute": compute.body}

    def build_save(merge):
        return [("POST", "http://store/save", {"content-type": "application/json"}, merge.body)]

    def build_response(save):
        return {"status_code": 201, "body": f"saved: {save.body}"}

    return order(
        [
            pipe(
                [
                    order(
                        [
                            get("fetch_user", "http://users/me"),
                            InternalStep("parse_user", func=parse, inputs=["fetch_user"]),
                            EgressStep(
                                "fetch_detail", request_builder=build_detail, inputs=["parse_user"]
                            ),
                        ]
                    ),
                    order([get("fetch_order"), get("fetch_payment")]),
                    InternalStep("compute", func=lambda: "42"),
                ]
            ),
            InternalStep(
                "merge", func=merge_all, inputs=["fetch_detail", "fetch_payment", "compute"]
            ),
            EgressStep("save", request_builder=build_save, inputs=["merge"]),
            InternalStep("finalize", func=build_response, inputs=["save"]),
        ]
    )


@pytest.mark.parametrize("pick", [fifo, lifo], ids=["fifo", "lifo"])
def test_nesting_example_3_complex_pipeline(pick):
    table = {
        "http://users/me": "kim",
        "http://detail/KIM": "detail-of-kim",
        "http://fetch_payment/api": "paid",
        "http://store/save": "ok-1",
    }
    driver = Driver(complex_pipeline(), table, pick)
    result = driver.run_all()
    assert result == StepResult(status_code=201, body="saved: ok-1")
    merge = driver.calls["merge"]
    assert {name: r.body for name, r in merge.kwargs.items()} == {
        "fetch_detail": "detail-of-kim",
        "fetch_payment": "paid",
        "compute": "42",
    }
    save = next(a for a in driver.sent if a.step_id == "save")
    assert json.loads(save.body) == {"detail": "detail-of-kim", "payment": "paid", "compute": "42"}
    first_wave = {"fetch_user", "fetch_order", "compute"}
    assert all(driver.starts[s] < min(driver.finishes[t] for t in first_wave) for s in first_wave)
    assert driver.starts["fetch_payment"] > driver.finishes["fetch_order"]
    pipe_done = max(driver.finishes[s] for s in ("fetch_detail", "fetch_payment", "compute"))
    assert driver.starts["merge"] > pipe_done
    assert driver.starts["save"] > driver.finishes["merge"]
    assert driver.starts["finalize"] > driver.finishes["save"]


def test_a_single_step_is_a_graph():
    assert Driver(get("only"), {"http://only/api": "x"}).run_all() == StepResult(body="x")
    assert Driver(ok_internal("solo", "y")).run_all() == StepResult(body="y")


def test_empty_composites_finish_at_once():
    run = GraphRun(order([]))
    assert run.start() == [DoneAction(StepResult())]
    assert Driver(order([get("a"), pipe([])])).run_all() == StepResult()
    assert Driver(pipe([order([]), get("a")])).run_all().body == "GET http://a/api"


# -- request builders: skip, fan-out, failures ----------------------------------------------


def test_builder_returning_empty_list_skips_the_step():
    def check_and_call(auth_step):
        if auth_step.status_code != 200:
            return []
        return [("GET", "http://secure-service/data", {}, "")]

    def graph():
        return order(
            [
                get("auth_step", "http://auth/check"),
                EgressStep("secure", request_builder=check_and_call, inputs=["auth_step"]),
                ok_internal("after", inputs=["secure"]),
            ]
        )

    skipped = Driver(graph(), {"http://auth/check": StepResult(status_code=302)})
    assert skipped.run_all() == StepResult(body="after")
    assert skipped.urls() == ["http://auth/check"]
    assert skipped.calls["after"].kwargs["secure"] == StepResult(), "skip result: empty 200"

    called = Driver(graph())
    assert called.run_all() == StepResult(body="after")
    assert called.urls() == ["http://auth/check", "http://secure-service/data"]


def test_skipped_last_step_answers_empty_200():
    graph = order([get("a"), EgressStep("skip", request_builder=lambda: [])])
    assert Driver(graph).run_all() == StepResult()
    assert Driver(EgressStep("static_empty", requests=[])).run_all() == StepResult()


def test_builder_fan_out_sends_requests_in_sequence():
    def fan_out(ids):
        return [("GET", f"http://item/{n}", {}, None) for n in ids.body.split(",")]

    graph = order(
        [
            InternalStep("ids", func=lambda: "1,2,3"),
            EgressStep("items", request_builder=fan_out, inputs=["ids"]),
        ]
    )
    driver = Driver(graph)
    result = driver.run_all()
    assert driver.urls() == ["http://item/1", "http://item/2", "http://item/3"]
    assert [a.seq for a in driver.sent] == [0, 1, 2]
    assert result.body == "GET http://item/3"


def test_builder_exception_fails_the_step_with_500():
    def broken(**_):
        raise KeyError("no-target")

    graph = order([get("a"), EgressStep("dyn", request_builder=broken, inputs=["a"]), get("z")])
    driver = Driver(graph)
    result = driver.run_all()
    assert driver.urls() == ["http://a/api"], "later steps never run"
    assert_failed(result, "dyn", "request_builder", "KeyError", "no-target")


@pytest.mark.parametrize("bad", [None, [("GET", "http://x")], ["GET http://x"], 42])
def test_builder_returning_garbage_fails_the_step(bad):
    result = Driver(EgressStep("dyn", request_builder=lambda: bad)).run_all()
    assert_failed(result, "dyn", "request_builder")


# -- error semantics ------------------------------------------------------------------------


def test_order_stops_at_first_error_and_later_steps_never_run():
    ran = []
    graph = order(
        [
            get("a"),
            get("b"),
            InternalStep("c", func=lambda: ran.append("c")),
            pipe([get("d"), get("e")]),
        ]
    )
    driver = Driver(graph, {"http://b/api": 503})
    result = driver.run_all()
    assert driver.urls() == ["http://a/api", "http://b/api"]
    assert ran == []
    assert_failed(result, "b", "status 503")
    assert result.headers["content-type"].startswith("text/plain")


def test_internal_exception_fails_the_order():
    def boom():
        raise ValueError("bad config")

    driver = Driver(order([InternalStep("compute", func=boom), get("call")]))
    result = driver.run_all()
    assert driver.sent == []
    assert_failed(result, "compute", "bad config")


@pytest.mark.parametrize(
    "pick", [fifo, lifo, by_rank("a", "b", "c"), by_rank("c", "b", "a")], ids=str
)
def test_pipe_runs_all_children_and_fails_if_any_failed(pick):
    graph = pipe([get("a"), get("b"), get("c")])
    driver = Driver(graph, {"http://a/api": 500}, pick)
    result = driver.run_all()
    assert sorted(driver.urls()) == ["http://a/api", "http://b/api", "http://c/api"]
    assert_failed(result, "a", "status 500")


def test_pipe_fails_even_when_failing_child_finishes_first():
    run = GraphRun(order([pipe([get("fail"), get("slow")]), get("after")]))
    run.start()
    assert run.on_egress_response("fail", 0, StepResult(status_code=502)) == []
    assert not run.done, "the pipe waits for its other children"
    (done,) = run.on_egress_response("slow", 0, StepResult(body="fine"))
    assert_failed(done.result, "fail", "status 502")


def test_failure_inside_nested_order_stops_only_that_order():
    graph = pipe(
        [
            order([get("a1"), get("a2"), get("a3")]),
            order([get("b1"), get("b2")]),
        ]
    )
    driver = Driver(graph, {"http://a2/api": 404}, lifo)
    result = driver.run_all()
    assert sorted(driver.urls()) == sorted(
        ["http://a1/api", "http://a2/api", "http://b1/api", "http://b2/api"]
    )
    assert_failed(result, "a2", "status 404")


def test_first_failed_step_in_graph_order_is_reported():
    graph = pipe([get("a"), get("b"), get("c")])
    table = {"http://b/api": 503, "http://c/api": 500}
    for pick in (fifo, lifo, by_rank("c", "b", "a")):
        assert_failed(Driver(graph, table, pick).run_all(), "b", "status 503")


def test_egress_error_field_counts_as_failure():
    result = Driver(get("a"), {"http://a/api": StepResult(error="connection refused")}).run_all()
    assert_failed(result, "a", "connection refused")


# -- inputs are dependencies ----------------------------------------------------------------


def test_input_inside_the_same_pipe_is_waited_for():
    graph = pipe([ok_internal("late", inputs=["early"]), get("early")])
    run = GraphRun(graph)
    assert [a.step_id for a in run.start()] == ["early"]
    (late,) = run.on_egress_response("early", 0, StepResult(body="e"))
    assert late.step_id == "late"
    assert late.kwargs == {"early": StepResult(body="e")}


def test_failed_input_is_passed_as_its_result():
    seen = {}

    def consumer(source):
        seen["source"] = source
        return "consumed"

    graph = pipe([get("source"), InternalStep("consumer", func=consumer, inputs=["source"])])
    result = Driver(graph, {"http://source/api": 503}).run_all()
    assert seen["source"].status_code == 503
    assert_failed(result, "source")


@pytest.mark.parametrize("failure_first", [True, False])
def test_input_that_never_runs_fails_the_waiting_step(failure_first):
    # "y" sits after a failing step in an order; "x" waits for it in another branch.
    graph = pipe(
        [
            order([get("f"), get("y")]),
            order([get("s"), ok_internal("x", inputs=["y"]), ok_internal("x2", inputs=["x"])]),
        ]
    )
    pick = by_rank("f", "s") if failure_first else by_rank("s", "f")
    driver = Driver(graph, {"http://f/api": 500}, pick)
    result = driver.run_all()
    assert "y" not in driver.starts and "x" not in driver.starts
    assert_failed(result, "f", "status 500")
    assert driver.urls().count("http://y/api") == 0


@pytest.mark.parametrize("failure_first", [True, False])
def test_never_running_input_deep_inside_a_stopped_order(failure_first):
    graph = pipe(
        [
            order([get("s"), ok_internal("x", inputs=["y"])]),
            order([get("f"), pipe([order([get("w"), get("y")])])]),
        ]
    )
    pick = by_rank("f", "s") if failure_first else by_rank("s", "f")
    driver = Driver(graph, {"http://f/api": 500}, pick)
    assert_failed(driver.run_all(), "x", "input 'y'", "step 'f' failed before it")
    assert driver.calls == {}
    assert driver.urls().count("http://w/api") == 0


def test_never_running_input_error_names_input_and_cause():
    graph = pipe([ok_internal("x", inputs=["y"]), order([get("f"), get("y")])])
    result = Driver(graph, {"http://f/api": 500}).run_all()
    assert_failed(result, "x", "input 'y'", "'f' failed")


def test_step_after_never_running_input_gets_the_failure():
    received = {}

    def record(x):
        received["x"] = x
        return "recorded"

    graph = pipe(
        [
            order([get("f"), get("y")]),
            ok_internal("x", inputs=["y"]),
            InternalStep("z", func=record, inputs=["x"]),
        ]
    )
    Driver(graph, {"http://f/api": 500}).run_all()
    assert received["x"].status_code == 500
    assert "will never run" in received["x"].error


# -- GraphError at construction -------------------------------------------------------------


@pytest.mark.parametrize(
    ("graph", "message"),
    [
        (order([get("a"), pipe([get("a")])]), "duplicate step id 'a'"),
        (order([get("a"), ok_internal("b", inputs=["nope"])]), "unknown input 'nope'"),
        (ok_internal("self", inputs=["self"]), "cycle"),
        (order([ok_internal("a", inputs=["b"]), get("b")]), "cycle"),
        (
            pipe([ok_internal("a", inputs=["b"]), ok_internal("b", inputs=["a"])]),
            "cycle",
        ),
        (
            order([pipe([ok_internal("a", inputs=["c"]), get("b")]), order([get("c")])]),
            "cycle",
        ),
        (order([[get("a")]]), "not a graph node"),
        ("a", "not a graph node"),
    ],
)
def test_bad_graphs_are_rejected_when_the_run_is_built(graph, message):
    with pytest.raises(GraphError, match=message):
        GraphRun(graph)


def test_cycle_error_lists_steps_that_could_never_start():
    graph = order([ok_internal("a", inputs=["b"]), get("b"), get("c")])
    with pytest.raises(GraphError) as info:
        GraphRun(graph)
    assert "'a'" in str(info.value) and "'b'" in str(info.value)


@pytest.mark.parametrize(
    "make",
    [
        lambda: EgressStep("x"),
        lambda: EgressStep("x", requests=[], request_builder=lambda: []),
        lambda: EgressStep("", requests=[]),
        lambda: EgressStep(7, requests=[]),
        lambda: EgressStep("x", requests=[("GET", "http://x")]),
        lambda: InternalStep("x", func=print, kwargs={"a": 1}, inputs=["a"]),
        lambda: InternalStep("x", func=print, inputs="get_user"),
        lambda: EgressStep("x", request_builder=print, inputs="get_user"),
    ],
)
def test_bad_steps_are_rejected_at_construction(make):
    with pytest.raises(GraphError):
        make()


def test_graph_error_is_a_value_error():
    assert issubclass(GraphError, ValueError)


# -- conversion of internal return values ---------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("hello", StepResult(body="hello")),
        (b"caf\xc3\xa9", StepResult(body="café")),
        (b"\xff\xfe", StepResult(body="\udcff\udcfe")),
        ({"body": "x", "status_code": 201}, StepResult(status_code=201, body="x")),
        (
            {"body": "x", "headers": {"x-a": 1}},
            StepResult(headers={"x-a": "1"}, body="x"),
        ),
        ({"body": {"k": [1, 2]}}, StepResult(body='{"k": [1, 2]}')),
        ({"body": b"raw"}, StepResult(body="raw")),
        ({"status_code": 404}, StepResult(status_code=404)),
        ({"merged": {"a": 1}}, StepResult(body='{"merged": {"a": 1}}')),
        ({}, StepResult(body="{}")),
        (None, StepResult(body="None")),
        (42, StepResult(body="42")),
        ([1, 2], StepResult(body="[1, 2]")),
    ],
)
def test_to_step_result_conversion_table(value, expected):
    assert to_step_result(value) == expected


def test_to_step_result_keeps_step_results_as_they_are():
    result = StepResult(status_code=418, body="teapot")
    assert to_step_result(result) is result


def test_to_step_result_of_exceptions():
    result = to_step_result(ValueError("bad input"))
    assert (result.status_code, result.error) == (500, "bad input")
    assert "ValueError" in result.body and "bad input" in result.body
    assert not result.ok
    empty = to_step_result(RuntimeError())
    assert empty.error == "RuntimeError", "an exception without a message still has an error"


def test_surrogateescape_body_round_trips_to_the_same_bytes():
    raw = bytes(range(256))
    assert to_step_result(raw).body.encode("utf-8", "surrogateescape") == raw


def test_step_result_ok():
    assert StepResult().ok
    assert StepResult(status_code=399).ok
    assert not StepResult(status_code=400).ok
    assert not StepResult(status_code=199).ok
    assert not StepResult(error="x").ok
    assert StepResult().headers is not StepResult().headers


def test_internal_result_with_error_status_fails_the_graph():
    graph = order(
        [InternalStep("check", func=lambda: {"status_code": 403, "body": "no"}), get("a")]
    )
    driver = Driver(graph)
    assert_failed(driver.run_all(), "check", "status 403")
    assert driver.sent == []


def test_unconvertible_return_value_fails_the_step():
    graph = InternalStep("weird", func=lambda: {"body": {1, 2}})
    assert_failed(Driver(graph).run_all(), "weird", "not a valid result")


def test_returned_exception_instance_fails_like_a_raised_one():
    graph = InternalStep("returns_exc", func=lambda: OSError("disk gone"))
    assert_failed(Driver(graph).run_all(), "returns_exc", "disk gone")


# -- event handling, expiry, one DoneAction -------------------------------------------------


def test_expire_answers_504_and_ignores_later_events():
    run = GraphRun(order([get("a"), get("b")]))
    run.start()
    (done,) = run.expire()
    assert done.result.status_code == 504
    assert done.result.error == "deadline exceeded"
    assert run.done
    assert run.on_egress_response("a", 0, StepResult()) == []
    assert run.on_internal_done("a", "x") == []
    assert run.expire() == []
    assert run.start() == []


def test_expire_before_start_and_after_done():
    run = GraphRun(get("a"))
    assert run.expire()[0].result.status_code == 504
    finished = GraphRun(ok_internal("a"))
    finished.start()
    assert len(finished.on_internal_done("a", "x")) == 1
    assert finished.expire() == []


def test_unknown_stale_and_duplicate_events_are_ignored():
    step = EgressStep("e", requests=[("GET", "http://1", {}, None), ("GET", "http://2", {}, None)])
    run = GraphRun(order([step, ok_internal("i")]))
    assert run.start() != []
    assert run.start() == [], "start twice"
    assert run.on_egress_response("nope", 0, StepResult()) == []
    assert run.on_egress_response("e", 1, StepResult()) == [], "future seq"
    assert run.on_internal_done("e", "x") == [], "wrong kind"
    assert run.on_internal_done("i", "x") == [], "not started yet"
    assert len(run.on_egress_response("e", 0, StepResult())) == 1
    assert run.on_egress_response("e", 0, StepResult()) == [], "duplicate"
    assert len(run.on_egress_response("e", 1, StepResult())) == 1
    assert run.on_egress_response("e", 1, StepResult()) == [], "after the step finished"
    assert len(run.on_internal_done("i", "x")) == 1
    assert run.on_internal_done("i", "x") == []


def test_request_bodies_and_headers_pass_through_untouched():
    headers = {"x-b3-traceid": "abc"}
    body = b"\x00\xffbinary"
    run = GraphRun(EgressStep("e", requests=[("PUT", "http://x", headers, body)]))
    (action,) = run.start()
    assert action.headers is headers and action.body is body
    run_none = GraphRun(EgressStep("e", requests=[("GET", "http://x", None, None)]))
    (action,) = run_none.start()
    assert action.headers is None and action.body is None


def test_a_graph_can_be_run_twice():
    graph = complex_pipeline()
    first = Driver(graph, pick=fifo).run_all()
    second = Driver(graph, pick=lifo).run_all()
    assert first == second


def test_mubench_shaped_graph():
    groups = [order([get(f"g{g}s{s}") for s in range(3)]) for g in range(4)]
    graph = order([InternalStep("internal", func=lambda: "payload"), pipe(groups)])
    driver = Driver(graph, pick=lifo)
    result = driver.run_all()
    assert result.body == "GET http://g3s2/api"
    for g in range(4):
        for s in range(2):
            assert driver.starts[f"g{g}s{s + 1}"] > driver.finishes[f"g{g}s{s}"]


# -- determinism: the final result does not depend on completion order ----------------------


@pytest.mark.parametrize("failing", [None, "a", "d", ("b", "c")])
def test_pipe_of_four_result_is_the_same_under_every_completion_order(failing):
    failing = (failing,) if isinstance(failing, str) else failing or ()
    graph = pipe([get(name) for name in "abcd"])
    table = {f"http://{name}/api": 503 for name in failing}
    results = set()
    for permutation in itertools.permutations("abcd"):
        result = Driver(graph, table, by_rank(*permutation)).run_all()
        results.add((result.status_code, tuple(sorted(result.headers.items())), result.body))
    assert len(results) == 1
    ((status, _, body),) = results
    if failing:
        assert status == 500 and f"step {failing[0]!r}" in body
    else:
        assert (status, body) == (200, "GET http://d/api")


# -- random nested graphs (hypothesis) ------------------------------------------------------

_LEAVES = st.one_of(
    st.tuples(
        st.just("egress"),
        st.lists(st.sampled_from([200, 204, 302, 404, 503]), min_size=1, max_size=3),
    ),
    st.tuples(st.just("internal"), st.sampled_from(["str", "dict", "raise", "status"])),
    st.tuples(st.just("skip")),
    st.tuples(st.just("builder_error")),
)
_SPECS = st.recursive(
    _LEAVES,
    lambda children: st.tuples(st.sampled_from(["order", "pipe"]), st.lists(children, max_size=4)),
    max_leaves=14,
)


class RandomGraph:
    """A graph built from a spec, plus a sequential reference interpreter for its outcome."""

    def __init__(self, spec, draw_inputs: Callable[[list[str]], list[str]]) -> None:
        self.behaviour: dict[str, tuple] = {}
        self.inputs: dict[str, list[str]] = {}
        self.order_nodes: list[list[list[str]]] = []
        self.root = self._build(spec, draw_inputs)

    def _build(self, spec, draw_inputs):
        kind = spec[0]
        if kind in ("order", "pipe"):
            built = [self._build(child, draw_inputs) for child in spec[1]]
            return order(built) if kind == "order" else pipe(built)
        step_id = f"s{len(self.behaviour)}"
        inputs = draw_inputs(list(self.behaviour))
        self.behaviour[step_id] = spec
        self.inputs[step_id] = inputs
        if kind == "egress":
            requests = [("GET", f"http://{step_id}/{n}", {}, None) for n in range(len(spec[1]))]
            return EgressStep(step_id, requests=requests, inputs=inputs)
        if kind == "skip":
            return EgressStep(step_id, request_builder=lambda **_: [], inputs=inputs)
        if kind == "builder_error":
            return EgressStep(step_id, request_builder=_raise_builder, inputs=inputs)
        return InternalStep(step_id, func=_internal_func(step_id, spec[1], inputs), inputs=inputs)

    def respond(self, action: EgressAction) -> StepResult:
        status = self.behaviour[action.step_id][1][action.seq]
        return StepResult(status_code=status, body=f"{action.step_id}:{action.seq}")

    def expected(self) -> tuple[StepResult | None, set[str], str | None]:
        """(success result or None, steps with actions, first failed step), walking in order."""
        finished: dict[str, StepResult | None] = {}  # None: the step failed
        started: set[str] = set()

        def walk(node) -> bool:
            if isinstance(node, (Order, Pipe)):
                failed = False
                for child in node.children:
                    failed = walk(child) or failed
                    if failed and isinstance(node, Order):
                        break
                return failed
            finished[node.id] = self._outcome(node.id, finished, started)
            return finished[node.id] is None

        failed = walk(self.root)
        first_failed = next((s for s, result in finished.items() if result is None), None)
        if failed:
            return None, started, first_failed
        node = self.root
        while isinstance(node, (Order, Pipe)):
            if not node.children:
                return StepResult(), started, None
            node = node.children[-1]
        return finished[node.id], started, None

    def _outcome(self, step_id, finished, started) -> StepResult | None:
        if any(source not in finished for source in self.inputs[step_id]):
            return None
        spec = self.behaviour[step_id]
        kind = spec[0]
        if kind == "skip":
            return StepResult()
        if kind == "builder_error":
            return None
        started.add(step_id)
        if kind == "egress":
            statuses = spec[1]
            if any(status >= 400 for status in statuses):
                return None
            return StepResult(status_code=statuses[-1], body=f"{step_id}:{len(statuses) - 1}")
        return StepResult(body=step_id) if spec[1] in ("str", "dict") else None


def _raise_builder(**_):
    raise RuntimeError("builder failed")


def _internal_func(step_id: str, outcome: str, inputs: list[str]):
    def func(**received):
        assert sorted(received) == sorted(inputs)
        assert all(isinstance(value, StepResult) for value in received.values())
        if outcome == "raise":
            raise RuntimeError(step_id)
        if outcome == "status":
            return StepResult(status_code=503, body=step_id)
        if outcome == "dict":
            return {"body": step_id}
        return step_id

    return func


def check_invariants(driver: Driver, graph: RandomGraph) -> None:
    assert len(driver.done) == 1
    assert not driver.pending
    assert all(count == 1 for count in driver.start_count.values()), driver.start_count
    for step_id, sources in graph.inputs.items():
        if step_id in driver.starts:
            for source in sources:
                if source in driver.finishes:
                    assert driver.starts[step_id] > driver.finishes[source]

    def steps_of(node) -> list[str]:
        if isinstance(node, (Order, Pipe)):
            return [s for child in node.children for s in steps_of(child)]
        return [node.id]

    def check_orders(node) -> None:
        if not isinstance(node, (Order, Pipe)):
            return
        if isinstance(node, Order):
            spans = [steps_of(child) for child in node.children]
            for i, earlier in enumerate(spans):
                end = max((driver.finishes[s] for s in earlier if s in driver.finishes), default=0)
                for later in spans[i + 1 :]:
                    for s in later:
                        assert driver.starts.get(s, end + 1) > end, "order children overlap"
        for child in node.children:
            check_orders(child)

    check_orders(graph.root)


def _result_key(result: StepResult) -> tuple:
    return (result.status_code, tuple(sorted(result.headers.items())), result.body, result.error)


@settings(max_examples=300, deadline=None)
@given(spec=_SPECS, data=st.data())
def test_random_graphs_keep_invariants_and_match_reference(spec, data):
    def draw_inputs(earlier: list[str]) -> list[str]:
        if not earlier:
            return []
        return data.draw(st.lists(st.sampled_from(earlier), max_size=2, unique=True))

    graph = RandomGraph(spec, draw_inputs)
    expected, expected_started, first_failed = graph.expected()
    shuffle = data.draw(st.randoms(use_true_random=False))
    pickers = [fifo, lifo, lambda pending: shuffle.randrange(len(pending))]
    outcomes = set()
    for pick in pickers:
        driver = Driver(graph.root, graph.respond, pick)
        result = driver.run_all()
        check_invariants(driver, graph)
        assert set(driver.starts) == expected_started
        if expected is None:
            assert result.status_code == 500
            assert result.headers[FAILED_STEP_HEADER] == first_failed
        else:
            assert result == expected
        outcomes.add(_result_key(result))
    assert len(outcomes) == 1, "result depends on completion order"


@settings(max_examples=100, deadline=None)
@given(spec=_SPECS, seed=st.integers(0, 2**32 - 1), cut=st.integers(0, 30))
def test_random_graphs_expire_cleanly_at_any_point(spec, seed, cut):
    graph = RandomGraph(spec, lambda earlier: [])
    shuffle = random.Random(seed)
    driver = Driver(graph.root, graph.respond, lambda pending: shuffle.randrange(len(pending)))
    driver.take(driver.run.start())
    for _ in range(cut):
        if not driver.pending:
            break
        driver.complete_one()
    expired = driver.run.expire()
    if driver.done:
        assert expired == []
    else:
        assert [a.result.status_code for a in expired] == [504]
    for action in driver.pending:
        if isinstance(action, EgressAction):
            assert driver.run.on_egress_response(action.step_id, action.seq, StepResult()) == []
        else:
            assert driver.run.on_internal_done(action.step_id, "late") == []
