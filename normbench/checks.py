"""Everything checked before a run trains, without loading data or choosing a device.

``check_run`` is what sweep planning calls for every job and what a run calls first: the
schema (``config.validate``), the dataset's settings and files (not their contents), and the
model built on the ``meta`` device, so shapes, group counts, norm placement and whether the
stacked engine mirrors every module are checked with no real weights. Bad input raises
ConfigError. What depends on the machine a run lands on (threads, device, the results folder,
the data's real size) is the job's check (normbench.engine.lifecycle), not planning's.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from omegaconf import DictConfig

from normbench.config import validate
from normbench.datasets import DataInfo, describe_dataset
from normbench.engine.trainer import stack_unsupported
from normbench.errors import ConfigError
from normbench.models import build_model
from normbench.norms import get_norm_spec, is_frozen


@dataclass(frozen=True)
class RunShape:
    """What checking a run found out: its data's shapes and its model's size."""

    data: DataInfo
    num_params: int


def check_run(cfg: DictConfig) -> RunShape:
    """Raise ConfigError for anything that would make this run fail as bad input."""
    validate(cfg)
    return check_setup(cfg)


def check_setup(cfg: DictConfig) -> RunShape:
    """The checks beyond the schema (on a validated config): data settings and files, the
    batch size against the data and the norm, the model built on the meta device."""
    data = describe_dataset(cfg.dataset)
    if cfg.batch_size > data.train_examples:
        raise ConfigError(
            f"batch_size {cfg.batch_size} exceeds the {data.train_examples} training examples"
        )
    if cfg.batch_size < 2 and get_norm_spec(cfg.norm.name).batch_stats and not is_frozen(cfg.norm):
        raise ConfigError(
            f"norm {cfg.norm.name!r} normalizes over the batch: batch_size must be at least 2"
        )
    get_norm_spec(cfg.norm.name).check_batch(cfg.norm, cfg.batch_size)  # ghost batch: V | N
    # The builders check shapes as they go (a flatten size, images too small for the convs).
    # No forward pass: on the meta device batch norm's kernels import torch._dynamo (1.3 s).
    with torch.device("meta"):
        model = build_model(cfg.model, cfg.norm, data.input_shape, data.num_outputs)
    reason = stack_unsupported(model)  # every run trains as a member of a stack
    if reason is not None:
        raise ConfigError(f"model {cfg.model.name!r} with norm {cfg.norm.name!r}: {reason}")
    return RunShape(data, sum(p.numel() for p in model.parameters()))
