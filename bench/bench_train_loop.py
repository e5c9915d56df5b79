"""Training-loop throughput: normbench's tensor-indexing loop vs the documents' DataLoader loop.

Same model, data, batch size and optimizer, timed side by side in one process (alternating,
best of several repeats) so machine noise affects both alike. Prints examples/second and the
ratio. Run: python bench/bench_train_loop.py
"""

from __future__ import annotations

import time

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from normbench.config import ModelConfig, NormConfig
from normbench.models import build_model
from normbench.train import train_one_epoch


def documents_loop(model, optimizer, loss_fn, loader) -> None:
    """Documents 000 and 001: iterate a DataLoader over a TensorDataset."""
    model.train()
    for batch_x, batch_y in loader:
        optimizer.zero_grad()
        loss = loss_fn(model(batch_x), batch_y)
        loss.backward()
        optimizer.step()


def best_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def compare(name: str, model: nn.Module, x, y, loss_fn, batch_size: int, repeats: int = 5) -> float:
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    loader = DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=True)
    generator = torch.Generator().manual_seed(0)

    def ours():
        train_one_epoch(model, optimizer, loss_fn, (x, y), batch_size, generator)

    def theirs():
        documents_loop(model, optimizer, loss_fn, loader)

    ours(), theirs()  # warm up
    t_ours = t_theirs = float("inf")
    for _ in range(repeats):  # interleave so drift hits both
        t_ours = min(t_ours, best_time(ours, 1))
        t_theirs = min(t_theirs, best_time(theirs, 1))
    n = len(x)
    print(
        f"{name}: normbench {n / t_ours:,.0f} ex/s, DataLoader {n / t_theirs:,.0f} ex/s, "
        f"ratio {t_theirs / t_ours:.2f}x"
    )
    return t_theirs / t_ours


def main() -> None:
    torch.manual_seed(0)
    # Document 000: Linear(10,5)-BatchNorm1d(5)-ReLU-Linear(5,1), MSE, batch 20.
    x, y = torch.randn(10_000, 10), torch.randn(10_000, 1)
    doc000 = build_model(ModelConfig(hidden=[5]), NormConfig(name="batch"), (10,), 1)
    compare("document 000 (MLP 10-5-1, batch 20)", doc000, x, y, nn.MSELoss(), 20)
    # Document 001: the MNIST CNN with BatchNorm on 28x28 images, batch 64.
    x, y = torch.randn(4096, 1, 28, 28), torch.randint(0, 10, (4096,))
    lenet = build_model(
        ModelConfig(name="lenet", channels=[10, 20], hidden=[50]), NormConfig(), (1, 28, 28), 10
    )
    compare("document 001 (LeNet on 28x28, batch 64)", lenet, x, y, nn.CrossEntropyLoss(), 64)


if __name__ == "__main__":
    main()
