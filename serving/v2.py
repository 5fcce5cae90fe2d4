"""The Open Inference Protocol (KServe V2, Triton's HTTP/REST API), so the field's clients work unchanged.

    GET  /v2                               server metadata
    GET  /v2/health/live, /v2/health/ready
    GET  /v2/models/{name}[/versions/{v}]            model metadata
    GET  /v2/models/{name}[/versions/{v}]/ready
    GET  /v2/models/{name}[/versions/{v}]/config     Triton's model configuration (what its tools read)
    POST /v2/models/{name}[/versions/{v}]/infer      tensors in, tensors out

Infer takes the bundle's own input, uint8 `images` [N, 32, 32, 3] (no image decoding: for clients
that pre-process), as JSON `data` or in the binary tensor data extension
(`Inference-Header-Content-Length`: the JSON header's length, the raw tensors after it), gzip- or
deflate-compressed or not (`Content-Encoding`; the answer too, as `Accept-Encoding` asks). It answers `logits`, `probabilities` (the bundle's
calibrated ones) and `embedding`, all or those asked for with `outputs`, each as JSON or binary
(`parameters.binary_data`, or `binary_data_output` for all); `parameters.classification: k` turns
`probabilities` or `logits` into Triton's classification, the k best as "value:index:label" strings.
Requests go through the same batcher, limits and load shedding as the image endpoints; every error
is the protocol's `{"error": "..."}` with a 4xx; the extensions this server does not implement
(statistics, shared memory, the model repository, tracing) are refused by name.
Spec: https://kserve.github.io/website/latest/modelserving/data_plane/v2_protocol/, and Triton's
extensions: https://github.com/triton-inference-server/server/tree/main/docs/protocol
"""

from __future__ import annotations

import asyncio
import json
import re
import struct
import zlib
from typing import Any, NamedTuple

import bentoml
import numpy as np
from bentoml import get_current_service  # once: each `bentoml.` name is looked up by its lazy module (µs a request)
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from bundle.runtime import Bundle
from serving.uploads import INLINE_BYTES

INPUT = "images"
OUTPUTS = ("logits", "probabilities", "embedding")
HEADER_LENGTH = "inference-header-content-length"
INFER = re.compile(r"/v2/models/[^/]+(/versions/[^/]+)?/infer")
IMAGE_VALUES = 32 * 32 * 3
JSON_BYTES_PER_VALUE = 8  # "255, " flat as json.dumps writes it is 5 (tritonclient: "255,"); nested, "[255, 255, 255], " a pixel
EXTENSIONS = ("binary_tensor_data", "classification", "model_configuration")
# Content-Encoding → zlib's window bits: gzip, and HTTP's "deflate", which is the zlib format (as tritonclient sends it)
ENCODINGS = {"gzip": 31, "deflate": 15}


class ProtocolError(Exception):
    def __init__(self, message: str, status: int = 400, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.headers = status, headers


class Wanted(NamedTuple):
    """How an output is asked for."""

    binary: bool
    classification: int = 0  # the k best classes as strings (Triton's classification extension); 0: the tensor itself


def is_infer(path: str) -> bool:
    """Whether `path` is an infer call: those are admitted (load shedding) like the image endpoints."""
    return INFER.fullmatch(path) is not None


async def protocol_error(request: Request, exc: ProtocolError) -> Response:
    return JSONResponse({"error": str(exc)}, status_code=exc.status, headers=exc.headers)


def _service():
    return get_current_service()


def _bundle(request: Request) -> Bundle:
    service = _service()
    name, version = request.path_params["name"], request.path_params.get("version")
    if name not in service.bundles:
        raise ProtocolError(f"unknown model {name!r}; loaded: {', '.join(service.bundles)}", 404)
    bundle = service.bundles[name]
    if version is not None and version != bundle.manifest.version:
        raise ProtocolError(f"model {name!r} has version {bundle.manifest.version!r}, not {version!r}", 404)
    return bundle


async def live(request: Request) -> Response:
    return JSONResponse({"live": True})


async def ready(request: Request) -> Response:
    is_ready = bool(_service().bundles)
    return JSONResponse({"ready": is_ready}, status_code=200 if is_ready else 503)


async def server_metadata(request: Request) -> Response:
    return JSONResponse({"name": "cifar10", "version": bentoml.__version__, "extensions": list(EXTENSIONS)})


async def model_metadata(request: Request) -> Response:
    bundle = _bundle(request)
    classes = len(bundle.manifest.classes)
    return JSONResponse({
        "name": bundle.manifest.name,
        "versions": [bundle.manifest.version],
        "platform": "onnxruntime_onnx",
        "inputs": [{"name": INPUT, "datatype": "UINT8", "shape": [-1, 32, 32, 3]}],
        "outputs": [
            {"name": "logits", "datatype": "FP32", "shape": [-1, classes]},
            {"name": "probabilities", "datatype": "FP32", "shape": [-1, classes]},
            {"name": "embedding", "datatype": "FP32", "shape": [-1, bundle.manifest.embedding_dim]},
        ],
    })  # fmt: skip


async def model_ready(request: Request) -> Response:
    bundle = _bundle(request)
    return JSONResponse({"name": bundle.manifest.name, "ready": True})


async def model_config(request: Request) -> Response:
    """Triton's model configuration, as its tools read it (perf_analyzer, image_client): a batch
    dimension of up to CIFAR10_MAX_IMAGES, so `dims` leave it out, and the service's batching."""
    bundle, settings = _bundle(request), _service().settings
    sizes = {"logits": len(bundle.manifest.classes), "probabilities": len(bundle.manifest.classes), "embedding": bundle.manifest.embedding_dim}
    return JSONResponse({
        "name": bundle.manifest.name,
        "platform": "onnxruntime_onnx",
        "backend": "onnxruntime",
        "max_batch_size": settings.max_images,
        "input": [{"name": INPUT, "data_type": "TYPE_UINT8", "format": "FORMAT_NHWC", "dims": [32, 32, 3]}],
        "output": [{"name": name, "data_type": "TYPE_FP32", "dims": [sizes[name]]} for name in OUTPUTS],
        "dynamic_batching": {"max_queue_delay_microseconds": round(settings.max_latency_ms * 1000), "preferred_batch_size": [settings.max_batch_size]},
    })  # fmt: skip


def unsupported(extension: str):
    """The route of a protocol extension this server does not implement, refused by the extension's name."""

    async def refuse(request: Request) -> Response:
        raise ProtocolError(f"{request.url.path}: this server does not implement the {extension} extension; its extensions are {', '.join(EXTENSIONS)}")

    return refuse


async def infer(request: Request) -> Response:
    bundle, service = _bundle(request), _service()
    settings = service.settings
    # the largest valid request: a header and max_images tensors as JSON text, nested as json.dumps writes it
    limit = min(settings.max_request_bytes, 65_536 + settings.max_images * IMAGE_VALUES * JSON_BYTES_PER_VALUE)
    body, encoding = await _body(request, limit), request.headers.get("content-encoding")

    def parse():
        header, tensors = _split(_decompressed(body, encoding, limit), request.headers.get(HEADER_LENGTH))
        return header, _images(header, tensors, settings.max_images), _wanted_outputs(header, len(bundle.manifest.classes))

    header, pixels, wanted = parse() if len(body) <= INLINE_BYTES and not encoding else await asyncio.to_thread(parse)
    prediction = await service.batchers[bundle.manifest.name].predict(pixels)
    service.count(bundle, prediction.probabilities.argmax(1))
    values = {"logits": prediction.logits, "probabilities": prediction.probabilities, "embedding": prediction.embeddings}
    answer = lambda: _answer(bundle, header, wanted, values, _encodings(request.headers.get("accept-encoding", "")))  # noqa: E731
    return answer() if len(body) <= INLINE_BYTES else await asyncio.to_thread(answer)  # JSON and compression, as its parsing


def _encodings(accept_encoding: str) -> set[str]:
    """The encodings an Accept-Encoding header allows ("gzip, deflate;q=0.5"), those with q=0 left out."""
    allowed = set()
    for part in accept_encoding.lower().split(","):
        name, _, params = part.partition(";")
        if not re.fullmatch(r"\s*q\s*=\s*0(\.0*)?\s*", params):
            allowed.add(name.strip())
    return allowed


def _decompressed(body: bytes, encoding: str | None, limit: int) -> bytes:
    """A compressed request (tritonclient's `request_compression_algorithm`) as it was before, held to the
    same byte limit as an uncompressed one: a few kilobytes of gzip can unpack to gigabytes."""
    name = (encoding or "identity").strip().lower()
    if name == "identity":
        return body
    if name not in ENCODINGS:
        raise ProtocolError(f"Content-Encoding {encoding!r} is not accepted; send gzip, deflate or an uncompressed body", 415, {"Accept-Encoding": "gzip, deflate"})
    inflate = zlib.decompressobj(ENCODINGS[name])
    try:
        data = inflate.decompress(body, limit + 1)
    except zlib.error as exc:
        raise ProtocolError(f"the {name} body cannot be decompressed ({exc})") from None
    if len(data) > limit:
        raise ProtocolError(f"request over {limit:,} bytes once decompressed (CIFAR10_MAX_IMAGES tensors, CIFAR10_MAX_REQUEST_BYTES)", 413)
    if not inflate.eof or inflate.unused_data:
        raise ProtocolError(f"the {name} body is {'cut short' if not inflate.eof else 'followed by other bytes'}: send one whole {name} stream")
    return data


async def _body(request: Request, limit: int) -> bytes:
    """The request body, refused with 413 past `limit` bytes whatever Content-Length says."""
    declared = _byte_count(request.headers.get("content-length", ""))
    if declared is not None and declared > limit:
        raise ProtocolError(f"request of {declared:,} bytes; at most {limit:,} (CIFAR10_MAX_IMAGES tensors, CIFAR10_MAX_REQUEST_BYTES)", 413)
    chunks, size = [], 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise ProtocolError(f"request over {limit:,} bytes (CIFAR10_MAX_IMAGES tensors, CIFAR10_MAX_REQUEST_BYTES)", 413)
            chunks.append(chunk)
    except ClientDisconnect:  # nobody to answer; not a fault of the server
        raise ProtocolError("the client went away before sending the whole request") from None
    return b"".join(chunks)


def _byte_count(value: str) -> int | None:
    """A header's byte count, or None where it is not one: ASCII digits alone, at most 15 of them."""
    value = value.strip()
    return int(value) if value.isascii() and value.isdigit() and len(value) <= 15 else None


def _split(body: bytes, header_length: str | None) -> tuple[dict[str, Any], bytes]:
    """The JSON header and the binary tensor data after it."""
    length = len(body) if header_length is None else _byte_count(header_length)
    if header_length is not None and (length is None or not 0 < length <= len(body)):
        raise ProtocolError(f"Inference-Header-Content-Length must be a byte count within the body's {len(body):,}, got {header_length!r}")
    try:
        header = json.loads(body[:length])
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:  # JSONDecodeError is a ValueError
        raise ProtocolError(f"the inference request is not JSON ({exc}); binary tensors go after it, with Inference-Header-Content-Length") from None
    if not isinstance(header, dict) or not isinstance(header.get("inputs"), list):
        raise ProtocolError('the inference request must be a JSON object with a list of "inputs"')
    return header, body[length:]


def _images(header: dict[str, Any], tensors: bytes, max_images: int) -> np.ndarray:
    inputs = header["inputs"]
    if len(inputs) != 1 or not isinstance(inputs[0], dict) or inputs[0].get("name") != INPUT:
        raise ProtocolError(f'one input, "{INPUT}" (uint8 [N, 32, 32, 3]), is expected; got {len(inputs)}')
    tensor = inputs[0]
    _no_shared_memory(tensor)
    if tensor.get("datatype") != "UINT8":
        raise ProtocolError(f'input "{INPUT}" must have datatype UINT8, got {tensor.get("datatype")!r}')
    shape = tensor.get("shape")
    if not (isinstance(shape, list) and len(shape) == 4 and all(isinstance(d, int) and not isinstance(d, bool) for d in shape) and shape[1:] == [32, 32, 3]):
        raise ProtocolError(f'input "{INPUT}" must have shape [N, 32, 32, 3], got {shape!r}')
    if not 1 <= shape[0] <= max_images:
        raise ProtocolError(f"{shape[0]} images in one request; 1 to {max_images} (CIFAR10_MAX_IMAGES)")
    size = int(np.prod(shape))
    parameters = tensor.get("parameters") or {}
    binary_size = parameters.get("binary_data_size") if isinstance(parameters, dict) else None
    if binary_size is not None:
        if binary_size != size or len(tensors) != size:
            raise ProtocolError(f"{size:,} bytes of binary tensor data expected for shape {shape}; binary_data_size says {binary_size!r} and the body has {len(tensors):,}")
        return np.frombuffer(tensors, dtype=np.uint8).reshape(shape)
    if tensors:
        raise ProtocolError(f'{len(tensors):,} bytes after the JSON header, but input "{INPUT}" has no binary_data_size')
    values = tensor.get("data")
    try:
        data = np.asarray(values if not isinstance(values, list) or len(values) in (size, shape[0]) else []).reshape(-1)
    except (ValueError, RecursionError):  # ragged or absurdly deep nesting
        data = np.asarray([])
    if data.dtype.kind not in "iu" or data.size != size or data.min() < 0 or data.max() > 255:
        raise ProtocolError(f'input "{INPUT}" needs {size:,} integers 0..255 for shape {shape}, got {data.size:,}')
    return data.astype(np.uint8).reshape(shape)


def _no_shared_memory(tensor: dict[str, Any]) -> None:
    parameters = tensor.get("parameters")
    if isinstance(parameters, dict) and "shared_memory_region" in parameters:
        raise ProtocolError(f'{tensor.get("name")!r} names a shared memory region: this server takes tensors in the request and answers them in the response')


def _wanted_outputs(header: dict[str, Any], classes: int) -> dict[str, Wanted]:
    """How each output asked for is wanted (all, as JSON or binary_data_output says, when none are named)."""
    parameters = header.get("parameters") if isinstance(header.get("parameters"), dict) else {}
    binary_all = _flag(parameters, "binary_data_output", False)
    asked = header.get("outputs")
    if asked is None:
        return {name: Wanted(binary_all) for name in OUTPUTS}
    if not isinstance(asked, list) or not all(
        isinstance(o, dict) and o.get("name") in OUTPUTS and isinstance(o.get("parameters", {}), dict) for o in asked
    ):
        raise ProtocolError(f'"outputs" must list outputs among {", ".join(OUTPUTS)}, each with an optional "parameters" object')
    wanted = {}
    for output in asked:
        _no_shared_memory(output)
        options = output.get("parameters") or {}
        k = options.get("classification", 0)
        if k != 0 and output["name"] == "embedding":
            raise ProtocolError('"classification" (class_count) applies to logits or probabilities: an embedding has no classes')
        if k != 0 and (not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= classes):
            raise ProtocolError(f'"classification" asks for the k best classes, k in 1..{classes}; got {json.dumps(k)} for {output["name"]!r}')
        wanted[output["name"]] = Wanted(_flag(options, "binary_data", binary_all), k)
    return wanted


def _flag(parameters: dict[str, Any], name: str, default: bool) -> bool:
    """A boolean parameter, refused unless JSON true or false (the string "false" is not false)."""
    value = parameters.get(name, default)
    if not isinstance(value, bool):
        raise ProtocolError(f'parameter "{name}" must be true or false, got {json.dumps(value)}')
    return value


def _classification(values: np.ndarray, k: int, classes: tuple[str, ...]) -> list[str]:
    """Triton's classification: each row's k largest values, largest first, as "value:index:label", row after row."""
    best = np.argsort(-values, axis=1, kind="stable")[:, :k]
    return [f"{row[i]:f}:{i}:{classes[i]}" for row, top in zip(values, best) for i in top]


def _answer(bundle: Bundle, header: dict[str, Any], wanted: dict[str, Wanted], values: dict[str, np.ndarray], accepted: set[str]) -> Response:
    """The inference response; compressed where the client's Accept-Encoding (`accepted`) names gzip or deflate, the
    header length then being the uncompressed JSON's, as Triton sends it."""
    outputs, blobs = [], []
    for name, (binary, k) in wanted.items():
        if k:
            strings = _classification(values[name], k, bundle.manifest.classes)
            tensor: dict[str, Any] = {"name": name, "datatype": "BYTES", "shape": [len(values[name]), k]}
            blob = b"".join(struct.pack("<I", len(e)) + e for e in (s.encode() for s in strings))  # each element: its length, then its bytes
            data = strings
        else:
            array = np.ascontiguousarray(values[name], dtype=np.float32)
            tensor = {"name": name, "datatype": "FP32", "shape": list(array.shape)}
            blob, data = array.tobytes(), array.reshape(-1).tolist()
        if binary:
            blobs.append(blob)
            tensor["parameters"] = {"binary_data_size": len(blob)}
        else:
            tensor["data"] = data
        outputs.append(tensor)
    answer = {"model_name": bundle.manifest.name, "model_version": bundle.manifest.version, "outputs": outputs}
    if "id" in header:
        answer["id"] = header["id"]
    text = json.dumps(answer).encode()
    body, headers = text + b"".join(blobs), {"Inference-Header-Content-Length": str(len(text))} if blobs else {}
    if encoding := next((e for e in ENCODINGS if e in accepted), None):  # tritonclient's response_compression_algorithm
        body, headers = _compressed(body, encoding), headers | {"Content-Encoding": encoding, "Vary": "Accept-Encoding"}
    return Response(body, media_type="application/octet-stream" if blobs else "application/json", headers=headers)


def _compressed(body: bytes, encoding: str) -> bytes:
    """gzip, or HTTP's "deflate" (the zlib format), at the fastest level: answers are small and the cores are the model's."""
    compressor = zlib.compressobj(1, wbits=ENCODINGS[encoding])
    return compressor.compress(body) + compressor.flush()


async def http_error(request: Request, exc: HTTPException) -> Response:
    """Starlette's own refusals (a GET to infer: 405) in the protocol's error shape."""
    return JSONResponse({"error": f"{exc.detail}: {request.method} {request.url.path}"}, status_code=exc.status_code, headers=exc.headers)


async def server_error(request: Request, exc: Exception) -> Response:
    """A fault of ours, in the protocol's error shape too; Starlette re-raises it for the server's log."""
    return JSONResponse({"error": f"internal error ({type(exc).__name__}) at {request.url.path}; the server's log has the details"}, status_code=500)


MODEL = "/v2/models/{name}"
VERSION = "/v2/models/{name}/versions/{version}"
# the routes of the extensions not implemented: refused by name, and "stats" never taken for a model's name
UNSUPPORTED = {
    "/v2/models/stats": "statistics", MODEL + "/stats": "statistics", VERSION + "/stats": "statistics",
    "/v2/repository{rest:path}": "model repository", "/v2/systemsharedmemory{rest:path}": "system shared memory",
    "/v2/cudasharedmemory{rest:path}": "CUDA shared memory", "/v2/trace/setting": "trace", MODEL + "/trace/setting": "trace",
    "/v2/logging": "logging",
}  # fmt: skip
app = Starlette(
    routes=[
        *[Route(path, unsupported(extension), methods=["GET", "POST"]) for path, extension in UNSUPPORTED.items()],
        Route("/v2", server_metadata),
        Route("/v2/health/live", live),
        Route("/v2/health/ready", ready),
        *[Route(prefix, model_metadata) for prefix in (MODEL, VERSION)],
        *[Route(prefix + "/ready", model_ready) for prefix in (MODEL, VERSION)],
        *[Route(prefix + "/config", model_config) for prefix in (MODEL, VERSION)],
        *[Route(prefix + "/infer", infer, methods=["POST"]) for prefix in (MODEL, VERSION)],
    ],
    exception_handlers={HTTPException: http_error, ProtocolError: protocol_error, Exception: server_error},
)
