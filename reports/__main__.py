"""``python -m reports DIR [DIR ...]``: write the HTML report of one or more results dirs."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from reports.load import ResultsError
from reports.render import write_report


def main(argv: Sequence[str] | None = None) -> int:
    """Parse arguments, write the report, print its path; exit status as an int."""
    parser = argparse.ArgumentParser(
        prog="python -m reports",
        description="Write report.html for a results directory; with several directories, "
        "a comparison across runs (e.g. before/after) written to the first one.",
    )
    parser.add_argument("dirs", nargs="+", type=Path, metavar="DIR", help="results directory")
    parser.add_argument(
        "--out", type=Path, metavar="PATH", help="report file (default: FIRST_DIR/report.html)"
    )
    parser.add_argument(
        "--level",
        metavar="NAME",
        help="load level of the headline, e.g. closed-16 (default: the closed-loop level "
        "every stack ran, else the lowest open-loop rate)",
    )
    args = parser.parse_args(argv)
    try:
        path = write_report(args.dirs, args.out, level=args.level)
    except ResultsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
