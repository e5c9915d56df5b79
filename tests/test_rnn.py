"""model=rnn (document 004; Cooijmans et al. 2016; Ba et al. 2016) and sequence data."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from torch import nn

from normbench.app import compose_config
from normbench.checks import check_run
from normbench.datasets import load_dataset
from normbench.engine.lifecycle import run_experiment
from normbench.errors import ConfigError
from normbench.models import build_model, init_paired
from normbench.models.recurrent import as_sequence

T, F_, H = 5, 3, 4


@pytest.fixture(autouse=True)
def seed():
    torch.manual_seed(0)


def rnn(norm: str, cell: str = "rnn", shape=(T, F_)) -> nn.Module:
    cfg = compose_config(["model=rnn", f"norm={norm}", f"model.cell={cell}",
                             f"model.hidden_size={H}"])  # fmt: skip
    return build_model(cfg.model, cfg.norm, shape, 3).double()


class BatchNormRNN(nn.Module):
    """Document 004's class, verbatim but for the dtype: one BatchNorm1d for every step."""

    def __init__(self, input_size, hidden_size, output_size):
        super().__init__()
        self.hidden_size = hidden_size
        self.rnn_cell = nn.RNNCell(input_size, hidden_size)
        self.bn = nn.BatchNorm1d(hidden_size)
        self.fc = nn.Linear(hidden_size, output_size)

    def forward(self, x, hidden=None):
        if hidden is None:
            hidden = torch.zeros(x.size(0), self.hidden_size, dtype=x.dtype)
        outputs = []
        for t in range(x.size(1)):
            hidden = self.rnn_cell(x[:, t, :], hidden)
            hidden = self.bn(hidden)
            outputs.append(hidden)
        outputs = torch.stack(outputs, dim=1)
        return self.fc(outputs[:, -1, :])


def test_norm_batch_is_document_004s_rnn_forward_backward_and_running_stats():
    ours = rnn("batch")
    theirs = BatchNormRNN(F_, H, 3).double()
    theirs.rnn_cell.load_state_dict(ours.cell.state_dict())
    theirs.bn.load_state_dict(ours.norms[0].state_dict())
    theirs.fc.load_state_dict(ours.head.state_dict())
    assert len(ours.norms) == 1
    for training in (True, True, False):
        ours.train(training), theirs.train(training)
        x = torch.randn(8, T, F_, dtype=torch.float64, requires_grad=True)
        y, expected = ours(x), theirs(x)
        torch.testing.assert_close(y, expected)
        g = torch.randn_like(y)
        torch.testing.assert_close(
            torch.autograd.grad((y * g).sum(), [x, *ours.parameters()]),
            torch.autograd.grad((expected * g).sum(), [x, *theirs.parameters()]),
        )
    # One shared layer: updated once per step, T times per batch.
    assert int(ours.norms[0].num_batches_tracked) == 2 * T
    torch.testing.assert_close(ours.norms[0].running_var, theirs.bn.running_var)


def test_batch_per_step_keeps_statistics_per_time_step():
    model = rnn("batch_per_step")
    assert len(model.norms) == T
    x = torch.randn(16, T, F_, dtype=torch.float64)
    model(x)
    h = torch.zeros(16, H, dtype=torch.float64)
    for t, bn in enumerate(model.norms):  # the written-out loop: step t's own BN
        pre = model.cell(x[:, t], h).detach()
        torch.testing.assert_close(bn.running_mean, 0.1 * pre.mean(0))
        torch.testing.assert_close(bn.running_var, 0.9 + 0.1 * pre.var(0, unbiased=True))
        h = (pre - pre.mean(0)) / (pre.var(0, unbiased=False) + bn.eps).sqrt()
        assert int(bn.num_batches_tracked) == 1
    assert not torch.allclose(model.norms[0].running_mean, model.norms[-1].running_mean)


@pytest.mark.parametrize("cell", ["rnn", "lstm"])
def test_layer_norm_statistics_depend_on_neither_batch_nor_length(cell):
    model = rnn("layer", cell=cell)
    x = torch.randn(6, T, F_, dtype=torch.float64)
    torch.testing.assert_close(model(x)[:1], model(x[:1]))  # alone or in a batch
    assert isinstance(model.norms[0], nn.LayerNorm) and len(model.norms) == 1
    # The written-out loop for the plain cell: h_t = LN(tanh(W x_t + U h_{t-1} + b)).
    if cell == "rnn":
        h = torch.zeros(6, H, dtype=torch.float64)
        c, ln = model.cell, model.norms[0]
        for t in range(T):
            a = x[:, t] @ c.weight_ih.T + c.bias_ih + h @ c.weight_hh.T + c.bias_hh
            s = torch.tanh(a)
            h = (s - s.mean(1, keepdim=True)) / (s.var(1, unbiased=False, keepdim=True)
                                                 + ln.eps).sqrt() * ln.weight + ln.bias  # fmt: skip
        torch.testing.assert_close(model(x), model.head(h))


def test_lstm_normalizes_h_and_leaves_the_cell_state():
    model = rnn("batch", cell="lstm").eval()
    assert isinstance(model.cell, nn.LSTMCell)
    x = torch.randn(4, T, F_, dtype=torch.float64)
    h = c = torch.zeros(4, H, dtype=torch.float64)
    for t in range(T):
        h, c = model.cell(x[:, t], (h, c))
        h = model.norms[0](h)
    torch.testing.assert_close(model(x), model.head(h))


def test_images_are_read_row_by_row():
    x = torch.arange(2 * 1 * 8 * 8.0).reshape(2, 1, 8, 8)
    seq = as_sequence(x)
    assert seq.shape == (2, 8, 8) and torch.equal(seq[1, 3], x[1, 0, 3])
    rgb = torch.randn(2, 3, 4, 5)
    assert torch.equal(as_sequence(rgb)[0, 2], rgb[0, :, 2].flatten())  # row 2, channel-major
    model = rnn("none", shape=(1, 8, 8))
    assert model.steps == 8 and model.cell.input_size == 8


def test_init_paired_seeds_the_cell():
    a, b = rnn("none"), rnn("layer")
    init_paired(a, 3), init_paired(b, 3)
    torch.testing.assert_close(a.cell.weight_hh, b.cell.weight_hh)
    torch.testing.assert_close(a.head.weight, b.head.weight)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["model=rnn", "norm=group"], r"with model=rnn choose from: none, batch, layer, batch_per"),
        (["model=rnn", "norm=frn"], "no recurrent form"),
        (["model=mlp", "norm=batch_per_step"], "per time step: it needs model=rnn"),
        (["model=rnn", "dataset.shape=[10]"], "model 'rnn' reads sequences"),
        (["model=convnet", "dataset=toy_sequence"], r"gives sequences \(T, F\).*model=rnn"),
        (["model=rnn", "dataset=toy_sequence", "dataset.image_size=8"], "gives sequences"),
        (["model=rnn", "model.cell=gru"], "unknown model.cell 'gru'"),
    ],
)
def test_model_and_data_mismatches_are_one_line_at_planning(overrides, message):
    cfg = compose_config(overrides)
    with pytest.raises(ConfigError, match=message) as error:
        check_run(cfg)
    assert "\n" not in str(error.value)


def test_toy_sequence_needs_memory():
    """The class shows at the first step only: the nearest class cue scores well at step 0
    and at chance at the last step."""
    cfg = compose_config(["dataset=toy_sequence"])
    data = load_dataset(cfg.dataset, seed=0)
    x, y = data.train
    assert data.input_shape == (12, 8) and x.shape[1:] == (12, 8)
    centers = torch.stack([x[y == k].mean(0) for k in range(4)])  # (4, T, F)

    def nearest_cue_acc(t: int) -> float:
        d = torch.cdist(data.val[0][:, t], centers[:, 0])
        return (d.argmin(1) == data.val[1]).float().mean().item()

    assert nearest_cue_acc(0) > 0.8 and nearest_cue_acc(-1) < 0.45
    again = load_dataset(cfg.dataset, seed=0)
    assert torch.equal(again.train[0], x)


@pytest.mark.parametrize(
    "overrides",
    [
        ["norm=none", "dataset=digits", "dataset.image_size=null"],
        ["norm=batch", "dataset=digits", "dataset.image_size=null"],
        ["norm=batch_per_step", "dataset=toy_sequence"],
        ["norm=layer", "model.cell=lstm", "dataset=toy_sequence"],
        ["norm=batch_cumulative", "dataset=toy"],  # toy images, row by row
    ],
)
def test_rnn_runs_end_to_end(overrides: list[str], tmp_path: Path):
    tiny = ["epochs=1", "quiet=true", "dataset.limit=240", "stall_margin=0.0", "batch_size=16"]
    cfg = compose_config(["model=rnn", *tiny, *overrides, f"results_dir={tmp_path}"])
    result = run_experiment(cfg)
    assert result.status in ("ok", "stalled")
    row = result.rows[-1]
    assert 0 <= row["val_acc"] <= 1 and math.isfinite(row["test_loss"]) and row["grad_norm"] > 0
