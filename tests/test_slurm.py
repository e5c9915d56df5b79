"""Sweeps on a real SLURM cluster (``scripts/slurm-cluster.sh start``; .ci/run starts one).

Marked ``slurm``; skipped when no controller answers. They share the one-node cluster and
keep runs tiny: what they test is what the scheduler does to a sweep (a task cancelled, timed
out, the sweep interrupted, accounting unreadable), not training.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from normbench import slurm

# A run that trains a few seconds: time to cancel or signal it after its first epoch.
SLOW = ["epochs=3", "quiet=true", "dataset.train_size=4000", "batch_size=4", "stall_margin=0.0"]
SLOW += ["checkpoint_seconds=0"]  # rows and a checkpoint after every epoch: something to resume
LAUNCHER = ["hydra/launcher=submitit_slurm", "hydra.launcher.cpus_per_task=1"]


def _answers(command: list[str]) -> bool:
    try:
        return subprocess.run(command, capture_output=True, timeout=20).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


@pytest.fixture(scope="module")
def cluster() -> None:
    """A SLURM controller that answers, with an idle node (one cluster for the module)."""
    if not (_answers(["scontrol", "ping"]) and _answers(["sinfo", "-h"])):
        pytest.skip("no SLURM controller answers (start one: scripts/slurm-cluster.sh start)")


def _sweep(results: Path, *args: str, env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "normbench", "sweep", *LAUNCHER, f"results_dir={results}", *args],
        cwd=results.parent,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )


def _finish(process: subprocess.Popen, timeout: float = 120) -> tuple[int, str]:
    out, err = process.communicate(timeout=timeout)
    return process.returncode, out + err


def _started(results: Path, timeout: float = 90) -> str:
    """The SLURM id of the sweep's first task, once its run has finished an epoch."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if list(results.glob("*/metrics.csv")):
            return _tasks_submitted(results)[0]
        time.sleep(0.2)
    raise AssertionError("no run started training")


def _flat(output: str) -> str:
    """The output with rich's line wrapping undone (any run of spaces is one)."""
    return " ".join(output.split())


def _queued(array_id: str) -> str:
    return subprocess.run(
        ["squeue", "-h", "-j", array_id, "-o", "%i %T"], capture_output=True, text=True
    ).stdout.strip()


def _tasks_submitted(results: Path) -> list[str]:
    """The SLURM ids of the tasks that started (``7_0``; ``7`` for an array of one)."""
    return sorted({p.parent.name for p in results.glob(".sweeps/*/.submitit/*/*_log.out")})


@pytest.mark.slurm
def test_slurm_cancelled_task_is_a_missing_run_and_the_rerun_submits_only_it(
    cluster: None, tmp_path: Path
) -> None:
    results = tmp_path / "results"
    process = _sweep(results, "norm=batch,none", *SLOW)
    task = _started(results)
    subprocess.run(["scancel", task], check=True)
    rc, output = _finish(process)
    assert rc == 1, output
    assert "Traceback" not in output and "UncompletedJobError" not in output
    assert "sweep: 2 jobs" in output
    assert f"CANCELLED by {os.getuid()} (SLURM job {task})" in _flat(output)
    missing = [line for line in output.splitlines() if line.startswith("missing")]
    assert len(missing) == 1, output
    # the rerun submits only the cancelled run (the other is complete), which resumes
    before = _tasks_submitted(results)
    rc, output = _finish(_sweep(results, "norm=batch,none", *SLOW))
    assert rc == 0, output
    assert "submitted 1 task as SLURM job" in output
    assert "│  1 │        0 │       0 │      0 │       1 │         0 │       0 │" in output
    [new] = [t for t in _tasks_submitted(results) if t not in before]
    names = subprocess.run(
        ["sacct", "-X", "-n", "-P", "-o", "JobName", "-j", new], capture_output=True, text=True
    ).stdout.split()
    assert names == ["normbench"]
    log = next(results.glob(f".sweeps/*/.submitit/{new}/*_log.out")).read_text()
    assert "normbench: process up" in log and "Job completed successfully" in log  # not cut off


@pytest.mark.slurm
def test_slurm_interrupted_sweep_cancels_its_array_and_a_rerun_trains(
    cluster: None, tmp_path: Path
) -> None:
    results = tmp_path / "results"
    process = _sweep(results, "norm=batch", *SLOW)
    task = _started(results)
    process.send_signal(signal.SIGINT)
    rc, output = _finish(process, timeout=90)
    assert rc == 130, output
    assert "cancelled SLURM job" in output
    assert _queued(task.split("_")[0]) == ""  # no task left running
    [run] = [p for p in results.iterdir() if p.name != ".sweeps"]
    assert not (run / "claim.json").exists()  # the task gave its claim back
    rc, output = _finish(_sweep(results, "norm=batch", *SLOW))
    assert rc == 0, output
    assert "elsewhere" not in output.split("disk:")[-1]
    assert "│  1 │        0 │       0 │      0 │       0 │         0 │       0 │" in output


@pytest.mark.slurm
def test_slurm_timed_out_task_is_requeued_and_resumes(cluster: None, tmp_path: Path) -> None:
    """A time-out warning (submitit's signal, as SLURM sends it ``signal_delay_s`` before the
    limit) requeues the task; the run goes on from its checkpoint."""
    results = tmp_path / "results"
    process = _sweep(results, "norm=batch", "hydra.launcher.timeout_min=2", *SLOW)
    task = _started(results)
    script = next(results.glob(".sweeps/*/.submitit/*/*_submission.sh")).read_text()
    assert "--signal=USR2@30" in script  # a quarter of 2 minutes, not 120 s
    subprocess.run(["scancel", "--signal=USR2", task], check=True)
    rc, output = _finish(process)
    assert rc == 0, output
    history = subprocess.run(
        ["sacct", "-D", "-X", "-n", "-P", "-o", "State", "-j", task], capture_output=True, text=True
    ).stdout.split()
    assert history[0] == "REQUEUED" and history[-1] in ("COMPLETED", "RUNNING"), history
    [metrics] = results.glob("*/metrics.csv")
    epochs = [line.split(",")[9] for line in metrics.read_text().splitlines()[1:]]
    assert epochs == ["1", "2", "3"]


@pytest.mark.slurm
def test_slurm_unreadable_job_states_do_not_hang_the_sweep(
    cluster: None, tmp_path: Path
) -> None:
    """sacct failing (no accounting): a task that dies without a result is reported once its
    task has left squeue, and the sweep says once that states could not be read."""
    shims = tmp_path / "bin"
    shims.mkdir()
    sacct = shims / "sacct"
    sacct.write_text("#!/bin/sh\necho 'Slurm accounting storage is disabled' >&2\nexit 1\n")
    sacct.chmod(0o755)
    env = {**os.environ, "PATH": f"{shims}:{os.environ['PATH']}", slurm.GRACE_ENV: "3"}
    results = tmp_path / "results"
    process = _sweep(results, "norm=batch", *SLOW, env=env)
    task = _started(results)
    subprocess.run(["scancel", "--signal=KILL", task], check=True)  # dies, leaving no result
    rc, output = _finish(process, timeout=90)
    assert rc == 1, output
    assert output.count("cannot read job states from sacct") == 1, output
    assert "left the queue without a result" in _flat(output) and task in output
    assert "Traceback" not in output


@pytest.mark.slurm
def test_slurm_out_of_memory_task_is_a_failed_run(cluster: None, tmp_path: Path) -> None:
    config = subprocess.run(["scontrol", "show", "config"], capture_output=True, text=True)
    if "task/cgroup" not in config.stdout:
        pytest.skip("this cluster does not enforce memory limits (TaskPlugin is not task/cgroup)")
    results = tmp_path / "results"
    tiny = ["epochs=1", "quiet=true", "dataset.limit=240", "stall_margin=0.0"]
    rc, output = _finish(_sweep(results, "norm=batch", "hydra.launcher.mem_per_cpu=100M", *tiny))
    assert rc == 1, output
    assert "Traceback" not in output
    [task] = _tasks_submitted(results)
    failed = [line for line in output.splitlines() if line.startswith("failed")]
    assert len(failed) == 1, output
    assert f"OUT_OF_MEMORY (SLURM job {task})" in _flat(output)


def test_signal_delay_leaves_small_time_limits_usable() -> None:
    assert slurm.signal_delay(60, 120) == 120
    assert slurm.signal_delay(2, 120) == 30
    assert slurm.signal_delay(1, 120) == 15
    assert slurm.signal_delay(1, 5) == 5


def test_scheduler_states_become_summary_lines(tmp_path: Path) -> None:
    folder = tmp_path / slurm.TASKS_DIR
    folder.mkdir()
    for job_id, state in (("7_0", "TIMEOUT"), ("7_1", "OUT_OF_MEMORY"), ("7_2", "NODE_FAIL")):
        record = {"job_id": job_id, "state": state, "overrides": [f"seed={job_id[-1]}"]}
        (folder / f"{job_id}.json").write_text(json.dumps(record))
    added, lines = slurm.scheduler_records([], [], tmp_path)
    assert added == []
    assert lines == [
        "missing seed=0: timed out (SLURM job 7_0), resumable: rerun the command",
        "failed seed=1: OUT_OF_MEMORY (SLURM job 7_1); ask for more with hydra.launcher.mem_gb",
        "missing seed=2: NODE_FAIL (SLURM job 7_2)",
    ]


def test_the_watchdog_leaves_tasks_on_another_host_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    """A task on a compute node cannot see the sweep's PID: it must not take it for dead."""
    import threading

    from normbench import jobs

    monkeypatch.setattr(jobs, "_watching", threading.Event())
    monkeypatch.setenv(jobs.PARENT_PID_ENV, "another-host:1")
    jobs.watch_parent()
    assert not jobs._watching.is_set()
    monkeypatch.setenv(jobs.PARENT_PID_ENV, "2147483647")  # no host: not a sweep's
    jobs.watch_parent()
    assert not jobs._watching.is_set()
    assert jobs.parent_id().endswith(f":{os.getpid()}")


def test_a_silent_controller_ends_the_wait_after_a_bounded_time(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Neither squeue nor sacct answers: the wait says so once and gives up, never hangs."""
    from types import SimpleNamespace

    for name in ("squeue", "sacct"):
        shim = tmp_path / name
        shim.write_text("#!/bin/sh\necho 'Unable to contact slurm controller' >&2\nexit 1\n")
        shim.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:{os.environ['PATH']}")
    job = SimpleNamespace(job_id="77_0", paths=SimpleNamespace(result_pickle=tmp_path / "r.pkl"))
    started = time.monotonic()
    ended = slurm.wait([job], poll_s=0.05, unanswered_s=1)
    assert time.monotonic() - started < 10
    assert ended == {"77_0": "no answer from squeue for 1 s"}
    assert capsys.readouterr().err.count("squeue does not answer") == 1
