"""CPU layouts: which cores each role may run on (DESIGN §5), as pure data.

A layout names three CPU sets. `host` carries every stack's own processes
(app, sidecar, gateway, node proxies) and is the same for every stack, so the
host budget is what a comparison compares; `dpu` carries the DPU daemons (the
simulated DPU's own cores); `loadgen` carries Locust. `shared` is the
unrestricted layout: every set is every online CPU.

Text forms (Linux cpu-list syntax for each set, e.g. `0-3,5`):

    shared                          no restriction
    auto                            chosen from the online CPUs (see auto_layout)
    host=0-3,dpu=4-5,loadgen=6-7    explicit; every set exactly once
    host=0;dpu=1;loadgen=1          the same, as `Layout.as_text` writes it

No I/O here: callers pass the online CPUs in, so every rule is unit-testable.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

from harness.names import CPU_SETS, ROLE_CPU_SET

_RANGE = re.compile(r"(\d+)(?:-(\d+))?")


class PlacementError(ValueError):
    """A placement or DPU-model setting cannot be honoured; str() is one line."""


def parse_cpus(text: str) -> frozenset[int]:
    """CPU ids of a Linux cpu-list such as `0-3,5` (the syntax of cpuset.cpus and /proc)."""
    cpus: set[int] = set()
    for part in text.strip().split(","):
        match = _RANGE.fullmatch(part.strip())
        if match is None:
            raise PlacementError(f"bad CPU list {text.strip()!r}: expected e.g. 0-3,5")
        first = int(match[1])
        last = int(match[2]) if match[2] is not None else first
        if last < first:
            raise PlacementError(f"bad CPU range {part.strip()!r} in {text.strip()!r}")
        cpus.update(range(first, last + 1))
    return frozenset(cpus)


def format_cpus(cpus: Iterable[int]) -> str:
    """The shortest cpu-list for `cpus`: {0, 1, 2, 5} -> `0-2,5`."""
    parts: list[str] = []
    ordered = sorted(set(cpus))
    start = 0
    for i, cpu in enumerate(ordered):
        if i + 1 == len(ordered) or ordered[i + 1] != cpu + 1:
            first = ordered[start]
            parts.append(str(cpu) if first == cpu else f"{first}-{cpu}")
            start = i + 1
    return ",".join(parts)


def role_cpuset(role: str) -> str:
    """The CPU set a role runs on."""
    try:
        return ROLE_CPU_SET[role]
    except KeyError:
        known = ", ".join(ROLE_CPU_SET)
        raise PlacementError(f"unknown role {role!r} (known: {known})") from None


@dataclass(frozen=True)
class Layout:
    """The CPUs of each set; with `shared`, each set is every online CPU."""

    shared: bool
    host: frozenset[int]
    dpu: frozenset[int]
    loadgen: frozenset[int]

    def __post_init__(self) -> None:
        for name in CPU_SETS:
            if not self.cpus(name):
                raise PlacementError(f"CPU set {name} is empty")

    def cpus(self, set_name: str) -> frozenset[int]:
        """The CPUs of one set (`host`, `dpu` or `loadgen`)."""
        if set_name not in CPU_SETS:
            raise PlacementError(f"unknown CPU set {set_name!r} (known: {', '.join(CPU_SETS)})")
        return getattr(self, set_name)

    def cpus_of(self, role: str) -> frozenset[int]:
        """The CPUs a role's processes must be allowed, exactly."""
        return self.cpus(role_cpuset(role))

    @property
    def dpu_cores(self) -> int:
        """How many DPU cores this machine simulates under this layout."""
        return len(self.dpu)

    def overlaps(self) -> list[tuple[str, str]]:
        """Pairs of sets that share CPUs, in CPU_SETS order (the report names each)."""
        return [
            (a, b)
            for i, a in enumerate(CPU_SETS)
            for b in CPU_SETS[i + 1 :]
            if self.cpus(a) & self.cpus(b)
        ]

    def as_text(self) -> str:
        """`shared`, or `host=0;dpu=1;loadgen=1` (a CSV column; parse_layout reads it back)."""
        if self.shared:
            return "shared"
        return ";".join(f"{name}={format_cpus(self.cpus(name))}" for name in CPU_SETS)


def shared_layout(online_cpus: Iterable[int]) -> Layout:
    """Today's behaviour: no restriction, every set is every online CPU."""
    online = _online(online_cpus)
    return Layout(True, online, online, online)


def auto_layout(online_cpus: Iterable[int]) -> Layout:
    """The default layout for this machine's CPUs (lowest ids first).

    1 CPU: every set on it (all sets overlap). 2 CPUs: host on the first, dpu
    and loadgen together on the second. 3 or more: disjoint sets, dpu and
    loadgen a quarter of the CPUs each (at least one), host the rest, so host
    is always the largest or equal (4 CPUs: 2/1/1, 8: 4/2/2, 16: 8/4/4).
    """
    cpus = sorted(_online(online_cpus))
    if len(cpus) == 1:
        one = frozenset(cpus)
        return Layout(False, one, one, one)
    if len(cpus) == 2:
        return Layout(False, frozenset(cpus[:1]), frozenset(cpus[1:]), frozenset(cpus[1:]))
    quarter = max(1, len(cpus) // 4)
    host = len(cpus) - 2 * quarter
    return Layout(
        False,
        frozenset(cpus[:host]),
        frozenset(cpus[host : host + quarter]),
        frozenset(cpus[host + quarter :]),
    )


def parse_layout(text: str, online_cpus: Iterable[int]) -> Layout:
    """A layout from `shared`, `auto` or `host=..,dpu=..,loadgen=..` (`,` or `;` between)."""
    online = _online(online_cpus)
    spec = text.strip()
    if spec == "shared":
        return shared_layout(online)
    if spec == "auto":
        return auto_layout(online)
    found: dict[str, list[str]] = {}
    current: list[str] | None = None
    for token in re.split(r"[,;]", spec):
        key, eq, value = token.partition("=")
        if eq:
            key = key.strip()
            if key not in CPU_SETS:
                raise PlacementError(
                    f"unknown CPU set {key!r} in placement {spec!r} "
                    f"(expected shared, auto or {'=..,'.join(CPU_SETS)}=..)"
                )
            if key in found:
                raise PlacementError(f"CPU set {key} given twice in placement {spec!r}")
            current = found[key] = []
            token = value
        elif current is None:
            raise PlacementError(
                f"bad placement {spec!r}: expected shared, auto or host=..,dpu=..,loadgen=.."
            )
        if token.strip():
            current.append(token)
    missing = [name for name in CPU_SETS if name not in found]
    if missing:
        raise PlacementError(f"placement {spec!r} lacks CPU set {', '.join(missing)}")
    sets: dict[str, frozenset[int]] = {}
    for name in CPU_SETS:
        if not found[name]:
            raise PlacementError(f"CPU set {name} is empty in placement {spec!r}")
        cpus = parse_cpus(",".join(found[name]))
        offline = cpus - online
        if offline:
            raise PlacementError(
                f"CPU set {name} names cpu {format_cpus(offline)}, not online "
                f"(online: {format_cpus(online)})"
            )
        sets[name] = cpus
    return Layout(False, sets["host"], sets["dpu"], sets["loadgen"])


def _online(online_cpus: Iterable[int]) -> frozenset[int]:
    online = frozenset(online_cpus)
    if not online:
        raise PlacementError("no online CPUs given")
    return online
