"""One experiment end to end: validate, load data, build, train, write results.

``run_experiment`` is what ``normbench run`` and every sweep job call, and what tests call.
"""

from __future__ import annotations

import math
import traceback
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from torch import nn

from normbench import results
from normbench.checks import check_run
from normbench.datasets import DataSplits, load_dataset
from normbench.diagnostics import Recorder
from normbench.errors import ConfigError
from normbench.models import build_model, init_paired
from normbench.norms import is_frozen
from normbench.train import (
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
    status: str  # ok | diverged | stalled | failed | skipped
    path: Path
    rows: list[dict[str, Any]] = field(default_factory=list)


def default_choices(cfg: DictConfig) -> dict[str, str]:
    """Group choices when the caller has none from Hydra: the registry names."""
    return {
        "model": cfg.model.name,
        "norm": cfg.norm.name,
        "dataset": cfg.dataset.name,
        "optimizer": cfg.optimizer.name,
    }


def run_experiment(
    cfg: DictConfig, choices: Mapping[str, str] | None = None, console: Console | None = None
) -> RunResult:
    """Run one experiment and write ``results_dir/<run_id>/``.

    Invalid input raises ConfigError before anything is written. A run whose loss becomes
    non-finite or explodes stops with status ``diverged``; one that ends without learning
    (see :func:`stalled`) is ``stalled``. Any other exception is recorded as status
    ``failed`` (traceback in ``error.txt``) and re-raised.
    """
    choices = dict(choices or default_choices(cfg))
    check_run(cfg)
    run_id = results.run_id(cfg, choices)
    run_path = Path(cfg.results_dir) / run_id
    if cfg.skip_done and results.is_complete(run_path, cfg.diagnostics):
        return RunResult(run_id, "skipped", run_path)

    torch.set_num_threads(cfg.threads)  # per job: joblib's workers are reused across jobs
    try:
        setup = prepare(cfg)
    except ConfigError:
        raise  # bad input: nothing is written
    except Exception as error:
        record_failure(cfg, choices, error, traceback.format_exc())
        raise
    base_row = {
        "run_id": run_id,
        **choices,
        "task": setup.data.task,
        **results.flat_config(cfg),
    }
    rows: list[dict[str, Any]] = []
    recorder = Recorder(setup.model, run_id, cfg.diagnostics_every) if cfg.diagnostics else None
    try:
        status = _train(cfg, setup, base_row, rows, recorder, console)
    except Exception as error:
        record_failure(cfg, choices, error, traceback.format_exc(), rows)
        raise
    finally:
        if recorder is not None:
            recorder.close()
    _write(run_path, cfg, rows, status, recorder=recorder)
    return RunResult(run_id, status, run_path, rows)


@dataclass
class Setup:
    """What a run trains: data and model on the device, optimizer and scheduler."""

    device: torch.device
    data: DataSplits
    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.ReduceLROnPlateau | None


def prepare(cfg: DictConfig) -> Setup:
    """Load the data and build the model and optimizer (on a config that passed check_run)."""
    device = pick_device(cfg.device)
    data = load_dataset(cfg.dataset, cfg.seed)
    model = build_model(cfg.model, cfg.norm, data.input_shape, data.num_outputs)
    init_paired(model, cfg.seed)
    torch.manual_seed(cfg.seed)  # dropout and anything else drawing from the global stream
    model.to(device)
    optimizer = make_optimizer(model, cfg.optimizer, cfg.lr)
    return Setup(device, data, model, optimizer, make_scheduler(optimizer, cfg.optimizer))


def record_failure(
    cfg: DictConfig,
    choices: Mapping[str, str],
    error: BaseException,
    trace: str,
    rows: list[dict[str, Any]] | None = None,
) -> None:
    """Write a run's results with status ``failed``, its message, and its traceback."""
    run_path = Path(cfg.results_dir) / results.run_id(cfg, choices)
    if not rows:
        rows = [{"run_id": run_path.name, **choices, "epoch": 0, **results.flat_config(cfg)}]
    _write(run_path, cfg, rows, "failed", f"{type(error).__name__}: {error}")
    results.atomic_write_text(run_path / results.ERROR_FILE, trace)


def _train(
    cfg: DictConfig,
    setup: Setup,
    base_row: dict[str, Any],
    rows: list[dict[str, Any]],
    recorder: Recorder | None,
    console: Console | None,
) -> str:
    """Train for ``cfg.epochs``, appending a row per epoch; return ``ok`` or ``diverged``."""
    model, optimizer, data = setup.model, setup.optimizer, setup.data
    loss_fn = nn.CrossEntropyLoss() if data.task == "classification" else nn.MSELoss()
    train, val = _to(data.train, setup.device), _to(data.val, setup.device)
    generator = torch.Generator().manual_seed(cfg.seed)  # data order: same seed, same order
    steps_per_epoch = len(train[0]) // cfg.batch_size
    step = 0
    first_loss = math.nan
    with _progress(cfg, console) as progress:
        task = progress.add_task(base_row["run_id"], total=cfg.epochs * steps_per_epoch, info="")
        for epoch in range(1, cfg.epochs + 1):
            with Timer() as timer:
                stats = train_one_epoch(
                    model,
                    optimizer,
                    loss_fn,
                    train,
                    cfg.batch_size,
                    generator,
                    freeze_norms=is_frozen(cfg.norm),
                    on_step=recorder.on_step if recorder is not None else None,
                    on_batch=lambda: progress.advance(task),
                )
                step += stats.steps
                if epoch == 1:
                    first_loss = stats.first_loss
                diverged = not math.isfinite(stats.loss) or (
                    stats.loss > cfg.divergence_factor * max(first_loss, 1e-12)
                )
                val_loss, val_acc = (
                    (math.nan, math.nan) if diverged else evaluate(model, loss_fn, val)
                )
                if recorder is not None and not diverged:
                    recorder.end_epoch(val, loss_fn, cfg.batch_size)
            row = {
                **base_row,
                "epoch": epoch,
                "step": step,
                "train_loss": stats.loss,
                "train_acc": stats.acc,
                "val_loss": val_loss,
                "val_acc": val_acc,
                "grad_norm": stats.grad_norm,
                "lr_now": optimizer.param_groups[0]["lr"],
                "epoch_seconds": timer.seconds,
            }
            rows.append(row)
            if diverged:
                return "diverged"
            if setup.scheduler is not None:
                setup.scheduler.step(val_loss)
            progress.update(task, info=_progress_info(row))
    if data.test is not None:
        test = _to(data.test, setup.device)
        rows[-1]["test_loss"], rows[-1]["test_acc"] = evaluate(model, loss_fn, test)
    baseline = constant_loss(data.num_outputs, train[1])
    return "stalled" if rows[-1]["train_loss"] > (1 - cfg.stall_margin) * baseline else "ok"


def constant_loss(num_outputs: int, targets: torch.Tensor) -> float:
    """The loss of a constant predictor, which a run must clearly beat to count as learning:
    ln C for C classes (uniform predictions), the targets' variance for regression."""
    if targets.dtype == torch.int64:
        return math.log(num_outputs)
    return float(targets.double().var(correction=0))


def _write(
    run_path: Path,
    cfg: DictConfig,
    rows: list[dict],
    status: str,
    error: str = "",
    recorder: Recorder | None = None,
) -> None:
    results.clear_run(run_path)
    results.atomic_write_text(run_path / results.CONFIG_FILE, OmegaConf.to_yaml(cfg))
    if recorder is not None:
        recorder.write(run_path / results.DIAGNOSTICS_FILE)
    for row in rows:
        row["status"] = status
        row["error"] = error.splitlines()[0] if error else ""
    columns = results.KEY_COLUMNS + results.METRIC_COLUMNS
    results.atomic_write_csv(run_path / results.METRICS_FILE, rows, columns)


def _to(tensors, device):
    return tuple(t.to(device) for t in tensors)


def _progress_info(row: Mapping[str, Any]) -> str:
    acc = row["val_acc"]
    metric = f"val_acc {acc:.3f}" if math.isfinite(acc) else f"val_loss {row['val_loss']:.4f}"
    return f"epoch {row['epoch']}  train_loss {row['train_loss']:.4f}  {metric}"


def _progress(cfg: DictConfig, console: Console | None) -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        TextColumn("{task.fields[info]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console or Console(stderr=True),
        disable=cfg.quiet,
    )
