"""DPU profiles: the shipped file loads, bad files fail with one clear line, overrides apply."""

from __future__ import annotations

from pathlib import Path

import pytest

from harness.placement.layout import PlacementError, auto_layout, parse_layout, shared_layout
from harness.placement.profiles import (
    DEFAULT_PATH,
    KEYS,
    Profile,
    Sourced,
    get_profile,
    load_profiles,
    resolve,
)

GOOD = """
[tiny]
description = "a test DPU"
dpu_cores = { value = 2, source = "a datasheet" }
dpu_speed = { value = 0.5, assumption = "a guess" }
dma_latency_us = { value = 1.5, source = "a paper", assumption = "and a step from it" }
dma_gbps = { value = 8, source = "a measurement" }
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "profiles.toml"
    path.write_text(text)
    return path


def error_of(path: Path) -> str:
    with pytest.raises(PlacementError) as exc:
        load_profiles(path)
    text = str(exc.value)
    assert "\n" not in text
    return text


def test_every_shipped_profile_loads_with_provenance() -> None:
    profiles = load_profiles()
    assert {"ideal", "bluefield2", "bluefield3"} <= set(profiles)
    for profile in profiles.values():
        assert profile.description
        assert set(profile.values) == set(KEYS)
        for value in profile.values.values():
            assert value.source or value.assumption
        model = resolve(profile.name)
        assert model.overridden == frozenset()
        assert model.dpu_cores >= 1 and model.dpu_speed > 0


def test_shipped_values() -> None:
    ideal = resolve("ideal")
    assert (ideal.dpu_cores, ideal.dpu_speed, ideal.dma_latency_us, ideal.dma_gbps) == (1, 1, 0, 0)
    bf2, bf3 = get_profile("bluefield2"), get_profile("bluefield3")
    assert bf2.values["dpu_cores"].value == 8 and "A72" in bf2.values["dpu_cores"].source
    assert bf3.values["dpu_cores"].value == 16 and "A78" in bf3.values["dpu_cores"].source
    # no public per-core Arm vs x86 ratio: the speeds are assumptions
    for profile in (bf2, bf3):
        assert profile.values["dpu_speed"].source is None
        assert profile.values["dpu_speed"].assumption
    assert "adf60a8" in bf3.values["dma_latency_us"].source
    assert bf3.values["dma_gbps"].value == pytest.approx(32 * 16 * 128 / 130, abs=0.05)
    assert bf2.values["dma_gbps"].value == pytest.approx(16 * 16 * 128 / 130, abs=0.05)


def test_a_good_file(tmp_path: Path) -> None:
    profiles = load_profiles(write(tmp_path, GOOD))
    tiny = profiles["tiny"]
    assert tiny == Profile(
        "tiny",
        "a test DPU",
        {
            "dpu_cores": Sourced(2, "a datasheet", None),
            "dpu_speed": Sourced(0.5, None, "a guess"),
            "dma_latency_us": Sourced(1.5, "a paper", "and a step from it"),
            "dma_gbps": Sourced(8.0, "a measurement", None),
        },
    )
    assert isinstance(tiny.values["dma_gbps"].value, float)
    assert get_profile("tiny", profiles) is tiny


@pytest.mark.parametrize(
    ("old", "new", "message"),
    [
        (
            'dma_gbps = { value = 8, source = "a measurement" }',
            'dma_gbps = { value = 8, source = "a measurement" }\nturbo = true',
            "profiles.toml: profile tiny: unknown key turbo",
        ),
        (
            'dpu_speed = { value = 0.5, assumption = "a guess" }',
            'dpu_speed = { value = 0.5, asumption = "a guess" }',
            "profile tiny: dpu_speed: unknown key asumption",
        ),
        (
            'dpu_speed = { value = 0.5, assumption = "a guess" }',
            "dpu_speed = { value = 0.5 }",
            "profile tiny: dpu_speed: value without source or assumption",
        ),
        (
            'dpu_speed = { value = 0.5, assumption = "a guess" }',
            "dpu_speed = 0.5",
            "profile tiny: dpu_speed: expected { value = ..., source or assumption = ... }",
        ),
        (
            'dpu_speed = { value = 0.5, assumption = "a guess" }',
            'dpu_speed = { value = 0.5, assumption = "" }',
            "profile tiny: dpu_speed: assumption must be a non-empty string",
        ),
        (
            'dpu_speed = { value = 0.5, assumption = "a guess" }',
            "dpu_speed = { value = 0.5, source = 3 }",
            "profile tiny: dpu_speed: source must be a non-empty string",
        ),
        (
            'dpu_speed = { value = 0.5, assumption = "a guess" }',
            'dpu_speed = { value = "fast", assumption = "a guess" }',
            "profile tiny: dpu_speed: must be a number, got 'fast'",
        ),
        (
            'dpu_cores = { value = 2, source = "a datasheet" }',
            'dpu_cores = { value = 2.5, source = "a datasheet" }',
            "profile tiny: dpu_cores: must be an integer, got 2.5",
        ),
        (
            'dpu_cores = { value = 2, source = "a datasheet" }',
            'dpu_cores = { value = true, source = "a datasheet" }',
            "profile tiny: dpu_cores: must be an integer, got True",
        ),
        (
            'dpu_cores = { value = 2, source = "a datasheet" }',
            'dpu_cores = { value = 0, source = "a datasheet" }',
            "profile tiny: dpu_cores: must be at least 1, got 0",
        ),
        (
            'dma_gbps = { value = 8, source = "a measurement" }',
            'dma_gbps = { value = -8, source = "a measurement" }',
            "profile tiny: dma_gbps: must be >= 0, got -8",
        ),
        (
            "dma_latency_us = { value = 1.5,",
            "dma_latency_us = { value = -0.1,",
            "profile tiny: dma_latency_us: must be >= 0, got -0.1",
        ),
        (
            'dpu_speed = { value = 0.5, assumption = "a guess" }',
            'dpu_speed = { value = 0, assumption = "a guess" }',
            "profile tiny: dpu_speed: must be > 0, got 0",
        ),
        (
            'dpu_speed = { value = 0.5, assumption = "a guess" }',
            'dpu_speed = { value = nan, assumption = "a guess" }',
            "profile tiny: dpu_speed: must be a number, got nan",
        ),
        (
            'dma_gbps = { value = 8, source = "a measurement" }\n',
            "",
            "profile tiny: missing dma_gbps",
        ),
        ('description = "a test DPU"', 'description = ""', "description must be a non-empty"),
        ("[tiny]", 'tiny = "x"\n[other]', "profile tiny: expected a table of dpu_cores"),
    ],
)
def test_bad_files_give_one_clear_line(tmp_path: Path, old: str, new: str, message: str) -> None:
    assert old in GOOD
    assert message in error_of(write(tmp_path, GOOD.replace(old, new)))


def test_unreadable_files(tmp_path: Path) -> None:
    assert "cannot read DPU profiles" in error_of(write(tmp_path, "[tiny\n"))
    assert "cannot read DPU profiles" in error_of(tmp_path / "absent.toml")


def test_unknown_profile() -> None:
    with pytest.raises(PlacementError) as exc:
        get_profile("bluefield9")
    assert str(exc.value) == (
        "unknown DPU profile 'bluefield9' (known: bluefield2, bluefield3, ideal)"
    )


def test_overrides_replace_single_values_and_are_recorded() -> None:
    model = resolve("bluefield3", {"dpu_speed": 0.25, "dma_gbps": None, "dma_latency_us": 0})
    base = get_profile("bluefield3").values
    assert model.dpu_speed == 0.25
    assert model.dma_latency_us == 0.0
    assert model.dma_gbps == base["dma_gbps"].value  # None: the option was not given
    assert model.dpu_cores == 16
    assert model.overridden == {"dpu_speed", "dma_latency_us"}
    assert model.profile.name == "bluefield3"
    assert model.columns() == {
        "dpu_profile": "bluefield3",
        "dpu_speed": 0.25,
        "dma_latency_us": 0.0,
        "dma_gbps": base["dma_gbps"].value,
    }


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"dpu_sped": 0.5}, "unknown DPU model option dpu_sped"),
        ({"dpu_speed": -0.5}, "option dpu_speed: must be > 0, got -0.5"),
        ({"dma_gbps": -1}, "option dma_gbps: must be >= 0, got -1"),
        ({"dpu_cores": 1.5}, "option dpu_cores: must be an integer, got 1.5"),
    ],
)
def test_bad_overrides(overrides: dict, message: str) -> None:
    with pytest.raises(PlacementError) as exc:
        resolve("ideal", overrides)
    assert str(exc.value) == message


def test_fit_reports_what_this_machine_cannot_give() -> None:
    bf3 = resolve("bluefield3")
    fit = bf3.fit(1)
    assert (fit.cores, fit.speed, fit.quota_cores) == (1, 0.5, 0.5)
    assert fit.unmet == ("bluefield3 has 16 DPU cores; the dpu set has 1 CPU, so 1 is simulated",)
    fast = resolve("ideal", {"dpu_speed": 2.0}).fit(2)
    assert (fast.cores, fast.speed, fast.quota_cores) == (1, 1.0, 1.0)  # 1 core over 2 CPUs
    assert fast.unmet == (
        "dpu_speed 2x is more than a host CPU gives: each simulated DPU core runs at 1x",
    )
    ideal = resolve("ideal").fit(1)
    assert (ideal.cores, ideal.quota_cores, ideal.unmet) == (1, None, ())
    many = resolve("bluefield2", {"dpu_speed": 0.5}).fit(4)
    assert (many.cores, many.quota_cores) == (4, 2.0)


def test_sentence() -> None:
    two = auto_layout({0, 1})
    assert resolve("bluefield3", {"dma_latency_us": 0.235, "dma_gbps": 569}).sentence(two) == (
        "DPU: 1 core (bluefield3 has 16) at 0.5x host speed, DMA 0.235 µs + 569 Gbit/s per "
        "transfer; host: cpu 0 for every stack; load generator: cpu 1, shared with the DPU"
    )
    assert resolve("ideal").sentence(two) == (
        "DPU: 1 core at 1x host speed, no DMA cost; host: cpu 0 for every stack; "
        "load generator: cpu 1, shared with the DPU"
    )
    eight = auto_layout(range(8))
    assert resolve("ideal", {"dma_gbps": 8, "dpu_cores": 2}).sentence(eight) == (
        "DPU: 2 cores at 1x host speed, DMA 8 Gbit/s per transfer; host: cpus 0-3 for every "
        "stack; load generator: cpus 6-7, isolated"
    )
    overlapping = parse_layout("host=0-1,dpu=1,loadgen=0", range(2))
    assert resolve("ideal", {"dma_latency_us": 2}).sentence(overlapping) == (
        "DPU: 1 core at 1x host speed, shared with the host, DMA 2 µs per transfer; "
        "host: cpus 0-1 for every stack; load generator: cpu 0, shared with the host"
    )
    assert resolve("ideal").sentence(shared_layout({0, 1})) == (
        "DPU: no cores of its own (placement shared) at 1x host speed, no DMA cost; "
        "every role and the load generator: any of cpus 0-1"
    )


def test_default_path_is_the_shipped_file() -> None:
    assert DEFAULT_PATH.name == "dpu-profiles.toml" and DEFAULT_PATH.is_file()
