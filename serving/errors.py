"""How the service says no: one JSON error shape, stated in the OpenAPI document.

Every 4xx and 5xx answer is `{"error": "what went wrong and what to do"}`, plus `detail` (a list
of per-field problems) when BentoML's request validation refuses a parameter. BentoML 1.4 wraps
the errors its endpoints raise in a one-element list and documents `detail` as a string; the
`ErrorAnswers` middleware unwraps the list and rewrites `/docs.json` to declare what is really
sent, including the statuses BentoML leaves out (405, 411, 413, 415, 429, 504).

Load shedding, which answers 429 in this shape, is serving/admission.py.
"""

from __future__ import annotations

import json

ERROR_SCHEMA = {
    "title": "Error",
    "type": "object",
    "properties": {
        "error": {"type": "string", "description": "what went wrong, and what to do about it"},
        "detail": {
            "type": "array",
            "items": {"type": "object"},
            "description": "request validation only: one entry per parameter refused (loc, msg, type)",
        },
    },
    "required": ["error"],
}

HOW_TO_SEND = (
    "send the images as multipart/form-data files named 'images', or one image as the raw body "
    "with Content-Type image/* or application/octet-stream"
)

# status → when it is sent; every image endpoint may answer each of these
ERROR_STATUSES = {
    400: "bad request: no body, an image that cannot be decoded or is out of limits, an unknown model, a parameter out of range",
    405: "a method other than POST",
    411: "a multipart body without a Content-Length (chunked uploads are not accepted)",
    413: "an image over CIFAR10_MAX_IMAGE_BYTES, or a request over CIFAR10_MAX_REQUEST_BYTES",
    415: f"a body of a type no endpoint reads: {HOW_TO_SEND}",
    429: "overloaded: as many requests in flight as the worker admits at once (at most CIFAR10_MAX_CONCURRENCY, fewer while they take longer than CIFAR10_TARGET_LATENCY_S), and no place freed within CIFAR10_MAX_QUEUE_WAIT_S (or CIFAR10_MAX_QUEUE already waiting); retry after the Retry-After seconds",
    500: "a fault of the server (its log has the traceback)",
    504: "not answered within CIFAR10_TIMEOUT_S",
}
# what a route that reads no upload (/models) may answer: it has no body limits and sheds no load
BODYLESS_STATUSES = (400, 405, 500, 504)


async def send_error(send, status: int, message: str, headers: tuple[tuple[bytes, bytes], ...] = ()) -> None:
    body = json.dumps({"error": message}).encode()
    await send({
        "type": "http.response.start", "status": status,
        "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()), *headers],
    })  # fmt: skip
    await send({"type": "http.response.body", "body": body})


def document_errors(spec: dict, routes: tuple[str, ...], bodyless: tuple[str, ...] = ()) -> dict:
    """The OpenAPI document with one Error schema behind every error status each route can answer."""
    schemas = spec.setdefault("components", {}).setdefault("schemas", {})
    for bentoml_own in ("InvalidArgument", "NotFound", "InternalServerError"):
        schemas.pop(bentoml_own, None)
    schemas["Error"] = ERROR_SCHEMA
    reference = {"$ref": "#/components/schemas/Error"}
    for route in (*routes, *bodyless):
        responses = spec["paths"][route]["post"]["responses"]
        for status in [s for s in responses if str(s) != "200"]:
            del responses[status]
        for status in ERROR_STATUSES if route in routes else BODYLESS_STATUSES:
            responses[str(status)] = {"description": ERROR_STATUSES[status], "content": {"application/json": {"schema": reference}}}
    for route in bodyless:  # read with a GET too (serving/uploads.py)
        post = spec["paths"][route]["post"]
        post["responses"]["405"] = dict(post["responses"]["405"], description="a method other than GET, HEAD or POST")
        spec["paths"][route]["get"] = {k: v for k, v in post.items() if k != "requestBody"} | {"operationId": f"{post.get('operationId', route.strip('/'))}_get"}
    return spec


def field_problem(detail: dict) -> str:
    """One entry of a request validation's `detail` as its answer and its log line name it: "k: Input should be ..."."""
    return ": ".join(filter(None, (".".join(map(str, detail.get("loc", ()))), detail.get("msg", ""))))


def one_error(content):
    """BentoML's error answer as one object whose `error` says what to fix."""
    if isinstance(content, list) and len(content) == 1 and isinstance(content[0], dict):
        content = content[0]  # BentoML 1.4 wraps the errors its endpoints raise in a list
    if isinstance(content, dict) and isinstance(content.get("detail"), list):  # request validation: name each field
        problems = [field_problem(d) for d in content["detail"] if isinstance(d, dict)]
        detail = [{k: v for k, v in d.items() if k != "url"} if isinstance(d, dict) else d for d in content["detail"]]  # pydantic's docs, not ours
        content = dict(content, error="; ".join(problems) or content.get("error", ""), detail=detail)
    return content


class ErrorAnswers:
    """Unwrap BentoML's one-element error lists, and serve the corrected OpenAPI document."""

    def __init__(self, app, routes: tuple[str, ...], bodyless: tuple[str, ...] = ()):
        self.app = app
        self.routes, self.bodyless = routes, bodyless

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        document = scope["path"] == "/docs.json"
        start: dict = {}
        body = bytearray()

        async def rewrite(message):
            if message["type"] == "http.response.start":
                headers = dict(message["headers"])
                is_json = headers.get(b"content-type", b"").startswith(b"application/json")
                if (is_json and (document or message["status"] >= 400)) or message["status"] == 404:
                    start.update(message)  # held back until the body is complete
                    return None
                return await send(message)
            if not start:
                return await send(message)
            body.extend(message.get("body", b""))
            if message.get("more_body", False):
                return None
            if start["status"] == 404 and not dict(start["headers"]).get(b"content-type", b"").startswith(b"application/json"):
                endpoints = [f"POST {r}" for r in self.routes] + [f"GET or POST {r}" for r in self.bodyless]
                content = {"error": f"no route {scope['path']}; the endpoints are {', '.join(endpoints)} and the /v2 inference protocol's (see / or /docs.json)"}
            else:
                content = json.loads(body)
            fixed = json.dumps(document_errors(content, self.routes, self.bodyless) if document else one_error(content)).encode()
            headers = [(k, v) for k, v in start["headers"] if k not in (b"content-length", b"content-type")]
            headers += [(b"content-type", b"application/json"), (b"content-length", str(len(fixed)).encode())]
            await send(dict(start, headers=headers))
            await send({"type": "http.response.body", "body": fixed})

        await self.app(scope, receive, rewrite)
