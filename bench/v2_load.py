"""The Open Inference Protocol's tensor path against in-process onnxruntime: what serving costs when
clients send uint8 tensors (Triton's usual way) instead of images to decode.

    python -m bench.v2_load --data-dir ../shared/data/cifar-10-batches-py [--models airbench cnn] [--rounds 3]

For each bundle, `bentoml serve` starts with its defaults (that bundle only). Closed-loop clients
POST /v2/models/{name}/infer with 64 images a request in the binary tensor data extension, asking
for the calibrated probabilities as binary, at concurrency 1, 2 and 4; in-process is
`Bundle.predict` on the same images in this process while the server idles, in calls of 64 (the
request) and of 8 (the service's calls, CIFAR10_MAX_BATCH_SIZE), with onnxruntime's own thread
settings: the better of the two is the ceiling. They alternate for --rounds rounds; the table
gives medians and their ratio at each concurrency.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import time
from pathlib import Path

import numpy as np

from bench.harness import REPO, SERVE, running
from bench.http_load import http_request, load, machine, test_pngs
from bundle.images import decode
from bundle.runtime import Bundle
from serving.settings import Settings

PER_REQUEST = 64
IN_PROCESS_CALLS = (PER_REQUEST, Settings.max_batch_size)  # images per Bundle.predict call: the request's, and the service's calls


def v2_request(url: str, model: str, pixels: np.ndarray) -> bytes:
    """One infer call, binary tensors in and out, encoded once."""
    header = json.dumps({
        "inputs": [{"name": "images", "shape": list(pixels.shape), "datatype": "UINT8", "parameters": {"binary_data_size": pixels.nbytes}}],
        "outputs": [{"name": "probabilities", "parameters": {"binary_data": True}}],
    }).encode()  # fmt: skip
    headers = {"Inference-Header-Content-Length": str(len(header))}
    return http_request(url, f"/v2/models/{model}/infer", "application/octet-stream", header + pixels.tobytes(), headers)


def in_process_rate(bundle: Bundle, pixels: np.ndarray, per_call: int, seconds: float) -> float:
    calls = [pixels[i : i + per_call] for i in range(0, len(pixels), per_call)]
    bundle.predict(calls[0])  # warm
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        for batch in calls:
            bundle.predict(batch)
            count += len(batch)
    return count / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default=os.environ.get("CIFAR10_DATA_DIR", "data/cifar-10-batches-py"))
    parser.add_argument("--models", nargs="+", default=["airbench", "cnn"])
    parser.add_argument("--concurrency", nargs="+", type=int, default=[1, 2, 4])
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()

    pixels = np.stack([decode(blob) for blob in test_pngs(Path(args.data_dir), 256)])
    batches = [pixels[i : i + PER_REQUEST] for i in range(0, len(pixels), PER_REQUEST)]
    print(f"machine: {machine()}; {PER_REQUEST} CIFAR-10 test images a request, binary tensors; medians of {args.rounds} rounds")
    rows = []
    for model in args.models:
        (REPO / "logs").mkdir(exist_ok=True)
        with running(SERVE, REPO / "logs" / f"v2-{model}.log", env={"CIFAR10_MODELS": model}) as server:
            bundle = Bundle.load(REPO / "models" / model)  # as the service loads it: onnxruntime's own thread count
            requests = [v2_request(server.url, model, batch) for batch in batches]
            local, served = {n: [] for n in IN_PROCESS_CALLS}, {c: [] for c in args.concurrency}
            for _ in range(args.rounds):
                for per_call in IN_PROCESS_CALLS:
                    local[per_call].append(in_process_rate(bundle, pixels, per_call, args.seconds))
                for concurrency in args.concurrency:
                    result = asyncio.run(load(server.url, requests, PER_REQUEST, concurrency, args.seconds))
                    assert result.errors == 0, f"{result.errors} failed requests"
                    served[concurrency].append(len(result.latencies) * PER_REQUEST / result.seconds)
            best = max(IN_PROCESS_CALLS, key=lambda n: statistics.median(local[n]))
            for concurrency, rates in served.items():
                rows.append((model, concurrency, statistics.median(rates), statistics.median(local[best]), best))
    print("\n| bundle | concurrency | V2 infer, images/s | in-process onnxruntime, images/s (best calls) | V2 / in-process |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for model, concurrency, rate, ceiling, best in rows:
        print(f"| `{model}` | {concurrency} | {rate:,.0f} | {ceiling:,.0f} (calls of {best}) | {rate / ceiling:.0%} |")


if __name__ == "__main__":
    main()
