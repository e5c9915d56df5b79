"""Batch renormalization (Ioffe 2017, arXiv 1702.03275), Algorithm 1.

In training, with the batch statistics mu_B, sigma_B and the moving ones mu, sigma::

    r = stop_grad(clip(sigma_B / sigma, 1/rmax, rmax))
    d = stop_grad(clip((mu_B - mu) / sigma, -dmax, dmax))
    y = gamma * ((x - mu_B) / sigma_B * r + d) + beta

and in inference ``y = gamma * (x - mu) / sigma + beta``. As in the paper,
``sigma_B = sqrt(var_B + eps)`` with the biased batch variance (what nn.BatchNorm normalizes
with), and the moving average tracks sigma_B itself (the standard deviation, eps included),
not the variance: inference then divides by sigma without adding eps again. With r and d
unclipped, the training output equals the inference output; with rmax=1 and dmax=0 it is
batch norm.

rmax and dmax follow a schedule in training steps (``num_batches_tracked`` counts training
forward passes): 1 and 0 for ``warmup_steps``, then linear ramps to ``rmax`` over
``rmax_ramp_steps`` and to ``dmax`` over ``dmax_ramp_steps``. The paper: 5k warm-up steps,
rmax=3 by 40k and dmax=5 by 25k, moving-average rate (momentum) 0.01.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from normbench.norms.reference_batchnorm import register_affine


def _ramp(step: Tensor, length: int) -> Tensor:
    """0 up to ``step`` 0, then linear to 1 over ``length`` steps (a length of 0 counts as 1)."""
    return (step / max(length, 1)).clamp(0, 1)


class BatchRenorm(nn.Module):
    """Batch renormalization over (N, C) features or (N, C, H, W) maps (stats per channel)."""

    def __init__(
        self,
        num_features: int,
        *,
        eps: float,
        momentum: float | None,
        affine: bool,
        rmax: float,
        dmax: float,
        warmup_steps: int,
        rmax_ramp_steps: int,
        dmax_ramp_steps: int,
    ) -> None:
        """Every setting is required: its defaults live in configs/norm/batch_renorm.yaml."""
        super().__init__()
        self.num_features = num_features
        self.eps = eps
        self.momentum = momentum  # None: cumulative average, as nn.BatchNorm
        self.rmax, self.dmax = rmax, dmax
        self.warmup_steps = warmup_steps
        self.rmax_ramp_steps, self.dmax_ramp_steps = rmax_ramp_steps, dmax_ramp_steps
        register_affine(self, num_features, affine)
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_std", torch.ones(num_features))
        self.register_buffer("num_batches_tracked", torch.tensor(0))

    def extra_repr(self) -> str:
        return (
            f"{self.num_features}, eps={self.eps}, momentum={self.momentum}, "
            f"affine={self.weight is not None}, rmax={self.rmax}, dmax={self.dmax}, "
            f"warmup_steps={self.warmup_steps}, rmax_ramp_steps={self.rmax_ramp_steps}, "
            f"dmax_ramp_steps={self.dmax_ramp_steps}"
        )

    def limits(self) -> tuple[Tensor, Tensor]:
        """The (rmax, dmax) in force for the next training step."""
        step = self.num_batches_tracked - self.warmup_steps
        rmax = 1 + (self.rmax - 1) * _ramp(step, self.rmax_ramp_steps)
        return rmax, self.dmax * _ramp(step, self.dmax_ramp_steps)

    def forward(self, x: Tensor) -> Tensor:
        channels_last = x.movedim(1, -1)  # statistics per channel over every other dimension
        if self.training:
            if x.numel() // self.num_features < 2:
                raise ValueError(
                    "Expected more than 1 value per channel when training, "
                    f"got input size {x.shape}"
                )
            x_hat = self._renormalize(channels_last)
        else:
            x_hat = (channels_last - self.running_mean) / self.running_std
        if self.weight is not None:
            x_hat = x_hat * self.weight + self.bias
        return x_hat.movedim(-1, 1)

    def _renormalize(self, x: Tensor) -> Tensor:
        dims = tuple(range(x.dim() - 1))
        mean = x.mean(dims)
        std = torch.sqrt(x.var(dims, unbiased=False) + self.eps)
        rmax, dmax = self.limits()
        with torch.no_grad():  # r and d are constants of the backward pass
            r = torch.clamp(std / self.running_std, 1 / rmax, rmax)
            d = torch.clamp((mean - self.running_mean) / self.running_std, -dmax, dmax)
            self.num_batches_tracked += 1
            factor = 1 / int(self.num_batches_tracked) if self.momentum is None else self.momentum
            self.running_mean.lerp_(mean, factor)
            self.running_std.lerp_(std, factor)
        return (x - mean) / std * r + d
