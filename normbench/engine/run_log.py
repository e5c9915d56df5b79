"""One run's identity, metric rows and status while it trains, and the writing of its results.

Every run, trained alone (``normbench run``) or as a member of a stack, keeps one
:class:`RunLog`; the engine (normbench.engine.lifecycle) appends a row per epoch and writes the run
through it, so every run's files are written by the same code.
"""

from __future__ import annotations

import math
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from normbench import results
from normbench.engine import checkpoint
from normbench.engine.train import EpochStats
from normbench.preflight import writing

COLUMNS = results.KEY_COLUMNS + results.METRIC_COLUMNS


class RunLog:
    """One run's identity, rows and status as it trains, and the writing of its results."""

    def __init__(self, cfg: DictConfig, task: str = "") -> None:
        self.cfg = cfg
        self.run_id = results.run_id(cfg)
        self.path = Path(cfg.results_dir) / self.run_id
        self.base_row = {"run_id": self.run_id, **cfg.choices, "task": task}
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

    def finish(
        self, test: tuple[float, float] | None, baseline: tuple[float, float]
    ) -> tuple[str, str]:
        """The status of a run that trained all its epochs, ``ok`` or ``stalled``, and for a
        stalled one which rule fired (its ``error`` column).

        Stalled: it learned nothing in a mode it is measured in. ``baseline`` is a constant
        predictor's loss and accuracy (see :func:`constant_baseline`). Training (batch
        statistics): the final training loss is not at least ``stall_margin`` below the
        constant's. Eval mode (running statistics): the final validation accuracy is not at
        least ``stall_margin`` above the constant's, or for regression the validation loss is
        not ``stall_margin`` below it.
        """
        if test is not None:
            self.rows[-1]["test_loss"], self.rows[-1]["test_acc"] = test
        last, margin = self.rows[-1], self.cfg.stall_margin
        loss, acc = baseline
        if not last["train_loss"] <= (1 - margin) * loss:
            measured, rule = f"train_loss {last['train_loss']:.4g}", f"{margin:.0%} below"
            return "stalled", f"stalled in training: final {measured} is not {rule} {loss:.4g}"
        if math.isnan(acc):
            ok, measured, limit = last["val_loss"] <= (1 - margin) * loss, "val_loss", loss
        else:
            ok, measured, limit = last["val_acc"] > (1 + margin) * acc, "val_acc", acc
        if ok:
            return "ok", ""
        rule = f"{margin:.0%} {'below' if measured == 'val_loss' else 'above'}"
        return "stalled", (
            f"stalled in eval mode: final {measured} {last[measured]:.4g} is not {rule} a "
            f"constant predictor's {limit:.4g}"
        )

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
        diagnostics_writer: Callable[[Path], None] | None = None,
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
                diagnostics_writer=diagnostics_writer,
                weights_writer=_weights_writer(model) if model is not None else None,
                keep=(results.CHECKPOINT_FILE,) if self.cfg.keep_checkpoints else (),
            )

    def fail(self, error: BaseException) -> None:
        """Record the run as failed, with its message and traceback, keeping finished epochs
        (never weights: a failed attempt's are not a result)."""
        message = f"{type(error).__name__}: {error}"
        self.write("failed", message, "".join(traceback.format_exception(error)))


def _weights_writer(model: nn.Module) -> Callable[[Path], None]:
    return lambda path: checkpoint.save_weights(path, model)


def constant_baseline(num_outputs: int, targets: torch.Tensor) -> tuple[float, float]:
    """The loss and accuracy of a constant predictor, which a run must clearly beat to count
    as learning: ln C for C classes (uniform predictions) and the most frequent class's share
    of ``targets``; for regression the targets' variance and no accuracy (nan)."""
    if targets.dtype == torch.int64:
        share = torch.bincount(targets, minlength=num_outputs).max().item() / len(targets)
        return math.log(num_outputs), share
    return float(targets.double().var(correction=0)), math.nan
