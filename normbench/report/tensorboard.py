"""``normbench report --tensorboard DIR``: every run read, as TensorBoard event files.

Per run, one folder ``DIR/<run folder>/`` with one event file: the per-epoch metrics as scalars
(step = epoch) and the run's identity settings (norm, lr, batch_size, seed, every config key)
and status through TensorBoard's HParams API; ``DIR`` itself holds the experiment's HParams
config (every setting and metric), so ``tensorboard --logdir DIR`` lists the runs as a table.
Written with TensorBoard's own EventFileWriter; TensorBoard is an optional extra
(``pip install -e ".[tensorboard]"``), imported only here.

Rerunning into the same DIR replaces, never adds: the event files of each run written (and the
experiment's) are removed before the new one is written. Folders of runs not read this time
(another --where) are left as they are.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd

from normbench.report.load import RUN_DIR, key_columns

INSTALL = 'pip install -e ".[tensorboard]"'
# Per-epoch scalars, as tagged in TensorBoard; test_* exist only at the last epoch.
SCALARS = (
    "train_loss", "train_acc", "val_loss", "val_acc", "test_loss", "test_acc",
    "grad_norm", "lr_now", "epoch_seconds",
)  # fmt: skip
EVENTS_PREFIX = "events.out.tfevents."


def available() -> bool:
    from importlib.util import find_spec

    return find_spec("tensorboard") is not None


def export(out_dir: Path, runs: pd.DataFrame, rows: pd.DataFrame) -> int:
    """Write ``rows`` (every epoch of ``runs``, their final rows) under ``out_dir``.

    Returns the number of runs written. Raises OSError when a file cannot be written.
    """
    from tensorboard.compat.proto.event_pb2 import Event
    from tensorboard.compat.proto.summary_pb2 import Summary
    from tensorboard.plugins.hparams import summary_v2 as hp
    from tensorboard.summary.writer.event_file_writer import EventFileWriter

    settings = [c for c in key_columns(runs) if c != "run_id"] + ["status"]
    values = {run_id: _hparams(row, settings) for run_id, row in _by_run(runs)}
    settings = [name for name in settings if any(name in v for v in values.values())]  # set
    metrics = [m for m in SCALARS if m in rows and rows[m].notna().any()]
    now = time.time()

    def write(folder: Path, summaries: Iterator[tuple[int, Summary]]) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        for old in os.scandir(folder):
            if old.is_file() and old.name.startswith(EVENTS_PREFIX):
                os.remove(old.path)
        writer = EventFileWriter(str(folder), max_queue_size=1000, flush_secs=3600)
        try:
            for step, summary in summaries:
                writer.add_event(Event(wall_time=now, step=step, summary=summary))
        finally:
            writer.close()

    config = hp.hparams_config_pb(
        hparams=[hp.HParam(name, _domain([v[name] for v in values.values() if name in v]))
                 for name in settings],
        metrics=[hp.Metric(m) for m in metrics],
        time_created_secs=now,
    )  # fmt: skip
    write(out_dir, iter([(0, config)]))
    epochs = rows.groupby(RUN_DIR, sort=False)
    for run_id, row in _by_run(runs):
        history = epochs.get_group(row[RUN_DIR]) if row[RUN_DIR] in epochs.groups else rows[:0]

        def summaries(
            run_id: str = run_id, history: pd.DataFrame = history
        ) -> Iterator[tuple[int, Summary]]:
            yield 0, hp.hparams_pb(values[run_id], trial_id=run_id, start_time_secs=now)
            for epoch, line in zip(history["epoch"], history[metrics].to_numpy(), strict=True):
                scalars = [
                    Summary.Value(tag=tag, simple_value=float(value))
                    for tag, value in zip(metrics, line, strict=True)
                    if not pd.isna(value)
                ]
                if scalars and epoch >= 1:
                    yield int(epoch), Summary(value=scalars)

        write(out_dir / os.path.basename(row[RUN_DIR]), summaries())
    return len(values)


def _by_run(runs: pd.DataFrame) -> Iterator[tuple[str, pd.Series]]:
    for _, row in runs.iterrows():
        yield str(row["run_id"]), row


def _hparams(row: pd.Series, settings: list[str]) -> dict[str, bool | float | str]:
    """The run's settings as HParams values (bool, number or text); unset ones left out."""
    out: dict[str, bool | float | str] = {}
    for name in settings:
        value = row[name]
        if isinstance(value, np.generic):
            value = value.item()
        if value is None or (isinstance(value, float) and math.isnan(value)):
            continue
        out[name] = value if isinstance(value, bool | int | float | str) else str(value)
    return out


def _domain(values: list[bool | float | str]) -> object:
    """A Discrete domain of the values a setting takes, when they share one type."""
    from tensorboard.plugins.hparams import summary_v2 as hp

    kinds = {bool if isinstance(v, bool) else str if isinstance(v, str) else float for v in values}
    if len(kinds) != 1:
        return None
    (kind,) = kinds
    return hp.Discrete(sorted({kind(v) for v in values}))
