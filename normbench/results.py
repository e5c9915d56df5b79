"""Where results live and how they are written.

Layout, one folder per run under ``results_dir``::

    <run_id>/config.yaml       the resolved config
    <run_id>/metrics.csv       one row per epoch; status ``running`` while the run trains
    <run_id>/model.pt          the final model's weights
    <run_id>/diagnostics.csv   per-layer diagnostics, when ``diagnostics=true``
    <run_id>/error.txt         the traceback of a failed run
    <run_id>/checkpoint.pt     the state to resume an interrupted run (or stack) from
    <run_id>/claim.json        which process is running it (normbench.engine.run_claims)

Every file is written to a temporary name, fsynced and renamed into place, so a crash or an
interrupt never leaves a half-written file. metrics.csv is the commit point of an attempt
(:func:`write_run`): a complete result stays until a new complete one replaces it.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import uuid
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import fields, is_dataclass
from pathlib import Path
from typing import IO, Any

from omegaconf import DictConfig, OmegaConf

METRICS_FILE = "metrics.csv"
CONFIG_FILE = "config.yaml"
DIAGNOSTICS_FILE = "diagnostics.csv"
ERROR_FILE = "error.txt"
MODEL_FILE = "model.pt"
CHECKPOINT_FILE = "checkpoint.pt"  # a stack's state, in its first member's folder
# Files of one attempt besides metrics.csv and config.yaml; stale ones go once a new one is in.
_ATTEMPT_FILES = (MODEL_FILE, DIAGNOSTICS_FILE, ERROR_FILE, CHECKPOINT_FILE)

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
# A run's status, in the ``status`` column of metrics.csv (shared contract): ``running`` while it
# trains (rewritten after every epoch), then one of the final ones; the first three are complete.
DONE_STATUSES = ("ok", "diverged", "stalled")
FINAL_STATUSES = (*DONE_STATUSES, "failed")
STATUSES = (*FINAL_STATUSES, "running")


def normalize_value(value: Any) -> Any:
    """Round floats to 12 significant digits: ``range(0.1, 1, 0.1)`` gives 0.30000000000000004."""
    if isinstance(value, float):
        return float(f"{value:.12g}")
    if isinstance(value, list | tuple):
        return [normalize_value(v) for v in value]
    return value


def flat_config(cfg: DictConfig) -> dict[str, Any]:
    """The run's identity as ``{"lr": 0.1, "norm.eps": 1e-05, ...}``.

    Each node's schema says which of its keys are identity (identity_keys): where
    files are and how the run executes are left out.
    """
    return _flatten(cfg, "")


def identity_keys(node: DictConfig) -> set[str]:
    """The keys of ``node`` that are part of a run's identity (its schema says which)."""
    schema = OmegaConf.get_type(node)
    if not is_dataclass(schema):
        return set(node)
    runtime = {f.name for f in fields(schema) if not f.metadata.get("identity", True)}
    return set(node) - runtime


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


def setup_key(cfg: DictConfig) -> str:
    """The run's identity without ``lr`` and ``seed``: equal for the runs of one setup, which
    a stacked sweep trains together."""
    flat = flat_config(cfg)
    return json.dumps({k: v for k, v in flat.items() if k not in ("lr", "seed")}, sort_keys=True)


def run_id(cfg: DictConfig) -> str:
    """A readable id derived from the resolved config: same config, same id.

    Its readable part names the config-group options chosen (``cfg.choices``: ``ioffe_mlp``,
    ``batch_frozen``...), recorded when the config was composed.
    """
    choices = cfg.choices
    flat = flat_config(cfg)
    digest = hashlib.sha1(json.dumps(flat, sort_keys=True).encode()).hexdigest()[:10]
    return (
        f"{choices['model']}-{choices['norm']}-{choices['dataset']}"
        f"-lr{flat['lr']:g}-bs{flat['batch_size']}-s{flat['seed']}-{digest}"
    )


@contextmanager
def atomic_writer(path: Path, mode: str = "w") -> Iterator[IO[Any]]:
    """Open a temporary file beside ``path``; on success fsync it and rename it onto ``path``.

    The file gets mode 0666 minus the umask, as ``open`` would give it. On any exception the
    temporary file is removed and ``path`` is left as it was.
    """
    if not path.parent.exists():  # a file there: the open below says "Not a directory"
        path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    except OSError as error:
        error.filename = str(path)  # the file a user knows, not its temporary name
        raise
    try:
        with open(fd, mode, newline=None if "b" in mode else "") as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except OSError as error:
        tmp.unlink(missing_ok=True)
        error.filename = str(path)  # the file a user knows, not its temporary name
        raise
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if hasattr(os, "O_DIRECTORY"):  # make the rename itself durable (POSIX)
        folder = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(folder)
        finally:
            os.close(folder)


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically (see :func:`atomic_writer`)."""
    with atomic_writer(path) as handle:
        handle.write(text)


def atomic_write_csv(path: Path, rows: Iterable[Mapping[str, Any]], columns: list[str]) -> None:
    """Write rows as CSV with pandas, atomically; ``columns`` fixes the order of known columns."""
    import pandas as pd

    rows = list(rows)
    present = dict.fromkeys(key for row in rows for key in row)
    ordered = [c for c in columns if c in present] + [c for c in present if c not in columns]
    atomic_write_text(path, pd.DataFrame(rows, columns=ordered).to_csv(index=False))


def write_progress(run_path: Path, rows: Iterable[Mapping[str, Any]], columns: list[str]) -> bool:
    """Rewrite metrics.csv with status ``running`` after an epoch of a run still training.

    A complete result already there (a forced rerun) is kept instead: it is replaced only by
    :func:`write_run` with the new complete one. Returns whether metrics.csv was written.
    """
    if is_complete(run_path):
        return False
    atomic_write_csv(run_path / METRICS_FILE, _stamped(rows, "running", ""), columns)
    return True


def write_run(
    run_path: Path,
    config_yaml: str,
    rows: Iterable[Mapping[str, Any]],
    columns: list[str],
    status: str,
    error: str = "",
    error_trace: str | None = None,
    diagnostics_writer: Callable[[Path], None] | None = None,
    weights_writer: Callable[[Path], None] | None = None,
    keep: Collection[str] = (),
) -> bool:
    """Write a finished attempt so that a reader always sees an old or a new whole result.

    ``status`` (ok, diverged, stalled or failed) and the first line of ``error`` are stamped
    on every row. The order: config.yaml, model.pt (``weights_writer(path)``),
    diagnostics.csv (``diagnostics_writer(path)``), error.txt (``error_trace``), each replaced
    atomically; then metrics.csv, the commit point; then the earlier attempt's leftovers this
    one did not replace, and the checkpoint (unless named in ``keep``, or the attempt failed),
    are removed. A failed attempt never replaces a complete result: then nothing is written
    and the return value is False.
    """
    if status not in FINAL_STATUSES:
        raise ValueError(f"status {status!r} is not final; choose from {FINAL_STATUSES}")
    if status not in DONE_STATUSES and is_complete(run_path):
        return False
    written = {CONFIG_FILE, METRICS_FILE}
    atomic_write_text(run_path / CONFIG_FILE, config_yaml)
    for name, writer in ((MODEL_FILE, weights_writer), (DIAGNOSTICS_FILE, diagnostics_writer)):
        if writer is not None:
            writer(run_path / name)
            written.add(name)
    if error_trace is not None:
        atomic_write_text(run_path / ERROR_FILE, error_trace)
        written.add(ERROR_FILE)
    atomic_write_csv(run_path / METRICS_FILE, _stamped(rows, status, error), columns)
    if status == "failed":  # a retry resumes from the checkpoint the failed attempt reached
        written.add(CHECKPOINT_FILE)
    clear_run(run_path, keep={*written, *keep})
    return True


def _stamped(rows: Iterable[Mapping[str, Any]], status: str, error: str) -> list[dict[str, Any]]:
    line = error.splitlines()[0] if error else ""
    return [{**row, "status": status, "error": line} for row in rows]


def is_complete(run_path: Path, diagnostics: bool = False) -> bool:
    """True when the run finished (ok, diverged, stalled) with every output asked for.

    Failed, running or interrupted runs are not; nor is a finished run without the diagnostics.csv
    that ``diagnostics`` asks for (rerunning it completes it).
    """
    metrics = run_path / METRICS_FILE
    if diagnostics and not (run_path / DIAGNOSTICS_FILE).is_file():
        return False
    return metrics.is_file() and read_status(metrics) in DONE_STATUSES


def read_last_row(metrics: Path) -> dict[str, str]:
    """The last row of a metrics.csv, as text (empty when the file has no rows)."""
    with metrics.open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    return rows[-1] if rows else {}


def read_status(metrics: Path) -> str:
    """The run's status from its metrics.csv (its last row); ``unreadable`` if there is none."""
    return read_last_row(metrics).get("status") or "unreadable"


def clear_run(run_path: Path, keep: Collection[str] = ()) -> None:
    """Remove an earlier attempt's side files not in ``keep``, and temporary files a kill left.

    Never metrics.csv or config.yaml. :func:`write_run` calls it once the new metrics.csv is
    in place, so a complete result is never left without its files, nor with another's.
    """
    for name in _ATTEMPT_FILES:
        if name not in keep:
            (run_path / name).unlink(missing_ok=True)
    for leftover in run_path.glob(".*.tmp"):
        leftover.unlink(missing_ok=True)
