"""Shared fixtures: the real configs shrunk to a one-epoch run on a few hundred examples."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

# Small enough that a run takes a fraction of a second, large enough to learn something.
TINY = [
    "epochs=1",
    "quiet=true",
    "dataset.limit=240",
    "model.hidden=[32,16]",
    "stall_margin=0.0",  # one short epoch learns little: it only has to beat chance
]

# A user's model: it extends a packaged option (its schema and defaults) and changes a setting.
USER_MODEL = "defaults:\n  - /model/mlp@_here_\n  - _self_\n\nhidden: [8]\n"


@pytest.fixture
def one_thread():
    """One torch thread, as runs use (threads=1): float32 agreement checks are exact to it."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def results_dir(tmp_path: Path) -> Path:
    return tmp_path / "results"


@pytest.fixture
def tiny(results_dir: Path) -> list[str]:
    """Overrides for a fast run writing into a temporary results folder."""
    return [*TINY, f"results_dir={results_dir}"]


def cli(*args: str, cwd: Path, **kwargs) -> subprocess.Popen:
    """``python -m normbench ARGS`` in a subprocess, its output captured as text."""
    return subprocess.Popen(
        [sys.executable, "-m", "normbench", *args],
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **kwargs,
    )
