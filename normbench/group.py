"""A sweep job's runs end to end: one run, or a stacked group trained as one model.

A job whose config lists ``stack_lr`` and ``stack_seed`` (``normbench sweep --stack`` puts
them there) trains every lr x seed member of that setup together with the stacked engine
(normbench.stacked), in chunks of at most ``stack_max_members`` runs and ``stack_max_mib`` of
estimated memory (by default half of what the device has free). Each member is written
exactly as a run trained alone (same run id, files and columns, plus ``stack_size``).
A group the engine cannot stack runs its members one after another, with a one-line notice.
After an epoch, at most every ``stack_checkpoint_seconds``, a stack writes its members'
``running`` rows and its whole state to ``stack_checkpoint.pt`` in its first member's folder;
a group killed mid-way goes on from there when the same unfinished members are stacked again,
and ends with the numbers it would have had (a changed chunking, e.g. by the memory cap,
starts afresh).
"""

from __future__ import annotations

import itertools
import math
import time
from collections.abc import Mapping
from contextlib import ExitStack, suppress
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, open_dict
from rich.console import Console

from normbench import checkpoint, results
from normbench.checks import RunShape, check_run
from normbench.claims import claim
from normbench.errors import ConfigError
from normbench.experiment import (
    RunClaimedError,
    RunLog,
    constant_loss,
    run_experiment,
)
from normbench.preflight import OutputError, check_results_dir, estimate_run_bytes, writing
from normbench.stacked import (
    StackedTrainer,
    chunk_members,
    estimate_data_bytes,
    estimate_member_bytes,
    memory_budget,
    stack_unsupported,
)
from normbench.train import Timer, pick_device


def member_configs(cfg: DictConfig) -> list[DictConfig]:
    """The runs of a job: ``cfg`` itself, or one config per lr x seed of a stacked group."""
    if not cfg.stack_lr and not cfg.stack_seed:
        return [cfg]
    members = []
    for lr, seed in itertools.product(cfg.stack_lr or [cfg.lr], cfg.stack_seed or [cfg.seed]):
        member = cfg.copy()
        with open_dict(member):
            member.lr, member.seed = lr, seed
            member.stack_lr, member.stack_seed = [], []
        members.append(member)
    return members


def run_group(
    cfg: DictConfig, choices: Mapping[str, str], console: Console | None = None
) -> list[dict[str, Any]]:
    """Run (or skip) every run of the job; never raises. One record per run: run_id, lr,
    seed, status (ok, diverged, stalled, failed, skipped, elsewhere), error, objective."""
    console = console or Console(stderr=True)
    members = member_configs(cfg)
    if len(members) > 1:
        reason = stack_unsupported(members[0])
        if reason is None:
            return _run_stacked(members, choices)
        console.print(f"not stacked ({len(members)} runs one after another): {reason}")
    return [_run_alone(member, choices) for member in members]


def _record(cfg: DictConfig, run_id: str, status: str, error: str = "") -> dict[str, Any]:
    path = Path(cfg.results_dir) / run_id
    objective = _objective(path) if status in results.DONE_STATUSES + ("skipped",) else math.nan
    return {
        "run_id": run_id,
        "lr": cfg.lr,
        "seed": cfg.seed,
        "status": status,
        "error": error,
        "objective": objective,
    }


def _objective(run_path: Path) -> float:
    """The final validation accuracy, or minus the validation loss for regression."""
    try:
        last = results.read_last_row(run_path / results.METRICS_FILE)
        acc, loss = float(last["val_acc"] or "nan"), float(last["val_loss"] or "nan")
    except (OSError, KeyError, ValueError):
        return math.nan
    return acc if math.isfinite(acc) else -loss


def _run_alone(cfg: DictConfig, choices: Mapping[str, str]) -> dict[str, Any]:
    run_id = results.run_id(cfg, choices)
    try:
        return _record(cfg, run_id, run_experiment(cfg, choices).status)
    except RunClaimedError as error:
        return _record(cfg, run_id, "elsewhere", str(error))
    except (ConfigError, OutputError) as error:  # bad input on this node, or a failed write
        with suppress(OutputError):  # an unwritable results folder: the record says why
            RunLog(cfg, choices, "").fail(error)
        return _record(cfg, run_id, "failed", str(error))
    except Exception as error:  # run_experiment recorded it, with the epochs it finished
        return _record(cfg, run_id, "failed", f"{type(error).__name__}: {error}")


def _run_stacked(members: list[DictConfig], choices: Mapping[str, str]) -> list[dict[str, Any]]:
    """Train the group's unfinished members as stacks; skip, or leave to another sweep, the
    rest. A group killed mid-way reruns only its unfinished members."""
    cfg = members[0]
    try:
        shape = check_run(cfg)
    except ConfigError:  # bad input on this node: each member records why it failed
        return [_run_alone(member, choices) for member in members]
    logs = [RunLog(member, choices, shape.data.task) for member in members]
    records = [
        _record(log.cfg, log.run_id, "skipped")
        for log in logs
        if log.cfg.skip_done and results.is_complete(log.path, log.cfg.diagnostics)
    ]
    pending = [log for log in logs if log.run_id not in {r["run_id"] for r in records}]
    try:
        needed = len(pending) * estimate_run_bytes(shape.num_params, cfg.epochs)
        check_results_dir(Path(cfg.results_dir), needed)
    except ConfigError as error:
        return records + [_record(log.cfg, log.run_id, "failed", str(error)) for log in pending]
    with ExitStack() as held:
        todo = []
        for log in pending:
            if (mine := claim(log.path)) is None:
                error = f"run {log.run_id} is being trained by another process"
                records.append(_record(log.cfg, log.run_id, "elsewhere", error))
            else:
                held.enter_context(mine)
                todo.append(log)
        torch.set_num_threads(cfg.threads)
        seeds = len({log.cfg.seed for log in todo})
        for chunk in chunk_members(todo, cfg.stack_max_members, *_memory_cap(cfg, shape, seeds)):
            records += _train_chunk(chunk)
    return records


def _memory_cap(cfg: DictConfig, shape: RunShape, seeds: int) -> tuple[int | None, int]:
    """The bytes a stack's members may use (``stack_max_mib``, or half the device's free
    memory, less the training data of its ``seeds``) and the estimated bytes of one member,
    so that a group too big to fit is split."""
    if cfg.stack_max_mib is not None:
        budget: int | None = int(cfg.stack_max_mib * 2**20)
    else:
        budget = memory_budget(pick_device(cfg.device))
    data = shape.data
    if budget is not None:
        budget -= seeds * estimate_data_bytes(data.input_shape, data.train_examples)
    return budget, estimate_member_bytes(cfg, data.input_shape, data.num_outputs)


def _train_chunk(logs: list[RunLog]) -> list[dict[str, Any]]:
    """Train one stack to the end; write each member as its own run."""
    try:
        trainer = StackedTrainer([log.cfg for log in logs])
        statuses = _epochs(trainer, logs)
    except Exception as error:  # noqa: BLE001 - every member records it, the job goes on
        for log in logs:
            log.fail(error)
        message = f"{type(error).__name__}: {error}"
        return [_record(log.cfg, log.run_id, "failed", message) for log in logs]
    # the first member last: its write removes the stack's checkpoint, as any run's removes its own
    for k, log in reversed(list(enumerate(logs))):
        log.write(statuses[k], model=trainer.member_module(k))
    return [_record(log.cfg, log.run_id, statuses[k]) for k, log in enumerate(logs)]


def _save(
    trainer: StackedTrainer, logs: list[RunLog], statuses: list[str], epoch: int, path: Path
) -> None:
    """Write the members' rows so far (``running``), then the stack's state after ``epoch``."""
    state = {
        "format": checkpoint.FORMAT,
        "members": [log.run_id for log in logs],
        "epoch": epoch,
        "statuses": statuses,
        "trainer": trainer.state(),
        "logs": [
            {"rows": log.rows, "step": log.step, "first_loss": log.first_loss} for log in logs
        ],
    }
    for log in logs:
        log.progress()  # first: a checkpoint never lacks the metrics.csv showing the run started
    with writing(path):
        checkpoint.save_checkpoint(path, state)


def _resume(trainer: StackedTrainer, logs: list[RunLog], path: Path) -> tuple[int, list[str]]:
    """The epochs done and the members' statuses: from the stack's checkpoint when it was
    saved by these same members, none of them complete since; else a fresh start."""
    fresh = (0, ["running"] * len(logs))
    if any(results.is_complete(log.path) for log in logs):
        return fresh
    state = checkpoint.load_checkpoint(path)
    if state is None or state["members"] != [log.run_id for log in logs]:
        return fresh
    trainer.load_state(state["trainer"])
    for log, saved in zip(logs, state["logs"], strict=True):
        log.rows, log.step, log.first_loss = saved["rows"], saved["step"], saved["first_loss"]
    return state["epoch"], list(state["statuses"])


def _epochs(trainer: StackedTrainer, logs: list[RunLog]) -> list[str]:
    cfg = logs[0].cfg
    path = logs[0].path / results.STACK_CHECKPOINT_FILE
    done, statuses = _resume(trainer, logs, path)
    saved = time.monotonic()
    for epoch in range(done, cfg.epochs):
        with Timer() as timer:
            stats = trainer.train_epoch()
            for k in trainer.active_members():
                if logs[k].diverged(stats[k]):
                    trainer.deactivate(k)
                    statuses[k] = "diverged"
            val = trainer.evaluate("val")
        for k, log in enumerate(logs):
            if stats[k] is not None:  # trained this epoch (a member that diverged included)
                lr_now = trainer.lr(k)
                log.add_epoch(stats[k], val[k], lr_now, timer.seconds, stack_size=trainer.K)
        trainer.scheduler_step([log.rows[-1]["val_loss"] for log in logs])
        if not trainer.active_members():
            break
        if epoch + 1 < cfg.epochs and time.monotonic() - saved >= cfg.stack_checkpoint_seconds:
            _save(trainer, logs, statuses, epoch + 1, path)
            saved = time.monotonic()
    has_test = all(trainer.data[int(log.cfg.seed)].test is not None for log in logs)
    test = trainer.evaluate("test") if has_test else [None] * len(logs)
    for k, log in enumerate(logs):
        if statuses[k] == "running":
            targets = trainer.data[int(log.cfg.seed)].train[1]
            statuses[k] = log.finish(test[k], constant_loss(trainer.num_outputs, targets))
    return statuses
