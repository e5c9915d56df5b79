"""Figures for ``normbench report --plot DIR`` and ``--html FILE`` (matplotlib's Agg, no pyplot).

The figure functions return matplotlib Figures; :func:`save` writes one as a PNG to a path or
to an open binary file (the HTML report inlines them).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

import matplotlib
import pandas as pd
from matplotlib import ticker
from matplotlib.artist import Artist
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from normbench.report.stats import (
    configs_of,
    format_value,
    last_hidden_layer,
    layer_order,
    shared_columns,
    summarize,
)
from normbench.results import PERCENTILES

_NAMES = {
    "train_loss": "training loss",
    "train_acc": "training accuracy",
    "val_loss": "validation loss",
    "val_acc": "validation accuracy",
    "test_loss": "test loss",
    "test_acc": "test accuracy",
    "grad_norm": "gradient norm",
    "epoch_seconds": "seconds per epoch",
    "lr": "learning rate",
    "batch_size": "batch size",
}


def _name(column: str) -> str:
    return _NAMES.get(column, column)


DPI = 110  # --plot's PNGs


def result_figures(
    runs: pd.DataFrame, curves: pd.DataFrame, metric: str, by: str
) -> dict[str, Figure]:
    """Learning curves, and the final metric against lr, batch size and ``by`` where they vary.

    Keyed by file name (``learning_curves.png``, ``val_acc_vs_lr.png``...).
    """
    figures = {}
    if runs["status"].eq("ok").any():
        figures["learning_curves.png"] = learning_curves(runs, curves, metric, by)
    for key in dict.fromkeys(["lr", "batch_size", by]):
        if pd.api.types.is_numeric_dtype(runs[key]) and runs[key].nunique() > 1:
            figures[f"{metric}_vs_{key}.png"] = metric_against(runs, key, metric)
    return figures


def diagnostics_figures(runs: pd.DataFrame, records: pd.DataFrame) -> dict[str, Figure]:
    """The last hidden layer's percentiles and every layer's gradient norm over training.

    Only finished runs (status ok) count: a diverged run's huge values would flatten the
    other panels.
    """
    runs = runs[runs["status"].eq("ok")]
    records = records[records["run_id"].isin(runs["run_id"])]
    figures = {}
    if records["quantity"].isin(PERCENTILES).any():
        figures["diagnostics_percentiles.png"] = percentiles(runs, records)
    if records["quantity"].eq("grad_norm").any():
        figures["diagnostics_grad_norm.png"] = gradient_norms(runs, records)
    return figures


def save(figure: Figure, target: Path | BinaryIO, dpi: int = DPI) -> None:
    """``figure`` as a PNG, to a file path or an open binary file."""
    figure.savefig(target, dpi=dpi, format="png")


def _figure(width: float, height: float) -> Figure:
    """A figure drawn by Agg directly (no pyplot: no GUI backend, no global figure list).

    No layout engine: _finish places the panels, legend and title once (see _fit).
    """
    figure = Figure(figsize=(width, height))
    FigureCanvasAgg(figure)
    return figure


def _panels(count: int) -> tuple[Figure, list[Axes]]:
    """``count`` panels, at most four a row; call _share_y once they are drawn and _finish."""
    columns = min(count, 4)
    rows = math.ceil(count / columns)
    figure = _figure(4.2 * columns + 1.8, 3.4 * rows + 0.9)
    axes = figure.subplots(rows, columns, squeeze=False)
    for extra in axes.flat[count:]:
        extra.set_visible(False)
    return figure, list(axes.flat[:count])


def _share_y(axes: list[Axes]) -> None:
    """One y range for every panel (fitting all their data), labelled in the first column.

    Shared after drawing: panels shared while drawing rescale each other on every line and
    band (quadratic in their number: seconds for the 40 panels of a large study).
    """
    for ax in axes[1:]:
        ax.sharey(axes[0])
        if not ax.get_subplotspec().is_first_col():
            ax.tick_params(labelleft=False)
    axes[0].autoscale_view(scalex=False)  # over every panel's data, now they are shared


def _palette() -> Callable[[str], tuple]:
    """The same colour for the same label in every panel of a figure."""
    cycle, colors = matplotlib.colormaps["tab10"], {}
    return lambda label: colors.setdefault(label, cycle(len(colors) % 10))


def _finish(figure: Figure, axes: list[Axes], legend: str, title: str) -> None:
    """One legend for the figure, right of the panels, each label once; the title above."""
    entries = {}
    for ax in axes:
        entries.update(zip(*reversed(ax.get_legend_handles_labels()), strict=True))
    key = figure.legend(entries.values(), entries.keys(), title=legend, loc="center right")
    _fit(figure, axes, key, figure.suptitle(title, y=1 - 0.1 / figure.get_figheight()))


def _fit(figure: Figure, axes: list[Axes], legend: Artist, title: Artist) -> None:
    """Margins for a grid of like panels from one panel's decorations, the legend and title.

    What constrained layout finds for such a grid, without measuring every panel twice on
    every save (a second for a figure of 40 panels).
    """
    renderer = figure.canvas.get_renderer()
    width, height = figure.bbox.width, figure.bbox.height  # pixels
    pad = 0.08 * figure.dpi
    box, tight = axes[0].get_window_extent(renderer), axes[0].get_tightbbox(renderer)
    above, below = tight.y1 - box.y1, box.y0 - tight.y0  # panel title; x ticks and label
    rows, columns = axes[0].get_gridspec().get_geometry()
    left = (box.x0 - tight.x0 + pad) / width
    right = 1 - (legend.get_window_extent(renderer).width + 2 * pad) / width
    top = (title.get_window_extent(renderer).y0 - above - pad) / height
    bottom = (below + pad) / height
    across = ((right - left) * width - (columns - 1) * 2 * pad) / columns
    down = ((top - bottom) * height - (rows - 1) * (above + below + 2 * pad)) / rows
    figure.subplots_adjust(
        left=left, right=right, top=top, bottom=bottom,
        wspace=2 * pad / across, hspace=(above + below + 2 * pad) / down,
    )  # fmt: skip


def _split(runs: pd.DataFrame, key: str) -> list[tuple[str, pd.DataFrame]]:
    """Runs split by the settings besides the norm that vary (batch_size, dataset...), titled.

    Norms are compared inside a panel; what tells two configurations of a norm apart that is
    not the norm's own setting (``norm.*``) gets a panel of its own.
    """
    columns = shared_columns(configs_of(runs, key).context)
    if not columns:
        return [("", runs)]
    return [
        (", ".join(f"{c}={format_value(v)}" for c, v in zip(columns, values, strict=True)), part)
        for values, part in runs.groupby(columns, dropna=False)
    ]


def learning_curves(runs: pd.DataFrame, curves: pd.DataFrame, metric: str, by: str) -> Figure:
    """One panel per value of ``by``; per norm the mean over seeds with a ±1 std band."""
    metric = metric.replace("test_", "val_")  # test metrics exist only at the last epoch
    finished = runs[runs["status"].eq("ok")]
    panels = [
        (", ".join(filter(None, [f"{_name(by)} = {format_value(value)}", title])), group)
        for title, part in _split(finished, by)
        for value, group in part.groupby(by, dropna=False)
    ]
    color = _palette()
    figure, axes = _panels(len(panels))
    for ax, (title, group) in zip(axes, panels, strict=True):
        config = pd.Series(configs_of(group, by).labels.values, index=group["run_id"].values)
        rows = curves[curves["run_id"].isin(config.index) & curves["epoch"].ge(1)]
        rows = rows.assign(config=rows["run_id"].map(config))
        for label, lines in rows.groupby("config", observed=True):
            stats = lines.groupby("epoch")[metric].agg(["mean", "std"]).fillna({"std": 0})
            ax.plot(stats.index, stats["mean"], marker="o", ms=3, color=color(label), label=label)
            low, high = stats["mean"] - stats["std"], stats["mean"] + stats["std"]
            ax.fill_between(stats.index, low, high, color=color(label), alpha=0.2)
        ax.set_title(title, fontsize="medium")
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(ticker.MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    _share_y(axes)
    axes[0].set_ylabel(_name(metric))
    _finish(
        figure, axes, "norm",
        f"Learning curves: {_name(metric)}, mean ± 1 std over seeds\n"
        "(diverged, stalled and failed runs left out)",
    )  # fmt: skip
    return figure


def metric_against(runs: pd.DataFrame, key: str, metric: str) -> Figure:
    """The final metric against ``key`` (log axis), one line per norm; × k/n marks divergence."""
    runs = runs[runs[key].notna()]  # null (dataset.limit: no limit) has no place on the axis
    panels = _split(runs, key)
    color = _palette()
    figure, axes = _panels(len(panels))
    unusable_cells = []
    for ax, (title, part) in zip(axes, panels, strict=True):
        cells = summarize(part, key, metric)
        for label, line in cells.groupby("config", observed=True):
            ax.errorbar(
                line[key], line["mean"], yerr=line["std"].fillna(0), marker="o", capsize=3,
                color=color(label), label=label,
            )  # fmt: skip
        unusable = cells["diverged"] + cells["stalled"]
        unusable_cells.append(cells.assign(unusable=unusable)[unusable.gt(0)])
        values = sorted(part[key].unique())
        ax.set_xscale("log", base=2 if key == "batch_size" else 10)
        ax.set_xticks(values, [format_value(v) for v in values])
        ax.minorticks_off()
        ax.set_xlabel(f"{_name(key)} (log scale)")
        ax.set_title(title, fontsize="medium")
        ax.grid(alpha=0.3)
    # Divergence counts in a strip above the curves (y is shared), a row per configuration.
    _share_y(axes)
    low, high = axes[0].get_ylim()
    step = (high - low) * 0.08
    strips = [list(dict.fromkeys(cells["config"])) for cells in unusable_cells]
    axes[0].set_ylim(low, high + step * max(map(len, strips)))
    for ax, cells, strip in zip(axes, unusable_cells, strips, strict=True):
        for _, cell in cells.iterrows():
            y = high + step * (strip.index(cell["config"]) + 0.5)
            text = f"× {cell['unusable']}/{cell['runs']}"
            ax.text(cell[key], y, text, color=color(cell["config"]), ha="center", va="center")
    axes[0].set_ylabel(f"final {_name(metric)}")
    _finish(
        figure, axes, "norm",
        f"Final {_name(metric)} vs {_name(key)}, mean ± 1 std over seeds\n"
        "× k/n: k of n seeds diverged or stalled there (left out of the mean)",
    )  # fmt: skip
    return figure


def _over_training(
    runs: pd.DataFrame,
    records: pd.DataFrame,
    series: str,
    styles: Callable[[str], dict],
    ylabel: str,
    title: str,
    log_y: bool = False,
) -> Figure:
    """One panel per configuration, one line per value of ``series``, mean over seeds."""
    config = pd.Series(configs_of(runs, "seed").labels.values, index=runs["run_id"].values)
    records = records.assign(config=records["run_id"].map(config))
    x = "step" if records["step"].notna().all() else "epoch"
    labels = list(records["config"].cat.remove_unused_categories().cat.categories)
    figure, axes = _panels(len(labels))
    for ax, label in zip(axes, labels, strict=True):
        means = records[records["config"].eq(label)].groupby([series, x])["value"].mean()
        for name in sorted(means.index.unique(series), key=layer_order):
            line = means.loc[name]
            ax.plot(line.index, line.values, label=name.removeprefix("preact_"), **styles(name))
        ax.set_title(label, fontsize="medium")
        ax.set_xlabel(f"training {x}")
        ax.grid(alpha=0.3)
        if log_y:
            ax.set_yscale("log")
            ax.yaxis.set_major_locator(ticker.LogLocator(subs=(1, 2, 5)))
            ax.yaxis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:g}"))
            ax.yaxis.set_minor_formatter(ticker.NullFormatter())
    _share_y(axes)
    axes[0].set_ylabel(ylabel)
    _finish(figure, axes, series, title)
    return figure


def percentiles(runs: pd.DataFrame, records: pd.DataFrame) -> Figure:
    """Ioffe & Szegedy Fig. 1: last hidden layer's 15/50/85th percentiles, a panel per norm."""
    layer = last_hidden_layer(records)
    rows = records[records["layer"].eq(layer) & records["quantity"].isin(PERCENTILES)]
    rows = rows.rename(columns={"quantity": "percentile"})
    dashes = dict(zip(PERCENTILES, ("--", "-", ":"), strict=True))
    return _over_training(
        runs, rows, "percentile", lambda q: {"linestyle": dashes[q], "color": "black"},
        f"{layer} pre-activation",
        f"Last hidden layer ({layer}): 15th, 50th and 85th percentiles of its pre-activation\n"
        "over training (mean over seeds; diverged, stalled and failed runs left out)",
    )  # fmt: skip


def gradient_norms(runs: pd.DataFrame, records: pd.DataFrame) -> Figure:
    """Each layer's gradient norm over training (log scale), one panel per norm."""
    color = _palette()
    return _over_training(
        runs, records[records["quantity"].eq("grad_norm")], "layer",
        lambda layer: {"color": color(layer)}, "gradient norm (log scale)",
        "Gradient norm per layer over training\n"
        "(mean over seeds; diverged, stalled and failed runs left out)",
        log_y=True,
    )  # fmt: skip
