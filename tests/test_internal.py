"""Internal-service functions: pi, loader stages, response sizes, scale, custom functions."""

from __future__ import annotations

import os
import random
import statistics
import tempfile
import time
import tracemalloc
from pathlib import Path

import pytest

from mubench import internal
from mubench.internal import (
    BUILTINS,
    FunctionsError,
    check_functions,
    check_scale,
    colosseum,
    compute_pi,
    custom_names,
    load_functions,
    loader,
    pi_digits,
    response_body,
    scaled_count,
)
from mubench.workmodel import _BUILTIN_PARAMS, WorkmodelError, parse_workmodel

PI_50 = "314159265358979323846264338327950288419716939937510"
QUIET = {"sleep_stress": {"run": False}}


@pytest.fixture
def pi_calls(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Record the digit count of every pi computation instead of computing it."""
    calls: list[int] = []
    monkeypatch.setattr(internal, "pi_digits", calls.append)
    return calls


def test_pi_digits_are_correct() -> None:
    assert pi_digits(50) == PI_50
    assert pi_digits(0) == "3"


@pytest.mark.parametrize("mean_kb", [1, 11, 100])
def test_response_size_mean_over_2000_draws_is_within_5_percent(mean_kb: float) -> None:
    rng = random.Random(7)
    sizes = [len(response_body(mean_kb, rng)) for _ in range(2000)]
    assert abs(statistics.fmean(sizes) - 1000 * mean_kb) < 0.05 * 1000 * mean_kb
    assert min(sizes) >= 1


def test_loader_response_size_follows_mean_response_size() -> None:
    rng = random.Random(3)
    params = {**QUIET, "mean_response_size": 2}
    sizes = [len(loader(params, rng)) for _ in range(2000)]
    assert abs(statistics.fmean(sizes) - 2000) < 100


def test_zero_mean_response_size_gives_one_character() -> None:
    assert response_body(0, random.Random(1)) == "m"


def test_same_rng_seed_same_output() -> None:
    params = {**QUIET, "mean_response_size": 5}
    assert loader(params, random.Random(11)) == loader(params, random.Random(11))


def test_compute_pi_draws_digits_uniformly_in_range(pi_calls: list[int]) -> None:
    rng = random.Random(5)
    for _ in range(300):
        compute_pi({"range_complexity": [10, 14]}, rng)
    assert set(pi_calls) == {10, 11, 12, 13, 14}


def test_compute_pi_defaults(pi_calls: list[int]) -> None:
    rng = random.Random(2)
    sizes = [len(compute_pi({}, rng)) for _ in range(500)]
    assert min(pi_calls) >= 50 and max(pi_calls) <= 100
    assert 8000 < statistics.fmean(sizes) < 12000  # default mean_response_size 10 kB


def test_loader_sleeps_10ms_by_default_when_the_stage_is_omitted() -> None:
    start = time.perf_counter()
    loader({}, random.Random(1))
    assert time.perf_counter() - start >= 0.01


def test_loader_stage_present_without_run_keeps_the_default() -> None:
    start = time.perf_counter()
    loader({"sleep_stress": {"sleep_time": 0.05}}, random.Random(1))
    assert time.perf_counter() - start >= 0.05


def test_loader_stage_with_run_false_is_off(pi_calls: list[int]) -> None:
    start = time.perf_counter()
    for _ in range(20):
        loader({"sleep_stress": {"run": False, "sleep_time": 1}}, random.Random(1))
    assert time.perf_counter() - start < 0.2
    assert pi_calls == []


def test_cpu_stress_runs_trials_per_job_in_a_pool(pi_calls: list[int]) -> None:
    params = {
        **QUIET,
        "cpu_stress": {
            "run": True,
            "range_complexity": [20, 30],
            "thread_pool_size": 3,
            "trials": 4,
        },
    }
    loader(params, random.Random(9))
    assert len(pi_calls) == 12
    assert all(20 <= d <= 30 for d in pi_calls)
    # Each job draws its digit count once and reuses it for its trials.
    assert len(set(pi_calls)) <= 3


def test_scale_multiplies_trials_and_sleep(pi_calls: list[int]) -> None:
    params = {
        "cpu_stress": {
            "run": True,
            "range_complexity": [5, 5],
            "thread_pool_size": 2,
            "trials": 10,
        },
        "sleep_stress": {"run": True, "sleep_time": 2.0},
    }
    start = time.perf_counter()
    loader(params, random.Random(1), scale=0.01)
    assert time.perf_counter() - start < 0.5  # 20 ms of sleep, not 2 s
    # 10 trials x 0.01 = 0.1: each job runs 0 or 1 computation.
    assert len(pi_calls) in (0, 2)
    pi_calls.clear()
    loader(params, random.Random(1), scale=0.5)
    assert len(pi_calls) == 10


@pytest.mark.parametrize("bad", [-0.5, float("nan"), float("inf")])
def test_check_scale_rejects_negative_and_non_finite(bad: float) -> None:
    with pytest.raises(ValueError, match="must be a finite number >= 0"):
        check_scale(bad)


def test_check_scale_accepts_zero_and_up() -> None:
    assert [check_scale(s) for s in (0.0, 0.01, 3)] == [0.0, 0.01, 3]


def test_scaled_count_is_unbiased() -> None:
    rng = random.Random(4)
    assert scaled_count(33, 1.0, rng) == 33
    assert scaled_count(10, 0.5, rng) == 5
    draws = [scaled_count(1, 0.3, rng) for _ in range(20000)]
    assert set(draws) == {0, 1}
    assert abs(statistics.fmean(draws) - 0.3) < 0.02


def test_compute_pi_scale_is_the_expected_number_of_computations(pi_calls: list[int]) -> None:
    rng = random.Random(8)
    for _ in range(1000):
        compute_pi({"range_complexity": [1, 1]}, rng, scale=0.25)
    assert 180 < len(pi_calls) < 320


def test_memory_stress_allocates_the_requested_kilobytes() -> None:
    params = {**QUIET, "memory_stress": {"run": True, "memory_size": 3000, "memory_io": 500}}
    tracemalloc.start()
    try:
        loader(params, random.Random(1))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak >= 3000 * 1000


def test_disk_stress_writes_fsyncs_reads_shuffled_and_deletes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    temp_dir = tmp_path / "tmp"
    temp_dir.mkdir()
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    monkeypatch.setattr(tempfile, "tempdir", str(temp_dir))
    synced: list[int] = []
    offsets: list[int] = []
    real_fsync, real_pread = os.fsync, os.pread

    def fsync(fd: int) -> None:
        synced.append(fd)
        real_fsync(fd)

    def pread(fd: int, size: int, offset: int) -> bytes:
        offsets.append(offset)
        data = real_pread(fd, size, offset)
        assert len(data) == size
        return data

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "pread", pread)
    params = {
        **QUIET,
        "disk_stress": {"run": True, "disk_write_block_count": 50, "disk_write_block_size": 512},
    }
    loader(params, random.Random(1))
    assert len(synced) == 1
    assert sorted(offsets) == [i * 512 for i in range(50)]
    assert offsets != sorted(offsets)
    assert list(temp_dir.iterdir()) == [] and list(cwd.iterdir()) == []


def test_colosseum_is_constant_ascii_art_and_ignores_params() -> None:
    art = colosseum({"mean_response_size": 10}, random.Random(1))
    assert art == colosseum({}, random.Random(2))
    assert art.isascii() and art.count("\n") > 5


# -- custom functions ---------------------------------------------------------------------


def test_custom_functions_follow_the_mubench_convention(tmp_path: Path) -> None:
    (tmp_path / "Shapes.py").write_text(
        "import json\n"
        "def square(params):\n    return 'x' * params['n'] ** 2\n"
        "def echo(params):\n    return json.dumps(params, sort_keys=True)\n"
        "def _helper(params):\n    return 'hidden'\n"
    )
    (tmp_path / "_private.py").write_text("def secret(params):\n    return 's'\n")
    (tmp_path / "notes.txt").write_text("def txt(params): pass\n")
    functions = load_functions(str(tmp_path))
    assert set(functions) == {*BUILTINS, "square", "echo"}
    assert functions["square"]({"n": 3}, random.Random(1), 1.0) == "x" * 9
    assert functions["echo"]({"b": 1, "a": [2]}, random.Random(1), 1.0) == '{"a": [2], "b": 1}'


def test_custom_function_replaces_a_builtin(tmp_path: Path) -> None:
    (tmp_path / "mine.py").write_text("def loader(params):\n    return 'custom'\n")
    assert load_functions(str(tmp_path))["loader"]({}, random.Random(1), 1.0) == "custom"


def test_custom_names_are_the_functions_not_built_in(tmp_path: Path) -> None:
    (tmp_path / "mine.py").write_text("def loader(params):\n    return ''\ndef f(params): pass\n")
    assert custom_names(load_functions(str(tmp_path))) == {"loader", "f"}
    assert custom_names(load_functions()) == set()


def test_the_loader_checks_every_parameter_the_builtins_read() -> None:
    """The workmodel's parameter table and the functions' defaults name the same keys."""
    assert set(_BUILTIN_PARAMS) == set(BUILTINS)
    assert set(_BUILTIN_PARAMS["compute_pi"]) == set(internal._COMPUTE_PI_DEFAULTS) - {
        "mean_response_size"
    }
    loader_params = _BUILTIN_PARAMS["loader"]
    defaults = internal._LOADER_DEFAULTS
    assert set(loader_params) == set(defaults) - {"mean_response_size"}
    for stage, checks in loader_params.items():
        assert set(checks) == set(defaults[stage]), stage


def test_custom_function_name_clash_between_files(tmp_path: Path) -> None:
    (tmp_path / "a.py").write_text("def f(params):\n    return ''\n")
    (tmp_path / "b.py").write_text("def f(params):\n    return ''\n")
    with pytest.raises(FunctionsError, match=r"b\.py: function 'f' is also defined in a\.py"):
        load_functions(str(tmp_path))


def test_custom_function_import_error_is_one_line(tmp_path: Path) -> None:
    (tmp_path / "broken.py").write_text("import no_such_module_here\n")
    with pytest.raises(FunctionsError) as info:
        load_functions(str(tmp_path))
    assert "broken.py: import failed: ModuleNotFoundError" in str(info.value)
    assert "\n" not in str(info.value)


def test_functions_dir_must_exist(tmp_path: Path) -> None:
    with pytest.raises(FunctionsError, match="not a directory"):
        load_functions(str(tmp_path / "missing"))


def test_unknown_internal_function_is_a_startup_error() -> None:
    wm = parse_workmodel(
        {
            "s0": {
                "internal_service": {"loader": {}},
                "alternative_behaviors": {"x": {"internal_service": {"nope": {}}}},
            }
        }
    )
    with pytest.raises(WorkmodelError, match="service 's0': behaviour 'x': unknown internal"):
        check_functions(wm["s0"], load_functions())
