"""The documents' models, built with pluggable normalization.

Every feed-forward model is a stack of hidden :class:`Block` s (layer -> norm -> activation,
optional max-pool) followed by a linear ``head``; ``rnn`` is a recurrent cell unrolled over
time steps (:mod:`normbench.models.recurrent`). Models receive norm factories that take the channel
count only (torchvision's ``norm_layer`` convention), never a norm's name, and the
constructors of the layers a norm follows (``norms.WeightLayers``: plain ``nn.Linear`` /
``nn.Conv2d``, or weight-standardized ones). Each model reads its input its own way: the MLP
flattens it, CNNs take (C, H, W) images, the RNN takes (T, F) sequences or reads images row
by row.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from omegaconf import MISSING
from torch import nn

from normbench import norms
from normbench.errors import ConfigError, choices_error
from normbench.models.recurrent import CELLS, RecurrentNet, sequence_shape


@dataclass
class MLPSettings:
    """An MLP's schema; defaults live in configs/model/*.yaml."""

    name: str = MISSING
    hidden: list[int] = MISSING  # widths of hidden Linear layers
    activation: str = MISSING
    norm_position: str = MISSING  # before_activation | after_activation
    dropout: float = MISSING


@dataclass
class CNNSettings(MLPSettings):
    channels: list[int] = MISSING  # widths of the conv layers


@dataclass
class RNNSettings:
    """A recurrent classifier's schema; defaults live in configs/model/rnn.yaml."""

    name: str = MISSING
    cell: str = MISSING  # rnn (nn.RNNCell, tanh) | lstm (nn.LSTMCell)
    hidden_size: int = MISSING

_ACTIVATIONS: dict[str, type[nn.Module]] = {
    "relu": nn.ReLU,
    "sigmoid": nn.Sigmoid,
    "tanh": nn.Tanh,
    "gelu": nn.GELU,
}
_NORM_POSITIONS = ("before_activation", "after_activation")


class Block(nn.Module):
    """``layer -> norm -> act`` (or ``layer -> act -> norm``), then pooling and dropout.

    ``norm`` is ``nn.Identity`` when there is no normalization, so diagnostics can hook every
    block the same way: the input of ``norm`` is the layer's output, the input of ``act`` the
    pre-activation. A norm that includes its activation (FRN's TLU: ``norm_activates``) gets
    ``nn.Identity`` as ``act``.
    """

    def __init__(
        self,
        layer: nn.Module,
        norm: nn.Module | None,
        activation: str,
        norm_position: str = "before_activation",
        pool: bool = False,
        dropout: float = 0.0,
        norm_activates: bool = False,
    ) -> None:
        super().__init__()
        self.layer = layer
        self.norm = norm if norm is not None else nn.Identity()
        activates = norm is not None and norm_activates
        self.act = nn.Identity() if activates else _ACTIVATIONS[activation]()
        self.norm_first = norm_position == "before_activation"
        self.pool = nn.MaxPool2d(2) if pool else nn.Identity()
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer(x)
        x = self.act(self.norm(x)) if self.norm_first else self.norm(self.act(x))
        return self.dropout(self.pool(x))


class Net(nn.Module):
    """Hidden blocks, an optional flatten between the conv and the dense blocks, and a head."""

    def __init__(self, conv: Sequence[Block], dense: Sequence[Block], head: nn.Linear) -> None:
        super().__init__()
        self.num_conv = len(conv)
        self.blocks = nn.ModuleList([*conv, *dense])
        self.head = head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for index, block in enumerate(self.blocks):
            if index == self.num_conv:
                x = x.flatten(1)
            x = block(x)
        return self.head(x.flatten(1))


def _dense_blocks(
    in_features: int,
    widths: Sequence[int],
    norm_layer: norms.NormLayer | None,
    bias: bool,
    layers: norms.WeightLayers = norms.PLAIN_LAYERS,
    **block_kw,
) -> tuple[list[Block], int]:
    blocks = []
    for width in widths:
        norm = norm_layer(width) if norm_layer else None
        linear = layers.linear if norm is not None else nn.Linear
        layer = linear(in_features, width, bias=bias or norm is None)
        blocks.append(Block(layer, norm, **block_kw))
        in_features = width
    return blocks, in_features


def mlp(
    input_shape: Sequence[int],
    num_outputs: int,
    hidden: Sequence[int],
    norm_layer: norms.NormLayer | None,
    bias: bool = True,
    layers: norms.WeightLayers = norms.PLAIN_LAYERS,
    **block_kw,
) -> Net:
    """Document 002's MLP (784-256-128-10 on MNIST), a norm after every hidden Linear.

    ``layers`` makes the Linear layers that a norm follows (weight standardization's)."""
    blocks, width = _dense_blocks(_prod(input_shape), hidden, norm_layer, bias, layers, **block_kw)
    return Net([], blocks, nn.Linear(width, num_outputs))


def _cnn(kernel: int, padding: int, normalize_first: bool) -> Callable[..., Net]:
    def build(
        input_shape: Sequence[int],
        num_outputs: int,
        channels: Sequence[int],
        hidden: Sequence[int],
        norm_layer: norms.NormLayer | None,
        dense_norm_layer: norms.NormLayer | None,
        bias: bool = True,
        layers: norms.WeightLayers = norms.PLAIN_LAYERS,
        **block_kw,
    ) -> Net:
        in_channels, height, width = _image_shape(input_shape)
        conv = []
        for index, out_channels in enumerate(channels):
            use_norm = norm_layer is not None and (normalize_first or index > 0)
            norm = norm_layer(out_channels) if use_norm else None
            make = layers.conv if norm is not None else nn.Conv2d
            layer = make(
                in_channels, out_channels, kernel, padding=padding, bias=bias or norm is None
            )
            conv.append(Block(layer, norm, pool=True, **block_kw))
            in_channels = out_channels
            height, width = (
                (height + 2 * padding - kernel + 1) // 2,
                (width + 2 * padding - kernel + 1) // 2,
            )
            if min(height, width) < 1:
                raise ConfigError(
                    f"images of {input_shape[1]}x{input_shape[2]} are too small for "
                    f"{len(channels)} {kernel}x{kernel} convs with 2x2 pooling; "
                    "set dataset.image_size=16 or more"
                )
        dense, features = _dense_blocks(
            in_channels * height * width, hidden, dense_norm_layer, bias, layers, **block_kw
        )
        return Net(conv, dense, nn.Linear(features, num_outputs))

    return build


# Document 001's MNIST CNN: 5x5 convs, 2x2 max-pooling, dense layers. As in the document the
# first conv is not normalized; every later conv and every hidden dense layer is.
lenet = _cnn(kernel=5, padding=0, normalize_first=False)
# Document 004's CIFAR CNN: 3x3 convs with padding 1, each normalized, 2x2 max-pooling, one fc.
convnet = _cnn(kernel=3, padding=1, normalize_first=True)



def rnn(
    input_shape: Sequence[int],
    num_outputs: int,
    cell: str,
    hidden_size: int,
    norm_layer: norms.NormLayer | None,
    per_step: bool = False,
) -> RecurrentNet:
    """Document 004's RNN classifier: a cell unrolled over the steps, a norm on each step's
    hidden state (one shared, or one per step), a linear head on the last state."""
    shape = sequence_shape(input_shape)
    if shape is None:
        raise ConfigError(
            f"model 'rnn' reads sequences (T, F) or images (C, H, W) row by row, but the "
            f"dataset gives feature vectors of shape {list(input_shape)}; use "
            "dataset=toy_sequence, an image dataset, or another model"
        )
    steps, features = shape
    return RecurrentNet(steps, features, num_outputs, cell, hidden_size, norm_layer, per_step)


# name -> (schema of its config node, builder)
_MODELS: dict[str, tuple[type, Callable[..., nn.Module]]] = {
    "mlp": (MLPSettings, mlp),
    "lenet": (CNNSettings, lenet),
    "convnet": (CNNSettings, convnet),
    "rnn": (RNNSettings, rnn),
}


def model_names() -> list[str]:
    return list(_MODELS)


def model_schemas() -> dict[str, type]:
    """The schema of each model's config node, by model name."""
    return {name: schema for name, (schema, _) in _MODELS.items()}


def build_model(
    model_cfg: Any, norm_cfg: Any, input_shape: Sequence[int], num_outputs: int
) -> nn.Module:
    """Build ``model_cfg.name`` with the norm of ``norm_cfg`` for the dataset's shapes.

    A norm that would normalize nothing in this model (an MLP without hidden layers, say) is
    a ConfigError: its results would be the baseline's under another name.
    """
    if model_cfg.get("name") == "rnn":
        return _build_rnn(model_cfg, norm_cfg, input_shape, num_outputs)
    try:
        net = _build(model_cfg, norm_cfg, input_shape, num_outputs)
    except norms.GroupCountError as error:  # suggest counts that fit every layer, not one
        widths = normalized_widths(model_cfg, norm_cfg, input_shape, num_outputs)
        raise error.for_widths(widths) from None
    if norm_cfg.name != "none" and not any(
        not isinstance(block.norm, nn.Identity) for block in net.blocks
    ):
        raise ConfigError(
            f"norm {norm_cfg.name!r} normalizes nothing in model {model_cfg.name!r} as "
            "configured (no normalized hidden layer); add hidden layers or use norm=none"
        )
    return net


def normalized_widths(
    model_cfg: Any, norm_cfg: Any, input_shape: Sequence[int], num_outputs: int
) -> list[int]:
    """The channel count of every layer the norm of ``norm_cfg`` would normalize, in order:
    the model built (on the meta device) with a norm that only records its width."""
    widths: list[int] = []

    def recorder(cfg: Any, spatial: bool) -> norms.NormLayer:
        return lambda channels: widths.append(channels) or nn.Identity()

    with torch.device("meta"):
        _build(model_cfg, norm_cfg, input_shape, num_outputs, recorder)
    return widths


def _build_rnn(
    model_cfg: Any, norm_cfg: Any, input_shape: Sequence[int], num_outputs: int
) -> RecurrentNet:
    if model_cfg.cell not in CELLS:
        raise choices_error("model.cell", model_cfg.cell, list(CELLS))
    if model_cfg.hidden_size < 1:
        raise ConfigError(f"model.hidden_size must be at least 1; got {model_cfg.hidden_size}")
    spec = norms.get_norm_spec(norm_cfg.name)
    if not spec.recurrent:
        raise ConfigError(
            f"norm {norm_cfg.name!r} has no recurrent form in normbench; with model=rnn "
            f"choose from: {', '.join(norms.recurrent_norm_names())}"
        )
    norm_layer = norms.get_norm_layer(norm_cfg, spatial=False)
    return rnn(
        input_shape, num_outputs, model_cfg.cell, model_cfg.hidden_size, norm_layer, spec.per_step
    )


def _build(
    model_cfg: Any,
    norm_cfg: Any,
    input_shape: Sequence[int],
    num_outputs: int,
    norm_layer_for: Callable[[Any, bool], norms.NormLayer | None] = norms.get_norm_layer,
) -> Net:
    if model_cfg.name not in _MODELS:
        raise choices_error("model", model_cfg.name, model_names())
    if model_cfg.activation not in _ACTIVATIONS:
        raise choices_error("model.activation", model_cfg.activation, list(_ACTIVATIONS))
    if model_cfg.norm_position not in _NORM_POSITIONS:
        raise choices_error("model.norm_position", model_cfg.norm_position, _NORM_POSITIONS)
    if not 0 <= model_cfg.dropout < 1:
        raise ConfigError(f"model.dropout must be in [0, 1); got {model_cfg.dropout}")
    if any(w < 1 for w in [*model_cfg.hidden, *model_cfg.get("channels", [])]):
        raise ConfigError("model.hidden and model.channels must be positive widths")
    spec = norms.get_norm_spec(norm_cfg.name)
    if spec.per_step:
        raise ConfigError(
            f"norm {norm_cfg.name!r} keeps statistics per time step: it needs model=rnn "
            f"(model {model_cfg.name!r} has no time steps); use norm=batch"
        )
    if spec.includes_activation and model_cfg.norm_position != "before_activation":
        raise ConfigError(
            f"norm {norm_cfg.name!r} includes its activation (it replaces model.activation): "
            "set model.norm_position=before_activation"
        )
    kwargs = dict(
        activation=model_cfg.activation,
        norm_position=model_cfg.norm_position,
        dropout=model_cfg.dropout,
        norm_activates=spec.includes_activation,
        layers=norms.get_weight_layers(norm_cfg),
        # A bias followed by a norm that subtracts the per-channel mean is redundant; not
        # when the norm is frozen: then it subtracts fixed statistics and adds a fixed shift.
        bias=not (
            spec.removes_bias
            and model_cfg.norm_position == "before_activation"
            and not norms.is_frozen(norm_cfg)
        ),
    )
    build = _MODELS[model_cfg.name][1]
    if build is mlp:
        norm_layer = norm_layer_for(norm_cfg, False)
        return mlp(input_shape, num_outputs, model_cfg.hidden, norm_layer, **kwargs)
    # Norms that only make sense on feature maps (instance) leave the dense layers of a CNN
    # unnormalized rather than computing something meaningless on features.
    dense_norm = None if spec.spatial_only else norm_layer_for(norm_cfg, False)
    return build(
        input_shape,
        num_outputs,
        model_cfg.channels,
        model_cfg.hidden,
        norm_layer_for(norm_cfg, True),
        dense_norm,
        **kwargs,
    )


def init_paired(model: nn.Module, seed: int) -> None:
    """Initialize each weight layer from its own seed derived from ``seed`` and its position.

    The same seed then gives the same weights wherever shapes agree, across norms too (a
    dropped bias or a norm's parameters do not shift the random stream of later layers).
    """
    layers = [m for m in model.modules() if isinstance(m, nn.Linear | nn.Conv2d | nn.RNNCellBase)]
    for index, layer in enumerate(layers):
        torch.manual_seed(seed * 1009 + index)
        layer.reset_parameters()


def _image_shape(input_shape: Sequence[int]) -> tuple[int, int, int]:
    if len(input_shape) == 2:
        raise ConfigError(
            "CNNs need images (C, H, W) but the dataset gives sequences (T, F) of shape "
            f"{list(input_shape)}; use model=rnn or model=mlp"
        )
    if len(input_shape) != 3:
        raise ConfigError(
            "CNNs need images (C, H, W) but the dataset gives feature vectors of shape "
            f"{list(input_shape)}; use model=mlp, or dataset.shape=[C,H,W] for toy data"
        )
    return tuple(input_shape)


def _prod(shape: Sequence[int]) -> int:
    out = 1
    for size in shape:
        out *= size
    return out
