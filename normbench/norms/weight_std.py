"""Weight Standardization (Qiao et al. 2019): conv and linear layers with standardized weights.

Each output channel's weights are standardized over their fan-in before every forward pass::

    W_hat = (W - mean(W)) / (std(W) + eps)        mean, std over in_channels x kH x kW

``std`` is the population standard deviation (1/I, the paper's formula); the authors' code
uses the unbiased one. The two differ by the constant factor sqrt(I / (I - 1)) per layer,
which the group norm after the layer cancels (up to eps). Gradients flow through the
standardization into the raw ``weight``, which stays an ``nn.Parameter``: initialization
(``reset_parameters``), weight decay and per-layer gradient norms act on it as on a plain
layer. (``torch.nn.utils.parametrize`` would hide the raw weight behind a computed
``weight``: in-place initialization would then reset a temporary copy.)
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn


def standardize_weight(weight: Tensor, eps: float) -> Tensor:
    """Each output channel's weights (dim 0) standardized over all the other dims."""
    flat = weight.flatten(1)
    mean = flat.mean(1, keepdim=True)
    std = flat.std(1, correction=0, keepdim=True)
    return ((flat - mean) / (std + eps)).view_as(weight)


class WSConv2d(nn.Conv2d):
    """``nn.Conv2d`` whose forward uses the standardized weight."""

    def __init__(self, *args, ws_eps: float = 1e-5, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.ws_eps = ws_eps

    def forward(self, x: Tensor) -> Tensor:
        return self._conv_forward(x, standardize_weight(self.weight, self.ws_eps), self.bias)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, ws_eps={self.ws_eps}"


class WSLinear(nn.Linear):
    """``nn.Linear`` whose forward uses the standardized weight."""

    def __init__(self, *args, ws_eps: float = 1e-5, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.ws_eps = ws_eps

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, standardize_weight(self.weight, self.ws_eps), self.bias)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, ws_eps={self.ws_eps}"
