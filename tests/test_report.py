"""normbench report: loading, summaries, formats, errors and plots on real metrics.csv files."""

from __future__ import annotations

import io
import json
import math
import statistics
import zlib
from pathlib import Path

import pandas as pd
import pytest
from matplotlib import colormaps
from matplotlib.image import imread
from rich.console import Console

from normbench.app import compose_config
from normbench.errors import ConfigError
from normbench.report import report
from normbench.report.load import load_diagnostics, load_runs
from normbench.report.stats import (
    best_lr,
    configs_of,
    diagnostics_summary,
    filter_runs,
    paired,
    stability,
    summarize,
)
from normbench.results import (
    DIAGNOSTIC_COLUMNS,
    DIAGNOSTICS_FILE,
    KEY_COLUMNS,
    METRIC_COLUMNS,
    METRICS_FILE,
    atomic_write_csv,
    flat_config,
)

EPOCHS = 3  # every run's metrics.csv has this many rows, as its setting `epochs` says
CONFIG = {k: v for k, v in flat_config(compose_config([f"epochs={EPOCHS}"])).items()
          if k not in KEY_COLUMNS}  # fmt: skip
COLUMNS = [*KEY_COLUMNS, *METRIC_COLUMNS, *CONFIG]

# Final val_acc of a run = BASE[norm][lr] + OFFSET[norm][seed]; diverged runs listed apart.
LRS = (0.01, 0.1, 1.0)
BASE = {
    "batch": {0.01: 0.80, 0.1: 0.90, 1.0: 0.85},
    "layer": {0.01: 0.70, 0.1: 0.75, 1.0: 0.60},
    "none": {0.01: 0.60, 0.1: 0.50, 1.0: 0.40},
}
OFFSET = {"batch": (0.0, 0.03, 0.01), "layer": (0.0, 0.02, 0.02), "none": (0.0, 0.01, 0.05)}
DIVERGED = {
    ("layer", 1.0, 0),
    ("none", 0.1, 1),
    ("none", 1.0, 0),
    ("none", 1.0, 1),
    ("none", 1.0, 2),
}
FAILED = {("layer", 0.01, 2)}


def write_run(
    root: Path,
    norm: str,
    lr: float,
    seed: int,
    final: float,
    status: str = "ok",
    batch_size: int = 32,
    test_split: bool = True,
    dataset: str = "toy",
    task: str = "classification",
    **config: object,
) -> str:
    """One run folder with a metrics.csv as `normbench run` writes it; returns the run_id.

    A running run has written its first two epochs; a stalled one all of them.
    """
    settings = {**CONFIG, "norm.name": norm, **config}
    crc = zlib.crc32(str(settings).encode())
    run_id = f"mlp-{norm}-{dataset}-{task[:3]}-lr{lr:g}-bs{batch_size}-s{seed}-{crc}"
    keys = dict(
        run_id=run_id, model="mlp", norm=norm, dataset=dataset, optimizer="sgd",
        task=task, lr=lr, batch_size=batch_size, seed=seed,
    )  # fmt: skip
    rows = []
    for epoch in range(1, EPOCHS + 1):
        acc = final - 0.1 * (EPOCHS - epoch)
        rows.append(
            dict(
                keys,
                epoch=epoch,
                step=10 * epoch,
                train_loss=1 - acc,
                train_acc=acc,
                val_loss=1 - acc,
                val_acc=acc,
                grad_norm=1.0,
                lr_now=lr,
                epoch_seconds=0.1,
                status=status,
                error="",
                **settings,
            )  # fmt: skip
        )
    if test_split:
        rows[-1].update(test_loss=1 - final + 0.05, test_acc=final - 0.05)
    if status == "diverged":  # stops at epoch 2 with a non-finite loss (and a garbage accuracy)
        rows = rows[:2]
        rows[-1].update(train_loss=math.inf, val_loss=math.nan, val_acc=0.1)
    if status == "running":
        rows = rows[:2]
    if status == "failed":
        rows = [dict(keys, epoch=0, status="failed", error="RuntimeError: boom", **settings)]
    atomic_write_csv(root / run_id / METRICS_FILE, rows, COLUMNS)
    return run_id


@pytest.fixture(scope="module")
def grid(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """3 norms x 3 lrs x 3 seeds, with diverged runs, a failed run and corrupt files (read-only)."""
    tmp_path = tmp_path_factory.mktemp("grid")
    ids = {}
    for norm, by_lr in BASE.items():
        for lr in LRS:
            for seed in range(3):
                key = (norm, lr, seed)
                status = "diverged" if key in DIVERGED else "failed" if key in FAILED else "ok"
                final = by_lr[lr] + OFFSET[norm][seed]
                ids[key] = write_run(tmp_path, norm, lr, seed, final, status)
    text = (tmp_path / ids["batch", 0.1, 0] / METRICS_FILE).read_text()
    (tmp_path / "corrupt").mkdir()
    (tmp_path / "corrupt" / METRICS_FILE).write_text(text[: len(text) // 2])  # cut mid-row
    (tmp_path / "short_row").mkdir()  # a row with too few fields, newline intact
    (tmp_path / "short_row" / METRICS_FILE).write_text(text[: text.rindex(",")] + "\n")
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / METRICS_FILE).write_text("a,b\n1,2\n")
    (tmp_path / "binary").mkdir()
    (tmp_path / "binary" / METRICS_FILE).write_bytes(b"\xff\xfe\x00\x81 not text")
    (tmp_path / "in_progress").mkdir()  # no metrics.csv yet: skipped without a warning
    return tmp_path


def run_report(results: Path, **kwargs) -> str:
    console = Console(file=io.StringIO(), width=250)
    report(results, console=console, **kwargs)
    return console.file.getvalue()


def final_runs(results: Path) -> pd.DataFrame:
    return load_runs(results)[0]


def cell(cells: pd.DataFrame, config: str, key: str, value: float) -> pd.Series:
    return cells[cells["config"].eq(config) & cells[key].eq(value)].squeeze()


def test_load_skips_partial_and_foreign_files_naming_them(grid: Path) -> None:
    runs, warnings = load_runs(grid)
    assert len(runs) == 27  # one final row per run, failed ones included
    assert runs.groupby("status").size().to_dict() == {"diverged": 5, "failed": 1, "ok": 21}
    assert len(warnings) == 4
    assert any(str(grid / "binary" / METRICS_FILE) in w and "unreadable" in w for w in warnings)
    assert any(str(grid / "corrupt" / METRICS_FILE) in w and "cut off" in w for w in warnings)
    assert any(str(grid / "short_row" / METRICS_FILE) in w and "columns" in w for w in warnings)
    assert any(
        str(grid / "foreign" / METRICS_FILE) in w and "missing columns" in w for w in warnings
    )


def test_main_cell_is_mean_std_n_over_seeds(grid: Path) -> None:
    cells = summarize(final_runs(grid), "lr", "val_acc")
    assert len(cells) == 9
    values = [BASE["batch"][0.1] + offset for offset in OFFSET["batch"]]
    batch = cell(cells, "batch", "lr", 0.1)
    assert batch["mean"] == pytest.approx(statistics.mean(values))
    assert batch["std"] == pytest.approx(statistics.stdev(values))
    assert (batch["n"], batch["runs"], batch["diverged"], batch["failed"]) == (3, 3, 0, 0)
    # a diverged seed is counted, not averaged, even though its val_acc (0.1) is finite
    layer = cell(cells, "layer", "lr", 1.0)
    assert layer["mean"] == pytest.approx(0.60 + 0.02)
    assert (layer["n"], layer["diverged"]) == (2, 1)
    failed = cell(cells, "layer", "lr", 0.01)
    assert (failed["n"], failed["failed"]) == (2, 1)
    assert math.isnan(cell(cells, "none", "lr", 1.0)["mean"])


def test_best_cell_per_row_skips_cells_with_divergence(grid: Path) -> None:
    cells = summarize(final_runs(grid), "lr", "val_acc")
    best = cells[cells["best"]].set_index("config")["lr"].to_dict()
    # none's lr=0.1 mean (0.5+0.0+0.05)/2 ... has a diverged seed, so lr=0.01 wins
    assert best == {"batch": 0.1, "layer": 0.1, "none": 0.01}
    losses = summarize(final_runs(grid), "lr", "val_loss")
    assert losses[losses["best"]].set_index("config")["lr"].to_dict() == best  # lower is better


def test_table_output_shows_cells_counts_and_tables(
    grid: Path, capsys: pytest.CaptureFixture
) -> None:
    out = run_report(grid)
    warnings = capsys.readouterr().err.strip().splitlines()
    assert len(warnings) == 4 and all(line.startswith("warning: skipped ") for line in warnings)
    assert "0.913 ± 0.015 (n=3)" in out  # batch, lr=0.1, marked best
    assert "★ 0.913" in out
    assert "n=2, 1/3 diverged" in out and "3/3 diverged" in out and "n=2, 1/3 failed" in out
    for title in ("val_acc at the last epoch, by lr", "Best learning rate", "Stability"):
        assert title in out
    assert "val_acc minus none, paired by seed" in out


def test_best_lr_chosen_on_validation_with_test_metric(grid: Path) -> None:
    table = best_lr(final_runs(grid), "val_acc").set_index("config")
    assert table.loc["batch", "lr"] == 0.1
    assert table.loc["batch", "selected_on"] == "val_acc"
    assert table.loc["batch", "test_mean"] == pytest.approx(0.9 + 0.04 / 3 - 0.05)
    assert table.loc["none", "lr"] == 0.01


def test_stability_largest_lr_without_divergence_and_ratio_to_none(grid: Path) -> None:
    table = stability(final_runs(grid), "none").set_index("config")
    assert table["max_stable_lr"].to_dict() == {"batch": 1.0, "layer": 0.1, "none": 0.01}
    assert table["censored"].to_dict() == {"batch": True, "layer": False, "none": False}
    assert table.loc["batch", "ratio"] == pytest.approx(100)
    assert table.loc["layer", "ratio"] == pytest.approx(10)
    out = run_report(grid)
    assert "≥ 1" in out and "≥ 100x" in out and "10x" in out


def test_paired_difference_and_t_interval_by_hand(grid: Path) -> None:
    table = paired(final_runs(grid), "lr", "val_acc", "none")
    row = cell(table, "batch", "lr", 0.01)
    diffs = [0.80 + b - (0.60 + n) for b, n in zip(OFFSET["batch"], OFFSET["none"], strict=True)]
    half = 4.302652729911275 * statistics.stdev(diffs) / math.sqrt(3)  # t(0.975, df=2)
    assert row["n"] == 3
    assert row["mean"] == pytest.approx(statistics.mean(diffs))
    assert (row["ci_low"], row["ci_high"]) == pytest.approx(
        (statistics.mean(diffs) - half, statistics.mean(diffs) + half)
    )
    # none diverged at lr=0.1 seed 1 and everywhere at lr=1.0: those pairs are dropped, and why
    dropped = cell(table, "batch", "lr", 0.1)
    assert (dropped["n"], dropped["dropped"], dropped["dropped_why"]) == (2, 1, "1 none diverged")
    dropped = cell(table, "layer", "lr", 1.0)  # layer seed 0 diverged too
    assert (dropped["n"], dropped["dropped"]) == (0, 3)
    assert dropped["dropped_why"] == "1 diverged, 2 none diverged"
    failed = cell(table, "layer", "lr", 0.01)
    assert (failed["n"], failed["dropped_why"]) == (2, "1 failed")
    assert "no pairs (dropped 3 none diverged)" in run_report(grid)


def test_where_filters_with_typed_values(grid: Path) -> None:
    runs = final_runs(grid)
    assert set(filter_runs(runs, ["norm=batch"])["norm"]) == {"batch"}
    selected = filter_runs(runs, ["lr=.1", "seed=2"])
    assert sorted(selected["norm"]) == ["batch", "layer", "none"]
    assert len(filter_runs(runs, ["norm.affine=true", "norm=none"])) == 9
    out = run_report(grid, where=["norm=layer"])
    assert "batch" not in out and "layer" in out


def test_float_keys_from_range_sweeps_group_together(tmp_path: Path) -> None:
    for seed, lr in enumerate([0.3, 0.30000000000000004, 0.1 + 0.2]):
        write_run(tmp_path, "batch", lr, seed, 0.5)
    cells = summarize(final_runs(tmp_path), "lr", "val_acc")
    assert cells[["lr", "n"]].values.tolist() == [[0.3, 3]]
    assert len(filter_runs(final_runs(tmp_path), ["lr=0.30000000000000004"])) == 3


def test_other_varying_settings_split_rows_and_label_them(tmp_path: Path) -> None:
    for seed in range(2):
        write_run(tmp_path, "batch", 0.1, seed, 0.8)
        write_run(tmp_path, "batch", 0.1, seed, 0.6, **{"norm.momentum": 0.05})
        write_run(tmp_path, "none", 0.1, seed, 0.5)
    runs = final_runs(tmp_path)
    assert sorted(set(configs_of(runs, "lr").labels)) == [
        "batch (norm.momentum=0.05)",
        "batch (norm.momentum=0.1)",
        "none",
    ]
    cells = summarize(runs, "lr", "val_acc").set_index("config")
    assert cells.loc["batch (norm.momentum=0.05)", "mean"] == pytest.approx(0.6)
    # the baseline pairs with both momentum settings (a norm's own settings are not matched)
    pairs = paired(runs, "lr", "val_acc", "none").set_index("config")
    assert pairs["mean"].to_dict() == pytest.approx(
        {"batch (norm.momentum=0.05)": 0.1, "batch (norm.momentum=0.1)": 0.3}
    )


def test_baseline_runs_differing_only_in_norm_settings_count_once(tmp_path: Path) -> None:
    # none ignores norm.eps, so its two eps runs per seed are one experiment: averaged, not
    # paired twice (n=6 from 3 seeds); at lr=1.0 one of them diverged, so none did there.
    for seed in range(3):
        for lr in (0.1, 1.0):
            for eps, shift in ((1e-5, 0.0), (1e-3, 0.1)):
                write_run(tmp_path, "batch", lr, seed, 0.8 + 0.01 * seed, **{"norm.eps": eps})
                status = "diverged" if (lr, eps, seed) == (1.0, 1e-3, 0) else "ok"
                final = 0.5 + shift + 0.02 * seed
                write_run(tmp_path, "none", lr, seed, final, status, **{"norm.eps": eps})
    runs = final_runs(tmp_path)
    pairs = cell(paired(runs, "lr", "val_acc", "none"), "batch (norm.eps=1e-05)", "lr", 0.1)
    assert pairs["n"] == 3
    assert pairs["mean"] == pytest.approx(0.8 - 0.55 + (0.01 - 0.02))
    pairs = paired(runs, "lr", "val_acc", "none").set_index(["config", "lr"])["n"]
    assert pairs[("batch (norm.eps=0.001)", 1.0)] == 2  # seed 0: one of none's runs diverged
    table = stability(runs, "none").set_index("config")
    assert table.loc["batch (norm.eps=1e-05)", "baseline_max_stable_lr"] == 0.1
    assert table.loc["batch (norm.eps=1e-05)", "ratio"] == pytest.approx(10)
    assert not table["baseline_censored"].any()
    assert "(n=3)" in run_report(tmp_path) and "(n=6)" not in run_report(tmp_path)


@pytest.fixture
def batch_grid(tmp_path: Path) -> Path:
    for norm, finals in {"batch": {2: 0.5, 32: 0.9}, "group": {2: 0.85, 32: 0.86}}.items():
        for batch_size, final in finals.items():
            for seed in range(2):
                write_run(tmp_path, norm, 0.1, seed, final + 0.01 * seed, batch_size=batch_size)
    return tmp_path


def test_by_batch_size_with_where(batch_grid: Path) -> None:
    frame = pd.read_csv(
        io.StringIO(run_report(batch_grid, where=["norm=batch"], by="batch_size", fmt="csv"))
    )
    assert frame["batch_size"].tolist() == [2, 32]
    assert frame["mean"].tolist() == pytest.approx([0.505, 0.905])
    assert frame["best"].tolist() == [False, True]
    out = run_report(batch_grid, by="batch_size")
    assert "batch_size=2" in out and "batch_size=32" in out


def test_by_seed_shows_each_seed(batch_grid: Path) -> None:
    out = run_report(batch_grid, where=["norm=group", "batch_size=2"], by="seed", fmt="csv")
    assert pd.read_csv(io.StringIO(out))["mean"].tolist() == pytest.approx([0.85, 0.86])


def test_by_key_with_null_values_gets_a_null_column_last(
    tmp_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    for seed in range(2):
        for limit, final in ((None, 0.9), (100, 0.7), (1000, 0.8)):
            write_run(tmp_path, "batch", 0.1, seed, final, **{"dataset.limit": limit})
            write_run(tmp_path, "none", 0.1, seed, 0.5 + 0.1 * seed, **{"dataset.limit": limit})
    plots = tmp_path_factory.mktemp("plots")
    out = run_report(tmp_path, by="dataset.limit", fmt="markdown", plot_dir=plots)
    columns = "| norm | dataset.limit=100 | dataset.limit=1000 | dataset.limit=null |"
    assert out.count(columns) == 2  # main table and paired differences
    assert (
        "| batch | 0.7000 ± 0.0000 (n=2) | 0.8000 ± 0.0000 (n=2) | **0.9000 ± 0.0000 (n=2)** |"
        in out
    )
    assert "| batch | +0.15 [-0.485, +0.785] (n=2) | +0.25" in out
    assert_pngs(plots, {"learning_curves.png", "val_acc_vs_dataset.limit.png"})
    pixels = imread(plots / "val_acc_vs_dataset.limit.png")[..., :3]
    batch_blue = abs(pixels - colormaps["tab10"](0)[:3]).sum(axis=-1) < 0.05
    assert batch_blue.sum() > 500  # the lines are drawn (a null tick used to blank the axes)
    only_null = tmp_path_factory.mktemp("plots")
    run_report(tmp_path, by="dataset.limit", where=["dataset.limit=null"], plot_dir=only_null)
    assert_pngs(only_null, {"learning_curves.png"})


def test_markdown_is_pipe_tables(grid: Path) -> None:
    out = run_report(grid, fmt="markdown")
    tables = [block for block in out.split("### ")[1:]]
    assert len(tables) == 4
    for block in tables:
        rows = [line for line in block.splitlines() if line.startswith("|")]
        assert rows[1].replace(" ", "").strip("|").split("|") == ["---"] * (rows[0].count("|") - 1)
        assert {row.count("|") for row in rows} == {rows[0].count("|")}
    assert "**0.913 ± 0.015 (n=3)**" in out


def test_csv_reads_back_with_pandas(grid: Path, tmp_path_factory: pytest.TempPathFactory) -> None:
    output = tmp_path_factory.mktemp("out") / "report.csv"
    assert run_report(grid, fmt="csv", output=output) == ""
    frame = pd.read_csv(output)
    assert len(frame) == 9
    assert {"config", "norm", "lr", "mean", "std", "n", "diverged", "failed", "best"} <= set(frame)


def test_json_is_valid_with_all_sections(grid: Path) -> None:
    data = json.loads(run_report(grid, fmt="json"))
    assert len(data["blocks"]) == 1 and data["blocks"][0]["settings"] == {}
    assert data["left_out"] == [
        {"run_id": data["left_out"][0]["run_id"], "status": "failed", "epoch": 0}
    ]
    data = data["blocks"][0]
    assert data["correction"] == "holm"
    assert data["metric"] == "val_acc" and data["higher_is_better"] and data["baseline"] == "none"
    assert len(data["cells"]) == 9
    assert {row["config"] for row in data["stability"]} == {"batch", "layer", "none"}
    assert data["paired"] and data["best_lr"]
    none_at_1 = [c for c in data["cells"] if c["config"] == "none" and c["lr"] == 1.0][0]
    assert none_at_1["mean"] is None and none_at_1["diverged"] == 3


def test_latex_has_one_tabular_per_table(grid: Path) -> None:
    out = run_report(grid, fmt="latex", metric="val_loss")
    assert out.count(r"\begin{tabular}") == out.count(r"\end{tabular}") == 4
    assert r"val\_loss" in out and r"$\pm$" in out and r"\textbf{" in out


def test_dataset_without_test_split_shows_dashes(tmp_path: Path) -> None:
    for lr in (0.01, 0.1):
        write_run(tmp_path, "batch", lr, 0, 0.8 + lr, test_split=False)
    out = run_report(tmp_path, metric="test_acc", fmt="markdown")
    assert "| batch | – | – |" in out  # main table: no value at either lr
    assert "| batch | 0.1 | 0.9 (n=1) | – |" in out  # best lr: validation, no test


@pytest.mark.parametrize(
    ("kwargs", "named"),
    [
        ({"metric": "nope"}, "val_acc"),
        ({"where": ["nope=1"]}, "batch_size"),
        ({"where": ["norm=bat"]}, "batch, layer, none"),
        ({"where": ["lr=abc"]}, "number"),
        ({"where": ["norm"]}, "key=value"),
        ({"by": "nope"}, "norm.momentum"),
        ({"fmt": "xml"}, "markdown"),
        ({"baseline": "nope"}, "batch, layer, none"),
        ({"by": "norm"}, "already the rows"),
    ],
)
def test_bad_input_raises_config_error_naming_choices(grid: Path, kwargs: dict, named: str) -> None:
    with pytest.raises(ConfigError, match=named):
        run_report(grid, **kwargs)


@pytest.mark.parametrize(
    ("option", "path", "named"),
    [
        ("output", "missing/report.md", "not an existing folder"),
        ("output", "folder", "is a folder"),
        ("plot_dir", "file.txt", "is a file"),
        ("plot_dir", "file.txt/plots", "is a file"),
        ("results_dir", "file.txt", "is a file"),
    ],
)
def test_unusable_paths_raise_config_error_before_printing(
    grid: Path, tmp_path: Path, option: str, path: str, named: str
) -> None:
    (tmp_path / "folder").mkdir()
    (tmp_path / "file.txt").write_text("x")
    kwargs = {"results_dir": grid, option: tmp_path / path}
    console = Console(file=io.StringIO())
    with pytest.raises(ConfigError, match=named) as error:
        report(console=console, **kwargs)
    assert str(tmp_path / path.split("/")[0]) in str(error.value)
    assert console.file.getvalue() == ""


def test_cli_turns_report_errors_into_one_line_and_exit_2(grid: Path) -> None:
    from typer.testing import CliRunner

    from normbench.cli import app

    result = CliRunner().invoke(app, ["report", "--results", str(grid), "--by", "norm"])
    assert result.exit_code == 2
    assert result.output.strip().splitlines()[-1].startswith("error: --by norm")


def test_no_results_prints_how_to_make_some(tmp_path: Path) -> None:
    out = run_report(tmp_path)
    assert "no results under" in out and "normbench sweep" in out


def assert_pngs(folder: Path, names: set[str]) -> None:
    assert {path.name for path in folder.iterdir()} == names
    for name in names:
        assert (folder / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plots_are_written(grid: Path, tmp_path_factory: pytest.TempPathFactory) -> None:
    plots = tmp_path_factory.mktemp("plots")
    run_report(grid, plot_dir=plots)
    assert_pngs(plots, {"learning_curves.png", "val_acc_vs_lr.png"})


def test_batch_size_plot(batch_grid: Path, tmp_path_factory: pytest.TempPathFactory) -> None:
    plots = tmp_path_factory.mktemp("plots")
    run_report(batch_grid, by="batch_size", plot_dir=plots)
    assert_pngs(plots, {"learning_curves.png", "val_acc_vs_batch_size.png"})


def write_diagnostics(root: Path, run_id: str, drift: float) -> None:
    """Two layers; block1 carries the percentiles: p50 and p85 move by ``drift`` per epoch,
    p15 dips by ``drift`` at epoch 2 and comes back."""
    rows = []
    for epoch in (1, 2, 3):
        for layer, grad in (("block0", 2.0 * epoch), ("block1", 1.0)):
            rows += [
                dict(run_id=run_id, epoch=epoch, step=10 * epoch, layer=layer, quantity=q, value=v)
                for q, v in (("input_mean", 0.0), ("input_std", float(epoch)), ("grad_norm", grad))
            ]
        rows += [
            dict(run_id=run_id, epoch=epoch, step=10 * epoch, layer="block1", quantity=q, value=v)
            for q, v in (
                ("preact_p15", -1 - drift * (epoch == 2)),
                ("preact_p50", drift * epoch),
                ("preact_p85", 1 + 2 * drift * epoch),
            )
        ]
    atomic_write_csv(root / run_id / DIAGNOSTICS_FILE, rows, DIAGNOSTIC_COLUMNS)


@pytest.fixture
def diagnosed(tmp_path: Path) -> Path:
    for seed in range(2):
        write_diagnostics(tmp_path, write_run(tmp_path, "batch", 0.1, seed, 0.9), 0.0)
        write_diagnostics(tmp_path, write_run(tmp_path, "none", 0.1, seed, 0.5), 0.5 + seed)
    write_run(tmp_path, "layer", 0.1, 0, 0.7)  # no diagnostics recorded
    return tmp_path


def test_diagnostics_summary_per_norm_and_layer(diagnosed: Path) -> None:
    runs = final_runs(diagnosed)
    records, warnings = load_diagnostics(runs)
    assert not warnings and list(records.columns[:6]) == DIAGNOSTIC_COLUMNS
    table = diagnostics_summary(runs, records).set_index(["config", "layer"])
    assert table.loc[("batch", "block0"), "grad_norm"] == pytest.approx(4.0)  # mean of 2, 4, 6
    assert table.loc[("none", "block1"), "input_std"] == pytest.approx(3.0)
    # drift from epoch 1 to 3: 2 * drift, drift averaged over seeds (0.5 and 1.5) = 1.0
    assert table.loc[("none", "block1"), "drift_preact_p50"] == pytest.approx(2.0)
    assert table.loc[("none", "block1"), "drift_preact_p85"] == pytest.approx(4.0)
    # a dip that comes back still drifted: its depth, averaged over seeds
    assert table.loc[("none", "block1"), "drift_preact_p15"] == pytest.approx(1.0)
    assert table.loc[("batch", "block1"), "drift_preact_p15"] == pytest.approx(0.0)
    assert math.isnan(table.loc[("batch", "block0"), "drift_preact_p50"])


def test_diagnostics_report_table_and_plots(
    diagnosed: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    plots = tmp_path_factory.mktemp("plots")
    out = run_report(diagnosed, diagnostics=True, plot_dir=plots)
    assert "Diagnostics per layer" in out and "block1" in out and "drift p50" in out
    assert_pngs(plots, {"diagnostics_percentiles.png", "diagnostics_grad_norm.png"})
    frame = pd.read_csv(io.StringIO(run_report(diagnosed, diagnostics=True, fmt="csv")))
    assert set(frame["config"]) == {"batch", "none"} and len(frame) == 4


def test_diagnostics_missing_says_how_to_record(grid: Path) -> None:
    assert "diagnostics=true" in run_report(grid, diagnostics=True)
