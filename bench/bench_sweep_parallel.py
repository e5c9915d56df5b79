"""Sweep wall time: ``--jobs 2`` (Hydra's joblib launcher) vs the sequential launcher.

The same 8-run grid on the default data (convnet, 25 epochs: runs of a few seconds, so the
parallel workers' start-up is amortized as in a real study), run both ways side by side into
fresh folders, and the metrics compared. Extra overrides replace the defaults.
Run: python bench/bench_sweep_parallel.py [overrides]
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd

GRID = ["norm=batch,layer,group,none", "lr=0.01,0.1"]
DEFAULTS = ["model=convnet", "epochs=25"]


def timed_sweep(results_dir: Path, jobs: int, extra: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(
        [sys.executable, "-m", "normbench", "sweep", f"--jobs={jobs}", *GRID, *extra,
         f"results_dir={results_dir}"],
        check=True,
        capture_output=True,
    )  # fmt: skip
    return time.perf_counter() - start


def metrics(results_dir: Path) -> pd.DataFrame:
    frames = [pd.read_csv(p) for p in sorted(results_dir.glob("*/metrics.csv"))]
    return pd.concat(frames).drop(columns=["epoch_seconds"]).reset_index(drop=True)


def main() -> None:
    extra = sys.argv[1:] or DEFAULTS
    with tempfile.TemporaryDirectory() as tmp:
        sequential = timed_sweep(Path(tmp) / "seq", 1, extra)
        parallel = timed_sweep(Path(tmp) / "par", 2, extra)
        same = metrics(Path(tmp) / "seq").equals(metrics(Path(tmp) / "par"))
    print(
        f"8-run sweep: sequential {sequential:.1f} s, --jobs 2 {parallel:.1f} s, "
        f"speed-up {sequential / parallel:.2f}x; identical metrics: {same}"
    )


if __name__ == "__main__":
    main()
