"""The ``normbench`` command line: thin commands that forward to library functions.

Importing this module must stay cheap (no torch, no Hydra): ``normbench --help`` is instant.
"""

from __future__ import annotations

import gc
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, TypeVar

import typer

app = typer.Typer(
    help="Compare normalization methods (batch, layer, instance, group, batch renorm, none) "
    "on the documents' MLPs and CNNs.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

_HYDRA_ARGS = {"allow_extra_args": True, "ignore_unknown_options": True}
Overrides = Annotated[
    list[str] | None,
    typer.Argument(
        help="Hydra overrides such as model=convnet norm=batch lr=0.1, and Hydra's own flags "
        "(--cfg job, --config-dir DIR). See `normbench list` for the choices.",
        show_default=False,
    ),
]
T = TypeVar("T")


def _spare_imports() -> None:
    """Take what torch and Hydra made on import, which lives as long as the process, out of
    the garbage collector's full passes (they walk it all: ~0.2 s of a 12-run sweep)."""
    gc.freeze()


def _guard(action: Callable[[], T]) -> T:
    """Run ``action``; a user error becomes one line on stderr and exit code 2."""
    from normbench.errors import ConfigError

    try:
        return action()
    except ConfigError as error:
        typer.echo(f"error: {error}", err=True)
        raise typer.Exit(2) from None


@app.command(context_settings=_HYDRA_ARGS)
def run(overrides: Overrides = None) -> None:
    """Run one experiment and write results_dir/<run_id>/metrics.csv.

    Example: normbench run model=convnet norm=batch lr=0.1
    """
    from normbench.app import launch, parse_args, sweep_overrides
    from normbench.errors import ConfigError

    _spare_imports()

    def run_one() -> None:
        args = parse_args(overrides or [])
        if "--multirun" in args.options:
            raise ConfigError("normbench run runs one experiment; use normbench sweep for grids")
        if swept := sweep_overrides(args.overrides):
            raise ConfigError(
                f"{swept[0]} gives several values; normbench run runs one experiment: use "
                f"normbench sweep {swept[0]} for a grid, or quote a value holding a comma "
                "(key='a,b')"
            )
        launch([*args.flags, *args.overrides])  # Hydra's parser wants its flags first

    try:
        _guard(run_one)
    except (typer.Exit, KeyboardInterrupt):
        raise
    except Exception as error:  # run_experiment recorded it: status "failed", error.txt
        if type(error).__name__ == "RunClaimedError":
            typer.echo(f"error: {_claimed_message(error)}", err=True)
            raise typer.Exit(1) from None
        written = type(error).__name__ == "OutputError"  # its message names the file and why
        typer.echo(f"run failed: {'' if written else type(error).__name__ + ': '}{error}", err=True)
        raise typer.Exit(1) from None


def _claimed_message(error: Exception) -> str:
    """``run <id> is being trained by another process (pid N); wait for it ...``."""
    from normbench.engine.run_claims import describe_holder

    run_path = getattr(error, "run_path", None)
    name = run_path.name if run_path is not None else "this run"
    holder = describe_holder(run_path) if run_path is not None else ""
    return (
        f"run {name} is being trained by another process{holder}; wait for it to finish "
        "(the run is then complete), or stop that process and run again"
    )


@app.command(context_settings=_HYDRA_ARGS)
def sweep(
    overrides: Overrides = None,
    jobs: Annotated[
        int,
        typer.Option("--jobs", "-j", help="Parallel processes (Hydra's joblib launcher)."),
    ] = 1,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Print the number of jobs and the grid; run nothing.")
    ] = False,
    force: Annotated[
        bool, typer.Option("--force", help="Rerun jobs that already have complete results.")
    ] = False,
    stack: Annotated[
        bool | None,
        typer.Option(
            "--stack/--no-stack",
            help="Train each setup's learning rates and seeds together as one stacked model, "
            "one job per group (the default; stack=true), or one job per run (--no-stack; "
            "stack=false).",
            show_default=False,
        ),
    ] = None,
) -> None:
    """Run a grid of experiments: comma lists, range(), choice(), glob() over any key.

    Example: normbench sweep norm=batch,layer,group,none lr=0.01,0.1,1.0 seed=0,1,2
    Completed runs are skipped (--force reruns them); a failed job does not stop the others.
    """
    if jobs < 1:  # checked here, not by Typer: its message is a box of five lines
        typer.echo(f"error: --jobs must be at least 1; got {jobs}", err=True)
        raise typer.Exit(2)
    from normbench.sweep import run_sweep

    _spare_imports()
    failed = _guard(
        lambda: run_sweep(overrides or [], jobs=jobs, dry_run=dry_run, force=force, stack=stack)
    )
    raise typer.Exit(1 if failed else 0)


@app.command()
def report(
    results: Annotated[
        Path, typer.Option("--results", "-r", help="Results folder to read.")
    ] = Path("results"),
    metric: Annotated[
        str | None,
        typer.Option(
            help="Metric to compare (val_acc, val_loss, train_loss, ...); default "
            "val_acc for classification, val_loss for regression."
        ),
    ] = None,
    where: Annotated[
        list[str] | None, typer.Option(help="Keep runs with KEY=VALUE (repeatable).")
    ] = None,
    by: Annotated[str, typer.Option(help="Column key of the main table.")] = "lr",
    fmt: Annotated[
        str,
        typer.Option(
            "--format", help="table, csv (main table only), markdown, latex or json (every table)."
        ),
    ] = "table",
    output: Annotated[Path | None, typer.Option(help="Write the tables to FILE.")] = None,
    plot: Annotated[Path | None, typer.Option(help="Write PNG figures to DIR.")] = None,
    baseline: Annotated[
        str | None, typer.Option(help="Norm for the paired comparison (default: none).")
    ] = None,
    diagnostics: Annotated[
        bool, typer.Option("--diagnostics", help="Summarize diagnostics.csv files instead.")
    ] = False,
    html: Annotated[
        Path | None,
        typer.Option(help="Write every table and figure as one self-contained HTML FILE."),
    ] = None,
    tensorboard: Annotated[
        Path | None,
        typer.Option(
            help="Write every run's metrics and settings as TensorBoard event files to DIR "
            '(needs pip install -e ".[tensorboard]").'
        ),
    ] = None,
) -> None:
    """Summarize results: norm x learning rate, best lr, stability, paired comparison."""
    import shlex
    import sys

    from normbench.report import report as make_report

    try:
        _guard(
            lambda: make_report(
                results,
                metric=metric,
                where=where or [],
                by=by,
                fmt=fmt,
                output=output,
                plot_dir=plot,
                baseline=baseline,
                diagnostics=diagnostics,
                html=html,
                tensorboard=tensorboard,
                command=shlex.join(["normbench", *sys.argv[1:]]),
            )
        )
    except OSError as error:  # writing --output, --plot, --html or --tensorboard failed
        typer.echo(f"error: {error}", err=True)
        raise typer.Exit(1) from None


@app.command()
def show(
    run_id: Annotated[str, typer.Argument(help="The run: its folder name under --results.")],
    results: Annotated[
        Path, typer.Option("--results", "-r", help="Results folder to read.")
    ] = Path("results"),
    output: Annotated[
        Path | None,
        typer.Option(help="PNG to write (default: RUN_ID-activations-EXAMPLE.png here)."),
    ] = None,
    example: Annotated[int, typer.Option(help="Which validation example to show.")] = 0,
) -> None:
    """Draw a finished run's activations before and after each norm for one example.

    Example: normbench show mlp-batch-toy-lr0.1-bs32-s0-1a2b3c4d5e --example 3
    """
    from normbench.preflight import OutputError
    from normbench.show import show as draw_run

    try:
        path = _guard(lambda: draw_run(run_id, results, output, example))
    except OutputError as error:
        typer.echo(f"error: {error}", err=True)
        raise typer.Exit(1) from None
    typer.echo(f"wrote {path}")


@app.command("list")
def list_choices() -> None:
    """List the models, norms, datasets, optimizers and named experiments."""
    from normbench.catalog import print_catalog

    print_catalog()


def main() -> None:
    """Entry point of the ``normbench`` command and of ``python -m normbench``."""
    try:
        app(prog_name="normbench")
    finally:
        # Exiting, the interpreter's last garbage collection walks every object torch and Hydra
        # made (0.3-0.8 s); what normbench writes is closed by now, so that walk is skipped.
        gc.freeze()
