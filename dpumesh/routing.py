"""Pure routing decisions of the DPU sidecar: which service, which worker.

Kept free of I/O so the rules (DESIGN §2: path prefix, then Host, then the
entry service; least outstanding requests among live workers; the node a
call goes to, `nearest`) are easy to test and cheap on the hot path.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from urllib.parse import urlsplit


def host_service(host: str | None, known: Iterable[str]) -> str | None:
    """The service a `Host`/URL host names: an exact match, else its first DNS label.

    `s1`, `s1:80` and `s1.default.svc.cluster.local` all name `s1`; service
    names may contain `-` (`ms-001`), so only `.` and `:` separate.
    """
    if not host:
        return None
    name = host.rsplit(":", 1)[0] if host.count(":") == 1 else host
    name = name.strip().lower()
    known_set = known if isinstance(known, set | frozenset | dict) else set(known)
    if name in known_set:
        return name
    label = name.split(".", 1)[0]
    return label if label in known_set else None


def split_prefix(path: str, known: Iterable[str]) -> tuple[str | None, str]:
    """`/<service>/rest` -> (service, `/rest`) when the first segment is a known service."""
    if not path.startswith("/"):
        return None, path
    segment, sep, rest = path[1:].partition("/")
    if segment and segment in known:
        return segment, "/" + rest if sep else "/"
    return None, path


def nearest(node: str, instance_nodes: Sequence[str]) -> tuple[str, ...]:
    """The nodes a caller on `node` sends calls to for a service on `instance_nodes`.

    `(node,)` when the callee has an instance there, else every node that has
    one, in order, without repeats (to be used round robin). This is DPUmesh's
    own behaviour (local workers first, else the HTTP fallback to a node that
    has some), written once so that every stack applies the same rule and a
    comparison between meshes stays fair.
    """
    if node in instance_nodes:
        return (node,)
    return tuple(dict.fromkeys(instance_nodes))


@dataclass(frozen=True, slots=True)
class EgressTarget:
    """Where a worker's egress URL points: a service id (known or not) and the path."""

    service: str
    host: str
    path: str


def egress_target(url: str, known: Iterable[str]) -> EgressTarget | None:
    """Resolve an egress URL; None when it names no host or is not a URL at all.

    Never raises: the URL is chosen by a worker (or a client, via the seed JSON
    `url`), and `urlsplit` raises ValueError on an unbalanced IPv6 bracket.
    """
    try:
        parts = urlsplit(url if "://" in url else "http://" + url)
        hostname = parts.hostname  # lower case, no port, no IPv6 brackets
    except ValueError:
        return None
    host = parts.netloc.rsplit("@", 1)[-1]
    if not host or not hostname:
        return None
    path = parts.path or "/"
    if parts.query:
        path += "?" + parts.query
    service = host_service(host, known) or hostname.split(".", 1)[0]
    if not service:
        return None  # `.`, `.local`: no label to name a service by
    return EgressTarget(service=service, host=host, path=path)


class WorkerTable:
    """Live workers per service and their outstanding requests (least-outstanding choice)."""

    def __init__(self, services: Iterable[str] = ()) -> None:
        self._by_service: dict[str, list[int]] = {}
        self._service_of: dict[int, str] = {}
        self.outstanding: dict[int, int] = {}
        self.known: set[str] = set(services)
        self._rotor = 0

    def update(self, live: Iterable[tuple[int, str]]) -> list[int]:
        """Replace the live set with `(worker key, service)` pairs; return removed keys."""
        new = dict(live)
        removed = [key for key in self._service_of if key not in new]
        for key in removed:
            self.outstanding.pop(key, None)
        by_service: dict[str, list[int]] = {}
        for key, service in sorted(new.items()):
            by_service.setdefault(service, []).append(key)
            self.outstanding.setdefault(key, 0)
        self._by_service = by_service
        self._service_of = new
        self.known.update(by_service)
        return removed

    def workers(self, service: str) -> list[int]:
        """Live worker keys of `service` (possibly empty)."""
        return self._by_service.get(service, [])

    def pick(self, service: str) -> int | None:
        """The live worker of `service` with the fewest outstanding requests (ties rotate)."""
        keys = self._by_service.get(service)
        if not keys:
            return None
        self._rotor += 1
        n = len(keys)
        best = keys[self._rotor % n]
        best_load = self.outstanding[best]
        for i in range(1, n):
            key = keys[(self._rotor + i) % n]
            load = self.outstanding[key]
            if load < best_load:
                best, best_load = key, load
        return best

    def started(self, key: int) -> None:
        """A request was sent to worker `key`."""
        if key in self.outstanding:
            self.outstanding[key] += 1

    def finished(self, key: int) -> None:
        """Worker `key` answered (or was given up on)."""
        if self.outstanding.get(key, 0) > 0:
            self.outstanding[key] -= 1
