"""``normbench report --html FILE``: the report as one self-contained HTML page.

The tables are the terminal's own (report.tables' ``Table``, the one structure every text
format renders), the figures are PNGs inlined as data URIs, the styles are inline: the file
needs no network, runs no script (its Content-Security-Policy forbids any) and prints.
Every value is escaped with ``html.escape``: a setting holding ``<script>`` shows as text.
"""

from __future__ import annotations

import base64
import html
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import pandas as pd

from normbench.report.tables import DiagnosticsReport, Report, Table

MAX_LEFT_OUT = 500  # rows of the left-out table before "... and N more"

_STYLE = """
:root { color-scheme: light; --line: #d0d4da; --muted: #5b6470; --mark: #e6f4ea; }
* { box-sizing: border-box; }
body { margin: 0; font: 15px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif;
  color: #1b1f24; background: #fff; }
main { max-width: 72rem; margin: 0 auto; padding: 1rem; }
h1 { font-size: 1.5rem; margin: 0 0 .25rem; }
h2 { font-size: 1.2rem; margin: 2rem 0 .5rem; border-bottom: 1px solid var(--line); }
h3 { font-size: 1rem; margin: 1.25rem 0 .25rem; }
h1, h2, h3 { overflow-wrap: anywhere; }
.meta { color: var(--muted); margin: 0; overflow-wrap: anywhere; }
code { font: .9em ui-monospace, SFMono-Regular, Menlo, Consolas, monospace;
  background: #f3f4f6; padding: 0 .2em; border-radius: 3px; }
.table-wrap { overflow-x: auto; margin: 0 0 .25rem; }
table { border-collapse: collapse; font-variant-numeric: tabular-nums; }
th, td { border: 1px solid var(--line); padding: .3rem .5rem; text-align: right;
  white-space: nowrap; vertical-align: top; }
thead th { background: #f3f4f6; white-space: normal; min-width: 6rem; }
tbody th, thead th:first-child { text-align: left; white-space: normal; min-width: 5rem; }
tbody th { position: sticky; left: 0; background: #fff; }  /* the norm stays in view */
td.marked { background: var(--mark); font-weight: 600; }
.caption { color: var(--muted); font-size: .85rem; margin: .25rem 0 1rem; max-width: 50rem; }
ul.notes li { overflow-wrap: anywhere; }
figure { margin: 1rem 0; }
figure img { display: block; max-width: 100%; height: auto; border: 1px solid var(--line); }
figcaption { color: var(--muted); font-size: .85rem; }
@media (max-width: 600px) {
  body { font-size: 14px; }
  main { padding: .5rem; }
  th, td { padding: .2rem .35rem; }
}
@media print {
  body { font-size: 10pt; }
  main { max-width: none; padding: 0; }
  .table-wrap { overflow: visible; }
  tbody th { position: static; }
  th, td { white-space: normal; }
  div.table, figure { break-inside: avoid; }
  h2, h3 { break-after: avoid; }
  td.marked { -webkit-print-color-adjust: exact; print-color-adjust: exact; }
}
"""

# No script, no network: only inline styles and data: images may load.
_POLICY = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"


@dataclass
class Meta:
    """Where the page came from: shown in its header."""

    command: str
    version: str
    made: str  # when, as text
    source: str  # the results folder read
    runs: int  # how many runs were read


def _text(value: object) -> str:
    """Any value as HTML text (``&``, ``<``, ``>`` and both quotes escaped)."""
    return html.escape(str(value), quote=True)


def _element(tag: str, content: str, **attributes: str) -> str:
    """``<tag attr="...">content</tag>``; ``content`` is HTML already, attributes are escaped."""
    attrs = "".join(f' {name.rstrip("_")}="{_text(value)}"' for name, value in attributes.items())
    return f"<{tag}{attrs}>{content}</{tag}>"


def table_html(table: Table) -> str:
    """One report table: its title as the caption, marked cells highlighted, then its notes."""
    head = "".join(_element("th", _text(column), scope="col") for column in table.columns)
    body = []
    for i, row in enumerate(table.rows):
        cells = [_element("th", _text(row[0]), scope="row")] if row else []
        for j, text in enumerate(row[1:], 1):
            if (i, j) in table.marked:
                cells.append(_element("td", _text(f"{table.marker} {text}"), class_="marked"))
            else:
                cells.append(_element("td", _text(text)))
        body.append(_element("tr", "".join(cells)))
    grid = _element("thead", _element("tr", head)) + _element("tbody", "".join(body))
    caption = _element("p", _text(table.caption), class_="caption") if table.caption else ""
    wrapped = _element("div", _element("table", grid), class_="table-wrap")
    return _element("div", _element("h3", _text(table.title)) + wrapped + caption, class_="table")


def _left_out_html(left_out: pd.DataFrame) -> str:
    """The runs kept out of the statistics (running, failed), by id: at most MAX_LEFT_OUT."""
    if left_out.empty:
        return ""
    shown = left_out.head(MAX_LEFT_OUT)
    more = len(left_out) - len(shown)
    table = Table(
        f"{len(left_out)} run{'s' * (len(left_out) > 1)} left out of the statistics",
        ["run_id", "status", "epochs written"],
        [
            [str(row.run_id), str(row.status), "–" if pd.isna(row.epoch) else f"{row.epoch:g}"]
            for row in shown.itertuples()
        ],
        "Failed runs are counted in the tables (never averaged); unfinished or running runs "
        "are not in any table."
        + (f" ... and {more} more." if more else ""),
    )
    return _element("section", _element("h2", "Left out") + table_html(table), id="left-out")


def _sections(summary: Report | DiagnosticsReport) -> list[tuple[str, list[Table]]]:
    """(heading, tables) per block of the report: the same tables the terminal prints."""
    if isinstance(summary, Report):
        return [(block.title, block.tables()) for block in summary.blocks]
    return [("", summary.tables())]


def figure_html(name: str, png: bytes, alt: str) -> str:
    """A PNG inlined as a data URI."""
    uri = "data:image/png;base64," + base64.b64encode(png).decode("ascii")
    return _element("figure", f'<img src="{uri}" alt="{_text(alt)}">' + _element(
        "figcaption", _text(name)
    ))  # fmt: skip


def page(
    summary: Report | DiagnosticsReport,
    figures: Mapping[str, bytes],
    meta: Meta,
    alts: Mapping[str, str] | None = None,
) -> str:
    """The whole HTML document: header, each block's tables, notes, left-out runs, figures."""
    alts = alts or {}
    diagnostics = isinstance(summary, DiagnosticsReport)
    title = "normbench diagnostics" if diagnostics else "normbench report"
    header = _element("h1", _text(title)) + _element(
        "p",
        f"{meta.runs} runs read from {_element('code', _text(meta.source))}, {_text(meta.made)}. "
        f"Made by {_element('code', _text(meta.command))} with normbench {_text(meta.version)}.",
        class_="meta",
    )
    parts = [_element("header", header)]
    for heading, tables in _sections(summary):
        inner = (_element("h2", _text(heading)) if heading else "") + "".join(
            table_html(table) for table in tables
        )
        parts.append(_element("section", inner, class_="block"))
    if summary.notes:
        parts.append(_element("section", _element("h2", "Notes") + _list(summary.notes)))
    if isinstance(summary, Report):
        parts.append(_left_out_html(summary.left_out))
    if figures:
        shown = "".join(
            figure_html(name, png, alts.get(name, name)) for name, png in figures.items()
        )
        parts.append(_element("section", _element("h2", "Figures") + shown, id="figures"))
    head = (
        '<meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f'<meta http-equiv="Content-Security-Policy" content="{_text(_POLICY)}">'
        f'<meta name="generator" content="normbench {_text(meta.version)}">'
        + _element("title", _text(title))
        + _element("style", _STYLE)
    )
    return (
        "<!DOCTYPE html>\n"
        + _element("html", _element("head", head) + _element("body", _element("main", "".join(
            parts
        ))), lang="en")  # fmt: skip
        + "\n"
    )


def _list(items: Iterable[str]) -> str:
    return _element("ul", "".join(_element("li", _text(item)) for item in items), class_="notes")

