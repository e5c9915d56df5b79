"""A run resumed from a checkpoint continues bitwise as if it had never stopped."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from normbench.engine import checkpoint
from tests.reference_training import evaluate, train_one_epoch

X = torch.randn(96, 6, generator=torch.Generator().manual_seed(0))
Y = (X[:, 0] > 0).long()


def _build(seed: int):
    """Fresh objects; the seed differs between builds so only a restore can make them agree."""
    torch.set_num_threads(1)  # as runs do (threads=1); the tiny ops gain nothing from more
    torch.manual_seed(seed)
    random.seed(seed)
    model = nn.Sequential(
        nn.Linear(6, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Dropout(0.3), nn.Linear(16, 2)
    )
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
    scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, patience=0, factor=0.5)
    return model, optimizer, scheduler, torch.Generator().manual_seed(seed)


def _train(epochs: int, model, optimizer, scheduler, generator) -> list[float]:
    """Train with dropout (global stream) and shuffling (generator); Python's draws returned."""
    draws = []
    for _ in range(epochs):
        train_one_epoch(model, optimizer, nn.CrossEntropyLoss(), (X, Y), 8, generator)
        scheduler.step(evaluate(model, nn.CrossEntropyLoss(), (X, Y))[0])
        draws.append(random.random())
    return draws


def _same(a: nn.Module, b: nn.Module) -> bool:
    return all(
        torch.equal(x, y)
        for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True)
    )


def test_resuming_continues_bitwise(tmp_path: Path):
    path = tmp_path / "checkpoint.pt"
    first = _build(seed=0)
    _train(2, *first)
    rows = [{"epoch": 1, "val_loss": 0.5, "error": "", "test_acc": None}]
    checkpoint.save_checkpoint(
        path, checkpoint.capture(*first, rows, epoch=2, step=24, first_loss=0.7)
    )
    draws = _train(3, *first)

    resumed = _build(seed=1)
    state = checkpoint.load_checkpoint(path)
    checkpoint.restore(state, *resumed)
    assert _train(3, *resumed) == draws
    assert _same(first[0], resumed[0])
    assert first[1].param_groups[0]["lr"] == resumed[1].param_groups[0]["lr"] < 0.5
    assert (state["rows"], state["epoch"], state["step"], state["first_loss"]) == (rows, 2, 24, 0.7)


def test_without_the_random_states_the_runs_differ(tmp_path: Path):
    """The bitwise test above is only meaningful if dropout and data order matter."""
    first = _build(seed=0)
    _train(2, *first)
    state = checkpoint.capture(*first, [], epoch=2, step=24, first_loss=0.7)
    _train(3, *first)
    resumed = _build(seed=1)
    rng = state["rng"]
    checkpoint.restore({**state, "rng": checkpoint.capture_rng(resumed[3])}, *resumed)
    _train(3, *resumed)
    assert not _same(first[0], resumed[0])
    checkpoint.restore_rng(rng, resumed[3])  # the helper alone puts every stream back
    assert random.getstate() == rng["python"]
    assert torch.equal(torch.get_rng_state(), rng["torch"])
    assert torch.equal(resumed[3].get_state(), rng["generator"])


def test_files_load_with_weights_only(tmp_path: Path):
    model = _build(seed=0)[0]
    checkpoint.save_checkpoint(
        tmp_path / "c.pt", checkpoint.capture(*_build(seed=0), [], epoch=0, step=0, first_loss=1.0)
    )
    checkpoint.save_weights(tmp_path / "model.pt", model)
    for name in ("c.pt", "model.pt"):
        torch.load(tmp_path / name, weights_only=True)
    fresh = _build(seed=1)[0]
    checkpoint.load_weights(tmp_path / "model.pt", fresh)
    assert _same(model, fresh)


def test_saving_refuses_what_weights_only_loading_would(tmp_path: Path):
    path = tmp_path / "checkpoint.pt"
    state = {"format": 1, "rows": [{"epoch": 1, "val_loss": np.float64(0.5)}]}
    with pytest.raises(TypeError, match=r"checkpoint\['rows'\]\[0\]\['val_loss'\] is a float64"):
        checkpoint.save_checkpoint(path, state)
    assert not path.exists()


class Payload:
    """Stands for anything a pickle could smuggle in."""


def test_loading_refuses_arbitrary_objects(tmp_path: Path):
    path = tmp_path / "checkpoint.pt"
    torch.save({"format": 1, "rows": [Payload()]}, path)
    with pytest.raises(checkpoint.CheckpointError, match=f"cannot load {path}: .*refused"):
        checkpoint.load_checkpoint(path)


def test_a_missing_checkpoint_is_none_and_a_foreign_file_is_refused(tmp_path: Path):
    assert checkpoint.load_checkpoint(tmp_path / "checkpoint.pt") is None
    (tmp_path / "checkpoint.pt").write_text("not a checkpoint")
    with pytest.raises(checkpoint.CheckpointError, match="cannot load"):
        checkpoint.load_checkpoint(tmp_path / "checkpoint.pt")
    torch.save({"model": {}}, tmp_path / "old.pt")
    with pytest.raises(checkpoint.CheckpointError, match="not a normbench checkpoint"):
        checkpoint.load_checkpoint(tmp_path / "old.pt")


def test_weights_of_another_model_are_refused(tmp_path: Path):
    checkpoint.save_weights(tmp_path / "model.pt", nn.Linear(3, 2))
    with pytest.raises(checkpoint.CheckpointError, match="cannot load .*model.pt"):
        checkpoint.load_weights(tmp_path / "model.pt", nn.Linear(4, 2))
