"""Hostile input through the CLI, from an outside review: each case is one clear line and
exit 2 with nothing written, or a sweep that goes on past a bad trial."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from typer.testing import CliRunner

from normbench import results
from normbench.app import compose_config
from normbench.cli import app
from normbench.engine import run_claims
from tests.fake_datasets import trust_fake_cifar10, write_fake_cifar10, write_fake_mnist

runner = CliRunner()
# Optuna's TPE sampler with this seed tries lr=0.1, then lr=1000 (which diverges).
OPTUNA = ["hydra/sweeper=optuna", "hydra.sweeper.sampler.seed=0", "norm=none"]


def invoke(*args: str):
    return runner.invoke(app, list(args))


def assert_bad_input(result, expected: str, results_dir: Path | None) -> None:
    """One line naming what was wrong, exit 2, no traceback, no results folder."""
    output = result.stdout + result.stderr
    assert result.exit_code == 2, output
    assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1, output
    assert expected in result.stderr, output
    assert "Traceback" not in output
    assert results_dir is None or not results_dir.exists()


def test_optuna_goes_on_past_a_diverging_trial_and_prints_the_best(tiny: list[str]) -> None:
    # Before: nan made Hydra's Optuna sweeper crash (values told with state FAIL).
    result = invoke("sweep", *tiny, *OPTUNA, "hydra.sweeper.n_trials=2", "lr=choice(1000,0.1)")
    assert result.exit_code == 0, result.stdout + result.stderr
    assert "Traceback" not in result.stdout + result.stderr
    assert "sweep: 2 jobs" in result.stdout and "│  1 │        1 │" in result.stdout  # ok, diverged
    assert "best: lr=0.1 (objective" in result.stdout


@pytest.mark.parametrize(
    ("sampler", "expected"),
    [
        ("tpe", "no trial ended with a finite objective: no best parameters"),
        ("grid", "the grid sampler's last trial ended without a finite objective"),
    ],
)
def test_optuna_where_every_trial_diverges_ends_with_the_summary(
    sampler: str, expected: str, tiny: list[str]
) -> None:
    optuna = ["hydra/sweeper=optuna", f"hydra/sweeper/sampler={sampler}", "norm=none"]
    result = invoke("sweep", *tiny, *optuna, "hydra.sweeper.n_trials=1", "lr=choice(1000)")
    assert result.exit_code == 0, result.stdout + result.stderr
    assert "Traceback" not in result.stdout + result.stderr
    assert "sweep: 1 jobs" in result.stdout and "│  0 │        1 │" in result.stdout
    assert expected in result.stderr


@pytest.mark.parametrize(
    ("search", "expected"),
    [
        ("lr=interval(10, 0.001)", "interval(low, high) needs low < high; got 10.0, 0.001"),
        ("lr=tag(log, interval(0, 1))", "a log-scale interval needs low > 0; got 0.0"),
    ],
)
def test_an_optuna_search_space_is_checked_at_planning(
    search: str, expected: str, tiny: list[str], results_dir: Path
) -> None:
    result = invoke("sweep", *tiny, "hydra/sweeper=optuna", search)
    assert_bad_input(result, f"error: {search}: {expected}", results_dir)


@pytest.mark.parametrize("command", [["run"], ["sweep", "lr=0.1,1"], ["sweep", "--dry-run"]])
def test_a_results_dir_name_too_long_is_bad_input(command: list[str], tmp_path: Path) -> None:
    result = invoke(*command, "epochs=1", f"results_dir={tmp_path / ('x' * 300)}")
    assert_bad_input(result, "is 300 bytes; this file system allows at most 255", None)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("sweep", "expected"),
    [
        ("norm=glob(bacth*)", "norm=glob(bacth*) matches no norm option; choose from: batch,"),
        ("lr=range(1,0.1,0.1)", "lr=range(1,0.1,0.1) expands to no values"),
        ("lr=glob(*)", "lr=glob(*): glob() picks options of a config group, and lr is not one"),
    ],
)
def test_a_sweep_that_expands_to_nothing_is_bad_input(
    sweep: str, expected: str, tiny: list[str], results_dir: Path
) -> None:
    assert_bad_input(invoke("sweep", *tiny, sweep), expected, results_dir)


def test_a_user_yaml_with_an_extra_key_names_the_file_and_the_key(
    tiny: list[str], results_dir: Path, tmp_path: Path
) -> None:
    (tmp_path / "conf" / "model").mkdir(parents=True)
    (tmp_path / "conf" / "model" / "extra.yaml").write_text(
        "defaults:\n  - /model/mlp@_here_\n  - _self_\n\nwidth: 3\n"
    )
    result = invoke("run", "--config-dir", str(tmp_path / "conf"), *tiny, "model=extra")
    expected = "config model/extra: unknown config key 'model.width'; the chosen model reads: "
    assert_bad_input(result, expected, results_dir)


def test_a_user_yaml_missing_a_key_says_which_schema_needs_it(
    tiny: list[str], results_dir: Path, tmp_path: Path
) -> None:
    (tmp_path / "conf" / "norm").mkdir(parents=True)
    (tmp_path / "conf" / "norm" / "mine.yaml").write_text("name: batch\neps: 1.0e-5\n")
    result = invoke("run", "--config-dir", str(tmp_path / "conf"), *tiny, "norm=mine")
    expected = (
        "the norm lacks config key 'norm.affine', which the schema of norm 'batch' requires: "
        "set it in your norm YAML, or take the defaults with '- /norm/batch@_here_'"
    )
    assert_bad_input(result, expected, results_dir)


@pytest.mark.parametrize("earlier", [False, True])
def test_a_run_stopped_by_missing_data_leaves_no_folder(
    earlier: bool, tiny: list[str], results_dir: Path, tmp_path: Path, monkeypatch
) -> None:
    from torchvision.datasets import MNIST

    def offline(self) -> None:
        raise RuntimeError("Error downloading train-images-idx3-ubyte.gz: no network")

    monkeypatch.setattr(MNIST, "download", offline)
    if earlier:  # earlier results stay as they were
        (results_dir / "an-earlier-run").mkdir(parents=True)
        (results_dir / "an-earlier-run" / "metrics.csv").write_text("run_id\n")
    args = ["dataset=mnist", "dataset.download=true", f"dataset.root={tmp_path / 'data'}"]
    result = invoke("run", *tiny, *args)
    assert result.exit_code == 2, result.stdout + result.stderr
    assert result.stderr.startswith("error: dataset mnist: download failed")
    assert result.stderr.count("\n") == 1
    if earlier:
        assert [p.name for p in results_dir.iterdir()] == ["an-earlier-run"]
        assert (results_dir / "an-earlier-run" / "metrics.csv").read_text() == "run_id\n"
    else:
        assert not results_dir.exists()


def test_run_with_a_sweep_points_to_sweep(tiny: list[str], results_dir: Path) -> None:
    expected = "lr=0.1,1 gives several values; normbench run runs one experiment: use normbench "
    assert_bad_input(invoke("run", *tiny, "lr=0.1,1"), expected, results_dir)


def test_jobs_zero_is_one_line(tiny: list[str], results_dir: Path) -> None:
    result = invoke("sweep", "--jobs", "0", *tiny)
    assert_bad_input(result, "error: --jobs must be at least 1; got 0", results_dir)


def test_a_hydra_flag_after_overrides_works(tiny: list[str], results_dir: Path) -> None:
    result = invoke("run", "lr=0.5", "--cfg", "job", *tiny)
    assert result.exit_code == 0, result.stdout + result.stderr
    assert "lr: 0.5" in result.stdout
    assert not results_dir.exists()


def test_a_run_another_process_trains_is_said_in_words(tiny: list[str], results_dir: Path) -> None:
    cfg = compose_config(tiny)
    run_id = results.run_id(cfg)
    held = run_claims.claim(results_dir / run_id)  # held by this process, alive: not stale
    assert held is not None
    result = invoke("run", *tiny)
    assert result.exit_code == 1
    assert result.stderr == (
        f"error: run {run_id} is being trained by another process (pid {os.getpid()}); "
        "wait for it to finish (the run is then complete), or stop that process and run again\n"
    )
    held.release()


@pytest.mark.parametrize("datasets", ["mnist,fashion_mnist", "mnist,cifar10"])
def test_a_sweep_over_real_datasets_takes_one_data_folder(
    datasets: str, tiny: list[str], results_dir: Path, tmp_path: Path, monkeypatch
) -> None:
    root = tmp_path / "data"
    for kind in ("mnist", "fashion_mnist"):
        write_fake_mnist(root, kind)
    write_fake_cifar10(root)
    trust_fake_cifar10(monkeypatch, root)
    result = invoke("sweep", "--dry-run", *tiny, f"dataset={datasets}", f"dataset.root={root}")
    assert result.exit_code == 0, result.stdout + result.stderr
    assert "2 jobs on the basic launcher; dry run: nothing was run." in result.stdout
    for name in datasets.split(","):
        assert f"dataset={name}" in result.stdout
    assert not results_dir.exists()
