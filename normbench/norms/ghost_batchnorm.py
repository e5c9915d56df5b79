"""Ghost batch normalization (Hoffer, Hubara & Soudry 2017).

In training the batch is split into consecutive virtual batches of ``virtual_batch_size``
examples, each normalized with its own mean and (biased) variance; the loss and the optimizer
step still cover the whole batch. A last chunk smaller than V (only outside the training loop,
which uses whole batches; planning rejects a batch size V does not divide) is normalized on
its own.

Running statistics are updated **once per batch**, with the mean over virtual batches of
their means and of their unbiased variances: the averaging horizon is counted in optimizer
steps whatever V is (as for plain BN), and the stored variance is what a virtual batch sees.
With V equal to the batch this is exactly ``nn.BatchNorm``. Eval uses the running statistics
(or, without them, virtual batches again).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class GhostBatchNorm(nn.modules.batchnorm._BatchNorm):
    """Batch norm over virtual batches of ``virtual_batch_size``; (N, C) or (N, C, H, W)."""

    def __init__(self, num_features: int, virtual_batch_size: int, **kwargs) -> None:
        super().__init__(num_features, **kwargs)
        self.virtual_batch_size = virtual_batch_size

    def _check_input_dim(self, x: Tensor) -> None:
        if x.dim() not in (2, 4):
            raise ValueError(f"expected (N, C) or (N, C, H, W) input, got shape {list(x.shape)}")

    def forward(self, x: Tensor) -> Tensor:
        self._check_input_dim(x)
        if not self.training and self.running_mean is not None:
            return F.batch_norm(
                x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0,
                self.eps,
            )  # fmt: skip
        v = self.virtual_batch_size
        full = len(x) // v * v
        parts = [x[:full].unflatten(0, (-1, v))] if full else []
        if full < len(x):
            parts.append(x[full:].unsqueeze(0))  # a last, smaller virtual batch
        outputs, means, variances = [], [], []
        for chunks in parts:  # (K, V, C, ...): K virtual batches at once
            dims = (1, *range(3, chunks.dim()))
            if x.dim() == 2 and chunks.shape[1] < 2:
                raise ValueError("Expected more than 1 value per channel when training")
            mean = chunks.mean(dims, keepdim=True)
            var = chunks.var(dims, correction=0, keepdim=True)
            outputs.append(((chunks - mean) * torch.rsqrt(var + self.eps)).flatten(0, 1))
            n = chunks[0].numel() // self.num_features
            means.append(mean.flatten(1))
            variances.append(var.flatten(1) * n / max(n - 1, 1))
        y = torch.cat(outputs)
        if self.affine:
            shape = (1, -1) + (1,) * (x.dim() - 2)
            y = y * self.weight.view(shape) + self.bias.view(shape)
        if self.training and self.track_running_stats:
            self._update_running_stats(torch.cat(means).mean(0), torch.cat(variances).mean(0))
        return y

    @torch.no_grad()
    def _update_running_stats(self, mean: Tensor, var: Tensor) -> None:
        self.num_batches_tracked.add_(1)
        rate = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
        self.running_mean.lerp_(mean, rate)
        self.running_var.lerp_(var, rate)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, virtual_batch_size={self.virtual_batch_size}"
