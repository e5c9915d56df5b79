"""Helpers shared by the stacked-engine tests (test_stacked.py, test_stacked_rnn.py): a
member trained alone as normbench's single run, a stack trained as the engine does, and the
per-member agreement check between them.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from normbench import norms
from normbench.datasets import DataSplits, load_dataset
from normbench.engine.trainer import StackedTrainer
from normbench.models import build_model, init_paired
from tests.reference_training import evaluate, make_optimizer, make_scheduler, train_one_epoch

REL = 1e-4  # per-step training losses, and the epoch's statistics


class Recording(nn.Module):
    """A loss function that records each step's loss (train_one_epoch gives only the mean)."""

    def __init__(self, task: str):
        super().__init__()
        self.inner = nn.CrossEntropyLoss() if task == "classification" else nn.MSELoss()
        self.losses: list[float] = []

    def forward(self, out, y):
        loss = self.inner(out, y)
        self.losses.append(loss.item())
        return loss


def single_run(cfg, epochs: int = 1, data: DataSplits | None = None):
    """normbench's single run: experiment.prepare's build, train_one_epoch, evaluate."""
    data = data or load_dataset(cfg.dataset, cfg.seed)
    model = build_model(cfg.model, cfg.norm, data.input_shape, data.num_outputs)
    init_paired(model, cfg.seed)
    torch.manual_seed(cfg.seed)
    optimizer = make_optimizer(model, cfg.optimizer, cfg.lr)
    scheduler = make_scheduler(optimizer, cfg.optimizer)
    generator = torch.Generator().manual_seed(cfg.seed)
    loss_fn = Recording(data.task)
    stats, val, lrs = [], [], []
    for _ in range(epochs):
        stats.append(
            train_one_epoch(
                model,
                optimizer,
                loss_fn,
                data.train,
                cfg.batch_size,
                generator,
                freeze_norms=norms.is_frozen(cfg.norm),
            )
        )
        val.append(evaluate(model, loss_fn.inner, data.val))
        if scheduler is not None:
            scheduler.step(val[-1][0])
        lrs.append(optimizer.param_groups[0]["lr"])
    return loss_fn.losses, stats, val, model, lrs


def stacked_run(cfgs, epochs: int = 1, **kwargs):
    trainer = StackedTrainer(cfgs, **kwargs)
    losses: list[list[float]] = []
    stats, val, lrs = [], [], []
    for _ in range(epochs):
        stats.append(trainer.train_epoch(on_step=lambda step, ls: losses.append(ls)))
        val.append(trainer.evaluate("val"))
        trainer.scheduler_step([v[0] for v in val[-1]])
        lrs.append([trainer.lr(k) for k in range(len(cfgs))])
    return trainer, losses, stats, val, lrs


def close(a: float, b: float, rel: float = REL) -> bool:
    return a == b or abs(a - b) <= rel * max(abs(a), abs(b), 1e-6)


def assert_member_matches(trainer, k, single, stacked_losses, stats, val, steps=20):
    losses, single_stats, single_val, model, _ = single
    for step in range(steps):
        assert close(stacked_losses[step][k], losses[step]), (step, stacked_losses[step][k])
    s, t = single_stats[-1], stats[-1][k]
    assert s.steps == t.steps
    for field in ("loss", "first_loss", "grad_norm"):
        assert close(getattr(s, field), getattr(t, field)), field
    if not math.isnan(s.acc):
        assert abs(s.acc - t.acc) < 1e-6
    assert close(single_val[-1][0], val[-1][k][0])
    state = trainer.member_state_dict(k)
    assert state.keys() == model.state_dict().keys()
    for key, value in model.state_dict().items():
        assert state[key].shape == value.shape and state[key].dtype == value.dtype, key
        torch.testing.assert_close(state[key], value, rtol=1e-3, atol=1e-4, msg=key)


def assert_members_never_mix(cfgs, nan_where) -> None:
    """Stack ``cfgs`` (seeds 0, 1, 2) twice: on their data, then with seed 1's training inputs
    poisoned (NaNs at ``nan_where``, every third example from the second x 100). That member
    sees them; members 0 and 2 train, evaluate and end exactly as before (running statistics
    included): nothing reduces across members."""
    clean = {int(c.seed): load_dataset(cfgs[0].dataset, int(c.seed)) for c in cfgs}
    x, y = clean[1].train
    bad = x.clone()
    bad[nan_where] = float("nan")
    bad[1::3] *= 100
    poisoned = dict(clean)
    poisoned[1] = DataSplits(
        (bad, y), clean[1].val, None, clean[1].input_shape, clean[1].num_outputs, clean[1].task
    )
    a = stacked_run(cfgs, datasets=clean)
    b = stacked_run(cfgs, datasets=poisoned)
    assert math.isnan(b[2][0][1].loss)  # the poisoned member did see its data
    for k in (0, 2):
        for step_a, step_b in zip(a[1], b[1], strict=True):
            assert abs(step_a[k] - step_b[k]) <= 1e-6 * abs(step_a[k])
        state_a, state_b = a[0].member_state_dict(k), b[0].member_state_dict(k)
        for key in state_a:  # running statistics included
            torch.testing.assert_close(state_a[key], state_b[key], rtol=1e-6, atol=1e-7)
        assert abs(a[3][0][k][0] - b[3][0][k][0]) <= 1e-6 * abs(a[3][0][k][0])


def assert_members_are_single_models(cfgs, kind: type[nn.Module]) -> None:
    """After an epoch, each member's ``member_state_dict`` loads strictly into a freshly built
    single model (and ``member_module`` is one, of ``kind``) that computes the stack's
    outputs and evaluation for that member."""
    trainer = StackedTrainer(cfgs)
    trainer.train_epoch()
    data = load_dataset(cfgs[1].dataset, cfgs[1].seed)
    x = data.val[0]
    trainer.net.eval()
    with torch.no_grad():
        stacked_out = trainer.net(x.expand(len(cfgs), *x.shape))
    for k, cfg in enumerate(cfgs):
        fresh = build_model(cfg.model, cfg.norm, data.input_shape, data.num_outputs)
        fresh.load_state_dict(trainer.member_state_dict(k))  # strict: the same keys
        member = trainer.member_module(k)
        assert isinstance(member, kind)
        with torch.no_grad():
            torch.testing.assert_close(fresh.eval()(x), stacked_out[k], rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(member.eval()(x), stacked_out[k], rtol=1e-5, atol=1e-5)
        loss, acc = evaluate(fresh, nn.CrossEntropyLoss(), data.val)
        got = trainer.evaluate(data=[data.val] * len(cfgs))[k]
        assert close(loss, got[0], 1e-5) and abs(acc - got[1]) < 1e-6


def _diverged(stats, factor: float = 1e3) -> bool:
    return not math.isfinite(stats.loss) or stats.loss > factor * max(stats.first_loss, 1e-12)


def assert_a_diverged_member_leaves_the_rest(cfgs, epochs: int):
    """Member 1 of ``cfgs`` (a huge lr) diverges in the first epoch and is taken out of the
    stack: its state stays as it was, and members 0 and 2 train ``epochs`` epochs exactly as
    a stack of those two alone. Returns the per-epoch stats and the final evaluation."""
    trainer = StackedTrainer(cfgs)
    alone = StackedTrainer([cfgs[0], cfgs[2]])
    stats, stats_alone = [trainer.train_epoch()], [alone.train_epoch()]
    assert _diverged(stats[0][1]) and not any(_diverged(stats[0][k]) for k in (0, 2))
    trainer.deactivate(1)
    frozen = trainer.member_state_dict(1)
    assert trainer.active_members() == [0, 2]
    assert {m.K for m in trainer.net.modules() if hasattr(m, "K")} == {2}
    for _ in range(epochs - 1):
        stats.append(trainer.train_epoch())
        stats_alone.append(alone.train_epoch())
    assert stats[-1][1] is None and trainer.evaluate()[1] is None
    for key, value in trainer.member_state_dict(1).items():  # nothing moved
        assert torch.equal(value, frozen[key]) or (value.isnan() == frozen[key].isnan()).all()
    val, val_alone = trainer.evaluate(), alone.evaluate()
    for k, j in ((0, 0), (2, 1)):
        for epoch in range(epochs):
            assert close(stats[epoch][k].loss, stats_alone[epoch][j].loss, 1e-5)
            assert close(stats[epoch][k].grad_norm, stats_alone[epoch][j].grad_norm, 1e-5)
        assert close(val[k][0], val_alone[j][0], 1e-5)
    return stats, val
