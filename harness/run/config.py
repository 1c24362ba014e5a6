"""The settings of one `run_bench.py run`: defaults, `bench.toml`, command-line overrides.

Precedence: command line > config file > the defaults below (`BenchConfig`'s
field defaults, which the checked-in `bench.toml` repeats and documents; a
test keeps the two equal). Every value is validated once, here, so a bad
setting stops the run before any process starts, with one line naming the
source and the key (`ConfigError`).

Paths in a config file are relative to the file's directory; paths given on
the command line are relative to the current directory.
"""

from __future__ import annotations

import math
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from baselines.envoy.config import DEFAULT_CONCURRENCY
from harness.names import DEFAULT_WORKMODEL, MESHES, MODES, REPO, RESTART_MODES
from harness.placement.layout import PlacementError, parse_layout
from harness.placement.profiles import get_profile
from harness.placement.readback import online_cpus
from loadtests.options import REQUEST_MODES

DEFAULT_CONFIG_FILE = REPO / "bench.toml"


class ConfigError(ValueError):
    """A setting that cannot be used; `str()` is one line naming where it came from."""


@dataclass(frozen=True)
class BenchConfig:
    """Everything a run needs to know; written to meta.json as `config`."""

    workmodel: Path = DEFAULT_WORKMODEL
    meshes: tuple[str, ...] = MESHES
    users: int = 8
    rates: tuple[float, ...] | None = None  # None: "auto", the calibrated ladder
    ladder_rates: int = 7
    refine: int = 1
    calibrate: int = 3
    duration: int = 5
    warmup: int = 4
    settle: int = 1
    repeat: int = 3
    seed: int = 0
    out: Path = REPO / "results"
    slo_p99_ms: float = 100.0
    processes: int = 1
    request_mode: str = "get"
    mode: str = "local"
    port: int = 0
    scale: float = 1.0
    envoy_concurrency: int = DEFAULT_CONCURRENCY
    functions_dir: Path | None = None
    restart: str = "always"
    restart_backoff: float = 0.5
    placement: str = "auto"
    dpu_profile: str = "bluefield3"
    dpu_speed: float | None = None  # None: the profile's
    dma_latency_us: float | None = None
    dma_gbps: float | None = None

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready (paths as strings, tuples as lists)."""
        out = asdict(self)
        for key, value in out.items():
            if isinstance(value, Path):
                out[key] = str(value)
            elif isinstance(value, tuple):
                out[key] = list(value)
        return out


KEYS = tuple(f.name for f in fields(BenchConfig))

#: `--quick`: a rough look in about two minutes (over the config file, under the options).
QUICK: dict[str, Any] = {
    "repeat": 1,
    "duration": 3,
    "warmup": 2,
    "calibrate": 2,
    "ladder_rates": 5,
    "refine": 0,
}


def load_file(path: Path) -> dict[str, Any]:
    """The settings of a TOML config file, paths made absolute; unknown keys are errors."""
    try:
        with path.open("rb") as fh:
            raw = tomllib.load(fh)
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror or exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: invalid TOML: {exc}") from None
    unknown = sorted(set(raw) - set(KEYS))
    if unknown:
        raise ConfigError(f"{path}: unknown key {unknown[0]!r} (known: {', '.join(KEYS)})")
    for key in ("workmodel", "out", "functions_dir"):
        if isinstance(raw.get(key), str) and raw[key]:
            raw[key] = (path.parent / raw[key]).resolve()
    return raw


def parse_list(text: str, key: str) -> list[str]:
    """A comma-separated command-line list; empty text is an empty list."""
    items = [item.strip() for item in text.split(",")]
    if items == [""]:
        return []
    if "" in items:
        raise ConfigError(f"--{key}: empty item in {text!r}")
    return items


def build(
    file_values: Mapping[str, Any] | None = None,
    overrides: Mapping[str, Any] | None = None,
    *,
    source: str = "config",
) -> BenchConfig:
    """Defaults, then `file_values`, then `overrides` (None values ignored), validated."""
    merged: dict[str, Any] = {}
    origin: dict[str, str] = {}
    for values, where in ((file_values or {}), source), ((overrides or {}), "command line"):
        for key, value in values.items():
            if value is None:
                continue
            if key not in KEYS:
                raise ConfigError(f"{where}: unknown setting {key!r}")
            merged[key] = value
            origin[key] = where
    checked = {}
    for key, value in merged.items():
        try:
            checked[key] = VALIDATORS[key](value)
        except ConfigError as exc:
            raise ConfigError(f"{origin[key]}: {key}: {exc}") from None
    return BenchConfig(**checked)


def load(
    config_path: Path | None, overrides: Mapping[str, Any] | None = None, *, quick: bool = False
) -> BenchConfig:
    """The effective config: `config_path` (default `bench.toml` if present), the `QUICK`
    preset when asked for, then the overrides."""
    path = config_path
    if path is None and DEFAULT_CONFIG_FILE.is_file():
        path = DEFAULT_CONFIG_FILE
    values = load_file(Path(path)) if path is not None else {}
    if quick:
        values = {**values, **QUICK}
    return build(values, overrides, source=str(path) if path is not None else "config")


# --- validators: value -> normalised value, or ConfigError (message without the key) ---------


def whole_number(low: int, high: int | None = None) -> Callable[[Any], int]:
    """A validator of whole numbers in `low..high`; also the command line's (`run_bench.py`)."""

    def check(value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int | str):
            raise ConfigError(f"must be a whole number, not {value!r}")
        try:
            number = int(value)
        except ValueError:
            raise ConfigError(f"must be a whole number, not {value!r}") from None
        if number < low or (high is not None and number > high):
            bounds = f">= {low}" if high is None else f"between {low} and {high}"
            raise ConfigError(f"must be {bounds}, not {number}")
        return number

    return check


def finite_number(*, zero_ok: bool) -> Callable[[Any], float]:
    """A validator of finite numbers > 0 (or >= 0 with `zero_ok`)."""

    def check(value: Any) -> float:
        if isinstance(value, bool):
            raise ConfigError(f"must be a number, not {value!r}")
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"must be a number, not {value!r}") from None
        if not math.isfinite(number) or number < 0 or (number == 0 and not zero_ok):
            bound = "a number >= 0" if zero_ok else "a positive number"
            raise ConfigError(f"must be {bound}, not {value!r}")
        return number

    return check


_positive_float = finite_number(zero_ok=False)


def from_profile(check: Callable[[Any], float]) -> Callable[[Any], float | None]:
    """A DPU model override: a number, or "profile" (None) for the DPU profile's own value."""

    def parse(value: Any) -> float | None:
        return None if value in ("profile", None) else check(value)

    return parse


def _placement(value: Any) -> str:
    if not isinstance(value, str):
        raise ConfigError(f"must be shared, auto or host=..,dpu=..,loadgen=.., not {value!r}")
    try:
        parse_layout(value, online_cpus())
    except PlacementError as exc:
        raise ConfigError(str(exc)) from None
    return value


def _profile(value: Any) -> str:
    try:
        return get_profile(value).name
    except PlacementError as exc:
        raise ConfigError(str(exc)) from None


def _choice(choices: tuple[str, ...]) -> Any:
    def check(value: Any) -> str:
        if value not in choices:
            raise ConfigError(f"must be one of {', '.join(choices)}, not {value!r}")
        return str(value)

    return check


def _items(value: Any) -> list[Any]:
    if isinstance(value, str):
        return parse_list(value, "list")
    if isinstance(value, list | tuple):
        return list(value)
    raise ConfigError(f"must be a list, not {value!r}")


def _meshes(value: Any) -> tuple[str, ...]:
    meshes = tuple(_choice(MESHES)(m) for m in _items(value))
    if not meshes:
        raise ConfigError("needs at least one mesh")
    if len(set(meshes)) != len(meshes):
        raise ConfigError(f"lists a mesh twice: {', '.join(meshes)}")
    return meshes


def _rates(value: Any) -> tuple[float, ...] | None:
    if value == "auto":
        return None
    rates = [_positive_float(r) for r in _items(value)]
    if len(set(rates)) != len(rates):
        raise ConfigError(f"lists a rate twice: {rates}")
    return tuple(sorted(rates))


def _path(value: Any) -> Path:
    if not isinstance(value, str | Path) or not str(value):
        raise ConfigError(f"must be a path, not {value!r}")
    return Path(value).resolve()


def _directory_or_none(value: Any) -> Path | None:
    if value == "":
        return None  # "" in bench.toml: no custom functions
    path = _path(value)
    if not path.is_dir():
        raise ConfigError(f"no such directory: {path}")
    return path


def _existing_file(value: Any) -> Path:
    path = _path(value)
    if not path.is_file():
        raise ConfigError(f"no such file: {path}")
    return path


VALIDATORS: dict[str, Any] = {
    "workmodel": _existing_file,
    "meshes": _meshes,
    "users": whole_number(1),
    "rates": _rates,
    "ladder_rates": whole_number(2, 12),
    "refine": whole_number(0, 4),
    "calibrate": whole_number(1),
    "duration": whole_number(1),
    "warmup": whole_number(0),
    "settle": whole_number(0),
    "repeat": whole_number(1),
    "seed": whole_number(0),
    "out": _path,
    "slo_p99_ms": _positive_float,
    "processes": whole_number(1, 64),
    "request_mode": _choice(REQUEST_MODES),
    "mode": _choice(MODES),
    "port": whole_number(0, 65535),
    "scale": _positive_float,
    "envoy_concurrency": whole_number(1),
    "functions_dir": _directory_or_none,
    "restart": _choice(RESTART_MODES),
    "restart_backoff": _positive_float,
    "placement": _placement,
    "dpu_profile": _profile,
    "dpu_speed": from_profile(_positive_float),
    "dma_latency_us": from_profile(finite_number(zero_ok=True)),
    "dma_gbps": from_profile(finite_number(zero_ok=True)),
}
