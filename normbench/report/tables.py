"""Turn report summaries into text: rich tables, CSV, Markdown, LaTeX or JSON.

Rich tables fit the console: columns are never narrower than their longest word (a table too
wide for that is cut into several, each repeating the norm column), so numbers stay whole at
80 columns and when piped.
"""

from __future__ import annotations

import io
import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import pandas as pd
from rich.console import Console
from rich.table import Table as RichTable
from rich.text import Text

from normbench.report.stats import ALPHA, MIN_PAIRS, format_value, higher_is_better
from normbench.results import PERCENTILES

DASH = "–"


@dataclass
class Table:
    """A table as strings, ready for any text format."""

    title: str
    columns: list[str]
    rows: list[list[str]]
    caption: str = ""
    marked: set[tuple[int, int]] = field(default_factory=set)  # (row, column) cells to highlight
    marker: str = "★"  # shown before a marked cell in the terminal (bold elsewhere)


@dataclass
class Block:
    """The tables of one study: runs that agree on every setting but the rows and columns.

    ``settings`` names what tells this study apart from the others read (empty when alone).
    See normbench.report.stats for the columns of the frames.
    """

    settings: dict[str, object]
    metric: str
    by: str
    baseline: str | None
    cells: pd.DataFrame
    best_lr: pd.DataFrame | None  # None when a single lr was tried
    stability: pd.DataFrame | None
    paired: pd.DataFrame | None  # None without a baseline

    @property
    def title(self) -> str:
        return ", ".join(f"{k}={format_value(v)}" for k, v in self.settings.items())

    def tables(self) -> list[Table]:
        direction = "highest" if higher_is_better(self.metric) else "lowest"
        tables = [
            _matrix(
                self.cells,
                self.by,
                _cell,
                f"{self.metric} at the last epoch, by {self.by}",
                f"Mean ± std over seeds of the runs that finished (n); diverged and stalled runs "
                f"are counted, not averaged. Marked: the {direction} mean per row among cells "
                f"where no seed diverged or stalled.",
            )
        ]
        if self.best_lr is not None:
            tables += [
                _best_lr_table(self.best_lr),
                _stability_table(self.stability, self.baseline),
            ]
        if self.paired is not None and not self.paired.empty:
            tables.append(_paired_table(self.paired, self.by, self.metric, self.baseline))
        if self.title:
            for table in tables:
                table.title = f"{self.title}: {table.title}"
        return tables

    def frame(self) -> pd.DataFrame:
        return self.cells.assign(**self.settings, metric=self.metric)

    def records(self) -> dict:
        return {
            "settings": self.settings,
            "metric": self.metric,
            "higher_is_better": higher_is_better(self.metric),
            "by": self.by,
            "baseline": self.baseline,
            "cells": _records(self.cells),
            "best_lr": _records(self.best_lr),
            "stability": _records(self.stability),
            "paired": _records(self.paired),
            "correction": "holm",
        }


@dataclass
class Report:
    """``normbench report``: one block of tables per study, and notes on what was read."""

    blocks: list[Block]
    notes: list[str]
    left_out: pd.DataFrame  # run_id, status, epoch of the runs not in the statistics

    def tables(self) -> list[Table]:
        return [table for block in self.blocks for table in block.tables()]

    def frame(self) -> pd.DataFrame:
        return pd.concat([block.frame() for block in self.blocks], ignore_index=True)

    def records(self) -> dict:
        return {
            "blocks": [block.records() for block in self.blocks],
            "left_out": _records(self.left_out),
            "notes": self.notes,
        }


@dataclass
class DiagnosticsReport:
    """``normbench report --diagnostics``: one row per configuration and layer."""

    table: pd.DataFrame
    notes: list[str]

    def tables(self) -> list[Table]:
        columns = {"grad_norm": "mean grad norm", "input_std": "final input std"}
        columns |= {f"drift_{p}": f"drift {p.split('_')[1]}" for p in PERCENTILES}
        columns["eval_gap"] = "final eval gap"
        columns = {c: name for c, name in columns.items() if self.table[c].notna().any()}
        rows = [
            [row["config"], row["layer"], *(_number(row[c], 3) for c in columns)]
            for _, row in self.table.iterrows()
        ]
        caption = (
            "Averaged over the seeds that finished (diverged and stalled runs left out). Drift: "
            "the largest departure of the last hidden layer's pre-activation percentiles from "
            "their first record (Ioffe & Szegedy Fig. 1). Eval gap: validation metric with "
            "running statistics minus with batch statistics."
        )
        headers = ["norm", "layer", *columns.values()]
        return [Table("Diagnostics per layer", headers, rows, caption)]

    def frame(self) -> pd.DataFrame:
        return self.table

    def records(self) -> dict:
        return {"diagnostics": _records(self.table), "notes": self.notes}


# ----------------------------------------------------------------------------- cells


def _number(value: float, digits: int = 4) -> str:
    return DASH if pd.isna(value) else f"{value:.{digits}g}"


def _mean_std(mean: float, std: float, n: int) -> str:
    """``0.650 ± 0.026``: the mean to the precision of the std's two significant digits.

    A zero std is shown (``0.9931 ± 0.0000``): seeds that agree exactly are worth seeing.
    """
    if n < 2 or not math.isfinite(std):
        return f"{mean:.4g}"
    decimals = 4 if std == 0 else max(0, 1 - math.floor(math.log10(std)))
    return f"{mean:.{decimals}f} ± {std:.{decimals}f}"


def _cell(row: pd.Series) -> str:
    notes = [f"n={row['n']}"] if row["n"] else []
    notes += [f"{row[s]}/{row['runs']} {s}" for s in ("diverged", "stalled", "failed") if row[s]]
    if not row["n"]:
        return ", ".join(notes) or DASH  # e.g. test_acc without a test split
    return f"{_mean_std(row['mean'], row['std'], row['n'])} ({', '.join(notes)})"


def _difference(row: pd.Series) -> str:
    notes = [f"n={row['n']}"] + [f"dropped {row['dropped_why']}"] * bool(row["dropped"])
    if not row["n"]:
        return f"no pairs ({notes[-1]})"
    interval = f" [{row['ci_low']:+.3g}, {row['ci_high']:+.3g}]" if row["n"] > 1 else ""
    return f"{row['mean']:+.3g}{interval} ({', '.join(notes)})"


def _matrix(
    frame: pd.DataFrame,
    key: str,
    cell: Callable[[pd.Series], str],
    title: str,
    caption: str,
    marker: str = "★",
) -> Table:
    """Rows: configurations; columns: values of ``key`` (null last); ``frame['best']`` marks."""
    values = sorted(frame[key].dropna().unique()) + [None] * bool(frame[key].isna().any())
    configs = list(dict.fromkeys(frame["config"]))
    rows = [[config] + [DASH] * len(values) for config in configs]
    marked = set()
    for _, row in frame.iterrows():
        value = None if pd.isna(row[key]) else row[key]
        i, j = configs.index(row["config"]), values.index(value) + 1
        rows[i][j] = cell(row)
        if row["best"]:
            marked.add((i, j))
    columns = ["norm"] + [f"{key}={format_value(v)}" for v in values]
    return Table(title, columns, rows, caption, marked, marker)


def _paired_table(frame: pd.DataFrame, key: str, metric: str, baseline: str) -> Table:
    tested = int(frame["p"].notna().sum())
    caption = (
        f"Mean difference to the {baseline} run with the same {key}, seed and other settings "
        f"(averaged over {baseline} runs differing only in norm.* settings), [{1 - ALPHA:.0%} "
        f"confidence interval, t distribution] (n pairs; dropped: pairs where either side "
        f"diverged, stalled, failed or is missing, and why). Marked: significant at "
        f"{ALPHA:g} by a two-sided paired t-test with the Holm-Bonferroni correction over the "
        f"{tested} tested cells of this table; cells with n < {MIN_PAIRS} or all differences "
        f"equal are not tested."
    )
    return _matrix(
        frame.assign(best=frame["significant"]),
        key,
        _difference,
        f"{metric} minus {baseline}, paired by seed",
        caption,
        marker="*",
    )


def _best_lr_table(frame: pd.DataFrame) -> Table:
    rows = []
    for _, row in frame.iterrows():
        lr = DASH if pd.isna(row["lr"]) else format_value(row["lr"])
        val = _spread(row["val_mean"], row["val_std"], row["val_n"])
        test = _spread(row["test_mean"], row["test_std"], row["test_n"])
        rows.append([row["config"], lr, val, test])
    caption = (
        f"The lr with the best mean {' / '.join(frame['selected_on'].unique())} among lrs where "
        "no seed diverged or stalled (– when every lr had one), and the test metric at that lr "
        "(– without a test split)."
    )
    return Table(
        "Best learning rate per norm", ["norm", "best lr", "validation", "test"], rows, caption
    )


def _spread(mean: float, std: float, n: int) -> str:
    if not n or pd.isna(mean):
        return DASH
    return f"{_mean_std(mean, std, n)} (n={n})"


def _limit(lr: float, censored: bool, never: str) -> str:
    return never if pd.isna(lr) else f"{'≥ ' * bool(censored)}{format_value(lr)}"


def _ratio(row: pd.Series, prefix: str) -> str:
    ratio, censored = row[f"{prefix}ratio"], row[f"{prefix}censored"]
    if pd.isna(ratio) or row.get(f"baseline_{prefix}censored", False):
        return DASH
    return f"{'≥ ' * bool(censored)}{ratio:.3g}x"


def _stability_table(frame: pd.DataFrame, baseline: str | None) -> Table:
    rows = []
    for _, row in frame.iterrows():
        trains = _limit(row["max_trains_lr"], row["trains_censored"], "none trains")
        stable = _limit(row["max_stable_lr"], row["censored"], "diverged at every lr")
        ratios = [_ratio(row, "trains_"), _ratio(row, "")] if baseline else []
        rows.append([row["config"], trains, stable, str(row["lrs_tried"]), *ratios])
    caption = (
        "Largest lr that trains: no seed diverged or stalled there. Largest lr without "
        "divergence: no seed diverged. ≥: even the largest lr tried qualifies."
    )
    columns = ["norm", "largest lr that trains", "largest lr without divergence", "lrs tried"]
    if baseline:
        caption += f" Ratios: to {baseline} with the same other settings (– when its limit is ≥)."
        columns += [f"trains: ratio to {baseline}", f"no divergence: ratio to {baseline}"]
    return Table("Stability", columns, rows, caption)


def _records(frame: pd.DataFrame | None) -> list[dict]:
    """Rows as JSON-ready dicts: NaN and inf become null."""
    return [] if frame is None else json.loads(frame.to_json(orient="records"))


# ----------------------------------------------------------------------------- formats

_BORDER = 3  # a column's left padding, right padding and border in a rich table


def _rich(table: Table, width: int) -> list[RichTable | Text]:
    """``table`` as rich tables that fit ``width``, then its caption."""
    cells = [
        [f"{table.marker} {c}" if (i, j) in table.marked else c for j, c in enumerate(row)]
        for i, row in enumerate(table.rows)
    ]
    texts = list(zip(table.columns, *cells, strict=True))
    shortest = [max(len(word) for text in column for word in text.split()) for column in texts]
    longest = [max(len(text) for text in column) for column in texts]
    parts = _column_groups(shortest, width)
    out: list[RichTable | Text] = []
    for number, columns in enumerate(parts, 1):
        title = table.title + (f" ({number}/{len(parts)})" if len(parts) > 1 else "")
        widths = _widths([shortest[j] for j in columns], [longest[j] for j in columns], width)
        rich = RichTable(title=title)
        for j, fixed in zip(columns, widths, strict=True):
            rich.add_column(table.columns[j], justify="right" if j else "left", width=fixed)
        for i, row in enumerate(cells):
            rich.add_row(*(Text(row[j], "bold green" * ((i, j) in table.marked)) for j in columns))
        out.append(rich)
    return [*out, Text(table.caption, style="dim")]


def _column_groups(shortest: list[int], width: int) -> list[list[int]]:
    """Columns 1.. cut into groups that fit ``width`` beside column 0 at their narrowest."""
    groups: list[list[int]] = [[0]]
    for j in range(1, len(shortest)):
        used = 1 + sum(shortest[k] + _BORDER for k in groups[-1])
        if len(groups[-1]) > 1 and used + shortest[j] + _BORDER > width:
            groups.append([0])
        groups[-1].append(j)
    return groups


def _widths(shortest: list[int], longest: list[int], width: int) -> list[int | None]:
    """Column widths: natural when the table fits, else the narrowest plus a fair share."""
    room = width - 1 - _BORDER * len(longest)
    if sum(longest) <= room:
        return [None] * len(longest)
    spare, wanted = room - sum(shortest), [b - a for a, b in zip(shortest, longest, strict=True)]
    return [
        a + max(0, spare) * extra // sum(wanted) for a, extra in zip(shortest, wanted, strict=True)
    ]


def markdown(tables: list[Table], notes: list[str]) -> str:
    """GitHub-flavoured pipe tables, marked cells in bold, then the notes."""
    parts = []
    for table in tables:
        lines = [
            f"### {table.title}",
            "",
            _pipe_row(table.columns),
            _pipe_row(["---"] * len(table.columns)),
        ]
        for i, row in enumerate(table.rows):
            lines.append(
                _pipe_row([f"**{c}**" if (i, j) in table.marked else c for j, c in enumerate(row)])
            )
        parts.append("\n".join([*lines, "", table.caption, ""]))
    return "\n".join(parts + [f"{note}\n" for note in notes])


def _pipe_row(cells: list[str]) -> str:
    return "| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |"


_LATEX_ESCAPES = {
    "\\": r"\textbackslash{}",
    "&": r"\&",
    "%": r"\%",
    "$": r"\$",
    "#": r"\#",
    "_": r"\_",
    "{": r"\{",
    "}": r"\}",
    "~": r"\textasciitilde{}",
    "^": r"\textasciicircum{}",
    "±": r"$\pm$",
    "≥": r"$\geq$",
    "Δ": r"$\Delta$",
    "–": "--",
}


def _tex(text: str) -> str:
    return "".join(_LATEX_ESCAPES.get(char, char) for char in text)


def latex(tables: list[Table], notes: list[str]) -> str:
    """One ``table`` environment per table, marked cells in bold; notes as comments."""
    parts = []
    for table in tables:
        lines = [
            r"\begin{table}[ht]",
            r"\centering",
            rf"\caption{{{_tex(table.title)}. {_tex(table.caption)}}}",
            r"\begin{tabular}{l" + "r" * (len(table.columns) - 1) + "}",
            r"\hline",
            " & ".join(_tex(c) for c in table.columns) + r" \\",
            r"\hline",
        ]
        for i, row in enumerate(table.rows):
            cells = [
                rf"\textbf{{{_tex(c)}}}" if (i, j) in table.marked else _tex(c)
                for j, c in enumerate(row)
            ]
            lines.append(" & ".join(cells) + r" \\")
        parts.append("\n".join([*lines, r"\hline", r"\end{tabular}", r"\end{table}", ""]))
    return "\n".join(parts + [f"% {note}\n" for note in notes])


def render(summary: Report | DiagnosticsReport, fmt: str, width: int) -> str:
    """``summary`` as text in format ``fmt`` (rich tables ``width`` columns wide, no colour)."""
    if fmt == "table":
        buffer = Console(file=io.StringIO(), width=width, color_system=None)
        print_tables(summary, buffer)
        return buffer.file.getvalue()
    if fmt == "csv":
        return summary.frame().to_csv(index=False)
    if fmt == "json":
        return json.dumps(summary.records(), indent=2, allow_nan=False) + "\n"
    return (markdown if fmt == "markdown" else latex)(summary.tables(), summary.notes)


def print_tables(summary: Report | DiagnosticsReport, console: Console) -> None:
    """Rich tables on ``console``, fitted to its width, then the notes."""
    for table in summary.tables():
        for renderable in _rich(table, console.width):
            console.print(renderable)
        console.print()
    for note in summary.notes:
        console.print(note, markup=False, highlight=False)
