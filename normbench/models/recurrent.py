"""A recurrent classifier: one ``nn.RNNCell`` or ``nn.LSTMCell`` unrolled over the time steps,
with a norm on each step's hidden state and a linear head on the last state.

This is document 004's placement (``hidden = bn(rnn_cell(x_t, hidden))``), with the norm's
statistics either shared by all steps (one layer, ``per_step=False``: document 004's
BatchNorm1d, or layer norm, whose statistics never involve the batch or the length; Ba et al.
2016) or kept per time step (one layer per step: Cooijmans et al. 2016's per-step statistics
and running averages). Unlike Cooijmans et al., who normalize W_x x_t and W_h h_{t-1}
separately inside an LSTM, the norm here acts on the cell's output (for an LSTM its h, not
its cell state c): torch's fused cells expose no summed inputs.

Inputs are sequences (N, T, F); images (N, C, H, W) are read row by row: T = H steps of
C * W features (digits: 8 steps of 8, MNIST: 28 of 28).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from torch import Tensor, nn

CELLS: dict[str, type[nn.RNNCellBase]] = {"rnn": nn.RNNCell, "lstm": nn.LSTMCell}


def sequence_shape(input_shape: Sequence[int]) -> tuple[int, int] | None:
    """(steps, features) of a sequence (T, F) or of an image (C, H, W) read row by row."""
    if len(input_shape) == 2:
        return input_shape[0], input_shape[1]
    if len(input_shape) == 3:
        channels, height, width = input_shape
        return height, channels * width
    return None


def as_sequence(x: Tensor) -> Tensor:
    """(N, T, F) as is; (N, C, H, W) as (N, H, C * W): each row of pixels is one step."""
    if x.dim() == 4:
        return x.permute(0, 2, 1, 3).flatten(2)
    return x


class RecurrentNet(nn.Module):
    """Cell -> norm on each step's hidden state -> ... -> linear head on the last state."""

    def __init__(
        self,
        steps: int,
        features: int,
        num_outputs: int,
        cell: str,
        hidden_size: int,
        norm_layer: Callable[[int], nn.Module] | None,
        per_step: bool = False,
    ) -> None:
        super().__init__()
        self.steps, self.hidden_size = steps, hidden_size
        self.cell = CELLS[cell](features, hidden_size)
        count = (steps if per_step else 1) if norm_layer is not None else 0
        self.norms = nn.ModuleList([norm_layer(hidden_size) for _ in range(count)])
        self.head = nn.Linear(hidden_size, num_outputs)
        self.blocks = nn.ModuleList()  # no feed-forward blocks: diagnostics record eval_gap only

    def forward(self, x: Tensor) -> Tensor:
        x = as_sequence(x)
        if x.dim() != 3 or x.shape[1] != self.steps:
            raise ValueError(
                f"expected sequences of {self.steps} steps (N, T, F); got shape {list(x.shape)}"
            )
        h = x.new_zeros(len(x), self.hidden_size)
        state = (h, x.new_zeros(len(x), self.hidden_size)) if self.is_lstm else h
        for t in range(self.steps):
            state = self.cell(x[:, t], state)
            h = state[0] if self.is_lstm else state
            if self.norms:
                h = self.norms[t if len(self.norms) > 1 else 0](h)
            state = (h, state[1]) if self.is_lstm else h
        return self.head(h)

    @property
    def is_lstm(self) -> bool:
        return isinstance(self.cell, nn.LSTMCell)
