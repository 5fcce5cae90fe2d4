"""How images arrive over HTTP: multipart file uploads, or one image as the raw request body.

The `Bodies` middleware sees every request to an endpoint before BentoML reads it:
- a GET (or HEAD) of a route without parameters (/models) is read as the POST BentoML serves; any other
  method than POST is a 405, a request without a body a 400, and a body of a type no
  endpoint reads (text/plain, XML, BentoML's pickles) a 415, each saying what to send instead;
- a body over its limit is refused with 413 from its Content-Length (CIFAR10_MAX_REQUEST_BYTES for
  a form, CIFAR10_MAX_IMAGE_BYTES for one raw image), and a form without a Content-Length (a chunked
  upload) with 411, so nothing unbounded is ever spooled;
- a raw body (`curl --data-binary @cat.png -H 'Content-Type: image/png' 'URL/topk?k=3'`) is read up to
  the per-image limit and rewritten into the multipart form the endpoints take (the body as the one
  file of `images`; the query string's fields join every form, boundary.py): BentoML 1.4 parses a
  body by its Content-Type into parameters, and an image body has no parameter to go to. Both forms
  then share every check.
"""

from __future__ import annotations

import secrets
from pathlib import Path
from typing import Annotated

from pydantic import WrapValidator
from starlette.datastructures import UploadFile

from bundle.images import iso_image
from serving.errors import HOW_TO_SEND, send_error

INLINE_BYTES = 256 * 1024  # a request body up to this size is decoded or parsed on the event loop; a larger one in a thread
INLINE_PIXELS = 256 * 1024  # and its images' pixels in all (width × height, from their headers) up to this many
RAW_TYPES = ("image/", "application/octet-stream")
RAW_BODY_NAME = "body"  # the file name a raw body's image gets in the form it is rewritten into
# what BentoML parses into parameters; no Content-Type at all is read as JSON
FORM_TYPES = ("multipart/form-data", "application/x-www-form-urlencoded", "application/json", "")


class Bodies:
    def __init__(
        self, app, paths: tuple[str, ...], post_only: tuple[str, ...], max_image_bytes: int, max_request_bytes: int, readable: tuple[str, ...] = ()
    ):  # fmt: skip
        self.app = app
        self.paths = paths  # the image endpoints
        self.post_only = post_only  # every API route: BentoML answers other methods with a plain-text 405
        self.readable = readable  # routes without parameters that a GET reads too (BentoML's routes are POST only)
        self.max_bytes = max_image_bytes
        self.max_request_bytes = max_request_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["path"] not in self.post_only:
            return await self.app(scope, receive, send)
        if scope["method"] in ("GET", "HEAD") and scope["path"] in self.readable:
            return await self.app(*_with_body(scope, receive, b"{}", b"application/json"), send)
        headers = dict(scope["headers"])
        if scope["method"] != "POST":  # a browser's preflight is answered before this, where CORS is on (serving/boundary.py)
            allowed = "GET, HEAD, POST" if scope["path"] in self.readable else "POST"
            message = f"{scope['method']} {scope['path']} is not served: use {' or '.join(allowed.split(', '))} (the API is described at /docs.json)"
            return await send_error(send, 405, message, ((b"allow", allowed.encode()),))
        if scope["path"] in self.readable:  # a listing takes no fields: a body with any is refused, not ignored
            body = await _body_upto(receive, 1024)
            if body is None:
                return
            if body.strip() not in (b"", b"{}"):
                return await send_error(send, 400, f"POST {scope['path']} takes no fields: send no body or {{}}, or GET it")
            return await self.app(*_with_body(scope, receive, b"{}", b"application/json"), send)
        if scope["path"] not in self.paths:
            return await self.app(scope, receive, send)
        content_type = headers.get(b"content-type", b"").decode("latin-1").split(";")[0].strip().lower()
        declared = headers.get(b"content-length", b"")
        if declared == b"0" or (not declared and b"chunked" not in headers.get(b"transfer-encoding", b"").lower()):
            return await send_error(send, 400, f"empty request (no body): {HOW_TO_SEND}")
        if content_type not in FORM_TYPES and not content_type.startswith(RAW_TYPES):
            return await send_error(send, 415, f"a body of Content-Type {content_type!r} is not read here: {HOW_TO_SEND}")
        if not content_type.startswith(RAW_TYPES):
            scope = _lowercase_media_type(scope)
            if not declared.isdigit():
                return await send_error(send, 411, "send the body with a Content-Length (chunked uploads are not accepted)")
            if int(declared) > self.max_request_bytes:
                message = f"request body of {int(declared):,} bytes, over the limit of {self.max_request_bytes:,} (CIFAR10_MAX_REQUEST_BYTES)"
                return await send_error(send, 413, message)
            return await self.app(scope, receive, send)
        if declared.isdigit() and int(declared) > self.max_bytes:
            return await self._too_large(int(declared), send)
        body = await _body_upto(receive, self.max_bytes)
        if body is None:  # the client went away: nobody to answer
            return
        if len(body) > self.max_bytes:
            return await self._too_large(len(body), send)
        form, boundary = _multipart(body, content_type)
        await self.app(*_with_body(scope, receive, form, b"multipart/form-data; boundary=" + boundary), send)

    async def _too_large(self, size: int, send) -> None:
        await send_error(send, 413, f"image body of {size:,}+ bytes, over the limit of {self.max_bytes:,} (CIFAR10_MAX_IMAGE_BYTES)")


# the first bytes of each image format the decoder takes (WebP: RIFF, then its size, then WEBP)
SIGNATURES = {b"\x89PNG": "png", b"\xff\xd8\xff": "jpeg", b"GIF8": "gif", b"BM": "bmp", b"II*\x00": "tiff", b"MM\x00*": "tiff"}


def unknown_field(name: str, declared: str, content_type: str) -> str:
    """Why a form field is refused. A name that begins with an image's bytes is an image posted as a
    urlencoded form: what `curl --data-binary @cat.jpg URL` sends without a Content-Type of its own."""
    head = name.encode("latin-1", "replace")
    kind = (
        "webp" if head[:4] == b"RIFF" and head[8:12] == b"WEBP"
        else iso_image(head)  # AVIF, a phone's HEIC; a video's ISO media is no image
        or next((k for sig, k in SIGNATURES.items() if head.startswith(sig)), None)
    )  # fmt: skip
    if kind:
        return (
            f"the body is an image ({kind.upper()}) sent as {content_type.split(';')[0] or 'a form'} (curl's default for --data-binary): "
            f"add -H 'Content-Type: image/{kind}', or send it as a file with -F images=@FILE"
        )
    shown = name if len(name) <= 40 else name[:40] + "…"
    return f"unknown field {shown!r}; this endpoint takes {declared or 'no fields'}"


async def _body_upto(receive, limit: int) -> bytes | None:
    """The request body, or as much of it past `limit` bytes as tells that it is over; None if the client left."""
    body = bytearray()
    while len(body) <= limit:
        message = await receive()
        if message["type"] == "http.disconnect":
            return None
        body += message.get("body", b"")
        if not message.get("more_body", False):
            break
    return bytes(body)


def _lowercase_media_type(scope):
    """The scope with its Content-Type's media type in lower case: media types are case-insensitive, and
    BentoML looks its parser up by the exact string (`Multipart/Form-Data` was read as JSON)."""

    def lowered(value: bytes) -> bytes:
        media_type, semicolon, parameters = value.partition(b";")
        return media_type.strip().lower() + semicolon + parameters

    headers = [(k, lowered(v) if k == b"content-type" else v) for k, v in scope["headers"]]
    return scope if headers == list(scope["headers"]) else dict(scope, headers=headers)


def _with_body(scope, receive, body: bytes, content_type: bytes):
    """(scope, receive) of a POST of `body`, as the endpoint should read it."""
    replaced = {b"content-type", b"content-length"}
    headers = [(k, v) for k, v in scope["headers"] if k not in replaced]
    scope = dict(scope, method="POST", headers=headers + [(b"content-type", content_type), (b"content-length", str(len(body)).encode())])
    sent = False

    async def replay():
        nonlocal sent
        if sent:
            return await receive()  # after the body: wait for the client's disconnect
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    return scope, replay


def _multipart(image: bytes, content_type: str) -> tuple[bytes, bytes]:
    boundary = secrets.token_hex(16).encode()
    part = (
        b"--" + boundary + b'\r\nContent-Disposition: form-data; name="images"; filename="' + RAW_BODY_NAME.encode() + b'"\r\n'
        b"Content-Type: " + content_type.encode("latin-1") + b"\r\n\r\n" + image + b"\r\n"
    )
    return part + b"--" + boundary + b"--\r\n", boundary


def _upload(value, handler):
    if not isinstance(value, UploadFile):  # a URL or text where a file belongs: never fetched, never written
        raise ValueError("must be an uploaded file (multipart) or the raw body")
    return value


def upload_bytes(upload: UploadFile, limit: int) -> bytes:
    """The file's bytes, or ValueError when it holds more than `limit`: an over-limit file is never read into memory."""
    size = upload.file.seek(0, 2)
    if size > limit:
        raise ValueError(f"{size:,} bytes, over the limit of {limit:,} (CIFAR10_MAX_IMAGE_BYTES)")
    upload.file.seek(0)
    return upload.file.read()


# One uploaded image, handed to the endpoint as Starlette's UploadFile (spooled: in memory up to 1 MB,
# on disk beyond). Declared as a Path so that BentoML parses and documents it as a multipart file; the
# validator then skips BentoML's own, which copies each upload into a temporary file named after the
# client's filename (a 500 for names over 255 bytes) that the endpoint would only read back.
Upload = Annotated[Path, WrapValidator(_upload)]
