"""HTTP load in the manner of Triton's perf_analyzer: closed-loop clients at fixed concurrency.

    python -m bench.http_load --url http://127.0.0.1:3000            # a server already running
    python -m bench.http_load --serve                                 # start `bentoml serve` here
    python -m bench.http_load --serve --env CIFAR10_MAX_LATENCY_MS=5 --concurrency 16 64
    python -m bench.http_load --serve --naive --model cnn --concurrency 1 4 16 32 64

With --serve, the bundle's in-process onnxruntime rate (batch 1 and 64, the ceiling for the
HTTP figures) is measured first. --naive then runs the same load against bench/naive_app.py
(Starlette + eager PyTorch under uvicorn, --workers processes) and prints our ratio to it.

Each of `concurrency` clients sends a request, waits for the answer, sends the next, for
--seconds after a one-second warm-up; requests carry real CIFAR-10 test images as PNG. Printed
per setting: requests/s, images/s, p50/p90/p99 latency and the error rate (any non-200).
The client is this one Python process (asyncio streams, requests encoded before the run): on a
small machine it shares the cores with the server, which the figures then include.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import io
import os
import pickle
import platform
import random
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

from bench.harness import REPO, SERVE, Server, running
from training.machine import cpu_model

NAIVE = [sys.executable, "-m", "bench.naive_app", "--port", "{port}", "--workers", "{workers}"]
MINIMAL = [sys.executable, "-m", "bench.minimal_app", "--port", "{port}", "--workers", "{workers}"]


def test_pngs(data_dir: Path, count: int) -> list[bytes]:
    """The first `count` CIFAR-10 test images, PNG-encoded."""
    if not (data_dir / "test_batch").is_file():
        raise SystemExit(f"no CIFAR-10 test_batch in {data_dir}: pass --data-dir or set CIFAR10_DATA_DIR to the cifar-10-batches-py folder")
    with open(data_dir / "test_batch", "rb") as f:
        batch = pickle.load(f, encoding="latin1")
    key = "data" if "data" in batch else b"data"
    pixels = np.asarray(batch[key][:count]).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    blobs = []
    for image in pixels:
        out = io.BytesIO()
        Image.fromarray(image).save(out, format="PNG")
        blobs.append(out.getvalue())
    return blobs


@dataclass
class Result:
    per_request: int
    concurrency: int
    seconds: float
    latencies: list[float]  # of the answers with status 200
    statuses: collections.Counter  # every other answer by status; 0: no answer (refused, reset, timed out)

    @property
    def errors(self) -> int:
        return sum(self.statuses.values())

    def row(self) -> str:
        done = len(self.latencies) + self.errors
        p50, p90, p99 = (np.percentile(self.latencies, q) * 1000 if self.latencies else float("nan") for q in (50, 90, 99))
        rate = len(self.latencies) / self.seconds
        return (
            f"| {self.per_request} | {self.concurrency} | {rate:,.1f} | {rate * self.per_request:,.0f} | "
            f"{p50:.1f} | {p90:.1f} | {p99:.1f} | {self.errors / max(done, 1):.1%} |"
        )


HEADER = [
    "| images/request | concurrency | requests/s | images/s | p50 ms | p90 ms | p99 ms | errors |",
    "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
]


async def load(url: str, requests: list[bytes], per_request: int, concurrency: int, seconds: float, warmup: float = 1.0) -> Result:
    """`concurrency` closed-loop clients sending `requests` in turn for warmup + seconds; only answers
    that arrive in the timed part are counted.

    Each client keeps one HTTP/1.1 connection and sends requests encoded before the run (`forms`;
    plain asyncio streams, not httpx): on a small machine the client must leave the cores to the
    server, and httpx encoding 64 files per request competed with it for them."""
    latencies: list[float] = []
    statuses: collections.Counter = collections.Counter()
    count = len(requests)
    start = time.perf_counter()
    counting_from, stop = start + warmup, start + warmup + seconds

    async def client_loop(offset: int) -> None:
        connection, i = None, offset
        while (now := time.perf_counter()) < stop:
            try:
                connection = connection or await asyncio.open_connection(*address(url))
                status, keep = await asyncio.wait_for(exchange(*connection, requests[i % count]), 120)
            except LOST:
                status, keep = 0, False
            i += concurrency
            if not keep and connection:
                connection[1].close()
                connection = None
            if counting_from <= (done := time.perf_counter()) <= stop:  # answers within the timed window: a rate without edge effects
                if status == 200:
                    latencies.append(done - now)
                else:
                    statuses[status] += 1
        if connection:
            connection[1].close()

    await asyncio.gather(*(client_loop(c) for c in range(concurrency)))
    return Result(per_request, concurrency, seconds, latencies, statuses)


# how a connection fails under the clients below: refused, reset, closed mid-answer, a garbled status line, a timeout
LOST = (OSError, asyncio.IncompleteReadError, ValueError, IndexError, TimeoutError)


def address(url: str) -> tuple[str, int]:
    host, port = url.split("//", 1)[1].split(":")
    return host, int(port)


def http_request(url: str, target: str, content_type: str, body: bytes, headers: dict[str, str] | None = None) -> bytes:
    host, port = address(url)
    extra = "".join(f"{name}: {value}\r\n" for name, value in (headers or {}).items())
    head = f"POST {target} HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: {content_type}\r\nContent-Length: {len(body)}\r\n{extra}\r\n"
    return head.encode() + body


def form_request(url: str, blobs: list[bytes], model: str | None) -> bytes:
    """POST /classify with `blobs` as the multipart field `images` (and `model`), as one byte string."""
    files = [("images", (f"{j}.png", blob, "image/png")) for j, blob in enumerate(blobs)]
    request = httpx.Request("POST", f"{url}/classify", files=files, data={"model": model} if model else {})
    return http_request(url, "/classify", request.headers["Content-Type"], request.read())


def forms(url: str, blobs: list[bytes], per_request: int, model: str | None = None) -> list[bytes]:
    """Up to 256 distinct /classify requests of `per_request` images each, for `load`."""
    count = max(1, min(len(blobs) // per_request, 256))
    return [form_request(url, blobs[k * per_request : (k + 1) * per_request], model) for k in range(count)]


@dataclass
class Answers:
    """What an open-loop run got back: latencies of the served and the refused, and every other outcome."""

    rate: float  # requests/s offered
    seconds: float  # of offering
    served: list[float] = field(default_factory=list)  # 200
    refused: list[float] = field(default_factory=list)  # 429
    failed: collections.Counter = field(default_factory=collections.Counter)  # any other status, a timeout, a lost connection
    until_last: float = 0.0  # seconds from the first request to the last answer

    @property
    def sent(self) -> int:
        return len(self.served) + len(self.refused) + sum(self.failed.values())


def raw_request(url: str, blob: bytes, model: str | None) -> bytes:
    """One image as the raw body of POST /classify, encoded once: the open-loop client must be cheap."""
    return http_request(url, f"/classify?model={model}" if model else "/classify", "image/png", blob)


async def exchange(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, request: bytes) -> tuple[int, bool]:
    """(status, whether the server keeps the connection open) for one HTTP/1.1 request."""
    writer.write(request)
    status = int((await reader.readline()).split()[1])
    length, keep = 0, True
    while (line := await reader.readline()) not in (b"\r\n", b""):
        name, _, value = line.decode("latin-1").partition(":")
        if name.lower() == "content-length":
            length = int(value)
        elif name.lower() == "connection" and value.strip().lower() == "close":
            keep = False
    await reader.readexactly(length)
    return status, keep


async def open_loop(
    url: str, blobs: list[bytes], rate: float, seconds: float, model: str | None = None, deadline: float = 30.0, seed: int = 0
) -> Answers:
    """Single-image requests arriving at `rate`/s (Poisson) for `seconds`, whether or not earlier ones were answered:
    how clients at large behave, unlike a closed loop. Latency counts from each request's scheduled time, so a
    client that falls behind shows as latency too; one not answered within `deadline` counts as a timeout.
    Plain asyncio streams with keep-alive connections, not httpx: on a small machine the client must cost the
    server as little CPU as it can."""
    answers = Answers(rate, seconds)
    arrivals = random.Random(seed)
    requests = [raw_request(url, blob, model) for blob in blobs]
    idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []

    async def one(request: bytes, scheduled: float) -> None:
        connection = None
        try:
            async with asyncio.timeout(max(0.001, scheduled + deadline - time.perf_counter())):
                while idle:  # a kept-alive connection the server may have closed meanwhile: retry on the next, as clients do
                    connection = idle.pop()
                    try:
                        status, keep = await exchange(*connection, request)
                        break
                    except (OSError, asyncio.IncompleteReadError, IndexError):
                        connection[1].close()
                        connection = None
                if connection is None:
                    connection = await asyncio.open_connection(*address(url))
                    status, keep = await exchange(*connection, request)
        except LOST as exc:
            answers.failed["timeout" if isinstance(exc, TimeoutError) else "connection lost"] += 1
            if connection:
                connection[1].close()
            return
        latency = time.perf_counter() - scheduled
        if keep:
            idle.append(connection)
        else:
            connection[1].close()
        if status in (200, 429):
            (answers.served if status == 200 else answers.refused).append(latency)
        else:
            answers.failed[str(status)] += 1

    pending: set[asyncio.Task] = set()
    start, offset, i = time.perf_counter(), 0.0, 0
    while offset < seconds:
        await asyncio.sleep(max(0.0, start + offset - time.perf_counter()))
        task = asyncio.create_task(one(requests[i % len(requests)], start + offset))
        pending.add(task)
        task.add_done_callback(pending.discard)
        i += 1
        offset += arrivals.expovariate(rate)
    await asyncio.gather(*pending)
    answers.until_last = time.perf_counter() - start
    for _, writer in idle:
        writer.close()
    return answers


def ms(latencies: list[float], q: float) -> str:
    """The q-th percentile of latencies in seconds, as whole milliseconds for a table ("-" when empty)."""
    return f"{np.percentile(latencies, q) * 1000:,.0f}" if latencies else "-"


def saturation(url: str, blobs: list[bytes], model: str | None, seconds: float = 8.0, runs: int = 1) -> float:
    """Single-image requests/s the server sustains: a closed loop at concurrency 32 (at or near its peak,
    docs/performance.md); with runs > 1, the median of that many runs, since this machine swings."""
    rates = []
    for _ in range(runs):
        result = asyncio.run(load(url, forms(url, blobs, 1, model), 1, 32, seconds))
        rates.append(len(result.latencies) / result.seconds)
    return statistics.median(rates)


def add_service_options(parser: argparse.ArgumentParser) -> None:
    """--model, --env and --data-dir, as the load benchmarks that start the service take them."""
    parser.add_argument("--model", help="bundle to ask for (default: the service's default)")
    parser.add_argument("--env", nargs="*", default=[], metavar="KEY=VALUE", help="service settings")
    parser.add_argument("--data-dir", default=os.environ.get("CIFAR10_DATA_DIR", "data/cifar-10-batches-py"))


@contextmanager
def serving(args: argparse.Namespace, log_name: str) -> Iterator[tuple[Server, list[bytes]]]:
    """`bentoml serve` here with the --env settings (log in logs/), and 1,000 CIFAR-10 test images as PNG to send it."""
    blobs = test_pngs(Path(args.data_dir), 1000)
    (REPO / "logs").mkdir(exist_ok=True)
    with running(SERVE, REPO / "logs" / log_name, env=dict(item.split("=", 1) for item in args.env)) as server:
        yield server, blobs


def run_all(url: str, blobs: list[bytes], sizes: list[int], concurrencies: list[int], seconds: float, model: str | None) -> list[Result]:
    results = []
    for per_request in sizes:
        for concurrency in concurrencies:
            result = asyncio.run(load(url, forms(url, blobs, per_request, model), per_request, concurrency, seconds))
            print(result.row(), flush=True)
            results.append(result)
    return results


def machine() -> str:
    """What a figure was measured on and with: CPU, the code's commit (dirty: uncommitted changes), the stack's versions."""
    from importlib.metadata import PackageNotFoundError, version

    def installed(package: str) -> str | None:
        try:
            return f"{package} {version(package)}"
        except PackageNotFoundError:
            return None

    try:
        commit = subprocess.run(["git", "describe", "--always", "--dirty"], cwd=REPO, capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = ""
    stack = ", ".join(filter(None, map(installed, ("onnxruntime", "bentoml", "litserve"))))
    return f"{cpu_model()}, {os.cpu_count()} cores, Python {platform.python_version()}, {stack}; commit {commit or 'unknown'}; {time.strftime('%Y-%m-%d')}"


def in_process(bundle: Path, blobs: list[bytes], seconds: float = 3.0) -> dict[int, float]:
    """images/s of Bundle.predict on decoded test images at batch 1 and 64: the HTTP ceiling."""
    from bundle.images import decode
    from bundle.runtime import Bundle, default_providers, preload_cuda

    providers = default_providers()  # where the service runs it: CUDA when there is one
    preload_cuda(providers)
    model = Bundle.load(bundle, providers)
    pixels = np.stack([decode(blob) for blob in blobs[:64]])
    rates = {}
    for batch in (1, 64):
        model.predict(pixels[:batch])
        count, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds:
            model.predict(pixels[:batch])
            count += batch
        rates[batch] = count / (time.perf_counter() - start)
    return rates


def compare(ours: list[Result], naive: list[Result]) -> str:
    rows = [
        "| images/request | concurrency | ours / naive, requests/s | ours p99 ms | naive p50 ms |",
        "| ---: | ---: | ---: | ---: | ---: |",
    ]
    for a, b in zip(ours, naive, strict=True):
        ratio = (len(a.latencies) / a.seconds) / max(len(b.latencies) / b.seconds, 1e-9)
        p99 = np.percentile(a.latencies, 99) * 1000 if a.latencies else float("nan")
        p50 = np.percentile(b.latencies, 50) * 1000 if b.latencies else float("nan")
        rows.append(f"| {a.per_request} | {a.concurrency} | {ratio:.2f}× | {p99:.1f} | {p50:.1f} |")
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    target = parser.add_mutually_exclusive_group(required=True)
    target.add_argument("--url", help="a running service")
    target.add_argument("--serve", action="store_true", help="start `bentoml serve` in the repository root for the run")
    parser.add_argument("--naive", action="store_true", help="with --serve: also load the naive baseline, and compare")
    parser.add_argument("--workers", type=int, default=2, help="uvicorn worker processes of the naive baseline (default: %(default)s)")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16, 64])
    parser.add_argument("--images", type=int, nargs="+", default=[1, 64], help="images per request")
    parser.add_argument("--seconds", type=float, default=10.0, help="timed seconds per setting")
    add_service_options(parser)  # --model, --env (settings for --serve), --data-dir
    args = parser.parse_args()

    blobs = test_pngs(Path(args.data_dir), 1000)
    print(f"machine: {machine()}; {len(blobs)} CIFAR-10 test images as PNG; {args.seconds:g} s per setting; model {args.model or 'default'}")
    if args.url:
        print("\n".join(HEADER), flush=True)
        run_all(args.url, blobs, args.images, args.concurrency, args.seconds, args.model)
        return
    from serving.settings import Settings

    env = dict(item.split("=", 1) for item in args.env)
    settings = Settings.from_env()
    bundle = settings.models_dir / (args.model or settings.default_model)
    rates = in_process(bundle, blobs)
    print(f"in process (onnxruntime, {bundle}): {rates[1]:,.0f} images/s at batch 1, {rates[64]:,.0f} at batch 64")
    (REPO / "logs").mkdir(exist_ok=True)
    print(f"\nours: bentoml serve serving.service:CIFAR10 {' '.join(args.env)}")
    print("\n".join(HEADER), flush=True)
    with running(SERVE, REPO / "logs" / "http_load_server.log", env=env) as server:
        ours = run_all(server.url, blobs, args.images, args.concurrency, args.seconds, args.model)
    if not args.naive:
        return
    print(f"\nnaive: python -m bench.naive_app --workers {args.workers} (uvicorn, eager PyTorch fp32, one forward per request)")
    print("\n".join(HEADER), flush=True)
    command = [part.replace("{workers}", str(args.workers)) for part in NAIVE]
    with running(command, REPO / "logs" / "http_load_naive.log", env={"BENCH_BUNDLE": str(bundle)}) as server:
        naive = run_all(server.url, blobs, args.images, args.concurrency, args.seconds, None)
    print()
    print(compare(ours, naive))


if __name__ == "__main__":
    main()
