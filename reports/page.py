"""HTML building blocks: number formatting, tables, embedded figures, the page shell.

Every function returns HTML; any text that comes from result files goes
through `html.escape` here or at its source. The page loads nothing: plotly.js
is inlined once in the head and a Content-Security-Policy forbids every fetch,
so a report opened offline looks exactly as it does online.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from html import escape

import plotly.graph_objects as go
import plotly.io as pio
import plotly.offline

from reports.stats import Estimate

#: No network at all: scripts and styles only inline, images only data:/blob:.
CSP = (
    "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; "
    "img-src data: blob:; font-src data:"
)

STYLE = """
body { font-family: system-ui, -apple-system, 'Segoe UI', Roboto, 'DejaVu Sans', sans-serif;
       margin: 0 auto; max-width: 1320px; padding: 16px 24px; color: #1b1b1b; }
h1 { font-size: 1.6em; } h2 { border-bottom: 2px solid #ddd; padding-bottom: 4px; margin-top: 2em; }
table { border-collapse: collapse; margin: 8px 0 16px; font-size: 0.92em; }
th, td { border: 1px solid #ccc; padding: 4px 8px; text-align: left; vertical-align: top; }
th { background: #f3f3f3; }
td.num { text-align: right; white-space: nowrap; font-variant-numeric: tabular-nums; }
.ci { color: #555; font-size: 0.88em; }
.ratio { color: #333; font-size: 0.88em; }
.swatch { display: inline-block; width: 0.9em; height: 0.9em; border-radius: 2px;
          margin-right: 6px; vertical-align: -1px; }
tr.fail td, .banner.fail { background: #fde2e1; }
tr.fail td:first-child { color: #a00; font-weight: bold; }
.banner { border: 1px solid #ccc; border-radius: 4px; padding: 8px 12px; margin: 8px 0; }
.banner.ok { background: #e6f4ea; } .banner.warn { background: #fff4ce; }
figure.chart { margin: 16px 0 28px; } figcaption { color: #444; font-size: 0.9em; margin-top: 4px; }
code, pre { font-family: ui-monospace, 'DejaVu Sans Mono', monospace; font-size: 0.9em; }
pre { background: #f7f7f7; padding: 8px; overflow-x: auto; }
.note { color: #444; font-size: 0.92em; }
"""


def number(value: float | None, unit: str = "") -> str:
    """A value to 3-4 significant digits with thousands separators; "n/a" for None."""
    if value is None:
        return "n/a"
    magnitude = abs(value)
    if magnitude >= 100:
        text = f"{value:,.0f}"
    elif magnitude >= 10:
        text = f"{value:,.1f}"
    else:
        text = f"{value:.3g}"
    return f"{text} {unit}".rstrip()


def bounded(e: Estimate, unit: str = "", zero_is_na: bool = False) -> str:
    """The value as plain text, "≥ 1,000 req/s" for a bound, "n/a" when there is none."""
    if e.value is None or (zero_is_na and e.value == 0):
        return "n/a"
    return f"{e.bound} {number(e.value, unit)}".lstrip()


def estimate(e: Estimate, unit: str = "", zero_is_na: bool = False) -> str:
    """Value with its 95 % CI in brackets (or why there is none) as HTML."""

    def show(v: float | None) -> str:
        return "n/a" if v is None or (zero_is_na and v == 0) else number(v)

    text = bounded(e, unit, zero_is_na)
    if text == "n/a":
        return text
    if e.bound:
        ci = f"{_bound_word(e.bound)} bound, n={e.n}"
    else:
        ci = f"[{show(e.low)}–{show(e.high)}]" if e.has_ci else f"no CI, n={e.n}"
    return f"{escape(text)} <span class='ci'>{escape(ci)}</span>"


def factor(e: Estimate) -> str:
    """A ratio as plain text: "×1.42 [1.30–1.55]", "×≥1.42 (lower bound)", "—" if undefined."""
    if e.value is None:
        return "—"
    if e.bound:
        return f"×{e.bound}{e.value:.2f} ({_bound_word(e.bound)} bound)"
    ci = f" [{e.low:.2f}–{e.high:.2f}]" if e.has_ci else f" (no CI, n={e.n})"
    return f"×{e.value:.2f}{ci}"


def _bound_word(bound: str) -> str:
    return "lower" if bound == "≥" else "upper"


def ratio(e: Estimate, against: str) -> str:
    """ "×0.62 vs envoy [0.60–0.65]" (or "×≥1.50 vs envoy") as HTML, "—" when undefined."""
    if e.value is None:
        return f"<div class='ratio'>× — vs {escape(against)}</div>"
    ci = f" <span class='ci'>[{e.low:.2f}–{e.high:.2f}]</span>" if e.has_ci else ""
    return f"<div class='ratio'>×{e.bound}{e.value:.2f} vs {escape(against)}{ci}</div>"


def swatch(colour: str) -> str:
    return f"<span class='swatch' style='background:{escape(colour)}'></span>"


def table(
    head: Sequence[str],
    rows: Iterable[Sequence[str]],
    row_classes: Sequence[str] | None = None,
    numeric_from: int = 99,
) -> str:
    """A table; `head` is plain text, cells are HTML. Columns >= `numeric_from` align right."""
    out = ["<table><thead><tr>", *(f"<th>{escape(h)}</th>" for h in head), "</tr></thead><tbody>"]
    for i, row in enumerate(rows):
        cls = row_classes[i] if row_classes else ""
        out.append(f"<tr class='{cls}'>" if cls else "<tr>")
        out.extend(
            f"<td class='num'>{c}</td>" if j >= numeric_from else f"<td>{c}</td>"
            for j, c in enumerate(row)
        )
        out.append("</tr>")
    out.append("</tbody></table>")
    return "".join(out)


class Figures:
    """Embeds figures with stable, page-unique ids (reports are reproducible byte for byte)."""

    def __init__(self) -> None:
        self.count = 0

    def embed(self, fig: go.Figure, caption: str) -> str:
        """The figure's div and script (no plotly.js: the page has it once) plus a caption."""
        self.count += 1
        div = pio.to_html(
            fig,
            full_html=False,
            include_plotlyjs=False,
            div_id=f"chart-{self.count}",
            config={"displaylogo": False, "responsive": True},
        )
        return f"<figure class='chart'>{div}<figcaption>{caption}</figcaption></figure>"


def document(title: str, body: str) -> str:
    """The whole self-contained page: CSP, styles and plotly.js inline, then `body`."""
    return (
        "<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'>"
        f"<meta http-equiv='Content-Security-Policy' content=\"{CSP}\">"
        "<meta name='viewport' content='width=device-width, initial-scale=1'>"
        f"<title>{escape(title)}</title><style>{STYLE}</style>"
        f"<script>{plotly.offline.get_plotlyjs()}</script></head>"
        f"<body>{body}</body></html>\n"
    )
