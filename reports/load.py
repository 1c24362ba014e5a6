"""Read one results directory (DESIGN §6) as pandas DataFrames.

`load_results(dir)` is for anyone, the report or a notebook: meta.json and the
directory's CSVs as DataFrames with the columns and dtypes of
`harness.output.schema`, the module that wrote them (ints ``int64``, or
``Int64`` where a cell may be empty; floats ``float64``, NaN = empty; strings
``string``; bools ``boolean``). A directory of another schema version, or a CSV
that does not match its declaration, is a `ResultsError` naming what is wrong.

`load_run(dir)` is the report's view of the same directory: a `Run`, which
answers the report's questions (stacks, levels, a stack's repetitions at a
level, merged histograms). Rows are keyed by their *stack* label: the mesh in
an ordinary run, ``dpumesh@dpu_speed=0.5`` for a what-if variant. Only
results.csv (with a row) is indispensable: a missing roles.csv or histogram is
recorded in `Run.problems`, which the report shows at the top instead of
failing or hiding it.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import pandas as pd
from hdrh.histogram import HdrHistogram

from harness.names import MESHES
from harness.output import schema
from harness.output.results import HIST_DIR
from harness.output.schema import FAULTS, RESULTS, ROLES, ResultsError, Table
from loadtests import latency

__all__ = ["Results", "ResultsError", "Run", "load_results", "load_run"]


@dataclass
class Results:
    """One results directory: meta.json and its CSVs as DataFrames (`load_results`).

    `results` and `roles` have every column of `schema.RESULTS` and `schema.ROLES`
    (no rows when the file is absent); `faults` is faults.csv's (`schema.FAULTS`),
    None in a directory without one.
    """

    path: Path
    meta: dict[str, Any]
    results: pd.DataFrame
    roles: pd.DataFrame
    faults: pd.DataFrame | None = None


def frame(table: Table, rows: list[dict[str, Any]]) -> pd.DataFrame:
    """Parsed rows of `table` as a DataFrame with its columns, in order, and their dtypes."""
    return pd.DataFrame.from_records(rows, columns=list(table.names)).astype(table.dtypes)


def load_results(path: str | Path) -> Results:
    """The results directory `path` as DataFrames; ResultsError when it cannot be read.

    Refused: a meta.json missing or of another schema version (one line naming both
    versions), a CSV whose header or cells do not match `harness.output.schema`.
    """
    path = Path(path)
    meta = schema.read_meta(path)

    def read(table: Table) -> pd.DataFrame:
        present = (path / table.file).is_file()
        return frame(table, schema.read_table(path, table) if present else [])

    faults = read(FAULTS) if (path / FAULTS.file).is_file() else None
    return Results(path, meta, read(RESULTS), read(ROLES), faults)


@dataclass
class Run(Results):
    """A results directory as the report reads it, plus what was wrong with it."""

    label: str = ""
    problems: list[str] = field(default_factory=list)

    @property
    def config(self) -> dict[str, Any]:
        cfg = self.meta.get("config")
        return cfg if isinstance(cfg, dict) else {}

    def config_number(self, key: str) -> float | None:
        """A numeric setting of meta.json's config, None when absent or not a number."""
        value = self.config.get(key)
        if isinstance(value, bool) or not isinstance(value, int | float):
            return None
        return float(value) if math.isfinite(value) else None

    @property
    def slo_p99_ms(self) -> float | None:
        """The p99 latency objective of the run, None when meta.json does not give it."""
        return self.config_number("slo_p99_ms")

    @property
    def nodes(self) -> int:
        """How many nodes the services were spread over (0: this machine, no namespaces)."""
        values = self.results["nodes"]
        return int(values.max()) if len(values) else 0

    def stacks(self) -> list[str]:
        """The stack labels of the run in display order."""
        return stack_order(self.results["stack"])

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
        highest = self.results["offered_rps"].max()
        return None if pd.isna(highest) else float(highest)

    def ladder_levels(self) -> dict[float, str]:
        """Offered rate -> level name of the common ladder's levels (``open-<R>``)."""
        df = self.results
        rows = df[df["offered_rps"].notna() & df["level"].str.startswith("open-")]
        return dict(zip(rows["offered_rps"].tolist(), rows["level"].tolist(), strict=True))

    def recorded_at_top(self, stack: str) -> bool | None:
        """meta.json's ``max_clean_throughput[stack].at_top``; None when not recorded."""
        record = self.meta.get("max_clean_throughput")
        entry = record.get(stack) if isinstance(record, dict) else None
        value = entry.get("at_top") if isinstance(entry, dict) else None
        return value if isinstance(value, bool) else None

    def levels(self) -> list[str]:
        """Level names, closed loop by users then open loop by offered rate."""
        first = self.results.drop_duplicates("level")
        open_loop = first["offered_rps"].notna()
        load = first["offered_rps"].where(open_loop, first["users"].astype("float64"))
        ordered = first.assign(open_loop=open_loop, load=load)
        return ordered.sort_values(["open_loop", "load", "level"])["level"].tolist()

    def at(self, stack: str, level: str) -> pd.DataFrame:
        """The results rows of `stack` at `level`, one per repetition, by repetition."""
        df = self.results
        rows = df[(df["stack"] == stack) & (df["level"] == level)]
        return rows.sort_values("rep", kind="stable")

    def is_open_loop(self, level: str) -> bool:
        df = self.results
        return bool(df.loc[df["level"] == level, "offered_rps"].notna().any())

    def hist_path(self, stack: str, rep: int, level: str) -> Path:
        return self.path / HIST_DIR / f"{stack}-rep{rep}-{level}.hdr"

    def merged_histogram(self, stack: str, level: str) -> HdrHistogram | None:
        """All repetitions' histograms of `stack` at `level`, merged exactly; None if none.

        Missing or unreadable files are added to `problems`.
        """
        files: list[Path] = []
        for rep in self.at(stack, level)["rep"].tolist():
            found = latency.histogram_files(self.hist_path(stack, rep, level))
            if not found:
                self.problem(f"histogram missing: {self.hist_path(stack, rep, level).name}")
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
    known = {m: i for i, m in enumerate(MESHES)}  # the one display order; others after

    def key(label: str) -> tuple[int, str, bool, tuple[tuple[float, str], ...]]:
        mesh, variant = split_stack(label)
        return (known.get(mesh, len(known)), mesh, bool(variant), _variant_key(variant))

    return sorted(set(stacks), key=key)


def load_run(path: Path, label: str | None = None) -> Run:
    """Results directory `path` for the report; ResultsError without a results.csv row."""
    path = Path(path)
    data = load_results(path)
    if data.results.empty:
        raise ResultsError(f"{path / RESULTS.file}: no rows")
    run = Run(
        **{f.name: getattr(data, f.name) for f in fields(data)},
        label=label or path.resolve().name,
    )
    if not (path / ROLES.file).is_file():
        run.problem(f"{ROLES.file} missing: no CPU and memory per role")
    return run
