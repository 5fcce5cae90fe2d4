"""The committed default bundle reproduces, on the 10,000 test images, the accuracy its manifest states."""

import pytest

from serving.bundle import Bundle
from tests.conftest import REPO
from training.data import load_cifar10

DEFAULT = REPO / "models" / "cnn"


@pytest.fixture(scope="module")
def bundle():
    return Bundle.load(DEFAULT)


def test_the_default_bundle_is_small(bundle):
    total = sum(f.stat().st_size for f in DEFAULT.iterdir())
    assert total < 16 * 2**20
    assert bundle.manifest.architecture == "seed_cnn" and bundle.manifest.accuracy.test_images == 10_000


def test_it_reproduces_its_stated_accuracy(bundle, shared_data):
    test = load_cifar10(shared_data).test
    images = test.images.permute(0, 2, 3, 1).contiguous().numpy()
    labels = test.labels.numpy()
    prediction = bundle.predict(images)
    network = (prediction.logits.argmax(1) == labels).mean()
    votes, _, _, _ = bundle.knn(prediction.embeddings, neighbours=1)
    knn = (votes.argmax(1) == labels).mean()
    assert network == pytest.approx(bundle.manifest.accuracy.onnx, abs=0.001)
    assert knn == pytest.approx(bundle.manifest.knn.test_accuracy, abs=0.001)
    assert network > 0.8  # the study's best CNN recipe
