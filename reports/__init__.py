"""HTML comparison reports from benchmark results directories (DESIGN §5, §6).

Modules: `load` (read a results directory), `stats` (medians, bootstrap
intervals, clean throughput, the common rate), `summary` (the report's
numbers), `whatif` (a what-if sweep's sensitivity and break-even), `charts`
(plotly figures), `page` (HTML pieces) and `render` (`write_report`).
Command line: ``python -m reports DIR [DIR ...]``.
"""

from reports.render import write_report

__all__ = ["write_report"]
