"""Writing results: file modes, atomic files, and the order that never loses a complete result."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pandas as pd
import pytest

from normbench import results

COLUMNS = ["run_id", "epoch", "val_loss", "status", "error"]


def _rows(run: str, epochs: int) -> list[dict]:
    return [{"run_id": run, "epoch": e, "val_loss": 1.0 / e} for e in range(1, epochs + 1)]


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.mark.parametrize(
    ("umask", "file_mode", "dir_mode"), [(0o022, 0o644, 0o755), (0o077, 0o600, 0o700)]
)
def test_files_and_folders_follow_the_umask(
    tmp_path: Path, umask: int, file_mode: int, dir_mode: int
):
    old = os.umask(umask)
    try:
        run = tmp_path / "results" / "run"
        results.atomic_write_text(run / results.CONFIG_FILE, "lr: 0.1\n")
        results.write_run(run, "lr: 0.1\n", _rows("run", 2), COLUMNS, "ok")
    finally:
        os.umask(old)
    assert {_mode(p) for p in run.iterdir()} == {file_mode}
    assert _mode(run) == _mode(run.parent) == dir_mode


def test_a_failed_write_leaves_the_file_as_it_was(tmp_path: Path):
    path = tmp_path / "config.yaml"
    results.atomic_write_text(path, "old\n")
    with pytest.raises(RuntimeError), results.atomic_writer(path) as handle:
        handle.write("half of the new")
        raise RuntimeError("killed")
    assert path.read_text() == "old\n"
    assert os.listdir(tmp_path) == ["config.yaml"]  # no temporary file left behind


@pytest.mark.parametrize("status", results.STATUSES)
def test_only_ok_diverged_and_stalled_are_complete(tmp_path: Path, status: str):
    results.atomic_write_csv(
        tmp_path / results.METRICS_FILE, [{"epoch": 1, "status": status}], COLUMNS
    )
    assert results.is_complete(tmp_path) == (status in ("ok", "diverged", "stalled"))


def test_progress_is_running_and_never_hides_a_complete_result(tmp_path: Path):
    assert results.write_progress(tmp_path, _rows("new", 1), COLUMNS)
    assert results.read_status(tmp_path / results.METRICS_FILE) == "running"
    assert not results.is_complete(tmp_path)
    results.write_run(tmp_path, "", _rows("old", 3), COLUMNS, "ok")
    assert not results.write_progress(tmp_path, _rows("new", 1), COLUMNS)
    assert pd.read_csv(tmp_path / results.METRICS_FILE)["run_id"].tolist() == ["old"] * 3


def test_a_running_status_is_not_a_finished_attempt(tmp_path: Path):
    with pytest.raises(ValueError, match="not final"):
        results.write_run(tmp_path, "", _rows("x", 1), COLUMNS, "running")


def test_a_failed_rerun_keeps_the_complete_result(tmp_path: Path):
    results.write_run(tmp_path, "old\n", _rows("old", 3), COLUMNS, "ok")
    kept = results.write_run(
        tmp_path, "new\n", _rows("new", 1), COLUMNS, "failed", "boom", error_trace="trace"
    )
    assert not kept
    assert sorted(os.listdir(tmp_path)) == [results.CONFIG_FILE, results.METRICS_FILE]
    assert (tmp_path / results.CONFIG_FILE).read_text() == "old\n"


def test_a_failed_attempt_keeps_the_checkpoint_a_retry_resumes_from(tmp_path: Path):
    name = results.CHECKPOINT_FILE
    (tmp_path / name).write_bytes(b"state after epoch 4")
    results.write_run(tmp_path, "", _rows("x", 4), COLUMNS, "failed", "OSError: stale handle")
    assert (tmp_path / name).read_bytes() == b"state after epoch 4"
    results.write_run(tmp_path, "", _rows("x", 9), COLUMNS, "ok")  # the retry finished
    assert not (tmp_path / name).exists()


class Killed(BaseException):
    """Stands for SIGKILL: nothing after it runs, not even ``except Exception``."""


def _old_attempt(run: Path, status: str) -> None:
    """An earlier attempt with its side files, and the leftovers of a killed one."""
    results.write_run(
        run,
        "old config\n",
        _rows("old", 3),
        COLUMNS,
        status,
        error_trace="old trace" if status == "failed" else None,
        diagnostics_writer=lambda path: results.atomic_write_text(path, "old diagnostics\n"),
        weights_writer=lambda path: results.atomic_write_text(path, "old weights"),
    )
    results.atomic_write_text(run / results.CHECKPOINT_FILE, "a later interrupted attempt")
    (run / ".checkpoint.pt.0123.tmp").write_text("left by a SIGKILL")


def _write_new(run: Path) -> None:
    """A new complete attempt with weights but no diagnostics and no error."""
    results.write_run(
        run,
        "new config\n",
        _rows("new", 2),
        COLUMNS,
        "ok",
        weights_writer=lambda path: results.atomic_write_text(path, "new weights"),
    )


def _kill_at(monkeypatch: pytest.MonkeyPatch, when: int) -> None:
    """Make the ``when``-th rename or removal (counting from 0) be a kill."""
    calls = iter(range(10_000))
    for name in ("replace", "unlink"):
        real = getattr(os, name)

        def step(*args, _real=real, **kwargs):
            if next(calls) == when:
                raise Killed
            return _real(*args, **kwargs)

        monkeypatch.setattr(os, name, step)


@pytest.mark.parametrize("old_status", ["ok", "failed"])
def test_a_kill_at_any_point_of_a_rerun_leaves_a_whole_result(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, old_status: str
):
    seen = set()
    for when in range(100):
        run = tmp_path / str(when)
        _old_attempt(run, old_status)
        with monkeypatch.context() as patch:
            _kill_at(patch, when)
            try:
                _write_new(run)
            except Killed:
                pass
            else:
                break
        # What a reader finds now is what it would have found just before the kill.
        metrics = pd.read_csv(run / results.METRICS_FILE)
        attempt = metrics["run_id"].iloc[0]
        seen.add(attempt)
        if attempt == "old":
            assert metrics["status"].tolist() == [old_status] * 3
            assert (run / results.DIAGNOSTICS_FILE).read_text() == "old diagnostics\n"
            assert (run / results.ERROR_FILE).is_file() == (old_status == "failed")
        else:
            assert metrics["status"].tolist() == ["ok", "ok"]
            assert (run / results.MODEL_FILE).read_text() == "new weights"
    assert seen == {"old", "new"}  # the kills fell both before and after the commit
    assert sorted(p.name for p in run.iterdir()) == sorted(
        [results.CONFIG_FILE, results.MODEL_FILE, results.METRICS_FILE]
    )
    assert (run / results.CONFIG_FILE).read_text() == "new config\n"
