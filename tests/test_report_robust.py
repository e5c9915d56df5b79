"""normbench report: module structure, bad values, bad paths, narrow terminals, mixed tasks
and failed writes."""

from __future__ import annotations

import ast
import io
from graphlib import CycleError, TopologicalSorter
from pathlib import Path

import pytest
from rich.console import Console
from typer.testing import CliRunner

import normbench
from normbench.cli import app
from normbench.report import report
from normbench.report.tables import Report
from normbench.results import METRICS_FILE
from tests.test_report import final_runs, run_report, write_diagnostics, write_run

REPORT_MODULES = (
    "report", "report.load", "report.stats", "report.tables", "report.html", "report.tensorboard",
    "report.plots",
)  # fmt: skip


def imports(module: str) -> set[str]:
    """The normbench modules ``module`` imports, at the top or inside functions."""
    path = Path(normbench.__file__).parent.joinpath(*module.split("."))
    path = path / "__init__.py" if path.is_dir() else path.with_suffix(".py")
    tree = ast.parse(path.read_text())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("normbench"):
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
            found |= {name.removeprefix("normbench.") for name in names}
    return found & set(REPORT_MODULES)


def test_report_modules_import_one_way() -> None:
    graph = {module: imports(module) for module in REPORT_MODULES}
    try:
        order = list(TopologicalSorter(graph).static_order())
    except CycleError as error:
        pytest.fail(f"import cycle: {error.args[1]}")
    assert order[-1] == "report"  # only the orchestrator knows the others
    assert graph["report.load"] == set()


def test_a_non_numeric_value_skips_the_file_with_a_warning(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    for seed in range(2):
        write_run(tmp_path, "batch", 0.1, seed, 0.8)
    bad = tmp_path / write_run(tmp_path, "batch", 0.1, 2, 0.9) / METRICS_FILE
    lines = bad.read_text().splitlines()
    header = lines[0].split(",")
    last = lines[-1].split(",")
    last[header.index("val_acc")] = "abc"
    bad.write_text("\n".join([*lines[:-1], ",".join(last)]) + "\n")
    assert "0.8000 ± 0.0000 (n=2)" in run_report(tmp_path)
    assert capsys.readouterr().err.strip() == f"warning: skipped {bad}: val_acc is not a number"


def cli(*args: str) -> object:
    return CliRunner().invoke(app, ["report", *args], env={"COLUMNS": "80"})


def test_missing_results_folder_exits_2_with_one_line(tmp_path: Path) -> None:
    result = cli("--results", str(tmp_path / "does" / "not" / "exist"))
    assert result.exit_code == 2
    assert result.output.strip().splitlines() == [
        f"error: --results {tmp_path / 'does' / 'not' / 'exist'} does not exist"
    ]


@pytest.fixture
def wide(tmp_path: Path) -> Path:
    """Long labels (two momentum settings), six lrs, diverged seeds: a table wider than 80."""
    results = tmp_path / "results"
    for lr in (0.001, 0.01, 0.1, 1.0, 10.0, 30.0):
        for seed in range(3):
            for momentum in (0.05, 0.1):
                status = "diverged" if lr > 1 and seed == 0 else "ok"
                final = 0.5 + 0.01 * seed + lr / 100
                write_run(results, "batch", lr, seed, final, status, **{"norm.momentum": momentum})
            write_run(results, "none", lr, seed, 0.4 + 0.013 * seed, "diverged" * (lr > 1) or "ok")
    return results


def assert_whole(out: str, summary: Report) -> None:
    """Every word of every header and cell appears unbroken in ``out``."""
    for table in summary.tables():
        for text in [*table.columns, *(cell for row in table.rows for cell in row)]:
            for word in text.split():
                assert word in out, f"{word!r} of {text!r} was broken in:\n{out}"


def test_tables_fit_80_columns_without_breaking_words(wide: Path) -> None:
    from normbench.report import _summary

    console = Console(file=io.StringIO(), width=80)
    report(wide, console=console)
    out = console.file.getvalue()
    assert max(map(len, out.splitlines())) <= 80
    runs = final_runs(wide)
    assert_whole(out, _summary(runs, None, "lr", "none", [], runs.iloc[:0]))
    piped = cli("--results", str(wide))  # not a terminal: rich's default width
    assert piped.exit_code == 0 and piped.output.count("0.5100") == out.count("0.5100")
    assert max(map(len, piped.output.splitlines())) <= 80


def test_diagnostics_fit_80_columns_and_drop_empty_columns(tmp_path: Path) -> None:
    for seed in range(2):
        write_diagnostics(tmp_path, write_run(tmp_path, "batch", 0.1, seed, 0.9), 0.123456)
        write_diagnostics(tmp_path, write_run(tmp_path, "none", 0.1, seed, 0.5), 12.3456 + seed)
    result = cli("--results", str(tmp_path), "--diagnostics")
    assert result.exit_code == 0
    out = result.output
    assert max(map(len, out.splitlines())) <= 80
    for word in ("norm", "layer", "mean", "grad", "final", "input", "drift", "p15", "p85"):
        assert word in out
    for number in ("0.123", "0.247", "0.494", "12.8", "25.7", "51.4"):  # drift, averaged
        assert f" {number} " in out
    assert "eval gap" not in out  # none recorded: no column of dashes


def test_classification_and_regression_are_reported_apart(tmp_path: Path) -> None:
    for seed in range(2):
        for norm in ("batch", "none"):
            write_run(tmp_path, norm, 0.1, seed, 0.8 + 0.01 * seed)
        write_run(tmp_path, "batch", 0.1, seed, 0.7, task="regression")
    out = run_report(tmp_path, fmt="markdown")
    assert "### task=classification: val_acc at the last epoch, by lr" in out
    assert "### task=regression: val_loss at the last epoch, by lr" in out
    assert "reported separately, each with its own metric (val_acc and val_loss)" in out
    classification = out.split("### task=regression")[0]
    assert "0.8050 ± 0.0071 (n=2)" in classification  # val_acc, not val_loss


@pytest.mark.parametrize("target", ["symlink", "/dev/full"])
def test_a_failed_output_write_exits_1_with_one_line(
    tmp_path: Path, wide: Path, target: str
) -> None:
    if target == "symlink":  # a name whose target lies under a regular file
        (tmp_path / "file.txt").write_text("x")
        output = tmp_path / "report.md"
        output.symlink_to(tmp_path / "file.txt" / "report.md")
    elif Path(target).exists():
        output = Path(target)
    else:
        pytest.skip("no /dev/full")
    result = CliRunner().invoke(app, ["report", "-r", str(wide), "--output", str(output)])
    assert result.exit_code == 1
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: could not write --output {output}: ")


def test_a_failed_plot_write_exits_1_with_one_line(wide: Path, tmp_path: Path) -> None:
    (tmp_path / "plots" / "learning_curves.png").mkdir(parents=True)  # a folder in the way
    result = cli("-r", str(wide), "--plot", str(tmp_path / "plots"), "--format", "json")
    assert result.exit_code == 1
    last = result.output.strip().splitlines()[-1]
    assert last.startswith(f"error: could not write --plot {tmp_path / 'plots'}: ")
    assert "learning_curves.png" in last and "Traceback" not in result.output
