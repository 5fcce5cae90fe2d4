"""The Open Inference Protocol on a real `bentoml serve`, spoken by Triton's own client, `tritonclient[http]`."""

import gzip
import json

import httpx
import numpy as np
import pytest

from bench.harness import SERVE, running
from bundle.runtime import Bundle
from serving.settings import Settings
from tests.conftest import REPO

tritonclient = pytest.importorskip("tritonclient.http")
from tritonclient.utils import InferenceServerException  # noqa: E402

MAX_REQUEST_BYTES = 1_000_000


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    env = dict(CIFAR10_MODELS_DIR=str(REPO / "models"), CIFAR10_MODELS="cnn", CIFAR10_MAX_REQUEST_BYTES=str(MAX_REQUEST_BYTES))
    with running(SERVE, tmp_path_factory.mktemp("serve") / "serve.log", env=env) as served:
        yield served.url


@pytest.fixture(scope="module")
def client(server):
    with tritonclient.InferenceServerClient(server.removeprefix("http://")) as triton:
        yield triton


@pytest.fixture(scope="module")
def bundle():
    return Bundle.load(REPO / "models" / "cnn")


@pytest.fixture(scope="module")
def images(cifar):
    return cifar.test.images[:64].permute(0, 2, 3, 1).contiguous().numpy()


def test_health_and_metadata(client, bundle):
    assert client.is_server_live() and client.is_server_ready()
    assert "binary_tensor_data" in client.get_server_metadata()["extensions"]
    assert client.is_model_ready("cnn") and client.is_model_ready("cnn", model_version=bundle.manifest.version)
    assert not client.is_model_ready("cnn", model_version="another") and not client.is_model_ready("resnet")
    metadata = client.get_model_metadata("cnn")
    assert metadata["inputs"] == [{"name": "images", "datatype": "UINT8", "shape": [-1, 32, 32, 3]}]
    assert [(o["name"], o["shape"]) for o in metadata["outputs"]] == [
        ("logits", [-1, 10]), ("probabilities", [-1, 10]), ("embedding", [-1, bundle.manifest.embedding_dim])
    ]  # fmt: skip
    with pytest.raises(InferenceServerException, match="unknown model 'resnet'"):
        client.get_model_metadata("resnet")


@pytest.mark.parametrize("binary", [True, False], ids=["binary tensors", "JSON tensors"])
def test_tritonclients_answers_equal_the_bundles(client, bundle, images, binary):
    tensor = tritonclient.InferInput("images", list(images.shape), "UINT8")
    tensor.set_data_from_numpy(images, binary_data=binary)
    outputs = [tritonclient.InferRequestedOutput(name, binary_data=binary) for name in ("probabilities", "embedding", "logits")]
    result = client.infer("cnn", [tensor], outputs=outputs, request_id="batch-1")
    offline = bundle.predict(images)
    assert result.get_response()["id"] == "batch-1" and result.get_response()["model_version"] == bundle.manifest.version
    assert np.allclose(result.as_numpy("probabilities"), offline.probabilities, atol=1e-6)
    assert np.allclose(result.as_numpy("logits"), offline.logits, atol=1e-5)
    assert np.allclose(result.as_numpy("embedding"), offline.embeddings, atol=1e-5)
    assert (result.as_numpy("probabilities").argmax(1) == offline.probabilities.argmax(1)).all()


def test_the_largest_json_request_pythons_json_writes_is_accepted(server):
    """64 white images as JSON text from json.dumps ("255, " a value, as `requests.post(json=...)`
    sends it): the limit on a JSON request's bytes must leave room for every valid one."""
    body = json.dumps(tensor([64, 32, 32, 3], data=[255] * (64 * 3072)) | {"outputs": [{"name": "probabilities"}]})
    answer = httpx.post(f"{server}/v2/models/cnn/infer", content=body, headers={"content-type": "application/json"}, timeout=30)
    assert answer.status_code == 200, answer.text
    assert np.asarray(answer.json()["outputs"][0]["data"]).size == 64 * 10


def test_outputs_can_be_chosen_and_default_to_all(client, images):
    tensor = tritonclient.InferInput("images", [2, 32, 32, 3], "UINT8")
    tensor.set_data_from_numpy(images[:2])
    everything = client.infer("cnn", [tensor])  # no outputs named: all of them, as binary
    assert {o["name"] for o in everything.get_response()["outputs"]} == {"logits", "probabilities", "embedding"}
    one = client.infer("cnn", [tensor], outputs=[tritonclient.InferRequestedOutput("probabilities")])
    assert [o["name"] for o in one.get_response()["outputs"]] == ["probabilities"]


def images_input(images: np.ndarray, binary: bool = True):
    tensor = tritonclient.InferInput("images", list(images.shape), "UINT8")
    tensor.set_data_from_numpy(images, binary_data=binary)
    return tensor


def test_compressed_requests_are_read_and_a_compressed_bomb_is_a_413(client, server, bundle, images):
    for algorithm in ("gzip", "deflate"):  # tritonclient's request_compression_algorithm; the answer's compression is optional
        result = client.infer("cnn", [images_input(images)], request_compression_algorithm=algorithm, response_compression_algorithm=algorithm)
        assert np.allclose(result.as_numpy("probabilities"), bundle.predict(images).probabilities, atol=1e-6)
    url, header = f"{server}/v2/models/cnn/infer", json.dumps(tensor([1, 32, 32, 3], data=[0] * 3072)).encode()
    bomb = httpx.post(url, content=gzip.compress(b" " * (4 * MAX_REQUEST_BYTES) + header), headers={"Content-Encoding": "gzip"}, timeout=30)
    assert bomb.status_code == 413 and "once decompressed" in bomb.json()["error"]  # 4 MB of JSON in 4 kB of gzip
    cut = httpx.post(url, content=gzip.compress(header)[:-20], headers={"Content-Encoding": "gzip"}, timeout=30)
    assert cut.status_code == 400 and "cut short" in cut.json()["error"]
    trailing = httpx.post(url, content=gzip.compress(header) + b"more", headers={"Content-Encoding": "gzip"}, timeout=30)
    assert trailing.status_code == 400 and "followed by other bytes" in trailing.json()["error"]
    garbled = httpx.post(url, content=b"not gzip at all", headers={"Content-Encoding": "gzip"}, timeout=30)
    assert garbled.status_code == 400 and "cannot be decompressed" in garbled.json()["error"]
    brotli = httpx.post(url, content=header, headers={"Content-Encoding": "br"}, timeout=30)
    assert brotli.status_code == 415 and brotli.headers["accept-encoding"] == "gzip, deflate"
    for accepted, sent in (("gzip", "gzip"), ("br, gzip;q=0, deflate", "deflate"), ("identity", None)):  # the answer, compressed as asked
        answer = httpx.post(url, content=header, headers={"Accept-Encoding": accepted}, timeout=30)
        assert answer.headers.get("content-encoding") == sent and len(answer.json()["outputs"]) == 3, accepted


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "JSON"])
def test_class_count_answers_tritons_classification_of_the_best_classes(client, bundle, images, binary):
    wanted = [tritonclient.InferRequestedOutput("probabilities", binary_data=binary, class_count=3)]
    result = client.infer("cnn", [images_input(images[:5])], outputs=wanted)
    assert result.get_output("probabilities")["datatype"] == "BYTES"
    table, probabilities = result.as_numpy("probabilities"), bundle.predict(images[:5]).probabilities
    assert table.shape == (5, 3)
    for row, p in zip(table, probabilities):
        entries = [(e.decode() if isinstance(e, bytes) else e).split(":") for e in row]  # "value:index:label"
        assert [int(i) for _, i, _ in entries] == np.argsort(-p, kind="stable")[:3].tolist()
        assert [label for _, i, label in entries] == [bundle.manifest.classes[int(i)] for _, i, _ in entries]
        assert np.allclose([float(v) for v, _, _ in entries], np.sort(p)[::-1][:3], atol=1e-6)
    for output, k, message in (("probabilities", 11, "k in 1..10; got 11"), ("embedding", 3, "an embedding has no classes")):
        with pytest.raises(InferenceServerException, match=message):
            client.infer("cnn", [images_input(images[:1])], outputs=[tritonclient.InferRequestedOutput(output, class_count=k)])


def test_tritons_model_config_is_served_and_the_extensions_not_implemented_are_refused_by_name(client, server, images):
    config, defaults = client.get_model_config("cnn"), Settings()
    assert config["max_batch_size"] == defaults.max_images and config["input"] == [
        {"name": "images", "data_type": "TYPE_UINT8", "format": "FORMAT_NHWC", "dims": [32, 32, 3]}
    ]
    assert [o["dims"] for o in config["output"][:2]] == [[10], [10]]
    delay = config["dynamic_batching"]["max_queue_delay_microseconds"]
    assert delay == round(defaults.max_latency_ms * 1000) and type(delay) is int  # protobuf's JSON takes no 0.0 for an integer
    assert {"classification", "model_configuration"} <= set(client.get_server_metadata()["extensions"])
    for call, extension in (
        (client.get_inference_statistics, "statistics"), (client.get_system_shared_memory_status, "system shared memory"),
        (client.get_model_repository_index, "model repository"),
    ):  # fmt: skip
        with pytest.raises(InferenceServerException, match=f"does not implement the {extension} extension"):  # "stats" is no model's name
            call()
    shared = tritonclient.InferInput("images", [1, 32, 32, 3], "UINT8")
    shared.set_shared_memory("region", 3072)
    with pytest.raises(InferenceServerException, match="shared memory region"):
        client.infer("cnn", [shared])
    to_shared = tritonclient.InferRequestedOutput("probabilities")
    to_shared.set_shared_memory("region", 40)
    with pytest.raises(InferenceServerException, match="'probabilities' names a shared memory region"):
        client.infer("cnn", [images_input(images[:1])], outputs=[to_shared])
    for path, extension in (("/v2/cudasharedmemory/status", "CUDA shared memory"), ("/v2/models/cnn/trace/setting", "trace"), ("/v2/logging", "logging")):
        refused = httpx.get(f"{server}{path}", timeout=30)
        assert refused.status_code == 400 and f"does not implement the {extension} extension" in refused.json()["error"], path


def infer(server, header: dict, binary: bytes = b"", header_length: str | bytes | None = None) -> httpx.Response:
    text = json.dumps(header).encode()
    headers = {"Inference-Header-Content-Length": header_length if header_length is not None else str(len(text))} if binary or header_length else {}
    return httpx.post(f"{server}/v2/models/cnn/infer", content=text + binary, headers=headers, timeout=30)


def tensor(shape, datatype="UINT8", **parameters) -> dict:
    return {"inputs": [{"name": "images", "shape": shape, "datatype": datatype, **parameters}]}


ONE = bytes(3072)


@pytest.mark.parametrize(
    ("header", "binary", "header_length", "status", "message"),
    [
        (tensor([1, 32, 32, 3], "FP32", parameters={"binary_data_size": 3072}), ONE, None, 400, "datatype UINT8"),
        (tensor([1, 32, 32], parameters={"binary_data_size": 3072}), ONE, None, 400, "shape [N, 32, 32, 3]"),
        (tensor([0, 32, 32, 3], data=[]), b"", None, 400, "1 to 64"),
        (tensor([65, 32, 32, 3], parameters={"binary_data_size": 65 * 3072}), bytes(65 * 3072), None, 400, "1 to 64"),
        (tensor([2, 32, 32, 3], parameters={"binary_data_size": 6144}), ONE, None, 400, "binary tensor data expected"),
        (tensor([1, 32, 32, 3], parameters={"binary_data_size": 3072}), ONE, "999999", 400, "Inference-Header-Content-Length"),
        (tensor([1, 32, 32, 3], parameters={"binary_data_size": 3072}), ONE, "ten", 400, "Inference-Header-Content-Length"),
        (tensor([1, 32, 32, 3], parameters={"binary_data_size": 3072}), ONE, b"\xb2", 400, "Inference-Header-Content-Length"),  # "²" passes str.isdigit
        (tensor([1, 32, 32, 3], parameters={"binary_data_size": 3072}), ONE, "9" * 5000, 400, "Inference-Header-Content-Length"),  # past int()'s digits
        (tensor([1, 32, 32, 3], parameters={"binary_data_size": 3072}), ONE, "20", 400, "not JSON"),
        (tensor([1, 32, 32, 3], data=[300] * 3072), b"", None, 400, "integers 0..255"),
        (tensor([1, 32, 32, 3], data=["a"] * 3072), b"", None, 400, "integers 0..255"),
        (tensor([1, 32, 32, 3], data=[1] * 10), b"", None, 400, "integers 0..255"),
        (tensor([1, 32, 32, 3], data=[1] * 3072) | {"outputs": [{"name": "softmax"}]}, b"", None, 400, "outputs"),
        ({"inputs": "images"}, b"", None, 400, "list of"),
        (tensor([1, 32, 32, 3], data=[1] * 3072) | {"outputs": [{"name": "logits", "parameters": []}]}, b"", None, 400, "outputs"),
        (tensor([20, 32, 32, 3], parameters={"binary_data_size": 20 * 3072}), bytes(20 * 3072) * 20, None, 413, "CIFAR10_MAX_REQUEST_BYTES"),
        (tensor([1, 32, 32, 3], data=[1] * 3072) | {"parameters": {"binary_data_output": "false"}}, b"", None, 400, "true or false"),
        (tensor([1, 32, 32, 3], data=[1] * 3072) | {"outputs": [{"name": "logits", "parameters": {"binary_data": 1}}]}, b"", None, 400, "true or false"),
    ],
)
def test_bad_tensors_are_4xx_with_the_protocols_error(server, header, binary, header_length, status, message):
    answer = infer(server, header, binary, header_length)
    assert answer.status_code == status and message in answer.json()["error"], answer.text


def test_a_header_nested_past_pythons_recursion_limit_is_a_400(server):
    deep = b'{"inputs": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    answer = httpx.post(f"{server}/v2/models/cnn/infer", content=deep, timeout=30)
    assert answer.status_code == 400 and "not JSON" in answer.json()["error"]


def test_wrong_routes_and_methods_answer_in_the_protocols_shape(server):
    assert httpx.get(f"{server}/v2/models/cnn/infer", timeout=30).status_code == 405
    assert "error" in httpx.get(f"{server}/v2/models/cnn/infer", timeout=30).json()
    answer = httpx.post(f"{server}/v2/models/resnet/infer", json=tensor([1, 32, 32, 3], data=[0] * 3072), timeout=30)
    assert answer.status_code == 404 and "unknown model" in answer.json()["error"]
    assert httpx.post(f"{server}/v2/models/cnn/versions/another/infer", json=tensor([1, 32, 32, 3], data=[0] * 3072), timeout=30).status_code == 404


def test_a_fault_behind_the_protocols_routes_is_a_500_in_its_error_shape():
    """Outside a running service the routes cannot find it: a fault of ours, answered as JSON, not Starlette's plain text."""
    from starlette.testclient import TestClient

    from serving import v2

    answer = TestClient(v2.app, raise_server_exceptions=False).get("/v2/models/cnn")
    assert answer.status_code == 500 and answer.headers["content-type"] == "application/json"
    assert answer.json()["error"].startswith("internal error (")
