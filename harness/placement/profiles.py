"""Named DPU profiles and the effective DPU model of a run.

A profile (dpu-profiles.toml) fixes the DPU's core count, per-core speed
relative to a host core, and DMA cost; every number names its public source
or is marked as an assumption, and loading refuses anything else. `resolve`
applies single options over a profile and remembers which values they set.
`DpuModel.fit` says what of the model this machine can give: the hardware's
core count is stated, not clamped, so the caller can report what is unmet.
"""

from __future__ import annotations

import math
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from harness.placement.layout import Layout, PlacementError, format_cpus

DEFAULT_PATH = Path(__file__).with_name("dpu-profiles.toml")
KEYS = ("dpu_cores", "dpu_speed", "dma_latency_us", "dma_gbps")
_PROVENANCE = ("source", "assumption")


@dataclass(frozen=True)
class Sourced:
    """A number and where it comes from (a cited source, an assumption, or both)."""

    value: float
    source: str | None = None
    assumption: str | None = None


@dataclass(frozen=True)
class Profile:
    """One named profile; `values` holds every key of KEYS."""

    name: str
    description: str
    values: Mapping[str, Sourced]


@dataclass(frozen=True)
class Fit:
    """What of a DPU model a layout's dpu set can give on this machine."""

    cores: int  # DPU cores simulated
    speed: float  # per-core speed simulated (a host CPU gives at most 1x)
    quota_cores: float | None  # CPU bandwidth to set on the dpu set; None = no limit
    unmet: tuple[str, ...]  # one line per part of the model that is not given


@dataclass(frozen=True)
class DpuModel:
    """The effective model: a profile's values with single options applied."""

    profile: Profile
    dpu_cores: int
    dpu_speed: float
    dma_latency_us: float
    dma_gbps: float
    overridden: frozenset[str]  # keys set by options rather than by the profile

    def fit(self, dpu_cpus: int) -> Fit:
        """Cores, speed and CPU bandwidth for a dpu set of `dpu_cpus` CPUs."""
        cores = min(self.dpu_cores, dpu_cpus)
        speed = min(self.dpu_speed, 1.0)
        capacity = speed * cores
        unmet = []
        if cores < self.dpu_cores:
            unmet.append(
                f"{self.profile.name} has {self.dpu_cores} DPU cores; the dpu set has "
                f"{dpu_cpus} CPU{_s(dpu_cpus)}, so {cores} {_are(cores)} simulated"
            )
        if self.dpu_speed > 1:
            unmet.append(
                f"dpu_speed {self.dpu_speed:g}x is more than a host CPU gives: "
                f"each simulated DPU core runs at 1x"
            )
        return Fit(cores, speed, None if capacity >= dpu_cpus else capacity, tuple(unmet))

    def columns(self) -> dict[str, str | float]:
        """The model's results.csv columns."""
        return {
            "dpu_profile": self.profile.name,
            "dpu_speed": self.dpu_speed,
            "dma_latency_us": self.dma_latency_us,
            "dma_gbps": self.dma_gbps,
        }

    def sentence(self, layout: Layout) -> str:
        """The report's headline: the model and the placement in force, in one sentence."""
        dma = [f"{self.dma_latency_us:g} µs"] if self.dma_latency_us else []
        dma += [f"{self.dma_gbps:g} Gbit/s"] if self.dma_gbps else []
        cost = f"DMA {' + '.join(dma)} per transfer" if dma else "no DMA cost"
        if layout.shared:
            return (
                f"DPU: no cores of its own (placement shared) at {min(self.dpu_speed, 1.0):g}x "
                f"host speed, {cost}; every role and the load generator: "
                f"any of {_cpus(layout.host)}"
            )
        fit = self.fit(layout.dpu_cores)
        cores = f"{fit.cores} core{_s(fit.cores)}"
        if fit.cores < self.dpu_cores:
            cores += f" ({self.profile.name} has {self.dpu_cores})"
        dpu_shares = ", shared with the host" if layout.dpu & layout.host else ""
        shared_with = [
            name
            for name, cpus in (("the host", layout.host), ("the DPU", layout.dpu))
            if layout.loadgen & cpus
        ]
        loadgen = f", shared with {' and '.join(shared_with)}" if shared_with else ", isolated"
        return (
            f"DPU: {cores} at {fit.speed:g}x host speed{dpu_shares}, {cost}; "
            f"host: {_cpus(layout.host)} for every stack; "
            f"load generator: {_cpus(layout.loadgen)}{loadgen}"
        )


def load_profiles(path: Path = DEFAULT_PATH) -> dict[str, Profile]:
    """Every profile in a profiles file, validated (one-line PlacementError otherwise)."""
    try:
        data = tomllib.loads(Path(path).read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise PlacementError(f"cannot read DPU profiles {path}: {exc}") from None
    profiles = {}
    for name, table in data.items():
        where = f"{Path(path).name}: profile {name}"
        if not isinstance(table, dict):
            raise PlacementError(f"{where}: expected a table of {', '.join(KEYS)}")
        unknown = sorted(set(table) - {"description", *KEYS})
        if unknown:
            raise PlacementError(f"{where}: unknown key {', '.join(unknown)}")
        missing = [key for key in ("description", *KEYS) if key not in table]
        if missing:
            raise PlacementError(f"{where}: missing {', '.join(missing)}")
        description = table["description"]
        if not isinstance(description, str) or not description.strip():
            raise PlacementError(f"{where}: description must be a non-empty string")
        values = {key: _sourced(f"{where}: {key}", key, table[key]) for key in KEYS}
        profiles[name] = Profile(name, description, values)
    return profiles


def get_profile(name: str, profiles: Mapping[str, Profile] | None = None) -> Profile:
    """One profile by name (from the shipped file unless `profiles` is given)."""
    known = load_profiles() if profiles is None else profiles
    try:
        return known[name]
    except KeyError:
        raise PlacementError(
            f"unknown DPU profile {name!r} (known: {', '.join(sorted(known))})"
        ) from None


def resolve(
    profile_name: str,
    overrides: Mapping[str, float | None] | None = None,
    profiles: Mapping[str, Profile] | None = None,
) -> DpuModel:
    """The effective model: the profile's values, each replaced by a non-None override."""
    profile = get_profile(profile_name, profiles)
    given = {key: value for key, value in (overrides or {}).items() if value is not None}
    unknown = sorted(set(given) - set(KEYS))
    if unknown:
        raise PlacementError(f"unknown DPU model option {', '.join(unknown)}")
    values = {
        key: _check(f"option {key}", key, given[key]) if key in given else sourced.value
        for key, sourced in profile.values.items()
    }
    return DpuModel(
        profile,
        int(values["dpu_cores"]),
        float(values["dpu_speed"]),
        float(values["dma_latency_us"]),
        float(values["dma_gbps"]),
        frozenset(given),
    )


def _sourced(where: str, key: str, raw: object) -> Sourced:
    if not isinstance(raw, dict) or "value" not in raw:
        raise PlacementError(f"{where}: expected {{ value = ..., source or assumption = ... }}")
    unknown = sorted(set(raw) - {"value", *_PROVENANCE})
    if unknown:
        raise PlacementError(f"{where}: unknown key {', '.join(unknown)}")
    notes = {k: raw.get(k) for k in _PROVENANCE}
    if all(note is None for note in notes.values()):
        raise PlacementError(f"{where}: value without source or assumption")
    for k, note in notes.items():
        if note is not None and (not isinstance(note, str) or not note.strip()):
            raise PlacementError(f"{where}: {k} must be a non-empty string")
    return Sourced(_check(where, key, raw["value"]), notes["source"], notes["assumption"])


def _check(where: str, key: str, value: object) -> float:
    """A valid value for `key`: cores a positive integer, speed positive, costs >= 0."""
    if key == "dpu_cores":
        if not isinstance(value, int) or isinstance(value, bool):
            raise PlacementError(f"{where}: must be an integer, got {value!r}")
        if value < 1:
            raise PlacementError(f"{where}: must be at least 1, got {value}")
        return value
    if not isinstance(value, int | float) or isinstance(value, bool) or not math.isfinite(value):
        raise PlacementError(f"{where}: must be a number, got {value!r}")
    if value < 0 or (key == "dpu_speed" and value == 0):
        bound = "> 0" if key == "dpu_speed" else ">= 0"
        raise PlacementError(f"{where}: must be {bound}, got {value:g}")
    return float(value)


def _cpus(cpus: frozenset[int]) -> str:
    return f"cpu{_s(len(cpus))} {format_cpus(cpus)}"


def _s(n: int) -> str:
    return "" if n == 1 else "s"


def _are(n: int) -> str:
    return "is" if n == 1 else "are"
