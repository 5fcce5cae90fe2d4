"""Shared fixtures: a tiny dataset written in the official layout, the real one when present, and test images as files."""

from __future__ import annotations

import io
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

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


CORRUPT = {"cat/broken.png": b"\x89PNG\r\n\x1a\n not really", "dog/empty.jpg": b"", "notes.txt.png": b"hello"}


@pytest.fixture(scope="session")
def test_images(shared_data):
    with open(shared_data / "test_batch", "rb") as f:
        batch = pickle.load(f, encoding="latin1")
    return np.asarray(batch["data"][:300]).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1), batch["labels"][:300]


def png(pixels: np.ndarray) -> bytes:
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="PNG")
    return out.getvalue()


@pytest.fixture(scope="session")
def folder(tmp_path_factory, test_images):
    """class/NNNN.png for 300 test images, plus three files that are not images."""
    root = tmp_path_factory.mktemp("images")
    for i, (pixels, label) in enumerate(zip(*test_images)):
        path = root / CLASSES[label] / f"{i:04d}.png"
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(png(pixels))
    for name, content in CORRUPT.items():
        (root / name).parent.mkdir(exist_ok=True)
        (root / name).write_bytes(content)
    return root
