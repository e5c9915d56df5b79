"""Issue 8's observations through the CLI: planning composes and validates only, run identity
is the options' schema, and Hydra's own flags, sweepers and launchers work in sweeps."""

from __future__ import annotations

import time
from pathlib import Path

import pandas as pd
import pytest
from typer.testing import CliRunner

from normbench import results
from normbench.cli import app
from normbench.sweep import plan_sweep

runner = CliRunner()


def invoke(*args: str):
    return runner.invoke(app, list(args))


def test_a_gpu_cluster_sweep_plans_on_a_cpu_only_machine(tiny: list[str], results_dir) -> None:
    started = time.perf_counter()
    result = invoke(
        "sweep", "--dry-run", "device=cuda", "threads=64", "hydra/launcher=submitit_slurm",
        "norm=batch,none", "lr=0.1,1", *tiny,
    )  # fmt: skip  # 64 threads on this 2-core machine: the node's cores are the job's check
    assert result.exit_code == 0, result.stderr
    assert "4 jobs in 2 stacked group jobs on the submitit_slurm launcher" in result.stdout
    assert time.perf_counter() - started < 30  # no data loaded, no device picked
    assert not results_dir.exists()


def test_planning_loads_no_data(tiny: list[str], monkeypatch) -> None:
    import normbench.datasets as datasets

    def refuse(*args, **kwargs):
        raise AssertionError("planning loaded data")

    monkeypatch.setattr(datasets, "load_dataset", refuse)
    monkeypatch.setattr(datasets, "_load_digits", refuse)
    plan = plan_sweep(["experiment=batch_size", *tiny])
    assert len(plan.jobs) == 48


def test_planned_configs_are_the_configs_hydra_composes(tiny: list[str]) -> None:
    """Planning composes once per choice of groups and applies the rest itself: the result
    must be what Hydra composes for each job (interpolations, presets and lists included)."""
    from omegaconf import OmegaConf

    from normbench.app import compose_config

    jobs = plan_sweep(["experiment=batch_size_equal_steps", "model.hidden=[8],[4]", *tiny]).jobs
    for job in jobs[:: len(jobs) // 7]:
        composed = compose_config(job.overrides)
        assert OmegaConf.to_container(job.cfg) == OmegaConf.to_container(composed)
        assert job.run_id == results.run_id(composed)


def test_where_the_data_lives_is_not_part_of_a_run(tiny: list[str], tmp_path: Path) -> None:
    from tests.fake_datasets import write_fake_mnist

    for name in ("a", "b"):
        write_fake_mnist(tmp_path / name)
    ids = [
        plan_sweep(["dataset=mnist", f"dataset.root={tmp_path / name}", *tiny]).jobs[0].run_id
        for name in ("a", "b")
    ]
    assert ids[0] == ids[1]


def test_settings_an_option_does_not_read_plan_no_duplicate_jobs(tiny: list[str]) -> None:
    for args in (
        ["optimizer=adam", "optimizer.momentum=0.0,0.9"],
        ["dataset=digits", "dataset.noise=1,2"],
    ):
        result = invoke("sweep", "--dry-run", *args, *tiny)
        assert result.exit_code == 2 and "the chosen" in result.stderr


def test_asking_for_diagnostics_completes_finished_runs(tiny: list[str], results_dir) -> None:
    grid = ["norm=batch,none", "lr=0.05,0.1", *tiny]
    assert invoke("sweep", *grid).exit_code == 0
    assert not list(results_dir.glob(f"*/{results.DIAGNOSTICS_FILE}"))
    result = invoke("sweep", *grid, "diagnostics=true")
    assert result.exit_code == 0, result.stderr
    assert len(list(results_dir.glob(f"*/{results.DIAGNOSTICS_FILE}"))) == 4
    assert len(list(results_dir.glob("[!.]*"))) == 4  # the same four runs, completed
    for metrics in results_dir.glob(f"*/{results.METRICS_FILE}"):  # each pair as one stack
        assert set(pd.read_csv(metrics)["stack_size"]) == {2}


@pytest.mark.parametrize("command", ["run", "sweep"])
def test_a_yaml_syntax_error_names_the_file_and_line(
    command: str, tiny: list[str], tmp_path: Path
) -> None:
    (tmp_path / "mine" / "norm").mkdir(parents=True)
    (tmp_path / "mine" / "norm" / "broken.yaml").write_text("name: batch\neps: [1\nfoo: 2\n")
    result = invoke(command, "--config-dir", str(tmp_path / "mine"), "norm=broken", *tiny)
    assert result.exit_code == 2
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    assert "invalid YAML in" in result.stderr and "broken.yaml line 3" in result.stderr


def test_sweep_accepts_the_hydra_flags_run_accepts(tiny: list[str], tmp_path: Path) -> None:
    from importlib.resources import as_file, files

    assert invoke("sweep", "-cn", "config", "--dry-run", "norm=batch,none", *tiny).exit_code == 0
    with as_file(files("normbench.configs")) as configs:
        result = invoke("sweep", "-cp", str(configs), "--dry-run", "norm=batch,none", *tiny)
    assert result.exit_code == 0, result.stderr
    completion = invoke("sweep", "--shell-completion", "install=bash")
    assert completion.exit_code == 0 and "complete" in completion.stdout
    rerun = invoke("sweep", "--experimental-rerun", str(tmp_path / "nothing.pickle"))
    assert rerun.exit_code == 2 and "no such file" in rerun.stderr


def test_another_sweeper_drives_the_jobs(tiny: list[str], results_dir) -> None:
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")
    result = invoke(
        "sweep", "hydra/sweeper=optuna", "hydra.sweeper.n_trials=4",
        "hydra.sweeper.direction=maximize", "hydra.sweeper.sampler.seed=0",
        "norm=batch,none", "lr=interval(0.01,1.0)", *tiny,
    )  # fmt: skip
    assert result.exit_code == 0, result.stderr
    assert "best: " in result.stdout and "lr=" in result.stdout
    finals = [
        pd.read_csv(path).iloc[-1] for path in results_dir.glob(f"*/{results.METRICS_FILE}")
    ]
    assert len(finals) == len({row.run_id for row in finals}) >= 3  # a repeat trial skips
    assert all(0.01 <= row.lr <= 1.0 and row.norm in ("batch", "none") for row in finals)
    assert "4 jobs" in result.stdout
