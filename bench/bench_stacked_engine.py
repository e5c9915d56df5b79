"""The stacked trainer: one epoch of 15 runs (5 lr x 3 seeds) as one stack vs one after another.

Side by side in one process, one thread, the median of several alternating repeats: the same
15 configs trained by normbench.engine.trainer.StackedTrainer as one stack of 15, and as 15 stacks
of one, one after another (what ``--no-stack`` trains, and ``normbench run``). Also prints
the stacked group's peak memory: how far the resident set rose above its level before the
first stacked epoch (Linux; the allocator reuses memory freed earlier, so a small group can
show ~0), and
stacked.estimate_member_bytes x 15 plus each seed's data (what a group's chunks are budgeted
with).

Run: python bench/bench_stacked_engine.py [--repeats 3] [--train-size 2000]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from normbench.app import compose_config  # noqa: E402
from normbench.datasets import load_dataset  # noqa: E402
from normbench.engine.trainer import (  # noqa: E402
    StackedTrainer,
    estimate_data_bytes,
    estimate_member_bytes,
)

LRS = (0.003, 0.01, 0.03, 0.1, 0.3)
SEEDS = (0, 1, 2)
_SEQUENCES = "dataset=toy_sequence"  # 12 steps of 8 features
CASES = {
    "mlp 256-256-128-10 BN (default)": ["model=mlp", "norm=batch"],
    "mlp 64-100-100-10 BN": ["model=mlp", "model.hidden=[100,100]", "dataset.shape=[64]"],
    "convnet 16-32 BN (1x16x16)": ["model=convnet", "norm=batch"],
    "convnet 16-32 group (1x16x16)": ["model=convnet", "norm=group"],
    "rnn 64 BN per step (toy_sequence)": ["model=rnn", "norm=batch_per_step", _SEQUENCES],
    "lstm 64 layer (toy_sequence)": ["model=rnn", "model.cell=lstm", "norm=layer", _SEQUENCES],
}


def configs(overrides: list[str], train_size: int):
    base = ["quiet=true", "device=cpu", "batch_size=32", f"dataset.train_size={train_size}"]
    cfg = compose_config([*base, *overrides])
    out = []
    for seed in SEEDS:
        for lr in LRS:
            c = cfg.copy()
            c.lr, c.seed = lr, seed
            out.append(c)
    return out


def sequential_runs(cfgs, datasets):
    """The runs one after another, each a stack of one (what ``--no-stack`` trains)."""
    trainers = [StackedTrainer([cfg], datasets={cfg.seed: datasets[cfg.seed]}) for cfg in cfgs]

    def epoch():
        for trainer in trainers:
            trainer.train_epoch()

    return epoch


def _status_kib(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def peak_rss_increase(fn) -> int | None:
    """Bytes the resident set grew to above its level before ``fn`` (Linux), else None."""
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
    except OSError:
        return None
    before = _status_kib("VmRSS")
    fn()
    peak = _status_kib("VmHWM")
    return None if before is None or peak is None else (peak - before) * 1024


def elapsed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--train-size", type=int, default=2000)
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(f"{len(LRS)} lr x {len(SEEDS)} seeds = {len(LRS) * len(SEEDS)} members, batch 32, "
          f"{args.train_size} toy examples, 1 thread, median of {args.repeats}, "
          f"load average {os.getloadavg()[0]:.2f}")  # fmt: skip
    for name, overrides in CASES.items():
        cfgs = configs(overrides, args.train_size)
        datasets = {seed: load_dataset(cfgs[0].dataset, seed) for seed in SEEDS}
        trainer = StackedTrainer(cfgs, datasets=datasets)
        sequential = sequential_runs(cfgs, datasets)
        memory = peak_rss_increase(trainer.train_epoch)  # also the warm-up
        sequential()
        stacked_times, sequential_times = [], []
        for _ in range(args.repeats):
            stacked_times.append(elapsed(trainer.train_epoch))
            sequential_times.append(elapsed(sequential))
        t_stacked = statistics.median(stacked_times)
        t_sequential = statistics.median(sequential_times)
        data = datasets[SEEDS[0]]
        estimate = len(cfgs) * estimate_member_bytes(
            cfgs[0], data.input_shape, data.num_outputs
        ) + len(SEEDS) * estimate_data_bytes(data.input_shape, len(data.train[0]))
        mem = "n/a" if memory is None else f"{memory / 2**20:.1f} MiB"
        print(
            f"{name:32s} sequential {t_sequential:6.3f} s  stacked {t_stacked:6.3f} s  "
            f"ratio {t_sequential / t_stacked:5.2f}x  stacked peak +{mem} "
            f"(estimate {estimate / 2**20:.1f} MiB)"
        )


if __name__ == "__main__":
    main()
