"""Time `normbench report` on 10,000 synthetic runs against a naive per-file pd.read_csv load,
and `normbench report --html` (tables and figures in one page) with the page's size.

    python bench/bench_report.py [--runs 10000] [--epochs 5]

Writes the runs (the real metrics.csv columns, with some diverged and failed runs) to a
temporary folder, then prints both timings and the speed-up side by side, then the HTML
report's time and size.
"""

from __future__ import annotations

import argparse
import io
import os
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pandas as pd
from rich.console import Console

from normbench.config import Config
from normbench.report import report
from normbench.results import KEY_COLUMNS, METRIC_COLUMNS, METRICS_FILE, flat_config

NORMS = ("batch", "layer", "group", "instance", "none")
LRS = (0.001, 0.003, 0.01, 0.03, 0.1, 0.3, 1.0, 3.0)
BATCH_SIZES = (2, 4, 8, 16, 32)


def write_synthetic_runs(root: Path, runs: int, epochs: int, seed: int = 0) -> None:
    """``runs`` run folders with a metrics.csv each: a norm x lr x batch size x seed grid."""
    rng = np.random.default_rng(seed)
    grid = pd.MultiIndex.from_product(
        [NORMS, LRS, BATCH_SIZES, range(-(-runs // (len(NORMS) * len(LRS) * len(BATCH_SIZES))))],
        names=["norm", "lr", "batch_size", "seed"],
    ).to_frame(index=False)[:runs]
    status = rng.choice(["ok", "diverged", "failed"], size=runs, p=[0.9, 0.08, 0.02])
    length = np.where(status == "ok", epochs, rng.integers(1, epochs + 1, size=runs))
    length[status == "failed"] = 1
    rows = grid.loc[grid.index.repeat(length)].reset_index(names="run")
    rows["epoch"] = rows.groupby("run").cumcount() + 1
    rows["status"] = status[rows["run"]]
    rows["run_id"] = [
        f"mlp-{n}-toy-lr{lr:g}-bs{b}-s{s}" for n, lr, b, s in rows[grid.columns].values
    ]
    for column, value in {"model": "mlp", "dataset": "toy", "optimizer": "sgd"}.items():
        rows[column] = value
    rows["task"] = "classification"
    rows["step"] = rows["epoch"] * 50
    for name in ("train_loss", "val_loss"):
        rows[name] = rng.gamma(2.0, 0.5, len(rows))
    for name in ("train_acc", "val_acc"):
        rows[name] = rng.uniform(0.1, 1.0, len(rows))
    last = rows["run"].ne(rows["run"].shift(-1))
    for name in ("test_loss", "test_acc"):
        rows[name] = rows[name.replace("test", "val")].where(last)
    rows.loc[last & rows["status"].eq("diverged"), ["train_loss", "val_loss"]] = np.inf
    rows["grad_norm"] = rng.gamma(2.0, 1.0, len(rows))
    rows["lr_now"] = rows["lr"]
    rows["epoch_seconds"] = rng.uniform(0.5, 2.0, len(rows))
    rows["error"] = np.where(rows["status"].eq("failed"), "RuntimeError: boom, at step 3", "")
    config = {k: v for k, v in flat_config(asdict(Config())).items() if k not in KEY_COLUMNS}
    for column, value in config.items():
        rows[column] = str(value) if isinstance(value, list) else value
    columns = [*KEY_COLUMNS, *METRIC_COLUMNS, *config]
    header, _, body = rows[columns].to_csv(index=False).partition("\n")
    lines = body.splitlines(keepends=True)
    ends = np.cumsum(length)
    for run_id, start, end in zip(grid.index, ends - length, ends, strict=True):
        folder = root / f"run{run_id:05d}"
        folder.mkdir()
        (folder / METRICS_FILE).write_text(header + "\n" + "".join(lines[start:end]))


def naive_load(root: Path) -> pd.DataFrame:
    """The baseline: one pd.read_csv per run, then the last row of each."""
    frames = [pd.read_csv(path) for path in sorted(root.glob(f"*/{METRICS_FILE}"))]
    return pd.concat(frames, ignore_index=True).groupby("run_id").tail(1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=10_000)
    parser.add_argument("--epochs", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        start = time.perf_counter()
        write_synthetic_runs(root, args.runs, args.epochs)
        print(
            f"wrote {args.runs} runs x {args.epochs} epochs in {time.perf_counter() - start:.1f} s"
        )
        console = Console(file=io.StringIO(), width=200)
        start = time.perf_counter()
        report(root, console=console)
        fast = time.perf_counter() - start
        start = time.perf_counter()
        naive_load(root)
        naive = time.perf_counter() - start
        page = root / "report.html"
        start, cpu = time.perf_counter(), time.process_time()
        report(root, console=Console(file=io.StringIO(), width=200), html=page)
        with_html, cpu = time.perf_counter() - start, time.process_time() - cpu
        size = page.stat().st_size
    print(
        f"report on {args.runs} runs: {fast:.2f} s; naive per-file read_csv load alone: "
        f"{naive:.2f} s; speed-up {naive / fast:.1f}x"
    )
    load = ", ".join(f"{v:.1f}" for v in os.getloadavg())
    print(
        f"report --html on {args.runs} runs (every epoch read, figures drawn): "
        f"{with_html:.2f} s ({cpu:.2f} s of CPU time), {size / 1e6:.2f} MB "
        f"(load average {load} on {os.cpu_count()} cores)"
    )


if __name__ == "__main__":
    main()
