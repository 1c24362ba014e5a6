"""Start a real DPUmesh piece by piece for end-to-end tests.

The components are the `dpumesh` stack description's own (`harness.stacks.dpumesh`),
rendered by the local deployer's resolver (loopback, this interpreter, a namespace
of the test's); only the order and the moment each one starts or dies is the
test's, which is what fault tests need.
"""

from __future__ import annotations

import json
import mmap
import os
import signal
import socket
import struct
import subprocess
import time
import urllib.request
from pathlib import Path

import posix_ipc

from harness.deploy.local import LocalResolver, program
from harness.stacks import dpumesh
from harness.stacks.model import Component, render

REPO = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def shm_objects(namespace: str) -> list[str]:
    """This namespace's POSIX shared memory and semaphores still in /dev/shm."""
    marker = f"dpumesh.{namespace}."
    return sorted(n for n in os.listdir("/dev/shm") if marker in n)


def corrupt(name: str, offset: int, fmt: str, value: int | bytes) -> None:
    """Overwrite bytes of the shared-memory segment `name` (fault injection)."""
    shm = posix_ipc.SharedMemory(name)
    with mmap.mmap(shm.fd, shm.size) as mm:
        struct.pack_into(fmt, mm, offset, value)
    shm.close_fd()


class Mesh:
    """dpa-daemon + dpu-daemon + `python -m dpumesh.server` per service, as subprocesses."""

    def __init__(self, namespace: str, tmp: Path, port: int | None = None) -> None:
        self.ns = namespace
        self.tmp = tmp
        self.port = port or free_port()
        self.procs: dict[str, subprocess.Popen] = {}
        self.env = dict(os.environ, PYTHONPATH=str(REPO))
        # Only the bridge has a port; every piece shares the test's namespace.
        self._resolver = LocalResolver(namespace, {(dpumesh.DPU, "public"): self.port}, tmp)

    def _spawn(self, name: str, component: Component, **env: str) -> subprocess.Popen:
        rendered = render(component, self._resolver)
        log = open(self.tmp / f"{name}.log", "ab")  # noqa: SIM115 - owned by the process
        proc = subprocess.Popen(
            [program(component.program), *rendered.args],
            env=dict(self.env, **rendered.env, **env),
            cwd=REPO,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.procs[name] = proc
        return proc

    def start_dpa(self) -> None:
        self._spawn("dpa", dpumesh.dpa_daemon())

    def start_dpu(self, *extra: str) -> None:
        self._spawn("dpu", dpumesh.dpu_daemon("s0", (), *extra))
        self.wait_http("/_dpumesh/health")

    def start_service(
        self,
        service: str,
        processes: int = 2,
        app: str = "tests.apps.seed_app:app",
        **env: str,
    ) -> None:
        threads = int(env.pop("DPUMESH_THREADS", "8"))
        self._spawn(f"svc-{service}", dpumesh.worker(service, processes, threads, app=app, env=env))

    def url(self, path: str = "/") -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def wait_http(self, path: str, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                with urllib.request.urlopen(self.url(path), timeout=2) as resp:
                    if resp.status == 200:
                        return
            except OSError:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{path} not ready; logs in {self.tmp}") from None
            time.sleep(0.05)

    def stats(self) -> dict:
        with urllib.request.urlopen(self.url("/_dpumesh/stats"), timeout=5) as resp:
            return json.load(resp)

    def wait_workers(self, counts: dict[str, int], timeout: float = 30.0) -> None:
        """Wait until each service has exactly the given number of live workers."""
        deadline = time.monotonic() + timeout
        while True:
            workers = self.stats()["workers"]
            if all(len(workers.get(s, [])) == n for s, n in counts.items()):
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"workers {workers}, wanted {counts}; logs in {self.tmp}")
            time.sleep(0.1)

    def stop(self, name: str, sig: int = signal.SIGTERM) -> None:
        proc = self.procs.pop(name)
        if proc.poll() is None:
            proc.send_signal(sig)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()

    def close(self) -> None:
        # Workers first, then the daemons, as an operator would.
        for name in sorted(self.procs, key=lambda n: not n.startswith("svc-")):
            self.stop(name)
