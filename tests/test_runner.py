"""The runner's parts without processes: config, plan, call graph, checks, search, results."""

from __future__ import annotations

import csv
import json

import pytest

import run_bench
from harness import deploy
from harness.measure import callgraph, checks
from harness.names import REPO
from harness.output import results, schema
from harness.run import config, ladder, plan, runner
from harness.run.loadgen import LocustSpec, locust_argv
from loadtests import latency
from mubench.workmodel import load_workmodel, parse_workmodel

DEFAULT_WM = REPO / "workmodels" / "default.json"


# --- config -----------------------------------------------------------------------------------


def test_bench_toml_documents_exactly_the_defaults():
    from_file = config.build(config.load_file(config.DEFAULT_CONFIG_FILE))
    assert from_file == config.BenchConfig()
    text = config.DEFAULT_CONFIG_FILE.read_text()
    for key in config.KEYS:
        assert f"\n{key} = " in text, f"bench.toml does not document {key}"


def test_cli_overrides_file_overrides_defaults(tmp_path):
    (tmp_path / "wm.json").write_text(DEFAULT_WM.read_text())
    cfg_file = tmp_path / "b.toml"
    cfg_file.write_text('users = 3\nrepeat = 2\nworkmodel = "wm.json"\nrates = [30, 10]\n')
    cfg = config.load(cfg_file, {"users": 5, "meshes": ["envoy"], "seed": None})
    assert cfg.users == 5  # command line wins
    assert cfg.repeat == 2  # file wins over the default
    assert cfg.duration == config.BenchConfig().duration  # default
    assert cfg.workmodel == tmp_path / "wm.json"  # relative to the file
    assert cfg.rates == (10.0, 30.0)  # sorted, lowest first
    assert cfg.meshes == ("envoy",)
    assert cfg.seed == 0


def test_cli_lists_and_empty_rate():
    assert config.parse_list("", "rate") == []
    assert config.build(overrides={"rates": config.parse_list("", "rate")}).rates == ()
    assert config.build(overrides={"rates": "20, 40"}).rates == (20.0, 40.0)
    assert config.build(overrides={"rates": "auto"}).rates is None  # the calibrated ladder
    assert config.build(overrides={"meshes": "nomesh,dpumesh"}).meshes == ("nomesh", "dpumesh")


@pytest.mark.parametrize(
    ("overrides", "fragment"),
    [
        ({"users": 0}, "users: must be >= 1"),
        ({"duration": "ten"}, "duration: must be a whole number"),
        ({"duration": 2.5}, "duration: must be a whole number"),
        ({"meshes": ["envoy", "istio"]}, "meshes: must be one of"),
        ({"meshes": ["envoy", "envoy"]}, "lists a mesh twice"),
        ({"meshes": []}, "needs at least one mesh"),
        ({"rates": [50, -1]}, "rates: must be a positive number"),
        ({"rates": "50,,100"}, "empty item"),
        ({"mode": "k8s"}, "mode: must be one of local, compose"),
        ({"request_mode": "post"}, "request_mode: must be one of get, trace"),
        ({"ladder_rates": 1}, "ladder_rates: must be between 2 and 12"),
        ({"refine": 9}, "refine: must be between 0 and 4"),
        ({"workmodel": "/nonexistent/wm.json"}, "no such file"),
        ({"slo_p99_ms": 0}, "slo_p99_ms: must be a positive number"),
        ({"bogus": 1}, "unknown setting 'bogus'"),
    ],
)
def test_bad_settings_are_one_line_errors(overrides, fragment):
    with pytest.raises(config.ConfigError) as err:
        config.build(overrides=overrides)
    message = str(err.value)
    assert fragment in message and "\n" not in message
    assert message.startswith("command line")


def test_bad_config_file(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("users = 4\ncolour = 'red'\n")
    with pytest.raises(config.ConfigError, match=r"bad.toml: unknown key 'colour'"):
        config.load(bad)
    bad.write_text("users = [\n")
    with pytest.raises(config.ConfigError, match="invalid TOML"):
        config.load(bad)
    bad.write_text("users = 'many'\n")
    with pytest.raises(config.ConfigError, match=r"bad.toml: users: must be a whole number"):
        config.load(bad)


def test_a_setting_refused_after_parsing_is_a_one_line_error_with_exit_2(tmp_path, capsys):
    bad = tmp_path / "bench.toml"
    bad.write_text("users = 0\n")
    assert run_bench.main(["run", "--config", str(bad)]) == 2
    assert capsys.readouterr().err == f"error: {bad}: users: must be >= 1, not 0\n"


def test_an_unknown_mode_is_refused_before_anything_starts(tmp_path):
    desc = runner.describe("nomesh", runner.settings_of(config.build()))
    with pytest.raises(ValueError, match="unknown mode 'k8s'"):
        deploy.start("k8s", desc, run_dir=tmp_path)
    assert list(tmp_path.iterdir()) == []


# --- plan ---------------------------------------------------------------------------------------


def test_repetitions_interleave_across_stacks():
    cfg = config.build(overrides={"repeat": 3, "meshes": ["dpumesh", "envoy", "nomesh"]})
    order = [(s.rep, s.mesh) for s in plan.segments(cfg, plan.stacks(cfg))]
    assert order == [(r, m) for r in (1, 2, 3) for m in ("dpumesh", "envoy", "nomesh")]
    # The calibration starts every stack once before, only when the ladder is calibrated.
    assert [(s.rep, s.mesh) for s in plan.calibrations(cfg, plan.stacks(cfg))] == [
        (0, m) for m in ("dpumesh", "envoy", "nomesh")
    ]
    given = config.build(overrides={"rates": [50]})
    assert plan.calibrations(given, plan.stacks(given)) == []


def test_whatif_stacks_are_the_baselines_then_one_dpumesh_per_value():
    stacks = plan.whatif_stacks(["envoy", "nomesh"], "dpu_speed", [1.0, 0.25])
    assert [s.label for s in stacks] == [
        "envoy",
        "nomesh",
        "dpumesh@dpu_speed=0.25",
        "dpumesh@dpu_speed=1",
    ]
    assert stacks[2].overrides == (("dpu_speed", 0.25),)
    for bad, fragment in (
        ((["envoy"], "speed", [1.0]), "--param must be one of"),
        ((["dpumesh"], "dpu_speed", [1.0]), "not a baseline"),
        ((["envoy"], "dpu_speed", [1.0, 1.0]), "distinct"),
        ((["envoy"], "dpu_cores", [1.5]), "whole numbers"),
        ((["envoy", "envoy"], "dpu_speed", [1.0]), "lists a stack twice"),
        ((["envoy"], "dpu_speed", [1.0000001, 1.0000002]), "too close"),
    ):
        with pytest.raises(ValueError, match=fragment):
            plan.whatif_stacks(*bad)


def test_levels_and_request_ids():
    cfg = config.build(overrides={"users": 8, "rates": [100, 50], "processes": 1})
    levels = plan.sweep(cfg, cfg.rates)
    assert [lv.name for lv in levels] == ["closed-8", "open-50", "open-100"]
    assert [lv.rate for lv in levels] == [None, 50.0, 100.0]
    # Enough users to send on schedule at any latency within the SLO (Little's law).
    assert plan.open_level(1000, cfg).users == 100  # 1000 req/s x 100 ms
    assert plan.open_level(1000, config.build(overrides={"slo_p99_ms": 20})).users == 20
    assert plan.open_level(20, config.build(overrides={"processes": 12})).users == 12
    # Same ids for every stack at one rep and level; different across reps and levels.
    prefixes = {
        plan.request_id_prefix(s.rep, levels[1]) for s in plan.segments(cfg, plan.stacks(cfg))
    }
    assert prefixes == {f"r{r}-open-50-" for r in range(1, cfg.repeat + 1)}


def test_excluded_seconds_and_estimate():
    cfg = config.build(overrides={"warmup": 4, "settle": 1, "duration": 8, "repeat": 1})
    assert plan.excluded_s(cfg, first=True) == 4
    assert plan.excluded_s(cfg, first=False) == 1
    assert plan.excluded_s(config.build(overrides={"warmup": 0}), first=True) == 1
    stacks = plan.stacks(cfg)
    calibration = sum(plan.calibration_s(cfg, m) for m in cfg.meshes)
    segments = sum(plan.segment_s(cfg, m) for m in cfg.meshes)
    assert plan.estimate_s(cfg, stacks) == pytest.approx(calibration + segments)
    # The default run fits about 10 minutes, --quick about 2 (upper bounds by the plan's
    # own estimate: every stack assumed to climb the whole ladder).
    default = config.BenchConfig()
    assert plan.estimate_s(default, plan.stacks(default)) <= 11.5 * 60
    quick = config.build(config.QUICK)
    assert plan.estimate_s(quick, plan.stacks(quick)) <= 2.5 * 60


# --- call graph ---------------------------------------------------------------------------------


def _cell(groups):
    return {
        "external_services": groups,
        "internal_service": {"loader": {"sleep_stress": {"run": False}}},
    }


def test_expected_calls_default_workmodel():
    wm = load_workmodel(str(DEFAULT_WM))
    calls = callgraph.stochastic_calls(wm, "s0")
    assert calls == {"s0": 0.0, "s1": 1.0, "s2": 1.0}
    assert sum(callgraph.expected_calls(wm, "s0", "trace", {"s0": [{"s1": {}}]}).values()) == 1


def test_expected_calls_sampling_probabilities_and_depth():
    wm = parse_workmodel(
        {
            "s0": _cell(
                [
                    {"seq_len": 1, "services": ["a", "b"]},
                    {"seq_len": 5, "services": ["c"], "probabilities": {"c": 0.5}},
                ]
            ),
            "a": _cell([{"seq_len": 1, "services": ["d"]}]),
            "b": _cell([]),
            "c": _cell([{"seq_len": 1, "services": ["d"]}]),
            "d": _cell([]),
        }
    )
    calls = callgraph.stochastic_calls(wm, "s0")
    assert calls == pytest.approx({"s0": 0, "a": 0.5, "b": 0.5, "c": 0.5, "d": 1.0})


def test_trace_calls_and_cycles():
    trace = {"s0": [{"s1": [{"s2": {}}], "s2__x": {}}, {"s3": []}]}
    assert callgraph.trace_calls(trace) == {"s1": 1, "s2": 2, "s3": 1}
    wm = parse_workmodel(
        {
            "s0": _cell([{"seq_len": 1, "services": ["s1"]}]),
            "s1": _cell([{"seq_len": 1, "services": ["s0"]}]),
        }
    )
    with pytest.raises(callgraph.CycleError, match="s0 -> s1 -> s0"):
        callgraph.stochastic_calls(wm, "s0")


# --- checks -------------------------------------------------------------------------------------


def test_counts_match_allows_requests_in_flight_only():
    side = {"started_total": 1000, "completed_total": 995, "failures_connection": 0}
    assert checks.counts_match(side, 995).ok
    assert checks.counts_match(side, 1000).ok
    assert checks.counts_match(side, 1000 + checks.COUNT_SLACK).ok
    assert not checks.counts_match(side, 1010).ok  # the stack saw traffic Locust did not send
    assert not checks.counts_match(side, 900).ok  # completed requests the stack never counted
    # requests that never reached the stack (connection failures) may be missing
    assert checks.counts_match({**side, "failures_connection": 50}, 946).ok


def test_error_rate_loadgen_cpu_and_delivery():
    assert checks.error_rate(10_000, 10).ok
    assert not checks.error_rate(10_000, 11).ok
    assert not checks.error_rate(0, 0).ok
    assert checks.error_rate(100, 50, info=True).info
    assert checks.loadgen_cpu(3.9, 5.0, 1).ok
    assert not checks.loadgen_cpu(4.0, 5.0, 1).ok
    assert checks.loadgen_cpu(6.0, 5.0, 2).ok  # 60 % of a core per process
    short = checks.open_loop_delivery(100, 97.9)
    assert not short.ok and short.info
    assert checks.open_loop_delivery(100, 98.0).ok
    ok, failed = checks.verdict([short, checks.error_rate(1, 1), checks.loadgen_cpu(0, 1, 1)])
    assert not ok and failed == ["error_rate"]  # info checks never fail a row
    assert checks.verdict([short]) == (True, [])


def test_mesh_crossed_uses_the_mesh_counters():
    expected = {"s0": 0.0, "s1": 1.0, "s2": 1.0}
    traffic = {"entry_requests": 100, "per_service": {"s0": 100, "s1": 100, "s2": 100}}
    assert checks.mesh_crossed(traffic, "s0", expected).ok
    broken = {"entry_requests": 100, "per_service": {"s0": 100, "s1": 100, "s2": 0}}
    check = checks.mesh_crossed(broken, "s0", expected)
    assert not check.ok and "no calls reached s2" in check.detail
    # too few entry requests to be sure a 1 % callee gets a call: not required
    rare = {"entry_requests": 100, "per_service": {"s0": 100, "s1": 0, "s2": 0}}
    assert checks.mesh_crossed(rare, "s0", {"s1": 0.01, "s2": 0.01}).ok


def test_check_records_carry_their_place():
    rec = checks.error_rate(10, 0).record("envoy", 2, "open-50")
    assert rec == {
        "mesh": "envoy",
        "rep": 2,
        "level": "open-50",
        "name": "error_rate",
        "ok": True,
        "detail": rec["detail"],
        "info": False,
    }


# --- max clean throughput -----------------------------------------------------------------------


CAPACITIES = {"dpumesh": 670.0, "envoy": 240.0, "nomesh": 290.0}


@pytest.mark.parametrize("count", range(2, 13))
@pytest.mark.parametrize(
    "capacities",
    [CAPACITIES, {"a": 30.0}, {"a": 500.0, "b": 360.0, "c": 400.0}, {"a": 5.0, "b": 2000.0}],
)
def test_ladder_is_common_sorted_bounded_and_reaches_past_the_fastest(capacities, count):
    rates = ladder.build(capacities, count)
    assert rates == sorted(set(rates))  # sorted, no rate twice
    assert 2 <= len(rates) <= count
    assert rates[-1] > max(capacities.values())  # past the fastest stack's capacity
    assert rates[0] < min(capacities.values())  # one rate every stack should sustain
    assert rates == ladder.build(dict(reversed(capacities.items())), count)  # order-free


def test_ladder_is_densest_around_the_knees():
    rates = ladder.build(CAPACITIES, 8)
    near = [r for r in rates if 0.5 * 240 <= r <= 290]  # the two slow stacks' knees
    assert len(near) >= 3, rates
    assert any(0.5 * 670 <= r <= 670 for r in rates), rates  # and the fast one's
    with pytest.raises(ValueError, match="no stack completed"):
        ladder.build({"a": 0.0}, 8)
    with pytest.raises(ValueError, match="at least 2"):
        ladder.build(CAPACITIES, 1)


def _climb(rates, capacity):
    climb = ladder.Climb(rates)
    while (rate := climb.next_rate()) is not None:
        climb.record(rate, rate <= capacity)
    return climb


def test_a_stack_climbs_until_two_unclean_rates():
    rates = [100.0, 200.0, 300.0, 400.0, 500.0, 600.0]
    climb = _climb(rates, capacity=250)
    assert list(climb.results) == [100, 200, 300, 400]  # 300 and 400 unclean: stop
    assert climb.skipped == [500, 600]
    assert _climb(rates, capacity=1e9).skipped == []  # clean all the way up
    assert list(_climb(rates, capacity=0).results) == [100, 200]


def test_refinement_stays_between_clean_and_dirty():
    assert ladder.refine({100: True, 200: True, 300: False, 400: False}) == 250
    assert ladder.refine({100: True, 200: True, 250: True, 300: False}) == 275
    # Non-monotonic results: the bracket is the highest clean and the lowest dirty above it.
    assert ladder.refine({100: False, 200: True, 300: False}) == 250
    assert ladder.refine({100: True, 200: True}) is None  # nothing dirty above
    assert ladder.refine({100: False, 200: False}) is None  # nothing clean
    assert ladder.refine({100: True, 104: False}) is None  # already within 5 %
    for clean in range(10, 400, 37):
        for dirty in range(clean + 2, 500, 53):
            rate = ladder.refine({clean: True, dirty: False})
            assert rate is None or clean < rate < dirty


def test_max_clean_is_a_bound_at_the_top():
    assert ladder.max_clean({100: True, 200: False}, top=400) == ladder.MaxClean(100, False)
    assert ladder.max_clean({100: True, 400: True}, top=400) == ladder.MaxClean(400, True)
    assert ladder.max_clean({100: False}, top=400) == ladder.MaxClean(None, False)
    reps = [ladder.MaxClean(400, True), ladder.MaxClean(300, False), ladder.MaxClean(400, True)]
    assert ladder.median_max_clean(reps) == ladder.MaxClean(400, True)
    # An even count: the lower middle one, a rate that was measured, never a mean of a bound.
    two = [ladder.MaxClean(400, True), ladder.MaxClean(300, False)]
    assert ladder.median_max_clean(two) == ladder.MaxClean(300, False)
    tops = [ladder.MaxClean(400, True), ladder.MaxClean(400, True)]
    assert ladder.median_max_clean(tops) == ladder.MaxClean(400, True)
    none = [ladder.MaxClean(None, False), ladder.MaxClean(200, False)]
    assert ladder.median_max_clean(none) == ladder.MaxClean(None, False)
    assert ladder.median_max_clean([ladder.MaxClean(None, False)]) == ladder.MaxClean(None, False)


# --- results ------------------------------------------------------------------------------------


def _row(**over):
    summ = latency.LatencySummary(10, 1500.5, 1000, 2000, 3000, 4000, 5000, 900)
    base = dict(
        mesh="envoy",
        stack="envoy",
        mode="local",
        workmodel="default.json",
        rep=1,
        level="closed-8",
        users=8,
        offered_rps=None,
        summary=summ,
        sidecar={"achieved_rps": 123.456789, "requests": 10, "failures": 0, "window_s": 8.0},
        usage={
            "cpu_host_ms_per_req": 1.5,
            "cpu_offload_ms_per_req": 0.0,
            "cpu_loadgen_ms_per_req": 0.25,
            "window_s": 7.9,
            "requests": 9,
            "rss_host_mb": 100.0,
            "rss_offload_mb": 0.0,
        },
        downstream_calls_per_req=2.0,
        cross_node_per_req=None,
        nodes=0,
        mtls=False,
        dpu_model={  # the Placement.record() keys results.csv takes
            "placement": "host=0;dpu=1;loadgen=1",
            "dpu_profile": "bluefield3",
            "dpu_speed": 0.5,
            "dma_latency_us": 1.0,
            "dma_gbps": 504.1,
            "dpu_cores": 1,
        },
        checks_ok=True,
        failed_checks=[],
    )
    return results.result_row(**{**base, **over})


#: The columns DESIGN §6 requires of results.csv.
DESIGN_COLUMNS = (
    *("mesh", "mode", "workmodel", "rep", "users", "offered_rps", "achieved_rps", "requests"),
    *("failures", "duration_s", "mean_us", "p50_us", "p90_us", "p99_us", "p999_us"),
    *("cpu_host_ms_per_req", "cpu_offload_ms_per_req", "cpu_loadgen_ms_per_req"),
    *("rss_host_mb", "rss_offload_mb"),
)


def test_results_csv_has_the_contract_columns(tmp_path):
    out = results.ResultsDir(tmp_path)
    out.append_result(_row())
    out.append_result(
        _row(level="open-50", offered_rps=50.0, checks_ok=False, failed_checks=["a", "b"])
    )
    with (tmp_path / schema.RESULTS_CSV).open() as fh:
        rows = list(csv.DictReader(fh))
    assert tuple(rows[0]) == schema.RESULTS.names
    assert set(DESIGN_COLUMNS) <= set(rows[0])
    assert {c.name: rows[0][c.name] for c in schema.DPU_MODEL} == {
        "placement": "host=0;dpu=1;loadgen=1",
        "dpu_profile": "bluefield3",
        "dpu_speed": "0.5",
        "dma_latency_us": "1",
        "dma_gbps": "504.1",
        "dpu_cores": "1",
    }
    assert rows[0]["offered_rps"] == ""  # closed loop
    assert rows[1]["offered_rps"] == "50"
    assert rows[0]["achieved_rps"] == "123.457"
    assert rows[0]["p50_us"] == "1000" and rows[0]["cpu_offload_ms_per_req"] == "0"
    assert rows[0]["checks_ok"] == "true" and rows[0]["checks"] == ""
    assert rows[1]["checks_ok"] == "false" and rows[1]["checks"] == "a;b"
    assert (tmp_path / "hist").is_dir() and (tmp_path / "locust").is_dir()


def test_empty_histogram_and_unmeasured_cpu_leave_cells_empty():
    empty = latency.summarize(latency.new_histogram())
    row = _row(summary=empty, usage=None)
    assert row["p50_us"] is None and row["cpu_host_ms_per_req"] is None


def test_roles_csv_rows(tmp_path):
    usage = {
        "window_s": 5.0,
        "roles": {
            "app": {
                "role_class": "host",
                "cpu_s": 1.0,
                "cpu_ms_per_req": 2.0,
                "vcpu_per_1000rps": 2.0,
                "rss_mean_mb": 10.0,
                "rss_max_mb": 11.0,
                "pss_mean_mb": 8.0,
                "processes": 3,
                "notes": ["x"],
            },
            "sidecar": {"processes": 0},
        },
    }
    rows = results.role_rows("nomesh", "nomesh", 2, "closed-8", usage)
    assert [r["role"] for r in rows] == ["app"]  # roles without processes are left out
    out = results.ResultsDir(tmp_path)
    out.append_roles(rows)
    with (tmp_path / schema.ROLES_CSV).open() as fh:
        (rec,) = list(csv.DictReader(fh))
    assert rec["side"] == "host" and rec["cpu_ms_per_req"] == "2" and rec["rep"] == "2"
    assert rec["vcpu_per_1000rps"] == "2"


def _write_part(path, values, requests):
    hist = latency.new_histogram()
    for v in values:
        hist.record_value(v)
    latency.dump_histogram(hist, path)
    side = {"requests": requests, "failures": 0, "achieved_rps": 10.0, "window_s": 1.0}
    latency.sidecar_path(path).write_text(json.dumps(side))


def test_distributed_histograms_merge_exactly_and_parts_move_aside(tmp_path):
    out = results.ResultsDir(tmp_path)
    target = out.hist_path("dpumesh", 1, "open-50")
    _write_part(latency.worker_path(target, 0), [100, 200], 2)
    _write_part(latency.worker_path(target, 1), [300], 1)
    hist, side = results.merge_histograms(target)
    assert hist.get_total_count() == 3 and side["requests"] == 3
    assert side["achieved_rps"] == 20.0  # per-process rates add up
    assert latency.histogram_files(target) == [target]  # no worker file left next to it
    assert latency.load_histogram(target).get_total_count() == 3
    assert sorted(p.name for p in (target.parent / "parts").iterdir()) == [
        "dpumesh-rep1-open-50.w0.hdr",
        "dpumesh-rep1-open-50.w0.hdr.json",
        "dpumesh-rep1-open-50.w1.hdr",
        "dpumesh-rep1-open-50.w1.hdr.json",
    ]
    assert latency.load_sidecar(target)["requests"] == 3


def test_run_dirs_and_latest_link(tmp_path):
    from datetime import UTC, datetime

    now = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
    first = results.new_run_dir(tmp_path, now)
    second = results.new_run_dir(tmp_path, now)
    assert first.name == "20260102T030405Z" and second.name == "20260102T030405Z-1"
    results.link_latest(first)
    results.link_latest(second)
    assert (tmp_path / "latest").resolve() == second.resolve()


# --- load generator -----------------------------------------------------------------------------


def test_locust_command_line(tmp_path):
    spec = LocustSpec(
        host="http://127.0.0.1:5005",
        users=8,
        rate=50.0,
        excluded_s=4,
        measured_s=8,
        hdr_out=tmp_path / "h.hdr",
        csv_prefix=tmp_path / "x",
        request_id_prefix="r1-open-50-",
        processes=2,
    )
    argv = locust_argv(spec)
    joined = " ".join(argv)
    for part in (
        "--headless",
        "-u 8 -r 8 -t 12s",
        "--warmup-s 4",
        "--open-loop-rate 50",
        "--request-id-prefix r1-open-50-",
        "--csv-full-history",
        "--processes 2",
    ):
        assert part in joined
    assert argv[-1] == "HttpMeshUser"
    closed = locust_argv(LocustSpec(**{**spec.__dict__, "rate": None, "processes": 1}))
    assert "--open-loop-rate 0" in " ".join(closed) and "--processes" not in closed


# --- repeatability benchmark --------------------------------------------------------------------


def _results_dir(path, closed_rps, best):
    """A results directory written by the schema: envoy's closed-loop rows and its meta."""
    path.mkdir()
    filler = {int: 0, float: 0.0, str: "", bool: True}
    blank = {c.name: None if c.optional else filler[c.kind] for c in schema.RESULTS.columns}
    rows = [
        {**blank, "stack": "envoy", "level": "closed-8", "rep": rep, "achieved_rps": rps}
        | {"p50_us": 1000.0, "p99_us": 2000.0, "cpu_host_ms_per_req": 4.0}
        for rep, rps in enumerate(closed_rps, 1)
    ]
    schema.append_rows(path, schema.RESULTS, rows)
    results.ResultsDir(path).write_meta(
        {
            "max_clean_throughput": {"envoy": {"rps": best, "at_top": False}},
            "machine_speed": {"segments": [{"host_mloops_per_s": s} for s in (90, 100, 110)]},
        }
    )
    return path


def test_repeatability_compares_medians_and_spreads(tmp_path):
    from harness.measure import speed
    from harness.run import repeatability

    assert speed.spread([90, 100, 110]) == pytest.approx(0.2)
    assert speed.spread([5]) is None
    a = _results_dir(tmp_path / "a", [100, 100, 100], 80)
    b = _results_dir(tmp_path / "b", [90, 110, 100], 90)
    text = repeatability.compare(a, b)
    line = next(ln for ln in text.splitlines() if "req/s" in ln and "closed-8" in ln)
    assert line.split()[-4:] == ["0.0%", "100.00", "20.0%", "0.0%"]  # A spread, B, B spread, diff
    assert "A         80   B         90" in text
    assert "spread 20.0%" in text  # the machine's own speed probe
    assert "largest closed-loop throughput spread across repetitions: 20.0%" in text


def test_a_whatif_variant_gets_its_own_dpu_model_and_settings():
    """A DMA or cores value reaches the variant's model and its stack settings, nothing else."""
    cfg = config.build(overrides={"placement": "shared", "dpu_profile": "ideal"})
    dma = plan.Stack("dpumesh", (("dma_latency_us", 7.0),))
    with runner.prepare_placement(cfg, dma) as placed:
        assert placed.model.dma_latency_us == 7.0
        assert runner.settings_of(cfg, placed.model).dma_latency_us == 7.0
    cores = plan.Stack("dpumesh", (("dpu_cores", 3.0),))
    with runner.prepare_placement(cfg, cores) as placed:
        assert placed.model.dpu_cores == 3 and isinstance(placed.model.dpu_cores, int)
    with runner.prepare_placement(cfg) as placed:
        assert placed.model.dma_latency_us == 0.0 and placed.model.dpu_cores == 1


def test_the_harness_runs_on_the_load_generators_cpus_and_restores_its_affinity():
    import os

    from harness.measure import speed

    before = os.sched_getaffinity(0)
    one = {min(before)}
    with runner.on_cpus(frozenset(one)):
        assert os.sched_getaffinity(0) == one
        assert speed.loop_rate(before, seconds=0.01) > 0  # the probe moves, then comes back
        assert os.sched_getaffinity(0) == one
    assert os.sched_getaffinity(0) == before
    with runner.on_cpus(None):  # shared placement: nothing pinned
        assert os.sched_getaffinity(0) == before
