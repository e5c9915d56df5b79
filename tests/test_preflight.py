"""Preflight: unwritable, full or misplaced results folders and too many threads, in one line."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from normbench import preflight
from normbench.engine import checkpoint
from normbench.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
# Runs as root in CI, where permissions do not stop writes: a file-size limit does.
LIMITED = """
import pathlib, resource, signal, sys
from normbench.errors import ConfigError
from normbench.preflight import OutputError, check_results_dir, writing
from normbench.results import atomic_write_text
root = pathlib.Path(sys.argv[1])
metrics = root / "run" / "metrics.csv"
atomic_write_text(metrics, "old\\n")
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG instead of being killed
resource.setrlimit(resource.RLIMIT_FSIZE, (1000, 1000))
try:
    with writing(metrics):
        atomic_write_text(metrics, "x" * 5000)
except OutputError as error:
    print(error)
resource.setrlimit(resource.RLIMIT_FSIZE, (0, 0))
try:
    check_results_dir(root / "results", 0)
except ConfigError as error:
    print(error)
"""


def test_a_write_past_a_file_size_limit_is_one_line_and_keeps_the_old_file(tmp_path: Path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, "-c", LIMITED, str(tmp_path)], capture_output=True, text=True, env=env
    )
    assert done.returncode == 0, done.stderr
    metrics = tmp_path / "run" / "metrics.csv"
    assert done.stdout.splitlines() == [
        f"cannot write {metrics}: File too large",
        f"cannot write to results_dir {tmp_path / 'results'}: File too large",
    ]
    assert metrics.read_text() == "old\n"
    assert os.listdir(metrics.parent) == ["metrics.csv"]


def test_writing_passes_other_errors_and_success_through(tmp_path: Path):
    with preflight.writing(tmp_path):
        (tmp_path / "a").write_text("a")
    assert (tmp_path / "a").read_text() == "a"
    with pytest.raises(KeyError), preflight.writing(tmp_path):
        raise KeyError("not a write")


def test_a_results_dir_that_is_a_file_or_under_one_is_refused(tmp_path: Path):
    file = tmp_path / "results"
    file.write_text("")
    with pytest.raises(ConfigError, match=f"^results_dir {file} is a file, not a folder$"):
        preflight.check_results_dir(file, 0)
    with pytest.raises(
        ConfigError, match=f"^cannot write to results_dir {file}/sub: Not a directory$"
    ):
        preflight.check_results_dir(file / "sub", 0)


def test_a_results_dir_without_room_is_refused_and_the_check_leaves_no_folder(tmp_path: Path):
    with pytest.raises(
        ConfigError, match=f"^results_dir {tmp_path}/new/results has .* MiB free; the run needs"
    ):
        preflight.check_results_dir(tmp_path / "new" / "results", 1 << 62)
    assert list(tmp_path.iterdir()) == []  # the folders made for the test write are gone
    preflight.check_results_dir(tmp_path / "new" / "results", 1)
    assert list(tmp_path.iterdir()) == []  # a run's claim creates its folders


def test_the_estimate_covers_the_files_a_run_really_writes(tmp_path: Path):
    model = nn.Sequential(nn.Linear(784, 256), nn.BatchNorm1d(256), nn.Linear(256, 10))
    optimizer = torch.optim.Adam(model.parameters())
    model(torch.randn(4, 784)).sum().backward()
    optimizer.step()
    scheduler = None
    state = checkpoint.capture(model, optimizer, scheduler, torch.Generator(), [], 1, 1, 1.0)
    checkpoint.save_checkpoint(tmp_path / "checkpoint.pt", state)
    checkpoint.save_weights(tmp_path / "model.pt", model)
    written = (tmp_path / "model.pt").stat().st_size + 2 * (
        tmp_path / "checkpoint.pt"
    ).stat().st_size
    estimate = preflight.estimate_run_bytes(sum(p.numel() for p in model.parameters()), 50, 1)
    assert written < estimate < 2 * written + (2 << 20)


def test_threads_must_fit_the_cores_this_process_may_use():
    cores = preflight.usable_cores()
    preflight.check_threads(cores)
    with pytest.raises(ConfigError, match=f"^threads={cores + 1} exceeds the {cores} cores"):
        preflight.check_threads(cores + 1)
    with pytest.raises(ConfigError, match=f"^{cores} jobs x threads=2 exceeds the {cores} cores"):
        preflight.check_threads(2, jobs=cores)
    with pytest.raises(ConfigError, match="at least 1"):
        preflight.check_threads(0)


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="no CPU affinity here")
def test_the_limit_is_the_affinity_not_the_machine():
    allowed = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {min(allowed)})
    try:
        with pytest.raises(ConfigError, match="exceeds the 1 cores"):
            preflight.check_threads(2)
    finally:
        os.sched_setaffinity(0, allowed)
