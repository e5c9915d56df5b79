"""``normbench list``: the config-group choices, read from the YAML files themselves."""

from __future__ import annotations

from importlib.resources import files

from rich.console import Console
from rich.table import Table

GROUPS = ("model", "norm", "dataset", "optimizer", "experiment")


def group_choices(group: str) -> dict[str, str]:
    """``{choice: description}`` for a config group; the description is the file's comment."""
    folder = files("normbench.configs") / group
    choices = {}
    for entry in sorted(folder.iterdir(), key=lambda e: e.name):
        if entry.name.endswith(".yaml"):
            comments = []
            for line in entry.read_text().splitlines():
                if line.startswith("# @package"):
                    continue
                if not line.startswith("#"):
                    break
                comments.append(line.lstrip("# ").strip())
            choices[entry.name[: -len(".yaml")]] = " ".join(comments)
    return choices


def print_catalog(console: Console | None = None) -> None:
    """One table per group: ``normbench run GROUP=CHOICE``."""
    console = console or Console()
    for group in GROUPS:
        table = Table(title=f"{group}=...", title_justify="left", show_header=False, expand=True)
        table.add_column("choice", style="bold cyan", no_wrap=True)
        table.add_column("what it is")
        for name, description in group_choices(group).items():
            table.add_row(name, description)
        console.print(table)
    console.print(
        "Any key can be overridden: `normbench run --cfg job` prints the full config, e.g. "
        "norm.num_groups, model.hidden, dataset.root, optimizer.momentum."
    )
