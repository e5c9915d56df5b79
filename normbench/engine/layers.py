"""Hand-stacked layers: K copies of one :class:`~normbench.models.Net` as one network.

Every parameter and buffer is stored as ``(K, *single_shape)`` under the single model's own
name, so the stacked ``state_dict`` has the single model's keys and ``tensor[k]`` is member
k's value. Activations travel in two layouts:

- feature maps as ``(B, K*C, H, W)``: member k owns channels ``k*C:(k+1)*C``. Convs are
  grouped convs (groups=K); batch, instance and group norms see K*C channels (K*G groups), so
  each member is normalized over its own batch and channels only; max-pooling is per channel.
- features as ``(K, F, B)``, batch innermost: Linear is a batched matmul ``W @ x``, whose
  output and weight gradient come out contiguous; norms over the batch see ``(1, K*F, B)``,
  a view (a batch of one with B positions: the same reduction); per-example norms (group,
  layer) move to ``(B, K*F)`` and back. This layout is ~30% faster per step than
  ``(K, B, F)`` on the default MLP (CPU, one thread), where every norm needed a copy.
  Element-wise norms (FRN) and norms over the features (RMSNorm) work on it in place;
  ghost batch norm's virtual batches are views ``(K, F, B/V, V)``.

Weight-standardized layers (WSLinear, WSConv2d) standardize each member's weights per output
channel, then act as the plain stacked layers.

Nothing ever reduces across members, so one member's data (or its NaNs) cannot reach another.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from normbench.models import Block, Net
from normbench.norms.batch_renorm import BatchRenorm, _ramp
from normbench.norms.frn import FilterResponseNorm
from normbench.norms.ghost_batchnorm import GhostBatchNorm
from normbench.norms.reference_batchnorm import BatchNormFunction, ReferenceBatchNorm
from normbench.norms.rms_norm import ChannelRMSNorm
from normbench.norms.weight_std import WSConv2d, WSLinear, standardize_weight

# Modules reused as they are: they act per element or per channel.
_ELEMENTWISE = (nn.ReLU, nn.Sigmoid, nn.Tanh, nn.GELU, nn.Identity)


def _stack(templates: Sequence[nn.Module], name: str) -> Tensor | None:
    values = [getattr(m, name) for m in templates]
    if values[0] is None:
        return None
    return torch.stack([v.detach() for v in values]).clone()


class _Stacked(nn.Module):
    """Registers each template's parameters and buffers stacked along a new dim 0."""

    def __init__(self, templates: Sequence[nn.Module], params=(), buffers=()):
        super().__init__()
        self.K = len(templates)
        for name in params:
            value = _stack(templates, name)
            if value is None:
                self.register_parameter(name, None)
            else:
                requires_grad = getattr(templates[0], name).requires_grad
                self.register_parameter(name, nn.Parameter(value, requires_grad=requires_grad))
        for name in buffers:
            self.register_buffer(name, _stack(templates, name))


def _to_channels(x: Tensor) -> Tensor:
    """(K, F, B) -> (B, K*F)."""
    k, f, b = x.shape
    return x.permute(2, 0, 1).reshape(b, k * f)


def _from_channels(y: Tensor, k: int) -> Tensor:
    """(B, K*F) -> (K, F, B)."""
    return y.view(y.shape[0], k, -1).permute(1, 2, 0)


def _flat(t: Tensor | None) -> Tensor | None:
    return None if t is None else t.view(-1)


def _cat(tensors: list[Tensor], dim: int) -> Tensor:
    return tensors[0] if len(tensors) == 1 else torch.cat(tensors, dim)


class StackedLinear(_Stacked):
    def __init__(self, templates: Sequence[nn.Linear]):
        super().__init__(templates, params=("weight", "bias"))

    def forward(self, x: Tensor) -> Tensor:  # (K, in, B) -> (K, out, B)
        weight = self.member_weights()
        if self.bias is None:
            return torch.bmm(weight, x)
        return torch.baddbmm(self.bias.unsqueeze(2), weight, x)

    def member_weights(self) -> Tensor:  # (K, out, in)
        return self.weight


class StackedConv2d(_Stacked):
    def __init__(self, templates: Sequence[nn.Conv2d]):
        super().__init__(templates, params=("weight", "bias"))
        t = templates[0]
        self.stride, self.padding, self.dilation = t.stride, t.padding, t.dilation

    def forward(self, x: Tensor) -> Tensor:  # (B, K*in, H, W) -> (B, K*out, H', W')
        return F.conv2d(
            x,
            self.group_weights(),
            _flat(self.bias),
            self.stride,
            self.padding,
            self.dilation,
            groups=self.K,
        )

    def group_weights(self) -> Tensor:  # (K*out, in, kH, kW): the grouped conv's weight
        return self.weight.flatten(0, 1)


class StackedWSLinear(StackedLinear):
    """WSLinear: each member's weight standardized per output row (``standardize_weight``)."""

    def __init__(self, templates: Sequence[WSLinear]):
        super().__init__(templates)
        self.ws_eps = templates[0].ws_eps

    def member_weights(self) -> Tensor:  # every member's rows at once, back to (K, out, in)
        return standardize_weight(self.weight.flatten(0, 1), self.ws_eps).view_as(self.weight)


class StackedWSConv2d(StackedConv2d):
    """WSConv2d: each member's filters standardized over their fan-in, then a grouped conv."""

    def __init__(self, templates: Sequence[WSConv2d]):
        super().__init__(templates)
        self.ws_eps = templates[0].ws_eps

    def group_weights(self) -> Tensor:
        return standardize_weight(self.weight.flatten(0, 1), self.ws_eps)


_LAYERS: dict[type, type] = {
    nn.Linear: StackedLinear,
    nn.Conv2d: StackedConv2d,
    WSLinear: StackedWSLinear,
    WSConv2d: StackedWSConv2d,
}


class _StackedNorm(_Stacked):
    """A norm over K*C channels; ``spatial`` says which layout its input comes in.

    ``over_batch``: it reduces over the batch (and positions) per channel, so features
    ``(K, C, B)`` can be normalized as the view ``(1, K*C, B)``; otherwise as ``(B, K*C)``.
    """

    over_batch = False

    def __init__(self, templates, spatial: bool, params=(), buffers=()):
        super().__init__(templates, params, buffers)
        self.spatial = spatial
        t = templates[0]
        self.eps = t.eps

    def forward(self, x: Tensor) -> Tensor:
        if self.spatial:
            return self.normalize(x)
        if self.over_batch:
            return self.normalize(x.reshape(1, -1, x.shape[2])).view(x.shape)
        return _from_channels(self.normalize(_to_channels(x)), self.K)

    def normalize(self, x: Tensor) -> Tensor:  # (B, K*C, ...) -> same
        raise NotImplementedError


_BN_STATE = dict(
    params=("weight", "bias"), buffers=("running_mean", "running_var", "num_batches_tracked")
)


class StackedBatchNorm(_StackedNorm):
    """nn.BatchNorm1d / nn.BatchNorm2d, as ``_BatchNorm.forward``."""

    over_batch = True

    def __init__(self, templates, spatial: bool):
        super().__init__(templates, spatial, **_BN_STATE)
        self.momentum = templates[0].momentum
        self.track_running_stats = templates[0].track_running_stats

    def normalize(self, x: Tensor) -> Tensor:
        factor = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:  # cumulative average; members step together
                factor = 1.0 / float(self.num_batches_tracked[0])
        bn_training = self.training or self.running_mean is None
        use_stats = not self.training or self.track_running_stats
        return F.batch_norm(
            x,
            _flat(self.running_mean) if use_stats else None,
            _flat(self.running_var) if use_stats else None,
            _flat(self.weight),
            _flat(self.bias),
            bn_training,
            factor,
            self.eps,
        )


class StackedReferenceBatchNorm(_StackedNorm):
    """normbench's ReferenceBatchNorm (its own autograd Function, over K*C columns)."""

    over_batch = True

    def __init__(self, templates, spatial: bool):
        super().__init__(templates, spatial, **_BN_STATE)
        self.momentum = templates[0].momentum
        self.num_features = templates[0].num_features

    def normalize(self, x: Tensor) -> Tensor:
        channels = self.K * self.num_features
        channels_last = x.movedim(1, -1)
        gamma = _flat(self.weight) if self.weight is not None else x.new_ones(channels)
        beta = _flat(self.bias) if self.bias is not None else x.new_zeros(channels)
        if not (self.training or self.running_mean is None):
            x_hat = (channels_last - _flat(self.running_mean)) / torch.sqrt(
                _flat(self.running_var) + self.eps
            )
            return (gamma * x_hat + beta).movedim(-1, 1)
        rows = channels_last.reshape(-1, channels)
        if rows.shape[0] < 2:
            raise ValueError(
                f"Expected more than 1 value per channel when training, got input size {x.shape}"
            )
        y, mean, var = BatchNormFunction.apply(rows, gamma, beta, self.eps)
        if self.training and self.running_mean is not None:
            with torch.no_grad():
                self.num_batches_tracked += 1
                n = rows.shape[0]
                factor = (
                    1 / int(self.num_batches_tracked[0]) if self.momentum is None else self.momentum
                )
                _flat(self.running_mean).lerp_(mean, factor)
                _flat(self.running_var).lerp_(var * n / (n - 1), factor)
        return y.reshape(channels_last.shape).movedim(-1, 1)


class StackedBatchRenorm(_StackedNorm):
    """normbench's BatchRenorm; rmax and dmax follow each member's own step count."""

    over_batch = True

    def __init__(self, templates, spatial: bool):
        super().__init__(
            templates,
            spatial,
            params=("weight", "bias"),
            buffers=("running_mean", "running_std", "num_batches_tracked"),
        )
        t: BatchRenorm = templates[0]
        self.momentum = t.momentum
        self.rmax, self.dmax = t.rmax, t.dmax
        self.warmup_steps = t.warmup_steps
        self.rmax_ramp_steps, self.dmax_ramp_steps = t.rmax_ramp_steps, t.dmax_ramp_steps
        self.num_features = t.num_features

    def _per_channel(self, values: Tensor) -> Tensor:  # (K,) -> (K*C,)
        return values.repeat_interleave(self.num_features)

    def normalize(self, x: Tensor) -> Tensor:
        channels = self.K * self.num_features
        channels_last = x.movedim(1, -1)
        mean_run, std_run = _flat(self.running_mean), _flat(self.running_std)
        if self.training:
            if x.numel() // channels < 2:
                raise ValueError(
                    "Expected more than 1 value per channel when training, "
                    f"got input size {x.shape}"
                )
            dims = tuple(range(channels_last.dim() - 1))
            mean = channels_last.mean(dims)
            std = torch.sqrt(channels_last.var(dims, unbiased=False) + self.eps)
            step = self.num_batches_tracked - self.warmup_steps
            rmax = self._per_channel(1 + (self.rmax - 1) * _ramp(step, self.rmax_ramp_steps))
            dmax = self._per_channel(self.dmax * _ramp(step, self.dmax_ramp_steps))
            with torch.no_grad():
                r = torch.clamp(std / std_run, 1 / rmax, rmax)
                d = torch.clamp((mean - mean_run) / std_run, -dmax, dmax)
                self.num_batches_tracked += 1
                factor = (
                    1 / int(self.num_batches_tracked[0]) if self.momentum is None else self.momentum
                )
                mean_run.lerp_(mean, factor)
                std_run.lerp_(std, factor)
            x_hat = (channels_last - mean) / std * r + d
        else:
            x_hat = (channels_last - mean_run) / std_run
        if self.weight is not None:
            x_hat = x_hat * _flat(self.weight) + _flat(self.bias)
        return x_hat.movedim(-1, 1)


class StackedGroupNorm(_StackedNorm):
    """nn.GroupNorm(G, C) (and the spatial layer norm GroupNorm(1, C)) as GroupNorm(K*G, K*C)."""

    def __init__(self, templates, spatial: bool):
        super().__init__(templates, spatial, params=("weight", "bias"))
        self.num_groups = templates[0].num_groups

    def normalize(self, x: Tensor) -> Tensor:
        return F.group_norm(
            x, self.K * self.num_groups, _flat(self.weight), _flat(self.bias), self.eps
        )


class StackedInstanceNorm2d(_StackedNorm):
    """nn.InstanceNorm2d over K*C channels, as ``_InstanceNorm._apply_instance_norm``."""

    def __init__(self, templates, spatial: bool):
        super().__init__(templates, spatial, **_BN_STATE)
        self.momentum = templates[0].momentum
        self.track_running_stats = templates[0].track_running_stats

    def normalize(self, x: Tensor) -> Tensor:
        return F.instance_norm(
            x,
            _flat(self.running_mean),
            _flat(self.running_var),
            _flat(self.weight),
            _flat(self.bias),
            self.training or not self.track_running_stats,
            self.momentum if self.momentum is not None else 0.0,
            self.eps,
        )


class StackedLayerNorm(_Stacked):
    """nn.LayerNorm over the features of (K, F, B), affine per member."""

    def __init__(self, templates: Sequence[nn.LayerNorm], spatial: bool):
        super().__init__(templates, params=("weight", "bias"))
        t = templates[0]
        self.normalized_shape, self.eps = t.normalized_shape, t.eps

    def forward(self, x: Tensor) -> Tensor:
        y = F.layer_norm(x.transpose(1, 2), self.normalized_shape, None, None, self.eps)
        if self.weight is not None:
            y = torch.addcmul(self.bias.unsqueeze(1), y, self.weight.unsqueeze(1))
        return y.transpose(1, 2)


class StackedRMSNorm(_StackedNorm):
    """nn.RMSNorm over the features of (K, F, B): ``x * rsqrt(mean(x^2) + eps) * weight``,
    the order of ``torch.rms_norm``; ``eps=None`` is the dtype's machine epsilon, as there."""

    def __init__(self, templates: Sequence[nn.RMSNorm], spatial: bool):
        super().__init__(templates, spatial, params=("weight",))

    def forward(self, x: Tensor) -> Tensor:
        eps = torch.finfo(x.dtype).eps if self.eps is None else self.eps
        y = x * torch.rsqrt(x.pow(2).mean(1, keepdim=True) + eps)
        return y if self.weight is None else y * self.weight.unsqueeze(2)


class StackedChannelRMSNorm(_StackedNorm):
    """ChannelRMSNorm: each member's (C, H, W) of each example, as (B, K, C*H*W)."""

    def __init__(self, templates: Sequence[ChannelRMSNorm], spatial: bool):
        super().__init__(templates, spatial, params=("weight",))

    def forward(self, x: Tensor) -> Tensor:
        if not self.spatial:  # what the single module says of (N, C) features
            raise ValueError("expected (N, C, H, W) maps, got (N, C) features")
        members = x.reshape(x.shape[0], self.K, -1)
        y = members * torch.rsqrt(members.pow(2).mean(2, keepdim=True) + self.eps)
        y = y.view(x.shape)
        return y if self.weight is None else y * self.weight.view(1, -1, 1, 1)


class StackedFilterResponseNorm(_StackedNorm):
    """FilterResponseNorm + TLU, element-wise but for nu2 (per example and channel).

    Maps are seen as (B, K, C, H, W), features as (K, F, B); ``eps_l`` (a scalar per layer in
    the single module) is (K,) when this layer learns eps, None when it does not.
    """

    def __init__(self, templates: Sequence[FilterResponseNorm], spatial: bool):
        super().__init__(templates, spatial, params=("weight", "bias", "tau", "eps_l"))

    def forward(self, x: Tensor) -> Tensor:
        k = self.K
        if self.spatial:
            b, _, h, w = x.shape
            members = x.reshape(b, k, -1, h, w)
            nu2 = members.pow(2).mean(dim=(3, 4), keepdim=True)
            shape, member = (1, k, -1, 1, 1), (1, k, 1, 1, 1)
        else:
            members, nu2 = x, x.pow(2)
            shape, member = (k, -1, 1), (k, 1, 1)
        eps = self.eps if self.eps_l is None else self.eps + self.eps_l.abs().view(member)
        y = self.weight.view(shape) * members * torch.rsqrt(nu2 + eps) + self.bias.view(shape)
        return torch.maximum(y, self.tau.view(shape)).view(x.shape)


class StackedGhostBatchNorm(_StackedNorm):
    """GhostBatchNorm: each member's batch split into its own consecutive virtual batches.

    Maps (B, K*C, H, W) become (B/V, V, K*C, H, W), as the single module's (B/V, V, C, H, W);
    features (K, F, B) become (K, F, B/V, V). Member k's virtual batch j is examples
    j*V..(j+1)*V-1 of its batch; a last, smaller chunk is normalized on its own. Running
    statistics: the mean over virtual batches of means and unbiased variances, once a batch.
    """

    def __init__(self, templates: Sequence[GhostBatchNorm], spatial: bool):
        super().__init__(templates, spatial, **_BN_STATE)
        t = templates[0]
        self.momentum, self.track_running_stats = t.momentum, t.track_running_stats
        self.virtual_batch_size = t.virtual_batch_size

    def forward(self, x: Tensor) -> Tensor:
        if not self.training and self.running_mean is not None:
            flat = x if self.spatial else x.reshape(1, -1, x.shape[2])
            return F.batch_norm(
                flat, _flat(self.running_mean), _flat(self.running_var), _flat(self.weight),
                _flat(self.bias), False, 0.0, self.eps,
            ).view(x.shape)  # fmt: skip
        # where the batch is (dim 0 of maps, 2 of features): chunks get (count, V) there
        at, dims = (0, (1, 3, 4)) if self.spatial else (2, (3,))
        v = self.virtual_batch_size
        n_batch = x.shape[at]
        full = n_batch // v * v
        parts = [x.narrow(at, 0, full).unflatten(at, (-1, v))] if full else []
        if full < n_batch:
            parts.append(x.narrow(at, full, n_batch - full).unsqueeze(at))
        outputs, means, variances = [], [], []
        for chunks in parts:
            if not self.spatial and chunks.shape[-1] < 2:
                raise ValueError("Expected more than 1 value per channel when training")
            mean = chunks.mean(dims, keepdim=True)
            var = chunks.var(dims, correction=0, keepdim=True)
            outputs.append(((chunks - mean) * torch.rsqrt(var + self.eps)).flatten(at, at + 1))
            n = math.prod(chunks.shape[d] for d in dims)
            means.append(self._per_chunk(mean))
            variances.append(self._per_chunk(var) * n / max(n - 1, 1))
        y = _cat(outputs, at)
        if self.weight is not None:
            shape = (1, -1, 1, 1) if self.spatial else (self.K, -1, 1)
            y = y * self.weight.view(shape) + self.bias.view(shape)
        if self.training and self.track_running_stats:
            mean, var = (_cat(stats, at).mean(at) for stats in (means, variances))
            self._update_running_stats(mean.view(self.K, -1), var.view(self.K, -1))
        return y

    def _per_chunk(self, stat: Tensor) -> Tensor:
        """A keepdim statistic as (chunks, K*C) for maps, (K, F, chunks) for features."""
        return stat.flatten(1) if self.spatial else stat.squeeze(3)

    @torch.no_grad()
    def _update_running_stats(self, mean: Tensor, var: Tensor) -> None:
        self.num_batches_tracked.add_(1)  # members step together
        rate = 1.0 / float(self.num_batches_tracked[0]) if self.momentum is None else self.momentum
        self.running_mean.lerp_(mean, rate)
        self.running_var.lerp_(var, rate)


class StackedDropout(nn.Module):
    """nn.Dropout with each member's mask drawn from its own generator.

    A single run seeds the global generator with its seed after building its model, and only
    dropout draws from it while training; a generator seeded the same way per member replays
    the same masks (``bernoulli_(1 - p)`` then ``/ (1 - p)``, what nn.Dropout does on the CPU).
    """

    def __init__(self, template: nn.Dropout, spatial: bool, generators: list[torch.Generator]):
        super().__init__()
        self.p, self.spatial, self.generators = template.p, spatial, generators

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or self.p == 0:
            return x
        keep = 1 - self.p
        if self.spatial:  # (B, K*C, H, W): member k's (B, C, H, W) slice
            b, kc, *hw = x.shape
            shape = (b, kc // len(self.generators), *hw)
        else:  # (K, F, B): member k's mask is drawn as the single run's (B, F)
            shape = (x.shape[2], x.shape[1])
        masks = [
            x.new_empty(shape).bernoulli_(keep, generator=g).div_(keep) for g in self.generators
        ]
        if self.spatial:
            return x * torch.stack(masks, 1).reshape(x.shape)
        return x * torch.stack(masks).transpose(1, 2)


_NORMS: dict[type, type] = {
    nn.BatchNorm1d: StackedBatchNorm,
    nn.BatchNorm2d: StackedBatchNorm,
    ReferenceBatchNorm: StackedReferenceBatchNorm,
    BatchRenorm: StackedBatchRenorm,
    nn.GroupNorm: StackedGroupNorm,
    nn.InstanceNorm2d: StackedInstanceNorm2d,
    nn.LayerNorm: StackedLayerNorm,
    nn.RMSNorm: StackedRMSNorm,
    ChannelRMSNorm: StackedChannelRMSNorm,
    FilterResponseNorm: StackedFilterResponseNorm,
    GhostBatchNorm: StackedGhostBatchNorm,
}
SUPPORTED_MODULES: tuple[type, ...] = (
    Net,
    Block,
    nn.ModuleList,
    *_LAYERS,
    nn.MaxPool2d,
    nn.Dropout,
    *_ELEMENTWISE,
    *_NORMS,
)


def unsupported_module(model: nn.Module) -> str | None:
    """A one-line reason if ``model`` holds a module (or setting) the stacking cannot mirror."""
    for name, module in model.named_modules():
        kind = type(module)
        what = f"its {name or 'model'} is a {kind.__name__}"
        if kind not in SUPPORTED_MODULES:
            return f"{what}, which the stacked engine does not know"
        if kind in (nn.Conv2d, WSConv2d) and (module.padding_mode != "zeros" or module.groups != 1):
            return f"{what} with a padding_mode or groups the stacked engine does not mirror"
        if kind in (nn.LayerNorm, nn.RMSNorm) and len(module.normalized_shape) != 1:
            return f"{what} over several dims, which the stacked engine does not mirror"
        if kind is nn.LayerNorm and module.bias is None and module.weight is not None:
            return f"{what} without bias, which the stacked engine does not mirror"
    if isinstance(model, Net):  # these normalize the last dim: on maps, W, not the features
        for index, block in enumerate(model.blocks[: model.num_conv]):
            if isinstance(block.norm, nn.LayerNorm | nn.RMSNorm):
                return (
                    f"its blocks.{index}.norm is a {type(block.norm).__name__} on feature maps, "
                    "which the stacked engine does not mirror"
                )
    return None


class StackedBlock(nn.Module):
    """Mirrors :class:`~normbench.models.Block` (same submodule names)."""

    def __init__(self, templates: Sequence[Block], spatial: bool, generators):
        super().__init__()
        t = templates[0]
        self.layer = _LAYERS[type(t.layer)]([b.layer for b in templates])
        if isinstance(t.norm, nn.Identity):
            self.norm = nn.Identity()
        else:
            self.norm = _NORMS[type(t.norm)]([b.norm for b in templates], spatial)
        self.act = t.act
        self.norm_first = t.norm_first
        self.pool = t.pool
        if isinstance(t.dropout, nn.Dropout):
            self.dropout = StackedDropout(t.dropout, spatial, generators)
        else:
            self.dropout = nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        x = self.layer(x)
        x = self.act(self.norm(x)) if self.norm_first else self.norm(self.act(x))
        return self.dropout(self.pool(x))


class StackedNet(nn.Module):
    """K :class:`~normbench.models.Net` s of one architecture as one module.

    ``forward`` takes (K, B, *input_shape) and returns (K, B, outputs).
    """

    def __init__(self, models: Sequence[Net], generators: list[torch.Generator]):
        super().__init__()
        reason = unsupported_module(models[0])
        if reason is not None:
            raise NotImplementedError(f"cannot stack this model: {reason}")
        self.K = len(models)
        self.num_conv = models[0].num_conv
        self.blocks = nn.ModuleList(
            StackedBlock([m.blocks[i] for m in models], i < self.num_conv, generators)
            for i in range(len(models[0].blocks))
        )
        self.head = StackedLinear([m.head for m in models])

    def forward(self, x: Tensor) -> Tensor:
        k, b = x.shape[:2]
        spatial = self.num_conv > 0
        # images (K, B, C, H, W) -> maps (B, K*C, H, W); vectors -> (K, F, B)
        if spatial:
            x = x.transpose(0, 1).reshape(b, -1, *x.shape[3:])
        else:
            x = x.reshape(k, b, -1).transpose(1, 2)
        for index, block in enumerate(self.blocks):
            if index == self.num_conv and spatial:
                x, spatial = _maps_to_features(x, k), False
            x = block(x)
        if spatial:
            x = _maps_to_features(x, k)
        return self.head(x).transpose(1, 2)


def _maps_to_features(x: Tensor, k: int) -> Tensor:
    """(B, K*C, H, W) -> (K, C*H*W, B), each member's features in Net's flatten order."""
    return x.reshape(x.shape[0], k, -1).permute(1, 2, 0)
