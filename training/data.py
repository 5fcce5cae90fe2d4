"""CIFAR-10 as uint8 tensors: loading, validation and batched augmentation.

The whole dataset is 180 MB as uint8, so it stays in memory as two tensors and is
augmented a batch at a time on the training device: no DataLoader, no PIL loop.
"""

from __future__ import annotations

import math
import os
import pickle
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from cifar10.errors import UserError

TRAIN_FILES = tuple(f"data_batch_{i}" for i in range(1, 6))
TEST_FILE = "test_batch"
META_FILE = "batches.meta"
IMAGE_SHAPE = (3, 32, 32)
DEFAULT_DATA_DIR = Path("data/cifar-10-batches-py")


class DataError(UserError):
    """The data folder is missing or does not hold CIFAR-10 in the official layout."""


@dataclass(frozen=True)
class Split:
    images: torch.Tensor  # uint8, [N, 3, 32, 32], RGB
    labels: torch.Tensor  # int64, [N]

    def __len__(self) -> int:
        return len(self.labels)

    def head(self, n: int | None) -> Split:
        """The first n examples (the files are already shuffled, so this is a fair sample)."""
        return self if n is None else Split(self.images[:n], self.labels[:n])


@dataclass(frozen=True)
class Cifar10:
    train: Split
    test: Split
    classes: tuple[str, ...]
    source: str  # where the data came from, for provenance

    def splits(self, limit: int | None = None, holdout: int = 0) -> tuple[Split, Split, Split]:
        """(train, held-out, test): the held-out images are the last `holdout` training images,
        kept out of training so that choices made after it (k, temperature) never see the test set."""
        train = self.train.head(limit)
        if not 0 <= holdout < len(train):
            raise DataError(f"--holdout must lie in 0..{len(train) - 1}, got {holdout}")
        cut = len(train) - holdout
        return Split(train.images[:cut], train.labels[:cut]), Split(train.images[cut:], train.labels[cut:]), self.test.head(limit)


def resolve_data_dir(data_dir: str | os.PathLike | None) -> Path:
    """--data-dir, else $CIFAR10_DATA_DIR, else ./data/cifar-10-batches-py."""
    if data_dir is not None:
        return Path(data_dir)
    return Path(os.environ.get("CIFAR10_DATA_DIR", DEFAULT_DATA_DIR))


def load_cifar10(data_dir: str | os.PathLike | None = None, download: bool = False) -> Cifar10:
    """Load the python-pickle layout; with download=True fetch the official archive first."""
    folder = resolve_data_dir(data_dir)
    if download and not (folder / TEST_FILE).exists():
        _download(folder)
    if not folder.is_dir():
        raise DataError(
            f"CIFAR-10 folder not found: {folder}. Pass --data-dir (or set CIFAR10_DATA_DIR) to a folder holding "
            f"data_batch_1..5 and test_batch, or add --download to fetch the official archive."
        )
    classes = _read_classes(folder / META_FILE)
    train = _concat([_read_batch(folder / name, len(classes)) for name in TRAIN_FILES])
    test = _read_batch(folder / TEST_FILE, len(classes))
    return Cifar10(train=train, test=test, classes=classes, source=str(folder.resolve()))


def _download(folder: Path) -> None:
    """torchvision extracts the official archive into <root>/cifar-10-batches-py."""
    if folder.name != "cifar-10-batches-py":
        raise DataError(f"--download needs a --data-dir that ends in cifar-10-batches-py, got {folder}")
    from torchvision.datasets import CIFAR10

    try:
        CIFAR10(root=str(folder.parent), train=True, download=True)
    except Exception as exc:  # network errors come in many types; all mean the same here
        raise DataError(
            f"could not download CIFAR-10 into {folder.parent} ({exc}). Without internet, copy the "
            f"official cifar-10-batches-py folder there or pass --data-dir."
        ) from exc


def _unpickle(path: Path) -> dict:
    """Official files are Python 2 pickles (bytes keys); re-pickled ones have str keys."""
    if not path.is_file():
        raise DataError(f"missing CIFAR-10 file: {path}")
    try:
        with open(path, "rb") as f:
            content = pickle.load(f, encoding="latin1")
    except Exception as exc:
        raise DataError(f"cannot read {path}: {exc}. Is it a CIFAR-10 python batch file?") from exc
    if not isinstance(content, dict):
        raise DataError(f"{path} does not hold a dict, it is not a CIFAR-10 batch file")
    return {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in content.items()}


def _read_classes(path: Path) -> tuple[str, ...]:
    names = _unpickle(path).get("label_names")
    if not names or len(names) != 10:
        raise DataError(f"{path} should list 10 label_names, found {names!r}")
    return tuple(n.decode() if isinstance(n, bytes) else str(n) for n in names)


def _read_batch(path: Path, num_classes: int) -> Split:
    content = _unpickle(path)
    if "data" not in content or "labels" not in content:
        raise DataError(f"{path} lacks the 'data' or 'labels' key (found {sorted(content)})")
    data = torch.as_tensor(content["data"])
    labels = torch.as_tensor(list(content["labels"]), dtype=torch.int64)
    pixels = math.prod(IMAGE_SHAPE)
    if data.dtype != torch.uint8 or data.ndim != 2 or data.shape[1] != pixels:
        raise DataError(f"{path}: 'data' should be uint8 of shape [N, {pixels}], got {data.dtype} {tuple(data.shape)}")
    if len(labels) != len(data):
        raise DataError(f"{path}: {len(data)} images but {len(labels)} labels")
    if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
        raise DataError(f"{path}: labels must lie in 0..{num_classes - 1}, found {labels.min()}..{labels.max()}")
    return Split(images=data.reshape(-1, *IMAGE_SHAPE).contiguous(), labels=labels)


def _concat(splits: list[Split]) -> Split:
    return Split(torch.cat([s.images for s in splits]), torch.cat([s.labels for s in splits]))


def augment(
    images: torch.Tensor,
    generator: torch.Generator,
    rotation: float = 0.0,
    shift: float = 0.0,
    flip: bool = False,
) -> torch.Tensor:
    """Keras ImageDataGenerator's rotation/shift/flip, on a float batch in one resampling.

    rotation is in degrees (uniform in ±rotation), shift a fraction of the side (uniform in
    ±shift); borders repeat the edge pixel as Keras' fill_mode='nearest' does.
    """
    x = images.float()

    def uniform() -> torch.Tensor:  # drawn on the CPU generator so runs repeat on any device
        return (torch.rand(len(x), generator=generator) * 2 - 1).to(x.device)

    if flip:
        x = torch.where(uniform()[:, None, None, None] < 0, x.flip(-1), x)
    if rotation or shift:
        angle = uniform() * math.radians(rotation)
        tx, ty = uniform() * shift * 2, uniform() * shift * 2  # grid coordinates span 2 per side
        cos, sin = angle.cos(), angle.sin()
        theta = torch.stack([torch.stack([cos, -sin, tx], 1), torch.stack([sin, cos, ty], 1)], 1)
        grid = F.affine_grid(theta.to(x.dtype), list(x.shape), align_corners=False)
        x = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
    return x
