"""The DPU model in force for one run or one `serve`: layout, profile, cgroups, read-back.

`prepare()` turns the options (`placement`, `dpu_profile` and the single
overrides) into a `Placement`: the layout, the effective DPU model, and, when
the model asks for less DPU capacity than the dpu set's CPUs give, a cgroup
for the dpu set with that CPU bandwidth. It is made before any stack starts
and removed after the last one stops (`close()`, or leaving `with`), so every
stack of a run sees the same placement. A speed below 1 with no way to make
that cgroup stops here, with one line naming what is missing: the setting is
never ignored.

Deployers ask `argv()` for a component's command already placed (CPU
affinity and cgroup from its first instruction, `harness.placement.launch`),
and `verify()` reads back what the kernel really applies to every process and
thread of a running stack.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from harness.names import CPU_SETS
from harness.placement import cgroups, readback
from harness.placement.cgroups import CgroupSet
from harness.placement.launch import wrap_argv
from harness.placement.layout import Layout, PlacementError, format_cpus, parse_layout
from harness.placement.profiles import DpuModel, Fit, resolve

#: Where cgroups are made; tests point it at a directory that is not a cgroup mount.
CGROUP_ROOT_ENV = "DPUMESH_CGROUP_ROOT"


@dataclass
class Placement:
    """A layout and DPU model in force, with the cgroup that enforces the DPU speed."""

    layout: Layout
    model: DpuModel
    fit: Fit
    quota_cores: float | None  # CPU bandwidth of the dpu set; None = unlimited
    group: CgroupSet | None

    def cpus(self, cpu_set: str) -> frozenset[int] | None:
        """The CPUs a set's processes are pinned to (None: unrestricted, `shared`)."""
        return None if self.layout.shared else self.layout.cpus(cpu_set)

    def argv(self, argv: Sequence[str], cpu_set: str) -> list[str]:
        """`argv` started on `cpu_set`'s CPUs and, for the dpu set, in its cgroup."""
        files = self.group.procs_files(cpu_set) if self.group and cpu_set == "dpu" else ()
        return wrap_argv(argv, self.cpus(cpu_set), files)

    def verify(self, pids_by_set: Mapping[str, Iterable[int]]) -> list[str]:
        """One line per process or thread whose CPUs or CPU bandwidth differ from the layout."""
        problems = []
        for cpu_set, pids in pids_by_set.items():
            pids = list(pids)
            expected = self.layout.cpus(cpu_set)  # `shared`: every online CPU
            problems += readback.check_processes(expected, readback.observe(pids), cpu_set)
            if cpu_set == "dpu" and self.group is not None:
                for pid in pids:
                    try:
                        limit = readback.cgroup_limit(pid, self.group.hierarchy)
                    except (FileNotFoundError, ProcessLookupError):
                        continue
                    problems += readback.check_limit(self.quota_cores, limit, f"dpu pid {pid}")
        return problems

    def record(self) -> dict[str, Any]:
        """What meta.json and the results keep of the model (the layout as text too)."""
        return {
            "placement": self.layout.as_text(),
            "layout": {s: format_cpus(self.layout.cpus(s)) for s in CPU_SETS},
            "shared": self.layout.shared,
            "overlaps": [list(pair) for pair in self.layout.overlaps()],
            **self.model.columns(),
            "dpu_cores": self.model.dpu_cores,
            "dpu_cores_simulated": self.fit.cores,
            "dpu_quota_cores": self.quota_cores,
            "overridden": sorted(self.model.overridden),
            "unmet": list(self.fit.unmet),
            "sentence": self.model.sentence(self.layout),
        }

    def read_back(self, pids_by_set: Mapping[str, Iterable[int]]) -> dict[str, Any]:
        """`record()`, the CPUs each set's threads are allowed as read from /proc, and every
        mismatch with the layout (`stack.json`)."""
        pids = {cpu_set: list(p) for cpu_set, p in pids_by_set.items()}
        observed = {
            cpu_set: sorted(
                {format_cpus(c) for t in readback.observe(p).values() for c in t.values()}
            )
            for cpu_set, p in pids.items()
        }
        return {**self.record(), "observed": observed, "readback": self.verify(pids)}

    def close(self) -> None:
        if self.group is not None:
            self.group.remove()

    def __enter__(self) -> Placement:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()


def prepare(
    placement: str,
    dpu_profile: str,
    overrides: Mapping[str, float | None],
    *,
    online_cpus: Iterable[int] | None = None,
    cgroup_root: Path | None = None,
) -> Placement:
    """The placement of a run (`PlacementError`, one line, if it cannot be had)."""
    online = readback.online_cpus() if online_cpus is None else frozenset(online_cpus)
    layout = parse_layout(placement, online)
    model = resolve(dpu_profile, overrides)
    fit = model.fit(layout.dpu_cores)
    quota = fit.quota_cores
    if layout.shared:  # the dpu set is every CPU: only a speed below 1 limits it
        quota = model.dpu_speed * fit.cores if model.dpu_speed < 1 else None
    if quota is None:
        return Placement(layout, model, fit, None, None)
    root = cgroup_root or Path(os.environ.get(CGROUP_ROOT_ENV, str(cgroups.DEFAULT_ROOT)))
    try:
        cgroups.remove_stale(root)  # left by a harness that was killed before it cleaned up
        group = CgroupSet.create({"dpu": (layout.dpu, quota)}, root=root)
    except PlacementError as exc:
        raise PlacementError(
            f"cannot hold the DPU at {model.dpu_speed:g}x host speed: {exc}"
        ) from None
    except OSError as exc:
        raise PlacementError(
            f"cannot hold the DPU at {model.dpu_speed:g}x host speed: cgroup under {root}: "
            f"{exc.strerror or exc}"
        ) from None
    return Placement(layout, model, fit, quota, group)
