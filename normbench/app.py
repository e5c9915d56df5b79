"""Hydra behind the CLI: composing configs, launching runs, and turning errors into one line.

``normbench run`` and ``normbench sweep`` call :func:`launch`, which runs the
``hydra.main``-wrapped task with ``sys.argv`` rewritten, so every Hydra feature works
(``--multirun``, sweep syntax, ``--cfg job``, ``--config-dir``, sweeper and launcher plugins).
Tests and sweep planning use :func:`compose_job`, the compose API on the same configs.
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import hydra
import yaml
from hydra.core.hydra_config import HydraConfig
from hydra.core.plugins import Plugins
from hydra.errors import HydraException, MissingConfigException, OverrideParseException
from hydra.types import RunMode
from omegaconf import DictConfig, open_dict
from omegaconf.errors import OmegaConfBaseException

from normbench.config import group_schemas, register_configs, unknown_key_message
from normbench.errors import ConfigError

CONFIG_MODULE = "normbench.configs"
GROUPS = ("model", "norm", "dataset", "optimizer", "experiment")
CHOICE_GROUPS = GROUPS[:-1]  # the groups whose choice names a run (experiment only overrides)
MAX_OVERRIDE_CHARS = 1000

register_configs()


def _register_plugins() -> None:
    """Make ``hydra/sweeper=normbench`` and normbench's SLURM launcher known to Hydra.

    Hydra's plugin scan finds hydra_plugins/normbench_sweeper in an installed wheel but not
    in an editable install, whose finder maps the module without listing it. The scan runs
    first: it executes every plugin module again, so one imported earlier would have its
    classes defined twice.
    """
    plugins = Plugins.instance()
    from hydra_plugins.normbench_slurm import SlurmLauncher
    from hydra_plugins.normbench_sweeper import PlannedSweeper

    plugins.register(PlannedSweeper)
    plugins.register(SlurmLauncher)


_register_plugins()

# Hydra's command-line flags (hydra/_internal/utils.py), by every spelling: the canonical name
# and whether it takes a value ("?" for an optional one).
_FLAGS = {
    "--config-dir": ("--config-dir", True), "-cd": ("--config-dir", True),
    "--config-path": ("--config-path", True), "-cp": ("--config-path", True),
    "--config-name": ("--config-name", True), "-cn": ("--config-name", True),
    "--cfg": ("--cfg", True), "-c": ("--cfg", True),
    "--package": ("--package", True), "-p": ("--package", True),
    "--info": ("--info", "?"), "-i": ("--info", "?"),
    "--shell-completion": ("--shell-completion", False), "-sc": ("--shell-completion", False),
    "--experimental-rerun": ("--experimental-rerun", True),
    "--resolve": ("--resolve", False), "--hydra-help": ("--hydra-help", False),
    "--version": ("--version", False),
    "--multirun": ("--multirun", False), "-m": ("--multirun", False),
    "--run": ("--run", False), "-r": ("--run", False),
}  # fmt: skip
_INFO_TOPICS = {"all", "config", "defaults", "defaults-tree", "plugins", "searchpath"}
# Flags after which Hydra prints or reruns something instead of running the app's jobs.
_ACTION_FLAGS = {
    "--cfg", "--info", "--resolve", "--hydra-help", "--version", "--shell-completion",
    "--experimental-rerun",
}  # fmt: skip


@dataclass
class HydraArgs:
    """A command line split into Hydra overrides and Hydra flags."""

    overrides: list[str] = field(default_factory=list)
    flags: list[str] = field(default_factory=list)  # as typed, for handing back to Hydra
    options: dict[str, str | None] = field(default_factory=dict)  # canonical name -> value

    @property
    def acts(self) -> bool:
        """Whether Hydra will print (or rerun) something instead of running jobs."""
        return bool(_ACTION_FLAGS & set(self.options))


def parse_args(args: Sequence[str]) -> HydraArgs:
    """Split ``args`` as Hydra's own argument parser would; unknown flags are ConfigErrors."""
    parsed = HydraArgs()
    items = list(args)
    index = 0
    while index < len(items):
        arg = items[index]
        name, has_value, value = arg.partition("=")
        if name in _FLAGS and (arg.startswith("-")):
            canonical, takes = _FLAGS[name]
            if takes is True and not has_value:
                index += 1
                if index >= len(items):
                    raise ConfigError(f"option {name} needs a value")
                value = items[index]
                parsed.flags += [name, value]
            elif takes == "?" and not has_value and items[index + 1 : index + 2] and (
                items[index + 1] in _INFO_TOPICS
            ):
                index += 1
                value = items[index]
                parsed.flags += [name, value]
            else:
                parsed.flags.append(arg)
            parsed.options[canonical] = value if (has_value or takes) else None
            if canonical == "--experimental-rerun" and not Path(value).is_file():
                raise ConfigError(f"--experimental-rerun {value}: no such file")
        elif arg.startswith("-"):
            known = sorted({canonical for canonical, _ in _FLAGS.values()})
            raise ConfigError(f"unknown option {arg!r}; Hydra's flags are: {', '.join(known)}")
        else:
            _check_override_text(arg)
            parsed.overrides.append(arg)
        index += 1
    return parsed


@lru_cache(maxsize=4096)
def override_key(override: str) -> str:
    """The key (or config group) of an override, as Hydra's parser reads it: ``lr`` for
    ``lr=0.1``, ``+lr=0.1`` and ``~lr``; ``hydra/launcher`` for ``hydra/launcher=joblib``."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    with translate_errors():
        return OverridesParser.create().parse_override(override).key_or_group


def sweep_overrides(overrides: Sequence[str]) -> list[str]:
    """The overrides that give several values (``lr=0.1,1``, ``range()``, ``glob()``...)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    with translate_errors():
        parsed = OverridesParser.create().parse_overrides(list(overrides))
    return [o.input_line for o in parsed if o.is_sweep_override()]


def _check_override_text(arg: str) -> None:
    if len(arg) > MAX_OVERRIDE_CHARS:
        raise ConfigError(
            f"override {arg[:40]!r}... is {len(arg)} characters; the limit is {MAX_OVERRIDE_CHARS}"
        )
    if not arg.isascii():
        bad = next(ch for ch in arg if not ch.isascii())
        raise ConfigError(f"override {arg!r} holds the non-ASCII character {bad!r}; use ASCII")


@contextmanager
def hydra_context(args: HydraArgs | None = None) -> Iterator[None]:
    """Hydra's compose context on the packaged configs (or ``--config-path``)."""
    from hydra import initialize_config_dir, initialize_config_module

    config_path = (args.options.get("--config-path") if args else None) or None
    with translate_errors():
        if config_path:
            init = initialize_config_dir(str(Path(config_path).resolve()), version_base="1.3")
        else:
            init = initialize_config_module(CONFIG_MODULE, version_base="1.3")
        with init:
            yield


def compose_job(
    overrides: Sequence[str], args: HydraArgs | None = None, keep_hydra: bool = False
) -> DictConfig:
    """The resolved config, its group choices recorded in ``choices``; call inside
    :func:`hydra_context`.

    ``args`` carries ``--config-dir`` (added to the search path, as Hydra does) and
    ``--config-name``; ``keep_hydra`` keeps the ``hydra`` node.
    """
    from hydra import compose

    options = args.options if args else {}
    config_dir = options.get("--config-dir")
    search = [f"hydra.searchpath=[file://{Path(config_dir).resolve()}]"] if config_dir else []
    with translate_errors():
        cfg = compose(
            options.get("--config-name") or "config",
            overrides=[*search, *overrides],
            return_hydra_config=True,
        )
    record_choices(cfg, cfg.hydra.runtime.choices)
    if not keep_hydra:
        with open_dict(cfg):
            del cfg["hydra"]
    return cfg


def record_choices(cfg: DictConfig, choices: DictConfig) -> None:
    """Record the option chosen in each config group (Hydra's runtime choices) in
    ``cfg.choices``, where the run's id reads them."""
    for group in CHOICE_GROUPS:
        cfg.choices[group] = str(choices[group])


def compose_config(overrides: Sequence[str] = (), config_dir: str | None = None) -> DictConfig:
    """The resolved config for ``overrides`` (choices recorded), via the compose API."""
    args = HydraArgs(options={"--config-dir": config_dir} if config_dir else {})
    with hydra_context(args):
        return compose_job(overrides, args)


def launch(args: Sequence[str], multirun: bool = False) -> None:
    """Run the Hydra app as if called as ``normbench [--multirun] ARGS``."""
    argv = ["normbench", *(["--multirun"] if multirun else []), *args]
    _task_errors.clear()
    try:
        with _patched_argv(argv), translate_errors():
            _hydra_main()
    except (ValueError, RuntimeError) as error:
        # Optuna's sweeper ended after the last trial without a best one (see _OPTUNA_ENDS);
        # the jobs' records hold what happened to each, and the sweep's summary follows.
        if isinstance(error, ConfigError) or not multirun or str(error) not in _OPTUNA_ENDS:
            raise
        print(_OPTUNA_ENDS[str(error)], file=sys.stderr)
    if _task_errors:
        raise _task_errors.pop()


# Hydra's Optuna sweeper records a job that returns None (every run failed or diverged: see
# jobs.run_job) as a failed trial and goes on; it then ends with one of these errors, instead
# of writing the best parameters, when every trial failed, or when the grid sampler's last
# trial did (it stops the study outside a callback).
_OPTUNA_ENDS = {
    "No trials are completed yet.": "no trial ended with a finite objective: no best parameters",
    "`Study.stop` is supposed to be invoked inside an objective function or a callback.": (
        "the grid sampler's last trial ended without a finite objective: no best parameters"
    ),
}
# A single run's exception, carried past Hydra (which would print its own banner) to launch().
_task_errors: list[Exception] = []


@hydra.main(version_base="1.3", config_path=f"pkg://{CONFIG_MODULE}", config_name="config")
def _hydra_main(cfg: DictConfig) -> float | None:
    from normbench import results
    from normbench.engine.lifecycle import RunClaimedError, run_experiment
    from normbench.jobs import run_job
    from normbench.run_summary import print_run

    hydra_cfg = HydraConfig.get()
    record_choices(cfg, hydra_cfg.runtime.choices)
    if hydra_cfg.mode == RunMode.MULTIRUN:
        overrides = list(hydra_cfg.overrides.task)
        return run_job(cfg, overrides, Path(hydra_cfg.runtime.output_dir))
    try:
        print_run(run_experiment(cfg))
    except RunClaimedError as error:  # the CLI names the process that holds the run
        if not hasattr(error, "run_path"):
            error.run_path = Path(cfg.results_dir) / results.run_id(cfg)
        _task_errors.append(error)
    except Exception as error:
        _task_errors.append(error)
    return None


@contextmanager
def translate_errors() -> Iterator[None]:
    """Re-raise Hydra's, OmegaConf's and PyYAML's errors about user input as one line."""
    previous = os.environ.get("HYDRA_FULL_ERROR")
    os.environ["HYDRA_FULL_ERROR"] = "1"  # let exceptions reach us instead of Hydra's printer
    try:
        yield
    except MissingConfigException as error:
        raise ConfigError(_missing_config_message(error)) from None
    except OverrideParseException as error:
        first = str(error).strip().splitlines()[0]
        raise ConfigError(
            f"cannot parse override {error.override!r}: {first} "
            "(quote a value holding '=' or spaces: key='a=b')"
        ) from None
    except (HydraException, OmegaConfBaseException) as error:
        raise ConfigError(_one_line(error)) from None
    except yaml.YAMLError as error:
        raise ConfigError(_yaml_message(error)) from None
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


def _yaml_message(error: yaml.YAMLError) -> str:
    """``invalid YAML in <file> line 3: expected ',' or ']'`` from PyYAML's long report."""
    mark = getattr(error, "problem_mark", None)
    problem = getattr(error, "problem", None) or str(error).strip().splitlines()[0]
    if mark is None:
        return f"invalid YAML: {problem}"
    return f"invalid YAML in {mark.name} line {mark.line + 1}: {problem}"


# Hydra's report of an OmegaConf error inside a config file: the file, then OmegaConf's lines.
_IN_FILE = re.compile(r"In '(?P<file>[^']+)': \w+ raised while composing config:$")
_FULL_KEY = re.compile(r"^\s*full_key: (?P<key>\S+)$", re.MULTILINE)
_OBJECT_TYPE = re.compile(r"^\s*object_type=(?P<type>\w+)$", re.MULTILINE)


def _one_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines() or [type(error).__name__]
    message = lines[0]
    if (found := _IN_FILE.match(message)) and len(lines) > 1:
        return _in_file_message(found["file"], lines[1].strip(), str(error))
    cause = error.__cause__
    if isinstance(cause, OmegaConfBaseException):
        key = getattr(cause, "full_key", None)
        detail = str(cause).strip().splitlines()[0]
        if "not in struct" in str(cause) or "Could not override" in message or (
            "not in '" in detail
        ):
            schema = getattr(cause, "object_type", None)
            return unknown_key_message(key or message.split("'")[1], schema)
        return f"{message}: {detail}"
    return message


def _in_file_message(file: str, detail: str, text: str) -> str:
    """``config model/extra: unknown config key 'model.width'; the chosen model reads: ...``
    for a key a config file sets that its schema lacks; else the file and OmegaConf's line."""
    key, typed = _FULL_KEY.search(text), _OBJECT_TYPE.search(text)
    if key and "not in" in detail:
        schemas = group_schemas().get(key["key"].split(".")[0], {}).values()
        schema = next((s for s in schemas if typed and s.__name__ == typed["type"]), None)
        return f"config {file}: {unknown_key_message(key['key'], schema)}"
    return f"config {file}: {detail}"


@contextmanager
def _patched_argv(argv: list[str]) -> Iterator[None]:
    saved = sys.argv
    sys.argv = argv
    try:
        yield
    finally:
        sys.argv = saved
