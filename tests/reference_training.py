"""The reference a stacked member is checked against: the same run trained alone as a plain
PyTorch model (torch.optim, one permutation per epoch, the last incomplete batch dropped).

Not part of normbench: the engine trains every run as a member of a stack
(normbench.engine.trainer); the tests check each member against this loop, and bench/ compares
the engine with it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

from normbench import norms
from normbench.engine.train import EpochStats, check_optimizer

Tensors = tuple[torch.Tensor, torch.Tensor]
StepHook = Callable[[nn.Module, int], None]


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


