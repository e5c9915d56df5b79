"""Stacked sweeps (the default) against one job per run, and against a plain Lightning loop.

1. Presets, at their defaults (every group of runs that differ in lr and seed trains as one
   stack) against the same preset with ``--no-stack --jobs 2`` (one job per run, both cores),
   alternating A B A B ..., each run into a fresh folder: the median wall time of each and the
   median of the pairwise ratios, with the load average; the training time inside a sweep
   (its runs' summed epoch_seconds; for a stack, each group's epochs once) and the peak
   memory of any process of the sweep (max RSS) of the median round.
2. The 12-run default grid (4 norms x 3 learning rates, toy data, 5 epochs):
   ``normbench sweep`` against the same 12 runs as a plain PyTorch Lightning ``Trainer`` loop
   (DataLoader over the same tensors, the same model, one run after another in one process),
   alternating. Both are timed as whole processes, start to exit, imports included; the time
   the loop spends composing normbench's Hydra configs is left out, as a plain loop would not
   compose them. Lightning is a bench extra only: ``pip install -e ".[bench]"``; without it
   that part is skipped.

Run: python bench/bench_stacked.py [--rounds 3] [--presets lr_robustness,...] [--quick]
(--quick: the 12-run grid only)
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd

BASELINE = ["--no-stack", "--jobs", "2"]
PRESETS = ["lr_robustness", "activation_drift", "rnn_norms", "ghost_batch"]  # the MLP presets
GRID = ["norm=batch,layer,group,none", "lr=0.01,0.1,1.0"]
# Runs a command and prints the largest resident set of any process it waited for (KiB).
_PEAK = (
    "import resource, subprocess, sys; subprocess.run(sys.argv[1:], check=True, "
    "capture_output=True); print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)"
)


def sweep(results_dir: Path, flags: list[str], overrides: list[str]) -> dict[str, float]:
    """Wall time, summed training time and peak memory of one ``normbench sweep``."""
    command = [sys.executable, "-m", "normbench", "sweep", *flags, *overrides]
    start = time.perf_counter()
    peak = subprocess.run(
        [sys.executable, "-c", _PEAK, *command, f"results_dir={results_dir}"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    wall = time.perf_counter() - start
    frames = [pd.read_csv(p) for p in results_dir.glob("*/metrics.csv")]
    runs = pd.concat(frames)
    # a stacked group's epoch_seconds is the whole stack's epoch: count it once per group
    per_epoch = runs.groupby(["epoch", "stack_size", "epoch_seconds"]).size().reset_index()
    training = float(per_epoch["epoch_seconds"].sum())
    return {"wall": wall, "training": training, "peak_mib": int(peak) / 1024, "runs": len(frames)}


def compare_modes(preset: str, tmp: Path, rounds: int) -> None:
    """The preset at its defaults (stacked) and with ``--no-stack --jobs 2``, alternating."""
    print(f"\nexperiment={preset}, {rounds} alternating rounds, load average {_load()}")
    stacked, baseline = [], []
    for i in range(rounds):
        stacked.append(sweep(tmp / f"{preset}-stacked-{i}", [], [f"experiment={preset}"]))
        baseline.append(sweep(tmp / f"{preset}-alone-{i}", BASELINE, [f"experiment={preset}"]))
    ratios = [b["wall"] / a["wall"] for a, b in zip(stacked, baseline, strict=True)]
    for name, timings in (("default (stacked)", stacked), (" ".join(BASELINE), baseline)):
        walls = [t["wall"] for t in timings]
        median = sorted(timings, key=lambda t: t["wall"])[len(timings) // 2]
        print(
            f"  {name:<24} median {statistics.median(walls):6.1f} s wall "
            f"({', '.join(f'{w:.1f}' for w in walls)}), {median['training']:.1f} s training, "
            f"peak {median['peak_mib']:.0f} MiB ({median['runs']} runs)"
        )
    print(f"  stacked is {statistics.median(ratios):.2f}x faster (median of pairwise ratios "
          f"{', '.join(f'{r:.2f}' for r in ratios)}); load average now {_load()}")


def _load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


LIGHTNING_LOOP = r"""
import json, sys, time
import lightning as L
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from normbench.app import compose_config
from normbench.datasets import load_dataset
from normbench.models import build_model, init_paired

class Module(L.LightningModule):
    def __init__(self, model, lr):
        super().__init__()
        self.model, self.lr = model, lr
    def training_step(self, batch, _):
        x, y = batch
        return nn.functional.cross_entropy(self.model(x), y)
    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr)

torch.set_num_threads(1)
composing = 0.0  # a plain loop would not compose Hydra configs: this time is not counted
for norm in ("batch", "layer", "group", "none"):
    for lr in (0.01, 0.1, 1.0):
        tic = time.perf_counter()
        cfg = compose_config([f"norm={norm}", f"lr={lr}"])
        composing += time.perf_counter() - tic
        data = load_dataset(cfg.dataset, cfg.seed)
        model = build_model(cfg.model, cfg.norm, data.input_shape, data.num_outputs)
        init_paired(model, cfg.seed)
        loader = DataLoader(TensorDataset(*data.train), batch_size=cfg.batch_size,
                            shuffle=True, drop_last=True)
        trainer = L.Trainer(max_epochs=cfg.epochs, accelerator="cpu", logger=False,
                            enable_checkpointing=False, enable_progress_bar=False,
                            enable_model_summary=False)
        trainer.fit(Module(model, lr), loader)
print(json.dumps({"composing": composing}))
"""


def compare_lightning(tmp: Path, rounds: int) -> None:
    """``normbench sweep`` and the Lightning loop alternately, ``rounds`` times each: the
    medians, every round's times, and the median of the pairwise ratios."""
    print(f"\n12-run default grid (4 norms x 3 lr, toy data, 5 epochs), {rounds} rounds, "
          f"load average {_load()}")
    if importlib.util.find_spec("lightning") is None:
        print("  Lightning loop: skipped (pip install -e '.[bench]')")
        return
    stacked, walls = [], []
    for i in range(rounds):
        stacked.append(sweep(tmp / f"grid-{i}", [], GRID))
        start = time.perf_counter()  # as the sweep: the whole process, start to exit
        done = subprocess.run(
            [sys.executable, "-c", LIGHTNING_LOOP], check=True, capture_output=True, text=True
        )
        timing = json.loads(done.stdout.strip().splitlines()[-1])
        walls.append(time.perf_counter() - start - timing["composing"])
    ours = [t["wall"] for t in stacked]
    median = sorted(stacked, key=lambda t: t["wall"])[len(stacked) // 2]
    overhead = median["wall"] - median["training"]
    ratios = [theirs / mine for mine, theirs in zip(ours, walls, strict=True)]
    print(
        f"  normbench sweep          median {statistics.median(ours):5.1f} s wall "
        f"({', '.join(f'{w:.1f}' for w in ours)}), fixed overhead {overhead:.1f} s\n"
        f"  Lightning Trainer loop   median {statistics.median(walls):5.1f} s wall "
        f"({', '.join(f'{w:.1f}' for w in walls)}; composing normbench's configs left out)\n"
        f"  normbench is {statistics.median(ratios):.2f}x faster (median of pairwise ratios)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--presets", default=",".join(PRESETS))
    parser.add_argument("--quick", action="store_true", help="the 12-run grid only")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        compare_lightning(Path(tmp), max(args.rounds, 5))
        if not args.quick:
            for preset in args.presets.split(","):
                compare_modes(preset, Path(tmp), args.rounds)


if __name__ == "__main__":
    main()
