"""One calibrated probability: the service, `cifar10 score` (local and Spark) and Bundle.predict agree.

The bundle's graph computes its probabilities (softmax of the logits over the temperature its
manifest records), so every consumer returns the same numbers for the same upload, JPEGs included.
"""

import io
import pickle

import httpx
import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from bench.harness import SERVE, running
from bundle.images import decode
from bundle.runtime import Bundle
from cifar10.cli import main
from tests.conftest import REPO
from training.metrics import softmax

MODEL = "cnn"  # the cheap committed bundle; both are exported the same way


@pytest.fixture(scope="module")
def uploads(shared_data, tmp_path_factory):
    """24 test images as files, half PNG and half JPEG quality 75, in class folders."""
    with open(shared_data / "test_batch", "rb") as f:
        batch = pickle.load(f, encoding="latin1")
    classes = Bundle.load(REPO / "models" / MODEL).manifest.classes
    root = tmp_path_factory.mktemp("uploads")
    for i in range(24):
        pixels = np.asarray(batch["data"][i]).reshape(3, 32, 32).transpose(1, 2, 0)
        fmt, suffix = ("PNG", "png") if i % 2 else ("JPEG", "jpg")
        path = root / classes[batch["labels"][i]] / f"{i:02d}.{suffix}"
        path.parent.mkdir(exist_ok=True)
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, fmt, **({"quality": 75} if fmt == "JPEG" else {}))
        path.write_bytes(buffer.getvalue())
    return sorted(root.rglob("*.*"))


@pytest.fixture(scope="module")
def offline(uploads):
    """Bundle.predict's probabilities per file id (the path relative to the folder, as `score` names rows)."""
    bundle = Bundle.load(REPO / "models" / MODEL)
    prediction = bundle.predict(np.stack([decode(p.read_bytes()) for p in uploads]))
    ids = [str(p.relative_to(uploads[0].parent.parent)) for p in uploads]
    return bundle, dict(zip(ids, prediction.probabilities)), prediction


def as_vectors(rows, classes) -> dict[str, np.ndarray]:
    """{id: probability per class} from rows with topk_labels and topk_probabilities over every class."""
    vectors = {}
    for row in rows:
        vector = np.zeros(len(classes))
        vector[[classes.index(label) for label in row["topk_labels"]]] = row["topk_probabilities"]
        vectors[row["id"]] = vector
    return vectors


def test_the_graph_gives_calibrated_probabilities_not_the_plain_softmax(offline):
    bundle, _, prediction = offline
    temperature = bundle.manifest.calibration.temperature
    assert bundle.manifest.calibration.method == "temperature" and abs(temperature - 1) > 0.05
    np.testing.assert_allclose(prediction.probabilities, softmax(prediction.logits, temperature), atol=1e-5)
    assert np.abs(prediction.probabilities - softmax(prediction.logits)).max() > 1e-3


def test_service_local_and_spark_scoring_return_the_bundles_probabilities(offline, uploads, tmp_path):
    bundle, expected, _ = offline
    classes = list(bundle.manifest.classes)
    root = uploads[0].parent.parent

    with running(SERVE, tmp_path / "serve.log", env=dict(CIFAR10_MODELS_DIR=str(REPO / "models"), CIFAR10_MODELS=MODEL)) as server:
        files = [("images", (p.name, p.read_bytes())) for p in uploads]
        answer = httpx.post(f"{server.url}/topk", files=files, data={"k": str(len(classes)), "model": MODEL}, timeout=60)
        assert answer.status_code == 200, answer.text
        classified = httpx.post(f"{server.url}/classify", files=files, data={"model": MODEL}, timeout=60).json()
    ids = [str(p.relative_to(root)) for p in uploads]
    served = as_vectors([{"id": i, "topk_labels": [t["label"] for t in r["top"]], "topk_probabilities": [t["probability"] for t in r["top"]]}
                         for i, r in zip(ids, answer.json())], classes)  # fmt: skip

    assert main(["score", str(root), "--model", MODEL, "--output", str(tmp_path / "local.parquet"), "--topk", str(len(classes)), "--models-dir", str(REPO / "models")]) == 0
    local = as_vectors(pq.read_table(tmp_path / "local.parquet").to_pylist(), classes)

    for name, got in (("service", served), ("cifar10 score", local)):
        assert_same(name, got, expected)
    assert [r["probability"] for r in classified] == pytest.approx([expected[i].max() for i in ids], abs=1e-6)

    spark_out = tmp_path / "spark.parquet"
    assert main(["score", str(root), "--model", MODEL, "--output", str(spark_out), "--topk", str(len(classes)), "--engine", "spark", "--master", "local[2]", "--models-dir", str(REPO / "models")]) == 0
    assert_same("cifar10 score --engine spark", as_vectors(pq.read_table(spark_out).to_pylist(), classes), expected)


def assert_same(name: str, got: dict[str, np.ndarray], expected: dict[str, np.ndarray]) -> None:
    assert sorted(got) == sorted(expected), name
    for key, vector in expected.items():
        np.testing.assert_allclose(got[key], vector, atol=1e-6, err_msg=f"{name}: {key}")
