"""The results schema (DESIGN §6): every CSV's columns and their types, written and read here.

One declaration per CSV (`RESULTS`, `ROLES`, `FAULTS`): its columns in order, each
with a type and whether its cell may be empty. The writer
(`harness.output.results.ResultsDir`) turns a row into CSV text with
`Table.encode`, which refuses a row that does not match its declaration; the
reader (`read_table`) parses every cell by the same declaration and refuses a
file that does not match, naming the file, line and column; `reports.load_results`
makes pandas DataFrames of the parsed rows with `Table.dtypes`:

======  =================================  ===========================================
type    CSV cell                           pandas dtype
======  =================================  ===========================================
int     ``12``                             ``int64``; ``Int64`` (nullable) if optional
float   ``12.5`` (6 significant digits)    ``float64``; NaN = empty
str     text; ``""`` = none                ``string``
bool    ``true`` / ``false``               ``boolean``
======  =================================  ===========================================

An empty cell is None when read (pandas: NaN or NA) and means "not applicable"
(``offered_rps`` of a closed-loop level) or "not measurable" (CPU per request of a
level with no request); only optional columns have them.

meta.json carries ``schema_version`` (`SCHEMA_VERSION`, written by
`ResultsDir.write_meta`); `read_meta` refuses a directory of any other version in
one line naming both. Change a declaration only with a new version. Versions:

1. before this module: no ``schema_version`` in meta.json; the columns varied
   (no ``stack``, no DPU model columns, ...).
2. no ``nodes`` and ``cross_node_per_req`` in results.csv.
3. the declarations below.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SCHEMA_VERSION = 3
#: The meta.json key holding the schema version; a meta.json without it is version 1.
VERSION_KEY = "schema_version"

RESULTS_CSV = "results.csv"
ROLES_CSV = "roles.csv"
FAULTS_CSV = "faults.csv"
META_JSON = "meta.json"

_DTYPES = {float: "float64", str: "string", bool: "boolean"}


class ResultsError(ValueError):
    """A results directory cannot be read: a missing or malformed file, another schema version."""


@dataclass(frozen=True)
class Column:
    """One CSV column: its name, its type (int, float, str or bool), whether it may be empty."""

    name: str
    kind: type
    optional: bool = False

    def __post_init__(self) -> None:
        if self.kind not in (int, float, str, bool):
            raise TypeError(f"column {self.name}: type {self.kind!r} is not int, float, str, bool")
        if self.kind is str and self.optional:
            raise TypeError(f"column {self.name}: a str column is never empty, '' is its none")

    @property
    def dtype(self) -> str:
        """The column's pandas dtype (see the module's table)."""
        if self.kind is int:
            return "Int64" if self.optional else "int64"
        return _DTYPES[self.kind]

    def encode(self, value: Any) -> str:
        """The CSV text of `value`; ValueError when it is not of the column's type."""
        if value is None or (isinstance(value, float) and not math.isfinite(value)):
            if self.optional:
                return ""
            raise ValueError(f"{self.name} may not be empty (got {value!r})")
        kind = self.kind
        if kind is bool and isinstance(value, bool):
            return "true" if value else "false"
        if isinstance(value, bool) or kind is bool:
            raise ValueError(f"{self.name} is {kind.__name__}, got {value!r}")
        if kind is int and isinstance(value, int):
            return str(value)
        if kind is float and isinstance(value, int | float):
            # Rounded to what a measurement can mean; large values in full.
            return f"{value:.6g}" if abs(value) < 1e6 else f"{value:.0f}"
        if kind is str and isinstance(value, str):
            return value
        raise ValueError(f"{self.name} is {kind.__name__}, got {value!r}")

    def decode(self, text: str) -> Any:
        """The value of one CSV cell; ValueError saying why it is not one."""
        if self.kind is str:
            return text
        if not text:
            if self.optional:
                return None
            raise ValueError("empty, and the column may not be")
        if self.kind is bool:
            if text not in ("true", "false"):
                raise ValueError(f"{text!r} is not true or false")
            return text == "true"
        if self.kind is int:
            return int(text)
        value = float(text)
        if not math.isfinite(value):
            raise ValueError(f"{text!r} is not a finite number")
        return value


@dataclass(frozen=True)
class Table:
    """One CSV file of a results directory: its name and its columns in order."""

    file: str
    columns: tuple[Column, ...]

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(c.name for c in self.columns)

    @property
    def dtypes(self) -> dict[str, str]:
        """Column name -> pandas dtype, for `DataFrame.astype`."""
        return {c.name: c.dtype for c in self.columns}

    def encode(self, row: Mapping[str, Any]) -> list[str]:
        """The CSV cells of `row`, which must have exactly this table's columns."""
        missing = [n for n in self.names if n not in row]
        extra = [k for k in row if k not in self.names]
        if missing or extra:
            raise ValueError(
                f"{self.file} row: missing {', '.join(missing) or 'none'}; "
                f"not a column: {', '.join(extra) or 'none'}"
            )
        try:
            return [c.encode(row[c.name]) for c in self.columns]
        except ValueError as exc:
            raise ValueError(f"{self.file} row: {exc}") from exc

    def decode(self, cells: list[str], where: str) -> dict[str, Any]:
        """One parsed row; ResultsError naming `where` (file and line) and the column."""
        if len(cells) != len(self.columns):
            raise ResultsError(f"{where}: {len(cells)} cells, the header has {len(self.columns)}")
        row = {}
        for column, text in zip(self.columns, cells, strict=True):
            try:
                row[column.name] = column.decode(text)
            except ValueError as exc:
                raise ResultsError(f"{where}: {column.name}: {exc}") from exc
        return row


#: The DPU model in force for a row's stack (a what-if sweep varies its numbers).
DPU_MODEL = (
    Column("placement", str),
    Column("dpu_profile", str),
    Column("dpu_cores", int),
    Column("dpu_speed", float),
    Column("dma_latency_us", float),
    Column("dma_gbps", float),
)

#: One row per stack x repetition x load level. `stack` is the compared stack's label: the
#: mesh, or ``dpumesh@dpu_speed=0.5`` for a what-if variant. `users` and `offered_rps` (empty
#: in closed loop) say the load; `mtls` whether the stack's proxy-to-proxy hops ran mutual TLS
#: (only an Envoy stack's can); `nodes` how many nodes the services were spread over (0: this
#: machine, no namespaces; DESIGN §8) and `cross_node_per_req` the requests the stack carried
#: from one node to another per entry request; `checks` names the failed self-checks,
#: ``;``-separated.
RESULTS = Table(
    RESULTS_CSV,
    (
        Column("mesh", str),
        Column("stack", str),
        Column("mode", str),
        Column("workmodel", str),
        Column("rep", int),
        Column("level", str),
        Column("users", int),
        Column("offered_rps", float, optional=True),
        Column("achieved_rps", float, optional=True),
        Column("requests", int),
        Column("failures", int),
        Column("duration_s", float, optional=True),
        Column("mean_us", float, optional=True),
        Column("p50_us", float, optional=True),
        Column("p90_us", float, optional=True),
        Column("p99_us", float, optional=True),
        Column("p999_us", float, optional=True),
        Column("max_us", float, optional=True),
        Column("cpu_host_ms_per_req", float, optional=True),
        Column("cpu_offload_ms_per_req", float, optional=True),
        Column("cpu_loadgen_ms_per_req", float, optional=True),
        Column("cpu_total_ms_per_req", float, optional=True),
        Column("vcpu_host_per_1000rps", float, optional=True),
        Column("vcpu_offload_per_1000rps", float, optional=True),
        Column("vcpu_total_per_1000rps", float, optional=True),
        Column("cpu_window_s", float, optional=True),
        Column("cpu_window_requests", int, optional=True),
        Column("rss_host_mb", float, optional=True),
        Column("rss_offload_mb", float, optional=True),
        Column("downstream_calls_per_req", float, optional=True),
        Column("cross_node_per_req", float, optional=True),
        Column("nodes", int),
        Column("mtls", bool),
        *DPU_MODEL,
        Column("checks_ok", bool),
        Column("checks", str),
    ),
)

#: One row per stack x repetition x level x role that had processes: its CPU and memory.
ROLES = Table(
    ROLES_CSV,
    (
        Column("mesh", str),
        Column("stack", str),
        Column("rep", int),
        Column("level", str),
        Column("role", str),
        Column("side", str),
        Column("cpu_s", float),
        Column("cpu_ms_per_req", float, optional=True),
        Column("vcpu_per_1000rps", float, optional=True),
        Column("rss_mean_mb", float),
        Column("rss_max_mb", float),
        Column("pss_mean_mb", float, optional=True),
        Column("processes", int),
        Column("window_s", float),
        Column("notes", str),
    ),
)

#: `run_bench.py faults`: one row per stack x fault (`harness.run.faults` says what each means).
FAULTS = Table(
    FAULTS_CSV,
    (
        Column("mesh", str),
        Column("stack", str),
        Column("mode", str),
        Column("workmodel", str),
        Column("fault", str),
        Column("kind", str),
        Column("target", str),
        Column("service", str),
        Column("pid", int),
        Column("injected_at_s", float),
        Column("pause_s", float, optional=True),
        Column("offered_rps", float),
        Column("run_s", int),
        Column("requests", int),
        Column("failed", int),
        Column("failed_by_status", str),
        Column("failed_after_fault", int),
        Column("worst_ms", float, optional=True),
        Column("recovery_s", float, optional=True),
        Column("recovered", bool),
        Column("blast_radius", str),
        Column("restarts", str),
        Column("loadgen_ok", bool),
    ),
)

TABLES = (RESULTS, ROLES, FAULTS)


def append_rows(run_dir: Path, table: Table, rows: Iterable[Mapping[str, Any]]) -> None:
    """Append `rows` to `table`'s file in `run_dir`, the header first when the file is new.

    Every row is encoded before the file is touched: a bad row writes nothing.
    """
    lines = [table.encode(row) for row in rows]
    path = run_dir / table.file
    new = not path.exists()
    with path.open("a", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        if new:
            writer.writerow(table.names)
        writer.writerows(lines)


def read_table(run_dir: Path, table: Table) -> list[dict[str, Any]]:
    """Every row of `table`'s file in `run_dir`, parsed; ResultsError when it does not match."""
    path = run_dir / table.file
    try:
        with path.open(newline="", encoding="utf-8") as fh:
            reader = csv.reader(fh)
            header = tuple(next(reader, ()))
            if header != table.names:
                missing = [n for n in table.names if n not in header]
                extra = [n for n in header if n not in table.names]
                raise ResultsError(
                    f"{path}: not the columns of schema version {SCHEMA_VERSION} "
                    f"(missing: {', '.join(missing) or 'none'}; "
                    f"unknown: {', '.join(extra) or 'none'}; or out of order)"
                )
            return [table.decode(cells, f"{path}:{reader.line_num}") for cells in reader]
    except OSError as exc:
        raise ResultsError(f"{path}: unreadable: {exc.strerror or exc}") from exc
    except (UnicodeDecodeError, csv.Error) as exc:
        raise ResultsError(f"{path}: not CSV text: {exc}") from exc


def read_meta(run_dir: Path) -> dict[str, Any]:
    """meta.json of `run_dir`; ResultsError unless it is there and of `SCHEMA_VERSION`."""
    path = run_dir / META_JSON
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ResultsError(
            f"{path}: unreadable ({exc.strerror or exc}): not a results directory?"
        ) from exc
    except ValueError as exc:
        raise ResultsError(f"{path}: not JSON: {exc}") from exc
    if not isinstance(meta, dict):
        raise ResultsError(f"{path}: not a JSON object")
    version = meta.get(VERSION_KEY, 1)
    if version != SCHEMA_VERSION:
        raise ResultsError(
            f"{run_dir}: results of schema version {version}; this code reads version "
            f"{SCHEMA_VERSION} (its meta.json names the git commit that wrote it)"
        )
    return meta
