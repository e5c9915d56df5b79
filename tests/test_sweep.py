"""Sweeps: grids that skip what is done, survive failures, run in parallel and resume."""

from __future__ import annotations

import os
from pathlib import Path

import pandas as pd
import pytest
from typer.testing import CliRunner

from normbench import results
from normbench.cli import app
from normbench.sweep import plan_sweep
from tests.conftest import USER_MODEL, cli
from tests.fake_datasets import write_fake_mnist

runner = CliRunner()


def sweep(*args: str):
    return runner.invoke(app, ["sweep", *args])


def complete_runs(results_dir: Path) -> dict[str, pd.DataFrame]:
    return {
        path.name: pd.read_csv(path / results.METRICS_FILE).drop(columns=["epoch_seconds"])
        for path in sorted(results_dir.glob("[!.]*"))
        if results.is_complete(path)
    }


def test_dry_run_counts_the_grid_and_runs_nothing(tiny: list[str], results_dir: Path) -> None:
    result = sweep(
        "--dry-run", "norm=batch,layer,group,none", "lr=0.01,0.1,1.0", "seed=0,1,2", *tiny
    )
    assert result.exit_code == 0, result.stderr
    assert "36 jobs" in result.stdout
    assert not results_dir.exists()


@pytest.mark.parametrize(
    ("overrides", "count"),
    [
        (["lr=range(0.1,0.35,0.1)"], 3),  # 0.30000000000000004 is recorded as 0.3
        (["lr=choice(0.1,0.2)", "seed=0,1"], 4),
        (["norm=glob(batch_n*)"], 2),  # batch_noaffine, batch_nostats
        (["experiment=lr_robustness"], 4 * 9 * 5),
        (["experiment=lr_robustness", "seed=0"], 4 * 9),  # the command line wins
        (["experiment=batch_size"], 4 * 4 * 3),
    ],
)
def test_hydra_sweep_syntax(overrides: list[str], count: int, tiny: list[str]) -> None:
    plan = plan_sweep([*overrides, *tiny]).jobs
    assert len(plan) == count
    assert len({job.run_id for job in plan}) == count
    assert not any("0000000" in job.run_id for job in plan)


@pytest.mark.parametrize(
    "overrides",
    [
        ["--stack", "lr='0.1',1", "seed=0,1"],  # quoted and interpolated values, resolved
        ["--stack", "lr=${divergence_factor},0.1", "seed=0,1"],
        ["hydra.job.chdir=false", "hydra.verbose=false", "lr=0.1,1", "seed=0,1"],
    ],
)
def test_any_hydra_value_or_setting_plans(overrides: list[str], tiny: list[str]) -> None:
    result = sweep("--dry-run", *overrides, *tiny)
    assert result.exit_code == 0, result.output
    assert "4 jobs" in result.stdout


def test_cells_naming_the_same_run_count_once(tiny: list[str]) -> None:
    result = sweep("--dry-run", "lr=0.1,0.10,1e-1", "seed=0,1", *tiny)
    assert result.exit_code == 0
    assert "6 grid cells name 2 distinct runs" in result.stdout and "2 jobs" in result.stdout


def test_grid_runs_once_then_skips(tiny: list[str], results_dir: Path) -> None:
    grid = ["norm=batch,none", "lr=0.01,0.1", *tiny]
    result = sweep(*grid)
    assert result.exit_code == 0, result.stderr
    runs = complete_runs(results_dir)
    assert len(runs) == 4
    mtimes = {p: p.stat().st_mtime_ns for p in results_dir.rglob(results.METRICS_FILE)}
    again = sweep(*grid)
    assert again.exit_code == 0
    assert "│  0 │        0 │       0 │      0 │       4 │" in again.stdout  # all 4 skipped
    assert {p: p.stat().st_mtime_ns for p in results_dir.rglob(results.METRICS_FILE)} == mtimes
    forced = sweep("--force", *grid)
    assert forced.exit_code == 0
    assert complete_runs(results_dir).keys() == runs.keys()


@pytest.mark.parametrize(("sweeper", "compositions"), [("normbench", 2), ("basic", 4)])
def test_each_job_is_composed_once_when_launched(
    sweeper: str, compositions: int, tiny: list[str], results_dir: Path
) -> None:
    """Planning checked every job, so normbench's sweeper (the default) does not compose each
    one again before launching it, as Hydra's basic sweeper does."""
    from unittest import mock

    from hydra._internal.config_loader_impl import ConfigLoaderImpl

    compose = ConfigLoaderImpl.load_sweep_config
    with mock.patch.object(
        ConfigLoaderImpl, "load_sweep_config", autospec=True, side_effect=compose
    ) as spy:
        result = sweep("--no-stack", "lr=0.01,0.1", f"hydra/sweeper={sweeper}", *tiny)
    assert result.exit_code == 0, result.stderr
    assert len(complete_runs(results_dir)) == 2
    assert spy.call_count == compositions


def test_failed_job_does_not_stop_the_others(
    tiny: list[str], results_dir: Path, tmp_path: Path
) -> None:
    # MNIST files that exist but are corrupt pass planning and fail only their own jobs.
    images = write_fake_mnist(tmp_path / "bad") / "train-images-idx3-ubyte"
    images.write_bytes(images.read_bytes()[:100])
    (tmp_path / "mine" / "dataset").mkdir(parents=True)
    (tmp_path / "mine" / "dataset" / "broken.yaml").write_text(
        f"defaults:\n  - /dataset/mnist@_here_\n  - _self_\n\nroot: {tmp_path / 'bad'}\n"
    )
    mine = f"--config-dir={tmp_path / 'mine'}"
    result = sweep(mine, "dataset=digits,broken", "seed=0,1", *tiny)
    assert result.exit_code == 1
    assert result.stdout.count("failed dataset=broken") == 2
    assert "corrupt or incomplete files" in result.stdout
    assert len(complete_runs(results_dir)) == 2
    failed = [p for p in results_dir.glob("[!.]*") if not results.is_complete(p)]
    assert len(failed) == 2
    assert all("Traceback" in (p / results.ERROR_FILE).read_text() for p in failed)


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["norm=batch,batchh"], "unknown norm 'batchh'"),
        (["lr=0.1,-1"], "lr must be > 0"),
        (["norm=group", "norm.num_groups=2,7"], "choose a divisor of 32"),
        (["norm=batch,instance"], "needs CNN feature maps"),
        (["norm=batch,none", "model.activation=swish"], "choose from: relu"),
        (["dataset=mnist", "dataset.root=nowhere", "norm=batch,none"], "MNIST/raw"),
        (["dataset=digits,toy", "dataset.noise=2"], "the chosen dataset reads"),
        (["norm=batch,none", "batch_size=1"], "batch_size must be at least 2"),
        (["experiment=lr_robustnes"], "unknown experiment 'lr_robustnes'"),
        (["batch_size=8,5000"], "exceeds the"),
        (["--dryrun", "norm=batch,none"], "unknown option '--dryrun'"),
        (["-j", "2", "hydra/launcher=submitit_local", "norm=batch,none"], "joblib"),
        (["--stack", "norm=batch,none", "stack_max_mib=0"], "stack_max_mib must be > 0"),
        (["--stack", "norm=batch,none", "stack_max_members=0"], "stack_max_members must be >= 1"),
        (["--stack", "lr=0.1,1", "checkpoint_seconds=-1"], "must be >= 0"),
    ],
)
def test_bad_input_fails_before_any_job(
    args: list[str], expected: str, tiny: list[str], results_dir: Path
) -> None:
    result = sweep(*args, *tiny)
    assert result.exit_code == 2
    assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1
    assert expected in result.stderr
    assert not results_dir.exists()


def test_config_dir_adds_user_configs_to_a_sweep(tiny: list[str], tmp_path: Path) -> None:
    (tmp_path / "mine" / "model").mkdir(parents=True)
    (tmp_path / "mine" / "model" / "tiny_mlp.yaml").write_text(USER_MODEL)
    for flags in (["--config-dir", str(tmp_path / "mine")], [f"--config-dir={tmp_path / 'mine'}"]):
        result = sweep("--dry-run", *flags, "model=tiny_mlp", "norm=batch,none", *tiny)
        assert result.exit_code == 0, result.stderr
        assert "2 jobs" in result.stdout and "tiny_mlp-batch-toy" in result.stdout


def test_too_many_parallel_jobs_for_the_cores(tiny: list[str]) -> None:
    result = sweep("--jobs", str(len(os.sched_getaffinity(0)) + 1), "norm=batch,none", *tiny)
    assert result.exit_code == 2
    assert "exceeds the" in result.stderr


def test_submitit_local_launcher(tiny: list[str], tmp_path: Path) -> None:
    process = cli(
        "sweep", "norm=batch,none", "hydra/launcher=submitit_local", *tiny,
        f"results_dir={tmp_path / 'r'}", cwd=tmp_path,
    )  # fmt: skip
    out, err = process.communicate(timeout=300)
    assert process.returncode == 0, err
    assert len(complete_runs(tmp_path / "r")) == 2


@pytest.mark.parametrize(
    ("flags", "launched"),
    [([], "8 jobs in 2 stacked group jobs"), (["--stack"], "8 jobs in 2 stacked group jobs"),
     (["--no-stack"], "8 jobs on"), (["stack=false"], "8 jobs on")],
)  # fmt: skip
def test_sweeps_stack_by_default(flags: list[str], launched: str, tiny: list[str]) -> None:
    """Runs differing only in lr and seed are grouped without a flag; --stack is a no-op."""
    result = sweep("--dry-run", *flags, "norm=batch,none", "lr=0.1,1", "seed=0,1", *tiny)
    assert result.exit_code == 0, result.stderr
    assert launched in result.stdout
