"""Training-loop throughput: normbench's tensor-indexing loop vs the documents' DataLoader loop.

Same model, data, batch size and optimizer, timed side by side in one process (interleaved,
best of several repeats) so machine noise affects both alike. Prints examples/second and the
ratio. Document 000 batches a TensorDataset; document 001 reads MNIST through torchvision's
dataset class with the usual ToTensor + Normalize transforms (here from tiny files in the real
on-disk format, since nothing is downloaded). Run: python bench/bench_train_loop.py
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from torchvision import datasets, transforms

from normbench.config import DatasetConfig, ModelConfig, NormConfig
from normbench.datasets import load_dataset
from normbench.models import build_model
from normbench.train import train_one_epoch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.fake_datasets import write_fake_mnist  # noqa: E402


def documents_loop(model, optimizer, loss_fn, loader) -> None:
    """Documents 000 and 001: iterate a DataLoader over a TensorDataset."""
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


def compare(name, model: nn.Module, x, y, loader, loss_fn, batch_size: int, repeats: int = 5):
    """Time an epoch of each loop over the same examples; print and return the ratio."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)  # the documents' optimizer, for both
    generator = torch.Generator().manual_seed(0)

    def ours():
        train_one_epoch(model, optimizer, loss_fn, (x, y), batch_size, generator)

    def theirs():
        documents_loop(model, optimizer, loss_fn, loader)

    ours(), theirs()  # warm up
    t_ours = t_theirs = float("inf")
    for _ in range(repeats):  # interleave so drift hits both
        t_ours = min(t_ours, elapsed(ours))
        t_theirs = min(t_theirs, elapsed(theirs))
    n_ours, n_theirs = len(x) // batch_size * batch_size, len(loader.dataset)
    print(
        f"{name}: normbench {n_ours / t_ours:,.0f} ex/s, "
        f"DataLoader {n_theirs / t_theirs:,.0f} ex/s, "
        f"ratio {(n_ours / t_ours) / (n_theirs / t_theirs):.2f}x"
    )


def main() -> None:
    torch.set_num_threads(1)  # normbench's default, for both loops
    torch.manual_seed(0)
    # Document 000: Linear(10,5)-BatchNorm1d(5)-ReLU-Linear(5,1), MSE, batch 20.
    x, y = torch.randn(10_000, 10), torch.randn(10_000, 1)
    loader = DataLoader(TensorDataset(x, y), batch_size=20)
    doc000 = build_model(ModelConfig(hidden=[5]), NormConfig(name="batch"), (10,), 1)
    compare("document 000 (MLP 10-5-1, batch 20)", doc000, x, y, loader, nn.MSELoss(), 20)

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
        splits = load_dataset(DatasetConfig(name="mnist", root=root, val_fraction=0.01), seed=0)
    x, y = splits.train
    lenet = build_model(
        ModelConfig(name="lenet", channels=[10, 20], hidden=[50]), NormConfig(), (1, 28, 28), 10
    )
    loss_fn = nn.CrossEntropyLoss()
    compare("document 001 (LeNet on MNIST, batch 64)", lenet, x, y, loader, loss_fn, 64)


if __name__ == "__main__":
    main()
