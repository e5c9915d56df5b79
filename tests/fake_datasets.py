"""Tiny datasets written in the on-disk formats torchvision's dataset classes read.

Tests point ``dataset.root`` at a temporary folder filled by these functions, so the real
``torchvision.datasets.MNIST`` / ``FashionMNIST`` / ``CIFAR10`` classes load them, offline.
Pixels are random uint8 (fixed seed); labels cycle through the 10 classes.

MNIST and Fashion-MNIST only check that the files exist. CIFAR10 checks every file's md5
against checksums of the real files hard-coded in the class, which no fake can match: call
``trust_fake_cifar10`` to point those checksums at the fake files (the md5 check itself still
runs, so a file changed afterwards is still caught as corrupt).
"""

from __future__ import annotations

import hashlib
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest

MNIST_FOLDERS = {"mnist": "MNIST", "fashion_mnist": "FashionMNIST"}
CIFAR10_FOLDER = "cifar-10-batches-py"
CIFAR10_CLASSES = [
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
]


def write_fake_mnist(
    root: str | Path, kind: str = "mnist", n_train: int = 60, n_test: int = 20, seed: int = 0
) -> Path:
    """Write <root>/MNIST/raw (or FashionMNIST/raw) idx-ubyte files; returns that folder."""
    folder = Path(root) / MNIST_FOLDERS[kind] / "raw"
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        write_idx(folder / f"{prefix}-images-idx3-ubyte", images)
        write_idx(folder / f"{prefix}-labels-idx1-ubyte", (np.arange(n) % 10).astype(np.uint8))
    return folder


def write_idx(path: Path, array: np.ndarray) -> None:
    """The idx format: magic 0x0000 08 <ndim> (08 = uint8), big-endian sizes, then the bytes."""
    header = struct.pack(">I", 0x0800 | array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    path.write_bytes(header + array.astype(np.uint8).tobytes())


def write_fake_cifar10(
    root: str | Path, n_train: int = 50, n_test: int = 10, seed: int = 0
) -> Path:
    """Write <root>/cifar-10-batches-py (5 training batches, test batch, meta); returns it.

    Each batch is the real format: a pickled dict whose ``data`` is uint8 of shape
    (n, 3072), each row the R, G and B planes of a 32x32 image, and ``labels`` a list of ints.
    """
    folder = Path(root) / CIFAR10_FOLDER
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    names = [f"data_batch_{i}" for i in range(1, 6)]
    sizes = [len(part) for part in np.array_split(np.arange(n_train), 5)] + [n_test]
    for name, n in zip([*names, "test_batch"], sizes, strict=True):
        batch = {
            "batch_label": name,
            "labels": [i % 10 for i in range(n)],
            "data": rng.integers(0, 256, size=(n, 3 * 32 * 32), dtype=np.uint8),
            "filenames": [f"{name}_{i}.png" for i in range(n)],
        }
        _write_pickle(folder / name, batch)
    meta = {"label_names": CIFAR10_CLASSES, "num_cases_per_batch": sizes[0], "num_vis": 3072}
    _write_pickle(folder / "batches.meta", meta)
    return folder


def trust_fake_cifar10(monkeypatch: pytest.MonkeyPatch, root: str | Path) -> None:
    """Make torchvision's CIFAR10 accept the files now in <root>/cifar-10-batches-py.

    CIFAR10 verifies each file against md5 checksums of the real dataset, stored in its class
    attributes ``train_list``, ``test_list`` and ``meta``; this replaces them (for the test's
    duration) with the md5s of the fake files. Only in-process code sees the change.
    """
    from torchvision.datasets import CIFAR10

    folder = Path(root) / CIFAR10_FOLDER

    def md5(name: str) -> str:
        return hashlib.md5((folder / name).read_bytes()).hexdigest()

    monkeypatch.setattr(CIFAR10, "train_list", [[n, md5(n)] for n, _ in CIFAR10.train_list])
    monkeypatch.setattr(CIFAR10, "test_list", [[n, md5(n)] for n, _ in CIFAR10.test_list])
    monkeypatch.setattr(CIFAR10, "meta", {**CIFAR10.meta, "md5": md5(CIFAR10.meta["filename"])})


def _write_pickle(path: Path, obj: object) -> None:
    path.write_bytes(pickle.dumps(obj))
