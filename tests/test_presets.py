"""The named studies in configs/experiment/ compose and plan the grid they promise (issue 12).

Each test plans the real preset (composing and validating every cell, running nothing) and
checks the one property the preset exists for: the lr grid's resolution and seeds, equal
optimizer steps per batch size with an lr grid in every cell, batch renorm's schedule
completing inside every run, and the diagnostics study's setup.
"""

from __future__ import annotations

import math
from collections import Counter
from pathlib import Path

import pytest

from normbench.datasets import describe_dataset
from normbench.sweep import Job, plan_sweep


def _plan(preset: str, results_dir: Path, *extra: str) -> list[Job]:
    jobs = plan_sweep([f"experiment={preset}", f"results_dir={results_dir}", *extra]).jobs
    assert jobs is not None
    return jobs


def _values(jobs: list[Job], key: str) -> list[str]:
    """The values of ``key`` over the jobs' overrides, in grid order, without repeats."""
    found = [o.split("=", 1)[1] for job in jobs for o in job.overrides if o.startswith(f"{key}=")]
    return list(dict.fromkeys(found))


def _configs(jobs: list[Job]):
    """Every job's config as planned (tests/test_planning.py: as the job composes it)."""
    return [(job, job.cfg) for job in jobs]


def _steps(cfg) -> int:
    """Optimizer steps of a run: the last incomplete batch of each epoch is dropped."""
    return cfg.epochs * (describe_dataset(cfg.dataset).train_examples // cfg.batch_size)


# ------------------------------------------------------------------------ lr robustness


def test_lr_robustness_half_decade_grid_five_seeds(results_dir: Path) -> None:
    jobs = _plan("lr_robustness", results_dir)
    lrs = [float(v) for v in _values(jobs, "lr")]
    assert len(jobs) == 4 * len(lrs) * 5
    assert set(_values(jobs, "norm")) == {"none", "batch", "layer", "group"}
    assert _values(jobs, "seed") == ["0", "1", "2", "3", "4"]
    assert min(lrs) <= 0.01 and max(lrs) >= 30
    # half-decade: two grid points per factor of 10, so a ratio is resolved to ~3.16x
    steps = [math.log10(b / a) for a, b in zip(lrs[:-1], lrs[1:], strict=True)]
    assert all(0.45 <= s <= 0.55 for s in steps), lrs
    assert len({job.run_id for job in jobs}) == len(jobs)


def test_lr_robustness_runs_on_a_cnn_too(results_dir: Path) -> None:
    jobs = _plan("lr_robustness", results_dir, "model=convnet")
    assert len(jobs) == 180 and all(job.run_id.startswith("convnet-") for job in jobs)


# ---------------------------------------------------------------------- batch size study


@pytest.mark.parametrize("model", ["mlp", "convnet"])
def test_batch_size_preset_gives_equal_steps_per_batch_size(results_dir: Path, model) -> None:
    jobs = _plan("batch_size_equal_steps", results_dir, f"model={model}")
    steps: dict[int, set[int]] = {}
    for _, cfg in _configs(jobs):
        steps.setdefault(cfg.batch_size, set()).add(_steps(cfg))
    assert sorted(steps) == [2, 4, 8, 32]
    assert len(set.union(*steps.values())) == 1, steps  # the same budget in every cell
    (budget,) = set.union(*steps.values())
    # long enough that batch 32 is not cut short: 32 epochs of it (the old preset gave 5)
    assert budget >= 1280


def test_batch_size_preset_chooses_the_lr_per_batch_size(results_dir: Path) -> None:
    jobs = _plan("batch_size_equal_steps", results_dir)
    cells = Counter()
    for job in jobs:
        o = dict(x.split("=", 1) for x in job.overrides)
        cells[(o["norm"], o["batch_size"])] += 1
    lrs = _values(jobs, "lr")
    seeds = _values(jobs, "seed")
    assert len(lrs) >= 3 and len(seeds) >= 3
    assert set(cells.values()) == {len(lrs) * len(seeds)}  # every lr in every cell
    assert {n for n, _ in cells} == {"batch", "group", "batch_renorm", "layer"}
    assert len(jobs) == 4 * 4 * len(lrs) * len(seeds)


def test_batch_renorm_schedule_completes_within_every_run(results_dir: Path) -> None:
    jobs = _plan("batch_size_equal_steps", results_dir, "norm=batch_renorm")
    assert jobs
    for job, cfg in _configs(jobs):
        norm = cfg.norm
        relaxed = norm.warmup_steps + max(norm.rmax_ramp_steps, norm.dmax_ramp_steps)
        # the paper's full rmax/dmax are reached and then used for at least a third of the run
        assert relaxed <= _steps(cfg) * 2 / 3, (job.overrides, relaxed, _steps(cfg))
        assert norm.rmax == 3.0 and norm.dmax == 5.0


# ----------------------------------------------------------------------- activation drift


@pytest.mark.parametrize("model", ["ioffe_mlp", "convnet"])
def test_activation_drift_preset_records_diagnostics(results_dir: Path, model) -> None:
    jobs = _plan("activation_drift", results_dir, f"model={model}")
    assert set(_values(jobs, "norm")) == {"none", "batch"}
    assert len(_values(jobs, "seed")) >= 3
    for _, cfg in _configs(jobs[:2]):
        assert cfg.diagnostics and cfg.dataset.name == "digits"
        assert cfg.model.activation == "sigmoid"
