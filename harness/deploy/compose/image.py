"""The one image every compose container runs, built offline.

From `compose/Dockerfile` with the repository root as context. Python packages
come from `compose/.wheelhouse`, downloaded on the host for the image's Python
(cp311, glibc 2.36: Debian bookworm), so the build needs no network. The base
is `python:3.11-slim` when it is here or can be pulled, else
`dpumesh-base:bookworm`, made by `compose/build-base-image.sh` (debootstrap
from the machine's Debian mirror). Docker's layer cache makes rebuilds cheap.
"""

from __future__ import annotations

import functools
import hashlib
import platform
import shutil
import subprocess
import sys
from pathlib import Path

import docker
import docker.errors
import requests

from harness.deploy.compose.cli import ComposeError, docker_client
from harness.deploy.image import IMAGE
from harness.names import REPO

COMPOSE_DIR = REPO / "compose"
DOCKERFILE = COMPOSE_DIR / "Dockerfile"
WHEELHOUSE = COMPOSE_DIR / ".wheelhouse"
DEFAULT_BASE_IMAGE = "python:3.11-slim"
LOCAL_BASE_IMAGE = "dpumesh-base:bookworm"

_PYTHON_ABI = ("3.11", "cp311")
_GLIBC_MINOR = 36  # Debian bookworm, the base image's distribution
_PULL_TIMEOUT_S = 60


def gather_wheelhouse() -> Path:
    """Download the containers' wheels into `compose/.wheelhouse` unless already there.

    Targets the image's Python (cp311 on glibc <= 2.36) rather than the host's,
    binary wheels only, at the versions of requirements.lock. Skipped when the
    inputs are unchanged since the last download (hash in `.stamp`).
    """
    lock = REPO / "requirements.lock"
    wanted = COMPOSE_DIR / "requirements.in"
    version, abi = _PYTHON_ABI
    machine = platform.machine()
    target = [
        *("--only-binary=:all:", "--python-version", version, "--implementation", "cp"),
        *("--abi", abi, "--abi", "abi3"),
        *(
            arg
            for minor in range(5, _GLIBC_MINOR + 1)
            for arg in ("--platform", f"manylinux_2_{minor}_{machine}")
        ),
    ]
    digest = hashlib.sha256(lock.read_bytes() + wanted.read_bytes() + " ".join(target).encode())
    stamp = WHEELHOUSE / ".stamp"
    if stamp.is_file() and stamp.read_text() == digest.hexdigest():
        return WHEELHOUSE
    shutil.rmtree(WHEELHOUSE, ignore_errors=True)
    argv = [sys.executable, "-m", "pip", "download", "--quiet", "--dest", str(WHEELHOUSE)]
    argv += [*target, "--constraint", str(lock), "--requirement", str(wanted)]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=600, check=False)
    if done.returncode != 0:
        raise ComposeError(f"pip download for the image failed:\n{done.stderr[-4000:]}")
    stamp.write_text(digest.hexdigest())
    return WHEELHOUSE


def base_image(client: docker.DockerClient) -> str:
    """`python:3.11-slim` if present or pullable, else the debootstrap image (built if needed)."""
    for tag in (DEFAULT_BASE_IMAGE, LOCAL_BASE_IMAGE):
        if _have_image(client, tag):
            return tag
    try:
        docker_client(_PULL_TIMEOUT_S).images.pull(DEFAULT_BASE_IMAGE)
        return DEFAULT_BASE_IMAGE
    except (docker.errors.DockerException, requests.RequestException) as exc:
        why = str(exc).splitlines()[0][:200]
        print(f"note: cannot pull {DEFAULT_BASE_IMAGE} ({why}); building {LOCAL_BASE_IMAGE}")
    script = COMPOSE_DIR / "build-base-image.sh"
    done = subprocess.run(["bash", str(script), LOCAL_BASE_IMAGE], timeout=1800, check=False)
    if done.returncode != 0:
        raise ComposeError(f"{script} failed (exit {done.returncode})")
    return LOCAL_BASE_IMAGE


def _have_image(client: docker.DockerClient, tag: str) -> bool:
    try:
        client.images.get(tag)
    except docker.errors.ImageNotFound:
        return False
    return True


@functools.cache
def ensure_image(base: str | None = None) -> str:
    """Build (or refresh from cache) `IMAGE` from the current tree; its image id.

    Once per process: a benchmark starts many stacks from one build.
    """
    client = docker_client(timeout_s=1800)
    base = base or base_image(client)
    gather_wheelhouse()
    try:
        image, _logs = client.images.build(
            path=str(REPO),
            dockerfile=str(DOCKERFILE.relative_to(REPO)),
            tag=IMAGE,
            buildargs={"BASE_IMAGE": base},
            rm=True,
            forcerm=True,
        )
    except docker.errors.BuildError as exc:
        tail = "".join(str(part.get("stream", part.get("error", ""))) for part in exc.build_log)
        raise ComposeError(f"building {IMAGE} from {base} failed: {exc}\n{tail[-4000:]}") from exc
    return str(image.id)
