"""The documents' batch norm, written out by hand: to be read and compared, not to be fast.

Document 004's ``CustomBatchNorm1d`` with running statistics and document 003's hand-derived
backward pass (as a ``torch.autograd.Function``), corrected where the documents are wrong so
that it matches ``nn.BatchNorm1d``/``nn.BatchNorm2d`` in training and eval:

- document 004 stored the biased batch variance in ``running_var``; PyTorch (and Ioffe &
  Szegedy's inference rule) store the unbiased one. The biased one still normalizes the batch.
- document 004 rebound its buffers to tensors carrying the autograd graph, which chains every
  step's graph to the next; here the running statistics are updated in place without grad.
- ``momentum=None`` (PyTorch's cumulative average) and (N, C, H, W) maps, with statistics per
  channel over N, H, W, are supported; document 004 handled neither.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.autograd.function import once_differentiable


class BatchNormFunction(torch.autograd.Function):
    """Batch norm of an (M, C) matrix over its M rows; returns (y, batch mean, batch variance).

    Once differentiable: the hand-written backward treats the saved batch mean and variance
    as constants, so differentiating it again (a gradient penalty, Hessian-vector products)
    would give a silently wrong second derivative (gradgradcheck is 0.51 off). Double
    backward raises instead; use ``norm=batch`` for it.
    """

    @staticmethod
    def forward(ctx, x: Tensor, gamma: Tensor, beta: Tensor, eps: float):
        mean = x.mean(0)
        var = x.var(0, unbiased=False)
        x_hat = (x - mean) / torch.sqrt(var + eps)
        ctx.eps = eps
        ctx.save_for_backward(x, gamma, mean, var)
        ctx.mark_non_differentiable(mean, var)
        return gamma * x_hat + beta, mean, var

    @staticmethod
    @once_differentiable
    def backward(ctx, dl_dz: Tensor, _dl_dmean: Tensor, _dl_dvar: Tensor):
        # Document 003's formula, names as there: z = gamma * normalized_x + beta.
        x, gamma, mean, variance = ctx.saved_tensors
        n = x.shape[0]
        inv_std = 1 / torch.sqrt(variance + ctx.eps)
        x_mu = x - mean
        dl_dgamma = (dl_dz * x_mu * inv_std).sum(0)
        dl_dbeta = dl_dz.sum(0)
        dl_dnormalized_x = dl_dz * gamma
        # Document 003 multiplied dL_dz instead of dL_dnormalized_x into dL_dvariance and
        # dL_dmean, dropping gamma: its gradient was right only for gamma = 1. It also summed
        # -2 (x - mean) over the whole array instead of per feature (axis=0).
        dl_dvariance = (dl_dnormalized_x * x_mu).sum(0) * -0.5 * inv_std**3
        dl_dmean = -(dl_dnormalized_x * inv_std).sum(0) + dl_dvariance * (-2 * x_mu).sum(0) / n
        dl_dx = dl_dnormalized_x * inv_std + dl_dvariance * 2 * x_mu / n + dl_dmean / n
        return dl_dx, dl_dgamma, dl_dbeta, None


def register_affine(module: nn.Module, num_features: int, affine: bool) -> None:
    """``weight`` (gamma, ones) and ``bias`` (beta, zeros), or None for both, as nn.BatchNorm."""
    if affine:
        module.weight = nn.Parameter(torch.ones(num_features))
        module.bias = nn.Parameter(torch.zeros(num_features))
    else:
        module.register_parameter("weight", None)
        module.register_parameter("bias", None)


class ReferenceBatchNorm(nn.Module):
    """Batch norm over (N, C) features or (N, C, H, W) maps, same arguments as nn.BatchNorm."""

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
    ) -> None:
        super().__init__()
        self.num_features = num_features
        self.eps = eps
        self.momentum = momentum
        self.track_running_stats = track_running_stats
        register_affine(self, num_features, affine)
        stats = track_running_stats
        self.register_buffer("running_mean", torch.zeros(num_features) if stats else None)
        self.register_buffer("running_var", torch.ones(num_features) if stats else None)
        self.register_buffer("num_batches_tracked", torch.tensor(0) if stats else None)

    def extra_repr(self) -> str:
        return (
            f"{self.num_features}, eps={self.eps}, momentum={self.momentum}, "
            f"affine={self.weight is not None}, track_running_stats={self.track_running_stats}"
        )

    def forward(self, x: Tensor) -> Tensor:
        channels_last = x.movedim(1, -1)  # statistics per channel over every other dimension
        gamma = self.weight if self.weight is not None else x.new_ones(self.num_features)
        beta = self.bias if self.bias is not None else x.new_zeros(self.num_features)
        if not (self.training or self.running_mean is None):
            x_hat = (channels_last - self.running_mean) / torch.sqrt(self.running_var + self.eps)
            return (gamma * x_hat + beta).movedim(-1, 1)
        rows = channels_last.reshape(-1, self.num_features)
        if rows.shape[0] < 2:
            raise ValueError(
                f"Expected more than 1 value per channel when training, got input size {x.shape}"
            )
        y, mean, var = BatchNormFunction.apply(rows, gamma, beta, self.eps)
        if self.training and self.running_mean is not None:
            self._update_running_stats(mean, var, rows.shape[0])
        return y.reshape(channels_last.shape).movedim(-1, 1)

    @torch.no_grad()
    def _update_running_stats(self, mean: Tensor, var: Tensor, n: int) -> None:
        self.num_batches_tracked += 1
        factor = 1 / int(self.num_batches_tracked) if self.momentum is None else self.momentum
        self.running_mean.lerp_(mean, factor)
        self.running_var.lerp_(var * n / (n - 1), factor)
