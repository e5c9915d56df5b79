"""Training-loop throughput: normbench's engine (a run is a stack of one) vs the documents' loop.

Same model, data, batch size and optimizer (SGD, the documents' lr), timed side by side in one
process: epochs of each loop alternate, and the median of several rounds is printed with the
ratio, so machine noise affects both alike. Ours is ``StackedTrainer([cfg]).train_epoch()``,
what ``normbench run`` trains with. Theirs: document 000 batches a TensorDataset through a
DataLoader; document 001 reads MNIST through torchvision's dataset class with the usual
ToTensor + Normalize transforms (tiny files in the real on-disk format: nothing is downloaded).

Run: python bench/bench_train_loop.py [--rounds 7]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from torchvision import datasets, transforms

from normbench.app import compose_config
from normbench.datasets import DataSplits, load_dataset
from normbench.models import build_model, init_paired
from normbench.stacked import StackedTrainer

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.fake_datasets import write_fake_mnist  # noqa: E402


def documents_loop(model, optimizer, loss_fn, loader) -> None:
    """Documents 000 and 001: iterate a DataLoader."""
    model.train()
    for batch_x, batch_y in loader:
        optimizer.zero_grad()
        loss = loss_fn(model(batch_x), batch_y)
        loss.backward()
        optimizer.step()


def elapsed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def compare(name: str, cfg, data: DataSplits, loader, loss_fn, rounds: int) -> None:
    """Time an epoch of each loop over the same examples, alternating; print the medians."""
    trainer = StackedTrainer([cfg], {cfg.seed: data}, "cpu")
    model = build_model(cfg.model, cfg.norm, data.input_shape, data.num_outputs)
    init_paired(model, cfg.seed)
    optimizer = torch.optim.SGD(model.parameters(), lr=cfg.lr)

    def ours():
        trainer.train_epoch()

    def theirs():
        documents_loop(model, optimizer, loss_fn, loader)

    ours(), theirs()  # warm up
    t_ours, t_theirs = [], []
    for _ in range(rounds):
        t_ours.append(elapsed(ours))
        t_theirs.append(elapsed(theirs))
    n_ours = len(data.train[0]) // cfg.batch_size * cfg.batch_size
    n_theirs = len(loader.dataset)
    ours_rate = n_ours / statistics.median(t_ours)
    theirs_rate = n_theirs / statistics.median(t_theirs)
    print(
        f"{name}: normbench {ours_rate:,.0f} ex/s, documents' loop {theirs_rate:,.0f} ex/s, "
        f"ratio {ours_rate / theirs_rate:.2f}x (median of {rounds} alternating epochs)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    rounds = parser.parse_args().rounds
    torch.set_num_threads(1)  # normbench's default, for both loops
    print(f"load average {os.getloadavg()[0]:.2f}, torch {torch.__version__}, one thread")
    torch.manual_seed(0)
    # Document 000: Linear(10,5)-BatchNorm1d(5)-ReLU-Linear(5,1), MSE, batch 20, lr 0.01.
    x, y = torch.randn(10_000, 10), torch.randn(10_000, 1)
    toy = DataSplits((x, y), (x[:20], y[:20]), None, (10,), 1, "regression")
    cfg = compose_config(["model.hidden=[5]", "batch_size=20", "lr=0.01", "device=cpu"])
    loader = DataLoader(TensorDataset(x, y), batch_size=20)
    compare("document 000 (MLP 10-5-1, batch 20)", cfg, toy, loader, nn.MSELoss(), rounds)

    # Document 001: the MNIST CNN with BatchNorm, batch 64, MNIST through torchvision.
    with tempfile.TemporaryDirectory() as root:
        write_fake_mnist(Path(root), n_train=4096, n_test=16)
        mnist = datasets.MNIST(
            root,
            train=True,
            transform=transforms.Compose(
                [transforms.ToTensor(), transforms.Normalize((0.1307,), (0.3081,))]
            ),
        )
        loader = DataLoader(mnist, batch_size=64, shuffle=True)
        cfg = compose_config(
            ["model=lenet", "dataset=mnist", f"dataset.root={root}", "dataset.val_fraction=0.01",
             "batch_size=64", "lr=0.01", "device=cpu"]
        )  # fmt: skip
        splits = load_dataset(cfg.dataset, seed=0)
        name = "document 001 (LeNet on MNIST, batch 64)"
        compare(name, cfg, splits, loader, nn.CrossEntropyLoss(), rounds)


if __name__ == "__main__":
    main()
