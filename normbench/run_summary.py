"""What ``normbench run`` prints when a run ends."""

from __future__ import annotations

import math

from rich.console import Console

from normbench.engine.lifecycle import RunResult
from normbench.results import METRICS_FILE


def print_run(result: RunResult, console: Console | None = None) -> None:
    """One line: the run id, its status, its final metrics and where they were written."""
    console = console or Console()
    last = result.rows[-1] if result.rows else {}
    parts = [f"[bold]{result.run_id}[/]", _status_markup(result.status)]
    for key in ("train_loss", "val_loss", "val_acc", "test_acc"):
        value = last.get(key)
        if isinstance(value, float) and math.isfinite(value):
            parts.append(f"{key} {value:.4f}")
    if last:
        parts.append(f"epochs {last['epoch']}")
    if result.resumed_from:
        parts.append(f"(resumed after epoch {result.resumed_from})")
    parts.append(f"-> {result.path / METRICS_FILE}")
    console.print("  ".join(parts), highlight=False, soft_wrap=True)


def _status_markup(status: str) -> str:
    color = {"ok": "green", "diverged": "yellow", "skipped": "cyan"}.get(status, "red")
    return f"[{color}]{status}[/]"
