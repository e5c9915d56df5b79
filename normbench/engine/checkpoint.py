"""Checkpoints and final weights: what a run needs to go on as if it had never stopped.

A checkpoint holds the model, optimizer and scheduler state, every random-number state (torch's
global CPU stream, which dropout draws from; the data-order generator; CUDA's; Python's
``random``), the metric rows so far, and the epoch, step and first loss. Files are written
atomically and hold only tensors and plain Python values, so they load with
``torch.load(weights_only=True)``: nothing under results/ is ever unpickled as arbitrary objects.
"""

from __future__ import annotations

import errno
import io
import pickle
import random
from collections import OrderedDict
from pathlib import Path
from typing import Any

import torch
from torch import nn

from normbench.results import atomic_writer

FORMAT = 1  # bumped when the layout of a checkpoint changes
_SCALARS = (str, int, float, bool, type(None))
_CONTAINERS = (dict, OrderedDict, list, tuple)


class CheckpointError(Exception):
    """A checkpoint or weights file that cannot be used; the message names the file."""


def capture_rng(generator: torch.Generator) -> dict[str, Any]:
    """Every random-number state a run draws from; ``generator`` orders the data."""
    return {
        "torch": torch.get_rng_state(),
        "generator": generator.get_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else [],
        "python": random.getstate(),
    }


def restore_rng(state: dict[str, Any], generator: torch.Generator) -> None:
    """Set the random-number states saved by :func:`capture_rng`."""
    torch.set_rng_state(state["torch"])
    generator.set_state(state["generator"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    random.setstate(state["python"])


def capture(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.ReduceLROnPlateau | None,
    generator: torch.Generator,
    rows: list[dict[str, Any]],
    epoch: int,
    step: int,
    first_loss: float,
) -> dict[str, Any]:
    """A run's state after ``epoch`` epochs, ready for :func:`save_checkpoint`."""
    return {
        "format": FORMAT,
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "rng": capture_rng(generator),
        "rows": [dict(row) for row in rows],
        "epoch": epoch,
        "step": step,
        "first_loss": first_loss,
    }


def restore(
    state: dict[str, Any],
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.ReduceLROnPlateau | None,
    generator: torch.Generator,
) -> None:
    """Load a checkpoint into freshly built objects; rows, epoch, step stay in ``state``."""
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    if scheduler is not None:
        scheduler.load_state_dict(state["scheduler"])
    restore_rng(state["rng"], generator)


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """Write ``state`` atomically; a value that is not a tensor or plain data is a TypeError."""
    _check_plain(state, "checkpoint")
    _save(path, state)


def load_checkpoint(path: Path) -> dict[str, Any] | None:
    """The state saved at ``path``, or None if there is none; an unusable file is refused."""
    if not path.exists():
        return None
    state = _load(path)
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"cannot load {path}: not a normbench checkpoint (format {FORMAT})")
    return state


def save_weights(path: Path, model: nn.Module) -> None:
    """Write the model's final weights (its state_dict), atomically."""
    _save(path, model.state_dict())


def load_weights(path: Path, model: nn.Module) -> None:
    """Load weights written by :func:`save_weights` into ``model``, built with the same config.

    Weights that do not fit (missing, unexpected or mis-shaped tensors) are refused in one
    line naming the first mismatch, shapes and all, and how many more there are.
    """
    state = _load(path)
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"cannot load {path}: not a state_dict (tensors by name)")
    mismatches = _mismatches(state, model.state_dict())
    if mismatches:
        more = len(mismatches) - 1
        raise CheckpointError(
            f"cannot load {path}: its weights do not fit the model config.yaml builds: "
            f"{mismatches[0]}" + (f" (and {more} more mismatching tensors)" if more else "")
        )
    try:
        model.load_state_dict(state)
    except RuntimeError as error:  # anything load_state_dict refuses beyond names and shapes
        raise CheckpointError(f"cannot load {path}: {_reason(error)}") from error


def _mismatches(saved: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> list[str]:
    """Each tensor of ``expected`` missing from ``saved`` or of another shape, in the model's
    order, then each tensor ``saved`` has and ``expected`` does not."""
    found = []
    for name, tensor in expected.items():
        if name not in saved:
            found.append(f"{name} {_shape(tensor)} is missing from the file")
        elif saved[name].shape != tensor.shape:
            found.append(
                f"{name} is {_shape(saved[name])} in the file, {_shape(tensor)} in the model"
            )
    found += [f"{name} is in the file, not in the model" for name in saved if name not in expected]
    return found


def _shape(tensor: torch.Tensor) -> str:
    return str(list(tensor.shape))


def _save(path: Path, state: Any) -> None:
    # Serialized in memory first: torch's zip writer reports a failed write (a full disk, a
    # file-size limit) as a RuntimeError, the plain file write as the OSError it is.
    buffer = io.BytesIO()
    torch.save(state, buffer)
    with atomic_writer(path, "wb") as handle:
        handle.write(buffer.getbuffer())


def _load(path: Path) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise CheckpointError(
            f"cannot load {path}: it holds objects other than tensors and plain data (refused)"
        ) from error
    except OSError as error:
        if error.errno != errno.EINVAL:  # the file itself: permissions, a folder, I/O
            raise CheckpointError(f"cannot load {path}: {error.strerror or error}") from error
        # torch's zip reader on a file cut short (its end of archive missing)
        raise CheckpointError(f"cannot load {path}: {_CORRUPT}") from error
    except EOFError as error:  # no bytes at all, or a pickle cut short: the message is empty
        empty = path.stat().st_size == 0
        raise CheckpointError(f"cannot load {path}: {'empty' if empty else _CORRUPT}") from error
    except Exception as error:  # not a torch file: the zip reader's or unpickler's error
        raise CheckpointError(f"cannot load {path}: {_CORRUPT} ({_reason(error)})") from error


_CORRUPT = "truncated or corrupt, not a whole torch file"


def _reason(error: BaseException) -> str:
    """The first sentence of ``error``'s message (torch's zip errors add a paragraph), after
    its type unless it is torch's RuntimeError (a KeyError's message alone is just a key)."""
    lines = str(error).strip().splitlines()
    sentence = lines[0].split(". ")[0].rstrip(".") if lines else ""
    if isinstance(error, RuntimeError) and sentence:
        return sentence
    return f"{type(error).__name__}: {sentence}" if sentence else type(error).__name__


def _check_plain(value: Any, where: str) -> None:
    """Refuse anything ``torch.load(weights_only=True)`` would refuse, naming where it is."""
    if isinstance(value, torch.Tensor) or type(value) in _SCALARS:
        return
    if type(value) not in _CONTAINERS:
        raise TypeError(
            f"{where} is a {type(value).__name__}; a checkpoint holds only tensors, str, int, "
            "float, bool, None and dicts, lists and tuples of them"
        )
    items = value.items() if isinstance(value, dict) else enumerate(value)
    for key, item in items:
        _check_plain(key, f"a key of {where}")
        _check_plain(item, f"{where}[{key!r}]")
