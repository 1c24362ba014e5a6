"""Settings declared once: every entry point's options, bench.toml and their rules agree.

`harness.run.config.BenchConfig` declares each setting (rule, flag, help,
commands); these tests hold every entry point's parser and the config file
to that one declaration, value by value.
"""

from __future__ import annotations

import argparse
import json
import math
import tomllib
from pathlib import Path
from typing import Any

import pytest

import run_bench
from harness.deploy.compose import __main__ as compose_cli
from harness.names import DEFAULT_PORT, REPO
from harness.run import config

# setting: (a valid command-line text, the value it becomes, an invalid text)
CASES: dict[str, tuple[str, Any, str]] = {
    "workmodel": (
        str(REPO / "workmodels" / "seed.json"),
        REPO / "workmodels" / "seed.json",
        "/no/wm.json",
    ),
    "meshes": ("envoy,nomesh", ("envoy", "nomesh"), "envoy,istio"),
    "users": ("3", 3, "0"),
    "rates": ("20,10", (10.0, 20.0), "10,-1"),
    "ladder_rates": ("4", 4, "1"),
    "refine": ("0", 0, "5"),
    "calibrate": ("2", 2, "0"),
    "duration": ("2", 2, "2.5"),
    "warmup": ("0", 0, "-1"),
    "settle": ("0", 0, "x"),
    "repeat": ("2", 2, "0"),
    "seed": ("7", 7, "-1"),
    "out": ("/tmp/dpumesh-results", Path("/tmp/dpumesh-results"), ""),
    "slo_p99_ms": ("50", 50.0, "0"),
    "processes": ("2", 2, "65"),
    "request_mode": ("trace", "trace", "post"),
    "mode": ("compose", "compose", "k8s"),
    "port": ("0", 0, "65536"),
    "scale": ("0", 0.0, "-1"),
    "envoy_concurrency": ("3", 3, "1.5"),
    "mtls": ("true", True, "yes"),
    "nodes": ("2", 2, "33"),
    "place": ("s1=2,s2=1", (("s1", 2), ("s2", 1)), "s1"),
    "functions_dir": (str(REPO / "tests" / "apps"), REPO / "tests" / "apps", "/no/such/dir"),
    "restart": ("never", "never", "sometimes"),
    "restart_backoff": ("1.5", 1.5, "0"),
    "placement": ("shared", "shared", "host=0,dpu=0,loadgen=0,gpu=1"),
    "dpu_profile": ("ideal", "ideal", "bluefield9"),
    "dpu_speed": ("0.5", 0.5, "nan"),
    "dma_latency_us": ("profile", None, "-1"),
    "dma_gbps": ("0", 0.0, "inf"),
}

# The arguments each command needs besides the settings, and its parser.
PREFIX = {
    "run": ["run"],
    "whatif": ["whatif", "--param", "dpu_speed", "--values", "1"],
    "faults": ["faults"],
    "serve": ["serve", "--mesh", "nomesh"],
    "k8s": ["k8s", "--out", "/tmp/dpumesh-k8s"],
    "compose": ["generate"],
}


def _parse(command: str, argv: list[str]) -> argparse.Namespace:
    parser = compose_cli._parser() if command == "compose" else run_bench._parser()
    return parser.parse_args([*PREFIX[command], *argv])


def _subparser(command: str) -> argparse.ArgumentParser:
    parser = compose_cli._parser() if command == "compose" else run_bench._parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices["generate" if command == "compose" else command]


def _setting_dests(command: str) -> dict[str, list[str]]:
    """The config settings `command`'s parser has, each with its flags."""
    return {
        a.dest: list(a.option_strings)
        for a in _subparser(command)._actions
        if a.dest in config.KEYS
    }


PAIRS = [
    (key, cmd)
    for key, opt in config.OPTIONS.items()
    for cmd in config.COMMANDS
    if cmd in opt.commands
]


def test_the_table_covers_every_setting():
    assert set(CASES) == set(config.KEYS)
    assert all(config.OPTIONS[key].commands for key in config.KEYS)


def test_every_bench_toml_key_is_a_run_option_and_the_reverse():
    with config.DEFAULT_CONFIG_FILE.open("rb") as fh:
        toml_keys = set(tomllib.load(fh))
    run_options = {
        a.dest for a in _subparser("run")._actions if a.option_strings and a.dest != "help"
    }
    assert toml_keys == set(config.KEYS)
    assert run_options - {"config", "quick"} == toml_keys


@pytest.mark.parametrize("command", config.COMMANDS)
def test_each_command_has_exactly_its_declared_options_once(command):
    dests = _setting_dests(command)
    assert set(dests) == set(config.options_of(command))
    for key, flags in dests.items():
        assert flags == [config.flag_of(key)]
    help_text = " ".join(_subparser(command).format_help().split())
    for key in dests:
        assert help_text.count(f"{config.flag_of(key)} {config.OPTIONS[key].metavar} ") == 1
        assert f"default: {config.default_text(key, command)}" in help_text


@pytest.mark.parametrize(("key", "command"), PAIRS)
def test_a_valid_value_is_the_same_setting_everywhere(key, command, tmp_path):
    text, value, _ = CASES[key]
    args = _parse(command, [config.flag_of(key), text])
    from_cli = config.build(overrides=config.given(args, command))
    toml = tmp_path / "bench.toml"
    toml.write_text(f"{key} = {_toml_literal(text)}\n")
    from_file = config.build(config.load_file(toml))
    assert getattr(from_cli, key) == value
    assert getattr(from_file, key) == value


@pytest.mark.parametrize(("key", "command"), PAIRS)
def test_an_invalid_value_is_refused_everywhere_with_the_same_message(
    key, command, tmp_path, capsys
):
    invalid = CASES[key][2]
    with pytest.raises(config.ConfigError) as rule:
        config.OPTIONS[key].check(invalid)
    with pytest.raises(SystemExit) as exit_:
        _parse(command, [config.flag_of(key), invalid])
    assert exit_.value.code == 2
    assert f"argument {config.flag_of(key)}: {rule.value}" in capsys.readouterr().err
    toml = tmp_path / "bench.toml"
    toml.write_text(f"{key} = {_toml_literal(invalid)}\n")
    with pytest.raises(config.ConfigError) as typed:  # as TOML types it (2.5, not '2.5')
        config.OPTIONS[key].check(tomllib.loads(toml.read_text())[key])
    with pytest.raises(config.ConfigError) as from_file:
        config.build(config.load_file(toml), source=str(toml))
    assert str(from_file.value) == f"{toml}: {key}: {typed.value}"


def _toml_literal(text: str) -> str:
    """`text` as TOML writes it: a number when it is one, else a string."""
    try:
        number = float(text)
    except ValueError:
        return json.dumps(text)
    return text if math.isfinite(number) and text.strip() == text else json.dumps(text)


def test_commands_without_a_config_file_have_their_own_defaults():
    serve = config.for_command("serve", _parse("serve", []))
    run = config.load(None, config.given(_parse("run", []), "run"))
    assert serve.port == DEFAULT_PORT
    assert run.port == 0 == config.BenchConfig().port
    assert config.for_command("compose", _parse("compose", [])).port == DEFAULT_PORT
    assert config.for_command("serve", _parse("serve", ["--port", "0"])).port == 0


def test_an_option_left_out_keeps_the_config_files_value(tmp_path):
    toml = tmp_path / "b.toml"
    toml.write_text("users = 3\nrates = [10, 20]\ndpu_speed = 0.5\n")
    args = _parse("run", ["--rate", "auto", "--dpu-speed", "profile"])
    cfg = config.load(toml, config.given(args, "run"))
    assert cfg.users == 3  # not given: the file's
    assert cfg.rates is None  # given as auto: overrides the file's list
    assert cfg.dpu_speed is None  # given as profile: the profile's, not the file's 0.5
