"""Training-loop throughput: normbench's engine (a run is a stack of one) vs the documents' loop.

Same model, data, batch size and optimizer (SGD, the documents' lr), timed side by side in one
process: epochs of each loop alternate, and the median of several rounds is printed with the
ratios, so machine noise affects all alike. Ours is ``StackedTrainer([cfg]).train_epoch()``,
what ``normbench run`` trains with. Theirs: document 000 batches a TensorDataset through a
DataLoader; document 001 reads MNIST through torchvision's dataset class with the usual
ToTensor + Normalize transforms (tiny files in the real on-disk format: nothing is downloaded).
The third loop is the plain-model loop normbench used for single runs before it had one engine
(tests/reference_training.py: index a permutation of tensors held in memory, torch.optim).

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
from normbench.engine.trainer import StackedTrainer
from normbench.models import build_model, init_paired

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.fake_datasets import write_fake_mnist  # noqa: E402
from tests.reference_training import train_one_epoch  # noqa: E402


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
    models = []
    for _ in range(2):
        model = build_model(cfg.model, cfg.norm, data.input_shape, data.num_outputs)
        init_paired(model, cfg.seed)
        models.append((model, torch.optim.SGD(model.parameters(), lr=cfg.lr)))
    generator = torch.Generator().manual_seed(cfg.seed)
    n = len(data.train[0]) // cfg.batch_size * cfg.batch_size
    loops = {
        "normbench": (lambda: trainer.train_epoch(), n),
        "documents": (lambda: documents_loop(*models[0], loss_fn, loader), len(loader.dataset)),
        "plain": (
            lambda: train_one_epoch(*models[1], loss_fn, data.train, cfg.batch_size, generator), n
        ),
    }
    times: dict[str, list[float]] = {name: [] for name in loops}
    for round_ in range(rounds + 1):  # round 0 warms up
        for loop, (epoch, _) in loops.items():
            seconds = elapsed(epoch)
            if round_:
                times[loop].append(seconds)
    rate = {loop: count / statistics.median(times[loop]) for loop, (_, count) in loops.items()}
    ours = rate["normbench"]
    print(
        f"{name}: normbench {ours:,.0f} ex/s; {ours / rate['documents']:.2f}x the documents' "
        f"loop, {ours / rate['plain']:.2f}x the plain-model loop (median of {rounds} rounds)"
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
