"""Checks before training, and the one-line error for a write that fails after them.

Before a run (or a sweep) starts: the results folder must take a test write and have room for
the run's files, and the torch threads must fit the cores this process may use. A failure is
a ConfigError naming the path or the limit (the CLI exits 2). A write that fails later (disk
full, a file-size limit, permissions) becomes an :class:`OutputError` of one line (exit 1).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

from normbench.errors import ConfigError

_BYTES_PER_PARAM = 4  # float32
# A checkpoint holds the weights and the optimizer state: up to two more copies (Adam's moments).
_CHECKPOINT_COPIES = 3
_FILE_OVERHEAD = 64 * 1024  # torch's zip container, buffers, RNG states, the metric rows
_ROW_BYTES = 2048  # one row of metrics.csv, the flattened config included
_MARGIN = 1 << 20  # config.yaml, diagnostics.csv, error.txt, claim
_RUN_PATH_BYTES = 256  # what a run adds below results_dir: <run_id>/<file>.tmp


class OutputError(Exception):
    """A results file could not be written; the message is ``cannot write <path>: <reason>``."""


@contextmanager
def writing(path: Path) -> Iterator[None]:
    """Turn an OSError raised inside the block into an OutputError naming the file that could
    not be written (``path``, or the file inside it the error names)."""
    try:
        yield
    except OSError as error:
        where = error.filename or path
        raise OutputError(f"cannot write {where}: {error.strerror or error}") from error


def estimate_run_bytes(num_params: int, epochs: int, keep_checkpoints: int = 1) -> int:
    """The most disk a run takes at once: final weights, checkpoints, metrics, small files.

    One more checkpoint than ``keep_checkpoints`` exists while a new one is being written, and
    metrics.csv exists twice while it is rewritten after an epoch.
    """
    weights = _BYTES_PER_PARAM * num_params + _FILE_OVERHEAD
    checkpoint = _CHECKPOINT_COPIES * _BYTES_PER_PARAM * num_params + _FILE_OVERHEAD
    return weights + (keep_checkpoints + 1) * checkpoint + 2 * epochs * _ROW_BYTES + _MARGIN


def check_results_dir(path: Path, needed_bytes: int) -> None:
    """Test-write in ``path`` and check it has ``needed_bytes`` free.

    Folders made for the test are removed again, whether it passes or not: a check that
    fails, or one that a later check (the data, a claimed run) stops, leaves no empty folder
    behind; the run's claim creates its folder for good (claims.claim).
    """
    check_path_names(path, "results_dir")
    if path.exists() and not path.is_dir():
        raise ConfigError(f"results_dir {path} is a file, not a folder")
    made = [folder for folder in (path, *path.parents) if not folder.exists()]
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path) as probe:
            probe.write(b"normbench")
            probe.flush()
            os.fsync(probe.fileno())
        free = shutil.disk_usage(path).free
    except OSError as error:
        raise ConfigError(
            f"cannot write to results_dir {path}: {error.strerror or error}"
        ) from None
    finally:
        for folder in made:  # deepest first; one that holds something now is kept
            with suppress(OSError):
                folder.rmdir()
    if free < needed_bytes:
        raise ConfigError(
            f"results_dir {path} has {_mib(free)} free; the run needs about {_mib(needed_bytes)}"
        )


def check_path_names(path: Path, what: str) -> None:
    """Each name in ``path`` must fit the file system's limit on a name (255 bytes on most),
    and the whole path its limit on a path; else a ConfigError (the OS would say only
    "File name too long", and only once something is written)."""
    existing = next((p for p in (path, *path.parents) if _exists(p)), Path("."))
    name_max = _pathconf(existing, "PC_NAME_MAX", 255)
    for name in path.parts:
        size = len(os.fsencode(name))
        if size > name_max:
            raise ConfigError(
                f"{what}: the name {name[:24]!r}... is {size} bytes; this file system allows "
                f"at most {name_max} bytes a name"
            )
    path_max = _pathconf(existing, "PC_PATH_MAX", 4096)
    size = len(os.fsencode(os.path.abspath(path)))
    if size > path_max - _RUN_PATH_BYTES:
        raise ConfigError(
            f"{what} is a path of {size} bytes; this file system allows at most {path_max} "
            f"bytes a path, the run folders and files in it included ({_RUN_PATH_BYTES})"
        )


def _exists(path: Path) -> bool:
    try:
        return path.exists()
    except OSError:  # a name too long, among others
        return False


def _pathconf(path: Path, name: str, default: int) -> int:
    try:
        return os.pathconf(path, name)
    except (OSError, ValueError):
        return default


def usable_cores() -> int:
    """The cores this process may run on (its CPU affinity, e.g. under taskset or SLURM)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def check_threads(threads: int, jobs: int = 1) -> None:
    """``jobs`` processes of ``threads`` torch threads each must fit the usable cores."""
    if threads < 1:
        raise ConfigError(f"threads must be at least 1, got {threads}")
    cores = usable_cores()
    if jobs * threads > cores:
        asked = f"threads={threads}" if jobs == 1 else f"{jobs} jobs x threads={threads}"
        raise ConfigError(f"{asked} exceeds the {cores} cores this process may use")


def _mib(size: int) -> str:
    return f"{size / 2**20:.1f} MiB"
