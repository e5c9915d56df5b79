"""Stacked sweeps: ``--stack`` against one job per run, and against a plain Lightning loop.

1. The lr_robustness and batch_size presets run four ways side by side, each into a fresh
   folder: serial, ``--jobs 2``, ``--stack``, ``--stack --jobs 2``. Printed: wall time, the
   training time inside it (the runs' summed epoch_seconds; for a stack, each group's epochs
   once), the ratio to ``--jobs 2`` and to serial, and the peak memory of any process of the
   sweep (max RSS).
2. The 12-run default grid (4 norms x 3 learning rates, toy data, 5 epochs):
   ``normbench sweep --stack`` against the same 12 runs as a plain PyTorch Lightning
   ``Trainer`` loop (DataLoader over the same tensors, the same model, one run after another
   in one process). Both are timed as whole processes, start to exit, imports included; the
   time the loop spends composing normbench's Hydra configs is left out, as a plain loop
   would not compose them. Lightning is a bench extra only:
   ``pip install -e ".[bench]"``; without it that part is skipped.

Run: python bench/bench_stacked.py [--quick]   (--quick: the 12-run grid only)
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd

MODES = {
    "serial": [],
    "--jobs 2": ["--jobs", "2"],
    "--stack": ["--stack"],
    "--stack --jobs 2": ["--stack", "--jobs", "2"],
}
PRESETS = ["experiment=lr_robustness", "experiment=batch_size"]
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


def compare_modes(preset: str, tmp: Path) -> None:
    print(f"\n{preset}")
    folder = preset.split("=")[-1]  # no "=" in a results_dir override's value
    timings = {name: sweep(tmp / f"{folder}-{i}", flags, [preset])
               for i, (name, flags) in enumerate(MODES.items())}  # fmt: skip
    base, jobs2 = timings["serial"]["wall"], timings["--jobs 2"]["wall"]
    for name, t in timings.items():
        print(
            f"  {name:<16} {t['wall']:6.1f} s wall, {t['training']:6.1f} s training, "
            f"{base / t['wall']:4.2f}x serial, {jobs2 / t['wall']:4.2f}x --jobs 2, "
            f"peak {t['peak_mib']:.0f} MiB ({t['runs']} runs)"
        )


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


def compare_lightning(tmp: Path, rounds: int = 3) -> None:
    """``--stack`` and the Lightning loop alternately, ``rounds`` times each: the best of each
    (the least disturbed by the shared machine) and their ratio, with every round's times."""
    print(f"\n12-run default grid (4 norms x 3 lr, toy data, 5 epochs), best of {rounds} rounds")
    plain = sweep(tmp / "grid-serial", [], GRID)
    print(f"  normbench sweep          {plain['wall']:5.1f} s wall (one round)")
    lightning = importlib.util.find_spec("lightning") is not None
    if not lightning:
        print("  Lightning loop: skipped (pip install -e '.[bench]')")
    stacked, walls = [], []
    for i in range(rounds):
        stacked.append(sweep(tmp / f"grid-stack-{i}", ["--stack"], GRID))
        if lightning:
            start = time.perf_counter()  # as the sweep: the whole process, start to exit
            done = subprocess.run(
                [sys.executable, "-c", LIGHTNING_LOOP], check=True, capture_output=True, text=True
            )
            timing = json.loads(done.stdout.strip().splitlines()[-1])
            walls.append({**timing, "wall": time.perf_counter() - start - timing["composing"]})
    best = min(stacked, key=lambda t: t["wall"])
    overhead = best["wall"] - best["training"]
    rounds_text = ", ".join(f"{t['wall']:.1f}" for t in stacked)
    print(
        f"  normbench sweep --stack  {best['wall']:5.1f} s wall ({rounds_text}), fixed overhead "
        f"{overhead:.1f} s ({overhead / best['wall']:.0%} of wall)"
    )
    if walls:
        fastest = min(walls, key=lambda t: t["wall"])
        rounds_text = ", ".join(f"{t['wall']:.1f}" for t in walls)
        print(
            f"  Lightning Trainer loop   {fastest['wall']:5.1f} s wall ({rounds_text}; its imports "
            f"included, the {fastest['composing']:.1f} s it spent composing normbench's configs "
            f"not); --stack is {fastest['wall'] / best['wall']:.2f}x faster"
        )


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        compare_lightning(Path(tmp))
        if "--quick" not in sys.argv:
            for preset in PRESETS:
                compare_modes(preset, Path(tmp))


if __name__ == "__main__":
    main()
