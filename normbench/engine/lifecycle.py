"""The one training lifecycle: K >= 1 runs that differ only in lr and seed, trained as a stack.

``normbench run`` trains a stack of one (:func:`run_experiment`); a sweep job trains its group
(:func:`run_group`, which never raises). Either way the same code, in this order:

1. skip the runs whose results are complete (sweeps set ``skip_done``);
2. check the machine the job runs on: torch threads against its cores, the device, the
   results folder (writable, room for the runs);
3. load each seed's data and check it as loaded (the batch size against the real training
   split, not the nominal one);
4. claim the runs (a run another live process trains is left to it);
5. train in chunks of at most ``stack_max_members`` runs and ``stack_max_mib`` of estimated
   memory: resume from the stack's checkpoint, train epoch by epoch with divergence judged per
   member, save the stack's state after an epoch at most every ``checkpoint_seconds``, then
   evaluate on the test split and apply the stall rule;
6. write each member as a run of its own (same files and columns as a run trained alone, with
   ``stack_size``).

Bad input (steps 2-3) writes nothing: no file, no folder. Any other failure is recorded as
status ``failed`` for the runs it hit, and the other chunks go on.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, open_dict
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from normbench import results
from normbench.checks import RunShape, check_run
from normbench.datasets import DataSplits, load_dataset
from normbench.engine import checkpoint
from normbench.engine.diagnostics import Recorder
from normbench.engine.run_claims import claim
from normbench.engine.run_log import RunLog, constant_baseline
from normbench.engine.train import Timer, pick_device
from normbench.engine.trainer import (
    StackedTrainer,
    chunk_members,
    estimate_data_bytes,
    estimate_member_bytes,
    memory_budget,
)
from normbench.errors import ConfigError
from normbench.preflight import (
    OutputError,
    check_results_dir,
    check_threads,
    estimate_run_bytes,
    writing,
)


@dataclass
class RunResult:
    """How one run ended: ok, diverged, stalled, failed, skipped or elsewhere."""

    cfg: DictConfig
    run_id: str
    status: str
    path: Path
    rows: list[dict[str, Any]] = field(default_factory=list)
    resumed_from: int = 0  # the epoch a resumed run continued after (0: started afresh)
    error: str = ""


class RunClaimedError(RuntimeError):
    """Another live process (a concurrent sweep) is training this run."""


def member_configs(cfg: DictConfig) -> list[DictConfig]:
    """The runs of a job: ``cfg`` itself, or one config per member of ``stack_members``."""
    if not cfg.stack_members:
        return [cfg]
    members = []
    for member in cfg.stack_members:
        run = cfg.copy()
        with open_dict(run):
            run.lr, run.seed = member.lr, member.seed
            run.stack_members = []
        members.append(run)
    return members


def run_experiment(cfg: DictConfig, console: Console | None = None) -> RunResult:
    """Train one run and write ``results_dir/<run_id>/``: a stack of one.

    Bad input raises ConfigError before anything is written; a run another live process is
    training raises RunClaimedError; a failed write is an OutputError naming the file. Any
    other exception is recorded as status ``failed`` (traceback in ``error.txt``) and re-raised.
    """
    shape = check_run(cfg)
    return train_runs([cfg], shape, console, strict=True)[0]


def run_group(cfg: DictConfig, console: Console | None = None) -> list[RunResult]:
    """Train (or skip) every run of a sweep job; never raises: a run that could not train
    is ``failed`` with the reason in its ``error``."""
    members = member_configs(cfg)
    try:
        shape = check_run(cfg)  # members differ from it only in lr and seed (schema-checked)
    except ConfigError as error:
        return [_result(member, "failed", str(error)) for member in members]
    return train_runs(members, shape, console, strict=False)


def train_runs(
    cfgs: Sequence[DictConfig],
    shape: RunShape,
    console: Console | None = None,
    strict: bool = False,
) -> list[RunResult]:
    """Steps 1-6 of the module docstring for runs that differ only in lr and seed, whose
    config passed :func:`~normbench.checks.check_run` (which returned ``shape``).

    ``strict`` (``normbench run``) raises what a non-strict job records in its results.
    """
    console = console or Console(stderr=True)
    logs = [RunLog(cfg, shape.data.task) for cfg in cfgs]
    outcomes: dict[str, RunResult] = {}
    for log in logs:
        if _skips(log):
            outcomes[log.run_id] = _result(log.cfg, "skipped")
    pending = [log for log in logs if log.run_id not in outcomes]
    if pending:
        try:
            device, datasets = _prepare(pending, shape)
        except ConfigError as error:  # bad input on this machine: nothing is written
            if strict:
                raise
            failed = {log.run_id: _result(log.cfg, "failed", str(error)) for log in pending}
            return [outcomes.get(log.run_id) or failed[log.run_id] for log in logs]
        for outcome in _train_claimed(pending, device, datasets, console, strict):
            outcomes[outcome.run_id] = outcome
    return [outcomes[log.run_id] for log in logs]


def _prepare(
    logs: list[RunLog], shape: RunShape
) -> tuple[torch.device, dict[int, DataSplits] | Exception]:
    """Steps 2-3: the machine's checks, then each seed's data, checked as loaded.

    Bad input raises ConfigError; a failure to load that is not the user's (a corrupt file)
    is returned in place of the data, for the runs to record once claimed.
    """
    cfg = logs[0].cfg
    check_threads(cfg.threads)
    device = pick_device(cfg.device)
    needed = len(logs) * estimate_run_bytes(shape.num_params, cfg.epochs)
    check_results_dir(Path(cfg.results_dir), needed)
    try:
        datasets = {seed: load_dataset(cfg.dataset, seed) for seed in _seeds(logs)}
    except ConfigError:
        raise
    except Exception as error:  # noqa: BLE001 - recorded by every run it stops
        return device, error
    for data in datasets.values():
        if cfg.batch_size > len(data.train[0]):
            raise ConfigError(
                f"batch_size {cfg.batch_size} exceeds the {len(data.train[0])} training "
                f"examples dataset {cfg.dataset.name!r} holds as loaded; use batch_size "
                f"{len(data.train[0])} or less"
            )
    return device, datasets


def _skips(log: RunLog) -> bool:
    """Whether a sweep job leaves this run alone: its results are complete (``skip_done``)."""
    return log.cfg.skip_done and results.is_complete(log.path, log.cfg.diagnostics)


def _seeds(logs: Sequence[RunLog]) -> list[int]:
    return list(dict.fromkeys(int(log.cfg.seed) for log in logs))


def _train_claimed(
    logs: list[RunLog],
    device: torch.device,
    datasets: dict[int, DataSplits] | Exception,
    console: Console,
    strict: bool,
) -> list[RunResult]:
    """Steps 4-6: claim the runs, train the claimed ones in chunks, write each."""
    outcomes = []
    with ExitStack() as held:
        todo = []
        for log in logs:
            if (mine := claim(log.path)) is not None:
                if _skips(log):
                    mine.release()  # another process finished it since the first look
                    outcomes.append(_result(log.cfg, "skipped"))
                else:
                    held.enter_context(mine)
                    todo.append(log)
                continue
            message = f"run {log.run_id} is being trained by another process"
            if strict:
                raise RunClaimedError(message)
            outcomes.append(_result(log.cfg, "elsewhere", message))
        if not todo:  # every run finished or held elsewhere
            return outcomes
        if isinstance(datasets, Exception):
            for log in todo:
                outcomes.append(_failed(log, datasets, strict))
            return outcomes
        cfg = logs[0].cfg
        torch.set_num_threads(cfg.threads)  # per job: joblib's workers are reused across jobs
        cap, member_bytes = _memory_cap(cfg, device, datasets)
        for chunk in chunk_members(todo, cfg.stack_max_members, cap, member_bytes):
            outcomes += _train_chunk(chunk, device, datasets, console, strict)
    return outcomes


def _memory_cap(
    cfg: DictConfig, device: torch.device, datasets: dict[int, DataSplits]
) -> tuple[int | None, int]:
    """The bytes a stack's members may use (``stack_max_mib``, or half the device's free
    memory, less the training data of its seeds) and the estimated bytes of one member, so
    that a group too big to fit is split."""
    if cfg.stack_max_mib is not None:
        budget: int | None = int(cfg.stack_max_mib * 2**20)
    else:
        budget = memory_budget(device)
    data = next(iter(datasets.values()))
    if budget is not None:
        budget -= len(datasets) * estimate_data_bytes(data.input_shape, len(data.train[0]))
    return budget, estimate_member_bytes(cfg, data.input_shape, data.num_outputs)


def _train_chunk(
    logs: list[RunLog],
    device: torch.device,
    datasets: dict[int, DataSplits],
    console: Console,
    strict: bool,
) -> list[RunResult]:
    """Train one stack to the end; write each member as its own run."""
    recorder = None
    try:
        trainer, recorder, done, statuses = _resumed_trainer(logs, device, datasets, console)
        reasons = _epochs(trainer, recorder, logs, done, statuses, console)
    except Exception as error:  # noqa: BLE001 - every member records it, the job goes on
        return [_failed(log, error, strict) for log in logs]
    finally:
        if recorder is not None:
            recorder.close()
    outcomes = []
    # the first member last: its write removes the stack's checkpoint, as any run's removes its own
    for k, log in reversed(list(enumerate(logs))):
        diagnostics = partial(recorder.write, k) if recorder is not None else None
        try:
            log.write(
                statuses[k],
                reasons[k],
                model=trainer.member_module(k),
                diagnostics_writer=diagnostics,
            )
        except OutputError as error:
            if strict:
                raise
            outcomes.append(_result(log.cfg, "failed", str(error)))
            continue
        outcomes.append(
            RunResult(log.cfg, log.run_id, statuses[k], log.path, log.rows, done, reasons[k])
        )
    return outcomes[::-1]


def _failed(log: RunLog, error: BaseException, strict: bool) -> RunResult:
    """Record ``error`` as the run's failure (its finished epochs kept); raise it if strict."""
    message = str(error) if isinstance(error, OutputError) else f"{type(error).__name__}: {error}"
    try:
        log.fail(error)
    except OutputError as unwritable:  # a full disk: the job's record says why
        message = f"{message} ({unwritable})"
    if strict:
        raise error
    return _result(log.cfg, "failed", message)


def _result(cfg: DictConfig, status: str, error: str = "") -> RunResult:
    run_id = results.run_id(cfg)
    return RunResult(cfg, run_id, status, Path(cfg.results_dir) / run_id, error=error)


# -- the stack's checkpoint --------------------------------------------------------------


# What reading a checkpoint that is not (or no longer) what these members saved can raise.
_UNREADABLE = (
    checkpoint.CheckpointError, OSError, LookupError, TypeError, ValueError, RuntimeError
)


def _checkpoint_path(logs: Sequence[RunLog]) -> Path:
    return logs[0].path / results.CHECKPOINT_FILE


def _resumed_trainer(
    logs: list[RunLog], device: torch.device, datasets: dict[int, DataSplits], console: Console
) -> tuple[StackedTrainer, Recorder | None, int, list[str]]:
    """A trainer for the chunk (and its diagnostics recorder, with ``diagnostics=true``), gone
    on from its checkpoint when one saved by these same members exists (none of them complete
    since; with diagnostics when they are asked for), with the epochs done and the statuses.

    A checkpoint that cannot be read is set aside (renamed ``checkpoint.pt.unreadable``, with
    a notice) and training starts afresh.
    """
    cfgs = [log.cfg for log in logs]
    trainer = StackedTrainer(cfgs, datasets, device)
    recorder = _recorder(trainer, logs)
    fresh = (trainer, recorder, 0, ["running"] * len(logs))
    path = _checkpoint_path(logs)
    if any(results.is_complete(log.path) for log in logs):
        return fresh
    try:
        state = checkpoint.load_checkpoint(path)
        if state is None or state["members"] != [log.run_id for log in logs]:
            return fresh
        if recorder is not None and state.get("diagnostics") is None:
            return fresh  # saved without the diagnostics now asked for: start afresh
        trainer.load_state(state["trainer"])
        if recorder is not None:
            recorder.restore(state["diagnostics"])
        saved = [(s["rows"], s["step"], s["first_loss"]) for s in state["logs"]]
        statuses = list(state["statuses"])
        epoch = int(state["epoch"])
    except _UNREADABLE as error:
        aside = path.with_name(path.name + ".unreadable")
        with writing(aside):
            path.replace(aside)
        console.print(f"{path} cannot be read ({error}); set aside as {aside.name}, from scratch")
        if recorder is not None:
            recorder.close()
        trainer = StackedTrainer(cfgs, datasets, device)
        return trainer, _recorder(trainer, logs), 0, ["running"] * len(logs)
    for log, (rows, step, first_loss) in zip(logs, saved, strict=True):
        log.rows, log.step, log.first_loss = rows, step, first_loss
    if not logs[0].cfg.quiet:
        console.print(f"{_name(logs)}: resuming after epoch {epoch} of {logs[0].cfg.epochs}")
    return trainer, recorder, epoch, statuses


def _recorder(trainer: StackedTrainer, logs: Sequence[RunLog]) -> Recorder | None:
    cfg = logs[0].cfg
    if not cfg.diagnostics:
        return None
    return Recorder(trainer, [log.run_id for log in logs], cfg.diagnostics_every)


def _save(
    trainer: StackedTrainer,
    recorder: Recorder | None,
    logs: list[RunLog],
    statuses: list[str],
    epoch: int,
) -> None:
    """Write the members' rows so far (``running``), then the stack's state after ``epoch``."""
    state = {
        "format": checkpoint.FORMAT,
        "members": [log.run_id for log in logs],
        "epoch": epoch,
        "statuses": statuses,
        "trainer": trainer.state(),
        "diagnostics": recorder.state() if recorder is not None else None,
        "logs": [
            {"rows": log.rows, "step": log.step, "first_loss": log.first_loss} for log in logs
        ],
    }
    for log in logs:
        log.progress()  # first: a checkpoint never lacks the metrics.csv showing the run started
    path = _checkpoint_path(logs)
    with writing(path):
        checkpoint.save_checkpoint(path, state)


# -- the epochs --------------------------------------------------------------------------


def _epochs(
    trainer: StackedTrainer,
    recorder: Recorder | None,
    logs: list[RunLog],
    done: int,
    statuses: list[str],
    console: Console,
) -> list[str]:
    """Train the epochs after ``done``; ``statuses`` become final. Returns each member's
    reason for its status (why it stalled; empty otherwise)."""
    cfg = logs[0].cfg
    steps = trainer.n_train // trainer.batch_size
    saved = time.monotonic()
    with _progress(cfg, console) as progress:
        task = progress.add_task(_name(logs), total=cfg.epochs * steps, info="")
        progress.update(task, completed=done * steps)
        for epoch in range(done, cfg.epochs):
            with Timer() as timer:
                stats = trainer.train_epoch(
                    on_step=recorder.on_step if recorder is not None else None,
                    on_batch=lambda: progress.advance(task),
                )
                for k in trainer.active_members():
                    if logs[k].diverged(stats[k]):
                        trainer.deactivate(k)
                        statuses[k] = "diverged"
                val = trainer.evaluate("val")
                if recorder is not None:  # the members still active: as a run alone
                    recorder.end_epoch()
            for k, log in enumerate(logs):
                if stats[k] is not None:  # trained this epoch (a member that diverged included)
                    log.add_epoch(stats[k], val[k], trainer.lr(k), timer.seconds, trainer.K)
            trainer.scheduler_step([log.rows[-1]["val_loss"] for log in logs])
            progress.update(task, info=_progress_info(logs))
            if not trainer.active_members():
                break
            if epoch + 1 < cfg.epochs and time.monotonic() - saved >= cfg.checkpoint_seconds:
                _save(trainer, recorder, logs, statuses, epoch + 1)
                saved = time.monotonic()
    has_test = all(trainer.data[int(log.cfg.seed)].test is not None for log in logs)
    test = trainer.evaluate("test") if has_test else [None] * len(logs)
    reasons = [""] * len(logs)
    for k, log in enumerate(logs):
        if statuses[k] == "running":
            targets = trainer.data[int(log.cfg.seed)].train[1]
            baseline = constant_baseline(trainer.num_outputs, targets)
            statuses[k], reasons[k] = log.finish(test[k], baseline)
    return reasons


def _name(logs: Sequence[RunLog]) -> str:
    return logs[0].run_id if len(logs) == 1 else f"stack of {len(logs)} runs"


def _progress_info(logs: Sequence[RunLog]) -> str:
    if len(logs) > 1:
        return f"epoch {logs[0].rows[-1]['epoch']}"
    row = logs[0].rows[-1]
    acc = row["val_acc"]
    metric = f"val_acc {acc:.3f}" if acc == acc else f"val_loss {row['val_loss']:.4f}"
    return f"epoch {row['epoch']}  train_loss {row['train_loss']:.4f}  {metric}"


def _progress(cfg: DictConfig, console: Console) -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        TextColumn("{task.fields[info]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
        disable=cfg.quiet,
    )
