"""PNG figures for ``normbench report --plot DIR`` (matplotlib's Agg renderer, no pyplot)."""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib
import pandas as pd
from matplotlib import ticker
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from normbench.report import (
    PERCENTILES,
    configs_of,
    format_value,
    last_hidden_layer,
    layer_order,
    summarize,
)

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
    written = [learning_curves(plot_dir / "learning_curves.png", runs, curves, metric, by)]
    for key in dict.fromkeys(["lr", "batch_size", by]):
        if pd.api.types.is_numeric_dtype(runs[key]) and runs[key].nunique() > 1:
            written.append(metric_against(plot_dir / f"{metric}_vs_{key}.png", runs, key, metric))
    return written


def diagnostics_plots(plot_dir: Path, runs: pd.DataFrame, records: pd.DataFrame) -> list[Path]:
    """The last hidden layer's percentiles and every layer's gradient norm over training."""
    plot_dir.mkdir(parents=True, exist_ok=True)
    written = []
    if records["quantity"].isin(PERCENTILES).any():
        written.append(percentiles(plot_dir / "diagnostics_percentiles.png", runs, records))
    if records["quantity"].eq("grad_norm").any():
        written.append(gradient_norms(plot_dir / "diagnostics_grad_norm.png", runs, records))
    return written


def _figure(width: float, height: float) -> Figure:
    """A figure drawn by Agg directly (no pyplot: no GUI backend, no global figure list)."""
    figure = Figure(figsize=(width, height))
    FigureCanvasAgg(figure)
    return figure


def _panels(count: int) -> tuple[Figure, list[Axes]]:
    columns = min(count, 4)
    rows = math.ceil(count / columns)
    figure = _figure(4.2 * columns, 3.4 * rows + 0.8)
    axes = figure.subplots(rows, columns, sharey=True, squeeze=False)
    for extra in axes.flat[count:]:
        extra.set_visible(False)
    return figure, list(axes.flat[:count])


def _save(figure: Figure, path: Path) -> Path:
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    return path


def _colors(labels: list[str]) -> dict[str, tuple]:
    cycle = matplotlib.colormaps["tab10"]
    return {label: cycle(i % 10) for i, label in enumerate(labels)}


def _present(configs: pd.Series) -> list[str]:
    """The configurations in ``configs`` (categorical), in their categories' order."""
    return list(configs.cat.remove_unused_categories().cat.categories)


def learning_curves(
    path: Path, runs: pd.DataFrame, curves: pd.DataFrame, metric: str, by: str
) -> Path:
    """One panel per value of ``by``; per norm the mean over seeds with a ±1 std band."""
    metric = metric.replace("test_", "val_")  # test metrics exist only at the last epoch
    labels = configs_of(runs, by).labels
    finished = runs["status"].eq("ok")
    config = pd.Series(labels[finished].values, index=runs.loc[finished, "run_id"].values)
    rows = curves[curves["run_id"].isin(config.index) & curves["epoch"].ge(1)]
    rows = rows.assign(config=rows["run_id"].map(config))
    values = sorted(rows[by].unique())
    colors = _colors(_present(rows["config"]))
    figure, axes = _panels(len(values))
    for ax, value in zip(axes, values, strict=True):
        panel = rows[rows[by].eq(value)]
        for label, group in panel.groupby("config", observed=True):
            stats = group.groupby("epoch")[metric].agg(["mean", "std"]).fillna({"std": 0})
            ax.plot(stats.index, stats["mean"], marker="o", ms=3, color=colors[label], label=label)
            low, high = stats["mean"] - stats["std"], stats["mean"] + stats["std"]
            ax.fill_between(stats.index, low, high, color=colors[label], alpha=0.2)
        ax.set_title(f"{_name(by)} = {format_value(value)}")
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(ticker.MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    axes[0].set_ylabel(_name(metric))
    axes[0].legend(fontsize="small", title="norm")
    figure.suptitle(
        f"Learning curves: {_name(metric)}, mean ± 1 std over seeds\n"
        "(diverged and failed runs left out)"
    )
    return _save(figure, path)


def metric_against(path: Path, runs: pd.DataFrame, key: str, metric: str) -> Path:
    """The final metric against ``key`` (log axis), one line per norm; x marks divergence."""
    cells = summarize(runs, key, metric)
    figure = _figure(7, 4.5)
    ax = figure.subplots()
    configs = _present(cells["config"])
    colors = _colors(configs)
    for label, group in cells.groupby("config", observed=True):
        ax.errorbar(
            group[key], group["mean"], yerr=group["std"].fillna(0), marker="o", capsize=3,
            color=colors[label], label=label,
        )  # fmt: skip
    # Divergence counts in a strip above the curves, one row per configuration.
    low, high = ax.get_ylim()
    diverged = cells[cells["diverged"].gt(0)]
    rows = list(dict.fromkeys(diverged["config"]))
    ax.set_ylim(low, high + (high - low) * 0.08 * len(rows))
    for _, cell in diverged.iterrows():
        y = high + (high - low) * 0.08 * (rows.index(cell["config"]) + 0.5)
        text = f"× {cell['diverged']}/{cell['runs']}"
        ax.text(cell[key], y, text, color=colors[cell["config"]], ha="center", va="center")
    values = sorted(cells[key].unique())
    ax.set_xscale("log", base=2 if key == "batch_size" else 10)
    ax.set_xticks(values, [format_value(v) for v in values])
    ax.minorticks_off()
    ax.set_xlabel(f"{_name(key)} (log scale)")
    ax.set_ylabel(f"final {_name(metric)}")
    ax.set_title(
        f"Final {_name(metric)} vs {_name(key)}, mean ± 1 std over seeds\n"
        "× k/n: k of n seeds diverged there (left out of the mean)",
        fontsize="medium",
    )
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small", title="norm")
    return _save(figure, path)


def _x_axis(records: pd.DataFrame) -> str:
    return "step" if records["step"].notna().all() else "epoch"


def _per_config(runs: pd.DataFrame, records: pd.DataFrame) -> pd.DataFrame:
    config = pd.Series(configs_of(runs, "seed").labels.values, index=runs["run_id"].values)
    return records.assign(config=records["run_id"].map(config))


def percentiles(path: Path, runs: pd.DataFrame, records: pd.DataFrame) -> Path:
    """Ioffe & Szegedy Fig. 1: last hidden layer's 15/50/85th percentiles, a panel per norm."""
    layer = last_hidden_layer(records)
    rows = _per_config(
        runs, records[records["layer"].eq(layer) & records["quantity"].isin(PERCENTILES)]
    )
    x = _x_axis(rows)
    configs = _present(rows["config"])
    figure, axes = _panels(len(configs))
    for ax, label in zip(axes, configs, strict=True):
        means = rows[rows["config"].eq(label)].groupby(["quantity", x])["value"].mean()
        for quantity, style in zip(PERCENTILES, ("--", "-", ":"), strict=True):
            if quantity in means.index:
                line = means.loc[quantity]
                ax.plot(line.index, line.values, style, color="black", label=f"{quantity[-2:]}th")
        ax.set_title(label)
        ax.set_xlabel(f"training {x}")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel(f"{layer} pre-activation")
    axes[0].legend(title="percentile", fontsize="small")
    figure.suptitle(
        f"Last hidden layer ({layer}): 15th, 50th and 85th percentiles of its pre-activation\n"
        "over training (mean over seeds)"
    )
    return _save(figure, path)


def gradient_norms(path: Path, runs: pd.DataFrame, records: pd.DataFrame) -> Path:
    """Each layer's gradient norm over training (log scale), one panel per norm."""
    rows = _per_config(runs, records[records["quantity"].eq("grad_norm")])
    x = _x_axis(rows)
    configs = _present(rows["config"])
    layers = sorted(rows["layer"].unique(), key=layer_order)
    colors = _colors(layers)
    figure, axes = _panels(len(configs))
    for ax, label in zip(axes, configs, strict=True):
        means = rows[rows["config"].eq(label)].groupby(["layer", x])["value"].mean()
        for layer in layers:
            if layer in means.index:
                line = means.loc[layer]
                ax.plot(line.index, line.values, color=colors[layer], label=layer)
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(ticker.LogFormatter())
        ax.yaxis.set_minor_formatter(ticker.LogFormatter(labelOnlyBase=False))
        ax.set_title(label)
        ax.set_xlabel(f"training {x}")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("gradient norm (log scale)")
    axes[0].legend(title="layer", fontsize="small")
    figure.suptitle("Gradient norm per layer over training (mean over seeds)")
    return _save(figure, path)
