"""``python -m reports DIR [DIR ...]``: write the HTML report of one or more results dirs.

`run_bench.py report` is the same command: it borrows `add_arguments` and `run`.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

DESCRIPTION = (
    "Write report.html for a results directory; with several directories, a comparison "
    "across runs (e.g. before/after) written to the first one."
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The command's arguments, on `parser`."""
    parser.add_argument("dirs", nargs="+", type=Path, metavar="DIR", help="results directory")
    parser.add_argument(
        "--out", type=Path, metavar="PATH", help="report file (default: FIRST_DIR/report.html)"
    )
    parser.add_argument(
        "--level",
        metavar="NAME",
        help="load level of the headline's latency and CPU, e.g. closed-16 (default: the "
        "common rate, the highest ladder rate every stack ran clean; without one, the "
        "closed-loop level every stack ran)",
    )


def run(args: argparse.Namespace) -> int:
    """Write the report, print its path; exit status as an int."""
    from reports.load import ResultsError  # plotly is imported only when a report is made
    from reports.render import write_report

    missing = [str(d) for d in args.dirs if not d.is_dir()]
    if missing:
        print(f"error: not a results directory: {', '.join(missing)}", file=sys.stderr)
        return 1
    try:
        path = write_report(args.dirs, args.out, level=args.level)
    except ResultsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(path)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `python -m reports`."""
    parser = argparse.ArgumentParser(prog="python -m reports", description=DESCRIPTION)
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
