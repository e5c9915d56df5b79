"""One sweep job, in whichever process the launcher chose, and the record it leaves.

A job is one run, or with stacking a group of runs that differ only in lr and seed. Hydra
drops a job's return value (except for sweepers that optimize it) and skips its end-of-sweep
callback when a job fails, so each job writes ``job.json`` into its own Hydra output folder:
what it ran and how each run ended. The sweep's summary is read from those records, which
works the same under every sweeper and launcher.
"""

from __future__ import annotations

import json
import math
import os
import signal
import socket
import threading
from collections.abc import Mapping
from contextlib import suppress
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from normbench import results
from normbench.app import override_key

JOB_RECORD = "job.json"
# Set by a sweep to "host:pid": its workers on that host stop when it is gone (watch_parent).
PARENT_PID_ENV = "NORMBENCH_SWEEP_PID"
_MEMBER_KEYS = ("lr", "seed", "stack_members")  # a run's own; a group's
_watching = threading.Event()  # this process already watches its sweep


def run_job(cfg: DictConfig, overrides: list[str], output_dir: Path) -> float | None:
    """Run (or skip) the job's runs; never raises. Returns the objective for optimizing
    sweepers: the final validation accuracy, or minus the validation loss for regression
    (the best member's for a stacked group). None when no run has a finite one (failed or
    diverged): Hydra's Optuna sweeper records a value it cannot cast to float as a failed
    trial and goes on, whereas nan made it crash (it told Optuna the nan with state FAIL).

    Its record holds one entry per run: run_id, lr, seed, status (ok, diverged, stalled,
    failed, skipped, elsewhere), error, objective and the run's own overrides.
    """
    from normbench.engine.lifecycle import run_group

    watch_parent()
    records = [_record(outcome) for outcome in run_group(cfg)]
    for record in records:
        record["overrides"] = _member_overrides(overrides, record)
    with suppress(OSError):  # a full disk: the runs' own files say what failed to be written
        results.atomic_write_text(output_dir / JOB_RECORD, json.dumps({"runs": records}))
    objectives = [r["objective"] for r in records if math.isfinite(r["objective"])]
    return max(objectives, default=None)


def _record(outcome: Any) -> dict[str, Any]:
    done = outcome.status in results.DONE_STATUSES + ("skipped",)
    return {
        "run_id": outcome.run_id,
        "lr": outcome.cfg.lr,
        "seed": outcome.cfg.seed,
        "status": outcome.status,
        "error": outcome.error if outcome.status in ("failed", "elsewhere") else "",
        "objective": _objective(outcome.path) if done else math.nan,
    }


def _objective(run_path: Path) -> float:
    """The final validation accuracy, or minus the validation loss for regression."""
    try:
        last = results.read_last_row(run_path / results.METRICS_FILE)
        acc, loss = float(last["val_acc"] or "nan"), float(last["val_loss"] or "nan")
    except (OSError, KeyError, ValueError):
        return math.nan
    return acc if math.isfinite(acc) else -loss


def _member_overrides(overrides: list[str], record: Mapping[str, object]) -> list[str]:
    """The job's overrides, with a stacked member's own lr and seed in place of the group's."""
    kept = [o for o in overrides if override_key(o) not in _MEMBER_KEYS]
    return [*kept, f"lr={record['lr']}", f"seed={record['seed']}"]


def read_job_records(sweep_dir: Path) -> list[dict]:
    """Every run record under a sweep's Hydra folder (jobs that never ended left none)."""
    runs = []
    for path in sorted(sweep_dir.glob(f"*/{JOB_RECORD}")):
        try:
            runs += json.loads(path.read_text())["runs"]
        except (OSError, ValueError, KeyError):
            continue  # a record being written right now: counted on the next read
    return runs


def parent_id() -> str:
    """This process as the sweep its workers watch: ``host:pid``."""
    return f"{socket.gethostname()}:{os.getpid()}"


def watch_parent(every: float = 1.0) -> None:
    """In a worker on the sweep's host, stop (SIGTERM to itself) once the sweep is gone.

    joblib's workers would otherwise finish their queue after the sweep was killed; the
    run's checkpoint lets the next sweep resume it. A worker on another host (a SLURM task on
    a compute node) cannot see the sweep's process and does not watch it.
    """
    host, _, parent = os.environ.get(PARENT_PID_ENV, "").rpartition(":")
    if not parent.isdigit() or host != socket.gethostname():
        return
    if int(parent) == os.getpid() or _watching.is_set():
        return
    _watching.set()

    def watch() -> None:
        while True:
            try:
                os.kill(int(parent), 0)
            except ProcessLookupError:
                os.kill(os.getpid(), signal.SIGTERM)
                return
            threading.Event().wait(every)

    threading.Thread(target=watch, daemon=True).start()
