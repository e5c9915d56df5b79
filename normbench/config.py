"""The typed schema of a normbench experiment.

Hydra merges the YAML files under ``configs/`` into these dataclasses, so a mistyped key
(``foo=1``) or a value of the wrong type (``lr=abc``) is an error instead of a silent string.
Names (models, norms, datasets) are plain strings here and are checked by the registries that
own them, whose errors list the valid choices.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields, is_dataclass

from hydra.core.config_store import ConfigStore

from normbench.errors import ConfigError


@dataclass
class ModelConfig:
    name: str = "mlp"
    hidden: list[int] = field(default_factory=lambda: [256, 128])  # widths of hidden Linear layers
    channels: list[int] = field(default_factory=list)  # widths of Conv layers (CNNs)
    activation: str = "relu"
    norm_position: str = "before_activation"  # or "after_activation"
    dropout: float = 0.0


@dataclass
class NormConfig:
    name: str = "batch"
    eps: float = 1e-5
    momentum: float | None = 0.1  # None: cumulative moving average
    affine: bool = True
    track_running_stats: bool = True
    num_groups: int = 2
    freeze: bool = False  # batch-norm layers kept in eval mode with fixed parameters
    # batch renormalization (Ioffe 2017): plain BN for warmup_steps, then rmax/dmax ramp up
    rmax: float = 3.0
    dmax: float = 5.0
    warmup_steps: int = 500
    rmax_ramp_steps: int = 3500
    dmax_ramp_steps: int = 2000


_BATCH = ("eps", "momentum", "affine", "track_running_stats", "freeze")
_RENORM = ("rmax", "dmax", "warmup_steps", "rmax_ramp_steps", "dmax_ramp_steps")
# The NormConfig fields each norm reads (tests/test_norms.py checks that the others change
# nothing). The rest are left out of a run's identity and results row, so that, say, `none`
# runs differing only in norm.eps are one run.
NORM_SETTINGS: dict[str, tuple[str, ...]] = {
    "none": (),
    "batch": _BATCH,
    "reference_batch": _BATCH,
    "batch_renorm": (*_BATCH, *_RENORM),
    "layer": ("eps", "affine"),
    "group": ("eps", "affine", "num_groups"),
    "instance": ("eps", "momentum", "affine", "track_running_stats"),
}


@dataclass
class DatasetConfig:
    name: str = "toy"
    root: str = "data"  # where torchvision datasets look for their files
    download: bool = False
    preprocess: str = "standardize"  # standardize | minmax | none
    val_fraction: float = 0.1  # share of the training split held out for validation
    limit: int | None = None  # keep at most this many training examples
    image_size: int | None = None  # resize images to image_size x image_size
    # toy data only
    data_seed: int = 0  # the synthetic task (prototypes or teacher, and the data drawn from it)
    task: str = "classification"  # or "regression"
    shape: list[int] = field(default_factory=lambda: [1, 16, 16])
    num_classes: int = 10
    train_size: int = 2000
    test_size: int = 500
    noise: float = 1.0


@dataclass
class OptimizerConfig:
    name: str = "sgd"
    momentum: float = 0.0
    weight_decay: float = 0.0
    norm_weight_decay: bool = False  # apply weight decay to norm parameters too
    scheduler: str | None = None  # "plateau": ReduceLROnPlateau on the validation loss
    plateau_patience: int = 5
    plateau_factor: float = 0.5


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    norm: NormConfig = field(default_factory=NormConfig)
    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    lr: float = 0.1
    batch_size: int = 32
    epochs: int = 5
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | mps
    # torch CPU threads per run. One is fastest for these small models, and keeps results
    # identical whether a sweep runs its jobs one after another or in parallel.
    threads: int = 1
    results_dir: str = "results"
    quiet: bool = False
    diagnostics: bool = False  # record per-layer statistics into diagnostics.csv
    diagnostics_every: int = 10  # record every this many training steps
    skip_done: bool = False  # skip when complete results exist (sweeps set it)
    divergence_factor: float = 1e3  # loss above this times the first epoch's loss: diverged


def validate(cfg: Config) -> None:
    """What the typed schema cannot express. Raises ConfigError.

    Hydra's ``+key=value`` and ``~key`` add and remove keys even in a typed config, so the
    keys are checked against the schema first; then every float must be finite, then ranges.
    """
    _check_keys(cfg, Config, "")
    _check_finite(cfg, "")
    checks = [
        (cfg.lr > 0, f"lr must be > 0; got {cfg.lr}"),
        (cfg.batch_size >= 1, f"batch_size must be >= 1; got {cfg.batch_size}"),
        (cfg.epochs >= 1, f"epochs must be >= 1; got {cfg.epochs}"),
        (
            cfg.diagnostics_every >= 1,
            f"diagnostics_every must be >= 1; got {cfg.diagnostics_every}",
        ),
        (cfg.threads >= 1, f"threads must be >= 1; got {cfg.threads}"),
        (cfg.divergence_factor > 1, "divergence_factor must be > 1"),
        (cfg.optimizer.momentum >= 0, "optimizer.momentum must be >= 0"),
        (cfg.optimizer.weight_decay >= 0, "optimizer.weight_decay must be >= 0"),
        (
            0 < cfg.optimizer.plateau_factor < 1,
            f"optimizer.plateau_factor must be in (0, 1); got {cfg.optimizer.plateau_factor}",
        ),
        (cfg.optimizer.plateau_patience >= 0, "optimizer.plateau_patience must be >= 0"),
    ]
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)


def unknown_key_message(key: str) -> str:
    """``unknown config key 'model.foo'; valid keys: model.activation, ...``."""
    *parents, _ = key.split(".")
    node = _schema_at(parents)
    if node is None:  # outside the schema (e.g. hydra.*): no list to offer
        return f"unknown config key {key!r}"
    where = "".join(f"{p}." for p in parents)
    valid = ", ".join(where + f.name for f in fields(node))
    return f"unknown config key {key!r}; valid keys: {valid}"


def _schema_at(path: list[str]) -> type | None:
    node: type = Config
    for part in path:
        match = [f for f in fields(node) if f.name == part and is_dataclass(f.default_factory)]
        if not match:
            return None
        node = match[0].default_factory
    return node


def _check_keys(node, schema: type, prefix: str) -> None:
    expected = {f.name: f for f in fields(schema)}
    for key in node:
        if key not in expected:
            raise ConfigError(unknown_key_message(f"{prefix}{key}"))
    for name, spec in expected.items():
        if name not in node:
            raise ConfigError(f"config key {prefix}{name!r} is required; it cannot be removed")
        if is_dataclass(spec.default_factory):
            _check_keys(node[name], spec.default_factory, f"{prefix}{name}.")


def _check_finite(node, prefix: str) -> None:
    for key, value in node.items():
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"{prefix}{key} must be a finite number; got {value}")
        if hasattr(value, "items"):
            _check_finite(value, f"{prefix}{key}.")


def register_configs() -> None:
    """Register the schema so ``configs/config.yaml`` can name it in its defaults list."""
    ConfigStore.instance().store(name="normbench_schema", node=Config)
