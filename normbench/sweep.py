"""``normbench sweep``: plan a Hydra multirun, let Hydra launch it, and summarize it.

Planning only composes and validates: with Hydra's basic sweeper the grid is expanded here
(Hydra's own override parser: comma lists, ``range()``, ``choice()``, ``glob()``, and
``hydra.sweeper.params`` from experiment files) and every cell is checked, so bad input
anywhere exits before a job starts; no device is chosen, no data loaded, models are built on
the ``meta`` device. Other sweepers (Optuna...) choose their jobs as they go: the fixed part
of the config is checked and each job checks itself.

Hydra then launches the jobs with its basic sweeper (as ``hydra/sweeper=normbench``, which
does not compose each job a second time to check it: planning did), one after another, on
its joblib launcher with ``--jobs N``, or on any launcher named by override
(``hydra/launcher=submitit_slurm``).
Each job skips itself when its results are complete and leaves a record (normbench.jobs);
the summary is read from those records.
"""

from __future__ import annotations

import itertools
import math
import os
import signal
import threading
from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from hydra.core.object_type import ObjectType
from hydra.core.override_parser.types import ValueType
from omegaconf import DictConfig, OmegaConf, open_dict
from omegaconf.errors import OmegaConfBaseException
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

from normbench import results, slurm
from normbench.app import (
    GROUPS,
    HydraArgs,
    compose_job,
    hydra_context,
    launch,
    override_key,
    parse_args,
)
from normbench.checks import check_run, check_setup
from normbench.config import unknown_key_message, validate
from normbench.errors import ConfigError
from normbench.jobs import PARENT_PID_ENV, parent_id, read_job_records
from normbench.preflight import check_results_dir, check_threads, estimate_run_bytes

# Launchers that run jobs on this machine: the cores checked are this machine's.
_LOCAL_LAUNCHERS = ("basic", "joblib", "submitit_local")
# Sweepers that run the grid of the overrides, expanded here: Hydra's basic one, and
# normbench's (hydra_plugins/normbench_sweeper: the basic one, trusting this planning).
_GRID_SWEEPERS = ("normbench", "basic")
# elsewhere: another sweep on the same results folder was training the run (see claims)
STATUSES = ("ok", "diverged", "stalled", "failed", "skipped", "elsewhere", "missing")


@dataclass
class Job:
    overrides: list[str]
    run_id: str
    path: Path
    done_before: bool  # complete results existed when the sweep was planned
    cfg: DictConfig  # as planned (Hydra composes the same config when it launches the job)


@dataclass
class Plan:
    """What a sweep will do. ``jobs`` is None when the sweeper chooses jobs as it goes."""

    jobs: list[Job] | None
    sweeper: str
    launcher: str
    results_dir: Path
    threads: int
    stack: bool  # the config asks for stacked groups (stack=true, the default)
    cells: int = 0  # grid cells Hydra would launch per run (repeats of one run included)
    needed_bytes: int = 0  # disk the planned runs need at most
    values: dict[str, list[str]] | None = None  # the grid: key -> its "key=value" overrides


def plan_sweep(args: Sequence[str] | HydraArgs) -> Plan:
    """Compose and check every job of the sweep; bad input raises ConfigError.

    ``args.overrides`` becomes what Hydra is to launch (see :func:`_per_cell`)."""
    hydra_args = args if isinstance(args, HydraArgs) else parse_args(args)
    with hydra_context(hydra_args):
        from hydra.core.global_hydra import GlobalHydra
        from hydra.core.override_parser.overrides_parser import OverridesParser

        parser = OverridesParser.create(config_loader=GlobalHydra.instance().config_loader())
        given = hydra_args.overrides
        hydra_args.overrides = _per_cell(parser.parse_overrides(given))  # what Hydra gets
        parsed = parser.parse_overrides(hydra_args.overrides)
        fixed = [o.input_line for o in parsed if not o.is_sweep_override()]
        base = compose_job(fixed, hydra_args, keep_hydra=True)
        runtime = base.hydra.runtime.choices
        plan = Plan(
            None,
            str(runtime["hydra/sweeper"]),
            str(runtime["hydra/launcher"]),
            Path(base.results_dir),
            base.threads,
            base.stack,
        )
        params = [f"{k}={v}" for k, v in (base.hydra.sweeper.get("params") or {}).items()]
        if plan.sweeper not in _GRID_SWEEPERS:
            for override in parser.parse_overrides([*params, *given]):
                if override.is_sweep_override():
                    _sweep_values(override)
            with open_dict(base):
                del base["hydra"]
            shape = check_run(base)
            plan.needed_bytes = estimate_run_bytes(shape.num_params, base.epochs)
            return plan
        plan.values = _grid(parser.parse_overrides([*params, *given]))
        cells = [list(cell) for cell in itertools.product(*plan.values.values())]
        plan.jobs, plan.needed_bytes = _check_cells(parser, cells, hydra_args)
        plan.cells = len(cells)
    return plan


def _grid(parsed: list) -> dict[str, list[str]]:
    """Each key's ``key=value`` overrides, a later key replacing an earlier one (as Hydra's
    basic sweeper does with experiment params and the command line)."""
    values: dict[str, list[str]] = {}
    for override in parsed:
        key = override.get_key_element()
        if override.is_interval_sweep():
            raise ConfigError(
                f"{override.input_line}: interval() needs a sweeper that samples, such as "
                "hydra/sweeper=optuna; the basic sweeper takes lists, range(), choice(), glob()"
            )
        if override.is_sweep_override():
            values[key] = [f"{key}={v}" for v in _sweep_values(override)]
        else:
            values[key] = [f"{key}={override.get_value_element_as_str()}"]
    return values


def _sweep_values(override) -> list[str]:
    """The values a sweep override expands to (none for an ``interval()``, which is checked
    as a search space: low < high, and low > 0 on a log scale); expanding to nothing is an
    error naming the override (and for ``glob()``, the options it could match)."""
    line = override.input_line
    if override.is_interval_sweep():
        interval = override.value()
        low, high = interval.start, interval.end
        if not low < high:
            raise ConfigError(f"{line}: interval(low, high) needs low < high; got {low}, {high}")
        if "log" in interval.tags and low <= 0:
            raise ConfigError(f"{line}: a log-scale interval needs low > 0; got {low}")
        return []
    values = list(override.sweep_string_iterator())
    if values:
        return values
    key = override.key_or_group
    if override.value_type == ValueType.GLOB_CHOICE_SWEEP:
        options = override.config_loader.get_group_options(key, results_filter=ObjectType.CONFIG)
        if not options:
            raise ConfigError(
                f"{line}: glob() picks options of a config group, and {key} is not one"
            )
        raise ConfigError(f"{line} matches no {key} option; choose from: {', '.join(options)}")
    raise ConfigError(
        f"{line} expands to no values; range(start, stop, step) counts from start towards stop "
        "by step, so step must point from start to stop"
    )


def _per_cell(parsed: list) -> list[str]:
    """The overrides for Hydra, with a fixed setting inside a swept config group
    (``dataset.root=DIR`` with ``dataset=mnist,cifar10``) as a sweep of one value: Hydra
    composes the sweep's own config from the defaults and the fixed overrides, where the
    setting would meet the default option (the toy dataset has no root); swept, it is applied
    to each cell, with the cell's option (and checked there, by planning)."""
    swept = {
        o.key_or_group
        for o in parsed
        if o.is_sweep_override() and not o.is_hydra_override() and o.key_or_group in GROUPS
    }
    lines = []
    for override in parsed:
        key = override.key_or_group
        inside = not override.is_sweep_override() and key.split(".")[0] in swept and "." in key
        plain = not (override.is_add() or override.is_delete() or override.is_force_add())
        if inside and plain and override.package is None:
            lines.append(f"{key}=choice({override.input_line.split('=', 1)[1]})")
        else:
            lines.append(override.input_line)
    return lines


def _check_cells(
    parser, cells: list[list[str]], hydra_args: HydraArgs
) -> tuple[list[Job], int]:
    """Compose every cell and check it: Hydra composes once per choice of config groups and
    plain ``key=value`` overrides are applied to a copy (composing each cell would take
    ~0.1 s); the data and model checks run once per distinct setup."""
    composed: dict[tuple[str, ...], DictConfig] = {}
    checked: dict[str, int] = {}  # setup -> the disk one of its runs needs
    jobs, needed = [], 0
    for cell in cells:
        structural, scalars = [], []
        for override in parser.parse_overrides(cell):
            plain = not (override.is_add() or override.is_delete() or override.is_force_add())
            key = override.key_or_group
            group = key in GROUPS or "/" in key or key.startswith("hydra.")  # Hydra checks them
            (scalars if plain and not group else structural).append(override)
        key = tuple(o.input_line for o in structural)
        if key not in composed:
            composed[key] = compose_job(list(key), hydra_args)
        cfg = composed[key].copy()
        for override in scalars:
            _update(cfg, override)
        validate(cfg)
        setup = results.setup_key(cfg)
        if setup not in checked:
            checked[setup] = estimate_run_bytes(check_setup(cfg).num_params, cfg.epochs)
        run_id = results.run_id(cfg)
        path = Path(cfg.results_dir) / run_id
        done = results.is_complete(path, cfg.diagnostics)
        jobs.append(Job(cell, run_id, path, done, cfg))
        needed += 0 if done else checked[setup]
    return jobs, needed


def _update(cfg: DictConfig, override) -> None:
    """Apply one ``key=value`` override as Hydra would, errors as one line."""
    key = override.key_or_group
    parent = OmegaConf.select(cfg, key.rpartition(".")[0]) if "." in key else cfg
    if parent is None or key.rpartition(".")[2] not in parent:
        schema = OmegaConf.get_type(parent) if parent is not None else None
        raise ConfigError(unknown_key_message(key, schema))
    try:
        OmegaConf.update(cfg, key, override.value(), merge=True)
    except OmegaConfBaseException as error:
        detail = str(error).strip().splitlines()[0]
        raise ConfigError(f"{override.input_line}: {detail}") from None


def distinct_runs(jobs: list[Job]) -> list[Job]:
    """One job per run id (``lr=0.1,1e-1`` names one run twice)."""
    first: dict[str, Job] = {}
    for job in jobs:
        first.setdefault(job.run_id, job)
    return list(first.values())


def run_sweep(
    args: Sequence[str],
    jobs: int = 1,
    dry_run: bool = False,
    force: bool = False,
    stack: bool | None = None,
    console: Console | None = None,
) -> int:
    """Plan, launch and summarize a sweep. Returns the number of failed or missing runs.

    The runs of a grid that differ only in lr and seed train as one stacked model, one Hydra
    job per group, unless ``stack`` is False (or the config says ``stack=false``): then one
    job per run. Sweepers that choose runs one at a time (Optuna) launch one job per run.
    """
    console = console or Console()
    hydra_args = parse_args(args)
    if "--run" in hydra_args.options:
        raise ConfigError("normbench sweep always runs a multirun; use normbench run for one")
    if hydra_args.acts:
        launch([*hydra_args.flags, *hydra_args.overrides])  # Hydra prints or reruns one job
        return 0
    keys = {override_key(o) for o in hydra_args.overrides}
    if jobs > 1 and "hydra/launcher" in keys:
        raise ConfigError(
            "--jobs runs jobs on the local joblib launcher; with hydra/launcher=... set that "
            "launcher's own parallelism instead"
        )
    plan = plan_sweep(hydra_args)
    if jobs > 1:
        plan.launcher = "joblib"  # what _job_settings asks Hydra for
    if plan.launcher in _LOCAL_LAUNCHERS:
        check_threads(plan.threads, jobs)
    if plan.jobs is not None and len(distinct := distinct_runs(plan.jobs)) < len(plan.jobs):
        console.print(
            f"{len(plan.jobs)} grid cells name {len(distinct)} distinct runs; each runs once."
        )
        plan.jobs = distinct  # the repeats skip themselves: the first one ran them
    overrides, total = hydra_args.overrides, plan.cells
    if (plan.stack if stack is None else stack) and plan.values is not None:
        overrides, total = _stacked(plan, overrides)
    grouped = total < plan.cells  # one Hydra job per group of runs
    if dry_run:
        print_plan(plan, console, total)
        return 0
    check_results_dir(plan.results_dir, plan.needed_bytes)
    sweep_dir = plan.results_dir / ".sweeps" / datetime.now().strftime("%Y-%m-%d_%H-%M-%S-%f")
    # Hydra runs the whole grid; a complete job skips itself. Launch nothing when all are.
    if force or plan.jobs is None or not all(job.done_before for job in plan.jobs):
        settings = _job_settings(keys, jobs, force, sweep_dir)
        if plan.launcher == slurm.LAUNCHER:
            slurm_settings, skipped = _slurm_settings(plan, keys, force, grouped, sweep_dir)
            settings, total = [*settings, *slurm_settings], total - skipped
        with _terminate_as_interrupt(), _watch(sweep_dir, total or None, console), _parent():
            launch([*hydra_args.flags, *overrides, *settings], multirun=True)
    failed = print_summary(plan, _records(plan, sweep_dir, console), console)
    optimized = sweep_dir / "optimization_results.yaml"  # written by optimizing sweepers
    if optimized.is_file():
        best = OmegaConf.load(optimized)
        params = " ".join(f"{k}={v}" for k, v in best.get("best_params", {}).items())
        console.print(f"best: {params} (objective {best.get('best_value')})", highlight=False)
    return failed


def _slurm_settings(
    plan: Plan, keys: set[str], force: bool, grouped: bool, sweep_dir: Path
) -> tuple[list[str], int]:
    """The SLURM launcher's settings (normbench.slurm), and how many of the jobs to launch
    are not submitted: those whose runs are all complete (unless forced)."""
    done = [] if force or plan.jobs is None else _complete_cells(plan, grouped)
    slurm.write_skip(sweep_dir, done)
    return slurm.sweep_settings(keys), len(done)


def _complete_cells(plan: Plan, grouped: bool) -> list[list[str]]:
    """The Hydra jobs whose runs are all complete, by their overrides: planned runs, or with
    ``grouped`` (see :func:`_stacked`) the group jobs whose members all are."""
    if not grouped:
        return [job.overrides for job in plan.jobs or [] if job.done_before]
    lead = {f"lr={_distinct(plan, 'lr')[0]}", f"seed={_distinct(plan, 'seed')[0]}"}
    groups: dict[frozenset[str], bool] = {}
    for job in plan.jobs or []:
        cell = frozenset(o for o in job.overrides if override_key(o) not in ("lr", "seed"))
        groups[cell | lead] = groups.get(cell | lead, True) and job.done_before
    return [sorted(cell) for cell, done in groups.items() if done]


def _records(plan: Plan, sweep_dir: Path, console: Console) -> list[dict]:
    """The jobs' records, and on SLURM the scheduler's word on tasks that left none."""
    records = read_job_records(sweep_dir)
    if plan.launcher != slurm.LAUNCHER:
        return records
    added, lines = slurm.scheduler_records(plan.jobs or [], records, sweep_dir)
    for line in lines:
        console.print(line, highlight=False)
    return records + added


def _stacked(plan: Plan, overrides: list[str]) -> tuple[list[str], int]:
    """The overrides that make each Hydra job one group: the grid's learning rates and seeds
    become the job's ``stack_members``, every lr x seed pair (a fixed ``lr``/``seed`` replaces
    any sweep of them, an experiment's params included). Returns them and the number of
    group jobs."""
    swept = [key for key in ("lr", "seed") if len(plan.values.get(key, [])) > 1]
    if not swept:
        return overrides, plan.cells
    lrs, seeds = _distinct(plan, "lr"), _distinct(plan, "seed")
    members = ",".join(f"{{lr:{lr},seed:{seed}}}" for lr, seed in itertools.product(lrs, seeds))
    kept = [o for o in overrides if override_key(o) not in ("lr", "seed")]
    grouped = [*kept, f"lr={lrs[0]}", f"seed={seeds[0]}", f"stack_members=[{members}]"]
    size = math.prod(len(plan.values[key]) for key in swept)  # cells per group
    return grouped, plan.cells // size


def _distinct(plan: Plan, key: str) -> list[str]:
    """The planned jobs' values of ``key``, resolved (quotes, interpolations), one per number
    (``0.1`` and ``1e-1`` are one)."""
    values = dict.fromkeys(results.normalize_value(job.cfg[key]) for job in plan.jobs or [])
    return [str(value) for value in values]


@contextmanager
def _parent() -> Iterator[None]:
    """Tell local workers which process is the sweep, so they stop when it is killed."""
    previous = os.environ.get(PARENT_PID_ENV)
    os.environ[PARENT_PID_ENV] = parent_id()
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop(PARENT_PID_ENV, None)
        else:
            os.environ[PARENT_PID_ENV] = previous


def _job_settings(keys: set[str], jobs: int, force: bool, sweep_dir: Path) -> list[str]:
    """Overrides every job gets: quiet, skip-if-done, the sweep folder, and ``--jobs``."""
    settings = [
        "quiet=true",
        f"skip_done={str(not force).lower()}",
        f"hydra.sweep.dir={sweep_dir}",
    ]  # _is_setting() recognizes these
    if jobs > 1:
        settings += ["hydra/launcher=joblib", f"hydra.launcher.n_jobs={jobs}"]
    return [s for s in settings if override_key(s) not in keys]


def _is_setting(override: str) -> bool:
    """Whether an override is one the sweep adds to every job (not the user's)."""
    key = override_key(override)
    return key in ("quiet", "skip_done") or key.startswith(("hydra.", "hydra/", "stack_"))


def print_plan(plan: Plan, console: Console, launched: int) -> None:
    """``--dry-run``: the number of runs, each run's overrides, and the jobs to launch."""
    if plan.jobs is None:
        console.print(
            f"The {plan.sweeper} sweeper chooses its jobs as it runs; the fixed part of the "
            "config is valid. Dry run: nothing was run."
        )
        return
    table = Table(title=f"{len(plan.jobs)} jobs", title_justify="left")
    table.add_column("#", justify="right")
    table.add_column("overrides")
    table.add_column("run_id", style="dim", overflow="fold")
    table.add_column("done", justify="center")
    for index, job in enumerate(plan.jobs):
        done = "yes" if job.done_before else ""
        table.add_row(str(index), " ".join(job.overrides), job.run_id, done)
    console.print(table)
    grouped = f" in {launched} stacked group jobs" if launched < len(plan.jobs) else ""
    console.print(
        f"{len(plan.jobs)} jobs{grouped} on the {plan.launcher} launcher; "
        "dry run: nothing was run."
    )


def print_summary(plan: Plan, records: list[dict], console: Console) -> int:
    """Counts per status, from the jobs' records; returns the number failed or missing.

    Planned jobs without a record (interrupted, or never launched because every job was
    complete) are counted as skipped when complete, else missing.
    """
    by_run = {record["run_id"]: record for record in records}
    rows = list(records)
    for job in distinct_runs(plan.jobs or []):
        if job.run_id not in by_run:
            complete = results.is_complete(job.path)
            status = "skipped" if job.done_before and complete else "missing"
            rows.append({"overrides": job.overrides, "run_id": job.run_id, "status": status})
    counts = Counter(row["status"] for row in rows)
    table = Table(title=f"sweep: {len(rows)} jobs", title_justify="left")
    for status in STATUSES:
        table.add_column(status, justify="right")
    table.add_row(*(str(counts[s]) for s in STATUSES))
    console.print(table)
    for row in rows:
        if row["status"] in ("failed", "missing"):
            error = row.get("error") or "did not finish"
            overrides = " ".join(o for o in row["overrides"] if not _is_setting(o))
            console.print(f"[red]{row['status']}[/] {overrides}: {error}", highlight=False)
    if counts["elsewhere"]:
        console.print(f"{counts['elsewhere']} runs were being trained by another sweep.")
    if counts["missing"]:
        console.print("Rerun the same command to finish the missing jobs.")
    folders = [p for p in {plan.results_dir / row["run_id"] for row in rows} if p.is_dir()]
    size = sum(disk_use(folder) for folder in folders)
    console.print(f"disk: {size / 2**20:.1f} MiB in {len(folders)} run folders")
    return counts["failed"] + counts["missing"]


def disk_use(path: Path) -> int:
    """Bytes of the files under ``path`` (0 when it does not exist)."""
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


@contextmanager
def _watch(sweep_dir: Path, total: int | None, console: Console) -> Iterator[None]:
    """Jobs ended / total with an ETA, from the jobs' records (works for every launcher)."""
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
    task = progress.add_task("sweep", total=total)

    def ended() -> int:
        return len(list(sweep_dir.glob("*/job.json")))

    def poll() -> None:
        while not stop.wait(0.5):
            progress.update(task, completed=ended())

    thread = threading.Thread(target=poll, daemon=True)
    with progress:
        thread.start()
        try:
            yield
        finally:
            stop.set()
            thread.join()
            progress.update(task, completed=ended())


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
