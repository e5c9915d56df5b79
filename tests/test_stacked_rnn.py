"""The stacked engine on model=rnn (normbench.engine.recurrent) against single-run training.

Each member of a stacked RNN must train exactly as the same run alone (train_one_epoch on a
RecurrentNet built as experiment.prepare builds it): float32 on the CPU, one thread, the same
per-member checks as tests/test_stacked.py (tests/stacking.py); in float64 where float32
training itself is ill-conditioned (an LSTM with a norm on toy_sequence).
"""

from __future__ import annotations

import copy
from contextlib import contextmanager

import pytest
import torch
from torch import nn

from normbench import norms
from normbench.app import compose_config
from normbench.checks import check_run
from normbench.datasets import DataSplits, load_dataset
from normbench.engine import checkpoint
from normbench.engine.recurrent import StackedRecurrentNet, unsupported_recurrent
from normbench.engine.trainer import StackedTrainer, estimate_member_bytes
from normbench.errors import ConfigError
from normbench.models.recurrent import RecurrentNet
from tests.stacking import (
    assert_a_diverged_member_leaves_the_rest,
    assert_member_matches,
    assert_members_are_single_models,
    assert_members_never_mix,
    close,
    single_run,
    stacked_run,
)

BASE = ["epochs=1", "quiet=true", "device=cpu", "model=rnn", "model.hidden_size=16"]
# 240 examples, 10% held out: 216 to train on, 21 steps of 10 (the first 20 compared).
SEQUENCES = ["dataset=toy_sequence", "dataset.train_size=240", "dataset.test_size=60"]
DIGITS = ["dataset=digits", "dataset.image_size=null", "dataset.limit=240"]  # 8 rows of 8
CELLS = ["rnn", "lstm"]
NORMS = ["none", "batch", "layer", "batch_per_step"]
# (lr, seed): two members share a seed (and so their data and initial weights), one does not.
# lrs at which float32 training is well-conditioned (see test_members_match_in_float64).
MEMBERS = [(0.02, 0), (0.005, 1), (0.01, 0)]


pytestmark = pytest.mark.usefixtures("one_thread")


_COMPOSED: dict[tuple[str, ...], object] = {}


def members(*overrides: str, data=SEQUENCES, grid=MEMBERS):
    key = (*data, *overrides)
    if key not in _COMPOSED:
        _COMPOSED[key] = compose_config([*BASE, *key])
    cfgs = []
    for lr, seed in grid:
        cfg = copy.deepcopy(_COMPOSED[key])
        cfg.lr, cfg.seed = lr, seed
        cfgs.append(cfg)
    return cfgs


def _check_agreement(cfgs, steps: int = 20):
    trainer, losses, stats, val, _ = stacked_run(cfgs)
    assert isinstance(trainer.net, StackedRecurrentNet)
    for k, cfg in enumerate(cfgs):
        assert_member_matches(trainer, k, single_run(cfg), losses, stats, val, steps=steps)


# -- 1. agreement with per-run training ----------------------------------------------------


@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("cell", CELLS)
def test_members_read_digits_row_by_row(cell, norm):
    """Real images (K, B, 1, 8, 8), read as RecurrentNet reads them: 8 steps of 8 pixels."""
    _check_agreement(members(f"model.cell={cell}", f"norm={norm}", "batch_size=10", data=DIGITS))


# On toy_sequence an LSTM with a norm on h is ill-conditioned in float32: the same single run
# in float32 and in float64 (same initial weights and data) drifts apart by up to 2e-2 in 20
# steps at lr 0.02 (LN: 6e-5 at lr 0.005), however the engine computes; the stack drifts from
# the float32 single run by as much (and from the float64 one by as much as that run does).
# Those three are checked in float64 below, where the stack agrees to 1e-13.
WELL_CONDITIONED = [("rnn", norm) for norm in NORMS] + [("lstm", "none")]


@pytest.mark.parametrize("cell, norm", WELL_CONDITIONED)
def test_members_train_as_single_runs(cell, norm):
    _check_agreement(members(f"model.cell={cell}", f"norm={norm}", "batch_size=10"))


@contextmanager
def float64():
    dtype = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        yield
    finally:
        torch.set_default_dtype(dtype)


def _double(data: DataSplits) -> DataSplits:
    def split(s):
        return None if s is None else (s[0].double(), s[1])

    return DataSplits(
        split(data.train), split(data.val), split(data.test), data.input_shape,
        data.num_outputs, data.task,
    )  # fmt: skip


@pytest.mark.parametrize("norm", ["batch", "layer", "batch_per_step"])
def test_members_match_in_float64(norm):
    """The members float32 cannot settle: in float64 each trains as alone to rounding."""
    grid = [(0.02, 1), (0.005, 1), (0.01, 0)]  # (0.02, 1): 2e-2 apart in float32 with LN
    cfgs = members("model.cell=lstm", f"norm={norm}", "batch_size=10", grid=grid)
    data = {seed: _double(load_dataset(cfgs[0].dataset, seed)) for seed in (0, 1)}
    with float64():  # models built (and initialized) in float64, by both paths alike
        trainer, losses, stats, val, _ = stacked_run(cfgs, datasets=data)
        for k, cfg in enumerate(cfgs):
            single = single_run(cfg, data=data[cfg.seed])
            assert_member_matches(trainer, k, single, losses, stats, val, steps=21)
            for step, loss in enumerate(single[0]):
                assert close(losses[step][k], loss, 1e-9), (k, step)
            for key, value in single[3].state_dict().items():
                torch.testing.assert_close(trainer.member_state_dict(k)[key], value, msg=key)


VARIANTS = {
    # Adam, with weight decay on all but the norm's parameters (train.make_optimizer's rule)
    "adam": (DIGITS, "model.cell=lstm", "norm=batch", "optimizer=adam",
             "optimizer.weight_decay=0.01"),
    # one BN shared by the steps, momentum=None: its cumulative average counts T updates a batch
    "cumulative": (SEQUENCES, "norm=batch_cumulative"),
    "frozen": (DIGITS, "model.cell=lstm", "norm=batch_frozen"),
    "momentum_decay": (SEQUENCES, "norm=layer", "optimizer.momentum=0.9",
                       "optimizer.weight_decay=0.01"),
}  # fmt: skip


@pytest.mark.parametrize("variant", VARIANTS)
def test_variants_train_as_single_runs(variant):
    data, *overrides = VARIANTS[variant]
    grid = [(0.01, 0), (0.003, 1), (0.005, 0)] if variant == "adam" else MEMBERS
    _check_agreement(members(*overrides, "batch_size=10", data=data, grid=grid))


# -- 2. members never mix -------------------------------------------------------------------


@pytest.mark.parametrize("cell, norm", [("rnn", "batch"), ("lstm", "batch_per_step")])
def test_one_members_data_reaches_no_other(cell, norm):
    grid = [(0.1, 0), (0.1, 1), (0.1, 2)]
    cfgs = members(f"model.cell={cell}", f"norm={norm}", "batch_size=16", grid=grid)
    # NaNs at one step of every third sequence: a leak shows
    assert_members_never_mix(cfgs, nan_where=(slice(None, None, 3), 2))


# -- 3. divergence masking ------------------------------------------------------------------


@pytest.mark.parametrize(
    "cell, norm, data", [("rnn", "none", SEQUENCES), ("lstm", "batch_per_step", DIGITS)]
)
def test_diverging_member_stops_and_others_go_on(cell, norm, data):
    grid = [(0.02, 0), (1e6, 1), (0.05, 2)]
    cfgs = members(f"model.cell={cell}", f"norm={norm}", "batch_size=16", data=data, grid=grid)
    _, val = assert_a_diverged_member_leaves_the_rest(cfgs, epochs=2)
    for k in (0, 2):
        assert close(val[k][0], single_run(cfgs[k], epochs=2)[2][-1][0], 1e-3)


def test_a_trainer_goes_on_from_its_saved_state(tmp_path):
    """Adam and a deactivated member: a trainer built afresh and loaded from a saved state
    trains on exactly as the one that saved it (per-step norms' running statistics too)."""
    cfgs = members("model.cell=lstm", "norm=batch_per_step", "optimizer=adam", "batch_size=32")
    trainer = StackedTrainer(cfgs)
    trainer.train_epoch()
    trainer.deactivate(1)
    path = tmp_path / "stack.pt"
    checkpoint.save_checkpoint(path, {"format": checkpoint.FORMAT, "state": trainer.state()})
    resumed = StackedTrainer(cfgs)
    resumed.load_state(checkpoint.load_checkpoint(path)["state"])
    assert resumed.train_epoch() == trainer.train_epoch()
    assert resumed.evaluate("val") == trainer.evaluate("val")
    for k in range(len(cfgs)):
        for key, value in trainer.member_state_dict(k).items():
            assert torch.equal(resumed.member_state_dict(k)[key], value), (k, key)


# -- 4. members as single models, their memory, what cannot be stacked -----------------------


@pytest.mark.parametrize("cell, norm", [("rnn", "batch_per_step"), ("lstm", "layer")])
def test_member_module_is_the_single_model(cell, norm):
    cfgs = members(f"model.cell={cell}", f"norm={norm}", "batch_size=16")
    assert_members_are_single_models(cfgs, RecurrentNet)


def test_estimate_member_bytes_counts_the_unrolled_steps():
    shape = (12, 8)
    rnn, lstm = (members(f"model.cell={c}", "norm=batch_per_step")[0] for c in CELLS)
    small = estimate_member_bytes(rnn, shape, 4)
    assert estimate_member_bytes(lstm, shape, 4) > small > 4 * 16 * 16  # LSTM: (h, c), 4 gates
    rnn.batch_size = 1024  # training's T steps of activations (x3) outweigh evaluation's
    assert estimate_member_bytes(rnn, shape, 4) > 3 * 4 * 12 * 1024 * 16 * 2


class Halving(nn.Module):
    """A norm the stacked engine will never know."""

    def __init__(self, channels: int):
        super().__init__()

    def forward(self, x):
        return x / 2


def test_stack_unsupported_names_what_it_cannot_stack():
    # every recurrent norm stacks (the agreement tests assert stack_unsupported is None)
    assert set(norms.recurrent_norm_names()) <= {*NORMS}  # a new one needs a test here
    with pytest.raises(ConfigError, match="no recurrent form"):
        check_run(members("norm=group")[0])

    def net(norm_layer=None):
        return RecurrentNet(3, 5, 2, "rnn", 4, norm_layer)

    assert unsupported_recurrent(net(nn.LayerNorm)) is None
    relu = net()
    relu.cell = nn.RNNCell(5, 4, nonlinearity="relu")
    assert "relu" in unsupported_recurrent(relu)
    gru = net()
    gru.cell = nn.GRUCell(5, 4)
    assert "GRUCell" in unsupported_recurrent(gru)
    assert "norms.0 is a Halving" in unsupported_recurrent(net(Halving))
    no_bias = unsupported_recurrent(net(lambda c: nn.LayerNorm(c, bias=False)))
    assert "norms.0 is a LayerNorm without bias" in no_bias
    with pytest.raises(NotImplementedError, match="relu"):
        StackedRecurrentNet([relu, relu])
