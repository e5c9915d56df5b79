"""Where results live and how they are written.

Layout, one folder per run under ``results_dir``::

    <run_id>/config.yaml       the resolved config
    <run_id>/metrics.csv       one row per epoch (written last: its presence marks the run done)
    <run_id>/diagnostics.csv   per-layer diagnostics, when ``diagnostics=true``
    <run_id>/error.txt         the traceback of a failed run

Every file is written to a temporary name and renamed into place, so a crash or an
interrupt never leaves a half-written file that looks complete.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import tempfile
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from normbench.config import identity_keys

METRICS_FILE = "metrics.csv"
CONFIG_FILE = "config.yaml"
DIAGNOSTICS_FILE = "diagnostics.csv"
ERROR_FILE = "error.txt"

# The first columns of metrics.csv; the flattened config (``model.hidden``, ``norm.eps``, ...)
# follows them so that any hyperparameter can be filtered or grouped on.
KEY_COLUMNS = [
    "run_id",
    "model",
    "norm",
    "dataset",
    "optimizer",
    "task",
    "lr",
    "batch_size",
    "seed",
]
METRIC_COLUMNS = [
    "epoch",
    "step",
    "train_loss",
    "train_acc",
    "val_loss",
    "val_acc",
    "test_loss",
    "test_acc",
    "grad_norm",
    "lr_now",
    "epoch_seconds",
    "status",
    "error",
]
DIAGNOSTIC_COLUMNS = ["run_id", "epoch", "step", "layer", "quantity", "value"]
# The recorded percentiles of the last hidden layer's pre-activation (Ioffe & Szegedy Fig. 1).
PERCENTILES = {"preact_p15": 0.15, "preact_p50": 0.50, "preact_p85": 0.85}
DONE_STATUSES = ("ok", "diverged", "stalled")

def normalize_value(value: Any) -> Any:
    """Round floats to 12 significant digits: ``range(0.1, 1, 0.1)`` gives 0.30000000000000004."""
    if isinstance(value, float):
        return float(f"{value:.12g}")
    if isinstance(value, list | tuple):
        return [normalize_value(v) for v in value]
    return value


def flat_config(cfg: DictConfig) -> dict[str, Any]:
    """The run's identity as ``{"lr": 0.1, "norm.eps": 1e-05, ...}``.

    Each node's schema says which of its keys are identity (config.identity_keys): where
    files are and how the run executes are left out.
    """
    return _flatten(cfg, "")


def _flatten(node: DictConfig, prefix: str) -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key in sorted(identity_keys(node), key=list(node).index):
        if key == "hydra":
            continue
        value = node[key]
        if isinstance(value, DictConfig):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            plain = OmegaConf.to_container(value) if OmegaConf.is_config(value) else value
            flat[f"{prefix}{key}"] = normalize_value(plain)
    return flat


def run_id(cfg: DictConfig, choices: Mapping[str, str]) -> str:
    """A readable id derived from the resolved config: same config, same id.

    ``choices`` are the config-group choices (``{"model": "mlp", "norm": "batch", ...}``).
    """
    flat = flat_config(cfg)
    digest = hashlib.sha1(json.dumps(flat, sort_keys=True).encode()).hexdigest()[:10]
    return (
        f"{choices['model']}-{choices['norm']}-{choices['dataset']}"
        f"-lr{flat['lr']:g}-bs{flat['batch_size']}-s{flat['seed']}-{digest}"
    )


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file in the same folder, then rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", newline="") as handle:
            handle.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_csv(path: Path, rows: Iterable[Mapping[str, Any]], columns: list[str]) -> None:
    """Write rows as CSV with pandas, atomically; ``columns`` fixes the order of known columns."""
    import pandas as pd

    frame = pd.DataFrame(list(rows))
    ordered = [c for c in columns if c in frame.columns]
    frame = frame[ordered + [c for c in frame.columns if c not in ordered]]
    atomic_write_text(path, frame.to_csv(index=False))


def is_complete(run_path: Path, diagnostics: bool = False) -> bool:
    """True when the run finished (ok, diverged, stalled) with every output asked for.

    Failed or interrupted runs are not; nor is a finished run without the diagnostics.csv
    that ``diagnostics`` asks for (rerunning it completes it).
    """
    metrics = run_path / METRICS_FILE
    if diagnostics and not (run_path / DIAGNOSTICS_FILE).is_file():
        return False
    return metrics.is_file() and read_status(metrics) in DONE_STATUSES


def read_status(metrics: Path) -> str:
    """The run's status from its metrics.csv (its last row); ``unreadable`` if there is none."""
    with metrics.open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    return (rows[-1].get("status") or "unreadable") if rows else "unreadable"


def read_error(run_path: Path) -> str:
    """A failed run's one-line error message."""
    with (run_path / METRICS_FILE).open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    return rows[-1].get("error", "") if rows else ""


def clear_run(run_path: Path) -> None:
    """Remove the marker and leftovers of an earlier attempt before a rerun writes new ones."""
    for name in (METRICS_FILE, DIAGNOSTICS_FILE, ERROR_FILE):
        (run_path / name).unlink(missing_ok=True)
