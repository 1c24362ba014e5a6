"""HTML comparison reports from benchmark results directories (DESIGN §5, §6).

Modules: `load` (a results directory as pandas DataFrames: `load_results`),
`stats` (medians, bootstrap intervals, clean throughput, the common rate),
`summary` (the report's numbers), `whatif` (a what-if sweep's sensitivity and
break-even), `charts` (plotly figures), `page` (HTML pieces), `render`
(`write_report`) and `terminal` (the headline as the table a run prints).
Command line: ``python -m reports DIR [DIR ...]``.

`load_results` and `write_report` are imported on first use, so importing the
package (e.g. `run_bench.py` for its ``report`` command) loads neither pandas nor plotly.
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = ["load_results", "write_report"]
_HOME = {"load_results": "reports.load", "write_report": "reports.render"}


def __getattr__(name: str) -> Any:
    if name not in _HOME:
        raise AttributeError(f"module 'reports' has no attribute {name!r}")
    return getattr(importlib.import_module(_HOME[name]), name)
