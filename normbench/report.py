"""``normbench report``: load every run's results fast and summarize them (pandas only).

Loading reads each metrics.csv as text, checks it, and parses all files that share a header in
one ``pd.read_csv`` call: ten thousand runs take one parse, not ten thousand.
Summaries are tidy DataFrames; report_render turns them into tables, plots.py into figures.
"""

from __future__ import annotations

import io
import os
import re
import sys
from collections import defaultdict
from collections.abc import Sequence
from functools import reduce
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

import numpy as np
import pandas as pd

from normbench.errors import ConfigError, choices_error
from normbench.results import (
    DIAGNOSTIC_COLUMNS,
    DIAGNOSTICS_FILE,
    KEY_COLUMNS,
    METRIC_COLUMNS,
    METRICS_FILE,
    PERCENTILES,
    normalize_value,
)

if TYPE_CHECKING:
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
STATUSES = ("ok", "diverged", "failed")
# diagnostics.csv: one tidy row per record (the recorder in normbench writes these columns).
RUN_DIR = "_run_dir"  # the folder each row was read from (internal column)
NO_RESULTS = "no results under {dir}; produce some with `normbench run` or `normbench sweep ...`"
NO_DIAGNOSTICS = "no diagnostics under {dir}; record some with `normbench run diagnostics=true`"
MAX_WARNINGS = 20

_QUOTED = re.compile(r'"[^"]*"')


# ----------------------------------------------------------------------------- loading


def read_csv_files(
    paths: Sequence[str | Path], required: Sequence[str], last_row_only: bool = False
) -> tuple[pd.DataFrame, list[str]]:
    """Read many small CSV files with one parse per distinct header.

    Files that cannot be read, lack a ``required`` column or are partial (rows that do not
    match the header, no final newline) are skipped with a warning naming them. Missing files
    are skipped silently (a run still in progress has none). Adds the column RUN_DIR.
    """
    bodies: dict[str, list[str]] = defaultdict(list)
    owners: dict[str, list[tuple[str, int]]] = defaultdict(list)
    warnings: list[str] = []
    for path in paths:
        try:
            with open(path, encoding="utf-8", newline="") as handle:
                text = handle.read()
        except FileNotFoundError:
            continue
        except (OSError, UnicodeDecodeError) as exc:
            warnings.append(f"skipped {path}: unreadable ({exc})")
            continue
        header, _, body = text.partition("\n")
        header = header.rstrip("\r")
        rows, problem = _check_csv(header, body, required)
        if problem:
            warnings.append(f"skipped {path}: {problem}")
            continue
        if last_row_only:
            body = body[body.rfind("\n", 0, len(body) - 1) + 1 :]
            rows = 1
        bodies[header].append(body)
        owners[header].append((os.path.dirname(path), rows))
    frames = [_parse(header, bodies[header], owners[header], warnings) for header in bodies]
    frames = [frame for frame in frames if not frame.empty]
    if not frames:
        return pd.DataFrame(columns=[*required, RUN_DIR]), warnings
    return pd.concat(frames, ignore_index=True), warnings


def _check_csv(header: str, body: str, required: Sequence[str]) -> tuple[int, str | None]:
    """The number of rows of a file's body, or why the file cannot be used."""
    columns = header.split(",")
    missing = [column for column in required if column not in columns]
    if missing:
        return 0, f"missing columns {', '.join(missing[:3])}{', ...' * (len(missing) > 3)}"
    if not body.strip():
        return 0, "no rows"
    if not body.endswith("\n"):
        return 0, "partial (the last row is cut off)"
    # Count separators outside quoted fields ("[256, 128]"): every row has len(columns) fields.
    unquoted = _QUOTED.sub("", body)
    rows = unquoted.count("\n")
    if '"' in unquoted or unquoted.count(",") != rows * (len(columns) - 1):
        return 0, f"partial (rows do not match the header's {len(columns)} columns)"
    return rows, None


def _parse(
    header: str, bodies: list[str], owners: list[tuple[str, int]], warnings: list[str]
) -> pd.DataFrame:
    """Parse the bodies sharing ``header`` at once; on failure one by one, to name the bad file."""
    try:
        frame = pd.read_csv(io.StringIO(header + "\n" + "".join(bodies)), low_memory=False)
    except (ValueError, pd.errors.ParserError):
        frame = None
    if frame is not None and len(frame) == sum(rows for _, rows in owners):
        frame[RUN_DIR] = np.repeat([folder for folder, _ in owners], [rows for _, rows in owners])
        return frame
    frames = []
    for body, (folder, _) in zip(bodies, owners, strict=True):
        try:
            frames.append(pd.read_csv(io.StringIO(header + "\n" + body)).assign(_run_dir=folder))
        except (ValueError, pd.errors.ParserError) as exc:
            warnings.append(f"skipped {folder}: unparsable ({str(exc).splitlines()[0]})")
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def load_runs(results_dir: Path, last_row_only: bool = True) -> tuple[pd.DataFrame, list[str]]:
    """Every run's metrics rows under ``results_dir`` (only the final row of each by default).

    Config floats are rounded to 12 significant digits so ``0.30000000000000004`` groups with 0.3.
    """
    paths = [os.path.join(entry.path, METRICS_FILE) for entry in _subdirs(results_dir)]
    frame, warnings = read_csv_files(paths, [*KEY_COLUMNS, "epoch", "status"], last_row_only)
    frame = frame.reindex(columns=[*frame.columns, *(c for c in METRIC_COLUMNS if c not in frame)])
    bad = ~frame["status"].isin(STATUSES)
    for folder in frame.loc[bad, RUN_DIR].unique():
        warnings.append(f"skipped {Path(folder, METRICS_FILE)}: status is not one of {STATUSES}")
    frame = frame[~bad]
    duplicated = frame[RUN_DIR].ne(frame.groupby("run_id")[RUN_DIR].transform("first"))
    for folder in frame.loc[duplicated, RUN_DIR].unique():
        warnings.append(f"skipped {Path(folder, METRICS_FILE)}: duplicate run_id of another folder")
    frame = frame[~duplicated]
    for column in key_columns(frame):
        if pd.api.types.is_float_dtype(frame[column]):
            values = frame[column].dropna().unique()
            frame[column] = frame[column].map({v: normalize_value(v) for v in values})
    return frame.reset_index(drop=True), warnings


def _subdirs(results_dir: Path) -> list[os.DirEntry]:
    try:
        return sorted((e for e in os.scandir(results_dir) if e.is_dir()), key=lambda e: e.name)
    except FileNotFoundError:
        return []


def load_diagnostics(runs: pd.DataFrame) -> tuple[pd.DataFrame, list[str]]:
    """The diagnostics records of ``runs`` (tidy rows, DIAGNOSTIC_COLUMNS), in file order."""
    paths = [Path(folder, DIAGNOSTICS_FILE) for folder in runs[RUN_DIR].unique()]
    frame, warnings = read_csv_files(paths, DIAGNOSTIC_COLUMNS)
    return frame[frame["run_id"].isin(runs["run_id"])], warnings


# ----------------------------------------------------------------------------- selecting


def key_columns(runs: pd.DataFrame) -> list[str]:
    """Columns that describe a run's configuration (filterable and groupable)."""
    return [c for c in runs.columns if c not in METRIC_COLUMNS and c != RUN_DIR]


def filter_runs(runs: pd.DataFrame, where: Sequence[str]) -> pd.DataFrame:
    """Keep the runs matching every ``key=value`` (value read as the column's type)."""
    keys = key_columns(runs)
    for condition in where:
        key, sep, text = condition.partition("=")
        if not sep:
            raise ConfigError(f"--where expects key=value, got {condition!r}")
        if key not in keys:
            raise choices_error("--where key", key, keys)
        mask = _matches(runs[key], key, text)
        if not mask.any():
            values = sorted({format_value(v) for v in runs[key].unique()})
            raise choices_error(f"value for --where {key}", text, values)
        runs = runs[mask]
    return runs


def _matches(column: pd.Series, key: str, text: str) -> pd.Series:
    if text.lower() in ("null", "none") and column.isna().any():
        return column.isna()
    if pd.api.types.is_bool_dtype(column):
        if text.lower() not in ("true", "false"):
            raise ConfigError(f"--where {key}: expected true or false, got {text!r}")
        return column == (text.lower() == "true")
    if pd.api.types.is_numeric_dtype(column):
        try:
            value = normalize_value(float(text))
        except ValueError:
            raise ConfigError(f"--where {key}: expected a number, got {text!r}") from None
        return column == value
    return column.astype(str) == text


def default_metric(runs: pd.DataFrame) -> str:
    """val_acc for classification, val_loss for regression (or for a mix of both)."""
    return "val_acc" if runs["task"].eq("classification").all() else "val_loss"


def higher_is_better(metric: str) -> bool:
    return metric.endswith("_acc")


def format_value(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, float):
        return "null" if np.isnan(value) else f"{value:g}"
    return str(value)


# ----------------------------------------------------------------------------- summarizing


class Configs(NamedTuple):
    """Which configuration each run belongs to, ignoring one key (and the seed)."""

    labels: pd.Series  # per run, categorical: "batch" or "batch (norm.momentum=0.05)"
    context: list[str]  # columns besides norm that tell configurations apart


def configs_of(runs: pd.DataFrame, key: str) -> Configs:
    """Group runs so that different configurations are never averaged together.

    A column joins the context when it still varies once norm, ``key``, the seed and the
    columns already in the context are fixed; a run's label names the context columns that
    vary within its norm (``optimizer.name`` follows from ``optimizer``, so it is left out).
    """
    base = list(dict.fromkeys(["norm", key, "seed"]))
    context: list[str] = []
    for column in key_columns(runs):
        if column in base or column == "run_id" or runs[column].nunique(dropna=False) < 2:
            continue
        if runs.groupby(base + context, dropna=False)[column].nunique(dropna=False).max() > 1:
            context.append(column)
    labels = runs["norm"].astype(str)
    if context:
        varies = runs.groupby("norm")[context].nunique(dropna=False).gt(1)
        for norm, shown in varies.iterrows():
            rows = runs["norm"].eq(norm)
            parts = [
                runs.loc[rows, c].map(lambda v, c=c: f"{c}={format_value(v)}")
                for c in context
                if shown[c]
            ]
            if parts:
                labels[rows] += " (" + reduce(lambda a, b: a + ", " + b, parts) + ")"
    # Categories in the order of the settings, so that batch_size=4 comes before 32.
    order = labels[runs.sort_values(["norm", *context], kind="stable").index]
    categories = list(dict.fromkeys(order))
    return Configs(pd.Series(pd.Categorical(labels, categories), index=runs.index), context)


def summarize(
    runs: pd.DataFrame, key: str, metric: str, configs: Configs | None = None
) -> pd.DataFrame:
    """One row per configuration and value of ``key``: the final ``metric`` over seeds.

    mean/std/n use the runs that finished (status ok) with a finite metric; diverged and
    failed runs are counted, not averaged. ``best`` marks each configuration's best cell
    among those where no seed diverged.
    """
    configs = configs or configs_of(runs, key)
    finished = runs["status"].eq("ok") & np.isfinite(runs[metric].astype(float))
    frame = runs.assign(
        config=configs.labels,
        _value=runs[metric].astype(float).where(finished),
        _diverged=runs["status"].eq("diverged"),
        _failed=runs["status"].eq("failed"),
    )
    described = {c: (c, "first") for c in ["norm", *configs.context]}
    cells = (
        frame.groupby(["config", key], dropna=False, observed=True)
        .agg(
            **described,
            mean=("_value", "mean"),
            std=("_value", "std"),
            n=("_value", "count"),
            runs=("_value", "size"),
            diverged=("_diverged", "sum"),
            failed=("_failed", "sum"),
        )
        .reset_index()
    )
    score = cells["mean"].where(cells["diverged"].eq(0))
    score = score if higher_is_better(metric) else -score
    cells["best"] = score.notna() & score.eq(
        score.groupby(cells["config"], observed=True).transform("max")
    )
    return cells


def best_lr(runs: pd.DataFrame) -> pd.DataFrame:
    """Per configuration, the lr with the best validation metric and its test metric."""
    configs = configs_of(runs, "lr")
    rows = []
    for task, group in runs.groupby("task"):
        val, test = (
            ("val_acc", "test_acc") if task == "classification" else ("val_loss", "test_loss")
        )
        sub = Configs(configs.labels[group.index], configs.context)
        cells = summarize(group, "lr", val, sub)
        tests = summarize(group, "lr", test, sub)[["mean", "std", "n"]].add_prefix("test_")
        cells = pd.concat([cells, tests], axis=1).assign(selected_on=val)
        best = cells[cells["best"]].drop_duplicates("config")
        unstable = cells[~cells["config"].isin(best["config"])].drop_duplicates("config")
        rows.append(pd.concat([best, unstable.assign(lr=np.nan, mean=np.nan, std=np.nan, n=0)]))
    columns = ["config", "norm", "lr", "selected_on", "mean", "std", "n"]
    table = pd.concat(rows)[[*columns, "test_mean", "test_std", "test_n"]]
    table.loc[table["lr"].isna(), ["test_mean", "test_std"]] = np.nan
    return table.rename(columns={"mean": "val_mean", "std": "val_std", "n": "val_n"}).sort_values(
        "config"
    )


def shared_columns(context: list[str]) -> list[str]:
    """Columns a configuration shares with its baseline: all but the norm's own settings."""
    return [c for c in context if not c.startswith("norm.")]


def stability(runs: pd.DataFrame, baseline: str | None) -> pd.DataFrame:
    """Per configuration, the largest lr at which no seed diverged, and its ratio to baseline's.

    ``censored`` means no seed diverged even at the largest lr tried: the limit is higher.
    The baseline's runs that differ only in its own settings (norm.eps for none) are one
    experiment, as in :func:`paired`: a seed diverging in any of them counts.
    """
    configs = configs_of(runs, "lr")
    table = _stable_lrs(runs.assign(config=configs.labels), ["config", "norm", *configs.context])
    table["ratio"] = np.nan
    if baseline is not None and baseline in set(table["norm"]):
        match = shared_columns(configs.context)
        base = _stable_lrs(runs[runs["norm"].eq(baseline)], ["norm", *match])
        base = base[[*match, "max_stable_lr", "censored"]].rename(
            columns={"max_stable_lr": "baseline_lr", "censored": "baseline_censored"}
        )
        if match:
            table = table.merge(base, how="left", on=match, validate="many_to_one")
        else:
            table = table.merge(base, how="cross")
        table["ratio"] = table["max_stable_lr"] / table["baseline_lr"]
    return table


def _stable_lrs(runs: pd.DataFrame, groups: list[str]) -> pd.DataFrame:
    """Per group of runs: lrs_tried, max_stable_lr (no seed diverged there) and censored."""
    frame = runs.assign(
        _diverged=runs["status"].eq("diverged"), _failed=runs["status"].eq("failed")
    )
    cells = frame.groupby([*groups, "lr"], dropna=False, observed=True).agg(
        runs=("lr", "size"), diverged=("_diverged", "sum"), failed=("_failed", "sum")
    )
    cells = cells.reset_index()
    stable = cells["diverged"].eq(0) & cells["runs"].gt(cells["failed"])
    table = (
        cells.assign(stable_lr=cells["lr"].where(stable))
        .groupby(groups, dropna=False, observed=True)
        .agg(lrs_tried=("lr", "count"), max_stable_lr=("stable_lr", "max"), _top=("lr", "max"))
        .reset_index()
    )
    return table.assign(censored=table["max_stable_lr"].eq(table["_top"])).drop(columns="_top")


def paired(runs: pd.DataFrame, key: str, metric: str, baseline: str) -> pd.DataFrame:
    """Mean difference to ``baseline`` over seeds, paired by seed and every other setting.

    The baseline's runs that differ only in its own settings (``norm.*``: norm.eps for none)
    are one experiment: their metric is averaged, so every run pairs with one baseline value.
    Pairs where either side did not finish (diverged, failed, non-finite metric; on the
    baseline's side, any of its runs) are left out.
    ``ci_low``/``ci_high``: 95% interval from the t distribution (needs at least 2 pairs).
    """
    from scipy.special import stdtrit  # t quantiles; scipy comes with scikit-learn

    configs = configs_of(runs, key)
    finished = runs["status"].eq("ok") & np.isfinite(runs[metric].astype(float))
    frame = runs.assign(config=configs.labels, _value=runs[metric].astype(float).where(finished))
    on = list(dict.fromkeys([*shared_columns(configs.context), key, "seed"]))
    grouped = frame[frame["norm"].eq(baseline)].groupby(on, dropna=False)["_value"]
    base = grouped.mean().where(grouped.count().eq(grouped.size())).rename("_baseline")
    pairs = frame[frame["norm"].ne(baseline) & finished].merge(
        base.dropna().reset_index(), on=on, validate="many_to_one"
    )
    pairs["diff"] = pairs["_value"] - pairs["_baseline"]
    table = (
        pairs.groupby(["config", key], dropna=False, observed=True)
        .agg(norm=("norm", "first"), mean=("diff", "mean"), std=("diff", "std"), n=("diff", "size"))
        .reset_index()
    )
    half = stdtrit(np.maximum(table["n"] - 1, 1), 0.975) * table["std"] / np.sqrt(table["n"])
    table["ci_low"] = table["mean"] - half
    table["ci_high"] = table["mean"] + half
    return table


def diagnostics_summary(runs: pd.DataFrame, diagnostics: pd.DataFrame) -> pd.DataFrame:
    """Per configuration and layer: mean gradient norm, final input std, percentile drift.

    Drift is a run's largest departure from its first record (a percentile that dips and
    comes back still drifted), averaged over seeds; "final" values are each run's last record
    averaged over seeds.
    """
    labels = configs_of(runs, "seed").labels
    frame = diagnostics.merge(runs[["run_id"]].assign(config=labels), on="run_id")
    keys = ["config", "layer", "quantity"]
    first = frame.groupby([*keys, "run_id"], sort=False, observed=True)["value"].transform("first")
    frame = frame.assign(departure=(frame["value"] - first).abs())
    per_run = frame.groupby([*keys, "run_id"], sort=False, observed=True).agg(
        last=("value", "last"), mean=("value", "mean"), drift=("departure", "max")
    )
    per_config = per_run.groupby(keys, observed=True).mean()
    table = pd.concat(
        [
            per_config["mean"].unstack("quantity").reindex(columns=["grad_norm"]),
            per_config["last"].unstack("quantity").reindex(columns=["input_std", "eval_gap"]),
            per_config["drift"]
            .unstack("quantity")
            .reindex(columns=list(PERCENTILES))
            .add_prefix("drift_"),
        ],
        axis=1,
    ).reset_index()
    order = table["layer"].map(layer_order)
    return table.assign(_order=order).sort_values(["config", "_order"]).drop(columns="_order")


def layer_order(layer: str) -> tuple[int, str]:
    """Sort key: block2 before block10."""
    digits = re.search(r"\d+$", layer)
    return (int(digits.group()) if digits else -1, layer)


def last_hidden_layer(diagnostics: pd.DataFrame) -> str:
    """The layer whose pre-activation percentiles were recorded (the last one if several)."""
    layers = diagnostics.loc[diagnostics["quantity"].isin(PERCENTILES), "layer"].unique()
    return max(layers, key=layer_order)


# ----------------------------------------------------------------------------- the command


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
) -> None:
    """Summarize every run under ``results_dir`` as tables (``fmt``) and, with ``plot_dir``, PNGs.

    Prints to ``console`` or writes ``output``; warnings and notes go to stderr. ``fmt="csv"``
    holds only the main table (one row per configuration and value of ``by``); the other
    formats hold every table. Raises ConfigError, before printing anything, for an unknown
    metric, key, format, --where value or baseline, and for an unusable path.
    """
    from rich.console import Console

    from normbench import report_render

    if fmt not in FORMATS:
        raise choices_error("format", fmt, FORMATS)
    if metric is not None and metric not in METRICS:
        raise choices_error("metric", metric, METRICS)
    if by == "norm":
        raise ConfigError(
            "--by norm: the norms are already the rows of every table; choose a column key "
            "such as lr, batch_size, seed or a setting like norm.eps"
        )
    results_dir = Path(results_dir)
    _check_paths(results_dir, output and Path(output), plot_dir and Path(plot_dir))
    console = console or Console()
    rows, warnings = load_runs(results_dir, last_row_only=plot_dir is None or diagnostics)
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

    if diagnostics:
        records, warnings = load_diagnostics(runs)
        _warn(warnings)
        if records.empty:
            console.print(NO_DIAGNOSTICS.format(dir=results_dir), markup=False, soft_wrap=True)
            return
        summary = report_render.DiagnosticsReport(diagnostics_summary(runs, records))
    else:
        metric = metric or default_metric(runs)
        lr_study = runs["lr"].nunique() > 1
        summary = report_render.Report(
            metric=metric,
            by=by,
            baseline=baseline,
            cells=summarize(runs, by, metric),
            best_lr=best_lr(runs) if lr_study else None,
            stability=stability(runs, baseline) if lr_study else None,
            paired=paired(runs, by, metric, baseline) if baseline else None,
        )
    report_render.emit(summary, fmt, console, output)
    if output is not None:
        print(f"wrote {output}", file=sys.stderr)
    if plot_dir is not None:
        from normbench import plots

        if diagnostics:
            written = plots.diagnostics_plots(Path(plot_dir), runs, records)
        else:
            curves = rows[rows["run_id"].isin(runs["run_id"])]
            written = plots.result_plots(Path(plot_dir), runs, curves, metric, by)
        print(f"wrote {len(written)} figures to {plot_dir}", file=sys.stderr)


def _check_paths(results_dir: Path, output: Path | None, plot_dir: Path | None) -> None:
    """Refuse paths that would fail only after the tables were printed."""
    if results_dir.exists() and not results_dir.is_dir():
        raise ConfigError(f"--results {results_dir} is a file; give the folder of the results")
    if output is not None and output.is_dir():
        raise ConfigError(f"--output {output} is a folder; give a file name")
    if output is not None and not output.parent.is_dir():
        raise ConfigError(f"--output {output}: {output.parent} is not an existing folder")
    if plot_dir is not None:
        existing = next(path for path in (plot_dir, *plot_dir.parents) if path.exists())
        if not existing.is_dir():
            raise ConfigError(f"--plot {plot_dir}: {existing} is a file, not a folder")


def _warn(warnings: list[str]) -> None:
    """One line on stderr per skipped file (at most MAX_WARNINGS of them)."""
    for line in warnings[:MAX_WARNINGS]:
        print(f"warning: {line}", file=sys.stderr)
    if len(warnings) > MAX_WARNINGS:
        print(
            f"warning: ... and {len(warnings) - MAX_WARNINGS} more skipped files", file=sys.stderr
        )
