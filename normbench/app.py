"""Hydra behind the CLI: composing configs, launching runs, and turning errors into one line.

``normbench run`` and ``normbench sweep`` call :func:`launch`, which runs the
``hydra.main``-wrapped task with ``sys.argv`` rewritten, so every Hydra feature works
(``--multirun``, sweep syntax, ``--cfg job``, ``--config-dir``, launcher plugins).
Tests and sweep planning use :func:`compose_config`, the compose API on the same configs.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.errors import HydraException, MissingConfigException
from hydra.types import RunMode
from omegaconf import DictConfig, open_dict
from omegaconf.errors import OmegaConfBaseException

from normbench.config import register_configs, unknown_key_message
from normbench.errors import ConfigError

CONFIG_MODULE = "normbench.configs"
GROUPS = ("model", "norm", "dataset", "optimizer")

register_configs()


@contextmanager
def hydra_context() -> Iterator[None]:
    """Hydra's compose context on the packaged configs."""
    from hydra import initialize_config_module

    with translate_errors(), initialize_config_module(CONFIG_MODULE, version_base="1.3"):
        yield


def compose_job(
    overrides: Sequence[str], config_dir: str | None = None
) -> tuple[DictConfig, dict[str, str]]:
    """The resolved config and its group choices; call inside :func:`hydra_context`.

    ``config_dir`` adds a folder of the user's configs to the search path, as Hydra's
    ``--config-dir`` does.
    """
    from hydra import compose

    with translate_errors():
        cfg = compose(
            "config", overrides=[*search_path(config_dir), *overrides], return_hydra_config=True
        )
    choices = {group: str(cfg.hydra.runtime.choices[group]) for group in GROUPS}
    with open_dict(cfg):
        del cfg["hydra"]
    return cfg, choices


def search_path(config_dir: str | None) -> list[str]:
    """The override that adds ``config_dir`` to Hydra's search path (none without one)."""
    return [f"hydra.searchpath=[file://{Path(config_dir).resolve()}]"] if config_dir else []


def compose_config(
    overrides: Sequence[str] = (), config_dir: str | None = None
) -> tuple[DictConfig, dict[str, str]]:
    """The resolved config for ``overrides`` and its group choices, via the compose API."""
    with hydra_context():
        return compose_job(overrides, config_dir)


def launch(args: Sequence[str], multirun: bool = False) -> None:
    """Run the Hydra app as if called as ``normbench [--multirun] ARGS``."""
    argv = ["normbench", *(["--multirun"] if multirun else []), *args]
    _task_errors.clear()
    with _patched_argv(argv), translate_errors():
        _hydra_main()
    if _task_errors:
        raise _task_errors.pop()


# A single run's exception, carried past Hydra (which would print its own banner) to launch().
_task_errors: list[Exception] = []


@hydra.main(version_base="1.3", config_path=f"pkg://{CONFIG_MODULE}", config_name="config")
def _hydra_main(cfg: DictConfig) -> None:
    from normbench.experiment import run_experiment
    from normbench.summary import print_run

    hydra_cfg = HydraConfig.get()
    choices = {group: str(hydra_cfg.runtime.choices[group]) for group in GROUPS}
    if hydra_cfg.mode == RunMode.MULTIRUN:
        from normbench.sweep import run_job

        run_job(cfg, choices)
    else:
        try:
            print_run(run_experiment(cfg, choices))
        except Exception as error:
            _task_errors.append(error)


@contextmanager
def translate_errors() -> Iterator[None]:
    """Re-raise Hydra's and OmegaConf's errors about user input as one-line ConfigErrors."""
    previous = os.environ.get("HYDRA_FULL_ERROR")
    os.environ["HYDRA_FULL_ERROR"] = "1"  # let exceptions reach us instead of Hydra's printer
    try:
        yield
    except MissingConfigException as error:
        raise ConfigError(_missing_config_message(error)) from None
    except (HydraException, OmegaConfBaseException) as error:
        raise ConfigError(_one_line(error)) from None
    finally:
        if previous is None:
            os.environ.pop("HYDRA_FULL_ERROR", None)
        else:
            os.environ["HYDRA_FULL_ERROR"] = previous


def _missing_config_message(error: MissingConfigException) -> str:
    missing = error.missing_cfg_file or ""
    if error.options and "/" in missing:
        group, name = missing.rsplit("/", 1)
        return f"unknown {group} {name!r}; choose from: {', '.join(error.options)}"
    return _one_line(error)


def _one_line(error: BaseException) -> str:
    message = str(error).strip().splitlines()[0]
    cause = error.__cause__
    if isinstance(cause, OmegaConfBaseException):
        key = getattr(cause, "full_key", None)
        detail = str(cause).strip().splitlines()[0]
        if "not in struct" in str(cause) or "Could not override" in message:
            return unknown_key_message(key or message.split("'")[1])
        return f"{message}: {detail}"
    return message


@contextmanager
def _patched_argv(argv: list[str]) -> Iterator[None]:
    saved = sys.argv
    sys.argv = argv
    try:
        yield
    finally:
        sys.argv = saved
