"""``normbench sweep``: a Hydra multirun that skips what is done and survives failures.

The grid is expanded with Hydra's own parser and basic sweeper (comma lists, ``range()``,
``choice()``, ``glob()``, ``hydra.sweeper.params`` from experiment files), and every job's
config is composed and checked before anything runs. Hydra then launches the jobs:
one after another, on its joblib launcher with ``--jobs N``, or on any launcher named by
override (``hydra/launcher=submitit_slurm``). Each job writes its own results folder; the
summary is read back from there, since Hydra drops job return values and skips its
end-of-sweep callback when a job fails.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
import traceback
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from omegaconf import DictConfig
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

from normbench import results
from normbench.app import compose_job, hydra_context, launch, search_path
from normbench.config import validate
from normbench.errors import ConfigError

# Hydra flags a sweep accepts, and whether each takes a value.
_VALUE_FLAGS = {"--config-dir": "--config-dir", "-cd": "--config-dir", "--package": "--package",
                "-p": "--package"}  # fmt: skip
# Flags that make Hydra print something instead of running: handed to Hydra as they are.
_PRINT_FLAGS = {"--cfg", "-c", "--info", "-i", "--resolve", "--hydra-help"}


@dataclass
class Job:
    overrides: list[str]
    run_id: str
    path: Path
    done_before: bool  # complete results existed when the sweep was planned
    threads: int


def split_args(args: Sequence[str]) -> tuple[list[str], list[str], str | None]:
    """Separate Hydra overrides from Hydra flags; return (overrides, flags, config_dir)."""
    overrides, flags, config_dir = [], [], None
    items = iter(args)
    for arg in items:
        name, has_value, value = arg.partition("=")
        if arg in _PRINT_FLAGS or name in _PRINT_FLAGS:
            flags.append(arg)
        elif name in _VALUE_FLAGS:
            value = value if has_value else next(items, "")
            flags += [name, value]
            if _VALUE_FLAGS[name] == "--config-dir":
                config_dir = value
        elif arg.startswith("-"):
            raise ConfigError(
                f"unknown option {arg!r} for normbench sweep; Hydra flags it accepts: "
                "--config-dir DIR, --package PKG, --cfg job|hydra|all, --info, --resolve"
            )
        else:
            overrides.append(arg)
    return overrides, flags, config_dir


def plan_sweep(overrides: Sequence[str], config_dir: str | None = None) -> list[Job]:
    """Expand the grid and check every job: bad input fails here, before any run.

    Each job's config is composed and validated, and each distinct setup (everything but
    ``lr`` and ``seed``) is built once: data loaded, model and optimizer made.
    """
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.override_parser.overrides_parser import OverridesParser

    with hydra_context():
        parser = OverridesParser.create(config_loader=GlobalHydra.instance().config_loader())
        parsed = parser.parse_overrides(list(overrides))
        fixed = [o.input_line for o in parsed if not o.is_sweep_override()]
        params = _sweeper_params(fixed, config_dir)  # experiment files' hydra.sweeper.params
        swept = parser.parse_overrides([f"{k}={v}" for k, v in params.items()]) + parsed
        jobs, setups = [], {}
        for job_overrides in BasicSweeper.split_arguments(swept, None)[0]:
            cfg, choices = compose_job(job_overrides, config_dir)
            validate(cfg)
            setups.setdefault(_setup_key(cfg), cfg)
            run_id = results.run_id(cfg, choices)
            path = Path(cfg.results_dir) / run_id
            jobs.append(Job(job_overrides, run_id, path, results.is_complete(path), cfg.threads))
    _check_setups(setups.values())
    return jobs


def distinct_runs(plan: list[Job]) -> list[Job]:
    """One job per run id (``lr=0.1,1e-1`` names one run twice)."""
    first: dict[str, Job] = {}
    for job in plan:
        first.setdefault(job.run_id, job)
    return list(first.values())


def _sweeper_params(fixed: list[str], config_dir: str | None) -> dict[str, str]:
    from hydra import compose

    overrides = [*search_path(config_dir), *fixed]
    cfg = compose("config", overrides=overrides, return_hydra_config=True)
    return {str(k): str(v) for k, v in (cfg.hydra.sweeper.params or {}).items()}


def _setup_key(cfg: DictConfig) -> str:
    flat = results.flat_config(cfg)
    return json.dumps(
        {**{k: v for k, v in flat.items() if k not in ("lr", "seed")}, "device": cfg.device},
        sort_keys=True,
    )


def _check_setups(cfgs: Iterable[DictConfig]) -> None:
    """Load each distinct setup's data and build its model, as a job would: ConfigError."""
    from normbench.experiment import prepare

    for cfg in cfgs:
        prepare(cfg)


def run_sweep(
    args: Sequence[str],
    jobs: int = 1,
    dry_run: bool = False,
    force: bool = False,
    console: Console | None = None,
) -> int:
    """Plan, launch and summarize a sweep. Returns the number of failed jobs."""
    console = console or Console()
    overrides, flags, config_dir = split_args(args)
    if any(flag.partition("=")[0] in _PRINT_FLAGS for flag in flags):
        launch([*flags, *overrides])  # Hydra prints, nothing runs
        return 0
    if jobs > 1 and any(o.split("=", 1)[0] == "hydra/launcher" for o in overrides):
        raise ConfigError(
            "--jobs runs jobs on the local joblib launcher; with hydra/launcher=... set that "
            "launcher's own parallelism instead"
        )
    plan = plan_sweep(overrides, config_dir)
    if len(distinct := distinct_runs(plan)) < len(plan):
        console.print(f"{len(plan)} grid cells name {len(distinct)} distinct runs; each runs once.")
        plan = distinct
    if dry_run:
        print_plan(plan, console)
        return 0
    if jobs > 1:
        check_cores(plan, jobs)
    todo = [job for job in plan if force or not job.done_before]
    if todo:
        launch_args = [*flags, *overrides, *_job_settings(overrides, jobs, force)]
        started = time.time()
        with _terminate_as_interrupt(), _watch(todo, started, console):
            launch(launch_args, multirun=True)
    return print_summary(plan, force, console)


def _job_settings(overrides: Sequence[str], jobs: int, force: bool) -> list[str]:
    """Overrides every job gets: quiet, skip-if-done, and the launcher for ``--jobs``."""
    keys = {o.split("=", 1)[0].lstrip("+~") for o in overrides}
    settings = ["quiet=true", f"skip_done={str(not force).lower()}"]
    if jobs > 1:
        settings += ["hydra/launcher=joblib", f"hydra.launcher.n_jobs={jobs}"]
    return [s for s in settings if s.split("=", 1)[0] not in keys]


def check_cores(plan: list[Job], jobs: int) -> None:
    """Parallel jobs times torch threads per job must not exceed the cores."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    cores = cores or 1
    threads = max((job.threads for job in plan), default=1)
    if jobs * threads > cores:
        raise ConfigError(
            f"--jobs {jobs} x threads={threads} exceeds the {cores} CPU cores; "
            f"use --jobs {max(1, cores // threads)} or fewer"
        )


def run_job(cfg: DictConfig, choices: Mapping[str, str]) -> None:
    """One sweep job (in whichever process the launcher chose): never raises.

    A failure is recorded as status ``failed`` with its traceback, so the other jobs go on.
    """
    from normbench.experiment import record_failure, run_experiment

    try:
        run_experiment(cfg, choices)
    except ConfigError as error:  # raised before run_experiment wrote anything
        record_failure(cfg, choices, error, traceback.format_exc())
    except Exception:  # noqa: S110 - run_experiment recorded it, with the epochs it finished
        pass


def job_status(job: Job, force: bool) -> str:
    """ok | diverged | failed | skipped | missing (never ran, or was interrupted)."""
    if job.done_before and not force:
        return "skipped"
    metrics = job.path / results.METRICS_FILE
    if not metrics.is_file():
        return "missing"
    return results.read_status(metrics)


def print_plan(plan: list[Job], console: Console) -> None:
    """``--dry-run``: the number of jobs and each job's overrides."""
    table = Table(title=f"{len(plan)} jobs", title_justify="left")
    table.add_column("#", justify="right")
    table.add_column("overrides")
    table.add_column("run_id", style="dim")
    table.add_column("done", justify="center")
    for index, job in enumerate(plan):
        table.add_row(
            str(index), " ".join(job.overrides), job.run_id, "yes" if job.done_before else ""
        )
    console.print(table)
    console.print(f"{len(plan)} jobs; dry run: nothing was run.")


def print_summary(plan: list[Job], force: bool, console: Console) -> int:
    """Counts per status and the failed jobs' overrides; returns the number failed."""
    statuses = [job_status(job, force) for job in plan]
    counts = Counter(statuses)
    table = Table(title=f"sweep: {len(plan)} jobs", title_justify="left")
    for status in ("ok", "diverged", "failed", "skipped", "missing"):
        table.add_column(status, justify="right")
    table.add_row(*(str(counts[s]) for s in ("ok", "diverged", "failed", "skipped", "missing")))
    console.print(table)
    for job, status in zip(plan, statuses, strict=True):
        if status in ("failed", "missing"):
            error = results.read_error(job.path) if status == "failed" else "did not finish"
            console.print(f"[red]{status}[/] {' '.join(job.overrides)}: {error}", highlight=False)
    if counts["missing"]:
        console.print("Rerun the same command to finish the missing jobs.")
    return counts["failed"] + counts["missing"]


@contextmanager
def _watch(todo: list[Job], started: float, console: Console) -> Iterator[None]:
    """Jobs done / total with an ETA, from the results folder (works for every launcher)."""
    stop = threading.Event()
    progress = Progress(
        TextColumn("[bold]sweep"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("eta"),
        TimeRemainingColumn(),
        console=Console(stderr=True),
    )
    task = progress.add_task("sweep", total=len(todo))

    def poll() -> None:
        while not stop.wait(0.5):
            progress.update(task, completed=sum(_finished_since(job, started) for job in todo))

    thread = threading.Thread(target=poll, daemon=True)
    with progress:
        thread.start()
        try:
            yield
        finally:
            stop.set()
            thread.join()
            progress.update(task, completed=sum(_finished_since(job, started) for job in todo))


def _finished_since(job: Job, started: float) -> bool:
    metrics = job.path / results.METRICS_FILE
    try:
        return metrics.stat().st_mtime >= started - 1
    except FileNotFoundError:
        return False


@contextmanager
def _terminate_as_interrupt() -> Iterator[None]:
    """SIGTERM unwinds like Ctrl-C, so temporary files are cleaned up on the way out."""

    def handler(signum, frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
