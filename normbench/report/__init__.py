"""``normbench report``: read the runs, summarize them, render and write (one function).

Data flows one way: load reads files, stats summarizes, tables and plots
turn summaries into text and figures; only this module knows them all.
"""

from __future__ import annotations

import io
import sys
import time
from collections.abc import Sequence
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

import pandas as pd

from normbench.errors import ConfigError, choices_error
from normbench.report.load import (
    COMPLETE,
    RUN_DIR,
    cut_short,
    key_columns,
    load_diagnostics,
    load_runs,
)
from normbench.report.stats import (
    best_lr,
    default_metric,
    diagnostics_summary,
    filter_runs,
    finished,
    paired,
    stability,
    studies,
    summarize,
)
from normbench.report.tables import Block, DiagnosticsReport, Report, print_tables, render

if TYPE_CHECKING:
    from matplotlib.figure import Figure
    from rich.console import Console

METRICS = (
    "val_acc",
    "val_loss",
    "test_acc",
    "test_loss",
    "train_acc",
    "train_loss",
    "grad_norm",
    "epoch_seconds",
)
FORMATS = ("table", "csv", "markdown", "latex", "json")
NO_RESULTS = "no results under {dir}; produce some with `normbench run` or `normbench sweep ...`"
NO_DIAGNOSTICS = "no diagnostics under {dir}; record some with `normbench run diagnostics=true`"
MAX_WARNINGS = 20
INCOMPLETE = "incomplete"  # the left-out status of a run whose metrics.csv lost its last rows
MAX_IDS = 5  # run ids named in a note before "..."
FILE_WIDTH = 200  # width of the rich tables written to --output
HTML_DPI = 80  # the figures inlined in --html: 1,500 px across for 4 panels, half the bytes


class WriteError(OSError):
    """Writing --output, --plot, --html or --tensorboard failed: the CLI prints the message
    and exits 1."""


def report(
    results_dir: Path,
    metric: str | None = None,
    where: Sequence[str] = (),
    by: str = "lr",
    fmt: str = "table",
    output: Path | None = None,
    plot_dir: Path | None = None,
    baseline: str | None = None,
    diagnostics: bool = False,
    console: Console | None = None,
    html: Path | None = None,
    tensorboard: Path | None = None,
    command: str = "",
) -> None:
    """Summarize every run under ``results_dir`` as tables (``fmt``) and, with ``plot_dir``, PNGs.

    Prints to ``console`` or writes ``output``; warnings and notes go to stderr. ``fmt="csv"``
    holds only the main tables (one row per configuration and value of ``by``); the other
    formats hold every table. ``html``: the same tables, notes and figures as one
    self-contained page (see report.html; ``command`` is shown in it). ``tensorboard``: every
    run read as TensorBoard event files (see report.tensorboard). Raises ConfigError, before
    printing anything, for an unknown metric, key, format, --where value or baseline, for an
    unusable path and for --tensorboard without TensorBoard installed; WriteError when writing
    the output, the figures, the page or the event files fails.
    """
    from rich.console import Console

    if fmt not in FORMATS:
        raise choices_error("format", fmt, FORMATS)
    if metric is not None and metric not in METRICS:
        raise choices_error("metric", metric, METRICS)
    if by == "norm":
        raise ConfigError(
            "--by norm: the norms are already the rows of every table; choose a column key "
            "such as lr, batch_size, seed or a setting like norm.eps"
        )
    results_dir, output = Path(results_dir), output and Path(output)
    plot_dir, html = plot_dir and Path(plot_dir), html and Path(html)
    tensorboard = tensorboard and Path(tensorboard)
    _check_paths(results_dir, output, plot_dir, html, tensorboard)
    console = console or Console()
    curves = (plot_dir or html) is not None and not diagnostics
    rows, warnings = load_runs(results_dir, last_row_only=not (curves or tensorboard))
    _warn(warnings)
    if rows.empty:
        console.print(NO_RESULTS.format(dir=results_dir), markup=False, soft_wrap=True)
        return
    runs = filter_runs(rows.drop_duplicates(RUN_DIR, keep="last"), where)  # final rows
    if by not in key_columns(runs) or by == "run_id":
        raise choices_error("--by key", by, [c for c in key_columns(runs) if c != "run_id"])
    norms = sorted(set(runs["norm"]))
    if baseline is not None and baseline not in norms:
        raise choices_error("baseline norm", baseline, norms)
    if baseline is None and "none" in norms:
        baseline = "none"
    short = cut_short(runs)  # says ok or stalled but ends before its last epoch: lost rows
    incomplete = _ended_at(runs[short])
    runs = runs.assign(status=runs["status"].mask(short, INCOMPLETE))
    left_out = runs[~runs["status"].isin(COMPLETE)][["run_id", "status", "epoch"]]
    notes = [
        *_listed(left_out[left_out["status"].eq("running")], "unfinished or running"),
        *_listed(left_out[left_out["status"].eq("failed")], "failed (counted, never averaged)"),
        *_listed(incomplete, "incomplete (metrics.csv ends before the last epoch)"),
    ]
    read = runs  # every run read, running ones included (--tensorboard)
    runs = runs[~runs["status"].isin(("running", INCOMPLETE))]  # never in the statistics
    summary: Report | DiagnosticsReport | None = None
    if diagnostics:
        records, warnings = load_diagnostics(runs)
        _warn(warnings)
        if records.empty:
            console.print(NO_DIAGNOSTICS.format(dir=results_dir), markup=False, soft_wrap=True)
        else:
            recorded = runs[runs["run_id"].isin(records["run_id"])]
            notes += _counted(recorded[~finished(recorded)], "left out of the diagnostics")
            summary = DiagnosticsReport(diagnostics_summary(runs, records), notes)
            figures = partial(_diagnostics_figures, runs, records)
    else:
        summary = _summary(runs, metric, by, baseline, notes, left_out)
        figures = partial(_result_figures, runs, rows, metric, by)
    if summary is not None:
        _emit(summary, fmt, console, output)
        drawn = figures() if (plot_dir or html) is not None else {}
        if plot_dir is not None:
            _plot(plot_dir, drawn)
        if html is not None:
            _html(html, summary, drawn, results_dir, len(read), command)
    if tensorboard is not None:
        _tensorboard(tensorboard, read, rows[rows[RUN_DIR].isin(read[RUN_DIR])])


def _summary(
    runs: pd.DataFrame,
    metric: str | None,
    by: str,
    baseline: str | None,
    notes: list[str],
    left_out: pd.DataFrame,
) -> Report:
    """One block of tables per study (see report.stats.studies), and notes on how they split."""
    blocks = []
    for settings, part in studies(runs, by):
        task_metric = default_metric(part["task"].iloc[0])
        lr_study = part["lr"].nunique() > 1
        blocks.append(
            Block(
                settings=settings,
                metric=metric or task_metric,
                by=by,
                baseline=baseline,
                cells=summarize(part, by, metric or task_metric),
                best_lr=best_lr(part, task_metric) if lr_study else None,
                stability=stability(part, baseline) if lr_study else None,
                paired=paired(part, by, metric or task_metric, baseline)
                if baseline in set(part["norm"])
                else None,
            )
        )
    if runs["task"].nunique() > 1:
        notes.append(
            "Classification and regression runs are reported separately"
            + (f", each with its own metric ({default_metric('classification')} and "
               f"{default_metric('regression')})." if metric is None else ".")
        )  # fmt: skip
    split = list(dict.fromkeys(k for block in blocks for k in block.settings if k != "task"))
    if split:
        notes.append(
            f"The runs differ in {', '.join(split)}, which is neither a row nor a column: "
            f"one block of tables per combination."
        )
    return Report(blocks, notes, left_out)


def _listed(runs: pd.DataFrame, what: str) -> list[str]:
    """``["3 runs unfinished or running: a, b, c"]``; nothing for no runs."""
    names = list(runs["run_id"])
    if not names:
        return []
    more = f", ... ({len(names) - MAX_IDS} more)" if len(names) > MAX_IDS else ""
    return [f"{len(names)} run{'s' * (len(names) > 1)} {what}: {', '.join(names[:MAX_IDS])}{more}"]


def _ended_at(runs: pd.DataFrame) -> pd.DataFrame:
    """``runs`` with each id followed by where its file ends: ``id (epoch 1 of 2)``."""
    if runs.empty:
        return runs
    ends = zip(runs["run_id"], runs["epoch"], runs["epochs"].astype(float), strict=True)
    return runs.assign(run_id=[f"{run} (epoch {e:g} of {n:g})" for run, e, n in ends])


def _counted(runs: pd.DataFrame, what: str) -> list[str]:
    """``["3 runs left out ...: 2 diverged, 1 stalled"]``; nothing for no runs."""
    if runs.empty:
        return []
    counts = runs["status"].value_counts().sort_index()
    detail = ", ".join(f"{count} {status}" for status, count in counts.items())
    return [f"{len(runs)} run{'s' * (len(runs) > 1)} {what}: {detail}"]


def _emit(
    summary: Report | DiagnosticsReport, fmt: str, console: Console, output: Path | None
) -> None:
    """Print ``summary`` to ``console`` or write it to ``output``; CSV's notes go to stderr."""
    if fmt == "csv":
        for note in summary.notes:
            print(f"note: {note}", file=sys.stderr)
    if output is None and fmt == "table":
        print_tables(summary, console)
    elif output is None:
        console.out(render(summary, fmt, console.width), highlight=False, end="")
    else:
        try:
            output.write_text(render(summary, fmt, FILE_WIDTH))
        except OSError as error:
            raise WriteError(f"could not write --output {output}: {error.strerror}") from None
        print(f"wrote {output}", file=sys.stderr)


def _result_figures(
    runs: pd.DataFrame, rows: pd.DataFrame, metric: str | None, by: str
) -> dict[str, Figure]:
    """The figures of each task, under a folder per task when there are several."""
    from normbench.report.plots import result_figures

    figures = {}
    tasks = runs.groupby("task")
    for task, part in tasks:
        folder = f"{task}/" if tasks.ngroups > 1 else ""
        curves = rows[rows["run_id"].isin(part["run_id"])]
        drawn = result_figures(part, curves, metric or default_metric(task), by)
        figures |= {folder + name: figure for name, figure in drawn.items()}
    return figures


def _diagnostics_figures(runs: pd.DataFrame, records: pd.DataFrame) -> dict[str, Figure]:
    from normbench.report.plots import diagnostics_figures

    return diagnostics_figures(runs, records)


def _plot(plot_dir: Path, figures: dict[str, Figure]) -> None:
    """Save ``figures`` under ``plot_dir``; a failed write becomes a WriteError naming the file."""
    from normbench.report.plots import save

    try:
        for name, figure in figures.items():
            path = plot_dir / name
            path.parent.mkdir(parents=True, exist_ok=True)
            save(figure, path)
    except OSError as error:
        where = error.filename or plot_dir
        raise WriteError(f"could not write --plot {plot_dir}: {where}: {error.strerror}") from None
    print(f"wrote {len(figures)} figures to {plot_dir}", file=sys.stderr)


def _html(
    path: Path,
    summary: Report | DiagnosticsReport,
    figures: dict[str, Figure],
    results_dir: Path,
    runs: int,
    command: str,
) -> None:
    """Write the report as one self-contained HTML page (see report.html)."""
    from normbench import __version__
    from normbench.report.html import Meta, page
    from normbench.report.plots import save

    pngs, alts = {}, {}
    for name, figure in figures.items():
        buffer = io.BytesIO()
        save(figure, buffer, dpi=HTML_DPI)
        pngs[name] = buffer.getvalue()
        title = figure.get_suptitle() if hasattr(figure, "get_suptitle") else ""
        alts[name] = " ".join(title.split()) or name
    made = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    meta = Meta(command or "normbench report", __version__, made, str(results_dir), runs)
    try:
        path.write_text(page(summary, pngs, meta, alts), encoding="utf-8")
    except OSError as error:
        raise WriteError(f"could not write --html {path}: {error.strerror}") from None
    print(f"wrote {path}", file=sys.stderr)


def _tensorboard(out_dir: Path, runs: pd.DataFrame, rows: pd.DataFrame) -> None:
    """Write every run read as TensorBoard event files (see report.tensorboard)."""
    from normbench.report.tensorboard import export

    try:
        count = export(out_dir, runs, rows)
    except OSError as error:
        where = error.filename or out_dir
        raise WriteError(
            f"could not write --tensorboard {out_dir}: {where}: {error.strerror}"
        ) from None
    print(f"wrote {count} runs to {out_dir} (tensorboard --logdir {out_dir})", file=sys.stderr)


def _check_paths(
    results_dir: Path,
    output: Path | None,
    plot_dir: Path | None,
    html: Path | None = None,
    tensorboard: Path | None = None,
) -> None:
    """Refuse paths (and a missing TensorBoard) that would fail only after the tables were
    printed."""
    if not results_dir.exists():
        raise ConfigError(f"--results {results_dir} does not exist")
    if not results_dir.is_dir():
        raise ConfigError(f"--results {results_dir} is a file; give the folder of the results")
    for option, file in (("--output", output), ("--html", html)):
        if file is not None and file.is_dir():
            raise ConfigError(f"{option} {file} is a folder; give a file name")
        if file is not None and not file.parent.is_dir():
            raise ConfigError(f"{option} {file}: {file.parent} is not an existing folder")
    for option, folder in (("--plot", plot_dir), ("--tensorboard", tensorboard)):
        if folder is not None:
            existing = next(path for path in (folder, *folder.parents) if path.exists())
            if not existing.is_dir():
                raise ConfigError(f"{option} {folder}: {existing} is a file, not a folder")
    if tensorboard is not None:
        from normbench.report.tensorboard import INSTALL, available

        if not available():
            raise ConfigError(f"--tensorboard needs TensorBoard, an optional extra: {INSTALL}")


def _warn(warnings: list[str]) -> None:
    """One line on stderr per skipped file (at most MAX_WARNINGS of them)."""
    for line in warnings[:MAX_WARNINGS]:
        print(f"warning: {line}", file=sys.stderr)
    if len(warnings) > MAX_WARNINGS:
        print(
            f"warning: ... and {len(warnings) - MAX_WARNINGS} more skipped files", file=sys.stderr
        )
