"""Every setting of the harness, declared once: its default, its rule, its option and help.

`BenchConfig` holds the settings of a run; each field's metadata is an
`Option` (validator, metavar, unit, help, the commands that take it). From
that one declaration come the argparse options of every entry point
(`run_bench.py run`, `whatif`, `faults`, `serve`, `k8s`, and `python -m
harness.deploy.compose generate`: `add_options`), the validation of a
config file (`load_file`, `build`) and of the command line (the same
validator as the option's argparse `type`, so a value is valid or invalid
everywhere alike), and the help text with each default and unit.

Precedence for `run`, `whatif` and `faults`: command line > config file
(`bench.toml`, which repeats and documents the defaults; a test keeps the two
equal) > `BenchConfig`'s defaults. `serve`, `k8s` and compose generation read
no config file: their options over the defaults, where a command may have a
default of its own (`Option.command_defaults`: `serve` listens on port 5005).
Every value is validated before any process starts; an error is one line
naming the source and the key (`ConfigError`, or argparse's usage error).

Paths in a config file are relative to the file's directory; paths given on
the command line are relative to the current directory.
"""

from __future__ import annotations

import argparse
import math
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from baselines.envoy.config import DEFAULT_CONCURRENCY
from harness.names import (
    DEFAULT_MESHES,
    DEFAULT_PORT,
    DEFAULT_WORKMODEL,
    ENVOY_MESHES,
    MESHES,
    MODES,
    REPO,
    RESTART_MODES,
)
from harness.placement.layout import PlacementError, parse_layout
from harness.placement.profiles import get_profile
from harness.placement.readback import online_cpus
from harness.stacks.topology import MAX_NODES, parse_place
from loadtests.options import REQUEST_MODES

DEFAULT_CONFIG_FILE = REPO / "bench.toml"

#: The entry points that take settings (`Option.commands`).
COMMANDS = ("run", "whatif", "faults", "serve", "k8s", "compose")
_LOADS = frozenset({"run", "whatif", "faults"})  # start stacks and load them
_SWEEPS = frozenset({"run", "whatif"})  # the ladder and repetitions
_STARTS = _LOADS | {"serve"}  # start stacks on this machine (placement, restarts)
_STACKS = frozenset(COMMANDS)  # describe a stack (workmodel and cell settings)


class ConfigError(ValueError):
    """A setting that cannot be used; `str()` is one line naming where it came from."""


# --- validators: value -> normalised value, or ConfigError (message without the key) ---------
# Each takes what TOML gives (numbers, strings, lists) and what the command line gives (text).


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


def _boolean(value: Any) -> bool:
    """A TOML boolean, or its command-line text `true` / `false`."""
    if isinstance(value, bool):
        return value
    if value in ("true", "false"):
        return value == "true"
    raise ConfigError(f"must be true or false, not {value!r}")


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


def _place(value: Any) -> tuple[tuple[str, int], ...]:
    if not isinstance(value, str):
        raise ConfigError(f"must be SVC=NODE,... (e.g. s1=2,s2=1), not {value!r}")
    try:
        return parse_place(value)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


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


# --- the declaration ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Option:
    """How one setting is given: its rule, its command-line form and the commands that take it.

    `check` turns a TOML or command-line value into the setting's value or
    raises `ConfigError`; `shown` is the default as a user would type it
    (None: derived from the field's default).
    """

    check: Callable[[Any], Any]
    help: str
    metavar: str
    commands: frozenset[str]
    unit: str = ""
    flag: str = ""  # default: --<name with dashes>
    shown: str | None = None
    command_defaults: Mapping[str, Any] = field(default_factory=dict)


def _setting(default: Any, check: Callable[[Any], Any], help: str, **option: Any) -> Any:
    """A `BenchConfig` field whose metadata is its `Option`."""
    return field(default=default, metadata={"option": Option(check, help, **option)})


_LAYOUT_HELP = "CPU sets: auto, shared, or host=0-3,dpu=4-5,loadgen=6-7 (DESIGN §5)"
_MODEL_HELP = "(a number, or 'profile' for the DPU profile's own value)"


@dataclass(frozen=True)
class BenchConfig:
    """Everything a run needs to know; written to meta.json as `config`."""

    workmodel: Path = _setting(
        DEFAULT_WORKMODEL,
        _existing_file,
        "μBench workmodel.json every stack serves",
        metavar="PATH",
        commands=_STACKS,
    )
    meshes: tuple[str, ...] = _setting(
        DEFAULT_MESHES,
        _meshes,
        f"stacks to compare, in this order ({', '.join(MESHES)})",
        metavar="A,B",
        commands=frozenset({"run", "faults", "k8s"}),
        command_defaults={"k8s": MESHES},
    )
    users: int = _setting(
        8,
        whole_number(1),
        "closed-loop Locust users, sending back to back (the calibration's too)",
        metavar="U",
        commands=_LOADS,
    )
    rates: tuple[float, ...] | None = _setting(
        None,
        _rates,
        "open-loop rates instead of the calibrated ladder: auto, a list, or '' for none",
        metavar="R1,R2",
        unit="req/s",
        flag="--rate",
        shown="auto",
        commands=_SWEEPS,
    )
    ladder_rates: int = _setting(
        7, whole_number(2, 12), "rates in the calibrated ladder", metavar="N", commands=_SWEEPS
    )
    refine: int = _setting(
        1,
        whole_number(0, 4),
        "refinement probes per stack and repetition between its highest clean and lowest "
        "unclean rate",
        metavar="N",
        commands=_SWEEPS,
    )
    calibrate: int = _setting(
        3,
        whole_number(1),
        "measured time of each calibration level",
        metavar="S",
        unit="s",
        commands=_LOADS,
    )
    duration: int = _setting(
        5, whole_number(1), "measured time per load level", metavar="S", unit="s", commands=_SWEEPS
    )
    warmup: int = _setting(
        4,
        whole_number(0),
        "warm-up after each stack start, excluded from latency and CPU",
        metavar="S",
        unit="s",
        commands=_LOADS,
    )
    settle: int = _setting(
        1,
        whole_number(0),
        "excluded time at the start of every other level",
        metavar="S",
        unit="s",
        commands=_SWEEPS,
    )
    repeat: int = _setting(
        3,
        whole_number(1),
        "repetitions per stack, interleaved across stacks",
        metavar="N",
        commands=_SWEEPS,
    )
    seed: int = _setting(
        0,
        whole_number(0),
        "μBench random seed, the same for every stack",
        metavar="S",
        commands=_STACKS,
    )
    out: Path = _setting(
        REPO / "results",
        _path,
        "results root (each run writes a timestamped directory inside)",
        metavar="DIR",
        commands=_LOADS,
    )
    slo_p99_ms: float = _setting(
        100.0,
        _positive_float,
        "p99 latency objective of a clean rate",
        metavar="MS",
        unit="ms",
        commands=_LOADS,
    )
    processes: int = _setting(
        1,
        whole_number(1, 64),
        "Locust processes (N > 1: a master and N workers)",
        metavar="N",
        commands=_LOADS,
    )
    request_mode: str = _setting(
        "get",
        _choice(REQUEST_MODES),
        "get: stochastic GET (the workmodel decides the calls); trace: trace-driven POST",
        metavar="{" + ",".join(REQUEST_MODES) + "}",
        commands=_LOADS,
    )
    mode: str = _setting(
        "local",
        _choice(MODES),
        "local: processes on this machine; compose: Docker Compose",
        metavar="{" + ",".join(MODES) + "}",
        commands=_LOADS,
    )
    port: int = _setting(
        0,
        whole_number(0, 65535),
        "public port of the stack on 127.0.0.1 (0: any free port)",
        metavar="N",
        commands=_LOADS | {"serve", "compose"},
        command_defaults={"serve": DEFAULT_PORT, "compose": DEFAULT_PORT},
    )
    scale: float = _setting(
        1.0,
        finite_number(zero_ok=True),
        "multiplies the cells' pi computations and sleeps (< 1 for smoke tests, 0: no work)",
        metavar="F",
        commands=_STACKS,
    )
    envoy_concurrency: int = _setting(
        DEFAULT_CONCURRENCY,
        whole_number(1),
        "worker threads (--concurrency) of every Envoy of the envoy and nodeproxy stacks",
        metavar="N",
        commands=_STACKS,
    )
    mtls: bool = _setting(
        False,
        _boolean,
        f"mutual TLS between the proxies of {' and '.join(ENVOY_MESHES)} (app-to-proxy hops "
        "stay plaintext; the other stacks have no proxy-to-proxy hop and run as without it)",
        metavar="{true,false}",
        shown="false",
        commands=_STACKS,
    )
    nodes: int = _setting(
        0,
        whole_number(0, MAX_NODES),
        "nodes to spread the services over (DESIGN §8), each a network namespace with its own "
        "address, the load generator in one more (local mode, needs root); 0: every component "
        "on this machine's loopback",
        metavar="N",
        commands=_STARTS | {"k8s"},
    )
    place: tuple[tuple[str, int], ...] = _setting(
        (),
        _place,
        "where services run with --nodes: SVC=NODE,... (the others round robin in workmodel "
        "order; the entry service on node 1; a workmodel's replicas take the next nodes)",
        metavar="S=N,..",
        shown="round robin",
        commands=_STARTS | {"k8s"},
    )
    functions_dir: Path | None = _setting(
        None,
        _directory_or_none,
        "directory of μBench custom internal functions (*.py); '' for none",
        metavar="DIR",
        shown="none",
        commands=_STACKS,
    )
    restart: str = _setting(
        "always",
        _choice(RESTART_MODES),
        "restart policy of every component: always (with back-off, like Kubernetes) or never",
        metavar="{" + ",".join(RESTART_MODES) + "}",
        commands=_STARTS,
    )
    restart_backoff: float = _setting(
        0.5,
        _positive_float,
        "first restart back-off, doubled per crash in a row",
        metavar="S",
        unit="s",
        commands=_STARTS,
    )
    placement: str = _setting("auto", _placement, _LAYOUT_HELP, metavar="SPEC", commands=_STARTS)
    dpu_profile: str = _setting(
        "bluefield3",
        _profile,
        "DPU model: ideal, bluefield2 or bluefield3 (harness/placement/dpu-profiles.toml)",
        metavar="NAME",
        commands=_STARTS | {"k8s", "compose"},
    )
    dpu_speed: float | None = _setting(
        None,
        from_profile(_positive_float),
        f"DPU core speed as a fraction of a host core {_MODEL_HELP}",
        metavar="F",
        shown="profile",
        commands=_STARTS | {"k8s"},
    )
    dma_latency_us: float | None = _setting(
        None,
        from_profile(finite_number(zero_ok=True)),
        f"DMA latency per host<->DPU transfer {_MODEL_HELP}",
        metavar="US",
        unit="µs",
        shown="profile",
        commands=_STARTS | {"k8s", "compose"},
    )
    dma_gbps: float | None = _setting(
        None,
        from_profile(finite_number(zero_ok=True)),
        f"DMA bandwidth, 0 = free {_MODEL_HELP}",
        metavar="GBPS",
        unit="Gbit/s",
        shown="profile",
        commands=_STARTS | {"k8s", "compose"},
    )

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready (paths as strings, tuples as lists)."""
        out = asdict(self)
        for key, value in out.items():
            if isinstance(value, Path):
                out[key] = str(value)
            elif isinstance(value, tuple):
                out[key] = list(value)
        out["place"] = ",".join(f"{service}={node}" for service, node in self.place)
        return out


#: Each setting's `Option`, and its default, by name.
OPTIONS: dict[str, Option] = {f.name: f.metadata["option"] for f in fields(BenchConfig)}
_DEFAULTS: dict[str, Any] = {f.name: f.default for f in fields(BenchConfig)}
KEYS = tuple(OPTIONS)

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
            checked[key] = OPTIONS[key].check(value)
        except ConfigError as exc:
            raise ConfigError(f"{origin[key]}: {key}: {exc}") from None
    config = BenchConfig(**checked)
    if config.nodes and config.mode != "local":
        where = origin.get("nodes", "config")
        raise ConfigError(
            f"{where}: nodes: network namespaces are local mode only, not {config.mode}"
        )
    return config


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


# --- the command line --------------------------------------------------------------------------


def options_of(command: str) -> dict[str, Option]:
    """The settings `command` takes, in declaration order."""
    if command not in COMMANDS:
        raise ValueError(f"unknown command {command!r}")
    return {name: opt for name, opt in OPTIONS.items() if command in opt.commands}


def flag_of(name: str) -> str:
    """The command-line flag of setting `name`."""
    return OPTIONS[name].flag or "--" + name.replace("_", "-")


def default_text(name: str, command: str) -> str:
    """The default of `name` under `command`, as a user would type it."""
    opt = OPTIONS[name]
    if command in opt.command_defaults:
        value = opt.command_defaults[command]
    elif opt.shown is not None:
        return opt.shown
    else:
        value = _DEFAULTS[name]
    if isinstance(value, Path):
        return str(value.relative_to(REPO)) if value.is_relative_to(REPO) else str(value)
    if isinstance(value, tuple):
        return ",".join(map(str, value))
    return f"{value:g}" if isinstance(value, float) else str(value)


def add_options(parser: argparse.ArgumentParser, command: str) -> None:
    """Add every option `command` takes to `parser`, each validated by the setting's rule.

    An option left out is None in the namespace (the config file or the default
    applies); a given one keeps its text, checked here and converted by `build`.
    """
    for name, opt in options_of(command).items():
        unit = f", in {opt.unit}" if opt.unit else ""
        parser.add_argument(
            flag_of(name),
            dest=name,
            metavar=opt.metavar,
            type=argument(opt.check, keep_text=True),
            help=f"{opt.help}{unit}; default: {default_text(name, command)}",
        )


def given(args: argparse.Namespace, command: str) -> dict[str, Any]:
    """The settings given on `command`'s command line (those left out are absent)."""
    values = {name: getattr(args, name, None) for name in options_of(command)}
    return {name: value for name, value in values.items() if value is not None}


def for_command(command: str, args: argparse.Namespace, **more: Any) -> BenchConfig:
    """The config of a command that reads no config file: its defaults, then its options."""
    defaults = {
        name: opt.command_defaults[command]
        for name, opt in options_of(command).items()
        if command in opt.command_defaults
    }
    return build(defaults, {**given(args, command), **more}, source=f"{command} defaults")


def argument(check: Callable[[str], Any], *, keep_text: bool = False) -> Callable[[str], Any]:
    """An argparse `type` from a rule: its ValueError becomes a usage error (exit 2).

    The value `check` makes of the text, or with `keep_text` the text itself (a setting's
    option: `build` converts it, after the config file, with the same rule).
    """

    def parse(text: str) -> Any:
        try:
            value = check(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None
        return text if keep_text else value

    return parse
