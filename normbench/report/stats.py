"""The summaries of ``normbench report``, as tidy DataFrames (pandas and scipy only).

Every function takes the final rows of the runs (one per run, see report.load) and never
averages what should not be: diverged and stalled runs are counted, not averaged; runs that
differ in a setting are different configurations or different studies.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from functools import reduce
from typing import NamedTuple

import numpy as np
import pandas as pd
from scipy.special import stdtr, stdtrit

from normbench.errors import ConfigError, choices_error
from normbench.report.load import key_columns
from normbench.results import PERCENTILES, normalize_value

# A run that learned nothing (stalled) is as unusable at its lr as one that diverged.
UNUSABLE = ("diverged", "stalled")
ALPHA = 0.05  # two-sided level of the paired intervals and tests
MIN_PAIRS = 3  # fewer pairs than this are never tested
EQUAL = 1e-9  # differences whose std is below this (relative to the mean) are all equal


# ----------------------------------------------------------------------------- selecting


def filter_runs(runs: pd.DataFrame, where: Sequence[str]) -> pd.DataFrame:
    """Keep the runs matching every ``key=value`` (value read as the column's type).

    Each condition is checked against all runs (an unknown key or value names the choices);
    they combine with AND, and a combination no run matches is an error saying so.
    """
    keys = key_columns(runs)
    keep = pd.Series(True, index=runs.index)
    for condition in where:
        key, sep, text = condition.partition("=")
        if not sep:
            raise ConfigError(f"--where expects key=value, got {condition!r}")
        if key not in keys:
            raise choices_error("--where key", key, keys)
        mask = _matches(runs[key], key, text)
        if not mask.any():
            values = sorted({format_value(v) for v in runs[key].unique()})
            raise choices_error(f"value for --where {key}", text, values)
        keep &= mask
    if not keep.any():
        raise ConfigError(
            f"no run matches --where {' and '.join(where)} together (the filters combine with "
            "AND; each alone matches runs)"
        )
    return runs[keep]


def _matches(column: pd.Series, key: str, text: str) -> pd.Series:
    if text.lower() in ("null", "none") and column.isna().any():
        return column.isna()
    if pd.api.types.is_bool_dtype(column):
        if text.lower() not in ("true", "false"):
            raise ConfigError(f"--where {key}: expected true or false, got {text!r}")
        return column == (text.lower() == "true")
    if pd.api.types.is_numeric_dtype(column):
        try:
            value = normalize_value(float(text))
        except ValueError:
            raise ConfigError(f"--where {key}: expected a number, got {text!r}") from None
        return column == value
    return column.astype(str) == text


def default_metric(task: str) -> str:
    """val_acc for classification, val_loss for regression."""
    return "val_acc" if task == "classification" else "val_loss"


def higher_is_better(metric: str) -> bool:
    return metric.endswith("_acc")


def format_value(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, float):
        return "null" if np.isnan(value) else f"{value:g}"
    return str(value)


def finished(runs: pd.DataFrame, metric: str | None = None) -> pd.Series:
    """Runs whose metric may be averaged: status ok (and a finite ``metric``)."""
    ok = runs["status"].eq("ok")
    return ok if metric is None else ok & np.isfinite(runs[metric].astype(float))


# ----------------------------------------------------------------------------- grouping


class Configs(NamedTuple):
    """Which configuration each run belongs to, ignoring one key (and the seed)."""

    labels: pd.Series  # per run, categorical: "batch" or "batch (norm.momentum=0.05)"
    context: list[str]  # columns besides norm that tell configurations apart


def configs_of(runs: pd.DataFrame, key: str) -> Configs:
    """Group runs so that different configurations are never averaged together.

    A column joins the context when it still varies once norm, ``key``, the seed and the
    columns already in the context are fixed; a run's label names the context columns that
    vary within its norm (``optimizer.name`` follows from ``optimizer``, so it is left out).
    """
    base = list(dict.fromkeys(["norm", key, "seed"]))
    context: list[str] = []
    for column in key_columns(runs):
        if column in base or column == "run_id" or runs[column].nunique(dropna=False) < 2:
            continue
        if runs.groupby(base + context, dropna=False)[column].nunique(dropna=False).max() > 1:
            context.append(column)
    labels = runs["norm"].astype(str)
    if context:
        varies = runs.groupby("norm")[context].nunique(dropna=False).gt(1)
        for norm, shown in varies.iterrows():
            rows = runs["norm"].eq(norm)
            parts = [
                runs.loc[rows, c].map(lambda v, c=c: f"{c}={format_value(v)}")
                for c in context
                if shown[c]
            ]
            if parts:
                labels[rows] += " (" + reduce(lambda a, b: a + ", " + b, parts) + ")"
    # Categories in the order of the settings, so that batch_size=4 comes before 32.
    order = labels[runs.sort_values(["norm", *context], kind="stable").index]
    categories = list(dict.fromkeys(order))
    return Configs(pd.Series(pd.Categorical(labels, categories), index=runs.index), context)


def shared_columns(context: list[str]) -> list[str]:
    """Columns a configuration shares with its baseline: all but the norm's own settings."""
    return [c for c in context if not c.startswith("norm.")]


def studies(runs: pd.DataFrame, key: str) -> list[tuple[dict[str, object], pd.DataFrame]]:
    """The runs split by every setting, besides the norms' own, ``key`` and the seed, that varies.

    One part per task first (classification and regression are never compared), then per
    combination of the other varying settings (dataset, model, lr when ``key`` is not lr...);
    each part comes with the settings that tell it apart (empty when nothing was split).
    """
    parts = []
    tasks = runs.groupby("task", sort=True)
    for task, by_task in tasks:
        named = {"task": task} if tasks.ngroups > 1 else {}
        columns = shared_columns(configs_of(by_task, key).context)
        if not columns:
            parts.append((named, by_task))
            continue
        for values, part in by_task.groupby(columns, dropna=False, sort=True):
            parts.append(({**named, **dict(zip(columns, values, strict=True))}, part))
    return parts


# ----------------------------------------------------------------------------- summarizing


def summarize(
    runs: pd.DataFrame, key: str, metric: str, configs: Configs | None = None
) -> pd.DataFrame:
    """One row per configuration and value of ``key``: the final ``metric`` over seeds.

    mean/std/n use the runs that finished (status ok) with a finite metric; diverged, stalled
    and failed runs are counted, not averaged. ``best`` marks each configuration's best cell
    among those where no seed diverged or stalled.
    """
    configs = configs or configs_of(runs, key)
    frame = runs.assign(
        config=configs.labels,
        _value=runs[metric].astype(float).where(finished(runs, metric)),
        **{f"_{status}": runs["status"].eq(status) for status in (*UNUSABLE, "failed")},
    )
    described = {c: (c, "first") for c in ["norm", *configs.context]}
    cells = (
        frame.groupby(["config", key], dropna=False, observed=True)
        .agg(
            **described,
            mean=("_value", "mean"),
            std=("_value", "std"),
            n=("_value", "count"),
            runs=("_value", "size"),
            diverged=("_diverged", "sum"),
            stalled=("_stalled", "sum"),
            failed=("_failed", "sum"),
        )
        .reset_index()
    )
    score = cells["mean"].where(cells["diverged"].eq(0) & cells["stalled"].eq(0))
    score = score if higher_is_better(metric) else -score
    cells["best"] = score.notna() & score.eq(
        score.groupby(cells["config"], observed=True).transform("max")
    )
    return cells


def best_lr(runs: pd.DataFrame, val: str) -> pd.DataFrame:
    """Per configuration, the lr with the best ``val`` metric and the test metric there."""
    configs = configs_of(runs, "lr")
    test = val.replace("val_", "test_")
    cells = summarize(runs, "lr", val, configs)
    tests = summarize(runs, "lr", test, configs)[["mean", "std", "n"]].add_prefix("test_")
    cells = pd.concat([cells, tests], axis=1).assign(selected_on=val)
    best = cells[cells["best"]].drop_duplicates("config")
    unusable = cells[~cells["config"].isin(best["config"])].drop_duplicates("config")
    table = pd.concat([best, unusable.assign(lr=np.nan, mean=np.nan, std=np.nan, n=0)])
    columns = ["config", "norm", "lr", "selected_on", "mean", "std", "n"]
    table = table[[*columns, "test_mean", "test_std", "test_n"]]
    table.loc[table["lr"].isna(), ["test_mean", "test_std"]] = np.nan
    return table.rename(columns={"mean": "val_mean", "std": "val_std", "n": "val_n"}).sort_values(
        "config"
    )


# The two limits of the stability table: column prefix -> what a seed may not have done there.
_LIMITS = {"max_stable_lr": ("diverged",), "max_trains_lr": UNUSABLE}


def stability(runs: pd.DataFrame, baseline: str | None) -> pd.DataFrame:
    """Per configuration, the largest lr that trains and the largest without divergence.

    ``max_trains_lr``: no seed diverged or stalled there; ``max_stable_lr``: no seed diverged.
    ``censored``/``trains_censored``: even the largest lr tried qualifies (the limit is higher).
    ``ratio``/``trains_ratio``: to the baseline's limit with the same other settings. The
    baseline's runs that differ only in its own settings (norm.eps for none) are one
    experiment, as in :func:`paired`: a seed diverging in any of them counts.
    """
    configs = configs_of(runs, "lr")
    table = _largest_lrs(runs.assign(config=configs.labels), ["config", "norm", *configs.context])
    table["ratio"] = table["trains_ratio"] = np.nan
    if baseline is None or baseline not in set(table["norm"]):
        return table
    match = shared_columns(configs.context)
    base = _largest_lrs(runs[runs["norm"].eq(baseline)], ["norm", *match])
    base = base[[*match, "max_stable_lr", "censored", "max_trains_lr", "trains_censored"]]
    base = base.rename(columns=lambda c: c if c in match else f"baseline_{c}")
    if match:
        table = table.merge(base, how="left", on=match, validate="many_to_one")
    else:
        table = table.merge(base, how="cross")
    table["ratio"] = table["max_stable_lr"] / table["baseline_max_stable_lr"]
    table["trains_ratio"] = table["max_trains_lr"] / table["baseline_max_trains_lr"]
    return table


def _largest_lrs(runs: pd.DataFrame, groups: list[str]) -> pd.DataFrame:
    """Per group of runs: lrs_tried and, for each limit of _LIMITS, the largest lr and censored."""
    statuses = ("failed", *UNUSABLE)
    frame = runs.assign(**{f"_{s}": runs["status"].eq(s) for s in statuses})
    cells = frame.groupby([*groups, "lr"], dropna=False, observed=True).agg(
        runs=("lr", "size"), **{s: (f"_{s}", "sum") for s in statuses}
    )
    cells = cells.reset_index()
    ran = cells["runs"].gt(cells["failed"])
    for limit, bad in _LIMITS.items():
        cells[limit] = cells["lr"].where(ran & cells[list(bad)].sum(axis=1).eq(0))
    table = (
        cells.groupby(groups, dropna=False, observed=True)
        .agg(lrs_tried=("lr", "count"), _top=("lr", "max"), **{c: (c, "max") for c in _LIMITS})
        .reset_index()
    )
    table["censored"] = table["max_stable_lr"].eq(table["_top"])
    table["trains_censored"] = table["max_trains_lr"].eq(table["_top"])
    return table.drop(columns="_top")


def paired(runs: pd.DataFrame, key: str, metric: str, baseline: str) -> pd.DataFrame:
    """Mean difference to ``baseline`` over seeds, paired by seed and every other setting.

    The baseline's runs that differ only in its own settings (``norm.*``: norm.eps for none)
    are one experiment: their metric is averaged, so every run pairs with one baseline value.
    A pair is dropped when either side did not finish (diverged, stalled, failed, non-finite
    metric; on the baseline's side, any of its runs) or has no baseline run: ``dropped``
    counts them and ``dropped_why`` says why. ``ci_low``/``ci_high``: 95% interval from the t
    distribution (at least 2 pairs). ``p``: two-sided paired t-test, only with at least
    MIN_PAIRS pairs that are not all equal; ``p_holm``: Holm-adjusted over the cells of the
    table; ``significant``: p_holm < ALPHA.
    """
    configs = configs_of(runs, key)
    ok = finished(runs, metric)
    status = runs["status"]
    why = status.where(status.ne("ok"), "").mask(status.eq("ok") & ~ok, f"{metric} not finite")
    frame = runs.assign(
        config=configs.labels, _value=runs[metric].astype(float).where(ok), _why=why
    )
    on = list(dict.fromkeys([*shared_columns(configs.context), key, "seed"]))
    grouped = frame[frame["norm"].eq(baseline)].groupby(on, dropna=False)
    complete = grouped["_value"].count().eq(grouped.size())
    base = pd.DataFrame(
        {
            "_baseline": grouped["_value"].mean().where(complete),
            "_base_why": grouped["_why"].max(),  # "" when every baseline run finished
        }
    ).reset_index()
    pairs = frame[frame["norm"].ne(baseline)].merge(base, how="left", on=on, validate="many_to_one")
    pairs["_why"] = (
        pairs["_why"]
        .mask(pairs["_why"].eq("") & pairs["_base_why"].ne(""), baseline + " " + pairs["_base_why"])
        .mask(pairs["_why"].eq("") & pairs["_base_why"].isna(), f"no {baseline} run")
    )
    pairs["diff"] = (pairs["_value"] - pairs["_baseline"]).where(pairs["_why"].eq(""))
    cell = ["config", key]
    table = (
        pairs.groupby(cell, dropna=False, observed=True)
        .agg(
            norm=("norm", "first"),
            mean=("diff", "mean"),
            std=("diff", "std"),
            n=("diff", "count"),
            dropped=("_why", lambda w: int(w.ne("").sum())),
        )
        .reset_index()
    )
    counts = pairs[pairs["_why"].ne("")].groupby([*cell, "_why"], dropna=False, observed=True)
    counts = counts.size().reset_index(name="_count")
    counts["dropped_why"] = counts["_count"].astype(str) + " " + counts["_why"]
    why = counts.groupby(cell, dropna=False, observed=True)["dropped_why"].agg(", ".join)
    table = table.merge(why.reset_index(), how="left", on=cell).fillna({"dropped_why": ""})
    scale = table["std"] / np.sqrt(table["n"])
    half = stdtrit(np.maximum(table["n"] - 1, 1), 1 - ALPHA / 2) * scale
    table["ci_low"] = table["mean"] - half
    table["ci_high"] = table["mean"] + half
    # Equal differences (a std of rounding noise) have no spread to test against.
    tested = table["n"].ge(MIN_PAIRS) & table["std"].gt(EQUAL * table["mean"].abs().clip(lower=1))
    table["p"] = (2 * stdtr(table["n"] - 1, -(table["mean"] / scale).abs())).where(tested)
    table["p_holm"] = holm(table["p"])
    table["significant"] = table["p_holm"].lt(ALPHA)
    return table


def holm(p: pd.Series) -> pd.Series:
    """Holm-Bonferroni adjusted p-values of the non-null ``p`` (null stays null).

    The i-th smallest of m p-values is multiplied by m - i + 1, then made non-decreasing and
    capped at 1 (scipy has no Holm; its false_discovery_control is Benjamini-Hochberg).
    """
    tested = p.dropna().sort_values(kind="stable")
    factors = np.arange(len(tested), 0, -1)
    return (tested * factors).cummax().clip(upper=1).reindex(p.index)


# ----------------------------------------------------------------------------- diagnostics


def diagnostics_summary(runs: pd.DataFrame, diagnostics: pd.DataFrame) -> pd.DataFrame:
    """Per configuration and layer: mean gradient norm, final input std, percentile drift.

    Only runs that finished (status ok) count: a diverged run's exploding values would
    swamp the means. Drift is a run's largest departure from its first record (a percentile
    that dips and comes back still drifted), averaged over seeds; "final" values are each
    run's last record averaged over seeds.
    """
    runs = runs[finished(runs)]
    labels = configs_of(runs, "seed").labels
    frame = diagnostics.merge(runs[["run_id"]].assign(config=labels), on="run_id")
    keys = ["config", "layer", "quantity"]
    first = frame.groupby([*keys, "run_id"], sort=False, observed=True)["value"].transform("first")
    frame = frame.assign(departure=(frame["value"] - first).abs())
    per_run = frame.groupby([*keys, "run_id"], sort=False, observed=True).agg(
        last=("value", "last"), mean=("value", "mean"), drift=("departure", "max")
    )
    per_config = per_run.groupby(keys, observed=True).mean()
    table = pd.concat(
        [
            per_config["mean"].unstack("quantity").reindex(columns=["grad_norm"]),
            per_config["last"].unstack("quantity").reindex(columns=["input_std", "eval_gap"]),
            per_config["drift"]
            .unstack("quantity")
            .reindex(columns=list(PERCENTILES))
            .add_prefix("drift_"),
        ],
        axis=1,
    ).reset_index()
    order = table["layer"].map(layer_order)
    return table.assign(_order=order).sort_values(["config", "_order"]).drop(columns="_order")


def layer_order(layer: str) -> tuple[int, str]:
    """Sort key: block2 before block10."""
    digits = re.search(r"\d+$", layer)
    return (int(digits.group()) if digits else -1, layer)


def last_hidden_layer(diagnostics: pd.DataFrame) -> str:
    """The layer whose pre-activation percentiles were recorded (the last one if several)."""
    layers = diagnostics.loc[diagnostics["quantity"].isin(PERCENTILES), "layer"].unique()
    return max(layers, key=layer_order)
