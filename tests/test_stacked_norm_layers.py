"""The stacked forms of FRN, RMSNorm, weight standardization and ghost batch norm, layer by
layer, against K single modules: outputs, input and parameter gradients, running statistics,
in float64 (exact semantics: agreement to float64 rounding). Settings the configs do not
reach are covered here: a last, smaller virtual batch, eval without running statistics,
FRN with and without a learned eps in one network, eps=None for nn.RMSNorm.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from normbench.datasets import DataSplits, load_dataset
from normbench.engine.layers import (
    StackedChannelRMSNorm,
    StackedFilterResponseNorm,
    StackedGhostBatchNorm,
    StackedNet,
    StackedRMSNorm,
    StackedWSConv2d,
    StackedWSLinear,
    unsupported_module,
)
from normbench.models import lenet
from normbench.norms.frn import FilterResponseNorm
from normbench.norms.ghost_batchnorm import GhostBatchNorm
from normbench.norms.rms_norm import ChannelRMSNorm
from normbench.norms.weight_std import WSConv2d, WSLinear
from tests.test_stacked import close, members, single_run, stacked_run

K, B, C, HW = 3, 10, 4, 3
STEPS_FLOAT64 = 5  # ghost pairs on features: steps agreeing to 1e-9 in float64 (seen: 2e-11)


def _templates(make) -> list[nn.Module]:
    """K modules with different parameters (and running statistics, when they have some)."""
    out = []
    for k in range(K):
        torch.manual_seed(k)
        module = make().double()
        with torch.no_grad():
            for p in module.parameters():
                p.add_(torch.randn_like(p) * 0.3)
            for name, b in module.named_buffers():
                if name in ("running_mean", "running_var"):
                    b.copy_(torch.rand_like(b) + 0.5)
        out.append(module)
    return out


def _stack_input(xs: list[torch.Tensor], spatial: bool) -> torch.Tensor:
    """Per-member (B, C, ...) inputs -> maps (B, K*C, H, W) or features (K, F, B)."""
    if spatial:
        return torch.stack(xs, 1).flatten(1, 2)
    return torch.stack(xs).transpose(1, 2)


def _member(y: torch.Tensor, k: int, spatial: bool) -> torch.Tensor:
    if spatial:
        return y.unflatten(1, (K, -1))[:, k]
    return y[k].T


def _compare(singles, stacked, spatial: bool, train: bool = True, batch: int = B):
    shape = (batch, C, HW, HW) if spatial else (batch, C)
    xs = [torch.randn(shape, dtype=torch.float64) * (k + 1) for k in range(K)]
    grads = [torch.randn(shape, dtype=torch.float64) for _ in range(K)]
    for module in (*singles, stacked):
        module.train(train)
    x = _stack_input(xs, spatial).clone().requires_grad_(True)
    y = stacked(x)
    (y * _stack_input(grads, spatial)).sum().backward()
    for k, single in enumerate(singles):
        xk = xs[k].clone().requires_grad_(True)
        yk = single(xk)
        (yk * grads[k]).sum().backward()
        torch.testing.assert_close(_member(y, k, spatial), yk)
        torch.testing.assert_close(_member(x.grad, k, spatial), xk.grad)
        for name, p in single.named_parameters():
            torch.testing.assert_close(getattr(stacked, name).grad[k], p.grad, msg=name)
        for name, b in single.named_buffers():
            torch.testing.assert_close(getattr(stacked, name)[k], b, msg=name)


@pytest.mark.parametrize("spatial", [True, False])
@pytest.mark.parametrize("learned_eps", [True, False])
def test_frn(spatial, learned_eps):
    singles = _templates(lambda: FilterResponseNorm(C, eps=1e-3, learned_eps=learned_eps))
    _compare(singles, StackedFilterResponseNorm(singles, spatial), spatial)


@pytest.mark.parametrize("affine", [True, False])
def test_channel_rms_norm(affine):
    singles = _templates(lambda: ChannelRMSNorm(C, affine=affine))
    _compare(singles, StackedChannelRMSNorm(singles, True), True)


@pytest.mark.parametrize("eps", [1e-5, None])
@pytest.mark.parametrize("affine", [True, False])
def test_rms_norm_on_features(eps, affine):
    singles = _templates(lambda: nn.RMSNorm(C, eps=eps, elementwise_affine=affine))
    _compare(singles, StackedRMSNorm(singles, False), False)


@pytest.mark.parametrize("spatial", [True, False])
@pytest.mark.parametrize(
    "v, kwargs",
    [
        (5, {}),
        (4, {}),  # 10 = 4 + 4 + 2: a last, smaller virtual batch
        (2, {"momentum": None, "affine": False}),
        (4, {"track_running_stats": False}),
    ],
)
def test_ghost_batch_norm(spatial, v, kwargs):
    singles = _templates(lambda: GhostBatchNorm(C, v, **kwargs))
    stacked = StackedGhostBatchNorm(singles, spatial)
    for _ in range(2):  # twice: num_batches_tracked 1 and 2 (the cumulative average)
        for module in (*singles, stacked):
            module.zero_grad()
        _compare(singles, stacked, spatial)
    _compare(singles, stacked, spatial, train=False, batch=7)  # eval: running or virtual


def test_ghost_batch_norm_rejects_a_virtual_batch_of_one_on_features():
    singles = _templates(lambda: GhostBatchNorm(C, 4))
    with pytest.raises(ValueError, match="more than 1 value"):
        _compare(singles, StackedGhostBatchNorm(singles, False), False, batch=9)


def test_ws_linear():
    singles = _templates(lambda: WSLinear(C, 5))
    stacked = StackedWSLinear(singles)
    xs = [torch.randn(B, C, dtype=torch.float64) for _ in range(K)]
    y = stacked(_stack_input(xs, False))
    y.pow(2).sum().backward()
    for k, single in enumerate(singles):
        yk = single(xs[k])
        yk.pow(2).sum().backward()
        torch.testing.assert_close(y[k].T, yk)
        torch.testing.assert_close(stacked.weight.grad[k], single.weight.grad)
        torch.testing.assert_close(stacked.bias.grad[k], single.bias.grad)


def test_ws_conv2d():
    singles = _templates(lambda: WSConv2d(C, 5, 3, padding=1, bias=False))
    stacked = StackedWSConv2d(singles)
    xs = [torch.randn(B, C, 6, 6, dtype=torch.float64) for _ in range(K)]
    y = stacked(_stack_input(xs, True))
    y.pow(2).sum().backward()
    for k, single in enumerate(singles):
        yk = single(xs[k])
        yk.pow(2).sum().backward()
        torch.testing.assert_close(y.unflatten(1, (K, -1))[:, k], yk)
        torch.testing.assert_close(stacked.weight.grad[k], single.weight.grad)


def test_a_net_with_frn_learning_eps_on_some_layers_only():
    """eps_l present on the dense layer's FRN, None on the convs' (per layer, not per net)."""

    def make():
        return lenet(
            (1, 16, 16), 3, [4, 6], [5],
            lambda c: FilterResponseNorm(c, learned_eps=False),
            lambda c: FilterResponseNorm(c, learned_eps=True),
            norm_activates=True, activation="relu",
        )  # fmt: skip

    singles = _templates(make)
    assert singles[0].blocks[1].norm.eps_l is None and singles[0].blocks[2].norm.eps_l is not None
    assert unsupported_module(singles[0]) is None
    stacked = StackedNet(singles, [torch.Generator() for _ in range(K)])
    x = torch.randn(K, B, 1, 16, 16, dtype=torch.float64)
    out = stacked(x)
    out.pow(2).sum().backward()
    state = stacked.state_dict()
    for k, single in enumerate(singles):
        yk = single(x[k])
        yk.pow(2).sum().backward()
        torch.testing.assert_close(out[k], yk)
        assert state.keys() == single.state_dict().keys()
        named = dict(stacked.named_parameters())
        for name, p in single.named_parameters():
            torch.testing.assert_close(named[name].grad[k], p.grad, msg=name)


# -- ghost batch norm over pairs on dense layers, in the trainer ----------------------------


def _float64(data: DataSplits) -> DataSplits:
    def cast(split):
        return None if split is None else (split[0].double(), split[1])

    return DataSplits(
        cast(data.train), cast(data.val), cast(data.test), data.input_shape, data.num_outputs,
        data.task,
    )  # fmt: skip


@pytest.mark.parametrize("model", ["mlp", "ioffe_mlp", "lenet"])
def test_ghost_pairs_on_dense_layers_train_as_single_runs_in_float64(model):
    """Virtual batches of 2 on (N, F) features normalize each pair to about +-1, with slopes
    up to 1/sqrt(eps) where a pair's two values are close: training is so ill-conditioned
    that two float64 computations differing by 1e-16 drift apart ~10x per step (float32's
    1e-7 passes 1e-4 within 3 steps, in test_stacked). The first steps, in float64, still
    tell a different method (a member's data or statistics mixed up) from rounding."""
    dtype, threads = torch.get_default_dtype(), torch.get_num_threads()
    torch.set_default_dtype(torch.float64)
    torch.set_num_threads(1)
    try:
        cfgs = members(f"model={model}", "norm=ghost_batch_v2", "batch_size=8")
        data = {c.seed: _float64(load_dataset(c.dataset, c.seed)) for c in cfgs}
        _, losses, *_ = stacked_run(cfgs, datasets=data)
        for k, cfg in enumerate(cfgs):
            single = single_run(cfg, data=data[cfg.seed])[0]
            for step in range(STEPS_FLOAT64):
                assert close(losses[step][k], single[step], 1e-9), (k, step)
    finally:
        torch.set_default_dtype(dtype)
        torch.set_num_threads(threads)
