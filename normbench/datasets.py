"""Datasets as in-memory CPU tensors: train, validation and (where the dataset has one) test.

Every loader returns the dataset's own splits; ``load_dataset`` then does the same for all of
them: keep at most ``limit`` training examples, hold out ``val_fraction`` of them for
validation (both by a permutation seeded from the run's seed), scale uint8 pixels to [0, 1],
resize images to ``image_size`` and preprocess the inputs with statistics of the training
split only (document 003), reused for validation and test.
"""

from __future__ import annotations

import math
import pickle
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from omegaconf import MISSING
from torch import Tensor

from normbench.errors import ConfigError, choices_error

Split = tuple[Tensor, Tensor]


# ----------------------------------------------------------------------------- settings
# One schema per kind of dataset; defaults live in configs/dataset/*.yaml. Fields marked
# identity=False say where files are, not what is trained on: moving the data keeps run ids.


@dataclass
class DatasetSettings:
    """What every dataset reads: the splits and the preprocessing (the digits dataset)."""

    name: str = MISSING
    preprocess: str = MISSING  # standardize | minmax | none
    val_fraction: float = MISSING  # share of the training split held out for validation
    limit: int | None = MISSING  # keep at most this many training examples
    image_size: int | None = MISSING  # resize images to image_size x image_size


@dataclass
class ToySettings(DatasetSettings):
    data_seed: int = MISSING  # the synthetic task (prototypes or teacher, and its data)
    task: str = MISSING  # classification | regression
    shape: list[int] = MISSING
    num_classes: int = MISSING
    train_size: int = MISSING
    test_size: int = MISSING
    noise: float = MISSING


@dataclass
class ToySequenceSettings(DatasetSettings):
    data_seed: int = MISSING  # the synthetic task (class cues and noise)
    steps: int = MISSING  # T: sequence length
    features: int = MISSING  # F: features per step
    num_classes: int = MISSING
    train_size: int = MISSING
    test_size: int = MISSING
    noise: float = MISSING


@dataclass
class TorchvisionSettings(DatasetSettings):
    root: str = field(default=MISSING, metadata={"identity": False})
    download: bool = field(default=MISSING, metadata={"identity": False})

TASKS = ("classification", "regression")

_DIGITS_TEST_FRACTION = 0.2
_DIGITS_SPLIT_SEED = 0  # the test split is the same for every run seed, so scores compare
_TEACHER_WIDTH = 32  # hidden units of the toy regression's random teacher network

# What torchvision raises for missing files, failed downloads and corrupt or truncated files
# (its idx reader validates the format with asserts; CIFAR batches are pickles).
_READ_ERRORS = (
    RuntimeError,
    OSError,
    EOFError,
    pickle.UnpicklingError,
    ValueError,
    TypeError,
    KeyError,
    AssertionError,
)


@dataclass
class DataSplits:
    """Inputs are float32; targets are int64 class indices or float32 of shape (N, 1)."""

    train: Split
    val: Split
    test: Split | None
    input_shape: tuple[int, ...]  # (C, H, W) images, (T, F) sequences, (F,) feature vectors
    num_outputs: int  # classes, or 1 for regression
    task: str  # "classification" | "regression"


@dataclass
class _Source:
    """A dataset's own splits as a loader returns them (uint8 images are scaled later)."""

    train: Split
    test: Split | None
    num_outputs: int
    task: str = "classification"


@dataclass(frozen=True)
class SourceInfo:
    """What a dataset's training split looks like, known without reading it."""

    input_shape: tuple[int, ...]
    num_outputs: int
    task: str
    train_examples: int


def _toy_info(cfg: Any) -> SourceInfo:
    shape = tuple(cfg.shape)
    if len(shape) not in (1, 3) or min(shape) < 1:
        raise ConfigError(
            f"dataset.shape must be [features] or [channels, height, width] of positive sizes, "
            f"got {list(shape)}"
        )
    if cfg.task not in TASKS:
        raise choices_error("dataset.task", cfg.task, TASKS)
    _check_synthetic(cfg)
    classify = cfg.task == "classification"
    return SourceInfo(shape, cfg.num_classes if classify else 1, cfg.task, cfg.train_size)


def _check_synthetic(cfg: Any) -> None:
    """The sizes and noise every synthetic dataset reads."""
    if cfg.num_classes < 2:
        raise ConfigError(f"dataset.num_classes must be at least 2, got {cfg.num_classes}")
    if cfg.train_size < 2 or cfg.test_size < 0:
        raise ConfigError(
            f"dataset.train_size must be at least 2 and dataset.test_size at least 0, "
            f"got {cfg.train_size} and {cfg.test_size}"
        )
    if cfg.noise < 0:
        raise ConfigError(f"dataset.noise must be at least 0, got {cfg.noise}")


def _load_toy(cfg: Any) -> _Source:
    shape = tuple(cfg.shape)
    g = torch.Generator().manual_seed(cfg.data_seed)  # the task, fixed across run seeds
    n = cfg.train_size + cfg.test_size
    if cfg.task == "classification":
        x, y = _class_prototypes(shape, cfg.num_classes, n, cfg.noise, g)
        num_outputs = cfg.num_classes
    else:
        x, y = _random_teacher(shape, n, cfg.noise, g)
        num_outputs = 1
    train = (x[: cfg.train_size], y[: cfg.train_size])
    test = (x[cfg.train_size :], y[cfg.train_size :]) if cfg.test_size else None
    return _Source(train, test, num_outputs, cfg.task)


def _class_prototypes(
    shape: tuple[int, ...], num_classes: int, n: int, noise: float, g: torch.Generator
) -> Split:
    """One fixed random prototype per class plus Gaussian noise of std ``noise``."""
    # Prototypes of norm about 3 put class means ~4 noise stds apart in any dimension: at
    # noise=1 an MLP gets well above chance within an epoch and levels off near 80%.
    prototypes = torch.randn(num_classes, *shape, generator=g) * (3 / math.sqrt(math.prod(shape)))
    y = torch.randint(num_classes, (n,), generator=g)
    x = prototypes[y] + noise * torch.randn(n, *shape, generator=g)
    return x, y


def _random_teacher(shape: tuple[int, ...], n: int, noise: float, g: torch.Generator) -> Split:
    """Targets from a fixed random tanh network (std ~0.6) plus Gaussian noise of 0.1 * noise."""
    dim = math.prod(shape)
    w1 = torch.randn(dim, _TEACHER_WIDTH, generator=g) / math.sqrt(dim)
    w2 = torch.randn(_TEACHER_WIDTH, 1, generator=g) / math.sqrt(_TEACHER_WIDTH)
    x = torch.randn(n, *shape, generator=g)
    y = torch.tanh(x.reshape(n, dim) @ w1) @ w2 + 0.1 * noise * torch.randn(n, 1, generator=g)
    return x, y


def _toy_sequence_info(cfg: Any) -> SourceInfo:
    if cfg.steps < 1 or cfg.features < 1:
        raise ConfigError(
            f"dataset.steps and dataset.features must be at least 1, got {cfg.steps} and "
            f"{cfg.features}"
        )
    _check_synthetic(cfg)
    shape = (cfg.steps, cfg.features)
    return SourceInfo(shape, cfg.num_classes, "classification", cfg.train_size)


def _load_toy_sequence(cfg: Any) -> _Source:
    """Sequences (N, T, F) of Gaussian noise of std ``noise`` whose class is only visible at
    the first step, which holds the class's fixed random cue (norm ~3, as toy's prototypes):
    a recurrent model must carry it through the T - 1 later steps."""
    g = torch.Generator().manual_seed(cfg.data_seed)
    n = cfg.train_size + cfg.test_size
    cues = torch.randn(cfg.num_classes, cfg.features, generator=g) * (3 / math.sqrt(cfg.features))
    y = torch.randint(cfg.num_classes, (n,), generator=g)
    x = cfg.noise * torch.randn(n, cfg.steps, cfg.features, generator=g)
    x[:, 0] += cues[y]
    train = (x[: cfg.train_size], y[: cfg.train_size])
    test = (x[cfg.train_size :], y[cfg.train_size :]) if cfg.test_size else None
    return _Source(train, test, cfg.num_classes)


def _load_digits(cfg: Any) -> _Source:
    from sklearn.datasets import load_digits  # importing scikit-learn takes ~1 s: only here

    digits = load_digits()
    x = torch.from_numpy(digits.images).float().unsqueeze(1)  # (1797, 1, 8, 8), values 0..16
    y = torch.from_numpy(digits.target).long()
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(_DIGITS_SPLIT_SEED))
    n_test = round(_DIGITS_TEST_FRACTION * len(y))
    test, train = order[:n_test], order[n_test:]
    return _Source((x[train], y[train]), (x[test], y[test]), num_outputs=10)


def _torchvision_class(class_name: str) -> type:
    import torchvision.datasets  # slow import that only these datasets need

    return getattr(torchvision.datasets, class_name)


def _torchvision_info(class_name: str, shape: tuple[int, ...], train: int, cfg: Any) -> SourceInfo:
    """The dataset's known shapes; its files must be there unless they are to be downloaded."""
    folder, missing = _missing_files(cfg, _torchvision_class(class_name))
    if missing and not cfg.download:
        raise ConfigError(
            f"dataset {cfg.name}: {', '.join(missing)} not found in {folder}; "
            f"set dataset.download=true to download them, or place the files there"
        )
    return SourceInfo(shape, 10, "classification", train)


def _load_torchvision(class_name: str, cfg: Any) -> _Source:
    cls = _torchvision_class(class_name)
    try:
        train, test = (cls(cfg.root, train=flag, download=cfg.download) for flag in (True, False))
        source = _Source(_tensors(train), _tensors(test), num_outputs=len(train.classes))
    except _READ_ERRORS as err:
        raise _unreadable_files(cfg, cls, err) from err
    return source


def _tensors(dataset: Any) -> Split:
    """A torchvision dataset's in-memory images (N, C, H, W) and labels, uint8 and int64."""
    x = torch.as_tensor(dataset.data)
    x = x.unsqueeze(1) if x.ndim == 3 else x.permute(0, 3, 1, 2)  # MNIST (N,H,W), CIFAR NHWC
    y = torch.as_tensor(dataset.targets, dtype=torch.long)
    if len(x) != len(y):
        raise ValueError(f"{len(x)} images but {len(y)} labels")
    return x, y


class DataError(RuntimeError):
    """Data files that exist but cannot be read: that run fails, the others of a sweep go on."""


def _missing_files(cfg: Any, cls: type) -> tuple[Path, list[str]]:
    """The folder torchvision reads ``cls`` from, and the files missing there."""
    if hasattr(cls, "base_folder"):  # CIFAR-10
        folder = Path(cfg.root).expanduser().resolve() / cls.base_folder
        files = [name for name, _ in cls.train_list + cls.test_list] + [cls.meta["filename"]]
    else:
        folder = Path(cfg.root).expanduser().resolve() / cls.__name__ / "raw"
        files = [name.removesuffix(".gz") for name, _ in cls.resources]
    return folder, [name for name in files if not (folder / name).is_file()]


def _unreadable_files(cfg: Any, cls: type, err: Exception) -> Exception:
    """One line: where torchvision looked, what is wrong there and how to get the files."""
    folder, missing = _missing_files(cfg, cls)
    if missing and cfg.download:
        return ConfigError(
            f"dataset {cfg.name}: download failed ({_one_line(err)}) and {', '.join(missing)} "
            f"not found in {folder}; place the files there"
        )
    if missing:
        return ConfigError(
            f"dataset {cfg.name}: {', '.join(missing)} not found in {folder}; "
            f"set dataset.download=true to download them, or place the files there"
        )
    return DataError(
        f"dataset {cfg.name}: corrupt or incomplete files in {folder} ({_one_line(err)}); "
        f"delete them and set dataset.download=true, or replace them with intact copies"
    )


def _one_line(err: Exception, max_chars: int = 200) -> str:
    text = " ".join(str(err).split()) or type(err).__name__
    return text if len(text) <= max_chars else text[: max_chars - 3] + "..."


@dataclass(frozen=True)
class DatasetSpec:
    settings: type  # the schema of its config node
    info: Callable[[Any], SourceInfo]  # checks the settings (and that files exist)
    load: Callable[[Any], _Source]


def _torchvision(class_name: str, shape: tuple[int, ...], train: int) -> DatasetSpec:
    return DatasetSpec(
        TorchvisionSettings,
        partial(_torchvision_info, class_name, shape, train),
        partial(_load_torchvision, class_name),
    )


_DIGITS_TRAIN = 1797 - round(_DIGITS_TEST_FRACTION * 1797)
# What each dataset is: configs/dataset/<name>.yaml says (and `normbench list` shows).
_DATASETS: dict[str, DatasetSpec] = {
    "toy": DatasetSpec(ToySettings, _toy_info, _load_toy),
    "digits": DatasetSpec(
        DatasetSettings,
        lambda cfg: SourceInfo((1, 8, 8), 10, "classification", _DIGITS_TRAIN),
        _load_digits,
    ),
    "mnist": _torchvision("MNIST", (1, 28, 28), 60000),
    "fashion_mnist": _torchvision("FashionMNIST", (1, 28, 28), 60000),
    "cifar10": _torchvision("CIFAR10", (3, 32, 32), 50000),
    "toy_sequence": DatasetSpec(ToySequenceSettings, _toy_sequence_info, _load_toy_sequence),
}


def _standardize_stats(x: Tensor) -> tuple[Tensor, Tensor]:
    dims = _stat_dims(x)
    return x.mean(dims, keepdim=True), x.std(dims, correction=0, keepdim=True)


def _minmax_stats(x: Tensor) -> tuple[Tensor, Tensor]:
    dims = _stat_dims(x)
    low = x.amin(dims, keepdim=True)
    return low, x.amax(dims, keepdim=True) - low


def _identity_stats(x: Tensor) -> tuple[Tensor, Tensor]:
    return torch.zeros(()), torch.ones(())


def _stat_dims(x: Tensor) -> tuple[int, ...]:
    """Per channel for images (N, C, H, W), per feature for sequences (N, T, F) (over the
    examples and the steps) and for vectors (N, F)."""
    return {4: (0, 2, 3), 3: (0, 1)}.get(x.ndim, (0,))


# name -> statistics (shift, scale) fitted on the training inputs: x becomes (x - shift) / scale
_PREPROCESSORS: dict[str, Callable[[Tensor], tuple[Tensor, Tensor]]] = {
    "standardize": _standardize_stats,
    "minmax": _minmax_stats,
    "none": _identity_stats,
}


def dataset_names() -> list[str]:
    """The names ``dataset.name`` accepts."""
    return list(_DATASETS)


def dataset_schemas() -> dict[str, type]:
    """The schema of each dataset's config node, by dataset name."""
    return {name: spec.settings for name, spec in _DATASETS.items()}


@dataclass(frozen=True)
class DataInfo:
    """A run's data as it will be loaded: shapes and sizes, known before loading."""

    input_shape: tuple[int, ...]
    num_outputs: int
    task: str
    train_examples: int  # after the limit and the validation hold-out


def describe_dataset(cfg: Any) -> DataInfo:
    """Check ``cfg`` and say what :func:`load_dataset` will give, reading no data.

    Bad settings and missing files (unless they are to be downloaded) raise ConfigError.
    """
    spec = _spec(cfg)
    source = spec.info(cfg)
    shape = source.input_shape
    if cfg.image_size is not None:
        if len(shape) != 3:
            kind = "sequences (T, F)" if len(shape) == 2 else "feature vectors"
            raise ConfigError(
                f"dataset.image_size resizes images, but dataset {cfg.name} gives {kind} "
                f"of shape {list(shape)}; set dataset.image_size=null"
            )
        shape = (shape[0], cfg.image_size, cfg.image_size)
    n_train, _ = _split_sizes(source.train_examples, cfg.val_fraction, cfg.limit)
    return DataInfo(shape, source.num_outputs, source.task, n_train)


def _spec(cfg: Any) -> DatasetSpec:
    if cfg.name not in _DATASETS:
        raise choices_error("dataset", cfg.name, dataset_names())
    if cfg.preprocess not in _PREPROCESSORS:
        raise choices_error("dataset.preprocess", cfg.preprocess, list(_PREPROCESSORS))
    if not 0 < cfg.val_fraction < 1:
        raise ConfigError(f"dataset.val_fraction must be between 0 and 1, got {cfg.val_fraction}")
    if cfg.limit is not None and cfg.limit < 2:
        raise ConfigError(f"dataset.limit must be at least 2 (or null), got {cfg.limit}")
    if cfg.image_size is not None and cfg.image_size < 1:
        raise ConfigError(f"dataset.image_size must be positive (or null), got {cfg.image_size}")
    return _DATASETS[cfg.name]


def load_dataset(cfg: Any, seed: int) -> DataSplits:
    """Load the dataset of config node ``cfg`` as train/val/test CPU tensors."""
    describe_dataset(cfg)
    source = _spec(cfg).load(cfg)
    train, val = _hold_out(source.train, cfg.val_fraction, cfg.limit, seed)
    splits = [train, val] if source.test is None else [train, val, source.test]
    inputs = [_to_float(x) for x, _ in splits]
    if cfg.image_size is not None:
        inputs = [_resize(x, cfg.image_size) for x in inputs]
    shift, scale = _PREPROCESSORS[cfg.preprocess](inputs[0])
    scale = torch.where(scale > 1e-6, scale, torch.ones_like(scale))  # constant inputs: shift
    train, val, *test = [
        (((x - shift) / scale).contiguous(), y) for x, (_, y) in zip(inputs, splits, strict=True)
    ]
    return DataSplits(
        train=train,
        val=val,
        test=test[0] if test else None,
        input_shape=tuple(train[0].shape[1:]),
        num_outputs=source.num_outputs,
        task=source.task,
    )


def _hold_out(
    split: Split, val_fraction: float, limit: int | None, seed: int
) -> tuple[Split, Split]:
    """(train, val): at most ``limit`` examples in all, ``val_fraction`` of them for val."""
    x, y = split
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))[:limit]
    _, n_val = _split_sizes(len(order), val_fraction, limit)
    val, train = order[:n_val], order[n_val:]
    return (x[train], y[train]), (x[val], y[val])


def _split_sizes(n: int, val_fraction: float, limit: int | None) -> tuple[int, int]:
    """(train, validation) sizes of ``n`` examples capped at ``limit``."""
    n = min(n, limit) if limit is not None else n
    if n < 2:
        raise ConfigError(f"the training split has {n} example(s); need at least 2")
    n_val = min(max(round(val_fraction * n), 1), n - 1)
    return n - n_val, n_val


def _to_float(x: Tensor) -> Tensor:
    return x.float() / 255 if x.dtype == torch.uint8 else x.float()


def _resize(x: Tensor, size: int) -> Tensor:
    if x.shape[-2:] == (size, size):
        return x
    return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
