"""One experiment end to end: check, claim, load data, build, train, write results.

``run_experiment`` is what ``normbench run`` and every sweep job call, and what tests call.
A run writes its rows after every epoch (status ``running``) beside a checkpoint, so a run
that is killed resumes from its last finished epoch and ends with the numbers an
uninterrupted run gives. :class:`RunLog` keeps one run's rows and writes its results; the
stacked trainer (normbench.group) uses it for each member too.
"""

from __future__ import annotations

import math
import traceback
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from torch import nn

from normbench import checkpoint, results
from normbench.checks import check_run
from normbench.claims import claim
from normbench.datasets import DataSplits, load_dataset
from normbench.diagnostics import Recorder
from normbench.errors import ConfigError
from normbench.models import build_model, init_paired
from normbench.norms import is_frozen
from normbench.preflight import check_results_dir, estimate_run_bytes, writing
from normbench.train import (
    EpochStats,
    Timer,
    evaluate,
    make_optimizer,
    make_scheduler,
    pick_device,
    train_one_epoch,
)


@dataclass
class RunResult:
    run_id: str
    status: str  # ok | diverged | stalled | failed | skipped | elsewhere
    path: Path
    rows: list[dict[str, Any]] = field(default_factory=list)
    resumed_from: int = 0  # the epoch a resumed run continued after (0: started afresh)


class RunClaimedError(RuntimeError):
    """Another live process (a concurrent sweep) is training this run."""


def default_choices(cfg: DictConfig) -> dict[str, str]:
    """Group choices when the caller has none from Hydra: the registry names."""
    return {
        "model": cfg.model.name,
        "norm": cfg.norm.name,
        "dataset": cfg.dataset.name,
        "optimizer": cfg.optimizer.name,
    }


class RunLog:
    """One run's identity, rows and status as it trains, and the writing of its results."""

    def __init__(self, cfg: DictConfig, choices: Mapping[str, str], task: str) -> None:
        self.cfg = cfg
        self.run_id = results.run_id(cfg, choices)
        self.path = Path(cfg.results_dir) / self.run_id
        self.base_row = {"run_id": self.run_id, **choices, "task": task}
        self.base_row.update(results.flat_config(cfg))
        self.rows: list[dict[str, Any]] = []
        self.first_loss = math.nan
        self.step = 0

    def diverged(self, stats: EpochStats) -> bool:
        """Whether this epoch's loss is non-finite or past ``divergence_factor`` times the
        run's first step loss (then the epoch is not evaluated)."""
        first = stats.first_loss if not self.rows else self.first_loss
        return not math.isfinite(stats.loss) or (
            stats.loss > self.cfg.divergence_factor * max(first, 1e-12)
        )

    def add_epoch(
        self,
        stats: EpochStats,
        val: tuple[float, float] | None,
        lr_now: float,
        seconds: float,
        stack_size: int = 1,
    ) -> None:
        """Append the epoch's row; ``val`` is None for an epoch that diverged."""
        if not self.rows:
            self.first_loss = stats.first_loss
        self.step += stats.steps
        val_loss, val_acc = (math.nan, math.nan) if val is None else val
        self.rows.append(
            {
                **self.base_row,
                "epoch": len(self.rows) + 1,
                "step": self.step,
                "train_loss": stats.loss,
                "train_acc": stats.acc,
                "val_loss": val_loss,
                "val_acc": val_acc,
                "grad_norm": stats.grad_norm,
                "lr_now": lr_now,
                "epoch_seconds": seconds,
                "stack_size": stack_size,
            }
        )

    def finish(self, test: tuple[float, float] | None, baseline_loss: float) -> str:
        """The status of a run that trained all its epochs: ``ok`` or ``stalled``.

        Stalled: the final training loss is not at least ``stall_margin`` below
        ``baseline_loss``, a constant predictor's (see :func:`constant_loss`).
        """
        if test is not None:
            self.rows[-1]["test_loss"], self.rows[-1]["test_acc"] = test
        final = self.rows[-1]["train_loss"]
        return "stalled" if final > (1 - self.cfg.stall_margin) * baseline_loss else "ok"

    def progress(self) -> None:
        """Rewrite metrics.csv with the rows so far (status ``running``)."""
        with writing(self.path / results.METRICS_FILE):
            results.write_progress(self.path, self.rows, COLUMNS)

    def write(
        self,
        status: str,
        error: str = "",
        trace: str | None = None,
        model: nn.Module | None = None,
        recorder: Recorder | None = None,
    ) -> None:
        """Write the finished run (its weights too) so a complete result is never lost."""
        rows = self.rows or [{**self.base_row, "epoch": 0}]
        with writing(self.path):
            results.write_run(
                self.path,
                OmegaConf.to_yaml(self.cfg),
                rows,
                COLUMNS,
                status,
                error,
                trace,
                diagnostics_writer=recorder.write if recorder is not None else None,
                weights_writer=_weights_writer(model) if model is not None else None,
                keep=(results.CHECKPOINT_FILE,) if self.cfg.keep_checkpoints else (),
            )

    def fail(self, error: BaseException, model: nn.Module | None = None) -> None:
        """Record the run as failed, with its message and traceback, keeping finished epochs."""
        message = f"{type(error).__name__}: {error}"
        self.write("failed", message, traceback.format_exc(), model)


COLUMNS = results.KEY_COLUMNS + results.METRIC_COLUMNS


def _weights_writer(model: nn.Module) -> Callable[[Path], None]:
    return lambda path: checkpoint.save_weights(path, model)


def constant_loss(num_outputs: int, targets: torch.Tensor) -> float:
    """The loss of a constant predictor, which a run must clearly beat to count as learning:
    ln C for C classes (uniform predictions), the targets' variance for regression."""
    if targets.dtype == torch.int64:
        return math.log(num_outputs)
    return float(targets.double().var(correction=0))


def run_experiment(
    cfg: DictConfig, choices: Mapping[str, str] | None = None, console: Console | None = None
) -> RunResult:
    """Run one experiment and write ``results_dir/<run_id>/``.

    Invalid input (and an unusable results folder) raises ConfigError before anything is
    written. A run whose loss becomes non-finite or explodes stops with status ``diverged``;
    one that ends without learning is ``stalled``. A run another live process is training
    raises RunClaimedError. Any other exception is recorded as status ``failed`` (traceback
    in ``error.txt``) and re-raised; a failed write is an OutputError naming the file.
    """
    choices = dict(choices or default_choices(cfg))
    shape = check_run(cfg)
    run_id = results.run_id(cfg, choices)
    run_path = Path(cfg.results_dir) / run_id
    if cfg.skip_done and results.is_complete(run_path, cfg.diagnostics):
        return RunResult(run_id, "skipped", run_path)
    device = pick_device(cfg.device)  # here, not at planning: a login node has no GPU
    check_results_dir(Path(cfg.results_dir), estimate_run_bytes(shape.num_params, cfg.epochs))
    held = claim(run_path)
    if held is None:
        raise RunClaimedError(f"run {run_id} is being trained by another process")
    with held:
        return _run_claimed(cfg, choices, device, console)


def _run_claimed(
    cfg: DictConfig, choices: Mapping[str, str], device: torch.device, console: Console | None
) -> RunResult:
    torch.set_num_threads(cfg.threads)  # per job: joblib's workers are reused across jobs
    try:
        setup = prepare(cfg, device)
    except ConfigError:  # bad input (missing data files): nothing is written
        raise
    except Exception as error:
        RunLog(cfg, choices, "").fail(error)
        raise
    log = RunLog(cfg, choices, setup.data.task)
    recorder = Recorder(setup.model, log.run_id, cfg.diagnostics_every) if cfg.diagnostics else None
    try:
        status, resumed = _train(cfg, setup, log, recorder, console)
    except Exception as error:
        log.fail(error, setup.model)
        raise
    finally:
        if recorder is not None:
            recorder.close()
    log.write(status, model=setup.model, recorder=recorder)
    return RunResult(log.run_id, status, log.path, log.rows, resumed)


@dataclass
class Setup:
    """What a run trains: data and model on the device, optimizer, scheduler, data order."""

    device: torch.device
    data: DataSplits
    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.ReduceLROnPlateau | None
    generator: torch.Generator  # the data order: same seed, same order


def prepare(cfg: DictConfig, device: torch.device | None = None) -> Setup:
    """Load the data and build the model and optimizer (on a config that passed check_run)."""
    device = device or pick_device(cfg.device)
    data = load_dataset(cfg.dataset, cfg.seed)
    model = build_model(cfg.model, cfg.norm, data.input_shape, data.num_outputs)
    init_paired(model, cfg.seed)
    torch.manual_seed(cfg.seed)  # dropout and anything else drawing from the global stream
    model.to(device)
    optimizer = make_optimizer(model, cfg.optimizer, cfg.lr)
    scheduler = make_scheduler(optimizer, cfg.optimizer)
    generator = torch.Generator().manual_seed(cfg.seed)
    return Setup(device, data, model, optimizer, scheduler, generator)


def _resume(setup: Setup, log: RunLog, recorder: Recorder | None) -> int:
    """Continue from the run's checkpoint if it has one; returns the epochs already done.

    A complete run's checkpoint (left by a kill just as it finished) is not resumed: a forced
    rerun starts afresh.
    """
    if results.is_complete(log.path):
        return 0
    state = checkpoint.load_checkpoint(log.path / results.CHECKPOINT_FILE)
    if state is None or (recorder is not None and state["diagnostics"] is None):
        return 0  # none, or saved without the diagnostics now asked for: start afresh
    checkpoint.restore(state, setup.model, setup.optimizer, setup.scheduler, setup.generator)
    log.rows, log.step, log.first_loss = state["rows"], state["step"], state["first_loss"]
    if recorder is not None:
        recorder.restore(state["diagnostics"])
    return state["epoch"]


def _save(setup: Setup, log: RunLog, recorder: Recorder | None, epoch: int) -> None:
    state = checkpoint.capture(
        setup.model,
        setup.optimizer,
        setup.scheduler,
        setup.generator,
        log.rows,
        epoch,
        log.step,
        log.first_loss,
    )
    state["diagnostics"] = recorder.state() if recorder is not None else None
    log.progress()  # first: a checkpoint never lacks the metrics.csv showing the run started
    path = log.path / results.CHECKPOINT_FILE
    with writing(path):
        checkpoint.save_checkpoint(path, state)


def _train(
    cfg: DictConfig,
    setup: Setup,
    log: RunLog,
    recorder: Recorder | None,
    console: Console | None,
) -> tuple[str, int]:
    """Train the epochs not done yet; return the status and the epoch resumed after."""
    model, data = setup.model, setup.data
    loss_fn = nn.CrossEntropyLoss() if data.task == "classification" else nn.MSELoss()
    train, val = _to(data.train, setup.device), _to(data.val, setup.device)
    steps_per_epoch = len(train[0]) // cfg.batch_size
    resumed = _resume(setup, log, recorder)
    console = console or Console(stderr=True)
    if resumed and not cfg.quiet:
        console.print(f"{log.run_id}: resuming after epoch {resumed} of {cfg.epochs}")
    with _progress(cfg, console) as progress:
        total = cfg.epochs * steps_per_epoch
        task = progress.add_task(log.run_id, total=total, info="")
        progress.update(task, completed=resumed * steps_per_epoch)
        for epoch in range(resumed + 1, cfg.epochs + 1):
            with Timer() as timer:
                stats = train_one_epoch(
                    model,
                    setup.optimizer,
                    loss_fn,
                    train,
                    cfg.batch_size,
                    setup.generator,
                    freeze_norms=is_frozen(cfg.norm),
                    on_step=recorder.on_step if recorder is not None else None,
                    on_batch=lambda: progress.advance(task),
                )
                diverged = log.diverged(stats)
                val_metrics = None if diverged else evaluate(model, loss_fn, val)
                if recorder is not None and not diverged:
                    recorder.end_epoch(val, loss_fn, cfg.batch_size)
            lr_now = setup.optimizer.param_groups[0]["lr"]
            log.add_epoch(stats, val_metrics, lr_now, timer.seconds)
            if diverged:
                return "diverged", resumed
            if setup.scheduler is not None:
                setup.scheduler.step(log.rows[-1]["val_loss"])
            progress.update(task, info=_progress_info(log.rows[-1]))
            if epoch < cfg.epochs:
                _save(setup, log, recorder, epoch)
    test = evaluate(model, loss_fn, _to(data.test, setup.device)) if data.test else None
    return log.finish(test, constant_loss(data.num_outputs, train[1])), resumed


def _to(tensors, device):
    return tuple(t.to(device) for t in tensors)


def _progress_info(row: Mapping[str, Any]) -> str:
    acc = row["val_acc"]
    metric = f"val_acc {acc:.3f}" if math.isfinite(acc) else f"val_loss {row['val_loss']:.4f}"
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
