"""The one place normalization layers come from: a registry from name to layer factory.

``get_norm_layer(cfg, spatial)`` turns a norm config into a factory that takes the channel count
only (timm's ``create_norm``, torchvision's ``norm_layer``), for (N, C) features
(``spatial=False``) or (N, C, H, W) maps (``spatial=True``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

from omegaconf import DictConfig
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm, _NormBase

from normbench.batch_renorm import BatchRenorm
from normbench.config import NormConfig
from normbench.errors import ConfigError, choices_error
from normbench.reference_batchnorm import ReferenceBatchNorm

NormLayer = Callable[[int], nn.Module]

_BATCH_NORMS = (_BatchNorm, BatchRenorm, ReferenceBatchNorm)
# _NormBase covers batch and instance norm.
_NORMS = (_NormBase, nn.LayerNorm, nn.GroupNorm, BatchRenorm, ReferenceBatchNorm)


@dataclass(frozen=True)
class _Spec:
    build: Callable[[Any, bool], NormLayer | None]  # (cfg, spatial) -> factory
    batch_stats: bool = False  # normalizes over the batch: batch-norm-like, can be frozen
    spatial_only: bool = False  # needs (N, C, H, W) maps
    # Subtracts a per-channel mean (over the batch or the spatial positions), so a bias added
    # just before it cancels. Layer and group norm subtract one mean over several channels,
    # which leaves per-channel bias differences in place: their bias is not redundant.
    removes_bias: bool = False


def _batch(cfg, spatial: bool) -> NormLayer:
    return partial(
        nn.BatchNorm2d if spatial else nn.BatchNorm1d,
        eps=cfg.eps,
        momentum=cfg.momentum,
        affine=cfg.affine,
        track_running_stats=cfg.track_running_stats,
    )


def _layer(cfg, spatial: bool) -> NormLayer:
    if spatial:  # over C, H, W with a per-channel affine: the GN paper's LN
        return partial(nn.GroupNorm, 1, eps=cfg.eps, affine=cfg.affine)
    return partial(nn.LayerNorm, eps=cfg.eps, elementwise_affine=cfg.affine)


def _instance(cfg, spatial: bool) -> NormLayer:
    if not spatial:
        raise ConfigError(
            "norm 'instance' needs CNN feature maps (statistics over H, W); an MLP has none: "
            "choose another norm or a CNN model"
        )
    if cfg.track_running_stats and cfg.momentum is None:
        # InstanceNorm2d reads momentum=None as 0: its running statistics would never move.
        raise ConfigError("norm 'instance' has no cumulative average; set norm.momentum")
    return partial(
        nn.InstanceNorm2d,
        eps=cfg.eps,
        momentum=cfg.momentum,
        affine=cfg.affine,
        track_running_stats=cfg.track_running_stats,
    )


def _group(cfg, spatial: bool) -> NormLayer:
    groups, eps, affine = cfg.num_groups, cfg.eps, cfg.affine

    def group_norm(channels: int) -> nn.Module:
        if channels % groups:
            divisors = ", ".join(str(d) for d in range(1, channels + 1) if channels % d == 0)
            raise ConfigError(
                f"norm.num_groups={groups} does not divide a layer's {channels} channels; "
                f"choose a divisor of {channels}: {divisors}"
            )
        return nn.GroupNorm(groups, channels, eps=eps, affine=affine)

    return group_norm


def _batch_renorm(cfg, spatial: bool) -> NormLayer:
    if not cfg.track_running_stats:
        raise ConfigError(
            "norm 'batch_renorm' computes r and d from its moving statistics; "
            "norm.track_running_stats must be true"
        )
    return partial(
        BatchRenorm,
        eps=cfg.eps,
        momentum=cfg.momentum,
        affine=cfg.affine,
        rmax=cfg.rmax,
        dmax=cfg.dmax,
        warmup_steps=cfg.warmup_steps,
        rmax_ramp_steps=cfg.rmax_ramp_steps,
        dmax_ramp_steps=cfg.dmax_ramp_steps,
    )


def _reference_batch(cfg, spatial: bool) -> NormLayer:
    return partial(
        ReferenceBatchNorm,
        eps=cfg.eps,
        momentum=cfg.momentum,
        affine=cfg.affine,
        track_running_stats=cfg.track_running_stats,
    )


# What each norm is: configs/norm/<name>.yaml says (and `normbench list` shows).
_REGISTRY: dict[str, _Spec] = {
    "none": _Spec(lambda cfg, spatial: None),
    "batch": _Spec(_batch, batch_stats=True, removes_bias=True),
    "layer": _Spec(_layer),
    "instance": _Spec(_instance, spatial_only=True, removes_bias=True),
    "group": _Spec(_group),
    "batch_renorm": _Spec(_batch_renorm, batch_stats=True, removes_bias=True),
    "reference_batch": _Spec(_reference_batch, batch_stats=True, removes_bias=True),
}


def norm_names() -> list[str]:
    return list(_REGISTRY)


def _spec(name: str) -> _Spec:
    if name not in _REGISTRY:
        raise choices_error("norm", name, norm_names())
    return _REGISTRY[name]


def norm_is_spatial_only(name: str) -> bool:
    """Whether the norm needs (N, C, H, W) maps (so a CNN's dense layers go unnormalized)."""
    return _spec(name).spatial_only


def norm_removes_bias(name: str) -> bool:
    """Whether a bias just before this norm is redundant (it subtracts a per-channel mean)."""
    return _spec(name).removes_bias


def _check(cfg) -> None:
    if cfg.eps <= 0:
        raise ConfigError(f"norm.eps must be positive; got {cfg.eps}")
    if cfg.momentum is not None and not 0 <= cfg.momentum <= 1:
        raise ConfigError(f"norm.momentum must be in [0, 1] or null; got {cfg.momentum}")
    if cfg.num_groups < 1:
        raise ConfigError(f"norm.num_groups must be at least 1; got {cfg.num_groups}")
    if cfg.rmax < 1 or cfg.dmax < 0:
        raise ConfigError(f"norm.rmax must be >= 1 and norm.dmax >= 0; got {cfg.rmax}, {cfg.dmax}")
    if min(cfg.warmup_steps, cfg.rmax_ramp_steps, cfg.dmax_ramp_steps) < 0:
        raise ConfigError("norm.warmup_steps, rmax_ramp_steps and dmax_ramp_steps must be >= 0")
    if cfg.freeze and not _spec(cfg.name).batch_stats:
        batch_like = [name for name, spec in _REGISTRY.items() if spec.batch_stats]
        raise ConfigError(
            f"norm.freeze applies to batch-norm-like norms ({', '.join(batch_like)}); "
            f"norm {cfg.name!r} has none"
        )


def get_norm_layer(cfg: NormConfig | DictConfig, spatial: bool) -> NormLayer | None:
    """The factory ``channels -> module`` for ``cfg.name``, or None for "none".

    ``cfg`` is a NormConfig or a DictConfig with its attributes; ``spatial`` says whether the
    layer sees (N, C, H, W) maps or (N, C) features. Invalid settings raise ConfigError.
    """
    spec = _spec(cfg.name)
    _check(cfg)
    return spec.build(cfg, spatial)


def is_batch_norm(module: nn.Module) -> bool:
    """Whether ``module`` normalizes with batch statistics (torch BN, BatchRenorm, reference)."""
    return isinstance(module, _BATCH_NORMS)


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
    return {id(p) for m in model.modules() if isinstance(m, _NORMS) for p in m.parameters()}
