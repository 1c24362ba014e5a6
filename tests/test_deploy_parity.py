"""Deployers' parity (DESIGN §7): local processes and compose containers run the same stack.

For each mesh, rendered by the local deployer's resolver and by the compose
one, every component runs the same command and environment up to what a
deployer decides (addresses, ports, paths, namespaces): each rendered value
matches its description template, placeholders being the only free parts.
The generated compose file holds exactly the compose rendering, and a real
local start records exactly the local rendering.
"""

from __future__ import annotations

import json
import os
import re
import stat
from pathlib import Path

import pytest
import yaml

from harness.deploy import start_stack
from harness.deploy.compose import generate
from harness.deploy.image import EXECUTABLES, IMAGE_UID
from harness.deploy.local import LocalResolver, program
from harness.names import DEFAULT_PORT, DEFAULT_WORKMODEL, ENVOY_MESHES, MESHES, REPO
from harness.ports import free_ports, release_ports
from harness.stacks import describe
from harness.stacks.envoy import TLS_CA, TLS_CERT, TLS_KEY, TLS_MOUNTS
from harness.stacks.model import Rendered, Settings, StackDescription, placeholders, render

WORKMODELS = [DEFAULT_WORKMODEL, *sorted((REPO.parent / "shared" / "workmodels").glob("*.json"))]


def template(text: str) -> re.Pattern[str]:
    """`text` as a pattern: literal parts escaped, each placeholder any (shortest) value."""
    pattern, rest = "", text
    for placeholder in placeholders([text]):
        before, _, rest = rest.partition(placeholder)
        pattern += re.escape(before) + "(.*?)"
    return re.compile(pattern + re.escape(rest))


def _describe(mesh: str, workmodel: Path) -> StackDescription:
    return describe(mesh, Settings(workmodel=workmodel.resolve()))


def _render_locally(desc: StackDescription, run_dir: Path) -> list[Rendered]:
    resolver = LocalResolver.allocate(desc, DEFAULT_PORT, run_dir)
    try:
        return [render(c, resolver) for c in desc.components]
    finally:
        release_ports(resolver.allocated)


def _unescape(value: str) -> str:
    """A compose file's string as Compose reads it (`$$` is a literal `$`)."""
    return value.replace("$$", "$")


@pytest.mark.parametrize("workmodel", WORKMODELS, ids=lambda p: p.stem)
@pytest.mark.parametrize("mesh", MESHES)
def test_local_and_compose_render_the_same_components(
    mesh: str, workmodel: Path, tmp_path: Path
) -> None:
    desc = _describe(mesh, workmodel)
    local = _render_locally(desc, tmp_path / "local")
    deployment = generate(desc, tmp_path / "compose", port=DEFAULT_PORT)
    names = [c.name for c in desc.components]
    assert [r.component.name for r in local] == names
    assert [r.component.name for r in deployment.rendered] == names
    for component, here, there in zip(desc.components, local, deployment.rendered, strict=True):
        assert len(here.args) == len(there.args) == len(component.args), component.name
        for arg, local_arg, compose_arg in zip(component.args, here.args, there.args, strict=True):
            pattern = template(arg)
            assert pattern.fullmatch(local_arg), (component.name, arg, local_arg)
            assert pattern.fullmatch(compose_arg), (component.name, arg, compose_arg)
        assert set(here.env) == set(there.env) == set(component.env), component.name
        for key, value in component.env.items():
            pattern = template(value)
            assert pattern.fullmatch(here.env[key]), (component.name, key, here.env[key])
            assert pattern.fullmatch(there.env[key]), (component.name, key, there.env[key])
    # The compose file runs exactly the compose rendering, nothing more.
    services = yaml.safe_load(deployment.file.read_text())["services"]
    assert list(services) == names
    for item in deployment.rendered:
        spec = services[item.component.name]
        assert [_unescape(a) for a in spec["command"]] == [
            EXECUTABLES[item.component.program],
            *item.args,
        ]
        environment = {k: _unescape(v) for k, v in spec.get("environment", {}).items()}
        assert environment == dict(item.env), item.component.name


@pytest.mark.e2e
@pytest.mark.parametrize("mesh", MESHES)
def test_a_local_start_runs_the_local_rendering(mesh: str, tmp_path: Path) -> None:
    """stack.json of a real local start: argv and environment exactly as rendered.

    Rendered again with the ports and namespace that start recorded, since
    those are the only things a second resolver would choose differently.
    """
    run_dir = tmp_path.resolve()
    port = free_ports(1)[0]
    with start_stack(mesh, DEFAULT_WORKMODEL, run_dir=run_dir, port=port) as stack:
        recorded = json.loads(stack.manifest.read_text())
    desc = _describe(mesh, DEFAULT_WORKMODEL)
    ports = {
        (c["name"], name): number
        for c in recorded["components"]
        for name, number in c["ports"].items()
    }
    resolver = LocalResolver(recorded["deployment"]["namespace"], ports, run_dir)
    assert [c["name"] for c in recorded["components"]] == [c.name for c in desc.components]
    for component, record in zip(desc.components, recorded["components"], strict=True):
        item = render(component, resolver)
        assert record["argv"] == [program(component.program), *item.args], component.name
        assert record["env"] == dict(item.env), component.name


@pytest.mark.parametrize("mesh", ENVOY_MESHES)
def test_with_mtls_both_deployers_give_each_envoy_the_same_certificates(
    mesh: str, tmp_path: Path
) -> None:
    """One CA per description: local and compose render the same certificates and keys; the
    compose file mounts each Envoy's own, readable by the image's user, and publishes none."""
    desc = describe(mesh, Settings(workmodel=DEFAULT_WORKMODEL.resolve(), mtls=True))
    local = {item.component.name: item.files for item in _render_locally(desc, tmp_path / "l")}
    deployment = generate(desc, tmp_path / "compose", port=DEFAULT_PORT)
    services = yaml.safe_load(deployment.file.read_text())["services"]
    envoys = [c for c in desc.components if c.program == "envoy"]
    assert envoys and set(deployment.configs) == {c.name for c in envoys}  # bootstraps only
    for item in deployment.rendered:
        c = item.component
        secret = {f.name for f in c.files if f.secret}
        assert secret == ({TLS_CA, TLS_CERT, TLS_KEY} if c in envoys else set()), c.name
        assert {n: item.files[n] for n in secret} == {n: local[c.name][n] for n in secret}
        for name in secret:
            path = deployment.files_dir / "secrets" / c.name / Path(TLS_MOUNTS[name]).name
            assert path.read_text() == item.files[name]
            mount = f"./{path.relative_to(deployment.file.parent)}:{TLS_MOUNTS[name]}:ro"
            assert mount in services[c.name]["volumes"]
            info = path.stat()
            assert stat.S_IMODE(info.st_mode) == 0o600
            assert info.st_uid == (IMAGE_UID if os.geteuid() == 0 else os.geteuid())
