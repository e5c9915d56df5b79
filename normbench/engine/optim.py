"""Optimizers for stacked members: every tensor is (K, ...), one slice per member, one lr each.

``torch.optim`` has one learning rate per parameter group, and a stacked parameter holds K
members. These re-implement the update of ``torch.optim.SGD`` (dampening 0, no nesterov: what
``train.make_optimizer`` builds) and ``torch.optim.Adam`` (L2 weight decay added to the
gradient, not AdamW) in the same order of operations, with ``lr`` a (K,) tensor broadcast over
each member's slice. Weight decay is per parameter (norm parameters get none unless
``optimizer.norm_weight_decay``), as make_optimizer's two parameter groups do.

Why not torch.optim with lr=1 and gradients pre-scaled by lr_k? For SGD without weight decay
that is exact, but weight decay is added to the gradient *before* the lr, so the decay term
would need scaling too; for Adam the scale cancels in m/sqrt(v). Doing the update ourselves
is exact for both and has no special cases.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor


def _per_member(values: Tensor, like: Tensor) -> Tensor:
    """(K,) values shaped to broadcast over a (K, ...) tensor."""
    return values.view(-1, *([1] * (like.dim() - 1)))


class StackedOptimizer:
    """Base: parameters, their weight decays, the (K,) learning rates, per-parameter state."""

    def __init__(self, params: Sequence[Tensor], weight_decays: Sequence[float], lr: Tensor):
        self.params = list(params)
        self.weight_decays = list(weight_decays)
        self.lr = lr
        self.state: list[dict[str, Tensor]] = [{} for _ in self.params]

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None

    def _grads(self):
        """Each parameter with a gradient: (param, its gradient plus L2 weight decay, state)."""
        for p, wd, state in zip(self.params, self.weight_decays, self.state, strict=True):
            if p.grad is not None:
                yield p, p.grad.add(p, alpha=wd) if wd else p.grad, state

    def keep(self, index: Tensor) -> None:
        """Keep only the members at ``index`` (along dim 0) in the lr and every state tensor."""
        self.lr = self.lr[index]
        for state in self.state:
            for key, value in state.items():
                if value.dim() > 0:
                    state[key] = value[index].contiguous()

    def member_state(self, k: int) -> list[dict[str, Tensor]]:
        """Member ``k``'s slice of every state tensor, in parameter order."""
        return [
            {key: v[k].clone() if v.dim() else v.clone() for key, v in s.items()}
            for s in self.state
        ]


class StackedSGD(StackedOptimizer):
    """torch.optim.SGD (momentum, weight decay, dampening 0, no nesterov), lr per member."""

    def __init__(self, params, weight_decays, lr: Tensor, momentum: float = 0.0):
        super().__init__(params, weight_decays, lr)
        self.momentum = momentum

    @torch.no_grad()
    def step(self) -> None:
        for p, grad, state in self._grads():
            if self.momentum:
                buf = state.get("momentum_buffer")
                if buf is None:
                    buf = state["momentum_buffer"] = grad.detach().clone()
                else:
                    buf.mul_(self.momentum).add_(grad)
                grad = buf
            p.addcmul_(grad, _per_member(self.lr, p), value=-1)


class StackedAdam(StackedOptimizer):
    """torch.optim.Adam (betas 0.9/0.999, eps 1e-8, L2 weight decay, no amsgrad), lr per member.

    All members take every step together, so the step count (and bias corrections) is shared.
    """

    def __init__(self, params, weight_decays, lr: Tensor, betas=(0.9, 0.999), eps: float = 1e-8):
        super().__init__(params, weight_decays, lr)
        self.betas, self.eps = betas, eps
        self.steps = 0

    @torch.no_grad()
    def step(self) -> None:
        self.steps += 1
        beta1, beta2 = self.betas
        bias_correction1 = 1 - beta1**self.steps
        bias_correction2_sqrt = math.sqrt(1 - beta2**self.steps)
        for p, grad, state in self._grads():
            if not state:
                state["exp_avg"] = torch.zeros_like(p)
                state["exp_avg_sq"] = torch.zeros_like(p)
            exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
            exp_avg.lerp_(grad, 1 - beta1)
            exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
            denom = (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(self.eps)
            step_size = _per_member(self.lr, p) / bias_correction1
            p.addcdiv_(exp_avg * step_size, denom, value=-1)


class StackedPlateau:
    """One ReduceLROnPlateau per member, on a one-parameter dummy optimizer holding its lr.

    torch's own scheduler decides (patience, threshold, cooldown exactly as a single run);
    ``step`` copies the members' current lrs into the stacked optimizer.
    """

    def __init__(self, optimizer: StackedOptimizer, patience: int, factor: float):
        self.optimizer = optimizer
        self.schedulers = []
        for lr in optimizer.lr.tolist():
            dummy = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=lr)
            self.schedulers.append(
                torch.optim.lr_scheduler.ReduceLROnPlateau(
                    dummy, "min", patience=patience, factor=factor
                )
            )

    def step(self, val_losses: Sequence[float]) -> None:
        for scheduler, loss in zip(self.schedulers, val_losses, strict=True):
            scheduler.step(loss)
        lrs = [s.optimizer.param_groups[0]["lr"] for s in self.schedulers]
        self.optimizer.lr = torch.tensor(lrs, dtype=self.optimizer.lr.dtype).to(
            self.optimizer.lr.device
        )

    def keep(self, index: Sequence[int]) -> None:
        self.schedulers = [self.schedulers[i] for i in index]
