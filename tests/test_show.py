"""``normbench show``: a real finished run drawn before and after each norm, as one PNG."""

from __future__ import annotations

from pathlib import Path

import pytest
from matplotlib.image import imread
from typer.testing import CliRunner

from normbench import results
from normbench.app import compose_config
from normbench.cli import app
from normbench.engine.lifecycle import run_experiment
from normbench.errors import ConfigError
from normbench.show import draw, load_run

runner = CliRunner()


def finished_run(overrides: list[str]) -> tuple[Path, str]:
    """Run a tiny experiment; it writes its final weights (model.pt) itself."""
    cfg = compose_config(overrides)
    result = run_experiment(cfg)
    assert result.status in results.DONE_STATUSES
    assert (result.path / results.MODEL_FILE).is_file()
    return result.path.parent, result.run_id


# (overrides, panels): the example and the output, then per block before norm, after norm and
# a histogram, or output and histogram for a block without a norm.
CASES = {
    "mlp-batch": (["model=mlp", "norm=batch"], 2 + 2 * 3),
    "convnet-none": (
        ["model=convnet", "norm=none", "model.channels=[4,8]", "model.hidden=[]"],
        2 + 2 * 2,
    ),
}


@pytest.mark.parametrize("case", CASES)
def test_show_draws_every_block_of_a_finished_run(case: str, tiny: list[str], tmp_path: Path):
    overrides, panels = CASES[case]
    results_dir, run_id = finished_run([*tiny, *overrides])
    _, model, data = load_run(results_dir, run_id)
    assert len(draw(run_id, model, data, 0)[1]) == panels

    png = tmp_path / "figure.png"
    done = runner.invoke(
        app, ["show", run_id, "--results", str(results_dir), "--output", str(png), "--example", "3"]
    )
    assert done.exit_code == 0, done.stderr
    assert done.stdout == f"wrote {png}\n"
    height, width, _ = imread(png).shape
    assert width > 1000 and height > 500


def test_show_explains_what_it_cannot_draw(tiny: list[str], tmp_path: Path):
    results_dir, run_id = finished_run(tiny)

    def fails(*args: str) -> str:
        done = runner.invoke(app, ["show", *args, "--results", str(results_dir)])
        assert done.exit_code == 2, done.stdout
        assert done.stderr.count("\n") == 1 and "Traceback" not in done.stderr
        return done.stderr

    assert f"close matches: {run_id}" in fails(run_id[:-2])
    assert "--example must be in 0..23" in fails(run_id, "--example", "24")
    (results_dir / run_id / results.MODEL_FILE).unlink()
    assert f"run {run_id} has no model.pt" in fails(run_id)


def test_an_unwritable_output_is_one_line_and_exit_1(tiny: list[str], tmp_path: Path):
    results_dir, run_id = finished_run(tiny)
    (tmp_path / "file").write_text("")
    png = tmp_path / "file" / "figure.png"
    done = runner.invoke(app, ["show", run_id, "--results", str(results_dir), "--output", str(png)])
    assert done.exit_code == 1
    assert done.stderr == f"error: cannot write {png}: Not a directory\n"


def test_load_run_refuses_a_folder_that_is_not_a_run(tmp_path: Path):
    with pytest.raises(ConfigError, match=r"no run 'nothing' in .* \(0 runs there\)"):
        load_run(tmp_path, "nothing")
