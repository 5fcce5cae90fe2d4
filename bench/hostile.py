"""A catalogue of hostile uploads, and a run of it against a live service with time and memory.

    python -m bench.hostile [--rounds 20]               # starts `bentoml serve` in the repository root
    python -m bench.hostile --url http://127.0.0.1:3000  # a service already running (memory not reported)

Each case is a request a careless or hostile client could send: corrupt and truncated files of
every accepted format, formats off the list, decompression bombs (declared sizes and real ones),
metadata bombs, animated images, polyglots, bodies over the size limit. Every one must get its
expected status (4xx, or 200 where the image is legitimate: 16-bit, CMYK, a PNG with a ZIP
appended) with a JSON error naming the problem, and the good request after it must succeed.
tests/test_hostile.py runs the catalogue in CI; this command prints, per case, the status, the
slowest answer over --rounds and the server's memory before and after.
"""

from __future__ import annotations

import argparse
import io
import struct
import time
import zlib
from dataclasses import dataclass, field

import httpx
import numpy as np
from PIL import Image, PngImagePlugin

from bundle.images import FORMATS

MAX_IMAGE_BYTES = 10_000_000  # the service's default CIFAR10_MAX_IMAGE_BYTES, which the oversize cases exceed


@dataclass(frozen=True)
class Case:
    files: list[bytes]  # multipart uploads to /classify; one raw body when raw_type is set
    status: int
    message: str = ""  # a fragment of the JSON error ("" for 200)
    raw_type: str = ""  # Content-Type of a raw-body request
    data: dict = field(default_factory=dict)  # form fields
    filename: str = ""  # of every upload ("0.bin", "1.bin", … when empty)

    def send(self, client: httpx.Client) -> httpx.Response:
        if self.raw_type:
            return client.post("/classify", content=self.files[0], headers={"Content-Type": self.raw_type})
        uploads = [("images", (self.filename or f"{i}.bin", blob, "application/octet-stream")) for i, blob in enumerate(self.files)]
        return client.post("/classify", files=uploads, data=self.data)


def encode(image: Image.Image, fmt: str, **options) -> bytes:
    out = io.BytesIO()
    image.save(out, format=fmt, **options)
    return out.getvalue()


def picture(seed: int = 0, size: int = 64) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8))


def with_size(fmt: str, width: int, height: int) -> bytes:
    """A small real file whose header declares width × height: a decompression bomb as it arrives."""
    data = bytearray(encode(picture(), fmt))
    if fmt == "GIF":  # logical screen, then the image descriptor
        data[6:10] = struct.pack("<HH", width, height)
        i = data.index(b"\x2c")
        data[i + 5 : i + 9] = struct.pack("<HH", width, height)
    elif fmt == "BMP":
        data[18:26] = struct.pack("<ii", width, height)
    elif fmt == "JPEG":  # baseline start-of-frame
        i = data.index(b"\xff\xc0")
        data[i + 5 : i + 9] = struct.pack(">HH", height, width)
    return bytes(data)


def flipped(data: bytes, start: float, count: int = 64) -> bytes:
    out = bytearray(data)
    first = int(len(out) * start)
    for i in range(first, min(first + count, len(out))):
        out[i] ^= 0xFF
    return bytes(out)


def catalogue() -> dict[str, Case]:
    cases: dict[str, Case] = {}
    for fmt in FORMATS:
        good = encode(picture(), fmt)
        cases[f"{fmt} truncated to half"] = Case([good[: len(good) // 2]], 400, "corrupt or truncated")
        cases[f"{fmt} header only (40 bytes)"] = Case([good[:40]], 400, "")
        # a flipped run of bytes in the pixel data may still decode: 200 or 400, never a 5xx
        cases[f"{fmt} 64 flipped bytes"] = Case([flipped(good, 0.6)], 0)
    info = PngImagePlugin.PngInfo()
    info.add_text("bomb", "A" * 50_000_000, zip=True)  # 50 MB of text, compressed to ~60 kB
    exif = Image.Exif()
    exif[0x010E] = "x" * 60_000  # ImageDescription: a 60 kB EXIF block
    icc = np.random.default_rng(1).integers(0, 256, 5_000_000, dtype=np.uint8).tobytes()
    animated = {"save_all": True, "append_images": [picture(1)]}
    cases |= {
        "zero-byte file": Case([b""], 400, "empty"),
        "zero-byte raw body": Case([b""], 400, "empty", raw_type="image/png"),
        "text": Case([b"hello, world"], 400, "not an image"),
        "SVG with an external entity": Case([b'<?xml version="1.0"?><!DOCTYPE x [<!ENTITY e SYSTEM "file:///etc/passwd">]><svg>&e;</svg>'], 400, "not an image"),
        "PDF": Case([b"%PDF-1.7\n" + b"0" * 100], 400, "not an image"),
        "ICO (a format off the list)": Case([encode(picture(size=32), "ICO")], 400, "not an image"),
        "HTML as image/png": Case([b"<html><script>alert(1)</script></html>"], 400, "not an image", raw_type="image/png"),
        "JPEG marker + HTML": Case([b"\xff\xd8\xff\xe0<html><script>alert(1)</script></html>"], 400, "corrupt or truncated"),
        "GIF/JavaScript polyglot": Case([b"GIF89a/*\x00\x00\x00*/=alert(1);"], 400, "not an image"),
        "PNG with a ZIP appended (polyglot)": Case([encode(picture(), "PNG") + b"PK\x03\x04" + bytes(100)], 200),
        "1x1 PNG": Case([encode(Image.new("RGB", (1, 1)), "PNG")], 400, "too small"),
        "PNG declaring 20000x20000": Case([png_header_only(20_000, 20_000)], 400, "too large"),
        "GIF declaring 65535x65535": Case([with_size("GIF", 65_535, 65_535)], 400, "too large"),
        "BMP declaring 30000x30000": Case([with_size("BMP", 30_000, 30_000)], 400, "too large"),
        "JPEG declaring 65000x65000": Case([with_size("JPEG", 65_000, 65_000)], 400, "too large"),
        "real 1-bit PNG of 20000x20000 (49 kB)": Case([encode(Image.new("1", (20_000, 20_000)), "PNG")], 400, "too large"),
        "PNG with a 50 MB zTXt bomb": Case([encode(picture(), "PNG", pnginfo=info)], 400, "corrupt or truncated"),
        "PNG with a 5 MB ICC profile": Case([encode(picture(), "PNG", icc_profile=icc)], 400, "corrupt or truncated"),
        "JPEG with a 5 MB ICC profile": Case([encode(picture(), "JPEG", icc_profile=icc)], 200),
        "JPEG with a 60 kB EXIF block": Case([encode(picture(), "JPEG", exif=exif)], 200),
        "animated GIF": Case([encode(picture(), "GIF", **animated)], 400, "animated"),
        "animated PNG": Case([encode(picture(), "PNG", **animated)], 400, "animated"),
        "animated WebP": Case([encode(picture(), "WEBP", **animated)], 400, "animated"),
        "16-bit grey PNG": Case([encode(Image.fromarray(np.full((32, 32), 40_000, np.uint16)), "PNG")], 200),
        "CMYK JPEG": Case([encode(picture().convert("CMYK"), "JPEG")], 200),
        "file over the size limit": Case([b"\x89PNG" + bytes(MAX_IMAGE_BYTES)], 413, "over the limit"),
        "raw body over the size limit": Case([b"\x89PNG" + bytes(MAX_IMAGE_BYTES)], 413, "over the limit", raw_type="image/png"),
        "65 images in one request": Case([encode(picture(size=8), "PNG")] * 65, 400, "at most 64"),
        "model name with a path": Case([encode(picture(), "PNG")], 400, "unknown model", data={"model": "../models/cnn"}),
        "file name with a path": Case([encode(picture(), "PNG")], 200, filename="../../../../tmp/evil.png"),
        "file name of 300 bytes": Case([encode(picture(), "PNG")], 200, filename="é" * 150 + ".png"),
    }
    return cases


def png_header_only(width: int, height: int) -> bytes:
    """A PNG that declares its size and holds no pixels."""
    chunk = lambda kind, body: struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))  # noqa: E731
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)) + chunk(b"IEND", b"")


def check(case: Case, answer: httpx.Response) -> str:
    """'' when the answer is what the case expects, else what is wrong."""
    if case.status == 0:  # either is right, never a 5xx
        return "" if answer.status_code in (200, 400) else f"status {answer.status_code}: {answer.text[:200]}"
    if answer.status_code != case.status:
        return f"status {answer.status_code}, expected {case.status}: {answer.text[:200]}"
    if case.status != 200 and case.message not in answer.json().get("error", ""):
        return f"error {answer.text[:200]!r} does not say {case.message!r}"
    return ""


def run(url: str, rss, rounds: int) -> tuple[list[str], int, int]:
    """Every case once to warm up, then `rounds` times, each followed by a good request: (a table row per case,
    rss() after the warm-up, rss() at the end). Raises AssertionError listing every unexpected answer."""
    good = encode(picture(7), "PNG")
    rows, failures = [], []
    cases = catalogue()
    with httpx.Client(base_url=url, timeout=30) as client:
        for case in cases.values():
            case.send(client)
        before = rss()
        for name, case in cases.items():
            slowest, status = 0.0, None
            for _ in range(rounds):
                started = time.perf_counter()
                answer = case.send(client)
                slowest = max(slowest, time.perf_counter() - started)
                status = answer.status_code
                failures += [f"{name}: {problem}"] if (problem := check(case, answer)) else []
                after_it = client.post("/classify", files=[("images", ("good.png", good, "image/png"))])
                failures += [f"{name}: the good request after it got {after_it.status_code}"] if after_it.status_code != 200 else []
            rows.append(f"| {name} | {status} | {slowest * 1000:,.0f} ms |")
    if failures:
        raise AssertionError("\n".join(failures))
    return rows, before, rss()


def main() -> None:
    from bench.harness import REPO, SERVE, running
    from bench.http_load import machine

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", help="a running service (its memory is then not reported)")
    parser.add_argument("--rounds", type=int, default=20)
    args = parser.parse_args()
    print(f"machine: {machine()}; {len(catalogue())} cases × {args.rounds} rounds, each followed by a good request")
    print("| case | status | slowest answer |\n| --- | ---: | ---: |")
    if args.url:
        print("\n".join(run(args.url, lambda: 0, args.rounds)[0]))
        return
    (REPO / "logs").mkdir(exist_ok=True)
    with running(SERVE, REPO / "logs" / "hostile_server.log") as server:
        rows, before, after = run(server.url, lambda: server.rss, args.rounds)
    print("\n".join(rows))
    print(f"\nserver memory (supervisor + worker): {before / 2**20:,.0f} MiB after one warm-up round, {after / 2**20:,.0f} MiB at the end ({(after - before) / 2**20:+,.1f} MiB)")


if __name__ == "__main__":
    main()
