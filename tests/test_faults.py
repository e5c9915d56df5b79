"""Faults through the real CLI in subprocesses: nothing lost, nothing done twice.

One uninterrupted sweep (the module fixture ``reference``) is what every interrupted and
resumed sweep or run must end with, column for column but timings.
"""

from __future__ import annotations

import os
import random
import resource
import signal
import subprocess
import time
from pathlib import Path

import pandas as pd
import pytest
from typer.testing import CliRunner

from normbench import results
from normbench.cli import app
from tests.conftest import TINY, cli

GRID = ["norm=batch,none", "lr=0.05,0.2", "seed=1", "epochs=3", "batch_size=8", *TINY[1:]]
GRID += ["checkpoint_seconds=0"]  # a checkpoint after every epoch: something to resume from
RUNS = 4
TIMINGS = ["epoch_seconds"]


def finish(process: subprocess.Popen, timeout: float = 300) -> tuple[str, str]:
    out, err = process.communicate(timeout=timeout)
    return out, err


def complete_runs(results_dir: Path) -> dict[str, pd.DataFrame]:
    return {
        path.name: pd.read_csv(path / results.METRICS_FILE).drop(columns=TIMINGS)
        for path in sorted(results_dir.glob("[!.]*"))
        if results.is_complete(path)
    }


def wait_for(predicate, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while not predicate():
        if time.time() > deadline:
            raise TimeoutError("the condition never held")
        time.sleep(0.005)


@pytest.fixture(scope="module")
def reference_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The grid swept once, uninterrupted: two stacks (one per norm) of two learning rates."""
    root = tmp_path_factory.mktemp("reference")
    out, err = finish(cli("sweep", *GRID, f"results_dir={root / 'r'}", cwd=root))
    assert len(complete_runs(root / "r")) == RUNS, err
    return root / "r"


@pytest.fixture(scope="module")
def reference(reference_dir: Path) -> dict[str, pd.DataFrame]:
    return complete_runs(reference_dir)


@pytest.fixture(scope="module")
def alone(tmp_path_factory: pytest.TempPathFactory) -> dict[str, pd.DataFrame]:
    """The grid swept once, uninterrupted, one job per run (--no-stack)."""
    root = tmp_path_factory.mktemp("alone")
    out, err = finish(cli("sweep", "--no-stack", *GRID, f"results_dir={root / 'r'}", cwd=root))
    assert len(complete_runs(root / "r")) == RUNS, err
    return complete_runs(root / "r")


def assert_same(runs: dict[str, pd.DataFrame], reference: dict[str, pd.DataFrame]) -> None:
    assert runs.keys() == reference.keys()
    for run_id, frame in reference.items():
        pd.testing.assert_frame_equal(runs[run_id], frame)


def test_a_terminated_sweep_resumes_to_the_uninterrupted_numbers(
    alone: dict[str, pd.DataFrame], tmp_path: Path
) -> None:
    """SIGTERM (Ctrl-C unwinds the same way) at a random moment: often mid-epoch, mid-sweep
    (one job per run: a stack of these tiny runs can end before the signal lands).
    SIGKILL: the run and the parallel sweep below; a stack: test_a_killed_stack_resumes..."""
    folder = tmp_path / "r"
    grid = ["--no-stack", *GRID, f"results_dir={folder}"]
    process = cli("sweep", *grid, cwd=tmp_path, start_new_session=True)
    wait_for(lambda: any(folder.glob(f"*/{results.CHECKPOINT_FILE}")))
    time.sleep(random.Random(0).uniform(0, 0.3))
    os.killpg(process.pid, signal.SIGTERM)
    finish(process, 60)
    assert len(complete_runs(folder)) < RUNS
    out, err = finish(cli("sweep", *grid, cwd=tmp_path))
    assert "Traceback" not in err
    assert_same(complete_runs(folder), alone)
    assert not list(folder.rglob("*.tmp"))
    assert not list(folder.rglob(results.CHECKPOINT_FILE))  # removed once runs finish


def test_a_run_killed_mid_epoch_resumes_from_its_checkpoint(tmp_path: Path) -> None:
    args = ["norm=batch", "lr=0.05", *GRID[2:], "epochs=12"]  # long enough to be caught
    finish(cli("run", *args, f"results_dir={tmp_path / 'whole'}", cwd=tmp_path))
    uninterrupted = complete_runs(tmp_path / "whole")
    (run_id,) = uninterrupted
    folder = tmp_path / "r"
    process = cli("run", *args, f"results_dir={folder}", cwd=tmp_path)
    wait_for((folder / run_id / results.CHECKPOINT_FILE).exists, timeout=120)
    process.kill()
    finish(process, 60)
    partial = pd.read_csv(folder / run_id / results.METRICS_FILE)
    assert set(partial["status"]) == {"running"} and len(partial) < 12
    out, err = finish(cli("run", *args, f"results_dir={folder}", cwd=tmp_path))
    assert "resumed after epoch" in out, out + err
    assert_same(complete_runs(folder), uninterrupted)


def test_two_sweeps_at_once_run_each_job_once(tmp_path: Path) -> None:
    shared = f"results_dir={tmp_path / 'r'}"
    first = cli("sweep", *GRID, shared, cwd=tmp_path)
    second = cli("sweep", *GRID, shared, cwd=tmp_path)
    outputs = [finish(first), finish(second)]
    assert first.returncode == 0 and second.returncode == 0, outputs
    assert len(complete_runs(tmp_path / "r")) == RUNS
    counts = [summary_counts(out) for out, _ in outputs]
    trained = sum(c["ok"] + c["stalled"] + c["diverged"] for c in counts)
    assert trained == RUNS  # each run trained by one sweep; the other skipped it or saw it busy
    assert sum(c["skipped"] + c["elsewhere"] for c in counts) == RUNS


def summary_counts(out: str) -> dict[str, int]:
    """The sweep summary's counts per status, read from its table."""
    lines = out.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("┃") and " ok " in line)
    names = [cell.strip() for cell in lines[header].strip("┃").split("┃")]
    values = next(line for line in lines[header:] if line.startswith("│"))
    return dict(zip(names, map(int, values.strip("│").split("│")), strict=True))


def test_a_full_disk_says_what_and_where(tmp_path: Path) -> None:
    def limit() -> None:  # a 20 KiB file-size limit: small files fit, a checkpoint does not
        resource.setrlimit(resource.RLIMIT_FSIZE, (20 * 1024, 20 * 1024))

    grid = ["norm=batch,none", "lr=0.05,0.2", *TINY[1:], "epochs=2", "checkpoint_seconds=0"]
    for stack in ("--stack", "--no-stack"):  # a stacked group's write fails per member too
        folder = tmp_path / stack
        args = ["sweep", stack, *grid, f"results_dir={folder}"]
        process = cli(*args, cwd=tmp_path, preexec_fn=limit)
        out, err = finish(process)
        assert process.returncode == 1
        assert "Traceback" not in out + err
        assert out.count("File too large") == 4 and out.count("cannot write") == 4, out
        assert not complete_runs(folder)
        folders = sum(1 for p in folder.iterdir() if not p.name.startswith("."))
        assert f"in {folders} run folders" in out


@pytest.mark.parametrize("command", ["run", "sweep"])
def test_an_unusable_results_folder_is_refused_before_training(
    command: str, tmp_path: Path
) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    result = CliRunner().invoke(app, [command, *TINY, f"results_dir={blocker / 'r'}"])
    assert result.exit_code == 2, result.output
    assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1
    assert str(blocker) in result.stderr


def test_a_killed_parallel_sweep_stops_its_workers_and_resumes_to_the_same_numbers(
    alone: dict[str, pd.DataFrame], tmp_path: Path
) -> None:
    """One job per run, so each worker has a second job queued when the sweep is killed."""
    folder = tmp_path / "r"
    args = ["sweep", "--no-stack", "--jobs", "2", *GRID, f"results_dir={folder}"]
    process = cli(*args, cwd=tmp_path)
    wait_for(lambda: any(folder.glob(f"*/{results.CHECKPOINT_FILE}")))
    workers = _children(process.pid)
    assert workers
    process.kill()  # the main process only
    process.wait(timeout=30)
    wait_for(lambda: not any(_alive(pid) for pid in workers), timeout=15)
    finish(process, 30)  # the workers held its pipes open until they stopped
    finished_in_parallel = complete_runs(folder)
    assert len(finished_in_parallel) < RUNS
    out, err = finish(cli("sweep", "--no-stack", *GRID, f"results_dir={folder}", cwd=tmp_path))
    assert "Traceback" not in err
    assert_same(complete_runs(folder), alone)  # the runs trained in parallel included


def _children(pid: int) -> list[int]:
    out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True, text=True)
    return [int(line) for line in out.stdout.split()]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as handle:  # a zombie is dead
        return handle.read().split(")")[-1].split()[0] != "Z"


# ----------------------------------------------------------------------------- stacked sweeps


def test_a_stacked_sweep_writes_the_runs_a_per_run_sweep_writes(
    reference: dict[str, pd.DataFrame], alone: dict[str, pd.DataFrame]
) -> None:
    dry = CliRunner().invoke(app, ["sweep", "--dry-run", *GRID])
    assert "4 jobs in 2 stacked group jobs" in dry.stdout  # stacked by default
    dry = CliRunner().invoke(app, ["sweep", "--no-stack", "--dry-run", *GRID])
    assert "4 jobs on the basic launcher" in dry.stdout
    runs = alone
    assert runs.keys() == reference.keys()  # same run ids, one folder per run
    for run_id, stacked in reference.items():
        alone = runs[run_id]
        assert (stacked["stack_size"] == 2).all()  # lr 0.05 and 0.2 of one norm, together
        assert (alone["stack_size"] == 1).all()
        assert list(stacked.columns) == list(alone.columns)
        numeric = ["train_loss", "val_loss", "val_acc", "grad_norm", "test_loss", "test_acc"]
        pd.testing.assert_frame_equal(alone[numeric], stacked[numeric], rtol=1e-4)


def test_a_stacked_group_trains_only_its_unfinished_members(
    reference: dict[str, pd.DataFrame], reference_dir: Path, tmp_path: Path
) -> None:
    import shutil

    folder = tmp_path / "r"
    done = next(r for r in reference if "-none-" in r and "lr0.05" in r)
    shutil.copytree(reference_dir / done, folder / done)  # as if killed after this member
    before = (folder / done / results.METRICS_FILE).read_bytes()
    result = CliRunner().invoke(app, ["sweep", "--stack", *GRID, f"results_dir={folder}"])
    assert result.exit_code == 0, result.output
    assert (folder / done / results.METRICS_FILE).read_bytes() == before
    runs = complete_runs(folder)
    assert len(runs) == RUNS
    partner = next(r for r in runs if "-none-" in r and r != done)
    assert (runs[partner]["stack_size"] == 1).all()  # trained alone: its partner was done
    summary = summary_counts(result.stdout)
    assert summary["skipped"] == 1 and summary["ok"] + summary["stalled"] == RUNS - 1


def test_a_killed_stack_resumes_from_its_checkpoint(tmp_path: Path) -> None:
    args = ["sweep", "--stack", "norm=batch", "lr=0.05,0.2", *GRID[2:], "epochs=12"]
    args += ["model.dropout=0.2", "checkpoint_seconds=0"]  # dropout: its streams resume too
    finish(cli(*args, f"results_dir={tmp_path / 'whole'}", cwd=tmp_path))
    uninterrupted = complete_runs(tmp_path / "whole")
    assert len(uninterrupted) == 2
    folder = tmp_path / "r"
    process = cli(*args, f"results_dir={folder}", cwd=tmp_path)
    first = folder / sorted(uninterrupted)[0]  # the stack's first member holds its checkpoint
    wait_for((first / "checkpoint.pt").exists, timeout=120)
    process.kill()
    finish(process, 60)
    partial = {r: pd.read_csv(folder / r / results.METRICS_FILE) for r in uninterrupted}
    for frame in partial.values():
        assert set(frame["status"]) == {"running"} and len(frame) < 12
    finish(cli(*args, f"results_dir={folder}", cwd=tmp_path))
    assert_same(complete_runs(folder), uninterrupted)
    assert not (first / "checkpoint.pt").exists()
    for run_id, frame in partial.items():  # resumed, not retrained: epoch 1 kept its timing
        final = pd.read_csv(folder / run_id / results.METRICS_FILE)
        assert final["epoch_seconds"].iloc[0] == frame["epoch_seconds"].iloc[0]


def test_a_group_over_its_memory_cap_is_split(tmp_path: Path) -> None:
    from normbench.app import compose_config
    from normbench.datasets import describe_dataset
    from normbench.engine.trainer import estimate_data_bytes, estimate_member_bytes

    settings = ["norm=batch", *TINY]
    cfg = compose_config(settings)
    data = describe_dataset(cfg.dataset)
    member = estimate_member_bytes(cfg, data.input_shape, data.num_outputs)
    seed_data = estimate_data_bytes(data.input_shape, data.train_examples)  # one seed: shared
    cap = f"stack_max_mib={(seed_data + 2.5 * member) / 2**20}"  # room for two members
    args = ["sweep", "--stack", "lr=0.05,0.1,0.2", *settings, cap, f"results_dir={tmp_path}"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    sizes = sorted(frame["stack_size"].iloc[-1] for frame in complete_runs(tmp_path).values())
    assert sizes == [1, 2, 2]  # one stack of two, one of one


def test_every_norm_and_model_trains_stacked(tmp_path: Path) -> None:
    """No norm or model falls back to one run after another: each group is one stack."""
    grid = ["lr=0.05,0.2", *TINY, "batch_size=8", "dataset.limit=96", f"results_dir={tmp_path}"]
    rnn = [o for o in grid if not o.startswith("model.")] + ["model.cell=rnn,lstm"]
    for models, norms, settings in (
        ("mlp,convnet", "glob(*,exclude=[batch_per_step,instance])", grid),
        ("convnet", "instance", grid),  # instance norm needs feature maps
        ("rnn", "none,batch,layer,batch_per_step", [*rnn, "dataset=toy_sequence"]),
    ):
        args = ["sweep", f"model={models}", f"norm={norms}", *settings]
        result = CliRunner().invoke(app, args)
        assert result.exit_code == 0, result.output
        assert "not stacked" not in result.output
    runs = complete_runs(tmp_path)
    assert len(runs) == 2 * (2 * 17 + 1 + 8)
    assert all((frame["stack_size"] == 2).all() for frame in runs.values())


def test_a_diverging_member_stops_and_its_group_goes_on(tmp_path: Path) -> None:
    args = ["sweep", "--stack", "norm=none", "lr=0.05,1000", *TINY, "epochs=2"]
    result = CliRunner().invoke(app, [*args, f"results_dir={tmp_path}"])
    assert result.exit_code == 0, result.output
    runs = {frame["lr"].iloc[-1]: frame for frame in complete_runs(tmp_path).values()}
    assert set(runs) == {0.05, 1000}
    exploded, kept = runs[1000], runs[0.05]
    assert exploded["status"].iloc[-1] == "diverged" and len(exploded) == 1  # stopped at once
    assert kept["status"].iloc[-1] in ("ok", "stalled") and len(kept) == 2
    assert (kept["stack_size"] == 2).all()
