"""RMSNorm (Zhang & Sennrich 2019) for channels-first feature maps.

``y = g * x / sqrt(mean(x^2) + eps)``: layer norm without the mean subtraction and without a
bias. On (N, C) features the mean is over C (``torch.nn.RMSNorm``). On (N, C, H, W) maps
``nn.RMSNorm`` would reduce over the last dims (W, or H and W), not over the channels, so
this module reduces over C, H and W per example, with one gain per channel: the same
choice normbench makes for layer norm on maps (GroupNorm(1, C), the GN paper's LN).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


class ChannelRMSNorm(nn.Module):
    """RMSNorm over C, H, W of each (C, H, W) map, with a per-channel gain ``weight``."""

    def __init__(self, num_features: int, eps: float = 1e-5, affine: bool = True) -> None:
        super().__init__()
        self.num_features, self.eps = num_features, eps
        self.weight = nn.Parameter(torch.ones(num_features)) if affine else None

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != 4:
            raise ValueError(f"expected (N, C, H, W) maps, got shape {list(x.shape)}")
        y = x * torch.rsqrt(x.pow(2).mean(dim=(1, 2, 3), keepdim=True) + self.eps)
        return y if self.weight is None else y * self.weight.view(1, -1, 1, 1)

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}, affine={self.weight is not None}"
