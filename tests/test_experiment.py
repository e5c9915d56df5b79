"""Experiments composed from the real configs and run for one epoch, called as a library."""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd
import pytest
import torch

from normbench import results
from normbench.app import compose_config
from normbench.catalog import group_choices
from normbench.engine.lifecycle import run_experiment
from normbench.engine.trainer import StackedTrainer
from normbench.errors import ConfigError
from normbench.models import build_model

NORMS = sorted(group_choices("norm"))
MODELS = ["mlp", "lenet", "convnet"]


def run(overrides: list[str]):
    cfg = compose_config(overrides)
    return run_experiment(cfg)


def metrics(result) -> pd.DataFrame:
    return pd.read_csv(result.path / results.METRICS_FILE).drop(columns=["epoch_seconds"])


# Every norm on lenet on the toy images (mlp and convnet: tests/test_faults.py sweeps every norm
# on both through the CLI), the norms a model refuses, and on the real digits one of each kind.
CASES = [
    *((n, "lenet", "toy") for n in NORMS),
    ("instance", "mlp", "toy"),
    *((n, m, "digits") for n in ("batch", "group", "layer", "none") for m in MODELS),
]


@pytest.mark.parametrize(("norm", "model", "dataset"), CASES)
def test_every_model_and_norm_runs(model: str, norm: str, dataset: str, tiny: list[str]) -> None:
    overrides = [*tiny, f"model={model}", f"norm={norm}", f"dataset={dataset}", "batch_size=16"]
    if model == "mlp" and norm == "instance":
        with pytest.raises(ConfigError, match="needs CNN feature maps"):
            run(overrides)
        return
    if norm == "batch_per_step":
        with pytest.raises(ConfigError, match="needs model=rnn"):
            run(overrides)
        return
    result = run(overrides)
    assert result.status in ("ok", "stalled")  # one tiny epoch need not beat chance
    row = result.rows[-1]
    assert 0.0 <= row["val_acc"] <= 1.0 and row["grad_norm"] > 0
    assert math.isfinite(row["train_loss"]) and math.isfinite(row["test_loss"])


def test_same_config_and_seed_give_identical_metrics(tiny: list[str], tmp_path: Path) -> None:
    first = metrics(run([*tiny, "model=convnet", "epochs=2"]))
    second = metrics(run([*tiny, "model=convnet", "epochs=2", f"results_dir={tmp_path / 'again'}"]))
    pd.testing.assert_frame_equal(first, second)


def test_different_seeds_differ(tiny: list[str]) -> None:
    assert not metrics(run([*tiny, "seed=0"])).equals(metrics(run([*tiny, "seed=1"])))


def test_run_id_follows_the_config(tiny: list[str]) -> None:
    ids = {run([*tiny, f"lr={lr}"]).run_id for lr in (0.1, 0.1, 0.2)}
    assert len(ids) == 2
    # How and where to run is not part of a run's identity.
    cfg = compose_config([*tiny, "device=cpu", "threads=1"])
    assert results.run_id(cfg) == run(tiny).run_id


def test_seeds_are_paired_across_norms(tiny: list[str]) -> None:
    """Same seed: same first-layer weights with batch, layer or no norm (bias or not)."""
    first_layers = []
    for norm in ("batch", "layer", "none"):
        cfg = compose_config([*tiny, f"norm={norm}"])
        model = build_model(cfg.model, cfg.norm, (1, 16, 16), 10)
        from normbench.models import init_paired

        init_paired(model, seed=3)
        first_layers.append(model.blocks[0].layer.weight.detach().clone())
        assert (model.blocks[0].layer.bias is None) == (norm == "batch")
    assert all(torch.equal(first_layers[0], w) for w in first_layers[1:])


def test_regression_as_in_document_000(tiny: list[str]) -> None:
    result = run([*tiny, "dataset.task=regression", "dataset.shape=[10]", "model.hidden=[5]"])
    frame = metrics(result)
    assert frame["task"].tolist() == ["regression"]
    assert frame["val_acc"].isna().all() and frame["val_loss"].notna().all()


def test_loss_decreases_over_epochs(tiny: list[str]) -> None:
    frame = metrics(run([*tiny, "epochs=4", "dataset.train_size=600"]))
    assert frame["train_loss"].iloc[-1] < frame["train_loss"].iloc[0]


def test_frozen_batch_norm_keeps_its_statistics_and_the_bias(tiny: list[str]) -> None:
    cfg = compose_config([*tiny, "norm=batch_frozen"])
    trainer = StackedTrainer([cfg])
    bn = trainer.net.blocks[0].norm
    before = {k: v.clone() for k, v in bn.state_dict().items()}
    [stats] = trainer.train_epoch()
    assert stats.steps > 0 and not bn.training
    assert all(torch.equal(before[k], v) for k, v in bn.state_dict().items())
    # A frozen norm adds no learned shift: the layer before it keeps its bias.
    assert trainer.member_module(0).blocks[0].layer.bias is not None


def test_plateau_scheduler_and_weight_decay_options(tiny: list[str]) -> None:
    overrides = [
        *tiny,
        "epochs=4",
        "lr=0.5",
        "optimizer.weight_decay=0.01",
        "optimizer.scheduler=plateau",
        "optimizer.plateau_patience=0",
        "optimizer.plateau_factor=0.1",
        "model.dropout=0.2",
    ]
    trainer = StackedTrainer([compose_config(overrides)])
    norm_params = {id(p) for b in trainer.net.blocks for p in b.norm.parameters()}
    optimizer = trainer.optimizer
    decays = {id(p): wd for p, wd in zip(optimizer.params, optimizer.weight_decays, strict=True)}
    assert norm_params and all(decays[p] == 0 for p in norm_params)
    assert {wd for p, wd in decays.items() if p not in norm_params} == {0.01}
    frame = metrics(run(overrides))
    # With patience 0 the lr drops by 10x after every epoch whose val loss did not improve.
    assert set(frame["lr_now"].round(6)) <= {0.5, 0.05, 0.005, 0.0005}


def test_asking_for_diagnostics_does_not_resume_a_checkpoint_without_them(
    tiny: list[str],
) -> None:
    """A killed run's checkpoint saved without diagnostics: a rerun with diagnostics=true
    starts afresh (diagnostics are not part of the run id) and records them all."""
    first = run([*tiny, "epochs=2", "keep_checkpoints=true", "checkpoint_seconds=0"])
    assert (first.path / results.CHECKPOINT_FILE).exists()
    frame = pd.read_csv(first.path / results.METRICS_FILE)
    frame.assign(status="running").to_csv(first.path / results.METRICS_FILE, index=False)
    again = run([*tiny, "epochs=2", "diagnostics=true", "diagnostics_every=1"])
    assert again.run_id == first.run_id and again.resumed_from == 0
    assert results.is_complete(again.path, diagnostics=True)
