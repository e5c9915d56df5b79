"""Datasets load through the real code paths (torchvision classes on tiny real-format files)."""

from __future__ import annotations

import pickle
from functools import cache
from importlib.resources import files

import numpy as np
import pytest
import torch

from normbench.app import compose_config
from normbench.datasets import DataError, DataSplits, dataset_names, load_dataset
from normbench.errors import ConfigError
from tests.fake_datasets import trust_fake_cifar10, write_fake_cifar10, write_fake_mnist

CONFIGS = files("normbench.configs") / "dataset"


@cache
def _composed(name: str):
    return compose_config([f"dataset={name}"]).dataset


def dataset_cfg(name: str = "toy", /, **overrides):
    """configs/dataset/<name>.yaml on its schema, as Hydra composes it, with ``overrides``."""
    cfg = _composed(name).copy()
    for key, value in overrides.items():
        cfg[key] = value
    return cfg


def assert_splits(data: DataSplits, n_train: int, n_val: int, n_test: int | None) -> None:
    assert len(data.train[0]) == len(data.train[1]) == n_train
    assert len(data.val[0]) == len(data.val[1]) == n_val
    if n_test is None:
        assert data.test is None
    else:
        assert len(data.test[0]) == len(data.test[1]) == n_test
    for x, y in [data.train, data.val] + ([data.test] if data.test else []):
        assert x.dtype == torch.float32 and x.device.type == "cpu"
        assert tuple(x.shape[1:]) == data.input_shape
        if data.task == "classification":
            assert y.dtype == torch.int64 and y.shape == (len(x),)
            assert y.min() >= 0 and y.max() < data.num_outputs
        else:
            assert y.dtype == torch.float32 and y.shape == (len(x), 1)


def test_registry_matches_config_files():
    yamls = {p.name.removesuffix(".yaml") for p in CONFIGS.iterdir() if p.name.endswith(".yaml")}
    assert set(dataset_names()) == yamls


def test_toy_default_is_image_classification():
    data = load_dataset(dataset_cfg("toy"), seed=0)
    assert (data.task, data.num_outputs, data.input_shape) == ("classification", 10, (1, 16, 16))
    assert_splits(data, 1800, 200, 500)


def test_toy_document_000_regression():
    cfg = dataset_cfg("toy", task="regression", shape=[10], train_size=100, test_size=20)
    data = load_dataset(cfg, seed=0)
    assert (data.task, data.num_outputs, data.input_shape) == ("regression", 1, (10,))
    assert_splits(data, 90, 10, 20)


def test_toy_without_test_split():
    assert load_dataset(dataset_cfg("toy", test_size=0), seed=0).test is None


def test_toy_is_deterministic_per_seed():
    a, b, c = (load_dataset(dataset_cfg("toy"), seed=s) for s in (0, 0, 1))
    for split in ("train", "val", "test"):
        assert torch.equal(getattr(a, split)[0], getattr(b, split)[0])
        assert torch.equal(getattr(a, split)[1], getattr(b, split)[1])
    # The run seed draws a different validation split from the same task and test set ...
    assert not torch.equal(a.train[0], c.train[0])
    assert torch.equal(a.test[1], c.test[1])  # (inputs differ slightly: train statistics)
    # ... while data_seed draws another task.
    other = load_dataset(dataset_cfg("toy", data_seed=1), seed=0)
    assert not torch.equal(a.test[1], other.test[1])


def test_toy_classification_is_learnable_but_not_trivial():
    data = load_dataset(dataset_cfg(), seed=0)
    x, y = data.train[0].flatten(1), data.train[1]
    class_means = torch.stack([x[y == k].mean(0) for k in range(data.num_outputs)])
    predicted = torch.cdist(data.test[0].flatten(1), class_means).argmin(1)
    accuracy = (predicted == data.test[1]).float().mean()
    assert 0.5 < accuracy < 0.97  # nearest class mean of the training split; chance is 0.1


def test_toy_regression_is_learnable():
    data = load_dataset(dataset_cfg("toy", task="regression", shape=[10]), seed=0)

    def with_bias(x):
        return torch.cat([x, torch.ones(len(x), 1)], dim=1)

    weights = torch.linalg.lstsq(with_bias(data.train[0]), data.train[1]).solution
    mse = torch.nn.functional.mse_loss(with_bias(data.test[0]) @ weights, data.test[1])
    assert mse < 0.5 * data.test[1].var()


def test_digits_are_real_8x8_images_resized_to_16():
    data = load_dataset(dataset_cfg("digits"), seed=0)
    assert (data.task, data.num_outputs, data.input_shape) == ("classification", 10, (1, 16, 16))
    assert_splits(data, 1294, 144, 359)  # 1797 images: 20% test, 10% of the rest val
    assert set(data.train[1].tolist()) == set(range(10))
    raw = load_dataset(dataset_cfg("digits", image_size=None, preprocess="none"), seed=0)
    assert raw.input_shape == (1, 8, 8)
    assert raw.train[0].min() == 0 and raw.train[0].max() == 16


def test_digits_test_split_is_fixed_and_validation_follows_the_seed():
    a, b = (load_dataset(dataset_cfg("digits", preprocess="none"), seed=s) for s in (0, 1))
    assert torch.equal(a.test[0], b.test[0]) and torch.equal(a.test[1], b.test[1])
    assert not torch.equal(a.val[1], b.val[1])


def test_standardize_uses_training_statistics_only():
    raw = load_dataset(dataset_cfg("digits", preprocess="none"), seed=0)
    std = load_dataset(dataset_cfg("digits"), seed=0)
    mean = raw.train[0].mean((0, 2, 3), keepdim=True)
    scale = raw.train[0].std((0, 2, 3), correction=0, keepdim=True)
    for split in ("train", "val", "test"):
        expected = (getattr(raw, split)[0] - mean) / scale
        torch.testing.assert_close(getattr(std, split)[0], expected)
    assert abs(std.train[0].mean()) < 1e-5 and abs(std.train[0].std() - 1) < 1e-3
    assert abs(std.test[0].mean()) > 1e-4  # not refitted on the test split


def test_standardize_is_per_feature_for_vectors():
    data = load_dataset(dataset_cfg("toy", shape=[10]), seed=0)
    torch.testing.assert_close(data.train[0].mean(0), torch.zeros(10), atol=1e-5, rtol=0)
    torch.testing.assert_close(data.train[0].std(0, correction=0), torch.ones(10))


def test_minmax_maps_training_range_to_unit_interval():
    raw = load_dataset(dataset_cfg("toy", shape=[5], preprocess="none"), seed=0)
    data = load_dataset(dataset_cfg("toy", shape=[5], preprocess="minmax"), seed=0)
    torch.testing.assert_close(data.train[0].amin(0), torch.zeros(5))
    torch.testing.assert_close(data.train[0].amax(0), torch.ones(5))
    low, high = raw.train[0].amin(0), raw.train[0].amax(0)
    torch.testing.assert_close(data.test[0], (raw.test[0] - low) / (high - low))


def test_constant_inputs_do_not_divide_by_zero(tmp_path):
    write_fake_mnist(tmp_path, n_train=20, n_test=5)
    images = tmp_path / "MNIST" / "raw" / "train-images-idx3-ubyte"
    images.write_bytes(images.read_bytes()[:16] + bytes(20 * 28 * 28))  # all black
    data = load_dataset(dataset_cfg("mnist", root=str(tmp_path)), seed=0)
    assert torch.isfinite(data.train[0]).all() and (data.train[0] == 0).all()


def test_limit_keeps_at_most_limit_training_examples():
    a, b = (load_dataset(dataset_cfg("toy", limit=50), seed=s) for s in (0, 1))
    assert_splits(a, 45, 5, 500)
    assert not torch.equal(a.train[1], b.train[1])


@pytest.mark.parametrize("kind", ["mnist", "fashion_mnist"])
def test_mnist_formats_load_through_torchvision(tmp_path, kind):
    raw = write_fake_mnist(tmp_path, kind=kind, n_train=40, n_test=12)
    data = load_dataset(dataset_cfg(kind, root=str(tmp_path), preprocess="none"), seed=0)
    assert (data.task, data.num_outputs, data.input_shape) == ("classification", 10, (1, 28, 28))
    assert_splits(data, 36, 4, 12)
    written = np.frombuffer((raw / "t10k-images-idx3-ubyte").read_bytes()[16:], dtype=np.uint8)
    torch.testing.assert_close(data.test[0], torch.tensor(written.reshape(12, 1, 28, 28)) / 255)
    assert data.test[1].tolist() == [i % 10 for i in range(12)]


def test_mnist_split_follows_the_seed(tmp_path):
    write_fake_mnist(tmp_path)
    a, b, c = (load_dataset(dataset_cfg("mnist", root=str(tmp_path)), seed=s) for s in (3, 3, 4))
    assert torch.equal(a.val[0], b.val[0]) and not torch.equal(a.val[0], c.val[0])


def test_mnist_image_size_resizes(tmp_path):
    write_fake_mnist(tmp_path, n_train=10, n_test=4)
    data = load_dataset(dataset_cfg("mnist", root=str(tmp_path), image_size=14), seed=0)
    assert data.input_shape == (1, 14, 14) and data.test[0].shape == (4, 1, 14, 14)


def test_cifar10_loads_through_torchvision_in_channel_first_order(tmp_path, monkeypatch):
    folder = write_fake_cifar10(tmp_path, n_train=50, n_test=10)
    trust_fake_cifar10(monkeypatch, tmp_path)
    data = load_dataset(dataset_cfg("cifar10", root=str(tmp_path), preprocess="none"), seed=0)
    assert (data.task, data.num_outputs, data.input_shape) == ("classification", 10, (3, 32, 32))
    assert_splits(data, 45, 5, 10)
    written = pickle.loads((folder / "test_batch").read_bytes())["data"]  # rows: R, G, B planes
    torch.testing.assert_close(data.test[0], torch.tensor(written.reshape(10, 3, 32, 32)) / 255)


def test_cifar10_standardizes_per_channel(tmp_path, monkeypatch):
    write_fake_cifar10(tmp_path)
    trust_fake_cifar10(monkeypatch, tmp_path)
    x = load_dataset(dataset_cfg("cifar10", root=str(tmp_path)), seed=0).train[0]
    torch.testing.assert_close(x.mean((0, 2, 3)), torch.zeros(3), atol=1e-5, rtol=0)
    torch.testing.assert_close(x.std((0, 2, 3), correction=0), torch.ones(3))


@pytest.mark.parametrize(
    ("name", "folder"),
    [
        ("mnist", "MNIST/raw"),
        ("fashion_mnist", "FashionMNIST/raw"),
        ("cifar10", "cifar-10-batches-py"),
    ],
)
def test_missing_files_name_the_folder_and_the_fix(tmp_path, name, folder):
    with pytest.raises(ConfigError) as err:
        load_dataset(dataset_cfg(name, root=str(tmp_path)), seed=0)
    message = str(err.value)
    assert str(tmp_path / folder) in message and "dataset.download=true" in message
    assert "\n" not in message


@pytest.mark.parametrize(
    "corrupt",
    [
        lambda data: data[: len(data) // 2],  # truncated download
        lambda data: b"\x00\x00\x01\x03" + data[4:],  # not an idx file (bad type byte)
    ],
    ids=["truncated", "bad-header"],
)
def test_corrupt_mnist_file(tmp_path, corrupt):
    images = write_fake_mnist(tmp_path) / "train-images-idx3-ubyte"
    images.write_bytes(corrupt(images.read_bytes()))
    with pytest.raises(DataError, match="corrupt or incomplete files in .*MNIST/raw"):
        load_dataset(dataset_cfg("mnist", root=str(tmp_path)), seed=0)


def test_mnist_labels_not_matching_images(tmp_path):
    labels = write_fake_mnist(tmp_path, n_train=30) / "train-labels-idx1-ubyte"
    write_fake_mnist(tmp_path / "other", n_train=20)
    labels.write_bytes((tmp_path / "other/MNIST/raw/train-labels-idx1-ubyte").read_bytes())
    with pytest.raises(DataError, match="30 images but 20 labels"):
        load_dataset(dataset_cfg("mnist", root=str(tmp_path)), seed=0)


def test_cifar10_file_changed_after_download_fails_its_checksum(tmp_path, monkeypatch):
    folder = write_fake_cifar10(tmp_path)
    trust_fake_cifar10(monkeypatch, tmp_path)
    (folder / "data_batch_3").write_bytes(b"garbage")
    with pytest.raises(DataError, match="corrupt or incomplete files in .*cifar-10-batches-py"):
        load_dataset(dataset_cfg("cifar10", root=str(tmp_path)), seed=0)


def test_cifar10_unreadable_pickle(tmp_path, monkeypatch):
    batch = write_fake_cifar10(tmp_path) / "test_batch"
    batch.write_bytes(batch.read_bytes()[:100])  # truncated, with a matching checksum
    trust_fake_cifar10(monkeypatch, tmp_path)
    with pytest.raises(DataError, match="corrupt or incomplete"):
        load_dataset(dataset_cfg("cifar10", root=str(tmp_path)), seed=0)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"name": "imagenet"}, "unknown dataset 'imagenet'; choose from: toy, digits, mnist"),
        ({"preprocess": "zca"}, "unknown dataset.preprocess 'zca'; choose from: standardize"),
        ({"val_fraction": 0.0}, "val_fraction must be between 0 and 1"),
        ({"val_fraction": 1.0}, "val_fraction must be between 0 and 1"),
        ({"limit": 1}, "limit must be at least 2"),
        ({"image_size": 0}, "image_size must be positive"),
        ({"task": "ranking"}, "unknown dataset.task 'ranking'; choose from: classification"),
        ({"shape": [3, 8]}, r"shape must be \[features\] or \[channels, height, width\]"),
        ({"num_classes": 1}, "num_classes must be at least 2"),
        ({"train_size": 1}, "train_size must be at least 2"),
        ({"noise": -1.0}, "noise must be at least 0"),
        ({"shape": [10], "image_size": 8}, "image_size resizes images"),
    ],
)
def test_bad_settings_are_config_errors(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_dataset(dataset_cfg("toy", **overrides), seed=0)
