"""Restarts of a compose stack: recorded from the engine's event stream, pods kept whole.

Docker restarts a container whose process died (`restart: always`, its own
back-off), but not one stopped through its API: `docker kill`/`docker stop`
count as "manually stopped" and leave it down, so a fault is injected by
killing the container's process, as a crash would. `RestartCount` cannot
count restarts either: any API start or restart resets it to 0. So a
`RestartWatch` listens to the engine's events from the moment the stack is
ready (one blocking stream, no polling): a `die` followed by a `start` with
no `stop` in between is a restart by the engine's policy.

A restarted container gets new namespaces, and the containers that joined
its network (`network_mode: service:X`, an Envoy pod's app) or IPC
namespace (`ipc: service:X`, every DPUmesh container of the dpa-daemon)
stay in the old ones: an app no longer on its sidecar's loopback, a bridge
and workers on a /dev/shm the new DMA manager never sees. Kubernetes avoids
this with the pod sandbox, which outlives container restarts. Here the
watch restarts those joiners (`docker restart`) right after their owner
restarted, and records each as a restart of its own.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass
from typing import Any

import docker
import docker.errors
import requests

from harness.deploy.compose.cli import PROJECT_LABEL, SERVICE_LABEL
from harness.procs import RestartPolicy
from harness.stacks.model import StackDescription

_JOIN_TIMEOUT_S = 15.0
_STOP_TIMEOUT_S = 2  # SIGTERM grace of a joiner restarted with its owner


@dataclass(frozen=True)
class ContainerRestart:
    """One restart of a component's container (`at_*`: when it ended, from the engine)."""

    component: str
    role: str
    how: str
    at_wall_s: float
    at_mono_s: float
    restarted_wall_s: float
    by: str  # "engine" (its restart policy) or "harness" (restarted with its namespace owner)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def joiners_of(desc: StackDescription) -> dict[str, list[tuple[str, str]]]:
    """Per namespace owner, the components that join its namespaces, with the namespace kind."""
    joined: dict[str, list[tuple[str, str]]] = {}
    for c in desc.components:
        for owner, kind in ((c.network_of, "network"), (c.ipc_of, "IPC")):
            if owner:
                joined.setdefault(owner, []).append((c.name, kind))
    return joined


def exit_how(code: int) -> str:
    """An exit code as the engine reports it; above 128 it was signal code - 128."""
    return f"exit code {code}" + (f" (signal {code - 128})" if code > 128 else "")


class EnginePairing:
    """Turns a stream of container events into the engine's restarts (pure: no Docker)."""

    def __init__(self, roles: Mapping[str, str], mono_offset_s: float) -> None:
        self._roles = dict(roles)
        self._offset = mono_offset_s
        self._died: dict[str, tuple[float, int]] = {}

    def feed(self, event: Mapping[str, Any]) -> ContainerRestart | None:
        """The restart `event` completes, if it does."""
        attrs = event.get("Actor", {}).get("Attributes", {})
        component = attrs.get(SERVICE_LABEL)
        if component not in self._roles:
            return None
        action = event.get("Action") or event.get("status")
        at = event.get("timeNano", 0) / 1e9
        if action == "die":
            self._died[component] = (at, int(attrs.get("exitCode", -1)))
        elif action == "stop":  # stopped through the API: whatever starts it next is not the policy
            self._died.pop(component, None)
        elif action == "start" and component in self._died:
            died_at, code = self._died.pop(component)
            return ContainerRestart(
                component=component,
                role=self._roles[component],
                how=exit_how(code),
                at_wall_s=died_at,
                at_mono_s=died_at + self._offset,
                restarted_wall_s=at,
                by="engine",
            )
        return None


class RestartWatch:
    """Records a compose project's restarts and restarts namespace joiners with their owner."""

    def __init__(
        self,
        desc: StackDescription,
        project: str,
        client: docker.DockerClient,
        policy: RestartPolicy,
        notify: Callable[[str], None],
    ) -> None:
        self._project = project
        self._client = client  # its own: the stream blocks one connection
        self._policy = policy
        self._notify = notify
        self._roles = {c.name: c.role for c in desc.components}
        self._joiners = joiners_of(desc)
        self._records: list[ContainerRestart] = []
        self._cond = threading.Condition()
        self._closed = False
        self._stream: Any = None
        self._thread: threading.Thread | None = None

    def start(self, since_wall_s: float) -> None:
        """Listen from `since_wall_s` (the engine replays what happened since)."""
        self._stream = self._client.events(
            since=since_wall_s,
            filters={"type": "container", "label": f"{PROJECT_LABEL}={self._project}"},
            decode=True,
        )
        pairing = EnginePairing(self._roles, time.monotonic() - time.time())
        self._thread = threading.Thread(
            target=self._run, args=(pairing,), name=f"restarts-{self._project}", daemon=True
        )
        self._thread.start()

    def stop(self) -> None:
        """Close the stream (which ends the thread's blocking read) and wait for the thread."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        if self._stream is not None:
            with contextlib.suppress(Exception):  # already closed or broken: the aim is met
                self._stream.close()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=_JOIN_TIMEOUT_S)

    def restarts(self) -> dict[str, int]:
        """Restarts per component (every component present)."""
        counts = dict.fromkeys(self._roles, 0)
        with self._cond:
            for record in self._records:
                counts[record.component] += 1
        return counts

    def events(self) -> list[ContainerRestart]:
        with self._cond:
            return sorted(self._records, key=lambda r: r.at_wall_s)

    def wait_restarts(self, counts: Mapping[str, int], timeout_s: float) -> bool:
        """Block until each named component restarted `counts[name]` times (False on timeout)."""

        def done() -> bool:
            have = self.restarts()
            return all(have.get(n, 0) >= c for n, c in counts.items())

        with self._cond:
            return self._cond.wait_for(lambda: done() or self._closed, timeout=timeout_s) and done()

    def _run(self, pairing: EnginePairing) -> None:
        try:
            for event in self._stream:
                record = pairing.feed(event)
                if record is not None:
                    self._record(record)
                    self._notify(
                        f"compose: {record.component} ({record.role}) ended ({record.how}); "
                        "restarted by Docker"
                    )
                    if self._policy.restarts:
                        self._restart_joiners(record.component)
        except (docker.errors.DockerException, requests.RequestException, OSError, ValueError):
            if not self._closed:  # the stream broke while we still listened: say so
                self._notify(f"compose: {self._project}: lost the engine's event stream")

    def _record(self, record: ContainerRestart) -> None:
        with self._cond:
            self._records.append(record)
            self._cond.notify_all()

    def _restart_joiners(self, owner: str) -> None:
        for joiner, kind in self._joiners.get(owner, ()):
            if self._closed:
                return
            at_wall, at_mono = time.time(), time.monotonic()
            for container in self._containers(joiner):
                self._notify(
                    f"compose: restarting {joiner}, which shares the {kind} namespace of {owner}"
                )
                with contextlib.suppress(docker.errors.NotFound):  # the stack is going down
                    container.restart(timeout=_STOP_TIMEOUT_S)
                    self._record(
                        ContainerRestart(
                            component=joiner,
                            role=self._roles[joiner],
                            how=f"restarted with {owner} (shares its {kind} namespace)",
                            at_wall_s=at_wall,
                            at_mono_s=at_mono,
                            restarted_wall_s=time.time(),
                            by="harness",
                        )
                    )

    def _containers(self, component: str) -> Iterable[Any]:
        return self._client.containers.list(
            filters={"label": [f"{PROJECT_LABEL}={self._project}", f"{SERVICE_LABEL}={component}"]}
        )
