"""SLURM sweeps (``hydra/launcher=submitit_slurm``): the job array's life as the scheduler sees it.

``normbench sweep`` runs hydra-submitit-launcher's SLURM launcher through a subclass,
:class:`SlurmArrayLauncher` (as ``hydra_plugins.normbench_slurm.SlurmLauncher``: the sweep sets
the launcher's ``_target_``), which changes what happens around the array, never in a run:

- runs the plan found complete are not submitted (each would cost a task's start-up);
- the sweep waits on the tasks itself: their result files, the queue (``squeue``) and the
  accounting (``sacct``) every 2 to 30 s, so a task the scheduler ended without a result
  (cancelled, timed out, out of memory) becomes a line of the summary with its state and job
  id, never a traceback, and no state that cannot be read makes the wait endless;
- Ctrl-C or SIGTERM of the sweep cancels its array (``scancel``) before the sweep exits, and
  a task that is sent SIGTERM unwinds, giving its runs' claims back (their checkpoints stay),
  so a rerun trains them instead of finding them ``elsewhere``;
- the time-limit warning (``signal_delay_s``) is never more than a quarter of ``timeout_min``,
  and a task that times out is requeued by submitit (``max_num_timeout``, 3 unless set); the
  requeued task resumes its runs from their checkpoints;
- jobs are named ``normbench`` and submitit's own log goes on past "Loading pickle".
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from hydra.core.utils import JobReturn, JobStatus
from hydra_plugins.hydra_submitit_launcher import submitit_launcher

LAUNCHER = "submitit_slurm"
JOB_NAME = "normbench"
MAX_NUM_TIMEOUT = 3  # requeues after a time-out (submitit's max_num_timeout) unless set
SKIP_FILE = "skip.json"  # in the sweep folder: the grid cells the plan found complete
TASKS_DIR = ".scheduler"  # in the sweep folder: one file per task that ended without a result
# Seconds to wait for a task's result file once it left the queue (a slow shared file system).
GRACE_ENV = "NORMBENCH_SLURM_GRACE_S"
# States in which a task may still produce its result (sacct's and squeue's spellings).
_LIVE = {
    "PENDING", "RUNNING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "COMPLETING",
    "CONFIGURING", "SUSPENDED", "RESIZING", "PREEMPTED", "SIGNALING", "STAGE_OUT", "UNKNOWN",
}  # fmt: skip
_FAILED = ("FAILED", "OUT_OF_MEMORY")  # the task itself broke: a rerun would break again
# Ended, but a result may still appear (on a slow shared file system): waited for.
_MAY_HAVE_RESULT = ("GONE", "COMPLETED", "FAILED")


def sweep_settings(keys: set[str]) -> list[str]:
    """The overrides a SLURM sweep adds, each unless the command line sets that key."""
    settings = {
        "hydra.launcher._target_": "hydra_plugins.normbench_slurm.SlurmLauncher",
        "hydra.launcher.name": JOB_NAME,  # else the task function's module: "app"
        "hydra.launcher.max_num_timeout": str(MAX_NUM_TIMEOUT),
        # normbench's "disabled" job logging would silence submitit's logger in the task too
        "hydra.job_logging.disable_existing_loggers": "false",
    }
    return [f"{key}={value}" for key, value in settings.items() if key not in keys]


def signal_delay(timeout_min: float, requested_s: int) -> int:
    """Seconds before the time limit at which SLURM warns the task (submitit's signal, USR2):
    at most a quarter of the limit, so that a short limit does not warn the task as it starts
    (SLURM may still warn up to a minute early)."""
    return max(1, min(int(requested_s), int(timeout_min * 60 / 4)))


def cell_key(overrides: Iterable[str]) -> frozenset[str]:
    """A grid cell by its own overrides, without those every job gets (quiet, hydra.*...)."""
    from normbench.sweep import _is_setting

    return frozenset(o for o in overrides if not _is_setting(o))


def write_skip(sweep_dir: Path, cells: Iterable[Sequence[str]]) -> None:
    """Tell the launcher which grid cells not to submit (their runs are complete)."""
    sweep_dir.mkdir(parents=True, exist_ok=True)
    (sweep_dir / SKIP_FILE).write_text(json.dumps([sorted(cell_key(c)) for c in cells]))


def read_skip(sweep_dir: Path) -> set[frozenset[str]]:
    """The cells :func:`write_skip` wrote (none when it did not)."""
    try:
        return {frozenset(cell) for cell in json.loads((sweep_dir / SKIP_FILE).read_text())}
    except (OSError, ValueError):
        return set()


class SlurmArrayLauncher(submitit_launcher.SlurmLauncher):
    """hydra-submitit-launcher's SLURM launcher, waiting on its array as described above."""

    def __init__(self, **params: Any) -> None:
        super().__init__(**params)
        requested = self.params.get("signal_delay_s", 120)
        self.params["signal_delay_s"] = signal_delay(self.params["timeout_min"], requested)

    def __call__(self, *args: Any, **kwargs: Any) -> JobReturn:
        """In the task: unwind on SIGTERM, log the start-up time, run the job."""
        from submitit.core import logger

        signal.signal(signal.SIGTERM, _unwind)  # after submitit's handlers (it ignores SIGTERM)
        log = logger.get_logger()
        started = time.time()
        log.info(f"normbench: process up {started - _process_start():.1f} s; composing the job")
        try:
            return super().__call__(*args, **kwargs)
        finally:
            log.info(f"normbench: job ran {time.time() - started:.1f} s")

    def launch(
        self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int
    ) -> Sequence[JobReturn]:
        from hydra.core.singleton import Singleton

        assert self.config is not None
        sweep_dir = Path(str(self.config.hydra.sweep.dir))
        sweep_dir.mkdir(parents=True, exist_ok=True)
        if "mode" in self.config.hydra.sweep:  # as the parent's launch()
            os.chmod(sweep_dir, mode=int(str(self.config.hydra.sweep.mode), 8))
        skip = read_skip(sweep_dir)
        state = Singleton.get_state()
        job_params = [
            (list(overrides), "hydra.sweep.dir", index, f"job_id_for_{index}", state)
            for index, overrides in enumerate(job_overrides, initial_job_idx)
            if cell_key(overrides) not in skip
        ]
        if not job_params:
            return []
        executor = self._executor()
        jobs = executor.map_array(self, *zip(*job_params, strict=True))
        tasks = f"{len(jobs)} task{'s' if len(jobs) > 1 else ''}"
        _say(f"submitted {tasks} as SLURM job {_array_id(jobs)} ({JOB_NAME})")
        try:
            ended = wait(jobs)
        except KeyboardInterrupt:
            cancel(jobs)
            raise
        return [
            _job_return(job, params[0], ended.get(job.job_id), sweep_dir)
            for job, params in zip(jobs, job_params, strict=True)
        ]

    def _executor(self) -> Any:
        """submitit's executor with the launcher's parameters (as the parent's launch())."""
        import submitit
        from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf
        from omegaconf import OmegaConf

        init_keys = {"submitit_folder", "max_num_timeout"}
        executor = submitit.AutoExecutor(
            cluster=self._EXECUTOR,
            folder=self.params["submitit_folder"],
            slurm_max_num_timeout=self.params.get("max_num_timeout", 0),
        )
        base = set(OmegaConf.structured(BaseQueueConf).keys())
        executor.update_parameters(
            **{
                key if key in base else f"{self._EXECUTOR}_{key}": value
                for key, value in self.params.items()
                if key not in init_keys
            }
        )
        return executor


def _unwind(signum: int, frame: Any) -> None:
    """SIGTERM in a task (scancel, the sweep gone): unwind, releasing the runs' claims."""
    raise KeyboardInterrupt(f"signal {signal.Signals(signum).name}")


def _process_start() -> float:
    """When this process started (seconds since the epoch; now where /proc cannot tell)."""
    try:
        ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
        boot = next(
            float(line.split()[1])
            for line in Path("/proc/stat").read_text().splitlines()
            if line.startswith("btime")
        )
        return boot + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, StopIteration):
        return time.time()


def _say(message: str) -> None:
    print(f"slurm: {message}", file=sys.stderr, flush=True)


def _array_id(jobs: Sequence[Any]) -> str:
    return str(jobs[0].job_id).split("_", 1)[0]


def wait(
    jobs: Sequence[Any],
    poll_s: float = 1.0,
    grace_s: float | None = None,
    unanswered_s: float = 300.0,
) -> dict[str, str]:
    """Wait until every task has a result or has ended without one; returns the latter's
    states by job id.

    A task is over when its result file exists, or when the controller (``squeue``) no longer
    has it queued and no result appeared: at once for a state in which a task writes none
    (cancelled, timed out, out of memory...), ``grace_s`` later otherwise (a result on a slow
    shared file system). The states are looked up every 2 s at first, then less often (at
    most every 30 s). When ``squeue`` does not answer for ``unanswered_s``, stop waiting: the
    tasks left are reported as such. ``grace_s`` defaults to ``$NORMBENCH_SLURM_GRACE_S`` or
    15.
    """
    if grace_s is None:
        grace_s = float(os.environ.get(GRACE_ENV) or 15.0)
    pending = {job.job_id: job for job in jobs}
    ended: dict[str, str] = {}
    gone_since: dict[str, float] = {}
    started = answered = time.monotonic()
    checked = -math.inf
    warned: set[str] = set()  # each problem is said once
    while pending:
        for job_id, job in list(pending.items()):
            if job.paths.result_pickle.exists():
                del pending[job_id]
        now = time.monotonic()
        if pending and now - checked >= min(30.0, max(2.0, (now - started) / 10)):
            checked = now
            states, problem = task_states(_array_id(jobs))
            if problem and problem not in warned:
                if states is not None:
                    _say(f"cannot read job states from sacct ({problem}); going by squeue")
                else:
                    limit = f"{unanswered_s:.0f} s"
                    _say(f"squeue does not answer ({problem}); waiting up to {limit} for it")
                warned.add(problem)
            if states is not None:
                answered = now
                for job_id in pending:
                    state = states.get(job_id, "GONE")
                    if state.split()[0] in _LIVE:
                        gone_since.pop(job_id, None)
                        continue
                    waited = now - gone_since.setdefault(job_id, now)
                    if waited >= (grace_s if state in _MAY_HAVE_RESULT else 0):
                        ended[job_id] = _describe(state, problem)
                for job_id in ended:
                    pending.pop(job_id, None)
            elif now - answered > unanswered_s:
                silence = f"no answer from squeue for {unanswered_s:.0f} s"
                ended.update(dict.fromkeys(pending, silence))
                _say(f"stopped waiting: {silence}")
                return ended
        if pending:
            time.sleep(poll_s)
    return ended


def _describe(state: str, problem: str | None) -> str:
    if state == "GONE":
        why = problem or "sacct does not list it"
        return f"left the queue without a result (state unknown: {why})"
    return state


def task_states(array_id: str) -> tuple[dict[str, str] | None, str | None]:
    """Each task's state (``5_0`` -> ``RUNNING``, ``CANCELLED by 0``; absent once it is
    neither queued nor in the accounting records) and why sacct could not say, if it could
    not. The queue (squeue) says which tasks are live, sacct how the others ended; None (and
    squeue's error) when squeue does not answer."""
    queued = _call(["squeue", "-h", "-r", "-j", array_id, "-o", "%i|%T"])
    if isinstance(queued, tuple) and "Invalid job id" not in queued[1]:
        return None, queued[1]  # the controller does not answer (an invalid id: none queued)
    sacct = _call(["sacct", "-n", "-P", "-o", "JobID,State", "-j", array_id])
    states = _parse_states(sacct) if isinstance(sacct, str) else {}
    states.update(_parse_states(queued) if isinstance(queued, str) else {})
    return states, None if isinstance(sacct, str) else sacct[1]


def _call(command: list[str]) -> str | tuple[int, str]:
    """The command's output, or its exit status and first line of error."""
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=30, check=False)
    except (OSError, subprocess.TimeoutExpired) as error:
        return 1, str(error)
    if done.returncode != 0:
        lines = (done.stderr or done.stdout).strip().splitlines()
        return done.returncode, (lines[0] if lines else f"exit status {done.returncode}")
    return done.stdout


def _parse_states(text: str) -> dict[str, str]:
    """``JobID|State`` lines; a pending array range (``5_[2-4%2]``) gives each of its tasks.
    A task whose step ran out of memory is ``OUT_OF_MEMORY`` (the task itself says FAILED)."""
    from submitit.slurm.slurm import read_job_id

    states: dict[str, str] = {}
    out_of_memory = set()
    for line in text.splitlines():
        job_id, _, state = line.strip().partition("|")
        if "." in job_id and state.startswith("OUT_OF_MEMORY"):
            out_of_memory.add(job_id.split(".", 1)[0])
        if not job_id or "." in job_id:
            continue
        for parts in read_job_id(job_id):
            if len(parts) == 3:
                for index in range(int(parts[1]), int(parts[2]) + 1):
                    states[f"{parts[0]}_{index}"] = state
            else:
                states["_".join(parts[:2])] = state
    for job_id in out_of_memory & states.keys():
        if states[job_id] == "FAILED":
            states[job_id] = "OUT_OF_MEMORY"
    return states


def cancel(jobs: Sequence[Any], wait_s: float = 60.0) -> None:
    """``scancel`` the array, then wait (at most ``wait_s``) until none of its tasks is queued,
    so that they have given their runs' claims back when the sweep exits."""
    array_id = _array_id(jobs)
    result = _call(["scancel", array_id])
    if isinstance(result, tuple):
        _say(f"could not cancel SLURM job {array_id}: {result[1]}")
        return
    _say(f"cancelled SLURM job {array_id} ({len(jobs)} tasks)")
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        queued = _call(["squeue", "-h", "-j", array_id, "-o", "%i"])
        if not isinstance(queued, str) or not queued.strip():
            return
        time.sleep(1.0)
    _say(f"SLURM job {array_id} still has tasks ending after {wait_s:.0f} s")


def _job_return(job: Any, overrides: list[str], state: str | None, sweep_dir: Path) -> JobReturn:
    """The task's own return; or, for a task without one, a record of how it ended (read by
    :func:`scheduler_records`) and a completed return of nan, so Hydra goes on."""
    if state is None:
        try:
            return job.results()[0]
        except Exception as error:  # noqa: BLE001 - the task broke outside normbench's job
            lines = str(error).strip().splitlines()
            state = f"FAILED: {lines[-1] if lines else type(error).__name__}"
    folder = sweep_dir / TASKS_DIR
    folder.mkdir(parents=True, exist_ok=True)
    record = {"job_id": job.job_id, "state": state, "overrides": overrides}
    (folder / f"{job.job_id}.json").write_text(json.dumps(record))
    return JobReturn(overrides=overrides, status=JobStatus.COMPLETED, _return_value=math.nan)


def scheduler_records(
    jobs: Sequence[Any], records: list[dict], sweep_dir: Path
) -> tuple[list[dict], list[str]]:
    """Run records for the planned ``jobs`` whose tasks ended without a result (none when the
    task's own record exists), and a line for each such task no planned job matches (a
    stacked group's). Timed-out runs' errors are made plain, in ``records`` too."""
    for record in records:
        if "timed-out too many times" in (record.get("error") or ""):
            record["error"] = (
                "timed out on every try (hydra.launcher.max_num_timeout); resumable: rerun the "
                "command (its checkpoint is kept)"
            )
    seen = {record["run_id"] for record in records}
    by_cell = {cell_key(job.overrides): job for job in jobs}
    added, lines = [], []
    for path in sorted((sweep_dir / TASKS_DIR).glob("*.json")):
        task = json.loads(path.read_text())
        status, error = _explain(task["state"], task["job_id"])
        job = by_cell.get(cell_key(task["overrides"]))
        if job is None:
            overrides = " ".join(sorted(cell_key(task["overrides"])))
            lines.append(f"{status} {overrides}: {error}")
        elif job.run_id not in seen:
            added.append(
                {"run_id": job.run_id, "overrides": job.overrides, "status": status, "error": error}
            )
    return added, lines


def _explain(state: str, job_id: str) -> tuple[str, str]:
    """The summary's status and error for a task that ended without a result."""
    where = f"SLURM job {job_id}"
    word = state.split()[0].rstrip(":") if state else "UNKNOWN"
    if word == "TIMEOUT":
        return "missing", f"timed out ({where}), resumable: rerun the command"
    if word == "CANCELLED":
        return "missing", f"{state} ({where}); rerun the command to resume it"
    if word == "OUT_OF_MEMORY":
        return "failed", f"{state} ({where}); ask for more with hydra.launcher.mem_gb"
    status = "failed" if word in _FAILED else "missing"
    return status, f"{state} ({where})"

