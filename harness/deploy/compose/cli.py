"""The Docker engine and the compose command line, as the compose deployer uses them.

Compose itself brings a project up and down (v2 `docker compose` or v1
`docker-compose`, whichever is installed); the Docker SDK inspects what it
started (containers, published ports, stats) and removes leftovers.
"""

from __future__ import annotations

import functools
import shutil
import subprocess
from collections.abc import Sequence
from pathlib import Path

import docker
import docker.errors
import requests

from harness.procs import StartError

PROJECT_LABEL = "com.docker.compose.project"
SERVICE_LABEL = "com.docker.compose.service"
# One connection per container, so a stats round reads them all at once.
_POOL_SIZE = 128


class ComposeError(StartError):
    """Docker, Compose or an image build failed (nothing of the stack is left running)."""


def docker_client(timeout_s: int = 120) -> docker.DockerClient:
    """A client of the engine `DOCKER_HOST` names (default: the local socket)."""
    try:
        client = docker.from_env(timeout=timeout_s, max_pool_size=_POOL_SIZE)
        client.ping()
    except (docker.errors.DockerException, requests.RequestException) as exc:
        raise ComposeError(f"no Docker engine answers: {exc}") from exc
    return client


@functools.cache
def compose_command() -> tuple[str, ...]:
    """`docker compose` (v2) if installed, else `docker-compose` (v1)."""
    for argv in (("docker", "compose"), ("docker-compose",)):
        if shutil.which(argv[0]) and _quiet_ok([*argv, "version"]):
            return argv
    raise ComposeError("neither `docker compose` (v2) nor `docker-compose` (v1) is installed")


def _quiet_ok(argv: Sequence[str]) -> bool:
    done = subprocess.run(list(argv), capture_output=True, timeout=60, check=False)
    return done.returncode == 0


def compose(project: str, file: Path, *args: str, timeout_s: float = 300) -> str:
    """Run one compose command on `file` as `project`; its output, or `ComposeError`."""
    argv = [*compose_command(), "--project-name", project, "--file", str(file), *args]
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout_s, check=False)
    except subprocess.TimeoutExpired as exc:
        raise ComposeError(f"{' '.join(argv)}: no answer after {timeout_s:.0f} s") from exc
    if done.returncode != 0:
        raise ComposeError(f"{' '.join(argv)} failed:\n{(done.stderr or done.stdout)[-4000:]}")
    return done.stdout


def check_config(file: Path) -> None:
    """`compose config --quiet`: Compose's own validation of a file (`ComposeError` if invalid)."""
    compose("config-check", file, "config", "--quiet", timeout_s=60)


def project_resources(client: docker.DockerClient, project: str) -> dict[str, list[str]]:
    """Names of the containers, networks and volumes carrying `project`'s compose label."""
    labelled = {"label": f"{PROJECT_LABEL}={project}"}
    return {
        "containers": [c.name for c in client.containers.list(all=True, filters=labelled)],
        "networks": [n.name for n in client.networks.list(filters=labelled)],
        "volumes": [v.name for v in client.volumes.list(filters=labelled)],
    }
