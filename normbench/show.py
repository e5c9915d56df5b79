"""``normbench show``: a finished run's activations for one validation example (document 004).

The run is rebuilt from its folder: ``config.yaml`` (the resolved config) gives the data and
the model, ``model.pt`` the trained weights. One PNG shows the example and the model's output,
then a row per hidden block: the layer's output before the norm and after it (feature maps as
a mosaic of channels, feature vectors as bars) and a histogram of the block's values before
the norm, after it and after the activation.
"""

from __future__ import annotations

import csv
import difflib
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from omegaconf import DictConfig, OmegaConf
from torch import Tensor, nn
from torchvision.utils import make_grid

from normbench import results
from normbench.datasets import DataSplits, load_dataset
from normbench.engine.checkpoint import CheckpointError, load_weights
from normbench.errors import ConfigError
from normbench.models import Block, build_model
from normbench.preflight import writing


@dataclass
class Activations:
    """One example's values through one block: norm input and output, activation output."""

    name: str
    before: Tensor
    after: Tensor
    activated: Tensor
    normalized: bool  # False for nn.Identity: before and after are the same


def load_run(results_dir: Path, run_id: str) -> tuple[DictConfig, nn.Module, DataSplits]:
    """A finished run's config, its model with the final weights (eval mode), and its data."""
    run_path = results_dir / run_id
    if not (run_path / results.CONFIG_FILE).is_file():
        raise ConfigError(_unknown(results_dir, run_id))
    _check_finished(run_path, run_id)
    weights = run_path / results.MODEL_FILE
    if not weights.is_file():
        raise ConfigError(f"run {run_id} has no {results.MODEL_FILE}: its weights are gone")
    cfg = OmegaConf.load(run_path / results.CONFIG_FILE)
    data = load_dataset(cfg.dataset, cfg.seed)
    model = build_model(cfg.model, cfg.norm, data.input_shape, data.num_outputs)
    try:
        load_weights(weights, model)
    except CheckpointError as error:
        raise ConfigError(str(error)) from None
    return cfg, model.eval(), data


@torch.no_grad()
def trace(model: nn.Module, x: Tensor) -> tuple[Tensor, list[Activations]]:
    """The model's output for the batch ``x`` and every block's activations for ``x[0]``."""
    blocks = [(name, m) for name, m in model.named_modules() if isinstance(m, Block)]
    seen: dict[str, dict[str, Tensor]] = {name: {} for name, _ in blocks}

    def on_norm(name: str) -> Callable[..., None]:
        return lambda _norm, inputs, output: seen[name].update(before=inputs[0][0], after=output[0])

    def on_act(name: str) -> Callable[..., None]:
        return lambda _act, _inputs, output: seen[name].update(activated=output[0])

    hooks = [
        hook
        for name, block in blocks
        for hook in (
            block.norm.register_forward_hook(on_norm(name)),
            block.act.register_forward_hook(on_act(name)),
        )
    ]
    try:
        output = model(x)
    finally:
        for hook in hooks:
            hook.remove()
    return output, [
        Activations(
            f"block {index} ({_kind(block.layer)}, {_kind(block.norm)})",
            **seen[name],
            normalized=not isinstance(block.norm, nn.Identity),
        )
        for index, (name, block) in enumerate(blocks, start=1)
    ]


def draw(
    run_id: str, model: nn.Module, data: DataSplits, example: int
) -> tuple[Figure, list[Axes]]:
    """The figure for validation example ``example``, and its panels (colorbars left out)."""
    x, y = data.val
    if not 0 <= example < len(x):
        raise ConfigError(f"--example must be in 0..{len(x) - 1} (the validation examples)")
    output, traced = trace(model, x[example : example + 1])
    figure = Figure(figsize=(13, 3.2 * (1 + len(traced))), layout="constrained")
    FigureCanvasAgg(figure)
    grid = figure.add_gridspec(1 + len(traced), 3)
    panels = [figure.add_subplot(grid[0, 0]), figure.add_subplot(grid[0, 1])]
    _values(figure, panels[0], x[example], "input (preprocessed)")
    _output(panels[1], output[0], y[example], data.task)
    for row, block in enumerate(traced, start=1):
        row_panels = [figure.add_subplot(grid[row, col]) for col in range(2 + block.normalized)]
        if block.normalized:
            _values(figure, row_panels[0], block.before, f"{block.name}: before norm")
            _values(figure, row_panels[1], block.after, f"{block.name}: after norm")
        else:
            _values(figure, row_panels[0], block.after, f"{block.name}: layer output")
        _histogram(row_panels[-1], block)
        panels += row_panels
    figure.suptitle(f"{run_id}\nvalidation example {example}", fontsize="medium")
    return figure, panels


def show(run_id: str, results_dir: Path, output: Path | None = None, example: int = 0) -> Path:
    """Write the figure of ``run_id``'s example ``example`` to ``output``; return its path."""
    _, model, data = load_run(results_dir, run_id)
    figure, _ = draw(run_id, model, data, example)
    output = output or Path(f"{run_id}-activations-{example}.png")
    with writing(output), results.atomic_writer(output, "wb") as handle:
        figure.savefig(handle, format="png", dpi=90)
    return output


def _check_finished(run_path: Path, run_id: str) -> None:
    """Refuse a run that failed (naming its error) or has not finished (naming where it is):
    the weights of either are not a trained model's."""
    metrics = run_path / results.METRICS_FILE
    try:
        last = results.read_last_row(metrics) if metrics.is_file() else {}
    except (OSError, UnicodeDecodeError, csv.Error):
        last = {}
    status = last.get("status") or "no metrics.csv"
    if status == "failed":
        trace = run_path / results.ERROR_FILE
        where = f": its traceback is in {trace}" if trace.is_file() else ""
        raise ConfigError(
            f"run {run_id} failed ({last.get('error') or 'no error recorded'}); "
            f"nothing to show{where}"
        )
    if status not in results.DONE_STATUSES:
        epoch = f", epoch {last['epoch']}" if last.get("epoch") else ""
        raise ConfigError(f"run {run_id} has not finished ({status}{epoch}); nothing to show yet")


def _unknown(results_dir: Path, run_id: str) -> str:
    runs = [p.name for p in results_dir.glob("[!.]*") if (p / results.CONFIG_FILE).is_file()]
    close = difflib.get_close_matches(run_id, runs, n=3, cutoff=0.5)
    hint = f"; close matches: {', '.join(close)}" if close else f" ({len(runs)} runs there)"
    return f"no run {run_id!r} in {results_dir}{hint}"


def _values(figure: Figure, ax: Axes, values: Tensor, title: str) -> None:
    """A feature map (C, H, W) as a mosaic of its channels, a feature vector as bars."""
    ax.set_title(title, fontsize="small")
    if values.ndim == 1:
        ax.bar(range(len(values)), values.numpy(), width=1.0)
        ax.set_xlabel("feature", fontsize="small")
        return
    mosaic = make_grid(
        values.unsqueeze(1), nrow=math.ceil(math.sqrt(len(values))), pad_value=math.nan
    )[0]
    limit = values.abs().max().item() or 1.0
    image = ax.imshow(mosaic.numpy(), cmap="RdBu_r", vmin=-limit, vmax=limit)
    ax.set_axis_off()
    figure.colorbar(image, ax=ax, shrink=0.8)


def _output(ax: Axes, output: Tensor, target: Tensor, task: str) -> None:
    if task == "classification":
        probabilities = output.softmax(0)
        ax.bar(range(len(output)), probabilities.numpy())
        ax.set_xticks(range(len(output)))
        ax.set_title(
            f"output: label {target.item()}, predicted {probabilities.argmax().item()} "
            f"(p = {probabilities.max().item():.2f})",
            fontsize="small",
        )
    else:
        ax.bar(["target", "predicted"], [target.item(), output.item()])
        ax.set_title("output", fontsize="small")


def _histogram(ax: Axes, block: Activations) -> None:
    if block.normalized:
        values = {"before norm": block.before, "after norm": block.after}
    else:
        values = {"layer output": block.after}
    values["after activation"] = block.activated
    for label, tensor in values.items():
        ax.hist(tensor.flatten().numpy(), bins=40, histtype="step", label=label)
    ax.set_yscale("log")  # the activation's zeros (ReLU) would flatten everything else
    ax.set_title(f"{block.name}: histogram", fontsize="small")
    ax.legend(fontsize="x-small")


def _kind(module: nn.Module) -> str:
    return "no norm" if isinstance(module, nn.Identity) else type(module).__name__
