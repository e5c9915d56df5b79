"""Issue 11's batch-independent norms and ghost batch norm, beyond tests/test_norms.py's
generic formula checks: FRN on 1x1 features, weight standardization inside the models, ghost
batch norm's virtual batches and running statistics, and each norm end to end."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd import gradcheck

from normbench import norms
from normbench.app import compose_config
from normbench.checks import check_run
from normbench.engine.lifecycle import run_experiment
from normbench.errors import ConfigError
from normbench.models import build_model, init_paired
from normbench.norms.frn import FilterResponseNorm
from normbench.norms.ghost_batchnorm import GhostBatchNorm
from normbench.norms.weight_std import WSConv2d, WSLinear, standardize_weight
from tests.test_norms import assert_same_forward_and_backward, batch_formula, norm_cfg, randn

f64 = torch.float64
C = 6


@pytest.fixture(autouse=True)
def seed():
    torch.manual_seed(0)


def model(overrides: list[str], shape=(1, 16, 16)) -> nn.Module:
    cfg = compose_config(overrides)
    net = build_model(cfg.model, cfg.norm, shape, 10)
    init_paired(net, seed=0)
    return net


# ----------------------------------------------------------------------------- FRN


def test_frn_gradcheck_on_maps_and_features():
    for shape in [(3, 2, 2, 2), (4, 2)]:
        m = FilterResponseNorm(2, eps=1e-3, learned_eps=True).double()
        with torch.no_grad():
            m.tau.fill_(-0.3)  # TLU active on some values, not all
            m.weight.uniform_(0.5, 1.5)
        x = randn(*shape)
        assert gradcheck(m, (x,))


def test_frn_on_features_is_a_sign_unless_eps_is_learned():
    """H = W = 1: nu2 = x^2, so x / sqrt(x^2 + 1e-6) is sign(x) with almost no gradient;
    the learned eps (eps + |eps_l|, eps_l from 1) keeps it smooth and lets eps itself learn."""
    x = randn(64, C)
    fixed = FilterResponseNorm(C, eps=1e-6).double()
    with torch.no_grad():
        fixed.tau.fill_(-10.0)  # TLU out of the way: the normalization alone
    y = fixed(x)
    away = x.abs() > 0.05  # |x| >> sqrt(eps) = 1e-3: the sign to 2e-4
    torch.testing.assert_close(y[away], torch.sign(x)[away], atol=1e-3, rtol=0)
    (grad_fixed,) = torch.autograd.grad(y.sum(), x)
    learned = FilterResponseNorm(C, eps=1e-6, learned_eps=True).double()
    with torch.no_grad():
        learned.tau.fill_(-10.0)
    y = learned(x)
    (grad_learned, grad_eps) = torch.autograd.grad(y.pow(2).sum(), [x, learned.eps_l])
    assert grad_fixed.abs().median() < 1e-3 < grad_learned.abs().median()
    assert grad_eps.abs() > 0


def test_frn_replaces_the_activation_after_it():
    net = model(["model=lenet", "norm=frn"])
    conv1, conv2, dense = net.blocks
    assert isinstance(conv1.act, nn.ReLU)  # lenet's first conv has no norm: it keeps ReLU
    assert isinstance(conv2.norm, FilterResponseNorm) and isinstance(conv2.act, nn.Identity)
    assert isinstance(dense.norm, FilterResponseNorm) and isinstance(dense.act, nn.Identity)
    with pytest.raises(ConfigError, match="includes its activation.*before_activation"):
        model(["model=mlp", "norm=frn", "model.norm_position=after_activation"])


# ----------------------------------------------------------------------------- weight std


def test_standardized_weight_matches_the_formula_and_its_gradient():
    w = randn(5, 3, 3, 3)
    flat = w.reshape(5, -1)
    mean = flat.sum(1, keepdim=True) / flat.shape[1]
    std = ((flat - mean).pow(2).sum(1, keepdim=True) / flat.shape[1]).sqrt()  # 1/I
    expected = ((flat - mean) / (std + 1e-5)).reshape(w.shape)
    assert_same_forward_and_backward(standardize_weight(w, 1e-5), expected, [w])
    out = standardize_weight(w, 1e-5).flatten(1)
    torch.testing.assert_close(out.mean(1), torch.zeros(5, dtype=f64))
    ones = torch.ones(5, dtype=f64)
    torch.testing.assert_close(out.std(1, correction=0), ones, atol=1e-4, rtol=0)
    assert gradcheck(lambda t: standardize_weight(t, 1e-5), (randn(3, 4),))


def test_ws_layers_use_the_standardized_weight():
    conv = WSConv2d(3, 4, 3, padding=1, ws_eps=1e-5).double()
    x = randn(2, 3, 5, 5)
    expected = F.conv2d(x, standardize_weight(conv.weight, 1e-5), conv.bias, padding=1)
    assert_same_forward_and_backward(conv(x), expected, [x, conv.weight, conv.bias])
    linear = WSLinear(3, 4, ws_eps=1e-5).double()
    x = randn(2, 3)
    expected = F.linear(x, standardize_weight(linear.weight, 1e-5), linear.bias)
    assert_same_forward_and_backward(linear(x), expected, [x, linear.weight, linear.bias])


@pytest.mark.parametrize("name", ["lenet", "convnet", "mlp"])
def test_ws_group_models_standardize_every_normalized_layer(name):
    net = model([f"model={name}", "norm=ws_group"])
    plain = model([f"model={name}", "norm=group"])
    for block, twin in zip(net.blocks, plain.blocks, strict=True):
        normalized = isinstance(block.norm, nn.GroupNorm)
        assert isinstance(block.layer, WSConv2d | WSLinear) == normalized
        # Paired seeds: the raw weights are the group-norm model's (init reaches them).
        torch.testing.assert_close(block.layer.weight, twin.layer.weight)
    x = torch.randn(4, 1, 16, 16)
    assert not torch.allclose(net(x), plain(x))  # and the forward pass does standardize


# ----------------------------------------------------------------------------- ghost batch


def ghost(spatial: bool, v: int, **kw) -> GhostBatchNorm:
    cfg = norm_cfg("ghost_batch", virtual_batch_size=v, **kw)
    return norms.get_norm_layer(cfg, spatial)(C).double()


@pytest.mark.parametrize("spatial", [False, True])
def test_ghost_batch_with_v_equal_to_the_batch_is_batch_norm(spatial):
    shape = (8, C, 3, 3) if spatial else (8, C)
    ours = ghost(spatial, v=8)
    theirs = norms.get_norm_layer(norm_cfg("batch"), spatial)(C).double()
    with torch.no_grad():
        for p in ours.parameters():
            p.uniform_(0.5, 1.5)
    theirs.load_state_dict(ours.state_dict())
    for training in (True, True, True, False):
        ours.train(training), theirs.train(training)
        x, g = randn(*shape), torch.randn(shape, dtype=f64)
        for a, b in zip(_out_grads(ours, x, g), _out_grads(theirs, x, g), strict=True):
            torch.testing.assert_close(a, b)
    torch.testing.assert_close(ours.state_dict(), theirs.state_dict())


def _out_grads(m: nn.Module, x: torch.Tensor, g: torch.Tensor) -> list[torch.Tensor]:
    y = m(x)
    return [y, *torch.autograd.grad((y * g).sum(), [x, m.weight, m.bias])]


@pytest.mark.parametrize("spatial", [False, True])
def test_ghost_batch_normalizes_each_virtual_batch_and_averages_running_stats_per_batch(spatial):
    shape = (8, C, 2, 2) if spatial else (8, C)
    m = ghost(spatial, v=2, momentum=0.1)
    dims = [0, 2, 3] if spatial else [0]
    mean, var = torch.zeros(C, dtype=f64), torch.ones(C, dtype=f64)
    for _ in range(3):
        x = randn(*shape)
        expected = torch.cat([batch_formula(chunk, m) for chunk in x.split(2)])
        assert_same_forward_and_backward(m(x), expected, [x, m.weight, m.bias])
        # Once per batch: the mean over the 4 virtual batches of their mean / unbiased var.
        chunk_means = torch.stack([c.mean(dims) for c in x.split(2)]).mean(0)
        chunk_vars = torch.stack([c.var(dims, unbiased=True) for c in x.split(2)]).mean(0)
        mean, var = 0.9 * mean + 0.1 * chunk_means, 0.9 * var + 0.1 * chunk_vars
    assert int(m.num_batches_tracked) == 3  # batches, not virtual batches
    torch.testing.assert_close([m.running_mean, m.running_var], [mean.detach(), var.detach()])
    x = randn(*shape)
    torch.testing.assert_close(m.eval()(x), batch_formula(x, m))  # eval: running statistics
    # The gradient of one virtual batch's loss stays inside it.
    m.train()
    x = randn(*shape)
    (grad,) = torch.autograd.grad(m(x)[:2].pow(2).sum(), x)
    assert grad[2:].abs().max() == 0 and grad[:2].abs().max() > 0


def test_ghost_batch_size_that_v_does_not_divide_is_one_line_at_planning(tmp_path: Path):
    cfg = compose_config(["norm=ghost_batch", "norm.virtual_batch_size=3", "batch_size=32"])
    with pytest.raises(ConfigError, match=r"^norm.virtual_batch_size=3 does not divide "
                       r"batch_size=32; choose a divisor of 32: 2, 4, 8, 16, 32$"):  # fmt: skip
        check_run(cfg)
    cfg = compose_config(["norm=ghost_batch", "norm.virtual_batch_size=1"])
    with pytest.raises(ConfigError, match="at least 2"):
        check_run(cfg)
    assert norms.is_batch_norm(ghost(True, 4))  # frozen, hooked and reported as a batch norm


# ----------------------------------------------------------------------------- end to end

TINY = ["epochs=1", "quiet=true", "dataset.limit=240", "stall_margin=0.0", "batch_size=16"]
RUNS = [
    (model, norm)
    for norm in ["frn", "rms", "ws_group", "ghost_batch"]
    for model in ["mlp", "lenet", "convnet"]
]


@pytest.mark.parametrize("model_name, norm", RUNS)
def test_new_norms_run_end_to_end(model_name: str, norm: str, tmp_path: Path):
    overrides = [*TINY, f"model={model_name}", f"norm={norm}", f"results_dir={tmp_path}"]
    if model_name == "mlp":
        overrides.append("model.hidden=[32,16]")
    cfg = compose_config(overrides)
    result = run_experiment(cfg)
    assert result.status in ("ok", "stalled")
    row = result.rows[-1]
    assert 0 <= row["val_acc"] <= 1 and row["grad_norm"] > 0
    assert torch.isfinite(torch.tensor(row["test_loss"]))
