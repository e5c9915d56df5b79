"""An outside review's hostile inputs and wrong numbers, one test per item (numbers are theirs):
each fails on the code before its fix."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch.autograd import gradcheck, gradgradcheck
from typer.testing import CliRunner

from normbench.app import compose_config
from normbench.cli import app
from normbench.engine.checkpoint import save_weights
from normbench.models import build_model
from normbench.norms.frn import FilterResponseNorm
from normbench.norms.reference_batchnorm import BatchNormFunction
from normbench.results import METRICS_FILE, MODEL_FILE
from tests.test_report import write_run
from tests.test_show import finished_run

f64 = torch.float64
runner = CliRunner()


def report(results: Path, *args: str) -> tuple[int, str, str]:
    done = runner.invoke(app, ["report", "--results", str(results), *args])
    return done.exit_code, done.stdout, done.stderr


# ----------------------------------------------------------------------------- item 3


def test_a_metrics_csv_that_lost_its_last_rows_is_incomplete_not_finished(tmp_path: Path) -> None:
    """A run whose file ends before its ``epochs`` but says ok (or stalled) lost rows: it is
    listed by id, never averaged in (its epoch 2 would pull lr 0.1 below lr 0.01). A diverged
    run stops early by design and is still counted as diverged."""
    for seed in range(3):
        write_run(tmp_path, "batch", 0.01, seed, 0.80)
        write_run(tmp_path, "batch", 0.1, seed, 0.82)
        write_run(tmp_path, "batch", 1.0, seed, 0.6, "diverged" if seed == 0 else "ok")
    cut = write_run(tmp_path, "batch", 0.1, 3, 0.82)
    metrics = tmp_path / cut / METRICS_FILE
    metrics.write_text("".join(metrics.read_text().splitlines(keepends=True)[:-1]))
    code, out, err = report(tmp_path, "--format", "markdown")
    assert code == 0, err
    cells = [
        "0.8000 ± 0.0000 (n=3)",
        "**0.8200 ± 0.0000 (n=3)**",  # still the best lr: the cut run's epoch 2 left out
        "0.6000 ± 0.0000 (n=2, 1/3 diverged)",  # stopped early by design: counted as before
    ]
    assert f"| batch | {' | '.join(cells)} |" in out
    assert f"1 run incomplete (metrics.csv ends before the last epoch): {cut} (epoch 2 of 3)" in out
    left_out = json.loads(report(tmp_path, "--format", "json")[1])["left_out"]
    assert left_out == [{"run_id": cut, "status": "incomplete", "epoch": 2}]


# ----------------------------------------------------------------------------- item 5


def test_reference_batch_norm_backward_is_once_differentiable() -> None:
    """The hand-written backward is right (gradcheck) but is not itself differentiated
    correctly: a second derivative must fail loudly rather than be 0.51 off silently."""
    torch.manual_seed(0)
    x, gamma, beta = (torch.randn(*shape, dtype=f64, requires_grad=True) for shape in
                      [(6, 3), (3,), (3,)])  # fmt: skip
    bn = lambda *t: BatchNormFunction.apply(*t, 1e-5)[0]  # noqa: E731
    assert gradcheck(bn, (x, gamma, beta))
    (grad_x,) = torch.autograd.grad(bn(x, gamma, beta).pow(3).sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="differentiate twice .* @once_differentiable"):
        grad_x.sum().backward()
    with pytest.raises(RuntimeError):
        gradgradcheck(bn, (x, gamma, beta))


# ----------------------------------------------------------------------------- item 4


def frn_layers(overrides: list[str], shape: tuple[int, ...]) -> list[FilterResponseNorm]:
    cfg = compose_config(["norm=frn", *overrides])
    net = build_model(cfg.model, cfg.norm, shape, 10)
    return [m for m in net.modules() if isinstance(m, FilterResponseNorm)]


def test_frn_learns_eps_on_features_only_conv_maps_use_the_fixed_eps() -> None:
    """configs/norm/frn.yaml's learned_eps is the paper's fix for H x W = 1: conv maps keep
    eps = 1e-6 (not 1e-6 + |eps_l| ~ 1, which made their outputs ~30% smaller)."""
    torch.manual_seed(0)
    conv = frn_layers(["model=convnet"], (1, 16, 16))
    assert len(conv) == 2 and all(m.eps_l is None and m.eps == 1e-6 for m in conv)
    x = torch.randn(4, conv[0].num_features, 8, 8)
    nu2 = x.pow(2).mean((2, 3), keepdim=True)
    torch.testing.assert_close(conv[0](x), torch.clamp(x / (nu2 + 1e-6).sqrt(), min=0.0))
    mlp = frn_layers(["model=mlp"], (1, 16, 16))
    assert len(mlp) == 2 and all(m.eps_l is not None for m in mlp)
    lenet_conv, lenet_dense = frn_layers(["model=lenet"], (1, 16, 16))
    assert lenet_conv.eps_l is None and lenet_dense.eps_l is not None


# ----------------------------------------------------------------------------- item 8


def show(results: Path, run_id: str, tmp_path: Path) -> str:
    """``normbench show``'s one-line error (exit 2, no traceback, no figure written)."""
    png = tmp_path / "figure.png"
    done = runner.invoke(
        app, ["show", run_id, "--results", str(results), "--output", str(png)]
    )
    assert done.exit_code == 2, (done.stdout, done.stderr)
    assert done.stderr.count("\n") == 1 and "Traceback" not in done.stderr, done.stderr
    assert not png.exists()
    return done.stderr


@pytest.mark.parametrize("keep", [0.5, 0.0])
def test_show_of_a_truncated_model_pt_is_one_line(
    keep: float, tiny: list[str], tmp_path: Path
) -> None:
    results_dir, run_id = finished_run(tiny)
    weights = results_dir / run_id / MODEL_FILE
    data = weights.read_bytes()
    weights.write_bytes(data[: int(len(data) * keep)])
    err = show(results_dir, run_id, tmp_path)
    assert err.startswith(f"error: cannot load {weights}: ")
    assert "truncated or corrupt" in err or "empty" in err


# ----------------------------------------------------------------------------- item 13


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        # the default mlp, 256 and 128 wide: 256 itself does not divide the 128-wide layer
        (["norm.num_groups=3"], "a layer's 256 channels; choose a divisor of 256 and of 128 "
         "(every normalized layer's channels): 1, 2, 4, 8, 16, 32, 64, 128"),
        (["norm.num_groups=64", "model.hidden=[256,96]"], "a layer's 96 channels; choose a "
         "divisor of 256 and of 96 (every normalized layer's channels): 1, 2, 4, 8, 16, 32"),
        # lenet normalizes its second conv (20) and its dense layer (50), not its first conv
        (["model=lenet", "norm.num_groups=3"], "a layer's 20 channels; choose a divisor of 20 "
         "and of 50 (every normalized layer's channels): 1, 2, 5, 10"),
        (["model.hidden=[32,32]", "norm.num_groups=3"], "divisor of 32: 1, 2, 4, 8, 16, 32"),
    ],
)  # fmt: skip
def test_group_counts_suggested_divide_every_normalized_layer(
    overrides: list[str], expected: str, tmp_path: Path
) -> None:
    done = runner.invoke(
        app, ["run", "norm=group", *overrides, "quiet=true", f"results_dir={tmp_path / 'r'}"]
    )
    assert done.exit_code == 2, done.stderr
    assert done.stderr.count("\n") == 1 and done.stderr.rstrip().endswith(expected), done.stderr
    assert not (tmp_path / "r").exists()


# ----------------------------------------------------------------------------- item 16


def test_show_of_weights_of_another_shape_names_the_first_mismatch(
    tiny: list[str], tmp_path: Path
) -> None:
    results_dir, run_id = finished_run(tiny)  # model.hidden=[32,16]
    cfg = compose_config([*tiny, "model.hidden=[8,16]"])
    weights = results_dir / run_id / MODEL_FILE
    save_weights(weights, build_model(cfg.model, cfg.norm, (1, 16, 16), 10))
    err = show(results_dir, run_id, tmp_path)
    assert err == (
        f"error: cannot load {weights}: its weights do not fit the model config.yaml builds: "
        "blocks.0.layer.weight is [8, 256] in the file, [32, 256] in the model "
        "(and 5 more mismatching tensors)\n"
    )


def test_show_of_a_failed_run_says_it_failed_with_its_error(
    tiny: list[str], tmp_path: Path
) -> None:
    from normbench.engine.run_log import RunLog

    log = RunLog(compose_config(tiny))
    try:
        raise RuntimeError("boom at step 3\nsecond line")
    except RuntimeError as error:
        log.fail(error)
    err = show(log.path.parent, log.run_id, tmp_path)
    assert err == (
        f"error: run {log.run_id} failed (RuntimeError: boom at step 3); nothing to show: "
        f"its traceback is in {log.path / 'error.txt'}\n"
    )


def test_where_filters_are_each_checked_against_all_runs_and_combine_with_and(
    tmp_path: Path,
) -> None:
    for seed in range(2):
        write_run(tmp_path, "batch", 0.1, seed, 0.8)
        write_run(tmp_path, "none", 1.0, seed, 0.6)
    code, _, err = report(tmp_path, "--where", "norm=batch", "--where", "norm=none")
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err
    assert err == (
        "error: no run matches --where norm=batch and norm=none together (the filters combine "
        "with AND; each alone matches runs)\n"
    )
    code, _, err = report(tmp_path, "--where", "norm=batch", "--where", "lr=1")
    assert code == 2 and "no run matches --where norm=batch and lr=1 together" in err
    code, _, err = report(tmp_path, "--where", "norm=batch", "--where", "norm=layer")
    assert code == 2
    assert err == "error: unknown value for --where norm 'layer'; choose from: batch, none\n"
