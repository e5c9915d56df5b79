"""normbench report: status semantics (stalled, running, failed) and the statistics a reviewer
accepts (paired tests, Holm, dropped pairs, zero std, diagnostics, studies never mixed)."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pandas as pd
import pytest
from scipy import stats

from normbench.report.load import load_diagnostics
from normbench.report.stats import diagnostics_summary, paired, stability, summarize
from tests.test_report import cell, final_runs, run_report, write_diagnostics, write_run


def test_stalled_runs_are_counted_like_diverged_ones_not_averaged(tmp_path: Path) -> None:
    for seed in range(3):
        write_run(tmp_path, "batch", 0.1, seed, 0.9 + 0.01 * seed)
        write_run(tmp_path, "batch", 1.0, seed, 0.95, "stalled" if seed == 0 else "ok")
    cells = summarize(final_runs(tmp_path), "lr", "val_acc")
    stalled = cell(cells, "batch", "lr", 1.0)
    assert (stalled["n"], stalled["stalled"], stalled["mean"]) == (2, 1, pytest.approx(0.95))
    assert cells[cells["best"]]["lr"].tolist() == [0.1]  # 1.0 is higher but a seed stalled
    assert "0.9500 ± 0.0000 (n=2, 1/3 stalled)" in run_report(tmp_path)


def test_stability_gives_the_largest_lr_that_trains_and_without_divergence(
    tmp_path: Path,
) -> None:
    # batch: stalls (one seed) at 10, never diverges; none: stalls at 0.1, diverges at 1 and 10
    outcome = {("batch", 10.0): "stalled", ("none", 0.1): "stalled", ("none", 1.0): "diverged"}
    outcome[("none", 10.0)] = "diverged"
    for norm in ("batch", "none"):
        for lr in (0.01, 0.1, 1.0, 10.0):
            for seed in range(2):
                status = outcome.get((norm, lr), "ok") if seed == 0 else "ok"
                write_run(tmp_path, norm, lr, seed, 0.8, status)
    table = stability(final_runs(tmp_path), "none").set_index("config")
    assert table["max_trains_lr"].to_dict() == {"batch": 1.0, "none": 0.01}
    assert table["max_stable_lr"].to_dict() == {"batch": 10.0, "none": 0.1}
    assert table["trains_ratio"].to_dict() == pytest.approx({"batch": 100.0, "none": 1.0})
    assert table["ratio"].to_dict() == pytest.approx({"batch": 100.0, "none": 1.0})
    assert table["censored"].to_dict() == {"batch": True, "none": False}
    out = run_report(tmp_path, fmt="markdown")
    assert "| batch | 1 | ≥ 10 | 4 | 100x | ≥ 100x |" in out


def test_running_and_failed_runs_never_enter_statistics_and_are_listed(tmp_path: Path) -> None:
    for seed in range(2):
        write_run(tmp_path, "batch", 0.1, seed, 0.8)
    running = write_run(tmp_path, "batch", 0.1, 2, 0.99, "running")
    failed = write_run(tmp_path, "batch", 0.1, 3, 0.5, "failed")
    out = run_report(tmp_path)
    assert "0.8000 ± 0.0000 (n=2, 1/3 failed)" in out  # not 0.86 (n=3): the running run
    assert f"1 run unfinished or running: {running}" in out
    assert f"1 run failed (counted, never averaged): {failed}" in out
    left_out = json.loads(run_report(tmp_path, fmt="json"))["left_out"]
    assert {(r["run_id"], r["status"], r["epoch"]) for r in left_out} == {
        (running, "running", 2),
        (failed, "failed", 0),
    }


def test_stack_size_is_not_a_setting(tmp_path: Path) -> None:
    for seed in range(2):
        write_run(tmp_path, "batch", 0.1, seed, 0.8, stack_size=1 + 3 * seed)
    out = run_report(tmp_path, fmt="markdown")
    assert out.count("### ") == 1 and "stack_size" not in out
    with pytest.raises(ValueError, match="--by key"):
        run_report(tmp_path, by="stack_size")


def test_identical_or_too_few_differences_are_never_significant(tmp_path: Path) -> None:
    # three seeds with the same difference (+0.2, up to rounding): zero width, untested;
    # two seeds: untested
    for seed in range(3):
        write_run(tmp_path, "layer", 0.1, seed, (0.3, 0.6, 0.9)[seed])
        write_run(tmp_path, "none", 0.1, seed, (0.1, 0.4, 0.7)[seed])
        write_run(tmp_path, "layer", 1.0, seed, 0.9 + (0.05 if seed else 0))
        write_run(tmp_path, "none", 1.0, seed, 0.1, "diverged" if seed == 0 else "ok")
    table = paired(final_runs(tmp_path), "lr", "val_acc", "none").set_index("lr")
    assert table.loc[0.1, ["mean", "n"]].tolist() == [pytest.approx(0.2), 3]
    assert 0 < table.loc[0.1, "std"] < 1e-15  # rounding noise, not spread
    assert table["p"].isna().all() and not table["significant"].any()
    out = run_report(tmp_path)
    assert "+0.2 [+0.2, +0.2] (n=3)" in out and "* +0.2" not in out
    assert "+0.85 [+0.85, +0.85] (n=2, dropped 1 none diverged)" in out


def test_holm_correction_over_the_cells_of_a_paired_table(tmp_path: Path) -> None:
    # batch - none at three lrs: a clear, a borderline and a null difference over 4 seeds
    noise = (0.0, 0.02, -0.01, 0.015)
    effects = {0.01: 0.3, 0.1: 0.018, 1.0: 0.005}
    for lr, effect in effects.items():
        for seed, wiggle in enumerate(noise):
            write_run(tmp_path, "none", lr, seed, 0.5 + 0.1 * seed)
            write_run(tmp_path, "batch", lr, seed, 0.5 + 0.1 * seed + effect + wiggle)
    table = paired(final_runs(tmp_path), "lr", "val_acc", "none").set_index("lr")
    raw = {}
    for lr, effect in effects.items():
        diffs = [effect + wiggle for wiggle in noise]
        raw[lr] = stats.ttest_1samp(diffs, 0.0).pvalue
    assert table["p"].to_dict() == pytest.approx(raw)
    ranked = sorted(raw, key=raw.get)
    step_down = [raw[lr] * (3 - i) for i, lr in enumerate(ranked)]
    expected = dict(zip(ranked, pd.Series(step_down).cummax().clip(upper=1), strict=True))
    assert table["p_holm"].to_dict() == pytest.approx(expected)
    assert raw[0.1] < 0.05 < table.loc[0.1, "p_holm"]  # significant alone, not after Holm
    assert table["significant"].to_dict() == {0.01: True, 0.1: False, 1.0: False}
    out = run_report(tmp_path, fmt="markdown")
    assert "Holm-Bonferroni correction over the 3 tested cells" in out
    assert out.count("**+") == 1  # one marked difference


def test_zero_std_is_shown() -> None:
    from normbench.report.tables import _mean_std

    assert _mean_std(0.9931, 0.0, 3) == "0.9931 ± 0.0000"
    assert _mean_std(0.65, 0.026, 3) == "0.650 ± 0.026"
    assert _mean_std(0.9931, float("nan"), 1) == "0.9931"


def test_diagnostics_leave_out_diverged_and_stalled_runs_and_say_so(tmp_path: Path) -> None:
    for seed in range(2):
        write_diagnostics(tmp_path, write_run(tmp_path, "none", 0.1, seed, 0.5), 0.5 + seed)
    write_diagnostics(tmp_path, write_run(tmp_path, "none", 0.1, 2, 0.5, "diverged"), 100.0)
    write_diagnostics(tmp_path, write_run(tmp_path, "none", 0.1, 3, 0.5, "stalled"), 50.0)
    runs = final_runs(tmp_path)
    table = diagnostics_summary(runs, load_diagnostics(runs)[0]).set_index(["config", "layer"])
    assert table.loc[("none", "block1"), "drift_preact_p50"] == pytest.approx(2.0)  # not ~77
    out = run_report(tmp_path, diagnostics=True)
    assert "2 runs left out of the diagnostics: 1 diverged, 1 stalled" in out


def test_studies_with_other_settings_are_never_interleaved(tmp_path: Path) -> None:
    # the toy lr study and the digits batch-size study, read together, by batch size
    for seed in range(2):
        for norm in ("batch", "none"):
            for lr in (0.01, 0.1, 1.0):
                write_run(tmp_path, norm, lr, seed, 0.5 + lr / 10)
        for batch_size in (2, 4, 32):
            write_run(tmp_path, "batch", 0.05, seed, 0.9, batch_size=batch_size, dataset="digits")
    out = run_report(tmp_path, by="batch_size", fmt="markdown")
    titles = [line for line in out.splitlines() if "at the last epoch" in line]
    assert titles == [
        "### dataset=digits, lr=0.05: val_acc at the last epoch, by batch_size",
        "### dataset=toy, lr=0.01: val_acc at the last epoch, by batch_size",
        "### dataset=toy, lr=0.1: val_acc at the last epoch, by batch_size",
        "### dataset=toy, lr=1: val_acc at the last epoch, by batch_size",
    ]
    assert "The runs differ in dataset, lr, which is neither a row nor a column" in out
    blocks = out.split("### ")
    digits = next(b for b in blocks if b.startswith("dataset=digits"))
    assert digits.count("0.9000 ± 0.0000 (n=2)") == 3 and "0.5" not in digits
    toy = next(b for b in blocks if b.startswith("dataset=toy, lr=1:"))
    assert "| norm | batch_size=32 |" in toy and "batch_size=2" not in toy
    frame = pd.read_csv(io.StringIO(run_report(tmp_path, by="batch_size", fmt="csv")))
    assert frame.groupby(["dataset", "lr"]).size().to_dict() == {
        ("digits", 0.05): 3,
        ("toy", 0.01): 2,
        ("toy", 0.1): 2,
        ("toy", 1.0): 2,
    }
