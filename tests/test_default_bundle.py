"""The committed bundles reproduce, on the 10,000 test images, the accuracies their manifests state."""

import pytest

from bundle.runtime import Bundle
from serving.settings import Settings
from tests.conftest import REPO
from training.data import load_cifar10


@pytest.fixture(scope="module")
def test_set(shared_data):
    test = load_cifar10(shared_data).test
    return test.images.permute(0, 2, 3, 1).contiguous().numpy(), test.labels.numpy()


def test_the_default_setting_names_the_committed_airbench_bundle_calibrated_on_held_out_images():
    bundle = Bundle.load(REPO / "models" / Settings().default_model)
    assert bundle.manifest.architecture == "airbench" and bundle.manifest.recipe["name"] == "fast"
    assert bundle.manifest.accuracy.onnx >= 0.94 and bundle.manifest.accuracy.test_images == 10_000
    calibration = bundle.manifest.calibration
    assert calibration.method == "temperature" and calibration.fit_images == bundle.manifest.recipe["holdout"] > 0
    assert sum(f.stat().st_size for f in bundle.folder.iterdir()) < 32 * 2**20


@pytest.mark.parametrize(("name", "floor"), [("airbench", 0.94), ("cnn", 0.85)])
def test_each_bundle_reproduces_its_stated_accuracy(name, floor, test_set):
    bundle = Bundle.load(REPO / "models" / name)
    images, labels = test_set
    prediction = bundle.predict(images)
    network = (prediction.logits.argmax(1) == labels).mean()
    votes, _, _, _ = bundle.knn(prediction.embeddings, neighbours=1)
    knn = (votes.argmax(1) == labels).mean()
    assert network == pytest.approx(bundle.manifest.accuracy.onnx, abs=0.001)
    assert knn == pytest.approx(bundle.manifest.knn.test_accuracy, abs=0.001)
    assert network >= floor


@pytest.mark.parametrize("name", ["airbench", "cnn"])
def test_each_int8_variant_reproduces_its_stated_accuracy(name, test_set):
    bundle = Bundle.load(REPO / "models" / name, precision="int8")
    images, labels = test_set
    accuracy = (bundle.predict(images).logits.argmax(1) == labels).mean()
    assert accuracy == pytest.approx(bundle.test_accuracy, abs=0.001)
    assert abs(bundle.test_accuracy - bundle.manifest.accuracy.onnx) <= 0.005  # within half a point of fp32


@pytest.mark.parametrize(("name", "conditions"), [("airbench", ("jpeg75",)), ("cnn", ("png", "jpeg50", "webp", "noise", "photo"))])
def test_each_bundle_reproduces_its_robustness_table(name, conditions, test_set):
    """The rows `cifar10 robustness` recorded: the same accuracy and ECE from the same uploads."""
    from training.robustness import bundle_classifier, measure, table

    bundle = Bundle.load(REPO / "models" / name)
    recorded = {row.condition: row for row in bundle.manifest.robustness}
    assert recorded["png"].accuracy == pytest.approx(bundle.manifest.accuracy.onnx, abs=0.0005)  # PNG is lossless
    images, labels = test_set
    measured = table(measure(bundle_classifier(bundle), images, conditions), labels)
    for condition in conditions:
        assert measured[condition]["accuracy"] == pytest.approx(recorded[condition].accuracy, abs=0.0005), condition
        assert measured[condition]["ece"] == pytest.approx(recorded[condition].ece, abs=0.0005), condition
