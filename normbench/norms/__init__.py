"""The one place normalization layers come from: one entry per norm, and everything about it.

Each :class:`NormSpec` says how the norm is built, which settings it reads (its schema: a
dataclass stored in Hydra's ConfigStore, with its defaults in ``configs/norm/<name>.yaml``),
whether it normalizes with batch statistics, whether it cancels a bias just before it,
which layers it applies to, whether it includes its activation (FRN), how the layers before
it are made (weight standardization), what it needs of the batch size (ghost batch norm) and
whether it applies to an RNN's hidden state. Every other list (run identity, the schema
check, the models' bias rule, freezing) derives from these entries.

``get_norm_layer(cfg, spatial)`` turns a norm config into a factory that takes the channel count
only (timm's ``create_norm``, torchvision's ``norm_layer``), for (N, C) features
(``spatial=False``) or (N, C, H, W) maps (``spatial=True``).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

from omegaconf import MISSING
from torch import nn

from normbench.errors import ConfigError, choices_error
from normbench.norms.batch_renorm import BatchRenorm
from normbench.norms.frn import FilterResponseNorm
from normbench.norms.ghost_batchnorm import GhostBatchNorm
from normbench.norms.reference_batchnorm import ReferenceBatchNorm
from normbench.norms.rms_norm import ChannelRMSNorm
from normbench.norms.weight_std import WSConv2d, WSLinear

NormLayer = Callable[[int], nn.Module]


@dataclass(frozen=True)
class WeightLayers:
    """The constructors a model makes the linear and conv layers with that a norm follows
    (``nn.Linear(in, out, bias=...)``, ``nn.Conv2d(in, out, kernel, padding=..., bias=...)``)."""

    linear: Callable[..., nn.Linear] = nn.Linear
    conv: Callable[..., nn.Conv2d] = nn.Conv2d


PLAIN_LAYERS = WeightLayers()


# ----------------------------------------------------------------------------- settings
# One schema per kind of norm. Defaults live in the YAML files only (MISSING here).


@dataclass
class NoNormSettings:
    name: str = MISSING


@dataclass
class LayerNormSettings:
    name: str = MISSING
    eps: float = MISSING
    affine: bool = MISSING


@dataclass
class GroupNormSettings(LayerNormSettings):
    num_groups: int = MISSING


@dataclass
class _MovingAverageSettings(LayerNormSettings):
    momentum: float | None = MISSING  # None: cumulative average


@dataclass
class InstanceNormSettings(_MovingAverageSettings):
    track_running_stats: bool = MISSING


@dataclass
class BatchNormSettings(InstanceNormSettings):
    freeze: bool = MISSING  # eval mode with fixed parameters and statistics (fine-tuning)


@dataclass
class BatchRenormSettings(_MovingAverageSettings):
    freeze: bool = MISSING
    # Its moving statistics are always tracked: r and d are computed from them.
    # Ioffe 2017: plain BN for warmup_steps, then rmax and dmax ramp up linearly
    rmax: float = MISSING
    dmax: float = MISSING
    warmup_steps: int = MISSING
    rmax_ramp_steps: int = MISSING
    dmax_ramp_steps: int = MISSING


@dataclass
class GhostBatchNormSettings(BatchNormSettings):
    virtual_batch_size: int = MISSING  # examples per virtual batch; must divide batch_size


@dataclass
class FRNSettings:
    name: str = MISSING
    eps: float = MISSING
    # On (N, C) features only (an MLP's layers, a CNN's dense ones), where H x W = 1 and
    # nu2 = x^2: eps + |eps_l| with eps_l learned (the paper's fix for 1x1). Conv maps always
    # use the fixed eps.
    learned_eps: bool = MISSING


@dataclass
class WSGroupNormSettings(GroupNormSettings):
    ws_eps: float = MISSING  # W_hat = (W - mean) / (std + ws_eps)


# ----------------------------------------------------------------------------- builders


def _constructor(cls: type[nn.Module]) -> Callable[[Any, bool], NormLayer]:
    """A builder passing every setting of the schema (but name and freeze) to ``cls``: the
    schema holds exactly what the layer reads."""

    def build(cfg: Any, spatial: bool) -> NormLayer:
        return partial(cls, **{k: v for k, v in cfg.items() if k not in ("name", "freeze")})

    return build


def _batch(cfg: Any, spatial: bool) -> NormLayer:
    return partial(
        nn.BatchNorm2d if spatial else nn.BatchNorm1d,
        eps=cfg.eps,
        momentum=cfg.momentum,
        affine=cfg.affine,
        track_running_stats=cfg.track_running_stats,
    )


def _layer(cfg: Any, spatial: bool) -> NormLayer:
    if spatial:  # over C, H, W with a per-channel affine: the GN paper's LN
        return partial(nn.GroupNorm, 1, eps=cfg.eps, affine=cfg.affine)
    return partial(nn.LayerNorm, eps=cfg.eps, elementwise_affine=cfg.affine)


def _instance(cfg: Any, spatial: bool) -> NormLayer:
    return partial(
        nn.InstanceNorm2d,
        eps=cfg.eps,
        momentum=cfg.momentum,
        affine=cfg.affine,
        track_running_stats=cfg.track_running_stats,
    )


class GroupCountError(ConfigError):
    """norm.num_groups does not divide a layer's channels. The message suggests the divisors
    of that layer; :meth:`for_widths` those of every normalized layer of the model."""

    def __init__(self, groups: int, channels: int) -> None:
        self.groups, self.channels = groups, channels
        super().__init__(self._message([channels]))

    def for_widths(self, widths: list[int]) -> GroupCountError:
        """The same error suggesting only counts that divide every one of ``widths``."""
        error = GroupCountError(self.groups, self.channels)
        error.args = (self._message(list(dict.fromkeys(widths)) or [self.channels]),)
        return error

    def _message(self, widths: list[int]) -> str:
        common = math.gcd(*widths)
        divisors = ", ".join(str(d) for d in range(1, common + 1) if common % d == 0)
        names = [str(width) for width in widths]
        of = names[0] if len(names) == 1 else f"{', of '.join(names[:-1])} and of {names[-1]}"
        every = " (every normalized layer's channels)" if len(names) > 1 else ""
        return (
            f"norm.num_groups={self.groups} does not divide a layer's {self.channels} channels; "
            f"choose a divisor of {of}{every}: {divisors}"
        )


def _group(cfg: Any, spatial: bool) -> NormLayer:
    groups, eps, affine = cfg.num_groups, cfg.eps, cfg.affine

    def group_norm(channels: int) -> nn.Module:
        if channels % groups:
            raise GroupCountError(groups, channels)
        return nn.GroupNorm(groups, channels, eps=eps, affine=affine)

    return group_norm


def _frn(cfg: Any, spatial: bool) -> NormLayer:
    # The learned eps is for H x W = 1 (nu2 = x^2); on maps nu2 averages H x W values and
    # eps + |eps_l| (~1 at the start) would shrink the outputs instead of guarding a division.
    learned = cfg.learned_eps and not spatial
    return partial(FilterResponseNorm, eps=cfg.eps, learned_eps=learned)


def _rms(cfg: Any, spatial: bool) -> NormLayer:
    if spatial:  # over C, H, W with a per-channel gain (nn.RMSNorm reduces the last dims)
        return partial(ChannelRMSNorm, eps=cfg.eps, affine=cfg.affine)
    return partial(nn.RMSNorm, eps=cfg.eps, elementwise_affine=cfg.affine)


def _ws_layers(cfg: Any) -> WeightLayers:
    return WeightLayers(partial(WSLinear, ws_eps=cfg.ws_eps), partial(WSConv2d, ws_eps=cfg.ws_eps))


# ----------------------------------------------------------------------------- checks


def _check_eps(cfg: Any) -> None:
    if cfg.eps <= 0:
        raise ConfigError(f"norm.eps must be positive; got {cfg.eps}")


def _check_running(cfg: Any) -> None:
    _check_eps(cfg)
    if cfg.momentum is not None and not 0 <= cfg.momentum <= 1:
        raise ConfigError(f"norm.momentum must be in [0, 1] or null; got {cfg.momentum}")


def _check_instance(cfg: Any) -> None:
    _check_running(cfg)
    if cfg.track_running_stats and cfg.momentum is None:
        # InstanceNorm2d reads momentum=None as 0: its running statistics would never move.
        raise ConfigError("norm 'instance' has no cumulative average; set norm.momentum")


def _check_group(cfg: Any) -> None:
    _check_eps(cfg)
    if cfg.num_groups < 1:
        raise ConfigError(f"norm.num_groups must be at least 1; got {cfg.num_groups}")


def _check_batch_renorm(cfg: Any) -> None:
    _check_running(cfg)
    if cfg.rmax < 1 or cfg.dmax < 0:
        raise ConfigError(f"norm.rmax must be >= 1 and norm.dmax >= 0; got {cfg.rmax}, {cfg.dmax}")
    if min(cfg.warmup_steps, cfg.rmax_ramp_steps, cfg.dmax_ramp_steps) < 0:
        raise ConfigError("norm.warmup_steps, rmax_ramp_steps and dmax_ramp_steps must be >= 0")


def _check_ghost_batch(cfg: Any) -> None:
    _check_running(cfg)
    if cfg.virtual_batch_size < 2:
        raise ConfigError(
            f"norm.virtual_batch_size must be at least 2 (statistics of one example are "
            f"meaningless); got {cfg.virtual_batch_size}"
        )


def _check_virtual_batch(cfg: Any, batch_size: int) -> None:
    v = cfg.virtual_batch_size
    if batch_size % v:
        valid = ", ".join(str(d) for d in range(2, batch_size + 1) if batch_size % d == 0)
        raise ConfigError(
            f"norm.virtual_batch_size={v} does not divide batch_size={batch_size}; choose a "
            f"divisor of {batch_size}: {valid or 'none (batch_size must be at least 2)'}"
        )


def _check_ws_group(cfg: Any) -> None:
    _check_group(cfg)
    if cfg.ws_eps <= 0:
        raise ConfigError(f"norm.ws_eps must be positive; got {cfg.ws_eps}")


# ----------------------------------------------------------------------------- the registry


@dataclass(frozen=True)
class NormSpec:
    settings: type  # the schema of its config node
    build: Callable[[Any, bool], NormLayer | None]  # (cfg, spatial) -> factory
    check: Callable[[Any], None] = lambda cfg: None  # raises ConfigError
    batch_stats: bool = False  # normalizes over the batch: batch-norm-like, can be frozen
    spatial_only: bool = False  # needs (N, C, H, W) maps: a CNN's dense layers go without
    # Subtracts a per-channel mean (over the batch or the spatial positions), so a bias added
    # just before it cancels. Layer and group norm subtract one mean over several channels,
    # which leaves per-channel bias differences in place: their bias is not redundant.
    removes_bias: bool = False
    # Includes its activation (FRN's TLU): the model applies no activation after it.
    includes_activation: bool = False
    # cfg -> the linear and conv constructors of the layers it follows (weight standardization)
    weight_layers: Callable[[Any], WeightLayers] | None = None
    # (cfg, batch_size) -> None, raises ConfigError: what the norm needs of the batch size
    check_batch: Callable[[Any, int], None] = lambda cfg, batch_size: None
    # It makes sense on an RNN's hidden state (model=rnn accepts it) ...
    recurrent: bool = False
    # ... and keeps one layer per time step (only model=rnn has time steps).
    per_step: bool = False


_NORMS: dict[str, NormSpec] = {
    "none": NormSpec(NoNormSettings, lambda cfg, spatial: None, recurrent=True),
    "batch": NormSpec(
        BatchNormSettings, _batch, _check_running, batch_stats=True, removes_bias=True,
        recurrent=True,
    ),  # fmt: skip
    "layer": NormSpec(LayerNormSettings, _layer, _check_eps, recurrent=True),
    "instance": NormSpec(
        InstanceNormSettings, _instance, _check_instance, spatial_only=True, removes_bias=True
    ),
    "group": NormSpec(GroupNormSettings, _group, _check_group),
    "batch_renorm": NormSpec(
        BatchRenormSettings, _constructor(BatchRenorm), _check_batch_renorm, batch_stats=True,
        removes_bias=True,
    ),  # fmt: skip
    "reference_batch": NormSpec(
        BatchNormSettings, _constructor(ReferenceBatchNorm), _check_running, batch_stats=True,
        removes_bias=True,
    ),  # fmt: skip
    "ghost_batch": NormSpec(
        GhostBatchNormSettings, _constructor(GhostBatchNorm), _check_ghost_batch, batch_stats=True,
        removes_bias=True, check_batch=_check_virtual_batch,
    ),  # fmt: skip
    "frn": NormSpec(FRNSettings, _frn, _check_eps, includes_activation=True),
    "rms": NormSpec(LayerNormSettings, _rms, _check_eps),
    "ws_group": NormSpec(WSGroupNormSettings, _group, _check_ws_group, weight_layers=_ws_layers),
    # Cooijmans et al. 2016: one BatchNorm1d per time step of an RNN (statistics per step).
    "batch_per_step": NormSpec(
        BatchNormSettings, _batch, _check_running, batch_stats=True, removes_bias=True,
        recurrent=True, per_step=True,
    ),  # fmt: skip
}
# The layer classes of the batch-statistics norms, and of every norm (for weight decay).
_BATCH_NORM_MODULES = (nn.modules.batchnorm._BatchNorm, BatchRenorm, ReferenceBatchNorm)
_NORM_MODULES = (
    nn.modules.batchnorm._NormBase,
    nn.LayerNorm,
    nn.GroupNorm,
    nn.RMSNorm,
    ChannelRMSNorm,
    FilterResponseNorm,
    *_BATCH_NORM_MODULES,
)


def norm_names() -> list[str]:
    return list(_NORMS)


def recurrent_norm_names() -> list[str]:
    """The norms that make sense on an RNN's hidden state."""
    return [name for name, spec in _NORMS.items() if spec.recurrent]


def get_weight_layers(cfg: Any) -> WeightLayers:
    """The linear and conv constructors for the layers the norm of ``cfg`` follows."""
    spec = get_norm_spec(cfg.name)
    return spec.weight_layers(cfg) if spec.weight_layers is not None else PLAIN_LAYERS


def get_norm_spec(name: str) -> NormSpec:
    """The registry entry of ``name``; an unknown name is a ConfigError naming the choices."""
    if name not in _NORMS:
        raise choices_error("norm", name, norm_names())
    return _NORMS[name]


def check_norm(cfg: Any) -> None:
    """Settings in range for ``cfg.name``; raises ConfigError."""
    get_norm_spec(cfg.name).check(cfg)


def get_norm_layer(cfg: Any, spatial: bool) -> NormLayer | None:
    """The factory ``channels -> module`` for ``cfg.name``, or None for "none".

    ``cfg`` is a norm config node (its settings per the norm's schema); ``spatial`` says
    whether the layer sees (N, C, H, W) maps or (N, C) features. Bad settings: ConfigError.
    """
    spec = get_norm_spec(cfg.name)
    spec.check(cfg)
    if spec.spatial_only and not spatial:
        raise ConfigError(
            f"norm {cfg.name!r} needs CNN feature maps (statistics over H, W); an MLP has none: "
            "choose another norm or a CNN model"
        )
    return spec.build(cfg, spatial)


def is_frozen(cfg: Any) -> bool:
    """Whether the norm config asks for frozen batch norms (only batch-like norms can)."""
    return bool(cfg.get("freeze", False))


def is_batch_norm(module: nn.Module) -> bool:
    """Whether ``module`` normalizes with batch statistics (torch BN, BatchRenorm, reference)."""
    return isinstance(module, _BATCH_NORM_MODULES)


def freeze_batch_norms(model: nn.Module) -> None:
    """Put every batch-norm-like module in eval mode with fixed parameters (fine-tuning).

    ``model.train()`` undoes the eval mode: call this after each ``model.train()``.
    """
    for module in model.modules():
        if is_batch_norm(module):
            module.eval()
            for param in module.parameters():
                param.requires_grad_(False)


def norm_parameters(model: nn.Module) -> set[int]:
    """The ``id`` of every parameter of a norm layer (to exempt from weight decay)."""
    return {
        id(p) for m in model.modules() if isinstance(m, _NORM_MODULES) for p in m.parameters()
    }
