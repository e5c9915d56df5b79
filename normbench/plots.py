"""PNG figures for ``normbench report --plot DIR`` (matplotlib's Agg renderer, no pyplot)."""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import matplotlib
import pandas as pd
from matplotlib import ticker
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from normbench.report_stats import (
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


def result_plots(
    plot_dir: Path, runs: pd.DataFrame, curves: pd.DataFrame, metric: str, by: str
) -> list[Path]:
    """Learning curves, and the final metric against lr, batch size and ``by`` where they vary."""
    plot_dir.mkdir(parents=True, exist_ok=True)
    written = []
    if runs["status"].eq("ok").any():
        written.append(learning_curves(plot_dir / "learning_curves.png", runs, curves, metric, by))
    for key in dict.fromkeys(["lr", "batch_size", by]):
        if pd.api.types.is_numeric_dtype(runs[key]) and runs[key].nunique() > 1:
            written.append(metric_against(plot_dir / f"{metric}_vs_{key}.png", runs, key, metric))
    return written


def diagnostics_plots(plot_dir: Path, runs: pd.DataFrame, records: pd.DataFrame) -> list[Path]:
    """The last hidden layer's percentiles and every layer's gradient norm over training.

    Only finished runs (status ok) count: a diverged run's huge values would flatten the
    other panels.
    """
    plot_dir.mkdir(parents=True, exist_ok=True)
    runs = runs[runs["status"].eq("ok")]
    records = records[records["run_id"].isin(runs["run_id"])]
    written = []
    if records["quantity"].isin(PERCENTILES).any():
        written.append(percentiles(plot_dir / "diagnostics_percentiles.png", runs, records))
    if records["quantity"].eq("grad_norm").any():
        written.append(gradient_norms(plot_dir / "diagnostics_grad_norm.png", runs, records))
    return written


def _figure(width: float, height: float) -> Figure:
    """A figure drawn by Agg directly (no pyplot: no GUI backend, no global figure list)."""
    figure = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def _panels(count: int) -> tuple[Figure, list[Axes]]:
    """``count`` panels sharing the y axis, at most four a row."""
    columns = min(count, 4)
    rows = math.ceil(count / columns)
    figure = _figure(4.2 * columns + 1.8, 3.4 * rows + 0.9)
    axes = figure.subplots(rows, columns, sharey=True, squeeze=False)
    for extra in axes.flat[count:]:
        extra.set_visible(False)
    return figure, list(axes.flat[:count])


def _save(figure: Figure, path: Path) -> Path:
    figure.savefig(path, dpi=110)
    return path


def _palette() -> Callable[[str], tuple]:
    """The same colour for the same label in every panel of a figure."""
    cycle, colors = matplotlib.colormaps["tab10"], {}
    return lambda label: colors.setdefault(label, cycle(len(colors) % 10))


def _legend(figure: Figure, axes: list[Axes], title: str) -> None:
    """One legend for the figure, right of the panels, each label once."""
    entries = {}
    for ax in axes:
        entries.update(zip(*reversed(ax.get_legend_handles_labels()), strict=True))
    figure.legend(entries.values(), entries.keys(), title=title, loc="outside right center")


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


def learning_curves(
    path: Path, runs: pd.DataFrame, curves: pd.DataFrame, metric: str, by: str
) -> Path:
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
    axes[0].set_ylabel(_name(metric))
    _legend(figure, axes, "norm")
    figure.suptitle(
        f"Learning curves: {_name(metric)}, mean ± 1 std over seeds\n"
        "(diverged, stalled and failed runs left out)"
    )
    return _save(figure, path)


def metric_against(path: Path, runs: pd.DataFrame, key: str, metric: str) -> Path:
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
    _legend(figure, axes, "norm")
    figure.suptitle(
        f"Final {_name(metric)} vs {_name(key)}, mean ± 1 std over seeds\n"
        "× k/n: k of n seeds diverged or stalled there (left out of the mean)"
    )
    return _save(figure, path)


def _over_training(
    runs: pd.DataFrame,
    records: pd.DataFrame,
    series: str,
    styles: Callable[[str], dict],
    ylabel: str,
    title: str,
) -> tuple[Figure, list[Axes]]:
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
    axes[0].set_ylabel(ylabel)
    _legend(figure, axes, series)
    figure.suptitle(title)
    return figure, axes


def percentiles(path: Path, runs: pd.DataFrame, records: pd.DataFrame) -> Path:
    """Ioffe & Szegedy Fig. 1: last hidden layer's 15/50/85th percentiles, a panel per norm."""
    layer = last_hidden_layer(records)
    rows = records[records["layer"].eq(layer) & records["quantity"].isin(PERCENTILES)]
    rows = rows.rename(columns={"quantity": "percentile"})
    dashes = dict(zip(PERCENTILES, ("--", "-", ":"), strict=True))
    figure, _ = _over_training(
        runs, rows, "percentile", lambda q: {"linestyle": dashes[q], "color": "black"},
        f"{layer} pre-activation",
        f"Last hidden layer ({layer}): 15th, 50th and 85th percentiles of its pre-activation\n"
        "over training (mean over seeds; diverged, stalled and failed runs left out)",
    )  # fmt: skip
    return _save(figure, path)


def gradient_norms(path: Path, runs: pd.DataFrame, records: pd.DataFrame) -> Path:
    """Each layer's gradient norm over training (log scale), one panel per norm."""
    color = _palette()
    figure, axes = _over_training(
        runs, records[records["quantity"].eq("grad_norm")], "layer",
        lambda layer: {"color": color(layer)}, "gradient norm (log scale)",
        "Gradient norm per layer over training\n"
        "(mean over seeds; diverged, stalled and failed runs left out)",
    )  # fmt: skip
    for ax in axes:
        ax.set_yscale("log")
        ax.yaxis.set_major_locator(ticker.LogLocator(subs=(1, 2, 5)))
        ax.yaxis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:g}"))
        ax.yaxis.set_minor_formatter(ticker.NullFormatter())
    return _save(figure, path)
