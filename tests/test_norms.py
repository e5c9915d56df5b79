"""Every norm against its formula written out here, plus PyTorch's batch-norm semantics."""

from dataclasses import fields
from functools import cache
from importlib.resources import files

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn
from torch.autograd import gradcheck

from normbench import norms
from normbench.app import compose_config
from normbench.errors import ConfigError
from normbench.norms.reference_batchnorm import BatchNormFunction

C = 6
SHAPES = {False: (8, C), True: (4, C, 3, 3)}  # (N, C) features, (N, C, H, W) maps
BATCH_LIKE = ["batch", "batch_renorm", "reference_batch"]
NORM_CONFIGS = files("normbench.configs") / "norm"
f64 = torch.float64


@pytest.fixture(autouse=True)
def seed():
    torch.manual_seed(0)


@cache
def _composed(name: str):
    return compose_config([f"norm={name}"]).norm


def norm_cfg(name: str, **overrides):
    """configs/norm/<name>.yaml on its schema, as Hydra composes it, with ``overrides``."""
    cfg = _composed(name).copy()
    for key, value in overrides.items():
        cfg[key] = value
    return cfg


def build(name: str, spatial: bool, **overrides) -> nn.Module:
    module = norms.get_norm_layer(norm_cfg(name, **overrides), spatial)(C).double()
    with torch.no_grad():  # gamma != 1 and beta != 0, so both show up in the gradients
        for param in module.parameters():
            param.uniform_(0.5, 1.5)
    return module


def randn(*shape: int) -> torch.Tensor:
    return (2 * torch.randn(*shape, dtype=f64) + 1).requires_grad_()


def per_channel(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return t.view((1, -1) + (1,) * (x.dim() - 2))


def reduce_dims(x: torch.Tensor) -> list[int]:
    return [0, *range(2, x.dim())]


def affine(y: torch.Tensor, m: nn.Module) -> torch.Tensor:
    return y if m.weight is None else y * per_channel(m.weight, y) + per_channel(m.bias, y)


def batch_formula(x, m):
    """Ioffe & Szegedy: batch statistics (biased variance) in training, running ones at eval."""
    if m.training or m.running_mean is None:
        mean, var = x.mean(reduce_dims(x)), x.var(reduce_dims(x), unbiased=False)
    else:
        mean, var = m.running_mean, m.running_var
    return affine((x - per_channel(mean, x)) / per_channel(var + m.eps, x).sqrt(), m)


def renorm_formula(x, m):
    """Plain BN in training while warming up; (x - mu) / sigma with the moving ones at eval."""
    if m.training:
        return batch_formula(x, m)
    return affine((x - per_channel(m.running_mean, x)) / per_channel(m.running_std, x), m)


def group_formula(x, m, groups):
    """Per sample over groups of channels (and H, W), then a per-channel affine."""
    g = x.reshape(len(x), groups, -1)
    y = (g - g.mean(-1, keepdim=True)) / (g.var(-1, unbiased=False, keepdim=True) + m.eps).sqrt()
    return affine(y.reshape(x.shape), m)


def ghost_formula(x, m):
    """Hoffer et al.: batch norm on each virtual batch of V examples; running stats at eval."""
    if not m.training and m.running_mean is not None:
        return batch_formula(x, m)
    return torch.cat([batch_formula(chunk, m) for chunk in x.split(m.virtual_batch_size)])


def frn_formula(x, m):
    """Singh & Krishnan: nu2 = mean over H, W of x^2 (x^2 itself on features), no mean; TLU."""
    nu2 = x.pow(2).mean(list(range(2, x.dim())), keepdim=True) if x.dim() > 2 else x.pow(2)
    eps = m.eps + (m.eps_l.abs() if m.eps_l is not None else 0)
    y = per_channel(m.weight, x) * x / (nu2 + eps).sqrt() + per_channel(m.bias, x)
    return torch.max(y, per_channel(m.tau, x))


def rms_formula(x, m):
    """Zhang & Sennrich: g * x / sqrt(mean(x^2) + eps) over the features (C, H, W on maps)."""
    ms = x.pow(2).mean(list(range(1, x.dim())), keepdim=True)
    y = x / (ms + m.eps).sqrt()
    return y if m.weight is None else y * per_channel(m.weight, x)


FORMULAS = {
    "batch": batch_formula,
    "reference_batch": batch_formula,
    "batch_renorm": renorm_formula,
    "layer": lambda x, m: group_formula(x, m, 1),
    "instance": lambda x, m: group_formula(x, m, x.shape[1]),
    "group": lambda x, m: group_formula(x, m, m.num_groups),
    "ghost_batch": ghost_formula,
    "frn": frn_formula,
    "rms": rms_formula,
    # Its norm layer is group norm; the weight standardization is tested in test_norms_more.
    "ws_group": lambda x, m: group_formula(x, m, m.num_groups),
    "batch_per_step": batch_formula,  # one BatchNorm1d per RNN step: see test_rnn
}


def _affine_choices(name: str) -> tuple:
    has_affine = "affine" in {f.name for f in fields(norms.get_norm_spec(name).settings)}
    return (True, False) if has_affine else (None,)  # FRN always has gamma, beta, tau


CASES = [
    (n, s, a)
    for n in FORMULAS
    for s in (False, True)
    if s or not norms.get_norm_spec(n).spatial_only
    for a in _affine_choices(n)
]


def assert_same_forward_and_backward(y, expected, inputs):
    torch.testing.assert_close(y, expected)
    g = torch.randn_like(y)
    ours = torch.autograd.grad((y * g).sum(), inputs)
    reference = torch.autograd.grad((expected * g).sum(), inputs)
    torch.testing.assert_close(ours, reference)


def test_every_norm_has_a_formula_and_a_config_file():
    assert set(norms.norm_names()) == {"none", *FORMULAS}
    assert set(norms.norm_names()) <= {p.name.removesuffix(".yaml") for p in NORM_CONFIGS.iterdir()}
    assert norms.get_norm_layer(norm_cfg("none"), spatial=True) is None


@pytest.mark.parametrize("name, spatial, affine", CASES)
def test_norm_matches_its_formula_in_train_then_eval(name, spatial, affine):
    module = build(name, spatial, **({} if affine is None else {"affine": affine}))
    for training in (True, False):  # eval after a training step: running stats are not (0, 1)
        module.train(training)
        x = randn(*SHAPES[spatial])
        expected = FORMULAS[name](x, module)  # before the forward pass updates running stats
        assert_same_forward_and_backward(module(x), expected, [x, *module.parameters()])


def test_layer_norm_on_maps_is_group_norm_1_with_per_channel_affine():
    module = build("layer", spatial=True)
    assert isinstance(module, nn.GroupNorm) and module.num_groups == 1
    assert module.weight.shape == (C,)


@pytest.mark.parametrize("spatial", [False, True])
@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("name", ["batch", "reference_batch"])
def test_running_stats_store_the_unbiased_variance(name, momentum, spatial):
    module = build(name, spatial, momentum=momentum)
    mean, var = torch.zeros(C, dtype=f64), torch.ones(C, dtype=f64)
    for step in range(1, 4):
        x = randn(*SHAPES[spatial])
        module(x)
        rate = 1 / step if momentum is None else momentum  # None: cumulative average
        mean = (1 - rate) * mean + rate * x.mean(reduce_dims(x))
        var = (1 - rate) * var + rate * x.var(reduce_dims(x), unbiased=True)
    torch.testing.assert_close(module.running_mean, mean.detach())
    torch.testing.assert_close(module.running_var, var.detach())


@pytest.mark.parametrize("spatial", [False, True])
@pytest.mark.parametrize("name", ["batch", "reference_batch"])
def test_without_running_stats_eval_uses_the_batch_statistics(name, spatial):
    module = build(name, spatial, track_running_stats=False).eval()
    assert module.running_mean is None
    x = randn(*SHAPES[spatial])
    expected = (x - x.mean(reduce_dims(x), keepdim=True)) / (
        x.var(reduce_dims(x), unbiased=False, keepdim=True) + module.eps
    ).sqrt()
    torch.testing.assert_close(module(x), affine(expected, module))


def outputs_and_grads(module: nn.Module, x: torch.Tensor, g: torch.Tensor) -> list:
    y = module(x)
    return [y, *torch.autograd.grad((y * g).sum(), [x, module.weight, module.bias])]


@pytest.mark.parametrize("spatial", [False, True])
@pytest.mark.parametrize("name", ["reference_batch", "batch_renorm"])
def test_matches_torch_batch_norm_in_float64(name, spatial):
    # rmax=1, dmax=0 past the warm-up: batch renorm must be plain batch norm.
    plain = dict(rmax=1.0, dmax=0.0, warmup_steps=0) if name == "batch_renorm" else {}
    ours = build(name, spatial, momentum=0.1, **plain)
    theirs = build("batch", spatial)
    theirs.load_state_dict(ours.state_dict(), strict=False)  # the same gamma and beta
    modes = [True, True, True] + ([False] if name == "reference_batch" else [])
    for training in modes:
        ours.train(training), theirs.train(training)
        x = randn(*SHAPES[spatial])
        g = torch.randn(SHAPES[spatial], dtype=f64)
        # assert_close's float64 tolerance (1e-7) is tighter than the 1e-5 asked for.
        torch.testing.assert_close(outputs_and_grads(ours, x, g), outputs_and_grads(theirs, x, g))
    torch.testing.assert_close(ours.running_mean, theirs.running_mean)
    if name == "reference_batch":
        torch.testing.assert_close(ours.running_var, theirs.running_var)


def test_gradcheck_of_the_hand_written_backward():
    x, gamma, beta = randn(6, 3), randn(3), randn(3)
    assert gradcheck(lambda *t: BatchNormFunction.apply(*t, 1e-5)[0], (x, gamma, beta))


@pytest.mark.parametrize("momentum", [0.01, None])
def test_batch_renorm_tracks_mean_and_std_and_infers_with_them(momentum):
    module = build("batch_renorm", spatial=True, momentum=momentum)
    mean, std = torch.zeros(C, dtype=f64), torch.ones(C, dtype=f64)
    for step in range(1, 4):
        x = randn(*SHAPES[True])
        module(x)
        rate = 1 / step if momentum is None else momentum
        mean = (1 - rate) * mean + rate * x.mean(reduce_dims(x))
        batch_std = (x.var(reduce_dims(x), unbiased=False) + module.eps).sqrt()
        std = (1 - rate) * std + rate * batch_std  # the standard deviation, not the variance
    torch.testing.assert_close([module.running_mean, module.running_std], [mean, std])
    x = randn(*SHAPES[True])
    y = module.eval()(x)
    torch.testing.assert_close(y, affine((x - per_channel(mean, x)) / per_channel(std, x), module))
    assert not torch.allclose(y, batch_formula(x, module.train()))


def test_batch_renorm_gradient_treats_r_and_d_as_constants():
    schedule = dict(warmup_steps=0, rmax_ramp_steps=1, dmax_ramp_steps=1)
    module = build("batch_renorm", True, rmax=1.5, dmax=0.5, **schedule)
    with torch.no_grad():  # past the schedule, moving stats that clip some channels only
        module.num_batches_tracked.fill_(10)
        module.running_mean.copy_(torch.linspace(-1, 3, C))
        module.running_std.copy_(torch.linspace(0.5, 4, C))
    mu, sigma = module.running_mean.clone(), module.running_std.clone()

    def formula(x, stop_grad=True):
        mean = x.mean(reduce_dims(x))
        std = (x.var(reduce_dims(x), unbiased=False) + module.eps).sqrt()
        r = (std / sigma).clamp(1 / 1.5, 1.5)
        d = ((mean - mu) / sigma).clamp(-0.5, 0.5)
        clipped_r, clipped_d = (r == 1.5) | (r == 1 / 1.5), d.abs() == 0.5
        assert 0 < clipped_r.sum() < C and 0 < clipped_d.sum() < C  # some channels clip
        if stop_grad:
            r, d = r.detach(), d.detach()
        x_hat = (x - per_channel(mean, x)) / per_channel(std, x) * per_channel(r, x)
        return affine(x_hat + per_channel(d, x), module)

    x = randn(*SHAPES[True])
    assert_same_forward_and_backward(module(x), formula(x), [x, *module.parameters()])
    # The test can tell: letting gradients flow through r and d changes dL/dx.
    g = torch.randn_like(x)
    through_rd = torch.autograd.grad((formula(x, stop_grad=False) * g).sum(), x)[0]
    assert not torch.allclose(through_rd, torch.autograd.grad((formula(x) * g).sum(), x)[0])


@pytest.mark.parametrize(
    "step, rmax, dmax",
    [(0, 1, 0), (10, 1, 0), (15, 1.5, 2.5), (20, 2, 5), (30, 3, 5), (99, 3, 5)],
)
def test_batch_renorm_schedule(step, rmax, dmax):
    module = build("batch_renorm", False, warmup_steps=10, rmax_ramp_steps=20, dmax_ramp_steps=10)
    module.num_batches_tracked.fill_(step)
    assert [float(v) for v in module.limits()] == [rmax, dmax]


def test_only_training_forward_passes_count_as_steps():
    module = build("batch_renorm", False)
    module(randn(*SHAPES[False])), module(randn(*SHAPES[False]))
    module.eval()(randn(*SHAPES[False]))
    assert int(module.num_batches_tracked) == 2


@pytest.mark.parametrize("name", list(FORMULAS))
def test_removes_bias_means_a_per_channel_shift_cancels(name):
    module = build(name, spatial=True)
    x = randn(*SHAPES[True])
    shifted = x + per_channel(torch.linspace(-2, 2, C, dtype=f64), x)
    cancels = torch.allclose(module(x), module(shifted))
    assert cancels == norms.get_norm_spec(name).removes_bias


@pytest.mark.parametrize(
    "name, spatial, overrides, message",
    [
        ("instance", False, {}, "an MLP has none"),
        ("instance", True, {"momentum": None, "track_running_stats": True}, "norm.momentum"),
        ("batch", True, {"momentum": 2.0}, "norm.momentum"),
        ("batch", True, {"eps": 0.0}, "norm.eps"),
    ],
)
def test_bad_settings_are_config_errors(name, spatial, overrides, message):
    with pytest.raises(ConfigError, match=message):
        norms.get_norm_layer(norm_cfg(name, **overrides), spatial)


def test_group_norm_names_channels_and_divisors():
    factory = norms.get_norm_layer(norm_cfg("group", num_groups=7), spatial=True)
    with pytest.raises(ConfigError, match=r"num_groups=7 .* 20 channels.*1, 2, 4, 5, 10, 20$"):
        factory(20)


def test_norm_flags():
    spatial_only = [n for n in norms.norm_names() if norms.get_norm_spec(n).spatial_only]
    assert spatial_only == ["instance"]
    with pytest.raises(ConfigError, match="unknown norm 'batchh'; choose from: none, batch"):
        norms.get_norm_spec("batchh")


@pytest.mark.parametrize("name", BATCH_LIKE)
def test_freeze_batch_norms_keeps_running_stats_and_parameters(name):
    model = nn.Sequential(nn.Linear(4, C), build(name, False), nn.LayerNorm(C)).double().train()
    norms.freeze_batch_norms(model)
    frozen = model[1]
    before = {k: v.clone() for k, v in frozen.state_dict().items()}
    model(randn(8, 4)).sum().backward()
    torch.testing.assert_close(frozen.state_dict(), before)
    assert not frozen.training and not any(p.requires_grad for p in frozen.parameters())
    assert model[2].training and model[2].weight.grad is not None  # other norms untouched


@pytest.mark.parametrize("spatial", [False, True])
@pytest.mark.parametrize("name", BATCH_LIKE)
def test_eval_accepts_a_batch_of_one(name, spatial):
    module = build(name, spatial)
    module(randn(*SHAPES[spatial]))
    one = randn(1, *SHAPES[spatial][1:])
    assert torch.isfinite(module.eval()(one)).all()
    if not spatial:  # as nn.BatchNorm1d: training statistics of one value are meaningless
        with pytest.raises(ValueError, match="more than 1 value per channel"):
            module.train()(one)


@pytest.mark.parametrize("spatial", [False, True])
def test_norm_parameters_are_the_norm_layers_parameters(spatial):
    names = [n for n in FORMULAS if spatial or not norms.get_norm_spec(n).spatial_only]
    layers = [norms.get_norm_layer(norm_cfg(n), spatial)(C) for n in names]
    model = nn.Sequential(nn.Conv2d(C, C, 1), *layers)
    expected = {id(p) for layer in layers for p in layer.parameters()}
    assert norms.norm_parameters(model) == expected
    assert all(len(list(layer.parameters())) >= 1 for layer in layers)


@pytest.mark.parametrize("path", sorted(NORM_CONFIGS.glob("*.yaml")), ids=lambda p: p.stem)
def test_norm_config_files_compose_and_build(path):
    assert path.read_text().startswith("# ")
    cfg = norm_cfg(path.stem)
    assert OmegaConf.get_type(cfg) is norms.get_norm_spec(cfg.name).settings
    factory = norms.get_norm_layer(cfg, spatial=True)
    assert factory is None if cfg.name == "none" else isinstance(factory(C), nn.Module)


_FLAGS = ("affine", "track_running_stats", "learned_eps")
_FEATURES_ONLY = ("learned_eps",)  # FRN learns eps on (N, C) features only, never on maps
_ALTERNATIVES = {
    "virtual_batch_size": 3,  # the test's batch of 6: two virtual batches instead of one
    "learned_eps": None,
    "ws_eps": 1e-3,
    "eps": 1e-3,
    "momentum": 0.3,
    "affine": None,  # flipped
    "track_running_stats": None,
    "num_groups": 3,
    "rmax": 2.0,
    "dmax": 1.0,
    "warmup_steps": 0,
    "rmax_ramp_steps": 1,
    "dmax_ramp_steps": 1,
}


@pytest.mark.parametrize("name", [n for n in norms.norm_names() if n != "none"])
def test_every_setting_of_a_norm_changes_its_layer(name: str) -> None:
    """A norm's schema holds only what it reads: each field is part of the run's identity,
    so each must change the layer it builds, or the conv before it (weight standardization);
    freeze acts on the model: see test_models."""
    settings = {f.name for f in fields(norms.get_norm_spec(name).settings)} - {"name", "freeze"}
    assert settings <= set(_ALTERNATIVES)
    for field_name in settings:
        spatial = field_name not in _FEATURES_ONLY
        x = torch.randn(6, 6, 4, 4) if spatial else torch.randn(6, 6)
        # momentum matters only with running statistics (instance norm's default is without)
        tracks = field_name == "momentum" and "track_running_stats" in settings
        base = {"track_running_stats": True} if tracks else {}
        other = not norm_cfg(name)[field_name] if field_name in _FLAGS else None
        changed = {field_name: _ALTERNATIVES[field_name] if other is None else other}
        layers = []
        for cfg in (norm_cfg(name, **base), norm_cfg(name, **base, **changed)):
            torch.manual_seed(0)
            weights = norms.get_weight_layers(cfg)
            before = weights.conv(6, 6, 1) if spatial else weights.linear(6, 6)
            layer = nn.Sequential(before, norms.get_norm_layer(cfg, spatial)(6))
            layers.append((repr(layer), layer.state_dict().keys(), layer(x)))
        (repr_a, keys_a, out_a), (repr_b, keys_b, out_b) = layers
        assert repr_a != repr_b or keys_a != keys_b or not torch.equal(out_a, out_b), field_name


def test_a_setting_the_chosen_norm_does_not_read_is_an_error() -> None:
    with pytest.raises(ConfigError, match=r"'norm.num_groups'; the chosen norm reads: norm.name"):
        compose_config(["norm=batch", "norm.num_groups=4"])
