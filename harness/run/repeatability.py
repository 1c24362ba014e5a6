"""Repeatability benchmark: the default comparison twice, and how far the two runs agree.

    python -m harness.run.repeatability [--out DIR] [run options ...]

Runs `run_bench.py run` twice with the same options (bench.toml's defaults
unless given), then prints, per stack and level both runs measured, each
run's median over repetitions and its spread across repetitions
((max - min) / median), and the difference between the two medians; then
each stack's maximum clean throughput in both runs, and the host-CPU speed
probe of both runs (`harness.measure.speed`), whose own spread is the floor
for any spread measured on this machine. Aims: medians within 5 % between
runs, closed-loop throughput spread within 5 % across repetitions.

A benchmark, not a test: it prints numbers and asserts nothing. Or compare
two existing results directories: ``--compare DIR_A DIR_B``.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from harness.measure.speed import spread
from harness.names import REPO
from harness.output import schema

METRICS = (
    ("req/s", "achieved_rps"),
    ("p50 ms", "p50_us"),
    ("p99 ms", "p99_us"),
    ("host CPU ms/req", "cpu_host_ms_per_req"),
)
AIM = 0.05


def _read(run_dir: Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """meta.json (its schema version checked) and results.csv of `run_dir`, parsed."""
    return schema.read_meta(run_dir), schema.read_table(run_dir, schema.RESULTS)


def _values(rows: list[dict[str, Any]], stack: str, level: str, key: str) -> list[float]:
    return [
        r[key] for r in rows if r["stack"] == stack and r["level"] == level and r[key] is not None
    ]


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value:+.1%}" if value < 0 else f"{value:.1%}"


def _number(value: float, key: str) -> str:
    return f"{value / 1000:.2f}" if key.endswith("_us") else f"{value:.2f}"


def compare(a: Path, b: Path) -> str:
    """The report of two results directories, as text."""
    (meta_a, rows_a), (meta_b, rows_b) = _read(a), _read(b)
    keys = list(dict.fromkeys((r["stack"], r["level"]) for r in rows_a))
    shared = [k for k in keys if any((r["stack"], r["level"]) == k for r in rows_b)]
    lines = [f"A = {a}", f"B = {b}", ""]
    head = f"{'stack':<24} {'level':<12} {'metric':<16} {'A median':>9} {'A spread':>9}"
    lines.append(head + f" {'B median':>9} {'B spread':>9} {'B vs A':>8}")
    worst_diff = worst_closed_spread = 0.0
    for stack, level in shared:
        for label, key in METRICS:
            va, vb = _values(rows_a, stack, level, key), _values(rows_b, stack, level, key)
            if not va or not vb:
                continue
            ma, mb = statistics.median(va), statistics.median(vb)
            diff = (mb - ma) / ma if ma else None
            sa, sb = spread(va), spread(vb)
            # The aims are about the closed-loop level (open levels past a knee are chaos).
            closed = level.startswith("closed-")
            if diff is not None and closed:
                worst_diff = max(worst_diff, abs(diff))
            if key == "achieved_rps" and closed:
                worst_closed_spread = max(worst_closed_spread, sa or 0.0, sb or 0.0)
            lines.append(
                f"{stack:<24} {level:<12} {label:<16} {_number(ma, key):>9} {_pct(sa):>9} "
                f"{_number(mb, key):>9} {_pct(sb):>9} {_pct(diff):>8}"
            )
    for name, mine, other in (("A", rows_a, rows_b), ("B", rows_b, rows_a)):
        theirs = {(r["stack"], r["level"]) for r in other}
        only = sorted(
            {f"{r['stack']} {r['level']}" for r in mine} - {f"{s} {lv}" for s, lv in theirs}
        )
        if only:
            lines.append(
                f"levels only in {name} (the calibrated ladders differ): {', '.join(only)}"
            )
    lines += ["", "max clean throughput (median over reps; >= = clean at the top rate):"]
    for stack, best in meta_a.get("max_clean_throughput", {}).items():
        other = meta_b.get("max_clean_throughput", {}).get(stack, {})
        lines.append(f"  {stack:<24} A {_best(best):>10}   B {_best(other):>10}")
    lines += ["", "host CPU speed probe (Mloops/s before each stack start):"]
    for name, meta in (("A", meta_a), ("B", meta_b)):
        speeds = [s["host_mloops_per_s"] for s in meta.get("machine_speed", {}).get("segments", [])]
        if speeds:
            lines.append(
                f"  {name}: median {statistics.median(speeds):.1f}, min {min(speeds):.1f}, "
                f"max {max(speeds):.1f}, spread {_pct(spread(speeds))}"
            )
    lines += [
        "",
        f"largest difference between the runs' closed-loop medians: {worst_diff:.1%} "
        f"(aim {AIM:.0%})",
        f"largest closed-loop throughput spread across repetitions: {worst_closed_spread:.1%} "
        f"(aim {AIM:.0%})",
    ]
    return "\n".join(lines)


def _best(record: dict) -> str:
    rps = record.get("rps")
    if rps is None:
        return "none"
    return f"{'>= ' if record.get('at_top') else ''}{rps:g}"


def _run_once(out: Path, options: list[str]) -> Path:
    """One `run_bench.py run`; its results directory."""
    before = set(out.glob("2*")) if out.is_dir() else set()
    subprocess.run([sys.executable, "run_bench.py", "run", "--out", str(out), *options], cwd=REPO)
    new = sorted(set(out.glob("2*")) - before)
    if not new:
        raise SystemExit("error: the run wrote no results directory")
    return new[-1]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m harness.run.repeatability", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--out", type=Path, default=REPO / "results" / "repeatability")
    parser.add_argument("--compare", nargs=2, type=Path, metavar="DIR", help="two results dirs")
    args, options = parser.parse_known_args(argv)
    if args.compare:
        a, b = args.compare
    else:
        a = _run_once(args.out, options)
        b = _run_once(args.out, options)
    print(compare(a, b))
    return 0


if __name__ == "__main__":
    sys.exit(main())
