"""Read one results directory (DESIGN §6) into typed rows.

The runner writes ``results.csv`` (stack x repetition x load level),
``roles.csv`` (... x role), ``hist/<stack>-rep<rep>-<level>.hdr`` and
``meta.json``. Only ``results.csv`` is indispensable: anything else that is
missing or unreadable is recorded in `Run.problems`, which the report shows
at the top instead of failing or hiding it.

Rows are keyed by their *stack* label: the mesh in an ordinary run,
``dpumesh@dpu_speed=0.5`` for a what-if variant (results written before the
``stack`` column existed: the mesh).
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hdrh.histogram import HdrHistogram

from harness.output.results import DPU_MODEL_VALUES, HIST_DIR, META_JSON, RESULTS_CSV, ROLES_CSV
from loadtests import latency

REQUIRED_RESULT_COLUMNS = (
    "mesh",
    "mode",
    "workmodel",
    "rep",
    "users",
    "offered_rps",
    "achieved_rps",
    "requests",
    "failures",
    "duration_s",
    "mean_us",
    "p50_us",
    "p90_us",
    "p99_us",
    "p999_us",
    "cpu_host_ms_per_req",
    "cpu_offload_ms_per_req",
    "cpu_loadgen_ms_per_req",
    "rss_host_mb",
    "rss_offload_mb",
)
REQUIRED_ROLE_COLUMNS = (
    "mesh",
    "rep",
    "level",
    "role",
    "side",
    "cpu_s",
    "cpu_ms_per_req",
    "rss_mean_mb",
    "rss_max_mb",
)

#: Display order of the known meshes; others follow alphabetically.
MESH_ORDER = ("dpumesh", "envoy", "nodeproxy", "nomesh")
#: The DPU model values a row may carry (those in force for that row's stack).
MODEL_COLUMNS = DPU_MODEL_VALUES


class ResultsError(ValueError):
    """The results directory cannot be reported on (missing or malformed results.csv)."""


@dataclass(frozen=True)
class ResultRow:
    """One stack x repetition x load level (results.csv); None = empty cell."""

    mesh: str
    stack: str
    mode: str
    workmodel: str
    rep: int
    level: str
    users: int | None
    offered_rps: float | None
    achieved_rps: float | None
    requests: int
    failures: int
    duration_s: float | None
    mean_us: float | None
    p50_us: float | None
    p90_us: float | None
    p99_us: float | None
    p999_us: float | None
    cpu_host_ms_per_req: float | None
    cpu_offload_ms_per_req: float | None
    cpu_loadgen_ms_per_req: float | None
    rss_host_mb: float | None
    rss_offload_mb: float | None
    checks_ok: bool | None = None
    failed_checks: tuple[str, ...] = ()
    downstream_calls_per_req: float | None = None
    dpu_speed: float | None = None
    dma_latency_us: float | None = None
    dma_gbps: float | None = None
    dpu_cores: float | None = None

    @property
    def open_loop(self) -> bool:
        """Open loop (constant offered rate) rather than closed loop (fixed users)."""
        return self.offered_rps is not None


@dataclass(frozen=True)
class RoleRow:
    """CPU and memory of one role in one stack x repetition x level (roles.csv)."""

    mesh: str
    stack: str
    rep: int
    level: str
    role: str
    side: str
    cpu_s: float | None
    cpu_ms_per_req: float | None
    rss_mean_mb: float | None
    rss_max_mb: float | None


@dataclass
class Run:
    """Everything one results directory holds, plus what was wrong with it."""

    path: Path
    label: str
    rows: list[ResultRow]
    roles: list[RoleRow]
    meta: dict[str, Any]
    problems: list[str] = field(default_factory=list)

    @property
    def config(self) -> dict[str, Any]:
        cfg = self.meta.get("config")
        return cfg if isinstance(cfg, dict) else {}

    def config_number(self, key: str) -> float | None:
        """A numeric setting of meta.json's config, None when absent or not a number."""
        value = self.config.get(key)
        if isinstance(value, bool) or not isinstance(value, int | float | str):
            return None
        try:
            return _float(value)
        except ValueError:
            return None

    @property
    def slo_p99_ms(self) -> float | None:
        """The p99 latency objective of the run, None when meta.json does not give it."""
        return self.config_number("slo_p99_ms")

    def stacks(self) -> list[str]:
        """The stack labels of the run in display order."""
        return stack_order({r.stack for r in self.rows})

    @property
    def whatif(self) -> dict[str, Any] | None:
        """meta.json's what-if record (param, values per label, models), None in other runs."""
        record = self.meta.get("whatif")
        return record if isinstance(record, dict) else None

    @property
    def ladder_top(self) -> float | None:
        """The ladder's top rate: meta.json ``ladder.top``, else the highest offered rate."""
        ladder = self.meta.get("ladder")
        top = ladder.get("top") if isinstance(ladder, dict) else None
        if isinstance(top, int | float) and not isinstance(top, bool):
            return float(top)
        return max((r.offered_rps for r in self.rows if r.offered_rps is not None), default=None)

    def ladder_levels(self) -> dict[float, str]:
        """Offered rate -> level name of the common ladder's levels (``open-<R>``)."""
        return {
            r.offered_rps: r.level
            for r in self.rows
            if r.offered_rps is not None and r.level.startswith("open-")
        }

    def recorded_at_top(self, stack: str) -> bool | None:
        """meta.json's ``max_clean_throughput[stack].at_top``; None when not recorded."""
        record = self.meta.get("max_clean_throughput")
        entry = record.get(stack) if isinstance(record, dict) else None
        value = entry.get("at_top") if isinstance(entry, dict) else None
        return value if isinstance(value, bool) else None

    def levels(self) -> list[str]:
        """Level names, closed loop by users then open loop by offered rate."""
        first: dict[str, ResultRow] = {}
        for r in self.rows:
            first.setdefault(r.level, r)
        return sorted(first, key=lambda name: _level_sort_key(first[name]))

    def rows_at(self, stack: str, level: str) -> list[ResultRow]:
        """The repetitions of `stack` at `level`, ordered by repetition."""
        return sorted(
            (r for r in self.rows if r.stack == stack and r.level == level), key=lambda r: r.rep
        )

    def is_open_loop(self, level: str) -> bool:
        return any(r.open_loop for r in self.rows if r.level == level)

    def hist_path(self, stack: str, rep: int, level: str) -> Path:
        return self.path / HIST_DIR / f"{stack}-rep{rep}-{level}.hdr"

    def merged_histogram(self, stack: str, level: str) -> HdrHistogram | None:
        """All repetitions' histograms of `stack` at `level`, merged exactly; None if none.

        Missing or unreadable files are added to `problems`.
        """
        files: list[Path] = []
        for row in self.rows_at(stack, level):
            found = latency.histogram_files(self.hist_path(stack, row.rep, level))
            if not found:
                self.problem(f"histogram missing: {self.hist_path(stack, row.rep, level).name}")
            files.extend(found)
        if not files:
            return None
        try:
            return latency.load_merged(files)
        except (OSError, ValueError, IndexError) as exc:
            self.problem(f"histogram unreadable for {stack} at {level}: {exc}")
            return None

    def problem(self, text: str) -> None:
        """Record a problem with the data (once), for the report's banner."""
        if text not in self.problems:
            self.problems.append(text)


def split_stack(label: str) -> tuple[str, str]:
    """(mesh, variant) of a stack label: ``dpumesh@dpu_speed=0.5`` -> dpumesh, dpu_speed=0.5."""
    mesh, _, variant = label.partition("@")
    return mesh, variant


def _variant_key(variant: str) -> tuple[tuple[float, str], ...]:
    """Sort key of ``param=value,...``: numerically by value, so 2 comes before 10."""
    key = []
    for item in variant.split(","):
        name, _, value = item.partition("=")
        try:
            key.append((float(value), name))
        except ValueError:
            key.append((math.inf, item))
    return tuple(key)


def stack_order(stacks: Iterable[str]) -> list[str]:
    """`stacks` in the fixed display order: known meshes first, each one's variants by value."""
    known = {m: i for i, m in enumerate(MESH_ORDER)}

    def key(label: str) -> tuple[int, str, bool, tuple[tuple[float, str], ...]]:
        mesh, variant = split_stack(label)
        return (known.get(mesh, len(known)), mesh, bool(variant), _variant_key(variant))

    return sorted(set(stacks), key=key)


def level_name(users: int | None, offered_rps: float | None) -> str:
    """The runner's level name when results.csv has no `level` column."""
    if offered_rps is not None:
        return f"open-{offered_rps:g}"
    return f"closed-{users}"


def load_run(path: Path, label: str | None = None) -> Run:
    """Read results directory `path`; raises `ResultsError` if results.csv is unusable."""
    path = Path(path)
    problems: list[str] = []
    rows = [_result_row(rec) for rec in _read_csv(path / RESULTS_CSV, REQUIRED_RESULT_COLUMNS)]
    if not rows:
        raise ResultsError(f"{path / RESULTS_CSV}: no rows")
    roles: list[RoleRow] = []
    try:
        roles = [_role_row(rec) for rec in _read_csv(path / ROLES_CSV, REQUIRED_ROLE_COLUMNS)]
    except ResultsError as exc:
        problems.append(str(exc))
    meta: dict[str, Any] = {}
    try:
        loaded = json.loads((path / META_JSON).read_text(encoding="utf-8"))
        if isinstance(loaded, dict):
            meta = loaded
        else:
            problems.append(f"{META_JSON}: not a JSON object")
    except (OSError, ValueError) as exc:
        problems.append(f"{META_JSON} unreadable: {exc}")
    return Run(path, label or path.resolve().name, rows, roles, meta, problems)


def _read_csv(path: Path, required: tuple[str, ...]) -> list[dict[str, str]]:
    try:
        with path.open(newline="", encoding="utf-8") as fh:
            reader = csv.DictReader(fh)
            missing = [c for c in required if c not in (reader.fieldnames or ())]
            if missing:
                raise ResultsError(f"{path.name}: missing columns {', '.join(missing)}")
            return list(reader)
    except OSError as exc:
        raise ResultsError(f"{path.name} unreadable: {exc}") from exc


def _result_row(rec: dict[str, str]) -> ResultRow:
    try:
        users = _int(rec["users"])
        offered = _float(rec["offered_rps"])
        failed = (rec.get("checks") or "").strip()
        mesh = rec["mesh"].strip()
        return ResultRow(
            mesh=mesh,
            stack=(rec.get("stack") or "").strip() or mesh,
            mode=rec["mode"].strip(),
            workmodel=rec["workmodel"].strip(),
            rep=int(rec["rep"]),
            level=(rec.get("level") or "").strip() or level_name(users, offered),
            users=users,
            offered_rps=offered,
            achieved_rps=_float(rec["achieved_rps"]),
            requests=_int(rec["requests"]) or 0,
            failures=_int(rec["failures"]) or 0,
            duration_s=_float(rec["duration_s"]),
            mean_us=_float(rec["mean_us"]),
            p50_us=_float(rec["p50_us"]),
            p90_us=_float(rec["p90_us"]),
            p99_us=_float(rec["p99_us"]),
            p999_us=_float(rec["p999_us"]),
            cpu_host_ms_per_req=_float(rec["cpu_host_ms_per_req"]),
            cpu_offload_ms_per_req=_float(rec["cpu_offload_ms_per_req"]),
            cpu_loadgen_ms_per_req=_float(rec["cpu_loadgen_ms_per_req"]),
            rss_host_mb=_float(rec["rss_host_mb"]),
            rss_offload_mb=_float(rec["rss_offload_mb"]),
            checks_ok=_bool(rec.get("checks_ok")),
            failed_checks=tuple(c.strip() for c in failed.split(";") if c.strip()),
            downstream_calls_per_req=_float(rec.get("downstream_calls_per_req")),
            **{name: _float(rec.get(name)) for name in MODEL_COLUMNS},
        )
    except ValueError as exc:
        raise ResultsError(f"{RESULTS_CSV}: bad row {rec!r}: {exc}") from exc


def _role_row(rec: dict[str, str]) -> RoleRow:
    try:
        mesh = rec["mesh"].strip()
        return RoleRow(
            mesh=mesh,
            stack=(rec.get("stack") or "").strip() or mesh,
            rep=int(rec["rep"]),
            level=rec["level"].strip(),
            role=rec["role"].strip(),
            side=rec["side"].strip(),
            cpu_s=_float(rec["cpu_s"]),
            cpu_ms_per_req=_float(rec["cpu_ms_per_req"]),
            rss_mean_mb=_float(rec["rss_mean_mb"]),
            rss_max_mb=_float(rec["rss_max_mb"]),
        )
    except ValueError as exc:
        raise ResultsError(f"{ROLES_CSV}: bad row {rec!r}: {exc}") from exc


def _float(text: Any) -> float | None:
    """A number, or None for an empty/absent cell; NaN counts as absent."""
    if text is None or (isinstance(text, str) and not text.strip()):
        return None
    value = float(text)
    return None if math.isnan(value) else value


def _int(text: str | None) -> int | None:
    value = _float(text)
    return None if value is None else int(value)


def _bool(text: str | None) -> bool | None:
    if text is None or not text.strip():
        return None
    return text.strip().lower() in ("true", "1", "yes", "ok")


def _level_sort_key(row: ResultRow) -> tuple[int, float, str]:
    if row.open_loop:
        return (1, row.offered_rps or 0.0, row.level)
    return (0, float(row.users or 0), row.level)
