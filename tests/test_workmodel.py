"""Workmodel loading/validation, the process cap, and the project's own workmodels."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from mubench.workmodel import (
    DEFAULT_PATH,
    WorkmodelError,
    load_workmodel,
    parse_workmodel,
    plan_processes,
)
from tests.cellcases import REPO, http_app_cli

SHARED_WORKMODELS = sorted((REPO.parent / "shared" / "workmodels").glob("*.json"))
SEED_README = REPO.parent / "shared" / "seeds" / "dpumesh-README.ko.md"


def leaf(**extra) -> dict:
    """A minimal valid service spec."""
    return {"external_services": [], "internal_service": {"compute_pi": {}}, **extra}


def pi(**params: object) -> dict:
    """A leaf whose internal service is compute_pi with `params`."""
    return leaf(internal_service={"compute_pi": params})


def stage(name: str, **params: object) -> dict:
    """A leaf whose internal service is the loader with one stage set to `params`."""
    return leaf(internal_service={"loader": {name: params}})


def write(tmp_path: Path, content: object, name: str = "workmodel.json") -> str:
    path = tmp_path / name
    path.write_text(content if isinstance(content, str) else json.dumps(content))
    return str(path)


def test_shared_workmodels_are_present() -> None:
    assert len(SHARED_WORKMODELS) == 5


@pytest.mark.parametrize("path", SHARED_WORKMODELS, ids=lambda p: p.stem)
def test_every_real_workmodel_loads_unchanged(path: Path) -> None:
    raw = json.loads(path.read_text())
    workmodel = load_workmodel(str(path))
    assert list(workmodel) == list(raw)
    for sid, service in workmodel.items():
        assert service.id == sid
        assert service.url == raw[sid].get("url", sid)
        assert service.path == raw[sid].get("path", DEFAULT_PATH)
        assert service.behavior.function == next(iter(raw[sid]["internal_service"]))
        assert service.workers == raw[sid].get("workers")


def test_missing_url_and_path_are_filled(tmp_path: Path) -> None:
    wm = load_workmodel(write(tmp_path, {"s0": leaf()}))
    assert (wm["s0"].url, wm["s0"].path) == ("s0", "/api/v1")


def test_unknown_keys_are_ignored(tmp_path: Path) -> None:
    spec = leaf(teastore_ref="webui", image="x", namespace="default", replicas=3)
    spec["cpu-requests"] = "100m"
    spec["internal_service"] = {"loader": {"function_id": "f1", "whatever": [1]}}
    wm = load_workmodel(write(tmp_path, {"s0": spec}))
    assert wm["s0"].behavior.params == {"function_id": "f1", "whatever": [1]}


def test_first_internal_function_key_is_used(tmp_path: Path) -> None:
    spec = leaf(internal_service={"loader": {"a": 1}, "compute_pi": {}})
    assert load_workmodel(write(tmp_path, {"s0": spec}))["s0"].behavior.function == "loader"


def test_legacy_mean_bandwidth_becomes_mean_response_size(tmp_path: Path) -> None:
    spec = leaf(internal_service={"loader": {"mean_bandwidth": 7, "mean_response_size": 1}})
    params = load_workmodel(write(tmp_path, {"s0": spec}))["s0"].behavior.params
    assert params == {"mean_response_size": 7}


def test_empty_services_list_and_missing_external_services_are_valid(tmp_path: Path) -> None:
    s0 = leaf(external_services=[{"seq_len": 1, "services": []}])
    s1 = {"internal_service": {"compute_pi": {}}}
    wm = load_workmodel(write(tmp_path, {"s0": s0, "s1": s1}))
    assert wm["s0"].behavior.groups[0].services == ()
    assert wm["s1"].behavior.groups == ()


def test_probabilities_for_services_outside_the_group_are_ignored(tmp_path: Path) -> None:
    group = {"seq_len": 1, "services": ["s1"], "probabilities": {"s1": 0.5, "s9": "junk"}}
    wm = load_workmodel(write(tmp_path, {"s0": leaf(external_services=[group]), "s1": leaf()}))
    assert wm["s0"].behavior.groups[0].probabilities == {"s1": 0.5}


def test_alternative_behaviors_replace_only_what_they_define(tmp_path: Path) -> None:
    s0 = leaf(
        external_services=[{"seq_len": 1, "services": ["s1"]}],
        alternative_behaviors={
            "calls": {"external_services": [{"seq_len": 1, "services": ["s2"]}]},
            "work": {"internal_service": {"colosseum": {}}},
        },
    )
    wm = load_workmodel(write(tmp_path, {"s0": s0, "s1": leaf(), "s2": leaf()}))
    service = wm["s0"]
    assert service.behavior_for("calls").function == "compute_pi"
    assert service.behavior_for("calls").groups[0].services == ("s2",)
    assert service.behavior_for("work").function == "colosseum"
    assert service.behavior_for("work").groups == service.behavior.groups
    assert service.behavior_for("nope") is service.behavior


# (file content, the message after "<path>: ")
INVALID = {
    "missing-internal-service": (
        {"s0": leaf(), "s3": {"external_services": []}},
        "service 's3': missing 'internal_service'",
    ),
    "seq-len-string": (
        {"s0": leaf(external_services=[{"seq_len": "2", "services": []}])},
        "service 's0': 'external_services[0].seq_len' must be a non-negative integer, got \"2\"",
    ),
    "seq-len-float": (
        {"s0": leaf(external_services=[{"seq_len": 1.5, "services": []}])},
        "service 's0': 'external_services[0].seq_len' must be a non-negative integer, got 1.5",
    ),
    "seq-len-bool": (
        {"s0": leaf(external_services=[{"seq_len": 1, "services": []}, {"seq_len": True}])},
        "service 's0': 'external_services[1].seq_len' must be a non-negative integer, got true",
    ),
    "seq-len-missing": (
        {"s0": leaf(external_services=[{"services": []}])},
        "service 's0': missing 'external_services[0].seq_len'",
    ),
    "undefined-callee": (
        {"s0": leaf(external_services=[{"seq_len": 1, "services": ["s1", "s9"]}]), "s1": leaf()},
        "service 's0': 'external_services[0].services' calls undefined service 's9'",
    ),
    "undefined-callee-in-alternative": (
        {
            "s0": leaf(
                alternative_behaviors={
                    "b": {"external_services": [{"seq_len": 1, "services": ["s9"]}]}
                }
            )
        },
        "service 's0': 'alternative_behaviors.b.external_services[0].services' "
        "calls undefined service 's9'",
    ),
    "invalid-json": ('{"s0": {', "invalid JSON: Expecting property name enclosed"),
    "not-an-object": ([leaf()], "top level must be an object of services, got an array"),
    "service-not-an-object": ({"s0": 3}, "service 's0': spec must be an object, got 3"),
    "no-services": ({}, "no services defined"),
    "bad-workers": ({"s0": leaf(workers=0)}, "service 's0': 'workers' must be a positive"),
    "service-id-with-a-dot": (
        {"s0": leaf(), "a.b": leaf()},
        'service id "a.b" must match [A-Za-z0-9][A-Za-z0-9_-]{0,62} (it is a URL path segment',
    ),
    "service-id-empty": ({"": leaf()}, 'service id "" must match'),
    "service-id-with-a-slash": ({"s/0": leaf()}, 'service id "s/0" must match'),
    "pi-range-string": (
        {"s0": pi(range_complexity="x")},
        "service 's0': 'internal_service.compute_pi.range_complexity' must be [low, high] "
        'with integers 0 <= low <= high (pi digits), got "x"',
    ),
    "pi-range-reversed": (
        {"s0": pi(range_complexity=[100, 50])},
        "service 's0': 'internal_service.compute_pi.range_complexity' must be [low, high]",
    ),
    "pi-range-float": (
        {"s0": pi(range_complexity=[1.5, 3])},
        "service 's0': 'internal_service.compute_pi.range_complexity' must be [low, high]",
    ),
    "pi-range-one-number": (
        {"s0": pi(range_complexity=[5])},
        "service 's0': 'internal_service.compute_pi.range_complexity' must be [low, high]",
    ),
    "loader-pool-zero": (
        {"s0": stage("cpu_stress", run=True, thread_pool_size=0)},
        "service 's0': 'internal_service.loader.cpu_stress.thread_pool_size' "
        "must be a positive integer, got 0",
    ),
    "loader-trials-negative": (
        {"s0": stage("cpu_stress", trials=-1)},
        "service 's0': 'internal_service.loader.cpu_stress.trials' "
        "must be a non-negative integer, got -1",
    ),
    "loader-run-string": (
        {"s0": stage("memory_stress", run="false")},
        "service 's0': 'internal_service.loader.memory_stress.run' must be true or false, "
        'got "false"',
    ),
    "loader-memory-size-float": (
        {"s0": stage("memory_stress", memory_size=1.5)},
        "service 's0': 'internal_service.loader.memory_stress.memory_size' must be a non-negative",
    ),
    "loader-disk-block-string": (
        {"s0": stage("disk_stress", disk_write_block_size="1k")},
        "service 's0': 'internal_service.loader.disk_stress.disk_write_block_size' must be a non",
    ),
    "loader-sleep-negative": (
        {"s0": stage("sleep_stress", sleep_time=-0.01)},
        "service 's0': 'internal_service.loader.sleep_stress.sleep_time' "
        "must be a number >= 0 (seconds), got -0.01",
    ),
    "loader-sleep-garbage": (
        {"s0": stage("sleep_stress", sleep_time="10ms")},
        "service 's0': 'internal_service.loader.sleep_stress.sleep_time' must be a number >= 0",
    ),
    "loader-sleep-infinite": (
        {"s0": stage("sleep_stress", sleep_time=float("inf"))},
        "service 's0': 'internal_service.loader.sleep_stress.sleep_time' "
        "must be a number >= 0 (seconds), got Infinity",
    ),
    "loader-stage-not-an-object": (
        {"s0": leaf(internal_service={"loader": {"cpu_stress": True}})},
        "service 's0': 'internal_service.loader.cpu_stress' must be an object, got true",
    ),
    "response-size-nan": (
        {"s0": pi(mean_response_size=float("nan"))},
        "service 's0': 'internal_service.compute_pi.mean_response_size' must be a number >= 0",
    ),
    "bad-param-in-alternative": (
        {
            "s0": leaf(
                alternative_behaviors={
                    "b": {"internal_service": {"loader": {"cpu_stress": {"trials": "5"}}}}
                }
            )
        },
        "service 's0': 'alternative_behaviors.b.internal_service.loader.cpu_stress.trials' "
        'must be a non-negative integer, got "5"',
    ),
}


@pytest.mark.parametrize("case", INVALID, ids=str)
def test_invalid_workmodels_give_one_line_naming_file_service_and_key(
    tmp_path: Path, case: str
) -> None:
    content, message = INVALID[case]
    path = write(tmp_path, content)
    with pytest.raises(WorkmodelError) as info:
        load_workmodel(path)
    text = str(info.value)
    assert "\n" not in text
    assert text.startswith(f"{path}: {message}")


def test_params_the_builtins_accept_load(tmp_path: Path) -> None:
    loader = {
        "cpu_stress": {"run": True, "range_complexity": [0, 0], "thread_pool_size": 1, "trials": 0},
        "memory_stress": {"memory_size": 0, "memory_io": 0},
        "disk_stress": {"disk_write_block_count": 0, "tmp_file_name": "ignored.txt"},
        "sleep_stress": {"run": False, "sleep_time": 0},
        "function_id": "f1",
    }
    spec = {
        "s0": leaf(internal_service={"loader": loader}),
        "s1": pi(range_complexity=[7, 7], mean_response_size=0.5),
        "s2": leaf(internal_service={"colosseum": {"range_complexity": "ignored"}}),
    }
    assert load_workmodel(write(tmp_path, spec))["s0"].behavior.params == loader


def test_custom_functions_keep_free_form_params(tmp_path: Path) -> None:
    """Also a custom function replacing a built-in: it takes its own parameters."""
    spec = {"s0": pi(range_complexity="x"), "s1": leaf(internal_service={"mine": {"a": []}})}
    path = write(tmp_path, spec)
    with pytest.raises(WorkmodelError, match="range_complexity"):
        load_workmodel(path)
    wm = load_workmodel(path, custom={"compute_pi", "mine"})
    assert wm["s0"].behavior.params == {"range_complexity": "x"}


def test_unreadable_workmodel(tmp_path: Path) -> None:
    missing = tmp_path / "nope.json"
    with pytest.raises(WorkmodelError, match=r"nope\.json: cannot read: No such file"):
        load_workmodel(str(missing))
    with pytest.raises(WorkmodelError, match="cannot read: Is a directory"):
        load_workmodel(str(tmp_path))


def test_parse_workmodel_names_its_source() -> None:
    with pytest.raises(WorkmodelError, match=r"^inline: service 'a': missing"):
        parse_workmodel({"a": {}}, source="inline")


def serve_s0(workmodel: str) -> subprocess.CompletedProcess[str]:
    """The http_app CLI serving s0 of `workmodel` (on a port it never gets to bind)."""
    return http_app_cli("--workmodel", workmodel, "--service", "s0", "--port", "1")


@pytest.mark.parametrize(
    "case", ["missing-internal-service", "invalid-json", "not-an-object", "loader-pool-zero"]
)
def test_cli_reports_invalid_workmodel_in_one_line_with_exit_2(tmp_path: Path, case: str) -> None:
    content, message = INVALID[case]
    path = write(tmp_path, content)
    proc = serve_s0(path)
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1, proc.stderr
    assert f"{path}: {message}" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_cli_unreadable_workmodel_exit_2(tmp_path: Path) -> None:
    proc = serve_s0(str(tmp_path / "x.json"))
    assert (proc.returncode, proc.stderr.count("\n")) == (2, 1)
    assert "x.json: cannot read" in proc.stderr


# -- process cap --------------------------------------------------------------------------


def many(count: int, workers: int | None, threads: int | None = None) -> dict:
    extra = {k: v for k, v in (("workers", workers), ("threads", threads)) if v is not None}
    return parse_workmodel({f"s{i}": leaf(**extra) for i in range(count)})


def test_real_workmodels_are_capped_by_default() -> None:
    for path in SHARED_WORKMODELS:
        plan, _ = plan_processes(load_workmodel(str(path)))
        assert sum(w for w, _ in plan.values()) <= 24
        assert all(1 <= w <= 2 for w, _ in plan.values())


def test_per_service_cap_keeps_threads_and_says_what_was_cut() -> None:
    plan, warnings = plan_processes(many(3, workers=8, threads=128))
    assert plan == {"s0": (2, 128), "s1": (2, 128), "s2": (2, 128)}
    assert warnings == [f"service 's{i}': workers 8 -> 2 (per-service cap 2)" for i in range(3)]


def test_total_cap_trims_the_largest_last_services_first() -> None:
    plan, warnings = plan_processes(many(20, workers=8), per_service_cap=2, total_cap=24)
    workers = [plan[f"s{i}"][0] for i in range(20)]
    assert workers == [2] * 4 + [1] * 16
    assert "service 's19': workers 8 -> 1 (per-service cap 2, total cap 24 over 20 services)" in (
        warnings
    )


def test_total_cap_below_one_worker_per_service_is_reported() -> None:
    plan, warnings = plan_processes(many(5, workers=1), total_cap=3)
    assert all(w == 1 for w, _ in plan.values())
    assert warnings == ["total cap 3 is below one worker per service: using 5 workers"]


def test_defaults_when_workers_threads_absent_and_no_warning_when_under_caps() -> None:
    plan, warnings = plan_processes(many(2, workers=None))
    assert plan == {"s0": (1, 16), "s1": (1, 16)}
    assert warnings == []


def test_caps_must_be_positive() -> None:
    with pytest.raises(ValueError):
        plan_processes(many(1, workers=1), per_service_cap=0)


# -- the project's workmodels ------------------------------------------------------------


def test_default_workmodel_is_light_and_parallel() -> None:
    wm = load_workmodel(str(REPO / "workmodels" / "default.json"))
    assert list(wm) == ["s0", "s1", "s2"]
    groups = wm["s0"].behavior.groups
    assert [(g.seq_len, g.services) for g in groups] == [(1, ("s1",)), (1, ("s2",))]
    for service in wm.values():
        params = service.behavior.params
        assert service.behavior.function == "loader"
        stages = ("cpu_stress", "memory_stress", "disk_stress", "sleep_stress")
        assert all(params[stage]["run"] is False for stage in stages)
        assert params["mean_response_size"] == 1
        assert (service.workers, service.threads) == (1, 16)


def test_seed_workmodel_is_the_readme_example_verbatim() -> None:
    readme = SEED_README.read_text(encoding="utf-8")
    section = readme[readme.index("## 마이크로서비스 구조 설정") :]
    start = section.index("```json\n") + len("```json\n")
    block = section[start : section.index("```", start)]
    assert (REPO / "workmodels" / "seed.json").read_text(encoding="utf-8") == block


def test_seed_workmodel_is_incomplete_and_says_so() -> None:
    """The README example defines s0 only, but calls s1 and s2."""
    path = str(REPO / "workmodels" / "seed.json")
    with pytest.raises(WorkmodelError, match="calls undefined service 's1'"):
        load_workmodel(path)
