"""normbench report --tensorboard: every run's epochs as scalars and its settings as HParams,
read back with TensorBoard's own event reader; a rerun replaces instead of adding."""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd
import pytest

from normbench.errors import ConfigError
from normbench.results import METRICS_FILE
from tests.test_report import run_report, write_run

pytest.importorskip("tensorboard", reason='an extra: pip install -e ".[tensorboard]"')

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402
from tensorboard.plugins.hparams import plugin_data_pb2  # noqa: E402

METRICS = ("val_acc", "val_loss", "train_loss", "test_acc")


def hparams_data(folder: Path) -> tuple[EventAccumulator, plugin_data_pb2.HParamsPluginData]:
    """The folder's events, and its one HParams record (session start or experiment)."""
    (events,) = folder.glob("events.out.tfevents.*")  # exactly one file: nothing duplicated
    accumulator = EventAccumulator(str(folder), size_guidance={"scalars": 0, "tensors": 0})
    accumulator.Reload()
    (content,) = accumulator.PluginTagToContent("hparams").values()
    return accumulator, plugin_data_pb2.HParamsPluginData.FromString(content)


def value(proto_value) -> object:
    return getattr(proto_value, proto_value.WhichOneof("kind"))


def test_every_run_has_its_scalars_and_hparams_and_a_rerun_replaces(tmp_path: Path) -> None:
    results, board = tmp_path / "results", tmp_path / "board"
    for seed in range(2):
        for norm, final in (("batch", 0.9), ("none", 0.6)):
            write_run(results, norm, 0.1, seed, final + 0.01 * seed)
        write_run(results, "batch", 1.0, seed, 0.5, "diverged" if seed else "ok")
        write_run(results, "none", 0.1, seed, 0.3, task="regression", batch_size=8)
    write_run(results, "none", 1.0, 5, 0.2, "running")
    write_run(results, "none", 1.0, 6, 0.0, "failed")
    for _ in range(2):  # the second export into the same folder replaces the first
        run_report(results, tensorboard=board)
        folders = sorted(p.name for p in board.iterdir() if p.is_dir())
        assert folders == sorted(p.name for p in results.iterdir())
        _, experiment = hparams_data(board)
        info = experiment.experiment
        names = {h.name for h in info.hparam_infos}
        assert {"norm", "lr", "batch_size", "seed", "model", "dataset", "status"} <= names
        assert {"norm.eps", "model.hidden", "task"} <= names
        assert {m.name.tag for m in info.metric_infos} >= {"val_acc", "val_loss", "test_acc"}
        for folder in folders:
            rows = pd.read_csv(results / folder / METRICS_FILE)
            rows = rows.reindex(columns=[*rows, *(m for m in METRICS if m not in rows)])
            final = rows.iloc[-1]
            events, data = hparams_data(board / folder)
            hparams = {k: value(v) for k, v in data.session_start_info.hparams.items()}
            assert data.session_start_info.group_name == final["run_id"]
            for key in ("norm", "model", "dataset", "task", "status"):
                assert hparams[key] == final[key]
            for key in ("lr", "batch_size", "seed", "norm.eps"):
                assert hparams[key] == pytest.approx(final[key])
            assert hparams["model.hidden"] == "[256, 128]"
            tags = set(events.Tags()["scalars"])
            for metric in METRICS:
                expected = rows[rows["epoch"].ge(1) & rows[metric].notna()]
                assert (metric in tags) == (not expected.empty), (folder, metric)
                if expected.empty:
                    continue
                scalars = events.Scalars(metric)
                assert [s.step for s in scalars] == list(expected["epoch"])
                for scalar, number in zip(scalars, expected[metric], strict=True):
                    assert scalar.value == pytest.approx(number) or (
                        math.isinf(scalar.value) and math.isinf(number)
                    )


def test_tensorboard_missing_is_a_config_error_naming_the_extra(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import normbench.report.tensorboard

    write_run(tmp_path, "batch", 0.1, 0, 0.9)
    monkeypatch.setattr(normbench.report.tensorboard, "available", lambda: False)
    with pytest.raises(ConfigError, match=r'pip install -e "\.\[tensorboard\]"'):
        run_report(tmp_path, tensorboard=tmp_path / "board")
