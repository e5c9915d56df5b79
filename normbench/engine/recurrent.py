"""K :class:`~normbench.models.recurrent.RecurrentNet` s (one cell, norm and size) as one network.

The recurrent counterpart of :class:`~normbench.engine.layers.StackedNet`, with its
contract: ``forward`` takes (K, B, *input_shape) and returns (K, B, outputs); every parameter
and buffer is stored ``(K, *single_shape)`` under RecurrentNet's own name (``cell.weight_ih``,
``norms.0.running_mean``, ``head.weight``, ...), so member k's slice loads into a plain
RecurrentNet.

Features travel as (K, F, B), batch innermost, as in engine.layers: the cell is batched
matmuls over K, ``W_ih @ x`` for all T steps in one ``baddbmm`` (its (K, G, T*B) result is
split per step) and ``W_hh @ h`` per step, then torch's cell arithmetic (RNNCell:
``h' = tanh(W_ih x + b_ih + W_hh h + b_hh)``; LSTMCell: gates i, f, g, o in that order,
``c' = f*c + i*g``, ``h' = o*tanh(c')``). The norms on each step's hidden state are
engine.layers' own (StackedBatchNorm, StackedLayerNorm, ...) on (K, H, B) features, so
batch statistics are per member: nothing reduces across members.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from normbench.engine.layers import _NORMS, StackedLinear, _Stacked, unsupported_module
from normbench.models.recurrent import RecurrentNet

_CELLS = (nn.RNNCell, nn.LSTMCell)


def unsupported_recurrent(model: RecurrentNet) -> str | None:
    """A one-line reason if the stacking cannot mirror ``model``'s cell or norms, else None."""
    cell = model.cell
    what = f"its cell is a {type(cell).__name__}"
    if type(cell) not in _CELLS:
        return f"{what}, which the stacked engine does not know"
    if isinstance(cell, nn.RNNCell) and cell.nonlinearity != "tanh":
        return f"{what} with nonlinearity {cell.nonlinearity!r}; the stacked engine mirrors tanh"
    if not cell.bias:
        return f"{what} without bias, which the stacked engine does not mirror"
    if len(model.blocks):
        return "its blocks are not empty, which the stacked engine does not mirror"
    for index, norm in enumerate(model.norms):
        name = f"norms.{index}"
        if type(norm) not in _NORMS:
            return f"its {name} is a {type(norm).__name__}, which the stacked engine does not know"
        reason = unsupported_module(norm)  # the settings a Net's norm may not have either
        if reason is not None:
            return reason.replace("its model", f"its {name}", 1)
    return None


class StackedRecurrentCell(_Stacked):
    """nn.RNNCell (tanh) or nn.LSTMCell, K of them: (K, G, F) and (K, G, H) weights."""

    def __init__(self, templates: Sequence[nn.RNNCellBase]):
        super().__init__(templates, params=("weight_ih", "weight_hh", "bias_ih", "bias_hh"))
        self.is_lstm = isinstance(templates[0], nn.LSTMCell)
        self.hidden_size = templates[0].hidden_size

    def project(self, x: Tensor) -> Tensor:
        """(K, F, N) inputs -> (K, G, N): ``W_ih x + b_ih`` for every column at once."""
        return torch.baddbmm(self.bias_ih.unsqueeze(2), self.weight_ih, x)

    def forward(
        self, projected: Tensor, state: Tensor | tuple[Tensor, Tensor]
    ) -> Tensor | tuple[Tensor, Tensor]:
        """One step: projected inputs (K, G, B), state h or (h, c) as (K, H, B)."""
        h = state[0] if self.is_lstm else state
        gates = torch.baddbmm(self.bias_hh.unsqueeze(2), self.weight_hh, h).add_(projected)
        if not self.is_lstm:
            return torch.tanh(gates)
        i, f, g, o = gates.chunk(4, 1)
        c = torch.sigmoid(f) * state[1] + torch.sigmoid(i) * torch.tanh(g)
        return torch.sigmoid(o) * torch.tanh(c), c


class StackedRecurrentNet(nn.Module):
    """K :class:`~normbench.models.recurrent.RecurrentNet` s of one architecture as one module.

    ``forward`` takes (K, B, T, F) sequences or (K, B, C, H, W) images (read row by row, as
    RecurrentNet does) and returns (K, B, outputs). ``generators`` is StackedNet's argument
    (dropout masks); RecurrentNet has no dropout.
    """

    def __init__(
        self, models: Sequence[RecurrentNet], generators: list[torch.Generator] | None = None
    ):
        super().__init__()
        reason = unsupported_recurrent(models[0])
        if reason is not None:
            raise NotImplementedError(f"cannot stack this model: {reason}")
        self.K = len(models)
        self.steps, self.hidden_size = models[0].steps, models[0].hidden_size
        self.cell = StackedRecurrentCell([m.cell for m in models])
        self.norms = nn.ModuleList(
            _NORMS[type(models[0].norms[i])]([m.norms[i] for m in models], spatial=False)
            for i in range(len(models[0].norms))
        )
        self.head = StackedLinear([m.head for m in models])

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() == 5:  # images (K, B, C, H, W) -> (K, B, H, C*W), as recurrent.as_sequence
            x = x.permute(0, 1, 3, 2, 4).flatten(3)
        if x.dim() != 4 or x.shape[2] != self.steps:
            raise ValueError(
                f"expected sequences of {self.steps} steps (K, B, T, F); got shape {list(x.shape)}"
            )
        k, b, steps, features = x.shape
        # (K, B, T, F) -> (K, F, T*B): column t*B + j is step t of example j
        projected = self.cell.project(x.permute(0, 3, 2, 1).reshape(k, features, steps * b))
        inputs = projected.view(k, -1, steps, b).unbind(2)
        h = x.new_zeros(k, self.hidden_size, b)
        state = (h, torch.zeros_like(h)) if self.cell.is_lstm else h
        for t in range(steps):
            state = self.cell(inputs[t], state)
            h = state[0] if self.cell.is_lstm else state
            if len(self.norms):
                h = self.norms[t if len(self.norms) > 1 else 0](h)
            state = (h, state[1]) if self.cell.is_lstm else h
        return self.head(h).transpose(1, 2)
