"""Filter Response Normalization with its Thresholded Linear Unit (Singh & Krishnan 2019).

Per example and channel, with no mean subtraction and no batch statistics::

    nu2 = mean over H, W of x^2
    y   = gamma * x / sqrt(nu2 + eps) + beta
    z   = max(y, tau)                      (TLU: the layer's activation, tau learned)

FRN replaces the activation that would follow it (``NormSpec.includes_activation``): models
apply no activation after it. On (N, C) features H = W = 1, so nu2 = x^2 and, with a tiny
eps, y = gamma * sign(x) + beta: the layer would pass only signs, with vanishing gradients.
The paper's remedy is a learned eps; here ``learned_eps=True`` uses eps + |eps_l| with one
learned eps_l per layer, initialized to :data:`LEARNED_EPS_INIT`. The norm's builder
(``norms._frn``) asks for it on (N, C) features only: on maps nu2 is a mean over H x W and
the fixed eps is what the formula means (eps_l is then None).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

# The learned part's starting value: as large as the typical nu2 of standardized inputs, so
# a 1x1 layer starts as x / sqrt(x^2 + 1) (smooth, with gradients) and learns how sharp to be.
LEARNED_EPS_INIT = 1.0


class FilterResponseNorm(nn.Module):
    """FRN + TLU over (N, C) features or (N, C, H, W) maps; gamma, beta, tau per channel."""

    def __init__(self, num_features: int, eps: float = 1e-6, learned_eps: bool = False) -> None:
        super().__init__()
        self.num_features, self.eps = num_features, eps
        self.weight = nn.Parameter(torch.ones(num_features))  # gamma
        self.bias = nn.Parameter(torch.zeros(num_features))  # beta
        self.tau = nn.Parameter(torch.zeros(num_features))
        self.eps_l = nn.Parameter(torch.tensor(LEARNED_EPS_INIT)) if learned_eps else None

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() not in (2, 4):
            raise ValueError(f"expected (N, C) or (N, C, H, W) input, got shape {list(x.shape)}")
        nu2 = x.pow(2).mean(dim=tuple(range(2, x.dim())), keepdim=True) if x.dim() > 2 else x.pow(2)
        eps = self.eps if self.eps_l is None else self.eps + self.eps_l.abs()
        shape = (1, -1) + (1,) * (x.dim() - 2)
        y = self.weight.view(shape) * x * torch.rsqrt(nu2 + eps) + self.bias.view(shape)
        return torch.maximum(y, self.tau.view(shape))

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}, learned_eps={self.eps_l is not None}"
