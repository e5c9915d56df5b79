"""The training loop: flat ``train_one_epoch`` / ``evaluate`` over tensors held on the device.

In-memory datasets are batched by indexing a permutation, not collated sample by sample
through a DataLoader; ``bench/bench_train_loop.py`` measures the difference.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from omegaconf import MISSING
from torch import nn

from normbench import norms
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


def make_optimizer(model: nn.Module, cfg: Any, lr: float) -> torch.optim.Optimizer:
    """SGD or Adam; norm parameters get no weight decay unless ``cfg.norm_weight_decay``."""
    check_optimizer(cfg)
    if cfg.weight_decay and not cfg.norm_weight_decay:
        skip = norms.norm_parameters(model)
        decay = [p for p in model.parameters() if p.requires_grad and id(p) not in skip]
        no_decay = [p for p in model.parameters() if p.requires_grad and id(p) in skip]
        params = [
            {"params": decay, "weight_decay": cfg.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ]
    else:
        params = [
            {
                "params": [p for p in model.parameters() if p.requires_grad],
                "weight_decay": cfg.weight_decay,
            }
        ]
    if cfg.name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=cfg.momentum)
    return torch.optim.Adam(params, lr=lr)


def make_scheduler(
    optimizer: torch.optim.Optimizer, cfg: Any
) -> torch.optim.lr_scheduler.ReduceLROnPlateau | None:
    """ReduceLROnPlateau on the validation loss (document 004), or None."""
    if cfg.scheduler is None:
        return None
    return torch.optim.lr_scheduler.ReduceLROnPlateau(
        optimizer, "min", patience=cfg.plateau_patience, factor=cfg.plateau_factor
    )


def shuffled_batches(
    n: int, batch_size: int, generator: torch.Generator, device: torch.device
) -> Iterator[torch.Tensor]:
    """Index batches over a fresh permutation of ``n`` examples, already on ``device``.

    The last incomplete batch is dropped: batch statistics over a handful of leftover
    examples (or one, which BatchNorm rejects) would not be the batch size under study.
    """
    order = torch.randperm(n, generator=generator).to(device)
    for start in range(0, n - batch_size + 1, batch_size):
        yield order[start : start + batch_size]


def train_one_epoch(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    loss_fn: nn.Module,
    data: Tensors,
    batch_size: int,
    generator: torch.Generator,
    freeze_norms: bool = False,
    on_step: StepHook | None = None,
    on_batch: Callable[[], None] | None = None,
) -> EpochStats:
    """One pass over ``data``; sums stay on the device so there is no sync per step."""
    model.train()
    if freeze_norms:
        norms.freeze_batch_norms(model)
    x, y = data
    classify = y.dtype == torch.int64
    loss_sum = torch.zeros((), device=x.device)
    first_loss = torch.full((), math.nan, device=x.device)
    correct = torch.zeros((), device=x.device, dtype=torch.int64)
    grad_sum = torch.zeros((), device=x.device)
    steps = seen = 0
    params = [p for p in model.parameters() if p.requires_grad]
    for index in shuffled_batches(len(x), batch_size, generator, x.device):
        xb, yb = x[index], y[index]
        optimizer.zero_grad(set_to_none=True)
        out = model(xb)
        loss = loss_fn(out, yb)
        loss.backward()
        grad_sum += nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
        optimizer.step()
        if steps == 0:
            first_loss = loss.detach()
        steps += 1
        seen += len(index)
        loss_sum.add_(loss.detach(), alpha=len(index))
        if classify:
            correct += (out.detach().argmax(1) == yb).sum()
        if on_step is not None:
            on_step(model, steps)
        if on_batch is not None:
            on_batch()
    return EpochStats(
        loss=(loss_sum / max(seen, 1)).item(),
        first_loss=first_loss.item(),
        acc=correct.item() / max(seen, 1) if classify else math.nan,
        grad_norm=(grad_sum / max(steps, 1)).item(),
        steps=steps,
    )


@torch.no_grad()
def evaluate(
    model: nn.Module, loss_fn: nn.Module, data: Tensors, batch_size: int = 1024
) -> tuple[float, float]:
    """Mean loss and accuracy (nan for regression) in eval mode."""
    model.eval()
    x, y = data
    classify = y.dtype == torch.int64
    loss_sum = torch.zeros((), device=x.device)
    correct = torch.zeros((), device=x.device, dtype=torch.int64)
    for xb, yb in zip(x.split(batch_size), y.split(batch_size), strict=True):
        out = model(xb)
        loss_sum.add_(loss_fn(out, yb), alpha=len(xb))
        if classify:
            correct += (out.argmax(1) == yb).sum()
    loss = (loss_sum / len(x)).item()
    return loss, correct.item() / len(x) if classify else math.nan


class Timer:
    """Wall time of a block, for ``epoch_seconds``."""

    def __enter__(self) -> Timer:
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        self.seconds = time.perf_counter() - self.start
