"""The one training lifecycle (normbench.engine.lifecycle): what a run or a stacked group does
around training, through the CLI or the functions it calls."""

from __future__ import annotations

import math
import resource
from pathlib import Path

import pandas as pd
import pytest
from typer.testing import CliRunner

from normbench import results
from normbench.app import compose_config
from normbench.cli import app
from normbench.engine.lifecycle import member_configs, run_experiment
from normbench.engine.run_log import RunLog
from tests.conftest import TINY, cli
from tests.fake_datasets import write_fake_mnist


def invoke(*args: str):
    return CliRunner().invoke(app, list(args))


def test_run_ids_come_from_the_config_alone(tiny: list[str]) -> None:
    """The choice names are recorded in the config when it is composed, so a config run
    through run_experiment gets the id normbench run gives it."""
    cfg = compose_config([*tiny, "norm=batch_frozen", "model=ioffe_mlp", "dataset=digits"])
    assert cfg.choices.model == "ioffe_mlp" and cfg.choices.norm == "batch_frozen"
    result = run_experiment(cfg)
    assert result.run_id.startswith("ioffe_mlp-batch_frozen-digits-")
    assert results.run_id(cfg) == result.run_id


def test_a_data_folder_smaller_than_the_batch_is_bad_input(tmp_path: Path, tiny: list[str]):
    """Planning knows MNIST's nominal 60,000 images; the job checks the files it loaded."""
    write_fake_mnist(tmp_path / "data", n_train=300)
    args = ["dataset=mnist", f"dataset.root={tmp_path / 'data'}", "batch_size=500"]
    result = invoke("run", *tiny, *args)
    assert result.exit_code == 2, result.output
    assert result.stderr.count("\n") == 1 and "batch_size 500 exceeds the" in result.stderr
    assert not Path(tiny[-1].split("=", 1)[1]).exists()  # nothing written, no folder either


def test_threads_beyond_this_machines_cores_stop_a_run_not_a_cluster_plan(tiny: list[str]):
    result = invoke("run", *tiny, "threads=4096")
    assert result.exit_code == 2 and "threads=4096 exceeds the" in result.stderr


def test_a_run_stalled_in_eval_mode_says_so(tiny: list[str]) -> None:
    """Training loss fine, validation (running statistics) below chance: stalled, and the
    error column names the eval-mode rule."""
    log = RunLog(compose_config(tiny), "classification")
    row = {"train_loss": 0.5, "val_loss": 8.8, "val_acc": 0.06}
    log.rows = [row]
    status, reason = log.finish(None, (math.log(10), 0.1))
    assert status == "stalled" and reason.startswith("stalled in eval mode: final val_acc 0.06")
    log.rows = [{**row, "val_acc": 0.6}]  # overconfident but learned: val_loss alone is no rule
    assert log.finish(None, (math.log(10), 0.1)) == ("ok", "")
    log.rows = [{**row, "train_loss": 2.4, "val_acc": 0.6}]
    status, reason = log.finish(None, (math.log(10), 0.1))
    assert status == "stalled" and reason.startswith("stalled in training")


def test_a_regression_run_stalled_in_eval_mode_reads_the_validation_loss(tiny: list[str]):
    log = RunLog(compose_config(tiny), "regression")
    log.rows = [{"train_loss": 0.2, "val_loss": 1.5, "val_acc": math.nan}]
    status, reason = log.finish(None, (1.0, math.nan))
    assert status == "stalled" and "val_loss 1.5" in reason


@pytest.mark.parametrize(
    "content", [b"", b"PK\x03\x04 truncated zip", bytes(range(256)) * 40], ids=str
)
def test_an_unreadable_checkpoint_is_set_aside_and_the_run_starts_afresh(
    tiny: list[str], results_dir: Path, content: bytes
) -> None:
    args = [*tiny, "epochs=2", "checkpoint_seconds=0"]
    first = invoke("run", *args)
    assert first.exit_code == 0, first.output
    (run_id,) = [p.name for p in results_dir.iterdir() if not p.name.startswith(".")]
    expected = pd.read_csv(results_dir / run_id / results.METRICS_FILE)
    # As if killed after epoch 1 with a damaged checkpoint: running rows, unreadable state.
    running = expected.iloc[:1].assign(status="running")
    running.to_csv(results_dir / run_id / results.METRICS_FILE, index=False)
    (results_dir / run_id / results.MODEL_FILE).unlink()
    (results_dir / run_id / results.CHECKPOINT_FILE).write_bytes(content)
    again = invoke("run", *args)
    assert again.exit_code == 0, again.output
    assert "cannot be read" in again.stderr and "set aside" in again.stderr
    assert (results_dir / run_id / "checkpoint.pt.unreadable").read_bytes() == content
    final = pd.read_csv(results_dir / run_id / results.METRICS_FILE)
    numeric = ["train_loss", "val_loss", "val_acc", "test_acc"]
    pd.testing.assert_frame_equal(final[numeric], expected[numeric])  # retrained from scratch


def test_a_group_job_has_one_config_per_member(tiny: list[str]) -> None:
    cfg = compose_config([*tiny, "stack_members=[{lr:0.5,seed:3},{lr:0.05,seed:4}]"])
    members = member_configs(cfg)
    assert [(m.lr, m.seed) for m in members] == [(0.5, 3), (0.05, 4)]
    assert all(m.stack_members == [] for m in members)
    assert len({results.run_id(m) for m in members}) == 2


def test_a_run_that_cannot_write_names_the_file(tmp_path: Path) -> None:
    """Under a 20 KiB file-size limit the first checkpoint does not fit: one line naming it."""

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (20 * 1024, 20 * 1024))

    args = [*TINY, "epochs=2", "checkpoint_seconds=0", f"results_dir={tmp_path / 'r'}"]
    run_path = tmp_path / "r" / results.run_id(compose_config(args))
    process = cli("run", *args, cwd=tmp_path, preexec_fn=limit)
    out, err = process.communicate(timeout=300)
    assert process.returncode == 1
    assert err == f"run failed: cannot write {run_path / results.CHECKPOINT_FILE}: File too large\n"


def test_a_run_finished_elsewhere_after_the_first_look_is_skipped_once_claimed(tiny: list[str]):
    """Two sweeps at once: the other one may finish a run between this job's first look and
    its claim (data loads in between); the claimed run is checked again, not retrained."""
    import torch

    from normbench.datasets import load_dataset
    from normbench.engine import lifecycle

    cfg = compose_config([*tiny, "skip_done=true"])
    done = run_experiment(cfg)  # "the other sweep" finished it
    before = (done.path / results.METRICS_FILE).read_bytes()
    log = RunLog(cfg, "classification")
    datasets = {cfg.seed: load_dataset(cfg.dataset, cfg.seed)}
    [outcome] = lifecycle._train_claimed([log], torch.device("cpu"), datasets, None, strict=False)
    assert outcome.status == "skipped"
    assert (done.path / results.METRICS_FILE).read_bytes() == before
