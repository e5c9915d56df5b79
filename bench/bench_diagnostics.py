"""Cost of diagnostics: the same tiny experiment with diagnostics off and on, vs a bare loop.

Ioffe & Szegedy's MLP (3 x 100 sigmoid units) with batch norm on the digits data, batch 60,
20 epochs. Timed side by side in one process, interleaved (the order rotating each round),
best of several rounds:

- baseline: a bare plain-model loop (tests/reference_training.py) with no recorder code path:
  load the data, build the model, then ``train_one_epoch`` and ``evaluate`` per epoch and a
  final test evaluation;
- off: ``run_experiment`` with ``diagnostics=false`` (which also writes its result files);
- on: ``run_experiment`` with ``diagnostics=true``, every 10 steps and every step.

Times are the CPU time of the main thread (torch runs on one thread here), so other processes
on a shared machine disturb them less than wall time. "off" against the baseline also pays for
run_experiment's bookkeeping (results files, progress); "on" against "off" is the recorder's
cost alone. Run: python bench/bench_diagnostics.py
"""

from __future__ import annotations

import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from normbench.app import compose_config
from normbench.datasets import load_dataset
from normbench.engine.lifecycle import run_experiment
from normbench.models import build_model, init_paired

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.reference_training import evaluate, make_optimizer, train_one_epoch  # noqa: E402

OVERRIDES = [
    "model=ioffe_mlp",
    "dataset=digits",
    "norm=batch",
    "batch_size=60",
    "lr=0.5",
    "epochs=20",
    "threads=1",
    "quiet=true",
]
ROUNDS = 10


def baseline(cfg) -> None:
    """What run_experiment does for this config, minus results files and any recorder path."""
    torch.manual_seed(cfg.seed)
    data = load_dataset(cfg.dataset, cfg.seed)
    model = build_model(cfg.model, cfg.norm, data.input_shape, data.num_outputs)
    init_paired(model, cfg.seed)
    optimizer = make_optimizer(model, cfg.optimizer, cfg.lr)
    generator = torch.Generator().manual_seed(cfg.seed)
    loss_fn = nn.CrossEntropyLoss()
    for _ in range(cfg.epochs):
        train_one_epoch(model, optimizer, loss_fn, data.train, cfg.batch_size, generator)
        evaluate(model, loss_fn, data.val)
    evaluate(model, loss_fn, data.test)


def cpu_seconds(fn: Callable[[], object]) -> float:
    start = time.thread_time()
    fn()
    return time.thread_time() - start


def main() -> None:
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as results_dir:
        variants = {
            "off": ["diagnostics=false"],
            "on (every 10 steps)": ["diagnostics=true", "diagnostics_every=10"],
            "on (every step)": ["diagnostics=true", "diagnostics_every=1"],
        }
        configs = {
            name: compose_config([*OVERRIDES, *extra, f"results_dir={results_dir}"])
            for name, extra in variants.items()
        }
        runs: dict[str, Callable[[], object]] = {"baseline": lambda: baseline(configs["off"])}
        for name, cfg in configs.items():
            runs[name] = lambda cfg=cfg: run_experiment(cfg)
        best = dict.fromkeys(runs, float("inf"))
        names = list(runs)
        for round_ in range(ROUNDS + 1):  # round 0 warms up imports, data and allocator
            order = names[round_ % len(names) :] + names[: round_ % len(names)]
            for name in order:
                seconds = cpu_seconds(runs[name])
                if round_:
                    best[name] = min(best[name], seconds)
        steps = run_experiment(configs["off"]).rows[-1]["step"]
    print(f"{' '.join(OVERRIDES[:6])}: {steps} steps; CPU seconds, best of {ROUNDS}")
    print(f"baseline (bare train_one_epoch loop): {best['baseline']:.3f} s")
    for name in variants:
        print(
            f"diagnostics {name}: {best[name] / best['baseline']:.2f}x of baseline, "
            f"{best[name] / best['off']:.2f}x of off ({best[name]:.3f} s)"
        )


if __name__ == "__main__":
    main()
