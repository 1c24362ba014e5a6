"""The summary printed at the end of a run: medians over repetitions, and dpumesh/envoy ratios.

One line per stack and load level (median over repetitions of each column,
so one bad repetition does not move it), the self-check verdict of its
rows, then the ratios dpumesh/envoy at the closed-loop level for p50, p99,
host CPU per request and throughput. The HTML report (`reports/`) has the
full picture with confidence intervals; this is the at-a-glance version.
"""

from __future__ import annotations

import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from rich import box
from rich.table import Table

Row = Mapping[str, Any]
RATIO_KEYS = (
    ("p50", "p50_us"),
    ("p99", "p99_us"),
    ("host CPU/req", "cpu_host_ms_per_req"),
    ("throughput", "achieved_rps"),
)


@dataclass(frozen=True)
class Line:
    """Medians of one stack at one level."""

    stack: str  # the stack's label (the mesh, or a what-if variant)
    level: str
    reps: int
    values: dict[str, float | None]
    failed: tuple[str, ...]  # failed check names over its rows


def median_of(rows: Sequence[Row], key: str) -> float | None:
    values = [float(r[key]) for r in rows if r.get(key) is not None]
    return statistics.median(values) if values else None


def lines(rows: Sequence[Row]) -> list[Line]:
    """One `Line` per (stack, level) in first-seen order."""
    keys: dict[tuple[str, str], list[Row]] = {}
    for r in rows:
        keys.setdefault((r["stack"], r["level"]), []).append(r)
    out = []
    for (stack, level), group in keys.items():
        failed = sorted({c for r in group for c in str(r.get("checks") or "").split(";") if c})
        out.append(
            Line(
                stack=stack,
                level=level,
                reps=len(group),
                values={
                    k: median_of(group, k)
                    for k in (
                        "achieved_rps",
                        "p50_us",
                        "p99_us",
                        "cpu_host_ms_per_req",
                        "cpu_offload_ms_per_req",
                        "cpu_loadgen_ms_per_req",
                    )
                },
                failed=tuple(failed),
            )
        )
    return out


def closed_level(rows: Sequence[Row]) -> str | None:
    """The closed-loop level every stack ran (the headline level), if any."""
    meshes = {r["stack"] for r in rows}
    for r in rows:
        if r.get("offered_rps") is None and all(
            any(o["stack"] == m and o["level"] == r["level"] for o in rows) for m in meshes
        ):
            return r["level"]
    return None


def ratios(rows: Sequence[Row], a: str = "dpumesh", b: str = "envoy") -> dict[str, float | None]:
    """a/b of the medians at the closed-loop level; empty without both stacks or that level."""
    level = closed_level(rows)
    if level is None:
        return {}
    at = {m: [r for r in rows if r["stack"] == m and r["level"] == level] for m in (a, b)}
    if not at[a] or not at[b]:
        return {}
    out: dict[str, float | None] = {}
    for label, key in RATIO_KEYS:
        x, y = median_of(at[a], key), median_of(at[b], key)
        out[label] = x / y if x is not None and y else None
    return out


def _ms(us: float | None) -> str:
    return "–" if us is None else f"{us / 1000:.2f}"


def _num(value: float | None, fmt: str) -> str:
    return "–" if value is None else format(value, fmt)


def table(rows: Sequence[Row], title: str) -> Table:
    """The per stack x level table, narrow enough for an 80-column terminal."""
    found = lines(rows)
    reps = max((ln.reps for ln in found), default=0)
    t = Table(
        title=f"{title}\nmedians over {reps} repetition(s); CPU columns in CPU-ms per request",
        title_justify="left",
        box=box.SIMPLE_HEAD,
        padding=(0, 1),
        pad_edge=False,
        collapse_padding=True,
        show_edge=False,
    )
    for col in ("stack", "level", "req/s", "p50 ms", "p99 ms", "host", "offload", "loadgen"):
        t.add_column(col, justify="left" if col in ("stack", "level") else "right")
    t.add_column("checks")
    for line in found:
        v = line.values
        t.add_row(
            line.stack,
            line.level + ("" if line.reps == reps else f" (n={line.reps})"),
            _num(v["achieved_rps"], ".1f"),
            _ms(v["p50_us"]),
            _ms(v["p99_us"]),
            _num(v["cpu_host_ms_per_req"], ".3f"),
            _num(v["cpu_offload_ms_per_req"], ".3f"),
            _num(v["cpu_loadgen_ms_per_req"], ".3f"),
            "ok" if not line.failed else "FAIL: " + ", ".join(line.failed),
            style=None if not line.failed else "red",
        )
    return t


def ratio_text(rows: Sequence[Row]) -> str | None:
    """'dpumesh/envoy at closed-8: p50 0.52x, ...' or None."""
    r = ratios(rows)
    if not r:
        return None
    parts = ", ".join(f"{k} {_num(v, '.2f')}x" for k, v in r.items())
    return f"dpumesh/envoy at {closed_level(rows)} (medians): {parts}"
