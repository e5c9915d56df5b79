"""Diagnostics recorded by real tiny experiments, checked against direct computations."""

from __future__ import annotations

import copy
import io
from pathlib import Path

import pandas as pd
import pytest
import torch
from rich.console import Console
from torch import nn

from normbench import diagnostics, results
from normbench.app import compose_config
from normbench.datasets import load_dataset
from normbench.diagnostics import Recorder, eval_gap
from normbench.engine import run_experiment
from normbench.models import build_model, init_paired
from normbench.report import report
from normbench.results import PERCENTILES
from tests.reference_training import make_optimizer, shuffled_batches

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


def test_percentiles_of_a_large_layer_use_a_fixed_subsample(tiny: list[str]) -> None:
    cfg = compose_config([*tiny, "norm=none", "model.hidden=[1024]"])
    model = build_model(cfg.model, cfg.norm, (20,), 3).train()
    recorder = Recorder(model, "run", every=1)
    x = torch.randn(64, 20)
    model(x)
    recorder.on_step(model, 1)
    recorder.close()
    values = pd.DataFrame(recorder.rows).set_index("quantity")["value"]
    full = model.blocks[0].layer(x).detach().flatten()
    assert full.numel() > diagnostics.QUANTILE_SAMPLE
    for name, level in PERCENTILES.items():
        assert values[name] == pytest.approx(torch.quantile(full, level).item(), abs=0.03)


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
