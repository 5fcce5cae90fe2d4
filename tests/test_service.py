"""A real `bentoml serve` process on a free port, exercised over HTTP with real CIFAR-10 test images."""

import io
import logging
import pickle
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
from bentoml.exceptions import BentoMLException
from PIL import Image
from pydantic import ValidationError

from bench.harness import SERVE, running
from bundle.images import HEIF, decode
from bundle.runtime import Bundle
from serving.boundary import Refusal
from serving.schemas import Classification
from tests.conftest import REPO

MAX_IMAGE_BYTES = 200_000  # small, so that the 413 tests need no huge upload
MAX_REQUEST_BYTES = 1_000_000
MAX_NEIGHBOURS = 100_000


@pytest.fixture(scope="module")
def server_log(tmp_path_factory):
    return tmp_path_factory.mktemp("serve") / "serve.log"


def server_env() -> dict[str, str]:
    return dict(
        CIFAR10_MODELS_DIR=str(REPO / "models"), CIFAR10_MAX_IMAGE_BYTES=str(MAX_IMAGE_BYTES),
        CIFAR10_MAX_REQUEST_BYTES=str(MAX_REQUEST_BYTES),
        CIFAR10_DEFAULT_MODEL="cnn",  # the cheap committed bundle; the default one is checked by name below
        CIFAR10_MAX_LATENCY_MS="20",  # so that concurrent requests reliably meet in one batch
        CIFAR10_MAX_NEIGHBOURS=str(MAX_NEIGHBOURS),  # above the KNN head's training rows
        CIFAR10_CORS_ORIGINS=PAGE,
    )  # fmt: skip


@pytest.fixture(scope="module")
def server(server_log):
    with running(SERVE, server_log, env=server_env()) as served:
        yield served.url


@pytest.fixture(scope="module")
def traced_log(tmp_path_factory):
    return tmp_path_factory.mktemp("traced") / "serve.log"


@pytest.fixture(scope="module")
def traced(traced_log, tmp_path_factory):
    """The same service with traces exported: its image endpoints answer through BentoML's endpoint, not DirectEndpoints."""
    exporter = '{"services": {"tracing": {"exporter_type": "in_memory"}}}'
    # its own BENTOML_HOME: a second `bentoml serve` would otherwise empty the first one's metrics folder
    env = server_env() | dict(BENTOML_CONFIG_OVERRIDES=exporter, BENTOML_HOME=str(tmp_path_factory.mktemp("bentoml")))
    with running(SERVE, traced_log, env=env) as served:
        yield served.url


PAGE = "https://app.example"  # a web page whose scripts the server fixture lets call it


def test_a_browser_page_of_an_allowed_origin_reads_answers_and_refusals(server, test_images):
    """A browser hides from a script every answer without Access-Control-Allow-Origin: a refusal too, which
    would leave the page with a bare network error where the service said what was wrong."""
    origin = {"Origin": PAGE}
    preflight = httpx.options(f"{server}/classify", headers=origin | {"Access-Control-Request-Method": "POST"}, timeout=30)
    assert preflight.status_code == 200 and preflight.headers["access-control-allow-origin"] == PAGE
    other = httpx.options(f"{server}/classify", headers={"Origin": "https://elsewhere.example", "Access-Control-Request-Method": "DELETE"}, timeout=30)
    assert other.status_code == 400 and other.json()["error"].startswith("CORS preflight refused: Disallowed CORS origin, method")
    method = httpx.options(f"{server}/classify", headers=origin | {"Access-Control-Request-Method": "DELETE"}, timeout=30)
    assert method.json()["error"] == "CORS preflight refused: Disallowed CORS method"  # no word of origins
    answer = httpx.post(f"{server}/classify", files=upload([encode(test_images[0])]), headers=origin, timeout=30)
    assert answer.status_code == 200 and answer.headers["access-control-allow-origin"] == PAGE
    assert "retry-after" in answer.headers["access-control-expose-headers"].lower()  # a 429's, for the page to wait
    refusals = [
        httpx.post(f"{server}/classify", headers=origin, timeout=30),  # no body: the upload checks
        httpx.post(f"{server}/nowhere", headers=origin, timeout=30),  # the JSON 404
        httpx.post(f"{server}/v2/models/cnn/infer", content=b"{}", headers=origin, timeout=30),  # the protocol's 400
    ]
    for refusal in refusals:
        assert refusal.status_code in (400, 404) and refusal.headers.get("access-control-allow-origin") == PAGE, refusal.text
    elsewhere = httpx.post(f"{server}/classify", files=upload([encode(test_images[0])]), headers={"Origin": "https://elsewhere.example"}, timeout=30)
    assert "access-control-allow-origin" not in elsewhere.headers


def test_the_log_names_the_provider_really_in_use(server, server_log):
    log = server_log.read_text()
    assert "bundle cnn (fp32): provider in use CPUExecutionProvider" in log and "bundle airbench (fp32): provider in use" in log


def lines_with(log: Path, text: str, seconds: float = 10) -> list[str]:
    """The log's lines holding `text`; BentoML writes a request's lines just after its answer, so wait for one."""
    deadline = time.monotonic() + seconds
    while not (lines := [line for line in log.read_text().splitlines() if text in line]) and time.monotonic() < deadline:
        time.sleep(0.1)
    return lines


def classify_lines(log: Path) -> list[str]:
    return lines_with(log, "path=/classify")


def test_requests_are_traced_only_when_traces_go_somewhere(server, server_log, traced, traced_log, test_images):
    """BentoML's tracing middleware is most of a small request's Python time; it runs when an exporter is configured."""
    one = upload([encode(test_images[0])])
    assert httpx.post(f"{server}/classify", files=one, timeout=30).status_code == 200
    untraced = classify_lines(server_log)
    assert untraced and not any("trace=" in line for line in untraced)

    answer = httpx.post(f"{traced}/classify", files=one, timeout=30)
    assert answer.status_code == 200 and "x-bentoml-request-id" in answer.headers  # BentoML's endpoint, which adds it
    traced_lines = classify_lines(traced_log)
    assert traced_lines and all("trace=" in line for line in traced_lines)


def test_the_direct_path_answers_as_bentoml_s_endpoint_does(server, server_log, traced, traced_log, test_images):
    """serving.boundary.DirectEndpoints answers the image endpoints' forms; with traces exported, BentoML's endpoint
    does. The same requests get the same answers, refusals and log lines from both."""
    png = [encode(image) for image in test_images[:3]]
    since = {log: len(log.read_text().splitlines()) for log in (server_log, traced_log)}
    requests = [  # (route, query string, multipart parts: files, and fields as (None, value))
        ("/classify", {}, upload(png[:1])),
        ("/classify", {}, upload(png) + [("model", (None, "airbench"))]),
        ("/topk", {"k": "2"}, upload(png[:2])),
        ("/topk", {}, upload(png[:1]) + [("k", (None, "10")), ("model", (None, "cnn"))]),
        ("/embed", {}, upload(png[:1])),
        ("/knn", {}, upload(png[:2]) + [("neighbours", (None, "3"))]),
        ("/topk", {}, upload(png[:1]) + [("k", (None, "0"))]),  # request validation: a 400 with detail
        ("/topk", {}, upload(png[:1]) + [("k", (None, "three"))]),
        ("/knn", {}, upload(png[:1]) + [("neighbours", (None, str(MAX_NEIGHBOURS + 1)))]),
        ("/topk", {"k": "2"}, upload(png[:1]) + [("k", (None, "3"))]),  # given twice
        ("/classify", {}, upload(png[:1]) + [("model", (None, "resnet"))]),  # the endpoint's BadInput
        ("/classify", {}, upload([b"hello"])),
        ("/classify", {}, upload([b"\x89PNG" + bytes(MAX_IMAGE_BYTES)])),  # the endpoint's 413
        ("/classify", {}, upload(png[:1]) + [("colour", (None, "red"))]),  # an unknown field
        ("/classify", {}, [("images", (None, "https://example.com/cat.png"))]),  # a URL for a file
        ("/classify", {}, upload(png[:1]) + [("model", ("m.txt", b"cnn", "text/plain"))]),  # a file for a value
        ("/classify", {}, [("model", (None, "cnn"))]),  # no image at all
    ]
    refused = 0
    for route, query, parts in requests:
        form = httpx.Request("POST", "http://x", files=parts)
        sent = [form.headers["content-type"], form.headers["content-type"].replace("multipart/form-data", "Multipart/Form-Data")]
        for content_type in sent:  # media types are case-insensitive
            answers = [httpx.post(f"{url}{route}", params=query, content=form.read(), headers={"Content-Type": content_type}, timeout=30) for url in (server, traced)]
            direct, bentoml_own = answers
            assert (direct.status_code, direct.json()) == (bentoml_own.status_code, bentoml_own.json()), (route, query, content_type)
            assert direct.headers["content-type"] == bentoml_own.headers["content-type"] == "application/json"
            assert direct.headers["server"] == bentoml_own.headers["server"]
            refused += direct.status_code >= 400
    raw = [httpx.post(f"{url}/topk?k=2", content=png[0], headers={"Content-Type": "image/png"}, timeout=30) for url in (server, traced)]  # rewritten as a form
    assert [(a.status_code, a.json()) for a in raw] == [(200, raw[1].json())] * 2

    def refusals(log: Path) -> list[str]:  # this test's, as "POST /route refused (status): reason", without the trace ids of a traced log
        deadline = time.monotonic() + 10  # BentoML writes a request's lines just after its answer
        while True:
            lines = [line[line.index("POST /") :].split(" (trace=")[0] for line in log.read_text().splitlines()[since[log] :] if " refused (" in line]
            if len(lines) >= refused or time.monotonic() > deadline:
                return lines
            time.sleep(0.1)

    assert len(refusals(server_log)) == refused and refusals(server_log) == refusals(traced_log)


def test_a_refusal_is_one_line_of_the_log_and_a_fault_keeps_its_traceback(server, server_log, test_images):
    assert httpx.post(f"{server}/embed", files=upload([b"hello"]), timeout=30).status_code == 400
    refused = lines_with(server_log, "POST /embed refused (400)")
    assert refused and "[INFO]" in refused[0] and "image 0 ('0.png'): not an image" in refused[0]
    assert httpx.post(f"{server}/topk", files=upload([encode(test_images[0])]), data={"k": "0"}, timeout=30).status_code == 400
    assert lines_with(server_log, "POST /topk refused (400): k: Input should be greater than or equal to 1")  # request validation
    assert "Exception on /embed" not in server_log.read_text() and "Exception on /topk" not in server_log.read_text()  # BentoML's ERROR lines

    with pytest.raises(ValidationError) as invalid_answer:  # an answer the endpoint built wrongly: a fault, not a refusal
        Classification(label="cat", index=3, probability=float("nan"))
    for fault in (BentoMLException("the disk is full"), RuntimeError("a bug"), invalid_answer.value):  # a BentoMLException is a 500 by default
        try:
            raise fault
        except Exception:
            record = logging.LogRecord("bentoml", logging.ERROR, __file__, 1, "Exception on %s [%s]", ("/embed", "POST"), sys.exc_info())
        assert Refusal().filter(record) and record.levelno == logging.ERROR and record.exc_info[1] is fault


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


@pytest.mark.parametrize("fmt", ["JPEG", "WEBP", "AVIF", pytest.param("HEIF", marks=pytest.mark.skipif(not HEIF, reason="needs the [heif] extra"))])
def test_lossy_uploads_are_classified_like_their_decoded_pixels(server, test_images, offline, fmt):
    blobs = [encode(p, fmt) for p in test_images[:8]]
    served = httpx.post(f"{server}/classify", files=upload(blobs, fmt.lower()), timeout=60).json()
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
    models = {m["name"]: m for m in httpx.post(f"{server}/models", json={}, timeout=10).json()}
    assert sorted(models) == ["airbench", "cnn"] and models["cnn"]["default"] and not models["airbench"]["default"]
    assert {m["provider"] for m in models.values()} == {"CPUExecutionProvider"}


def test_bentomls_own_client_calls_every_endpoint(server, test_images, offline, tmp_path):
    """bentoml.SyncHTTPClient reads /docs.json and sends files as BentoML does: every endpoint answers it."""
    import bentoml

    files = []
    for i, pixels in enumerate(test_images[:3]):
        files.append(tmp_path / f"{i}.png")
        files[-1].write_bytes(encode(pixels))
    expected = offline.predict(np.stack([decode(f.read_bytes()) for f in files]))
    with bentoml.SyncHTTPClient(server, timeout=60) as client:
        classified = client.classify(images=files, model="cnn")
        top = client.topk(images=files, k=2, model="cnn")
        embedded = client.embed(images=files[:1], model="cnn")
        neighbours = client.knn(images=files[:1], neighbours=3, model="cnn")
        models = client.models()
    assert [c["index"] for c in classified] == expected.probabilities.argmax(1).tolist()
    assert [c["probability"] for c in classified] == pytest.approx(expected.probabilities.max(1).tolist(), abs=1e-6)
    assert all(len(t["top"]) == 2 for t in top) and len(neighbours[0]["neighbours"]) == 3
    assert embedded[0]["embedding"] == pytest.approx(expected.embeddings[0].tolist(), abs=1e-4)
    assert {m["name"] for m in models} == {"airbench", "cnn"}


def test_the_default_bundle_serves_by_name_with_its_test_time_augmentation(server, test_images):
    blobs = [encode(p) for p in test_images[:16]]
    served = httpx.post(f"{server}/classify", files=upload(blobs), data={"model": "airbench"}, timeout=60).json()
    bundle = Bundle.load(REPO / "models" / "airbench")
    assert bundle.manifest.test_time_augmentation == "flip-translate"
    expected = bundle.predict(np.stack([decode(b) for b in blobs])).probabilities
    assert [r["index"] for r in served] == expected.argmax(1).tolist()
    assert np.allclose([r["probability"] for r in served], expected.max(1), atol=1e-5)


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
    start = threading.Barrier(len(blobs))  # all at once, on connections opened beforehand, so they meet in the batcher

    def alone(blob: bytes) -> dict:
        start.wait()
        return client.post(f"{server}/classify", files=upload([blob])).json()[0]

    with httpx.Client(timeout=60, limits=httpx.Limits(max_connections=len(blobs))) as client, ThreadPoolExecutor(len(blobs)) as pool:
        list(pool.map(lambda _: client.get(f"{server}/livez"), blobs))
        assert list(pool.map(alone, blobs)) == together
    calls_after, counted_after = batches(server)
    assert counted_after - counted == 12 and calls_after - calls < 12


def test_one_image_as_the_raw_body_answers_like_an_upload(server, test_images, offline):
    blob = encode(test_images[5])
    uploaded = httpx.post(f"{server}/topk", files=upload([blob]), data={"k": "2"}, timeout=60).json()
    raw = httpx.post(f"{server}/topk?k=2", content=blob, headers={"Content-Type": "image/png"}, timeout=60)
    assert raw.status_code == 200, raw.text
    assert raw.json() == uploaded and len(raw.json()[0]["top"]) == 2
    octets = httpx.post(f"{server}/classify", content=blob, headers={"Content-Type": "application/octet-stream"}, timeout=60)
    assert octets.json()[0]["index"] == int(offline.predict(decode(blob)[None]).logits.argmax())


def test_the_query_string_gives_fields_to_a_form_too(server, test_images):
    blob = encode(test_images[5])
    in_form = httpx.post(f"{server}/topk", files=upload([blob]), data={"k": "2"}, timeout=60).json()
    in_query = httpx.post(f"{server}/topk?k=2", files=upload([blob]), timeout=60)
    assert in_query.status_code == 200 and in_query.json() == in_form, in_query.text
    both = httpx.post(f"{server}/topk?k=3", files=upload([blob]), data={"k": "2"}, timeout=60)
    assert both.status_code == 400 and "both the query string and the request body" in both.json()["error"]
    unknown = httpx.post(f"{server}/topk?colour=red", content=blob, headers={"Content-Type": "image/png"}, timeout=60)
    assert unknown.status_code == 400 and "unknown field 'colour'" in unknown.json()["error"]


@pytest.mark.parametrize(
    ("body", "query", "status", "message"),
    [
        (b"hello", "", 400, "not an image"),
        (b"", "", 400, "empty request (no body)"),
        (b"\x89PNG" + bytes(MAX_IMAGE_BYTES), "", 413, "over the limit"),
        (b"\x89PNG", "?model=resnet", 400, "unknown model"),
        (b"\x89PNG", "?k=0", 400, "k: Input should be greater than or equal to 1"),
        (b"\x89PNG", "?k=11", 400, "k must lie in 1..10"),
    ],
)
def test_bad_raw_bodies_are_4xx(server, body, query, status, message):
    answer = httpx.post(f"{server}/topk{query}", content=body, headers={"Content-Type": "image/png"}, timeout=60)
    assert answer.status_code == status, answer.text
    assert message in answer.json()["error"]


def test_the_usual_mistakes_of_a_first_request_say_how_to_fix_them(server, test_images):
    jpeg = encode(test_images[0], "JPEG")
    as_form = httpx.post(f"{server}/classify", content=jpeg, headers={"Content-Type": "application/x-www-form-urlencoded"}, timeout=30)
    assert as_form.status_code == 400 and "-H 'Content-Type: image/jpeg'" in as_form.json()["error"]  # curl --data-binary @a.jpg
    avif = httpx.post(f"{server}/classify", content=encode(test_images[0], "AVIF"), headers={"Content-Type": "application/x-www-form-urlencoded"}, timeout=30)
    assert avif.status_code == 400 and "-H 'Content-Type: image/avif'" in avif.json()["error"], avif.text
    video = httpx.post(f"{server}/classify", content=b"\x00\x00\x00\x18ftypisom" + bytes(64), headers={"Content-Type": "application/x-www-form-urlencoded"}, timeout=30)
    assert video.status_code == 400 and "image/" not in video.json()["error"]  # an MP4 is no image to send otherwise
    raw = httpx.post(f"{server}/classify", content=b"hello", headers={"Content-Type": "image/png"}, timeout=30)
    assert raw.status_code == 400 and raw.json()["error"].startswith("image 0: not an image")  # a raw body has no file name to give
    no_body = httpx.post(f"{server}/classify", timeout=30)  # curl -X POST URL
    assert no_body.status_code == 400 and "empty request (no body)" in no_body.json()["error"]
    nowhere = httpx.post(f"{server}/predict", files=upload([jpeg], "jpeg"), timeout=30)
    assert nowhere.status_code == 404 and "POST /classify" in nowhere.json()["error"], nowhere.text
    long_name = httpx.post(f"{server}/classify", data={"x" * 500: "1"}, files=upload([jpeg], "jpeg"), timeout=30)
    assert long_name.status_code == 400 and len(long_name.json()["error"]) < 200
    listing = httpx.post(f"{server}/models", files=upload([jpeg], "jpeg"), timeout=30)
    assert listing.status_code == 400 and "takes no fields" in listing.json()["error"]
    filtered = httpx.post(f"{server}/models", json={"model": "cnn"}, timeout=30)  # the listing has no filter: said, not ignored
    assert filtered.status_code == 400 and "takes no fields" in filtered.json()["error"]
    assert httpx.post(f"{server}/models", json={}, timeout=30).status_code == httpx.post(f"{server}/models", timeout=30).status_code == 200


def test_a_request_of_more_pixels_in_all_than_the_limit_is_a_413_before_any_decoding(server):
    """Six 40-megapixel PNGs of one colour: 0.8 MB of request, 240 million pixels to decode."""
    large = encode(np.full((6320, 6320, 3), (200, 40, 40), np.uint8))
    answer = httpx.post(f"{server}/classify", files=upload([large] * 6), timeout=60)
    assert answer.status_code == 413 and "CIFAR10_MAX_REQUEST_PIXELS" in answer.json()["error"], answer.text


def test_a_small_file_of_many_pixels_is_decoded_off_the_event_loop_like_any_other(server, test_images, offline):
    """Few bytes, many pixels: decoded in a thread (the loop decodes only what is small in both), with the
    answer it gets offline; an image beside it that fails to decode is refused by its index and file name."""
    many = encode(np.full((3000, 3000, 3), (200, 40, 40), np.uint8))  # 9 megapixels in a few kB
    answer = httpx.post(f"{server}/classify", files=upload([many]), timeout=60)
    assert answer.status_code == 200, answer.text
    assert answer.json()[0]["index"] == int(offline.predict(decode(many)[None]).logits.argmax())
    truncated = encode(test_images[0])[:300]  # its header reads, its pixels do not
    refused = httpx.post(f"{server}/classify", files=upload([many, truncated]), timeout=60)
    assert refused.status_code == 400 and "image 1 ('1.png'): corrupt or truncated" in refused.json()["error"], refused.text


def test_the_openapi_document_declares_what_each_route_can_answer(server):
    paths = httpx.get(f"{server}/docs.json", timeout=10).json()["paths"]
    assert {"400", "411", "413", "415", "429", "504"} <= set(paths["/classify"]["post"]["responses"])
    assert set(paths["/models"]["post"]["responses"]) == {"200", "400", "405", "500", "504"}  # reads no upload, sheds no load
    assert paths["/models"]["get"]["responses"] == paths["/models"]["post"]["responses"] and "requestBody" not in paths["/models"]["get"]


def test_a_request_over_its_size_limit_is_refused_before_it_is_read(server):
    files = [("images", (f"{i}.png", bytes(190_000), "image/png")) for i in range(6)]  # each under the per-file limit
    answer = httpx.post(f"{server}/classify", files=files, timeout=60)
    assert answer.status_code == 413 and "CIFAR10_MAX_REQUEST_BYTES" in answer.json()["error"]


def test_a_chunked_form_is_411_and_a_chunked_raw_image_is_read(server, test_images):
    form = httpx.Request("POST", f"{server}/classify", files=upload([encode(test_images[0])]))
    chunked = httpx.post(f"{server}/classify", content=iter([form.read()]), headers={"Content-Type": form.headers["Content-Type"]}, timeout=60)
    assert chunked.status_code == 411 and "Content-Length" in chunked.json()["error"]
    raw = httpx.post(f"{server}/classify", content=iter([encode(test_images[0])]), headers={"Content-Type": "image/png"}, timeout=60)
    assert raw.status_code == 200


def test_a_malformed_form_is_a_400_naming_the_problem(server):
    no_boundary = httpx.post(f"{server}/classify", content=b"{}", headers={"Content-Type": "multipart/form-data"}, timeout=60)
    assert no_boundary.status_code == 400 and "Missing boundary" in no_boundary.json()["error"]
    broken = httpx.post(f"{server}/classify", content=b"garbage", headers={"Content-Type": "multipart/form-data; boundary=xyz"}, timeout=60)
    assert broken.status_code == 400 and "malformed multipart" in broken.json()["error"]


def test_a_form_without_images_names_the_missing_field(server):
    answer = httpx.post(f"{server}/classify", data={"model": "cnn"}, timeout=60)
    assert answer.status_code == 400 and answer.json()["error"] == "images: Field required"
    assert answer.json()["detail"][0]["loc"] == ["images"] and "url" not in answer.json()["detail"][0]  # no link to pydantic's docs


def test_a_url_in_place_of_a_file_is_refused_not_fetched(server):
    answer = httpx.post(f"{server}/classify", data={"images": "https://example.com/cat.png"}, timeout=60)
    assert answer.status_code == 400 and "does not fetch URLs" in answer.json()["error"]


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"files": [("images", ("a.png", b"png", "image/png")), ("other", ("b.png", b"\x89PNG\xff", "image/png"))]}, "unknown field 'other'"),
        ({"files": [("image", ("a.png", b"\x89PNG\xff", "image/png"))]}, "unknown field 'image'"),
        ({"files": [("images", ("a.png", b"png", "image/png")), ("model", ("m", b"\xff\xfe", "text/plain"))]}, "'model' takes a value, not a file"),
        ({"files": [("images", ("a.png", b"png", "image/png"))], "data": {"model": ["cnn", "airbench"]}}, "'model' is given 2 times"),
    ],
)
def test_form_fields_other_than_the_declared_ones_are_400(server, fields, message):
    answer = httpx.post(f"{server}/classify", timeout=60, **fields)
    assert answer.status_code == 400 and message in answer.json()["error"], answer.text


@pytest.mark.parametrize(("method", "path", "allowed"), [("GET", "/classify", "POST"), ("PUT", "/topk", "POST"), ("DELETE", "/embed", "POST"), ("PUT", "/models", "GET, HEAD, POST")])
def test_methods_other_than_post_are_a_json_405(server, method, path, allowed):
    answer = httpx.request(method, f"{server}{path}", timeout=60)
    assert answer.status_code == 405 and answer.headers["allow"] == allowed and "is not served: use " in answer.json()["error"]


def test_the_model_listing_is_read_with_a_get_as_with_a_post(server):
    read = httpx.get(f"{server}/models", timeout=30)
    assert read.status_code == 200 and read.json() == httpx.post(f"{server}/models", json={}, timeout=30).json()
    assert {m["name"] for m in read.json()} == {"airbench", "cnn"} and all(m["test_images"] == 10_000 for m in read.json())
    head = httpx.head(f"{server}/models", timeout=30)  # the GET's headers, its length included
    assert head.status_code == 200 and head.headers["content-type"] == "application/json"
    assert int(head.headers["content-length"]) == len(read.content)


@pytest.mark.parametrize("content_type", ["text/plain", "application/xml", "text/csv; charset=utf-8"])
def test_bodies_of_other_types_are_a_json_415_saying_what_to_send(server, content_type):
    answer = httpx.post(f"{server}/classify", content=b"a cat", headers={"Content-Type": content_type}, timeout=60)
    assert answer.status_code == 415 and "multipart/form-data files named 'images'" in answer.json()["error"]


@pytest.mark.parametrize(("k", "message"), [("0", "k: Input should be greater than or equal to 1"), ("11", "k must lie in 1..10")])
def test_k_out_of_range_is_a_400(server, test_images, k, message):
    answer = httpx.post(f"{server}/topk", files=upload([encode(test_images[0])]), data={"k": k}, timeout=60)
    assert answer.status_code == 400 and message in answer.json()["error"]


@pytest.mark.parametrize(
    ("neighbours", "error"),
    [
        ("0", "neighbours: Input should be greater than or equal to 1"),
        (str(MAX_NEIGHBOURS + 1), f"neighbours: Input should be less than or equal to {MAX_NEIGHBOURS}"),
        ("60000", "neighbours must lie in 1..48000, the training rows of cnn's KNN head; got 60000"),
    ],
)
def test_neighbours_out_of_range_is_a_400(server, test_images, neighbours, error):
    answer = httpx.post(f"{server}/knn", files=upload([encode(test_images[0])]), data={"neighbours": neighbours}, timeout=60)
    assert answer.status_code == 400 and answer.json()["error"] == error


def test_a_missing_or_empty_models_folder_fails_loudly(tmp_path):
    from bundle.runtime import BundleError
    from serving.service import load_bundles
    from serving.settings import Settings

    with pytest.raises(BundleError, match="not found; set CIFAR10_MODELS_DIR"):
        load_bundles(Settings(models_dir=tmp_path / "absent"))
    with pytest.raises(BundleError, match="no bundle in"):
        load_bundles(Settings(models_dir=tmp_path))
