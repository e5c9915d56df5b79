"""The typed schema of a normbench experiment, and the checks it cannot express.

The top-level :class:`Config` holds the run's scalars; each config group (model, norm,
dataset, optimizer) holds one option whose schema is that option's own dataclass, declared
next to the code that builds it (``norms``, ``models``, ``datasets.py``, ``engine/train.py``)
and stored here in Hydra's ConfigStore as ``schema/<group>/<name>``. The YAML files under
``configs/`` extend those schemas and hold every default. So ``norm=batch norm.num_groups=4``
is an error naming the settings batch norm reads, and ``lr=abc`` is not a silent string.

A field with ``metadata={"identity": False}`` says where files are or how a run executes
(results_dir, dataset.root, device, threads...): it is recorded in config.yaml but is not part
of the run's identity (see results.run_id).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from normbench.datasets import dataset_schemas
from normbench.engine.train import check_optimizer, optimizer_schemas
from normbench.errors import ConfigError, choices_error
from normbench.models import model_schemas
from normbench.norms import check_norm, get_norm_spec, norm_names
from normbench.preflight import check_path_names

_RUNTIME = {"identity": False}
DEVICES = ("auto", "cpu", "cuda", "mps")


@dataclass
class Choices:
    """The option chosen in each config group (``ioffe_mlp``, ``batch_frozen``...), recorded
    when the config is composed: the readable part of a run's id."""

    model: str = MISSING
    norm: str = MISSING
    dataset: str = MISSING
    optimizer: str = MISSING


@dataclass
class StackMember:
    """One run of a stacked group job: its own lr and seed (the rest is the job's)."""

    lr: float = MISSING
    seed: int = MISSING


@dataclass
class Config:
    model: Any = MISSING
    norm: Any = MISSING
    dataset: Any = MISSING
    optimizer: Any = MISSING
    lr: float = MISSING
    batch_size: int = MISSING
    epochs: int = MISSING
    seed: int = MISSING
    divergence_factor: float = MISSING  # loss above this times the first step's: diverged
    stall_margin: float = MISSING  # final train loss not this fraction below a constant's: stalled
    device: str = field(default=MISSING, metadata=_RUNTIME)  # auto | cpu | cuda | mps
    threads: int = field(default=MISSING, metadata=_RUNTIME)  # torch CPU threads per run
    results_dir: str = field(default=MISSING, metadata=_RUNTIME)
    quiet: bool = field(default=MISSING, metadata=_RUNTIME)
    # Output requests: a finished run without the requested output is not complete.
    diagnostics: bool = field(default=MISSING, metadata=_RUNTIME)
    diagnostics_every: int = field(default=MISSING, metadata=_RUNTIME)
    skip_done: bool = field(default=MISSING, metadata=_RUNTIME)  # sweeps set it
    keep_checkpoints: bool = field(default=MISSING, metadata=_RUNTIME)  # keep checkpoint.pt
    checkpoint_seconds: float = field(default=MISSING, metadata=_RUNTIME)  # 0: every epoch
    choices: Choices = field(default_factory=Choices, metadata=_RUNTIME)
    # Sweeps: the runs of one setup that differ in lr and seed train as one stacked model.
    stack: bool = field(default=MISSING, metadata=_RUNTIME)
    stack_max_members: int = field(default=MISSING, metadata=_RUNTIME)  # larger groups split
    stack_max_mib: float | None = field(default=MISSING, metadata=_RUNTIME)  # None: free/2
    stack_members: list[StackMember] = field(default=MISSING, metadata=_RUNTIME)  # set by sweep


def group_schemas() -> dict[str, dict[str, type]]:
    """``{group: {option name: schema}}`` for every config group, from the registries."""
    norms = {name: get_norm_spec(name).settings for name in norm_names()}
    return {
        "model": model_schemas(),
        "norm": norms,
        "dataset": dataset_schemas(),
        "optimizer": optimizer_schemas(),
    }


def register_configs() -> None:
    """Store the schemas for ``configs/``: ``normbench_schema`` and ``schema/<group>/<name>``."""
    store = ConfigStore.instance()
    store.store(name="normbench_schema", node=Config)
    for group, schemas in group_schemas().items():
        for name, schema in schemas.items():
            store.store(group=f"schema/{group}", name=name, node=schema)


def validate(cfg: DictConfig) -> None:
    """Everything the composed config must satisfy on its own; raises ConfigError.

    Each group node is checked against the schema of the option it names (a key that option
    does not read is an error naming the ones it does), then every float must be finite, then
    ranges. What needs the data's shapes or the model is checked by ``checks.check_run``.
    """
    _check_node(cfg, Config, "")
    for group, schemas in group_schemas().items():
        node = cfg[group]
        if node.get("name") not in schemas:
            raise choices_error(group, node.get("name"), list(schemas))
        _check_node(node, schemas[node.name], f"{group}.")
    _check_finite(cfg, "")
    checks = [
        (cfg.lr > 0, f"lr must be > 0; got {cfg.lr}"),
        (cfg.batch_size >= 1, f"batch_size must be >= 1; got {cfg.batch_size}"),
        (cfg.epochs >= 1, f"epochs must be >= 1; got {cfg.epochs}"),
        (
            cfg.diagnostics_every >= 1,
            f"diagnostics_every must be >= 1; got {cfg.diagnostics_every}",
        ),
        (cfg.divergence_factor > 1, "divergence_factor must be > 1"),
        (cfg.stack_max_members >= 1, "stack_max_members must be >= 1"),
        (cfg.stack_max_mib is None or cfg.stack_max_mib > 0, "stack_max_mib must be > 0"),
        (cfg.checkpoint_seconds >= 0, "checkpoint_seconds must be >= 0"),
        (all(m.lr > 0 for m in cfg.stack_members), "every stack_members lr must be > 0"),
        (0 <= cfg.stall_margin < 1, f"stall_margin must be in [0, 1); got {cfg.stall_margin}"),
    ]
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)
    if cfg.device not in DEVICES:
        raise choices_error("device", cfg.device, DEVICES)
    if cfg.threads < 1:  # whether they fit the cores is the job's check, on its machine
        raise ConfigError(f"threads must be at least 1, got {cfg.threads}")
    check_path_names(Path(cfg.results_dir), "results_dir")
    check_norm(cfg.norm)
    check_optimizer(cfg.optimizer)


def unknown_key_message(key: str, schema: type | None = None) -> str:
    """``unknown config key 'norm.foo'; the chosen norm reads: norm.name, norm.eps, ...``.

    ``schema`` is the dataclass of the node holding the key, when the caller knows it.
    """
    *parents, _ = key.split(".")
    where = "".join(f"{p}." for p in parents)
    if schema is None and not parents:
        schema = Config
    if schema is None or not is_dataclass(schema):  # outside the schema (e.g. hydra.*)
        return f"unknown config key {key!r}"
    valid = ", ".join(where + f.name for f in fields(schema))
    if len(parents) == 1 and parents[0] in group_schemas():
        return f"unknown config key {key!r}; the chosen {parents[0]} reads: {valid}"
    return f"unknown config key {key!r}; valid keys: {valid}"


def _check_node(node: DictConfig, schema: type, prefix: str) -> None:
    """``node`` has exactly the fields of ``schema`` (``+key``/``~key`` and user YAMLs included)."""
    expected = {f.name for f in fields(schema)}
    for key in node:
        if key not in expected:
            raise ConfigError(unknown_key_message(f"{prefix}{key}", schema))
    for name in (f.name for f in fields(schema)):  # in the schema's order: the first missing
        if name not in node:
            raise ConfigError(_lacks_message(node, schema, prefix, name))
    if OmegaConf.get_type(node) is not schema:  # an untyped node (a user's YAML): type it
        try:
            OmegaConf.merge(OmegaConf.structured(schema), node)
        except OmegaConfBaseException as error:
            detail = str(error).strip().splitlines()[0]
            raise ConfigError(f"{prefix}{getattr(error, 'key', '')}: {detail}") from None
    missing = [name for name in expected if OmegaConf.is_missing(node, name)]
    if missing:
        raise ConfigError(f"config key {prefix}{missing[0]!r} has no value; set it")


def _lacks_message(node: DictConfig, schema: type, prefix: str, name: str) -> str:
    """``the norm lacks config key 'norm.affine', which the schema of norm 'batch'
    requires; ...`` for a key a user's YAML leaves out (or an override removed)."""
    key = f"{prefix}{name}"
    group = prefix.rstrip(".")
    if group in group_schemas():
        option = node.get("name")
        return (
            f"the {group} lacks config key {key!r}, which the schema of {group} {option!r} "
            f"requires: set it in your {group} YAML, or take the defaults with "
            f"'- /{group}/{option}@_here_' in its defaults list"
        )
    return f"config key {key!r} is required; it cannot be removed"


def _check_finite(node: Any, prefix: str) -> None:
    for key, value in node.items():
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"{prefix}{key} must be a finite number; got {value}")
        if hasattr(value, "items"):
            _check_finite(value, f"{prefix}{key}.")
