"""What training needs besides the stacked trainer: the optimizers' schemas and checks, the
device choice, an epoch's statistics and a timer. The training loop itself is
:class:`normbench.engine.trainer.StackedTrainer` (every run is a member of a stack).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from omegaconf import MISSING
from torch import nn

from normbench.errors import ConfigError, choices_error

Tensors = tuple[torch.Tensor, torch.Tensor]
StepHook = Callable[[nn.Module, int], None]


@dataclass
class EpochStats:
    loss: float
    first_loss: float  # of the epoch's first step: the reference for divergence
    acc: float  # nan for regression
    grad_norm: float  # mean global gradient norm over the epoch's steps
    steps: int


def pick_device(name: str) -> torch.device:
    """``auto`` is CUDA when present, else the CPU; an unavailable device is a ConfigError."""
    available = {
        "cpu": True,
        "cuda": torch.cuda.is_available(),
        "mps": torch.backends.mps.is_available(),
    }
    if name == "auto":
        return torch.device("cuda" if available["cuda"] else "cpu")
    if name not in available:
        raise choices_error("device", name, ["auto", *available])
    if not available[name]:
        usable = ["auto", *(d for d, ok in available.items() if ok)]
        raise ConfigError(
            f"device {name!r} is not available here; choose from: {', '.join(usable)}"
        )
    return torch.device(name)


@dataclass
class AdamSettings:
    """An optimizer's schema (Adam's); defaults live in configs/optimizer/*.yaml."""

    name: str = MISSING
    weight_decay: float = MISSING
    norm_weight_decay: bool = MISSING  # apply weight decay to norm parameters too
    scheduler: str | None = MISSING  # "plateau": ReduceLROnPlateau on the validation loss
    plateau_patience: int = MISSING
    plateau_factor: float = MISSING


@dataclass
class SGDSettings(AdamSettings):
    momentum: float = MISSING


_OPTIMIZERS: dict[str, type] = {"sgd": SGDSettings, "adam": AdamSettings}
_SCHEDULERS = ("plateau", "null")


def optimizer_schemas() -> dict[str, type]:
    """The schema of each optimizer's config node, by optimizer name."""
    return dict(_OPTIMIZERS)


def check_optimizer(cfg: Any) -> None:
    """Settings in range; raises ConfigError."""
    if cfg.name not in _OPTIMIZERS:
        raise choices_error("optimizer", cfg.name, list(_OPTIMIZERS))
    if cfg.scheduler is not None and cfg.scheduler != "plateau":
        raise choices_error("optimizer.scheduler", cfg.scheduler, _SCHEDULERS)
    checks = [
        (cfg.get("momentum", 0) >= 0, "optimizer.momentum must be >= 0"),
        (cfg.weight_decay >= 0, "optimizer.weight_decay must be >= 0"),
        (
            0 < cfg.plateau_factor < 1,
            f"optimizer.plateau_factor must be in (0, 1); got {cfg.plateau_factor}",
        ),
        (cfg.plateau_patience >= 0, "optimizer.plateau_patience must be >= 0"),
    ]
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)


class Timer:
    """Wall time of a block, for ``epoch_seconds``."""

    def __enter__(self) -> Timer:
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        self.seconds = time.perf_counter() - self.start
