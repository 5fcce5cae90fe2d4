"""A real `bentoml serve` process on a free port, exercised over HTTP with real CIFAR-10 test images."""

import io
import os
import pickle
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
from PIL import Image

from serving.bundle import Bundle
from serving.images import decode
from tests.conftest import REPO
from tests.test_images import png_header_only

MAX_IMAGE_BYTES = 200_000  # small, so that the 413 test needs no huge upload


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(url: str, process: subprocess.Popen, seconds: float = 90) -> bool:
    """Poll /readyz until it answers 200; False if the process dies or time runs out."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and process.poll() is None:
        try:
            if httpx.get(f"{url}/readyz", timeout=1).status_code == 200:
                return True
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    return False


@pytest.fixture(scope="module")
def server_log(tmp_path_factory):
    return tmp_path_factory.mktemp("serve") / "serve.log"


@pytest.fixture(scope="module")
def server(server_log):
    port = free_port()
    env = dict(
        os.environ, CIFAR10_MODELS_DIR=str(REPO / "models"), CIFAR10_MAX_IMAGE_BYTES=str(MAX_IMAGE_BYTES),
        CIFAR10_MAX_LATENCY_MS="20",  # so that concurrent requests reliably meet in one batch
    )  # fmt: skip
    log = open(server_log, "w")  # a file, not a pipe: nobody has to drain it while tests run
    process = subprocess.Popen(
        [sys.executable, "-m", "bentoml", "serve", "serving.service:CIFAR10", "--host", "127.0.0.1", "--port", str(port)],
        cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    if not wait_ready(url, process):
        process.kill()
        pytest.fail(f"bentoml serve was not ready within 90 s:\n{server_log.read_text()}")
    yield url
    process.terminate()
    process.wait(timeout=30)
    log.close()


def test_the_log_names_the_provider_really_in_use(server, server_log):
    assert "bundle cnn: provider in use CPUExecutionProvider" in server_log.read_text()


@pytest.fixture(scope="module")
def test_batch(shared_data):
    with open(shared_data / "test_batch", "rb") as f:
        batch = pickle.load(f, encoding="latin1")
    return [row.reshape(3, 32, 32).transpose(1, 2, 0) for row in batch["data"][:1000]], batch["labels"][:1000]


@pytest.fixture(scope="module")
def test_images(test_batch):
    return test_batch[0][:40]


def encode(pixels: np.ndarray, fmt: str = "PNG") -> bytes:
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format=fmt)
    return out.getvalue()


def upload(blobs: list[bytes], fmt: str = "png") -> list:
    return [("images", (f"{i}.{fmt}", blob, f"image/{fmt}")) for i, blob in enumerate(blobs)]


@pytest.fixture(scope="module")
def offline():
    return Bundle.load(REPO / "models" / "cnn")


def test_labels_over_http_equal_the_bundle_offline(server, test_images, offline):
    blobs = [encode(p) for p in test_images]
    answer = httpx.post(f"{server}/classify", files=upload(blobs), timeout=60)
    assert answer.status_code == 200, answer.text
    expected = offline.predict(np.stack([decode(b) for b in blobs])).probabilities
    served = answer.json()
    assert [r["index"] for r in served] == expected.argmax(1).tolist()
    assert [r["label"] for r in served] == [offline.manifest.classes[i] for i in expected.argmax(1)]
    assert np.allclose([r["probability"] for r in served], expected.max(1), atol=1e-5)


def test_accuracy_over_http_equals_the_offline_accuracy(server, test_batch, offline):
    images, labels = test_batch
    blobs = [encode(p) for p in images]
    served = []
    for start in range(0, len(blobs), 64):
        answer = httpx.post(f"{server}/classify", files=upload(blobs[start : start + 64]), timeout=60)
        served += [r["index"] for r in answer.json()]
    offline_predictions = offline.predict(np.stack(images)).logits.argmax(1)
    assert np.mean(np.array(served) == labels) == np.mean(offline_predictions == labels)
    assert served == offline_predictions.tolist()


def test_jpeg_uploads_are_classified_like_their_decoded_pixels(server, test_images, offline):
    blobs = [encode(p, "JPEG") for p in test_images[:8]]
    served = httpx.post(f"{server}/classify", files=upload(blobs, "jpeg"), timeout=60).json()
    expected = offline.predict(np.stack([decode(b) for b in blobs])).logits.argmax(1)
    assert [r["index"] for r in served] == expected.tolist()


def test_topk_embed_knn_and_models(server, test_images, offline):
    blobs = [encode(p) for p in test_images[:4]]
    pixels = np.stack([decode(b) for b in blobs])
    top = httpx.post(f"{server}/topk", files=upload(blobs), data={"k": "3"}, timeout=60).json()
    probs = offline.predict(pixels).probabilities
    assert [[t["label"] for t in r["top"]] for r in top] == [
        [offline.manifest.classes[i] for i in np.argsort(-p)[:3]] for p in probs
    ]
    embedded = httpx.post(f"{server}/embed", files=upload(blobs), timeout=60).json()
    assert np.allclose([r["embedding"] for r in embedded], offline.predict(pixels).embeddings, atol=1e-4)
    knn = httpx.post(f"{server}/knn", files=upload(blobs), data={"neighbours": "3"}, timeout=60).json()
    votes = offline.knn(offline.predict(pixels).embeddings, 3)[0]
    assert [r["label"] for r in knn] == [offline.manifest.classes[i] for i in votes.argmax(1)]
    assert all(len(r["neighbours"]) == 3 and abs(sum(r["votes"].values()) - 1) < 1e-6 for r in knn)
    models = httpx.post(f"{server}/models", json={}, timeout=10).json()
    assert models[0]["name"] == "cnn" and models[0]["provider"] == "CPUExecutionProvider" and models[0]["default"]


def test_predictions_are_counted_per_model_and_label(server, test_images):
    before = httpx.get(f"{server}/metrics", timeout=10).text
    answer = httpx.post(f"{server}/classify", files=upload([encode(test_images[1])] * 3), timeout=60).json()
    label = answer[0]["label"]
    line = f'cifar10_predictions_total{{label="{label}",model="cnn"}}'

    def count(text: str) -> float:
        return sum(float(row.split()[-1]) for row in text.splitlines() if row.startswith(line))

    assert count(httpx.get(f"{server}/metrics", timeout=10).text) == count(before) + 3


def batches(server) -> tuple[float, float]:
    """(inference calls, images) so far, from the batch-size histogram in /metrics."""
    text = httpx.get(f"{server}/metrics", timeout=10).text
    value = lambda name: sum(float(r.split()[-1]) for r in text.splitlines() if r.startswith(name + '{model="cnn"'))  # noqa: E731
    return value("cifar10_batch_size_count"), value("cifar10_batch_size_sum")


def test_concurrent_single_requests_match_one_list_request_and_share_batches(server, test_images):
    blobs = [encode(p) for p in test_images[:12]]
    together = httpx.post(f"{server}/classify", files=upload(blobs), timeout=60).json()
    calls, counted = batches(server)
    with ThreadPoolExecutor(6) as pool:
        alone = list(pool.map(lambda b: httpx.post(f"{server}/classify", files=upload([b]), timeout=60).json()[0], blobs))
    assert alone == together
    calls_after, counted_after = batches(server)
    assert counted_after - counted == 12 and calls_after - calls < 12


def animated_gif() -> bytes:
    frames = [Image.new("RGB", (32, 32), c) for c in ("red", "blue")]
    out = io.BytesIO()
    frames[0].save(out, format="GIF", save_all=True, append_images=frames[1:])
    return out.getvalue()


BAD = {
    "not an image": ([b"hello, world"], {}, 400, "not an image"),
    "empty file": ([b""], {}, 400, "empty"),
    "truncated png": ([encode(np.full((64, 64, 3), 7, np.uint8))[:60]], {}, 400, "corrupt or truncated"),
    "1x1": ([encode(np.zeros((1, 1, 3), np.uint8))], {}, 400, "too small"),
    "animated gif": ([animated_gif()], {}, 400, "animated"),
    "decompression bomb": ([png_header_only(20_000, 20_000)], {}, 400, "too large"),
    "too many images": ([encode(np.zeros((8, 8, 3), np.uint8))] * 65, {}, 400, "at most 64"),
    "file over the size limit": (
        [encode(np.random.default_rng(0).integers(0, 256, (300, 300, 3), dtype=np.uint8))], {}, 413, "over the limit"
    ),
    "unknown model": ([encode(np.zeros((32, 32, 3), np.uint8))], {"model": "resnet"}, 400, "loaded: cnn"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_is_a_4xx_and_the_next_request_succeeds(server, test_images, case):
    blobs, data, status, message = BAD[case]
    answer = httpx.post(f"{server}/classify", files=upload(blobs), data=data, timeout=60)
    assert answer.status_code == status, answer.text
    assert message in answer.json()[0]["error"]
    good = httpx.post(f"{server}/classify", files=upload([encode(test_images[0])]), timeout=60)
    assert good.status_code == 200


@pytest.mark.parametrize("k", ["0", "11"])
def test_k_out_of_range_is_a_400(server, test_images, k):
    answer = httpx.post(f"{server}/topk", files=upload([encode(test_images[0])]), data={"k": k}, timeout=60)
    assert answer.status_code == 400 and "k must lie in 1..10" in answer.text


@pytest.mark.parametrize("neighbours", ["0", "51"])
def test_neighbours_out_of_range_is_a_400(server, test_images, neighbours):
    answer = httpx.post(f"{server}/knn", files=upload([encode(test_images[0])]), data={"neighbours": neighbours}, timeout=60)
    assert answer.status_code == 400 and "neighbours must lie in 1..50" in answer.text


def test_a_missing_or_empty_models_folder_fails_loudly(tmp_path):
    from serving.bundle import BundleError
    from serving.service import load_bundles
    from serving.settings import Settings

    with pytest.raises(BundleError, match="not found; set CIFAR10_MODELS_DIR"):
        load_bundles(Settings(models_dir=tmp_path / "absent"))
    with pytest.raises(BundleError, match="no bundle in"):
        load_bundles(Settings(models_dir=tmp_path))
