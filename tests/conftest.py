"""Shared fixtures: a tiny dataset written in the official layout, and the real one when present."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("CIFAR10_TEST_DATA", REPO.parent / "shared/data/cifar-10-batches-py"))
CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def write_batch(path: Path, data: np.ndarray, labels: list[int], bytes_keys: bool) -> None:
    """Pickle one batch as the official archive (bytes keys) or a Python 3 copy (str keys) does."""
    content = {"data": data, "labels": labels, "batch_label": path.name, "filenames": [f"{i}.png" for i in labels]}
    if bytes_keys:
        content = {k.encode(): v for k, v in content.items()}
    with open(path, "wb") as f:
        pickle.dump(content, f, protocol=2 if bytes_keys else 4)


def write_tiny_cifar(folder: Path, per_batch: int = 20, bytes_keys: bool = False) -> Path:
    """Six batches of `per_batch` images; image i has constant planes R=i, G=100+i, B=200+i (mod 256)."""
    folder.mkdir(parents=True, exist_ok=True)
    names = [n.encode() for n in CLASSES] if bytes_keys else CLASSES
    meta = {b"label_names" if bytes_keys else "label_names": names}
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump(meta, f)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        values = np.arange(per_batch)
        planes = [np.repeat(((values + offset) % 256)[:, None], 1024, axis=1) for offset in (0, 100, 200)]
        data = np.concatenate(planes, axis=1).astype(np.uint8)
        write_batch(folder / name, data, [int(v % 10) for v in values], bytes_keys)
    return folder


@pytest.fixture
def tiny_cifar(tmp_path: Path) -> Path:
    return write_tiny_cifar(tmp_path / "cifar-10-batches-py")


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not (SHARED_DATA / "test_batch").is_file():
        pytest.skip(f"real CIFAR-10 not found at {SHARED_DATA} (set CIFAR10_TEST_DATA to its folder)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def cifar(shared_data):
    """The real CIFAR-10, loaded once for every test that trains, exports or evaluates (read only)."""
    from training.data import load_cifar10  # not at import: serving's tests run without torch

    return load_cifar10(shared_data)


def cpu_bf16() -> bool:
    """What `cifar10 train --precision auto` picks on this CPU, so tests train as users' runs do (and
    stay quick on CPUs without fast bf16, where bf16 autocast is emulated)."""
    import torch

    from training.hardware import bf16_is_fast

    return bf16_is_fast(torch.device("cpu"))
