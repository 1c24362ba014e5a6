"""One results directory (DESIGN §6): what goes where, and the rows the runner writes.

Layout of ``<out>/<UTC timestamp>/`` (``<out>/latest`` links to the newest)::

    results.csv                      one row per stack x repetition x load level
    faults.csv, faults.json          `run_bench.py faults`: a row and a timeline per stack x fault
    roles.csv                        ... x role: CPU and memory of each role
    meta.json                        schema_version, versions, git, machine, config, checks, ...
    hist/<stack>-rep<r>-<level>.hdr  merged µs histogram of the level (+ .hdr.json sidecar)
    hist/parts/                      per-process histograms of distributed Locust runs
    locust/<stack>-rep<r>-<level>*   Locust's own CSV stats (full history) and its log
    configs/<stack>/                 generated mesh configs and stack.json of the first start
    stacks/<stack>-rep<r>/           every stack start's process logs and stack.json

<stack> is the compared stack's label: the mesh, or ``dpumesh@dpu_speed=0.5`` for
a what-if variant. Repetition 0 is the calibration start (histograms and Locust
files only; its throughput is in meta.json ``ladder.calibration``).

The CSVs' columns and types are `harness.output.schema`'s, which both writes
and reads them. Rows are appended as each level finishes, so an interrupted run
keeps what it measured.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from hdrh.histogram import HdrHistogram

from harness.output import schema
from harness.output.schema import DPU_MODEL, FAULTS, META_JSON, RESULTS, ROLES, SCHEMA_VERSION
from loadtests import latency

FAULTS_JSON = "faults.json"
HIST_DIR = "hist"
LATEST = "latest"


def new_run_dir(out: Path, now: datetime | None = None) -> Path:
    """A fresh ``<out>/<UTC timestamp>`` (suffixed if that second is taken)."""
    stamp = f"{now or datetime.now(UTC):%Y%m%dT%H%M%SZ}"
    out.mkdir(parents=True, exist_ok=True)
    for n in range(100):
        path = out / (stamp if n == 0 else f"{stamp}-{n}")
        try:
            path.mkdir()
        except FileExistsError:
            continue
        return path
    raise RuntimeError(f"cannot create a run directory under {out}")


def link_latest(run_dir: Path) -> Path:
    """Point ``<out>/latest`` at `run_dir` (relative symlink, replaced atomically)."""
    link = run_dir.parent / LATEST
    tmp = run_dir.parent / f".{LATEST}.{os.getpid()}"
    tmp.unlink(missing_ok=True)
    tmp.symlink_to(run_dir.name)
    tmp.replace(link)
    return link


class ResultsDir:
    """Writes one run's files; paths for the runner's Locust runs and stacks."""

    def __init__(self, path: Path) -> None:
        self.path = path
        for sub in (HIST_DIR, "locust", "configs", "stacks"):
            (path / sub).mkdir(parents=True, exist_ok=True)

    @staticmethod
    def name(stack: str, rep: int, level: str) -> str:
        return f"{stack}-rep{rep}-{level}"

    def hist_path(self, stack: str, rep: int, level: str) -> Path:
        return self.path / HIST_DIR / f"{self.name(stack, rep, level)}.hdr"

    def locust_prefix(self, stack: str, rep: int, level: str) -> Path:
        return self.path / "locust" / self.name(stack, rep, level)

    def stack_dir(self, stack: str, rep: int) -> Path:
        return self.path / "stacks" / f"{stack}-rep{rep}"

    def append_result(self, row: Mapping[str, Any]) -> None:
        """Append one results.csv row (`result_row`); ValueError when it is not one."""
        schema.append_rows(self.path, RESULTS, [row])

    def append_roles(self, rows: Iterable[Mapping[str, Any]]) -> None:
        """Append roles.csv rows (`role_rows`)."""
        schema.append_rows(self.path, ROLES, rows)

    def append_fault(self, row: Mapping[str, Any]) -> None:
        """Append one faults.csv row (`harness.run.faults`)."""
        schema.append_rows(self.path, FAULTS, [row])

    def write_meta(self, meta: Mapping[str, Any]) -> Path:
        """meta.json, with the schema version its CSVs are written in."""
        return self.write_json(META_JSON, {schema.VERSION_KEY: SCHEMA_VERSION, **meta})

    def write_json(self, name: str, doc: Mapping[str, Any]) -> Path:
        """Write `name` whole or not at all (a reader never sees half a file)."""
        path = self.path / name
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(doc, indent=2, sort_keys=False, default=str) + "\n")
        tmp.replace(path)
        return path

    def copy_configs(self, stack: str, files: Mapping[str, Path]) -> dict[str, str]:
        """Copy a stack's generated configs (and stack.json) to configs/<stack>/; relative paths."""
        dest = self.path / "configs" / stack
        dest.mkdir(parents=True, exist_ok=True)
        copied = {}
        for name, src in files.items():
            target = dest / Path(src).name
            shutil.copyfile(src, target)
            copied[name] = str(target.relative_to(self.path))
        return copied


def merge_histograms(hist_path: Path) -> tuple[HdrHistogram, dict[str, Any]]:
    """The level's merged histogram and sidecar, written at `hist_path`.

    A single Locust process wrote `hist_path` itself. Distributed workers
    wrote ``<stem>.w<N>.hdr``: they are merged exactly into `hist_path` and
    moved, with their sidecars, to ``parts/`` next to it (so readers that
    also glob worker files never count a request twice).
    """
    hist, side = latency.load_run(hist_path)
    parts = [Path(f) for f in side["files"] if Path(f) != hist_path]
    if parts:
        latency.dump_histogram(hist, hist_path)
        parts_dir = hist_path.parent / "parts"
        parts_dir.mkdir(exist_ok=True)
        for part in parts:
            for f in (part, latency.sidecar_path(part)):
                if f.exists():
                    f.replace(parts_dir / f.name)
        side["files"] = [f"parts/{p.name}" for p in parts]
        sidecar = latency.sidecar_path(hist_path)
        sidecar.write_text(json.dumps(side, indent=1, sort_keys=True) + "\n")
    return hist, side


def result_row(
    *,
    mesh: str,
    stack: str,
    mode: str,
    workmodel: str,
    rep: int,
    level: str,
    users: int,
    offered_rps: float | None,
    summary: latency.LatencySummary,
    sidecar: Mapping[str, Any],
    usage: Mapping[str, Any] | None,
    downstream_calls_per_req: float | None,
    cross_node_per_req: float | None,
    nodes: int,
    mtls: bool,
    dpu_model: Mapping[str, Any],
    checks_ok: bool,
    failed_checks: list[str],
) -> dict[str, Any]:
    """One results.csv row (`schema.RESULTS`); `usage` is `WindowUsage.derive(...)` (None:
    not measured).

    `stack` is the compared stack's label (`harness.run.plan.Stack.label`); `dpu_model`
    is `Placement.record()`: the placement and DPU model in force for that stack.
    """
    usage = usage or {}
    return {
        "mesh": mesh,
        "stack": stack,
        "mode": mode,
        "workmodel": workmodel,
        "rep": rep,
        "level": level,
        "users": users,
        "offered_rps": offered_rps,
        "achieved_rps": sidecar.get("achieved_rps"),
        "requests": sidecar.get("requests", 0),
        "failures": sidecar.get("failures", 0),
        "duration_s": sidecar.get("window_s"),
        "mean_us": summary.mean_us if summary.count else None,
        "p50_us": summary.p50_us if summary.count else None,
        "p90_us": summary.p90_us if summary.count else None,
        "p99_us": summary.p99_us if summary.count else None,
        "p999_us": summary.p999_us if summary.count else None,
        "max_us": summary.max_us if summary.count else None,
        "cpu_host_ms_per_req": usage.get("cpu_host_ms_per_req"),
        "cpu_offload_ms_per_req": usage.get("cpu_offload_ms_per_req"),
        "cpu_loadgen_ms_per_req": usage.get("cpu_loadgen_ms_per_req"),
        "cpu_total_ms_per_req": usage.get("cpu_total_ms_per_req"),
        "vcpu_host_per_1000rps": usage.get("vcpu_host_per_1000rps"),
        "vcpu_offload_per_1000rps": usage.get("vcpu_offload_per_1000rps"),
        "vcpu_total_per_1000rps": usage.get("vcpu_total_per_1000rps"),
        "cpu_window_s": usage.get("window_s"),
        "cpu_window_requests": usage.get("requests"),
        "rss_host_mb": usage.get("rss_host_mb"),
        "rss_offload_mb": usage.get("rss_offload_mb"),
        "downstream_calls_per_req": downstream_calls_per_req,
        "cross_node_per_req": cross_node_per_req,
        "nodes": nodes,
        "mtls": mtls,
        **{c.name: dpu_model[c.name] for c in DPU_MODEL},
        "checks_ok": checks_ok,
        "checks": ";".join(failed_checks),
    }


def role_rows(
    mesh: str, stack: str, rep: int, level: str, usage: Mapping[str, Any]
) -> list[dict[str, Any]]:
    """roles.csv rows (`schema.ROLES`) of one level from `WindowUsage.derive(...)`: roles
    with processes only."""
    rows = []
    for role, u in usage["roles"].items():
        if not u["processes"]:
            continue
        rows.append(
            {
                "mesh": mesh,
                "stack": stack,
                "rep": rep,
                "level": level,
                "role": role,
                "side": u["role_class"],
                "cpu_s": u["cpu_s"],
                "cpu_ms_per_req": u["cpu_ms_per_req"],
                "vcpu_per_1000rps": u["vcpu_per_1000rps"],
                "rss_mean_mb": u["rss_mean_mb"],
                "rss_max_mb": u["rss_max_mb"],
                "pss_mean_mb": u["pss_mean_mb"],
                "processes": u["processes"],
                "window_s": usage["window_s"],
                "notes": "; ".join(u["notes"]),
            }
        )
    return rows
