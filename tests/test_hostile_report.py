"""An outside review's hostile inputs and wrong numbers, one test per item (numbers are theirs):
each fails on the code before its fix."""

from __future__ import annotations

import pytest
import torch
from torch.autograd import gradcheck, gradgradcheck

from normbench.reference_batchnorm import BatchNormFunction

f64 = torch.float64


# ----------------------------------------------------------------------------- item 5


def test_reference_batch_norm_backward_is_once_differentiable() -> None:
    """The hand-written backward is right (gradcheck) but is not itself differentiated
    correctly: a second derivative must fail loudly rather than be 0.51 off silently."""
    torch.manual_seed(0)
    x, gamma, beta = (torch.randn(*shape, dtype=f64, requires_grad=True) for shape in
                      [(6, 3), (3,), (3,)])  # fmt: skip
    bn = lambda *t: BatchNormFunction.apply(*t, 1e-5)[0]  # noqa: E731
    assert gradcheck(bn, (x, gamma, beta))
    (grad_x,) = torch.autograd.grad(bn(x, gamma, beta).pow(3).sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="differentiate twice .* @once_differentiable"):
        grad_x.sum().backward()
    with pytest.raises(RuntimeError):
        gradgradcheck(bn, (x, gamma, beta))
