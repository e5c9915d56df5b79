"""The command line as a user types it, through Typer's runner."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from typer.testing import CliRunner

from normbench import results
from normbench.cli import app
from tests.conftest import USER_MODEL
from tests.fake_datasets import write_fake_mnist

runner = CliRunner()


def invoke(*args: str):
    return runner.invoke(app, list(args))


def test_help_lists_commands_without_importing_torch() -> None:
    code = (
        "import sys\n"
        "from normbench.cli import app\n"
        "try:\n    app(['--help'], prog_name='normbench')\n"
        "except SystemExit:\n    pass\n"
        "assert 'torch' not in sys.modules and 'hydra' not in sys.modules, 'heavy import'\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    for command in ("run", "sweep", "report", "list"):
        assert command in out.stdout


def test_report_reads_results_without_importing_torch() -> None:
    code = "import sys, normbench.report\nassert 'torch' not in sys.modules, 'torch imported'\n"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_run_writes_tidy_csv_and_config(tiny: list[str], results_dir: Path) -> None:
    result = invoke("run", *tiny)
    assert result.exit_code == 0, result.stderr
    (run_dir,) = results_dir.iterdir()
    frame = pd.read_csv(run_dir / results.METRICS_FILE)
    for column in [*results.KEY_COLUMNS, *results.METRIC_COLUMNS]:
        assert column in frame.columns
    assert frame["status"].tolist() == ["ok"]
    assert frame.loc[0, "model"] == "mlp" and frame.loc[0, "norm"] == "batch"
    assert (run_dir / results.CONFIG_FILE).read_text().startswith("model:")
    assert run_dir.name in result.stdout


def test_rerun_replaces_instead_of_duplicating(tiny: list[str], results_dir: Path) -> None:
    assert invoke("run", *tiny).exit_code == 0
    assert invoke("run", *tiny).exit_code == 0
    assert len(list(results_dir.iterdir())) == 1
    assert not list(results_dir.rglob("*.tmp"))


def test_convnet_with_batch_norm_at_high_lr(tiny: list[str]) -> None:
    result = invoke("run", "model=convnet", "norm=batch", "lr=0.1", *tiny)
    assert result.exit_code == 0, result.stderr


def test_exploding_run_ends_diverged_with_exit_0(tiny: list[str], results_dir: Path) -> None:
    result = invoke("run", "norm=none", "lr=1000", *tiny)
    assert result.exit_code == 0
    assert "diverged" in result.stdout
    (run_dir,) = results_dir.iterdir()
    assert results.read_status(run_dir / results.METRICS_FILE) == "diverged"


def test_runtime_failure_is_recorded_and_exits_1(
    tiny: list[str], results_dir: Path, tmp_path: Path
) -> None:
    # MNIST files that exist (so the config is valid) but are truncated: found when loading.
    images = write_fake_mnist(tmp_path) / "train-images-idx3-ubyte"
    images.write_bytes(images.read_bytes()[:100])
    result = invoke("run", "dataset=mnist", f"dataset.root={tmp_path}", *tiny)
    assert result.exit_code == 1
    assert "corrupt or incomplete files" in result.stderr
    (run_dir,) = results_dir.iterdir()
    assert results.read_status(run_dir / results.METRICS_FILE) == "failed"
    assert "Traceback" in (run_dir / results.ERROR_FILE).read_text()


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["norm=batchh"], "choose from: batch,"),
        (["norm=batch", "batch_size=1"], "batch_size must be at least 2"),
        (["norm=batch", "norm.num_groups=4"], "the chosen norm reads: norm.name, norm.eps"),
        (["optimizer=adam", "optimizer.momentum=0.9"], "the chosen optimizer reads"),
        (["dataset=digits", "dataset.noise=2"], "the chosen dataset reads"),
        (["model.hidden=[]"], "norm 'batch' normalizes nothing in model 'mlp'"),
        (["experiment=nope"], "unknown experiment 'nope'; choose from: activation_drift"),
        (["threads=999"], "threads=999 exceeds the"),
        ([f"norm={'x' * 10000}"], "the limit is 1000"),
        (["norm=батч"], "non-ASCII character"),
        (["results_dir=/tmp/a=b"], "cannot parse override 'results_dir=/tmp/a=b'"),
        (["lr=abc"], "lr=abc"),
        (["foo=1"], "unknown config key 'foo'; valid keys: model, norm"),
        (["+foo=1"], "unknown config key 'foo'"),  # + adds keys even to a typed config
        (["~lr"], "config key 'lr' is required"),
        (["model.foo=1"], "the chosen model reads: model.name"),
        (["hydra.job.foo=1"], "unknown config key 'hydra.job.foo'"),
        (["lr=inf"], "lr must be a finite number"),
        (["norm.eps=nan"], "norm.eps must be a finite number"),
        (["optimizer.plateau_factor=2"], "plateau_factor must be in (0, 1)"),
        (["batch_size=0"], "batch_size must be >= 1"),
        (["epochs=-1"], "epochs must be >= 1"),
        (["model=lenet", "norm=group", "norm.num_groups=7"], "divisor of 20"),
        (["model=mlp", "norm=instance"], "needs CNN feature maps"),
        (["model.activation=swish"], "choose from: relu"),
        (["dataset=cifar10", "dataset.root=/nowhere"], "cifar-10-batches-py; set dataset.down"),
        (["model=convnet", "dataset.shape=[10]"], "need images"),
        (["device=tpu"], "choose from: auto, cpu, cuda, mps"),
        (["-m", "norm=batch,none"], "use normbench sweep for grids"),
    ],
)
def test_bad_input_is_one_line_exit_2_nothing_written(
    overrides: list[str], expected: str, tiny: list[str], results_dir: Path, tmp_path: Path
) -> None:
    result = invoke("run", *tiny, *overrides)
    assert result.exit_code == 2
    assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1
    assert expected in result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    assert not results_dir.exists()


def test_bad_input_keeps_earlier_results(tiny: list[str], results_dir: Path) -> None:
    assert invoke("run", *tiny).exit_code == 0
    before = {p: p.read_bytes() for p in results_dir.rglob("*") if p.is_file()}
    assert invoke("run", *tiny, "norm=batchh").exit_code == 2
    assert {p: p.read_bytes() for p in results_dir.rglob("*") if p.is_file()} == before


def test_missing_mnist_names_the_folder(tiny: list[str], tmp_path: Path) -> None:
    result = invoke("run", *tiny, "dataset=mnist", f"dataset.root={tmp_path}")
    assert result.exit_code == 2
    assert str(tmp_path / "MNIST" / "raw") in result.stderr
    assert "dataset.download=true" in result.stderr


def test_mnist_from_files_in_torchvision_format(tiny: list[str], tmp_path: Path) -> None:
    write_fake_mnist(tmp_path / "data")
    result = invoke(
        "run", *tiny, "model=lenet", "dataset=mnist", f"dataset.root={tmp_path / 'data'}"
    )
    assert result.exit_code == 0, result.stderr


def test_cfg_job_prints_resolved_config(tiny: list[str], results_dir: Path) -> None:
    result = invoke("run", "--cfg", "job", "norm=group", *tiny)
    assert result.exit_code == 0
    assert "name: group" in result.stdout and "num_groups: 2" in result.stdout
    assert not results_dir.exists()


def test_config_dir_adds_user_configs(tiny: list[str], tmp_path: Path) -> None:
    user = tmp_path / "user_configs"
    (user / "model").mkdir(parents=True)
    (user / "model" / "tiny_mlp.yaml").write_text(USER_MODEL)
    result = invoke("run", "--config-dir", str(user), "model=tiny_mlp", *tiny)
    assert result.exit_code == 0, result.stderr
    assert "tiny_mlp-batch-toy" in result.stdout


def test_list_shows_every_group() -> None:
    result = invoke("list")
    assert result.exit_code == 0
    for choice in ("convnet", "lenet", "mlp", "batch_renorm", "instance", "digits", "cifar10"):
        assert choice in result.stdout


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="CUDA is present here")
def test_unavailable_device_is_a_clear_error(tiny: list[str], results_dir: Path) -> None:
    result = invoke("run", *tiny, "device=cuda")
    assert result.exit_code == 2
    assert "device 'cuda' is not available here; choose from: auto, cpu" in result.stderr
    assert not results_dir.exists()


def test_a_run_that_does_not_learn_is_stalled(results_dir: Path) -> None:
    # Issue 12's example: the loss settles near ln(10), accuracy at chance, nothing diverges.
    args = ["run", "norm=none", "lr=3", "seed=3", "quiet=true", f"results_dir={results_dir}"]
    result = invoke(*args)
    assert result.exit_code == 0, result.stderr
    (run_dir,) = results_dir.iterdir()
    final = pd.read_csv(run_dir / results.METRICS_FILE).iloc[-1]
    assert final["status"] == "stalled" and final["val_acc"] < 0.2
    assert final["train_loss"] > 0.95 * math.log(10)


def test_an_error_without_a_message_is_still_one_line() -> None:
    """An interrupt can surface from Hydra as an exception with an empty message."""
    from hydra.errors import HydraException

    from normbench.app import translate_errors
    from normbench.errors import ConfigError

    with pytest.raises(ConfigError, match="^HydraException$"), translate_errors():
        raise HydraException("")
