"""One sweep job, in whichever process the launcher chose, and the record it leaves.

Hydra drops a job's return value (except for sweepers that optimize it) and skips its
end-of-sweep callback when a job fails, so each job writes ``job.json`` into its own Hydra
output folder: what it ran and how it ended. The sweep's summary is read from those records,
which works the same under every sweeper and launcher.
"""

from __future__ import annotations

import json
import math
import traceback
from collections.abc import Mapping
from pathlib import Path

from omegaconf import DictConfig

from normbench import results
from normbench.errors import ConfigError

JOB_RECORD = "job.json"


def run_job(
    cfg: DictConfig, choices: Mapping[str, str], overrides: list[str], output_dir: Path
) -> float:
    """Run (or skip, when complete) one job; never raises. Returns the objective for
    optimizing sweepers: the final validation accuracy, or minus the validation loss for
    regression (nan when the run failed or diverged).

    A failure is recorded as status ``failed`` with its traceback, so the other jobs go on.
    """
    from normbench.experiment import record_failure, run_experiment

    record = {"overrides": overrides, "run_id": results.run_id(cfg, choices), "error": ""}
    objective = math.nan
    try:
        result = run_experiment(cfg, choices)
        record["status"] = result.status
        objective = _objective(result.rows[-1] if result.rows else {})
    except ConfigError as error:  # raised before run_experiment wrote anything
        record_failure(cfg, choices, error, traceback.format_exc())
        record.update(status="failed", error=str(error))
    except Exception as error:  # run_experiment recorded it, with the epochs it finished
        record.update(status="failed", error=f"{type(error).__name__}: {error}".splitlines()[0])
    results.atomic_write_text(output_dir / JOB_RECORD, json.dumps(record))
    return objective


def _objective(row: Mapping[str, float]) -> float:
    acc = row.get("val_acc", math.nan)
    return acc if isinstance(acc, float) and math.isfinite(acc) else -row.get("val_loss", math.nan)


def read_job_records(sweep_dir: Path) -> list[dict]:
    """Every job record under a sweep's Hydra folder (jobs that never ended left none)."""
    records = []
    for path in sorted(sweep_dir.glob(f"*/{JOB_RECORD}")):
        try:
            records.append(json.loads(path.read_text()))
        except (OSError, ValueError):
            continue  # a record being written right now: counted on the next read
    return records
