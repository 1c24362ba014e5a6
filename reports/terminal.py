"""The summary a run prints at its end: the report's headline, as a table for an 80-column terminal.

`print_summary(dir, console)` reads the results directory just written and
summarises it with `reports.summary.summarize`, the code report.html's
headline comes from, so the two always show the same numbers, formatted the
same (`reports.page`): per stack its maximum clean throughput and, at the
headline level, p50, p99, host and offload CPU per request, each stack followed
by its ratios to the baselines (`reports.summary.BASELINES`). The confidence intervals are
the report's alone.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from rich import box
from rich.console import Console
from rich.table import Table

from reports import page
from reports.load import load_run
from reports.stats import Estimate
from reports.summary import HEADLINE, P50, THROUGHPUT, RunSummary, summarize

#: Short column headers of the headline metrics (the unit goes below).
SHORT = {
    "max_clean_rps": "max clean",
    "p50_us": "p50",
    "p99_us": "p99",
    "cpu_host_ms_per_req": "host CPU",
    "cpu_offload_ms_per_req": "offload CPU",
}


@dataclass(frozen=True)
class Line:
    """One line of the table: a stack's headline estimates, or its ratios to a baseline."""

    stack: str
    values: dict[str, Estimate]  # headline metric key -> estimate (a ratio on a ratio line)
    baseline: str | None = None  # on a ratio line: the stack divided by

    def cell(self, key: str) -> str:
        """The text of one metric, as the report prints it (without the interval)."""
        e = self.values[key]
        if self.baseline is None:
            return page.bounded(e, zero_is_na=key == THROUGHPUT.key)
        return "—" if e.value is None else f"×{e.bound}{e.value:.2f}"


def lines(summary: RunSummary) -> list[Line]:
    """Every stack's line, each followed by one line per baseline it is compared with."""
    out = []
    for label, stack in summary.stacks.items():
        out.append(Line(label, {m.key: stack.values[m.key] for m in HEADLINE}))
        out += [Line(label, ratios, base) for base, ratios in stack.vs.items()]
    return out


def table(summary: RunSummary) -> Table:
    """The headline as a rich table, narrow enough for an 80-column terminal."""
    reps = max((s.values[P50.key].n for s in summary.stacks.values()), default=0)
    t = Table(
        title=f"{summary.run.label}: medians over {reps} repetition(s)",
        title_justify="left",
        box=box.SIMPLE_HEAD,
        padding=(0, 1),
        pad_edge=False,
        collapse_padding=True,
        show_edge=False,
    )
    t.add_column("stack")
    for m in HEADLINE:
        t.add_column(f"{SHORT[m.key]}\n{m.unit}", justify="right")
    for line in lines(summary):
        name = line.stack if line.baseline is None else f"  vs {line.baseline}"
        style = "dim" if line.baseline else None
        t.add_row(name, *(line.cell(m.key) for m in HEADLINE), style=style)
    return t


def print_summary(path: Path, console: Console) -> RunSummary:
    """Print the headline of results directory `path` (ResultsError when it has no row).

    Returns the summary printed, the same `summarize` gives the report.
    """
    summary = summarize(load_run(path))
    console.print(table(summary))
    console.print(
        f"Latency and CPU at level {summary.level}: {summary.headline.why}. "
        "≥: clean at the ladder's top rate (a lower bound); ×: ratio to that stack; "
        "intervals in report.html.",
        highlight=False,
    )
    for problem in summary.run.problems:
        console.print(f"[yellow]data problem:[/] {problem}", highlight=False)
    return summary
