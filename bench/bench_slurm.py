"""A SLURM sweep's cost on a real cluster: per-task overhead and the sweep's wall time.

Runs one ``normbench sweep ... hydra/launcher=submitit_slurm`` (12 one-epoch runs on the toy
data by default: 4 norms x 3 learning rates) into a temporary results folder, then reads, per
task, sacct's Submit and Start times, submitit's log (when Python was up, when the job was
composed, when it ended) and the run's own epoch seconds. The overhead of a task is the time
from its start (sacct) to the end of its job less the training: Python start, imports,
unpickling, composing, checking and loading data, writing results. Prints the load average
before and after: on a shared machine the figures move with it.

Needs a cluster (scripts/slurm-cluster.sh start). Run: python bench/bench_slurm.py [OVERRIDES]
"""

from __future__ import annotations

import csv
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

DEFAULT = [
    "norm=batch,layer,group,none", "lr=0.01,0.1,1.0", "epochs=1", "quiet=true",
    "dataset.limit=240", "model.hidden=[32,16]", "stall_margin=0.0",
    "hydra.launcher.cpus_per_task=1",
]  # fmt: skip
_STAMP = re.compile(r"\((\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3})\) - (.*)")


def _stamps(log: Path) -> dict[str, float]:
    """submitit's log lines of interest, by their first words, as times (epoch seconds)."""
    found: dict[str, float] = {}
    for line in log.read_text().splitlines():
        match = _STAMP.search(line)
        if not match:
            continue
        when = datetime.strptime(match[1], "%Y-%m-%d %H:%M:%S,%f").timestamp()
        for key in ("Starting with", "normbench: process up", "normbench: job ran"):
            if match[2].startswith(key):
                found.setdefault(key, when)
    return found


def _sacct(array_id: str) -> dict[str, dict[str, str]]:
    out = subprocess.run(
        ["sacct", "-X", "-n", "-P", "-o", "JobID,Submit,Start,End,State", "-j", array_id],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    rows = {}
    for line in out.splitlines():
        job_id, submit, start, end, state = line.split("|")
        rows[job_id] = {"submit": submit, "start": start, "end": end, "state": state}
    return rows


def _when(text: str) -> float:
    return datetime.strptime(text, "%Y-%m-%dT%H:%M:%S").timestamp()


def main(overrides: list[str]) -> None:
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        results = Path(tmp) / "results"
        command = [
            sys.executable, "-m", "normbench", "sweep", "hydra/launcher=submitit_slurm",
            f"results_dir={results}", *overrides,
        ]  # fmt: skip
        began = time.monotonic()
        done = subprocess.run(command, capture_output=True, text=True, cwd=tmp)
        wall = time.monotonic() - began
        if done.returncode != 0:
            print(done.stdout, done.stderr)
            raise SystemExit(f"the sweep exited {done.returncode}")
        logs = sorted(results.glob(".sweeps/*/.submitit/*/*_0_log.out"))
        array_id = logs[0].parent.name.split("_")[0]
        states = _sacct(array_id)
        train = {}
        for metrics in results.glob("*/metrics.csv"):
            with metrics.open() as f:
                seconds = [float(row["epoch_seconds"]) for row in csv.DictReader(f)]
            train[metrics.parent.name] = sum(seconds)
        overheads, pythons, waits = [], [], []
        for log in logs:
            stamps = _stamps(log)
            row = states[log.parent.name]
            start = _when(row["start"])
            waits.append(start - _when(row["submit"]))
            pythons.append(stamps["normbench: process up"] - start)
            overheads.append(stamps["normbench: job ran"] - start)
        training = statistics.mean(train.values())
    load_after = os.getloadavg()
    print(f"sweep: {len(logs)} tasks, wall {wall:.1f} s (normbench sweep start to exit)")
    print(f"per task, mean (max): start to composing {statistics.mean(pythons):.1f} "
          f"({max(pythons):.1f}) s; start to job end {statistics.mean(overheads):.1f} "
          f"({max(overheads):.1f}) s, of which training {training:.2f} s; "
          f"submit to start {statistics.mean(waits):.1f} ({max(waits):.1f}) s")
    print(f"overhead per task (start to job end, less training): "
          f"{statistics.mean(overheads) - training:.1f} s")
    print(f"load average before {load_before[0]:.2f} / after {load_after[0]:.2f} "
          f"({os.cpu_count()} cores)")


if __name__ == "__main__":
    main(sys.argv[1:] or DEFAULT)
