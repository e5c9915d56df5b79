"""Reading the results of ``normbench report``: every run's metrics.csv, checked, in one parse.

Each metrics.csv is read as text and checked; all files that share a header are parsed in one
``pd.read_csv`` call: ten thousand runs take one parse, not ten thousand. A file that is not
usable (unreadable, cut off, foreign, a value that is not a number where one is expected, an
unknown status) is skipped with a warning naming it.
"""

from __future__ import annotations

import io
import os
import re
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from normbench.results import (
    DIAGNOSTIC_COLUMNS,
    DIAGNOSTICS_FILE,
    KEY_COLUMNS,
    METRIC_COLUMNS,
    METRICS_FILE,
    normalize_value,
)

# The statuses a run's metrics.csv may hold (the shared contract; results.py may not name them
# all yet). A complete run is one of COMPLETE; "running" is rewritten after each epoch.
COMPLETE = ("ok", "diverged", "stalled")
STATUSES = (*COMPLETE, "failed", "running")
# Columns that are measurements or bookkeeping, not hyperparameters: never a table key.
# ``stack_size`` (runs trained side by side in one process) is defined by the shared contract.
NON_KEY_COLUMNS = (*METRIC_COLUMNS, "stack_size")
# Columns that must hold numbers (empty means "not measured").
NUMERIC_COLUMNS = (
    "lr", "batch_size", "seed", "epoch", "step", "train_loss", "train_acc", "val_loss",
    "val_acc", "test_loss", "test_acc", "grad_norm", "lr_now", "epoch_seconds",
)  # fmt: skip
RUN_DIR = "_run_dir"  # the folder each row was read from (internal column)

_QUOTED = re.compile(r'"[^"]*"')


def read_csv_files(
    paths: Sequence[str | Path], required: Sequence[str], last_row_only: bool = False
) -> tuple[pd.DataFrame, list[str]]:
    """Read many small CSV files with one parse per distinct header.

    Files that cannot be read, lack a ``required`` column or are partial (rows that do not
    match the header, no final newline) are skipped with a warning naming them. Missing files
    are skipped silently (a run that has not written one yet). Adds the column RUN_DIR.
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


def key_columns(runs: pd.DataFrame) -> list[str]:
    """Columns that describe a run's configuration (filterable and groupable)."""
    return [c for c in runs.columns if c not in NON_KEY_COLUMNS and c != RUN_DIR]


def load_runs(results_dir: Path, last_row_only: bool = True) -> tuple[pd.DataFrame, list[str]]:
    """Every run's metrics rows under ``results_dir`` (only the final row of each by default).

    Config floats are rounded to 12 significant digits so ``0.30000000000000004`` groups with 0.3.
    """
    paths = [os.path.join(entry.path, METRICS_FILE) for entry in _subdirs(results_dir)]
    frame, warnings = read_csv_files(paths, [*KEY_COLUMNS, "epoch", "status"], last_row_only)
    frame = frame.reindex(columns=[*frame.columns, *(c for c in METRIC_COLUMNS if c not in frame)])
    frame = _drop_files(frame, ~frame["status"].isin(STATUSES), "status is not one of "
                        f"{', '.join(STATUSES)}", warnings)  # fmt: skip
    for column in NUMERIC_COLUMNS:
        numbers = pd.to_numeric(frame[column], errors="coerce")
        bad = numbers.isna() & frame[column].notna()
        frame = _drop_files(frame, bad, f"{column} is not a number", warnings)
        frame[column] = numbers[~bad]
    duplicated = frame[RUN_DIR].ne(frame.groupby("run_id")[RUN_DIR].transform("first"))
    frame = _drop_files(frame, duplicated, "duplicate run_id of another folder", warnings)
    for column in key_columns(frame):
        if pd.api.types.is_float_dtype(frame[column]):
            values = frame[column].dropna().unique()
            frame[column] = frame[column].map({v: normalize_value(v) for v in values})
    return frame.reset_index(drop=True), warnings


def cut_short(runs: pd.DataFrame) -> pd.Series:
    """Final rows whose metrics.csv ends before the run's ``epochs`` yet says it finished
    (ok or stalled): a file that lost its last rows, whose "last epoch" is not the last.

    Only a diverged run stops early by design (its last row is the epoch it diverged in);
    running and failed runs are left out as such. Files without an ``epochs`` column (or
    value) are taken at their word.
    """
    if "epochs" not in runs:
        return pd.Series(False, index=runs.index)
    epochs = pd.to_numeric(runs["epochs"], errors="coerce")
    return runs["status"].isin(("ok", "stalled")) & runs["epoch"].lt(epochs)


def _drop_files(frame: pd.DataFrame, bad: pd.Series, why: str, warnings: list[str]) -> pd.DataFrame:
    """``frame`` without the files that have a ``bad`` row, each named in a warning."""
    folders = frame.loc[bad, RUN_DIR].unique()
    warnings.extend(f"skipped {Path(folder, METRICS_FILE)}: {why}" for folder in folders)
    return frame[~frame[RUN_DIR].isin(folders)]


def _subdirs(results_dir: Path) -> list[os.DirEntry]:
    return sorted((e for e in os.scandir(results_dir) if e.is_dir()), key=lambda e: e.name)


def load_diagnostics(runs: pd.DataFrame) -> tuple[pd.DataFrame, list[str]]:
    """The diagnostics records of ``runs`` (tidy rows, DIAGNOSTIC_COLUMNS), in file order."""
    paths = [Path(folder, DIAGNOSTICS_FILE) for folder in runs[RUN_DIR].unique()]
    frame, warnings = read_csv_files(paths, DIAGNOSTIC_COLUMNS)
    return frame[frame["run_id"].isin(runs["run_id"])], warnings
