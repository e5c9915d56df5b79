"""Diagnostics recorded by real tiny experiments, checked against direct computations.

The stacked recorder (diagnostics.Recorder on a StackedTrainer) is checked member by member
against the member trained alone: experiment.prepare's build, train.train_one_epoch, and the
documented formulas computed by hand on the plain model (``reference_rows``).
"""

from __future__ import annotations

import copy
import io
import math
from functools import partial
from pathlib import Path

import pandas as pd
import pytest
import torch
from rich.console import Console
from torch import nn

from normbench import results
from normbench.app import compose_config
from normbench.datasets import load_dataset
from normbench.engine import checkpoint, diagnostics, lifecycle
from normbench.engine.diagnostics import Recorder, eval_gap, stacked_eval_gap
from normbench.engine.lifecycle import run_experiment, run_group
from normbench.engine.trainer import StackedTrainer
from normbench.models import build_model, init_paired
from normbench.norms import is_frozen
from normbench.report import report
from normbench.results import PERCENTILES
from tests.reference_training import make_optimizer, shuffled_batches, train_one_epoch

STEP_QUANTITIES = {"input_mean", "input_std", "grad_norm", *PERCENTILES}


def run(overrides: list[str]):
    cfg = compose_config(overrides)
    return cfg, run_experiment(cfg)


def records(result) -> pd.DataFrame:
    return pd.read_csv(result.path / results.DIAGNOSTICS_FILE)


@pytest.fixture
def hooked_modules(monkeypatch: pytest.MonkeyPatch) -> list[nn.Module]:
    """Every module that gets a forward pre-hook while the test runs."""
    modules = []
    register = nn.Module.register_forward_pre_hook

    def spy(self, *args, **kwargs):
        modules.append(self)
        return register(self, *args, **kwargs)

    monkeypatch.setattr(nn.Module, "register_forward_pre_hook", spy)
    return modules


def test_csv_layout_steps_and_hooks_removed(tiny: list[str], hooked_modules) -> None:
    # 6 steps per epoch: step 6 is armed across the end of epoch 1, while the model is evaluated
    # (hooks must ignore eval-mode forward passes).
    _, result = run([*tiny, "diagnostics=true", "diagnostics_every=3", "epochs=2"])
    frame = records(result)
    assert list(frame.columns) == results.DIAGNOSTIC_COLUMNS
    assert set(frame["run_id"]) == {result.run_id}
    steps = frame[frame["quantity"].ne("eval_gap")]
    per_step = steps.groupby(["layer", "quantity"])["step"].apply(list)
    last_step = result.rows[-1]["step"]
    assert result.rows[0]["step"] == 6
    expected_steps = list(range(0, last_step, 3))  # from the untrained network on
    for layer in ("block0", "block1"):
        for quantity in ("input_mean", "input_std", "grad_norm"):
            assert per_step[(layer, quantity)] == expected_steps
    # Percentiles of the last hidden block only.
    assert set(steps.loc[steps["quantity"].isin(PERCENTILES), "layer"]) == {"block1"}
    assert set(steps["quantity"]) == STEP_QUANTITIES
    # The epoch of a step record is the epoch it was taken in.
    steps_per_epoch = result.rows[0]["step"]
    assert (steps["epoch"] == steps["step"] // steps_per_epoch + 1).all()
    gaps = frame[frame["quantity"].eq("eval_gap")]
    assert gaps[["epoch", "step", "layer"]].values.tolist() == [
        [1, steps_per_epoch, "model"],
        [2, last_step, "model"],
    ]
    assert frame["value"].notna().all()
    assert hooked_modules and all(not m._forward_pre_hooks for m in hooked_modules)


def test_off_writes_nothing_and_registers_no_hooks(tiny: list[str], hooked_modules) -> None:
    _, result = run(tiny)
    assert not (result.path / results.DIAGNOSTICS_FILE).exists()
    assert hooked_modules == []


def test_recording_leaves_training_unchanged(tiny: list[str], tmp_path: Path) -> None:
    """Hooks and the eval-gap measurement must not touch parameters or running statistics."""
    overrides = [*tiny, "epochs=2", "norm=batch_renorm", "norm.warmup_steps=0"]
    _, off = run(overrides)
    _, on = run([*overrides, "diagnostics=true", f"results_dir={tmp_path / 'on'}"])
    columns = ["train_loss", "val_loss", "val_acc", "test_acc", "grad_norm"]
    assert pd.DataFrame(on.rows)[columns].equals(pd.DataFrame(off.rows)[columns])


def test_values_match_a_direct_computation(tiny: list[str]) -> None:
    """Replay the run's first steps by hand and compare steps 0 and 3 with the CSV."""
    every = 3
    cfg, result = run([*tiny, "diagnostics=true", f"diagnostics_every={every}", "norm=batch"])
    frame = records(result).set_index(["step", "layer", "quantity"])["value"]

    data = load_dataset(cfg.dataset, cfg.seed)
    model = build_model(cfg.model, cfg.norm, data.input_shape, data.num_outputs)
    init_paired(model, cfg.seed)
    optimizer = make_optimizer(model, cfg.optimizer, cfg.lr)
    x, y = data.train
    order = shuffled_batches(
        len(x), cfg.batch_size, torch.Generator().manual_seed(cfg.seed), x.device
    )
    model.train()
    for step, index in zip(range(every + 1), order, strict=False):
        expected = {}
        h = x[index].flatten(1)
        for number, block in enumerate(model.blocks):
            z = block.layer(h)
            expected[(f"block{number}", "input_mean")] = z.mean().item()
            expected[(f"block{number}", "input_std")] = z.std().item()
            pre = block.norm(z)
            h = block.act(pre)
        levels = torch.tensor(list(PERCENTILES.values()))
        for name, value in zip(PERCENTILES, torch.quantile(pre.flatten(), levels), strict=True):
            expected[("block1", name)] = value.item()
        optimizer.zero_grad()
        nn.functional.cross_entropy(model.head(h), y[index]).backward()
        for number, block in enumerate(model.blocks):
            expected[(f"block{number}", "grad_norm")] = block.layer.weight.grad.norm().item()
        optimizer.step()
        if step % every == 0:
            for (layer, quantity), value in expected.items():
                assert frame[(step, layer, quantity)] == pytest.approx(value, rel=1e-5, abs=1e-7)
        else:
            assert step not in frame.index.get_level_values("step")


@pytest.mark.parametrize("norm", ["batch", "batch_renorm", "reference_batch", "batch_cumulative"])
def test_eval_gap_restores_statistics_and_modes(norm: str, tiny: list[str]) -> None:
    cfg = compose_config([*tiny, f"norm={norm}"])
    model = build_model(cfg.model, cfg.norm, (20,), 3)
    x, y = torch.randn(64, 20) * 3 + 1, torch.randint(0, 3, (64,))
    model.train()
    for xb in x.split(16):  # move the running statistics away from their initial values
        model(xb)
    model.blocks[1].eval()  # a mixed state, to be restored as it was
    before = copy.deepcopy(model.state_dict())
    modes = [m.training for m in model.modules()]

    gap = eval_gap(model, nn.CrossEntropyLoss(), (x[:60], y[:60]), batch_size=16)

    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert [m.training for m in model.modules()] == modes
    # Directly: accuracy on the 48 examples of three full batches, eval minus train-mode norms.
    reference = copy.deepcopy(model).eval()
    with torch.no_grad():
        running = (reference(x[:48]).argmax(1) == y[:48]).float().mean().item()
        for block in reference.blocks:
            block.norm.train()
        batch = torch.cat([reference(xb) for xb in x[:48].split(16)])
        batch = (batch.argmax(1) == y[:48]).float().mean().item()
    assert gap == pytest.approx(running - batch)


def test_eval_gap_only_with_running_statistics(tiny: list[str]) -> None:
    # A frozen batch norm is in eval mode during training: its block is still recorded.
    for norm, gap in (("batch", True), ("batch_frozen", True), ("none", False), ("layer", False)):
        _, result = run([*tiny, f"norm={norm}", "diagnostics=true"])
        quantities = set(records(result)["quantity"])
        assert quantities == STEP_QUANTITIES | ({"eval_gap"} if gap else set())
    cfg = compose_config([*tiny, "norm=batch_nostats"])
    model = build_model(cfg.model, cfg.norm, (20,), 3)
    assert eval_gap(model, nn.CrossEntropyLoss(), (torch.randn(8, 20), torch.zeros(8)), 4) is None


def test_report_reads_what_is_recorded(tiny: list[str], results_dir: Path, tmp_path: Path) -> None:
    for norm in ("batch", "none"):
        run([*tiny, f"norm={norm}", "diagnostics=true", "epochs=2"])
    console = Console(file=io.StringIO(), width=250)
    report(results_dir, diagnostics=True, fmt="csv", console=console, plot_dir=tmp_path / "png")
    table = pd.read_csv(io.StringIO(console.file.getvalue()))
    assert set(table["config"]) == {"batch", "none"}
    batch = table[table["config"].eq("batch")].set_index("layer")
    assert batch.loc["block0", "grad_norm"] > 0 and batch.loc["block1", "input_std"] > 0
    assert pd.notna(batch.loc["block1", "drift_preact_p50"])
    assert pd.notna(batch.loc["model", "eval_gap"])
    names = {path.name for path in (tmp_path / "png").iterdir()}
    assert names == {"diagnostics_percentiles.png", "diagnostics_grad_norm.png"}


def test_a_linear_model_records_nothing_but_the_header(tiny: list[str]) -> None:
    _, result = run([*tiny, "model.hidden=[]", "norm=none", "diagnostics=true"])
    assert (result.path / results.DIAGNOSTICS_FILE).read_text() == ",".join(
        results.DIAGNOSTIC_COLUMNS
    ) + "\n"


# -- the stacked recorder: every member records what its run alone records ------------------

# Float32 on the CPU, one thread: the stacked kernels (BN over K*C channels, grouped convs,
# bmm) reduce in another order than the single model's, so the trained weights, and with them
# every recorded value, drift apart by float32 rounding, amplified by training. Over the 21
# steps of an epoch test_stacked finds per-step losses within 1e-4; the recorded values are
# held to the same. An absolute floor covers means near 0, whose rounding error scales with the
# values summed, not with the mean.
REL, ABS = 1e-4, 1e-6
EVERY = 3  # 21 steps per epoch at batch 10: step 21 is armed across the end of epoch 1
SMALL = ["epochs=1", "quiet=true", "dataset.train_size=240", "dataset.test_size=60", "device=cpu"]
# (lr, seed) of three members: two share a seed (and so their data), one does not; lrs at
# which the small models train stably (see test_stacked).
MEMBERS = [(0.02, 0), (0.005, 1), (0.01, 0)]
_COMPOSED: dict[tuple[str, ...], object] = {}


def members(*overrides: str, grid=MEMBERS) -> list:
    """One config per (lr, seed) of ``grid``, equal but for those: a stack's members."""
    if overrides not in _COMPOSED:
        _COMPOSED[overrides] = compose_config([*SMALL, *overrides])
    cfgs = []
    for lr, seed in grid:
        cfg = copy.deepcopy(_COMPOSED[overrides])
        cfg.lr, cfg.seed = lr, seed
        cfgs.append(cfg)
    return cfgs


pytestmark = pytest.mark.usefixtures("one_thread")


def _loss_fn(task: str) -> nn.Module:
    return nn.CrossEntropyLoss() if task == "classification" else nn.MSELoss()


def _diverged(loss: float, first: float, factor: float) -> bool:
    return not math.isfinite(loss) or loss > factor * max(first, 1e-12)


def reference_rows(cfg, every: int = EVERY, epochs: int = 2) -> list[tuple]:
    """(epoch, step, layer, quantity, value) of ``cfg`` trained alone and measured by hand.

    The model, optimizer and data order of experiment.prepare, train_one_epoch's steps, and
    the documented formulas on the plain model: x.mean(), x.std() of each norm's input, the
    layer weight's grad.norm(), torch.quantile of the last pre-activation flattened as the
    model holds it, its values at ``randint(numel, (QUANTILE_SAMPLE,))`` from a generator
    seeded 0 when larger, and eval_gap (checked on its own above) once per epoch.
    """
    data = load_dataset(cfg.dataset, cfg.seed)
    model = build_model(cfg.model, cfg.norm, data.input_shape, data.num_outputs)
    init_paired(model, cfg.seed)
    torch.manual_seed(cfg.seed)
    optimizer = make_optimizer(model, cfg.optimizer, cfg.lr)
    generator = torch.Generator().manual_seed(cfg.seed)
    loss_fn = _loss_fn(data.task)
    rows: list[tuple] = []
    pending: list[tuple[str, str, float]] = []
    at = {"step": 0, "epoch": 1}

    def recording(block) -> bool:
        return block.training and at["step"] % every == 0

    def stats(layer, block, _module, args):
        if recording(block):
            x = args[0].detach()
            pending.extend(
                [(layer, "input_mean", x.mean().item()), (layer, "input_std", x.std().item())]
            )

    def preact(layer, block, _module, args):
        if recording(block):
            x = args[0].detach().flatten()
            if x.numel() > diagnostics.QUANTILE_SAMPLE:
                draw = torch.Generator().manual_seed(0)
                x = x[torch.randint(x.numel(), (diagnostics.QUANTILE_SAMPLE,), generator=draw)]
            q = torch.quantile(x, torch.tensor(list(PERCENTILES.values())))
            pending.extend(
                (layer, name, v) for name, v in zip(PERCENTILES, q.tolist(), strict=True)
            )

    blocks = model.blocks
    for index, block in enumerate(blocks):
        block.norm.register_forward_pre_hook(partial(stats, f"block{index}", block))
    if blocks:
        blocks[-1].act.register_forward_pre_hook(
            partial(preact, f"block{len(blocks) - 1}", blocks[-1])
        )

    def on_step(_model, _steps):
        if at["step"] % every == 0:
            for index, block in enumerate(blocks):
                pending.append(
                    (f"block{index}", "grad_norm", block.layer.weight.grad.norm().item())
                )
            rows.extend((at["epoch"], at["step"], *p) for p in pending)
            pending.clear()
        at["step"] += 1

    first = None
    for _ in range(epochs):
        epoch = train_one_epoch(
            model, optimizer, loss_fn, data.train, cfg.batch_size, generator,
            freeze_norms=is_frozen(cfg.norm), on_step=on_step,
        )  # fmt: skip
        first = epoch.first_loss if first is None else first
        if _diverged(epoch.loss, first, cfg.divergence_factor):
            break
        gap = eval_gap(model, loss_fn, data.val, cfg.batch_size)
        if gap is not None:
            rows.append((at["epoch"], at["step"], "model", "eval_gap", gap))
        at["epoch"] += 1
    return rows


def stacked_recording(cfgs, every: int = EVERY, epochs: int = 2, trainer=None):
    """The stack trained with a Recorder; members that diverge are deactivated (engine.py)."""
    trainer = trainer or StackedTrainer(cfgs)
    recorder = Recorder(trainer, [f"run{k}" for k in range(len(cfgs))], every)
    first: dict[int, float] = {}
    for _ in range(epochs):
        stats = trainer.train_epoch(on_step=recorder.on_step)
        for k in trainer.active_members():
            first.setdefault(k, stats[k].first_loss)
            if _diverged(stats[k].loss, first[k], cfgs[k].divergence_factor):
                trainer.deactivate(k)
        recorder.end_epoch()
    recorder.close()
    return trainer, recorder


def as_tuples(rows) -> list[tuple]:
    return [(r["epoch"], r["step"], r["layer"], r["quantity"], r["value"]) for r in rows]


def assert_rows_match(got: list[tuple], expected: list[tuple], rel: float = REL) -> None:
    """Same rows in the same order; values within ``rel`` (eval_gap, an accuracy: 1e-6)."""
    assert [g[:4] for g in got] == [e[:4] for e in expected]
    for g, e in zip(got, expected, strict=True):
        a, b = g[4], e[4]
        tolerance = 1e-6 if g[3] == "eval_gap" else rel * max(abs(a), abs(b)) + ABS
        assert abs(a - b) <= tolerance, (g, e)


MEMBER_CASES = {
    "mlp_batch": ("model=mlp", "norm=batch"),
    "mlp_none": ("model=mlp", "norm=none"),
    # the last pre-activation (B, 2048) is subsampled: member order (B, F), not (F, B)
    "mlp_batch_wide": ("model=mlp", "norm=batch", "model.hidden=[8,2048]"),
    # conv blocks only: the last pre-activation (B, 32, 8, 8) is subsampled, per member
    "convnet_batch": ("model=convnet", "norm=batch"),
    "convnet_dense_frozen": ("model=convnet", "norm=batch_frozen", "model.hidden=[16]"),
    "regression_renorm": ("model=mlp", "norm=batch_renorm", "norm.warmup_steps=0",
                          "dataset.task=regression"),
    # a recurrent net has no blocks: eval_gap only (running statistics shared, or per step)
    "rnn_batch": ("model=rnn", "model.hidden_size=16", "dataset=toy_sequence", "norm=batch"),
    "lstm_per_step": ("model=rnn", "model.cell=lstm", "model.hidden_size=16",
                      "dataset=toy_sequence", "norm=batch_per_step"),
}  # fmt: skip


@pytest.mark.parametrize("case", MEMBER_CASES)
def test_members_record_what_their_runs_alone_record(case: str) -> None:
    cfgs = members(*MEMBER_CASES[case], "batch_size=10")  # two members share a seed
    _, recorder = stacked_recording(cfgs)
    for k, cfg in enumerate(cfgs):
        expected = reference_rows(cfg)
        recurrent = cfg.model.name == "rnn"
        assert {e[3] for e in expected} >= ({"eval_gap"} if recurrent else STEP_QUANTITIES)
        got = as_tuples(recorder.rows[k])
        assert {r["run_id"] for r in recorder.rows[k]} == {f"run{k}"}
        assert_rows_match(got, expected)


def test_a_diverged_member_stops_recording_and_the_others_go_on() -> None:
    grid = [(0.05, 0), (1e6, 1), (0.1, 2)]
    cfgs = members("model=convnet", "norm=batch", "batch_size=16", grid=grid)
    trainer, recorder = stacked_recording(cfgs)
    assert trainer.active_members() == [0, 2]
    diverged = as_tuples(recorder.rows[1])
    alone = reference_rows(cfgs[1])  # diverges in its first epoch too: no eval_gap
    assert [d[:4] for d in diverged] == [a[:4] for a in alone]
    assert {d[0] for d in diverged} == {1} and "eval_gap" not in {d[3] for d in diverged}
    assert_rows_match(diverged[:6], alone[:6])  # the untrained network's step 0
    _, without = stacked_recording([cfgs[0], cfgs[2]])
    for k, j in ((0, 0), (2, 1)):
        assert_rows_match(as_tuples(recorder.rows[k]), as_tuples(without.rows[j]), rel=1e-5)
        assert {r[0] for r in as_tuples(recorder.rows[k])} == {1, 2}


def test_a_resumed_recorder_records_as_if_never_interrupted(tmp_path: Path) -> None:
    """Trainer and recorder state through a checkpoint file after epoch 1 (step 21 armed,
    member 1 deactivated): epoch 2 records what the uninterrupted stack records."""
    cfgs = members("model=mlp", "norm=batch", "batch_size=10", "model.dropout=0.2")
    whole = StackedTrainer(cfgs)
    straight = Recorder(whole, ["a", "b", "c"], EVERY)
    first = StackedTrainer(cfgs)
    stopped = Recorder(first, ["a", "b", "c"], EVERY)
    for trainer, recorder in ((whole, straight), (first, stopped)):
        trainer.train_epoch(on_step=recorder.on_step)
        trainer.deactivate(1)
        recorder.end_epoch()
    path = tmp_path / "stack.pt"
    state = {"trainer": first.state(), "diagnostics": stopped.state()}
    checkpoint.save_checkpoint(path, {"format": checkpoint.FORMAT, **state})
    stopped.close()
    saved = checkpoint.load_checkpoint(path)  # weights_only: rows are plain data
    resumed = StackedTrainer(cfgs)
    resumed.load_state(saved["trainer"])
    recorder = Recorder(resumed, ["a", "b", "c"], EVERY)
    recorder.restore(saved["diagnostics"])
    for trainer, rec in ((whole, straight), (resumed, recorder)):
        trainer.train_epoch(on_step=rec.on_step)
        rec.end_epoch()
        rec.close()
    assert recorder.rows == straight.rows
    assert any(r["step"] == 21 for r in recorder.rows[0])
    assert not any(r["epoch"] == 2 for r in recorder.rows[1])


def test_stacked_recording_leaves_training_unchanged() -> None:
    """Hooks and the eval-gap measurement must not touch parameters or running statistics."""
    cfgs = members("model=mlp", "norm=batch_renorm", "norm.warmup_steps=0", "batch_size=16")
    plain, recorded = StackedTrainer(cfgs), StackedTrainer(cfgs)
    recorder = Recorder(recorded, ["a", "b", "c"], every=1)
    for _ in range(2):
        assert recorded.train_epoch(on_step=recorder.on_step) == plain.train_epoch()
        recorder.end_epoch()
        assert recorded.evaluate() == plain.evaluate()
    recorder.close()
    for k in range(3):
        for key, value in plain.member_state_dict(k).items():
            assert torch.equal(recorded.member_state_dict(k)[key], value), key


@pytest.mark.parametrize("norm", ["batch", "batch_renorm", "reference_batch", "batch_cumulative"])
def test_stacked_eval_gap_restores_statistics_and_modes(norm: str) -> None:
    cfgs = members("model=mlp", f"norm={norm}", "batch_size=16")
    trainer = StackedTrainer(cfgs)
    trainer.train_epoch()
    trainer.deactivate(1)
    trainer.net.train()
    trainer.net.blocks[1].eval()  # a mixed state, to be restored as it was
    before = copy.deepcopy(trainer.net.state_dict())
    modes = [m.training for m in trainer.net.modules()]

    gaps = stacked_eval_gap(trainer)

    after = trainer.net.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert [m.training for m in trainer.net.modules()] == modes
    assert gaps[1] is None
    for k in (0, 2):  # the plain measurement on the member as a single model
        data = load_dataset(cfgs[k].dataset, cfgs[k].seed)
        single = eval_gap(trainer.member_module(k), nn.CrossEntropyLoss(), data.val, 16)
        assert gaps[k] == pytest.approx(single, abs=1e-6)


def test_stacked_eval_gap_only_with_running_statistics() -> None:
    # A frozen batch norm is in eval mode during training: its block is still recorded.
    for norm, gap in (("batch", True), ("batch_frozen", True), ("none", False), ("layer", False),
                      ("batch_nostats", False)):  # fmt: skip
        cfgs = members("model=mlp", f"norm={norm}", "batch_size=32", grid=MEMBERS[:2])
        _, recorder = stacked_recording(cfgs, epochs=1)
        for rows in recorder.rows:
            quantities = {r["quantity"] for r in rows}
            assert quantities == STEP_QUANTITIES | ({"eval_gap"} if gap else set()), norm


@pytest.mark.parametrize("model", ["mlp", "convnet"])
def test_stacked_percentiles_of_a_large_layer_use_a_fixed_subsample(model: str) -> None:
    hidden = "model.hidden=[1024]" if model == "mlp" else "model.hidden=[]"
    cfgs = members(f"model={model}", "norm=none", hidden, "batch_size=64", grid=MEMBERS[:2])
    trainer = StackedTrainer(cfgs)
    recorder = Recorder(trainer, ["a", "b"], every=1)
    x = torch.stack([trainer.data[int(c.seed)].train[0][:64] for c in cfgs])
    trainer.net.train()
    trainer.net(x)
    recorder.on_step(1, [])
    recorder.close()
    for k in range(2):
        single = trainer.member_module(k).train()
        captured = []
        hook = partial(lambda out, _module, args: out.append(args[0]), captured)
        single.blocks[-1].act.register_forward_pre_hook(hook)
        single(x[k])
        full = captured[0].detach().flatten()
        assert full.numel() > diagnostics.QUANTILE_SAMPLE
        values = pd.DataFrame(recorder.rows[k]).set_index("quantity")["value"]
        for name, level in PERCENTILES.items():
            assert values[name] == pytest.approx(torch.quantile(full, level).item(), abs=0.03)


def test_a_stacked_linear_model_records_nothing_but_the_header(tmp_path: Path) -> None:
    cfgs = members("model=mlp", "model.hidden=[]", "norm=none", "batch_size=32")
    trainer, recorder = stacked_recording(cfgs, every=1, epochs=1)
    assert recorder.rows == [[], [], []]
    recorder.write(2, tmp_path / "d.csv")
    assert (tmp_path / "d.csv").read_text() == ",".join(results.DIAGNOSTIC_COLUMNS) + "\n"


def test_a_stacked_sweep_job_writes_each_members_diagnostics(
    tiny: list[str], results_dir: Path, hooked_modules
) -> None:
    """A sweep job's stack (engine.run_group): each member's diagnostics.csv is the one its
    run alone (a stack of one: engine.run_experiment) writes."""
    overrides = [*tiny, "diagnostics=true", "diagnostics_every=4", "epochs=2", "threads=1"]
    grid = "[{lr:0.1,seed:0},{lr:0.1,seed:1},{lr:0.03,seed:0},{lr:0.03,seed:1}]"
    jobs = run_group(compose_config([*overrides, f"stack_members={grid}"]))
    assert [job.status for job in jobs] == ["ok"] * 4
    assert hooked_modules and all(not m._forward_pre_hooks for m in hooked_modules)
    for job in jobs:
        stacked = pd.read_csv(job.path / results.DIAGNOSTICS_FILE)
        _, alone = run([*overrides, f"lr={job.cfg.lr}", f"seed={job.cfg.seed}",
                        f"results_dir={results_dir / 'alone'}"])  # fmt: skip
        expected = records(alone)
        assert list(stacked.columns) == results.DIAGNOSTIC_COLUMNS
        assert set(stacked["run_id"]) == {job.run_id} == {alone.run_id}
        assert_rows_match(
            [tuple(r) for r in stacked[results.DIAGNOSTIC_COLUMNS[1:]].itertuples(index=False)],
            [tuple(r) for r in expected[results.DIAGNOSTIC_COLUMNS[1:]].itertuples(index=False)],
        )


@pytest.mark.parametrize("saved_with_diagnostics", [True, False])
def test_a_killed_stack_goes_on_recording_as_if_never_interrupted(
    tiny: list[str],
    results_dir: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    saved_with_diagnostics: bool,
) -> None:
    """Killed just after its checkpoint of epoch 1, a stack resumes its recorder with it; a
    checkpoint saved without diagnostics is not resumed by a job that asks for them."""
    settings = [*tiny, "stack_members=[{lr:0.1,seed:0},{lr:0.03,seed:0}]", "epochs=3"]
    settings += ["threads=1", "checkpoint_seconds=0", "diagnostics_every=4"]
    run_group(compose_config([*settings, "diagnostics=true", f"results_dir={tmp_path / 'w'}"]))
    save = lifecycle._save

    def save_then_die(*args, **kwargs):
        save(*args, **kwargs)
        raise KeyboardInterrupt  # a kill: nothing after the checkpoint is written

    monkeypatch.setattr(lifecycle, "_save", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        run_group(compose_config([*settings, f"diagnostics={saved_with_diagnostics}"]))
    monkeypatch.setattr(lifecycle, "_save", save)
    epochs = []
    train_epoch = StackedTrainer.train_epoch
    monkeypatch.setattr(
        StackedTrainer,
        "train_epoch",
        lambda self, **kw: epochs.append(1) or train_epoch(self, **kw),
    )
    jobs = run_group(compose_config([*settings, "diagnostics=true"]))
    assert len(epochs) == (2 if saved_with_diagnostics else 3)  # resumed, or afresh
    for job in jobs:
        name = Path(job.run_id) / results.DIAGNOSTICS_FILE
        assert (results_dir / name).read_text() == (tmp_path / "w" / name).read_text()
