"""serving/boundary.py: the service starts only on a BentoML its mends were verified against, and says what moved."""

import importlib
import json
import re
import subprocess
import sys
import tomllib

import pytest
from bentoml.exceptions import BadInput, BentoMLException
from packaging.requirements import Requirement

from serving import boundary
from tests.conftest import REPO


def test_the_installed_bentoml_is_a_verified_one_and_pyproject_pins_the_same_releases():
    boundary.check()  # the suite runs against what it verifies
    pinned = next(Requirement(r) for r in tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"] if r.startswith("bentoml"))
    assert pinned.specifier == boundary.VERIFIED, f"pyproject.toml asks for bentoml{pinned.specifier}, serving/boundary.py verified {boundary.VERIFIED}"


def test_an_unverified_bentoml_stops_the_service_at_start():
    """`bentoml serve` imports the service in its supervisor first: there, an unverified release ends it."""
    start = "import sys, bentoml; bentoml.__version__ = '1.5.0'; from bentoml_cli.cli import cli; sys.exit(cli())"
    command = [sys.executable, "-c", start, "serve", "--host", "127.0.0.1", "--port", "0"]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode != 0
    assert "BentoML 1.5.0 is installed" in done.stderr and "serving/boundary.py" in done.stderr, done.stderr[-2000:]


@pytest.mark.parametrize("name", boundary.REPLACED + boundary.READ)
def test_an_internal_that_moved_is_named(monkeypatch, name):
    def owner(name: str) -> tuple[str, str]:  # the module and the module's attribute that `name` goes through
        module, _, path = name.partition(":")
        return module, path.split(".")[0]

    monkeypatch.delattr(importlib.import_module(owner(name)[0]), owner(name)[1])
    first = next(n for n in boundary.REPLACED + boundary.READ if owner(n) == owner(name))  # the check names the first it misses
    with pytest.raises(boundary.BentoMLMoved, match=re.escape(first)):
        boundary.check()


def test_a_replaced_method_that_is_now_only_inherited_is_named(monkeypatch):
    from _bentoml_impl.serde import MultipartSerde

    monkeypatch.delattr(MultipartSerde, "parse_request")  # JSONSerde's would still answer
    with pytest.raises(boundary.BentoMLMoved, match="MultipartSerde no longer defines parse_request itself"):
        boundary.check()


def test_a_response_media_type_is_worked_out_once_per_output_model(monkeypatch):
    from serving.service import CIFAR10  # importing the service applies the boundary

    output = CIFAR10.apis["classify"].output_spec
    calls = []
    schema = output.model_json_schema
    monkeypatch.setattr(output, "model_json_schema", lambda *a, **k: calls.append(1) or schema(*a, **k))
    assert output.mime_type() == output.mime_type() == "application/json"
    assert len(calls) <= 1


def test_direct_endpoints_answer_the_image_endpoints_forms_and_pass_the_rest_on():
    """In process: what DirectEndpoints answers itself, and what it leaves to BentoML's endpoint (here a stand-in)."""
    import asyncio
    import types

    import httpx

    from serving.service import CIFAR10, ROUTES

    passed = []

    async def bentoml_endpoint(scope, receive, send):
        passed.append((scope["method"], scope["path"]))
        await send({"type": "http.response.start", "status": 299, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    direct = boundary.DirectEndpoints(bentoml_endpoint, service=CIFAR10, routes=ROUTES)
    form = httpx.Request("POST", "http://x", files=[("images", ("a.png", b"\x89PNG", "image/png")), ("k", (None, "0"))])

    async def post(path: str, content_type: str, body: bytes = form.read()) -> httpx.Response:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=direct), base_url="http://test") as client:
            return await client.post(path, content=body, headers={"Content-Type": content_type})

    multipart = form.headers["content-type"]
    for content_type in (multipart, multipart.replace("multipart/form-data", "Multipart/Form-Data")):
        refused = asyncio.run(post("/topk", content_type))  # k=0: the input model refuses it, before any service is needed
        assert refused.status_code == 400 and refused.json()["detail"][0]["loc"] == ["k"] and not passed
    for path, content_type in [("/topk", "application/json"), ("/topk", "multipart/form-data-x; boundary=b"), ("/models", multipart)]:
        assert asyncio.run(post(path, content_type)).status_code == 299
    assert passed == [("POST", "/topk"), ("POST", "/topk"), ("POST", "/models")]

    sent = []

    async def gone():  # the client left before its form was read: a refusal, not a fault
        return {"type": "http.disconnect"}

    async def record(message):
        sent.append(message)

    scope = {"type": "http", "method": "POST", "path": "/topk", "query_string": b"", "headers": [(b"content-type", multipart.encode())]}
    asyncio.run(direct(scope, gone, record))
    assert sent[0]["status"] == 400 and b"the client disconnected before its form was read" in sent[1]["body"]

    # the answers of BentoML's endpoint wrapper, which ErrorAnswers then gives the service's shape
    unexpected = {"error": "An unexpected error has occurred, please check the server log."}
    assert boundary._error(RuntimeError("a bug")) == (500, json.dumps(unexpected).encode())  # no detail of a fault leaks
    assert boundary._error(BentoMLException("the disk is full")) == (500, json.dumps(unexpected).encode())
    assert boundary._error(BadInput("k must lie in 1..10")) == (400, json.dumps([{"error": "k must lie in 1..10"}]).encode())

    # an endpoint of another shape than the direct path calls is left to BentoML, whatever it is
    classify = CIFAR10.apis["classify"]
    assert boundary.answerable(classify)
    shape = {name: getattr(classify, name) for name in ("func", "output_spec", "batchable", "ctx_param", "is_stream")}

    def sync(*args, **kwargs):
        return []

    for other in ({"batchable": True}, {"ctx_param": "ctx"}, {"is_stream": True}, {"func": sync}, {"output_spec": CIFAR10.apis["classify"].input_spec}):
        assert not boundary.answerable(types.SimpleNamespace(**shape | other)), other
