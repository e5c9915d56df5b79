"""Turn report summaries into text: rich tables, CSV, Markdown, LaTeX or JSON."""

from __future__ import annotations

import io
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
from rich.console import Console
from rich.table import Table as RichTable
from rich.text import Text

from normbench.report import PERCENTILES, format_value, higher_is_better

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
class Report:
    """The summaries behind ``normbench report`` (see normbench.report for their columns)."""

    metric: str
    by: str
    baseline: str | None
    cells: pd.DataFrame
    best_lr: pd.DataFrame | None  # None when a single lr was tried
    stability: pd.DataFrame | None
    paired: pd.DataFrame | None  # None without a baseline

    def tables(self) -> list[Table]:
        direction = "highest" if higher_is_better(self.metric) else "lowest"
        tables = [
            _matrix(
                self.cells,
                self.by,
                _cell,
                f"{self.metric} at the last epoch, by {self.by}",
                f"Mean ± std over seeds of the runs that finished (n); diverged runs are counted, "
                f"not averaged (their metric is inf/nan). Marked: the {direction} mean per row "
                f"among cells where no seed diverged.",
            )
        ]
        if self.best_lr is not None:
            tables += [
                _best_lr_table(self.best_lr),
                _stability_table(self.stability, self.baseline),
            ]
        if self.paired is not None and not self.paired.empty:
            tables.append(
                _matrix(
                    self.paired.assign(
                        best=self.paired["ci_low"].gt(0) | self.paired["ci_high"].lt(0)
                    ),
                    self.by,
                    _difference,
                    f"{self.metric} minus {self.baseline}, paired by seed",
                    f"Mean difference to the {self.baseline} run with the same {self.by}, seed and "
                    f"other settings (averaged over {self.baseline} runs differing only in norm.* "
                    f"settings), [95% confidence interval, t distribution] (n pairs); pairs "
                    f"where either side diverged or failed are left out. Marked: the "
                    f"interval excludes 0.",
                    marker="*",
                )
            )
        return tables

    def frame(self) -> pd.DataFrame:
        return self.cells

    def records(self) -> dict:
        return {
            "metric": self.metric,
            "higher_is_better": higher_is_better(self.metric),
            "by": self.by,
            "baseline": self.baseline,
            "cells": _records(self.cells),
            "best_lr": _records(self.best_lr),
            "stability": _records(self.stability),
            "paired": _records(self.paired),
        }


@dataclass
class DiagnosticsReport:
    """``normbench report --diagnostics``: one row per configuration and layer."""

    table: pd.DataFrame

    def tables(self) -> list[Table]:
        columns = ["grad_norm", "input_std", *(f"drift_{p}" for p in PERCENTILES), "eval_gap"]
        rows = [
            [row["config"], row["layer"], *(_number(row[c], 3) for c in columns)]
            for _, row in self.table.iterrows()
        ]
        headers = ["norm", "layer", "mean grad norm", "final input std"]
        headers += [f"drift {p.split('_')[1]}" for p in PERCENTILES] + ["final eval gap"]
        caption = (
            "Averaged over seeds. Drift: the largest departure of the last hidden layer's "
            "pre-activation percentiles from their first record (Ioffe & Szegedy Fig. 1). "
            "Eval gap: validation metric with running statistics minus with batch statistics."
        )
        return [Table("Diagnostics per layer", headers, rows, caption)]

    def frame(self) -> pd.DataFrame:
        return self.table

    def records(self) -> dict:
        return {"diagnostics": _records(self.table)}


# ----------------------------------------------------------------------------- cells


def _number(value: float, digits: int = 4) -> str:
    return DASH if pd.isna(value) else f"{value:.{digits}g}"


def _mean_std(mean: float, std: float, n: int) -> str:
    """``0.650 ± 0.026``: the mean to the precision of the std's two significant digits."""
    if n < 2 or not math.isfinite(std) or std <= 0:
        return f"{mean:.4g}"
    decimals = max(0, 1 - math.floor(math.log10(std)))
    return f"{mean:.{decimals}f} ± {std:.{decimals}f}"


def _cell(row: pd.Series) -> str:
    notes = [f"n={row['n']}"] if row["n"] else []
    if row["diverged"]:
        notes.append(f"{row['diverged']}/{row['runs']} diverged")
    if row["failed"]:
        notes.append(f"{row['failed']}/{row['runs']} failed")
    if not row["n"]:
        return ", ".join(notes) or DASH  # e.g. test_acc without a test split
    return f"{_mean_std(row['mean'], row['std'], row['n'])} ({', '.join(notes)})"


def _difference(row: pd.Series) -> str:
    interval = f" [{row['ci_low']:+.3g}, {row['ci_high']:+.3g}]" if row["n"] > 1 else ""
    return f"{row['mean']:+.3g}{interval} (n={row['n']})"


def _matrix(
    frame: pd.DataFrame, key: str, cell, title: str, caption: str, marker: str = "★"
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


def _best_lr_table(frame: pd.DataFrame) -> Table:
    rows = []
    for _, row in frame.iterrows():
        lr = DASH if pd.isna(row["lr"]) else format_value(row["lr"])
        val = _spread(row["val_mean"], row["val_std"], row["val_n"])
        test = _spread(row["test_mean"], row["test_std"], row["test_n"])
        rows.append([row["config"], lr, val, test])
    caption = (
        f"The lr with the best mean {' / '.join(frame['selected_on'].unique())} among lrs where "
        "no seed diverged (– when every lr had a diverged seed), and the test metric at that lr "
        "(– without a test split)."
    )
    return Table(
        "Best learning rate per norm", ["norm", "best lr", "validation", "test"], rows, caption
    )


def _spread(mean: float, std: float, n: int) -> str:
    if not n or pd.isna(mean):
        return DASH
    return f"{_mean_std(mean, std, n)} (n={n})"


def _stability_table(frame: pd.DataFrame, baseline: str | None) -> Table:
    rows = []
    for _, row in frame.iterrows():
        lr = row["max_stable_lr"]
        stable = "diverged at every lr" if pd.isna(lr) else format_value(lr)
        if row["censored"]:
            stable = f"≥ {stable}"
        ratio = DASH
        if not (pd.isna(row["ratio"]) or row.get("baseline_censored", False)):
            ratio = f"{'≥ ' if row['censored'] else ''}{row['ratio']:.3g}x"
        rows.append([row["config"], stable, str(row["lrs_tried"])] + [ratio] * bool(baseline))
    caption = (
        "Largest lr at which no seed diverged. ≥: no seed diverged even at the largest lr tried."
    )
    columns = ["norm", "largest stable lr", "lrs tried"]
    if baseline:
        caption += f" Ratio: to {baseline} with the same other settings (– when it never diverged)."
        columns.append(f"ratio to {baseline}")
    return Table("Stability", columns, rows, caption)


def _records(frame: pd.DataFrame | None) -> list[dict]:
    """Rows as JSON-ready dicts: NaN and inf become null."""
    return [] if frame is None else json.loads(frame.to_json(orient="records"))


# ----------------------------------------------------------------------------- formats


def _rich(table: Table) -> RichTable:
    out = RichTable(title=table.title, caption=table.caption, caption_justify="left")
    for i, column in enumerate(table.columns):
        if i == 0:
            out.add_column(column, no_wrap=True)
        else:
            out.add_column(column, justify="right", overflow="fold")
    for i, row in enumerate(table.rows):
        out.add_row(
            *(
                Text(f"{table.marker} {cell}", style="bold green")
                if (i, j) in table.marked
                else Text(cell)
                for j, cell in enumerate(row)
            )
        )
    return out


def markdown(tables: list[Table]) -> str:
    """GitHub-flavoured pipe tables, marked cells in bold."""
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
    return "\n".join(parts)


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


def latex(tables: list[Table]) -> str:
    """One ``table`` environment per table, marked cells in bold."""
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
    return "\n".join(parts)


def emit(
    summary: Report | DiagnosticsReport, fmt: str, console: Console, output: Path | None
) -> None:
    """Print ``summary`` in format ``fmt`` to ``console``, or write it to ``output``."""
    if fmt == "table":
        if output is None:
            for table in summary.tables():
                console.print(_rich(table))
            return
        buffer = Console(file=io.StringIO(), width=200, color_system=None)
        for table in summary.tables():
            buffer.print(_rich(table))
        text = buffer.file.getvalue()
    elif fmt == "csv":
        text = summary.frame().to_csv(index=False)
    elif fmt == "json":
        text = json.dumps(summary.records(), indent=2, allow_nan=False) + "\n"
    else:
        text = (markdown if fmt == "markdown" else latex)(summary.tables())
    if output is None:
        console.out(text, highlight=False, end="")
    else:
        Path(output).write_text(text)
