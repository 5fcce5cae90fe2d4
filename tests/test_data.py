import pickle

import numpy as np
import pytest
import torch

from tests.conftest import CLASSES, write_batch, write_tiny_cifar
from training.data import DataError, augment, load_cifar10


@pytest.mark.parametrize("bytes_keys", [True, False], ids=["official-bytes-keys", "str-keys"])
def test_loads_the_official_layout(tmp_path, bytes_keys):
    folder = write_tiny_cifar(tmp_path / "cifar-10-batches-py", per_batch=20, bytes_keys=bytes_keys)
    data = load_cifar10(folder)
    assert data.classes == tuple(CLASSES)
    assert data.train.images.shape == (100, 3, 32, 32) and data.train.images.dtype == torch.uint8
    assert data.test.images.shape == (20, 3, 32, 32)
    assert data.train.labels.tolist()[:12] == [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 0, 1]
    # rows of 3072 are the red plane, then green, then blue
    image = data.test.images[7]
    assert (image[0] == 7).all() and (image[1] == 107).all() and (image[2] == 207).all()


def test_limit_takes_the_first_images(tiny_cifar):
    data = load_cifar10(tiny_cifar)
    assert len(data.train.head(30)) == 30 and len(data.train.head(None)) == 100


def test_missing_folder_says_how_to_get_the_data(tmp_path):
    with pytest.raises(DataError, match="--download"):
        load_cifar10(tmp_path / "nowhere")


def test_missing_file_is_named(tiny_cifar):
    (tiny_cifar / "data_batch_4").unlink()
    with pytest.raises(DataError, match="data_batch_4"):
        load_cifar10(tiny_cifar)


def test_wrong_shape_names_the_file(tiny_cifar):
    write_batch(tiny_cifar / "data_batch_3", np.zeros((5, 1000), np.uint8), [0] * 5, bytes_keys=False)
    with pytest.raises(DataError, match=r"data_batch_3.*\[N, 3072\]"):
        load_cifar10(tiny_cifar)


def test_label_out_of_range_names_the_file(tiny_cifar):
    write_batch(tiny_cifar / "test_batch", np.zeros((2, 3072), np.uint8), [3, 10], bytes_keys=True)
    with pytest.raises(DataError, match=r"test_batch.*0\.\.9"):
        load_cifar10(tiny_cifar)


def test_label_count_mismatch_is_an_error(tiny_cifar):
    write_batch(tiny_cifar / "data_batch_1", np.zeros((3, 3072), np.uint8), [1, 2], bytes_keys=False)
    with pytest.raises(DataError, match="3 images but 2 labels"):
        load_cifar10(tiny_cifar)


def test_garbage_file_is_an_error(tiny_cifar):
    (tiny_cifar / "data_batch_2").write_bytes(b"not a pickle")
    with pytest.raises(DataError, match="data_batch_2"):
        load_cifar10(tiny_cifar)


def test_wrong_class_list_is_an_error(tiny_cifar):
    with open(tiny_cifar / "batches.meta", "wb") as f:
        pickle.dump({"label_names": ["cat", "dog"]}, f)
    with pytest.raises(DataError, match="batches.meta"):
        load_cifar10(tiny_cifar)


def _gradient_images(n: int) -> torch.Tensor:
    ramp = torch.arange(32, dtype=torch.uint8) * 8
    return ramp.view(1, 1, 1, 32).expand(n, 3, 32, 32).clone()


def test_flip_mirrors_about_half_the_batch():
    images = _gradient_images(400)
    out = augment(images, torch.Generator().manual_seed(0), flip=True)
    flipped = (out == images.flip(-1).float()).flatten(1).all(1)
    kept = (out == images.float()).flatten(1).all(1)
    assert (flipped ^ kept).all()
    assert 150 < flipped.sum() < 250


def test_shift_and_rotation_move_pixels_within_range():
    images = _gradient_images(64)
    out = augment(images, torch.Generator().manual_seed(0), rotation=15, shift=0.1)
    assert out.shape == images.shape and out.dtype == torch.float32
    assert out.min() >= 0 and out.max() <= 255  # border mode repeats edge pixels, never zeros
    assert (out != images.float()).flatten(1).any(1).float().mean() > 0.9


def test_augmentation_repeats_with_the_same_seed():
    images = torch.randint(0, 256, (16, 3, 32, 32), dtype=torch.uint8)
    options = dict(rotation=15, shift=0.1, flip=True)
    a = augment(images, torch.Generator().manual_seed(3), **options)
    b = augment(images, torch.Generator().manual_seed(3), **options)
    assert torch.equal(a, b)


def test_download_failure_says_what_to_do(tmp_path, monkeypatch):
    import torchvision.datasets

    def offline(*args, **kwargs):
        raise OSError("network is unreachable")

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", offline)
    with pytest.raises(DataError, match="could not download CIFAR-10.*--data-dir"):
        load_cifar10(tmp_path / "cifar-10-batches-py", download=True)
    with pytest.raises(DataError, match="ends in cifar-10-batches-py"):
        load_cifar10(tmp_path / "elsewhere", download=True)


def test_download_is_skipped_when_the_data_is_there(tiny_cifar, monkeypatch):
    import torchvision.datasets

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", None)  # any call would fail
    assert len(load_cifar10(tiny_cifar, download=True).test) == 20


def test_holdout_is_the_tail_of_the_training_set(tiny_cifar):
    data = load_cifar10(tiny_cifar)
    train, held_out, test = data.splits(limit=50, holdout=10)
    assert (len(train), len(held_out), len(test)) == (40, 10, 20)
    assert torch.equal(held_out.images, data.train.images[40:50])
    with pytest.raises(DataError, match="--holdout"):
        data.splits(holdout=100)
