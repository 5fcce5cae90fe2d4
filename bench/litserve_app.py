"""A peer a user might install instead: LitServe + onnxruntime, serving the same bundle.

Benchmark use only, never shipped (`pip install litserve`):

    BENCH_BUNDLE=models/cnn python -m bench.litserve_app --port 8000 --workers 2 --batch 32

The same multipart `/classify` form as our service, one image a request (LitServe batches
requests, not images). Inference runs in LitServe's worker processes, `--workers` of them, each
with one onnxruntime session of the cores shared among them, batching up to `--batch` requests;
its HTTP servers, as many as the workers (LitServe's default), share one socket with Nagle's
algorithm off (bench/nodelay.py: LitServe binds its socket as uvicorn does).
"""

from __future__ import annotations

import argparse
import io
import os
from pathlib import Path

import litserve as ls
import numpy as np
from PIL import Image

from bench.minimal_app import classes, load_session
from bench.nodelay import declare_tcp


class Classifier(ls.LitAPI):
    def __init__(self, bundle: Path, workers: int, batch: int):
        super().__init__(max_batch_size=batch, api_path="/classify")
        self.bundle, self.workers = bundle, workers

    def setup(self, device: str) -> None:
        self.session = load_session(self.bundle, self.workers)
        self.classes = classes(self.bundle)

    def decode_request(self, request) -> np.ndarray:
        return np.asarray(Image.open(io.BytesIO(request["images"].file.read())).convert("RGB").resize((32, 32)))

    def batch(self, inputs: list[np.ndarray]) -> np.ndarray:
        return np.stack(inputs)

    def predict(self, pixels: np.ndarray) -> np.ndarray:
        return self.session.run(["probabilities"], {"images": pixels})[0]

    def unbatch(self, probabilities: np.ndarray) -> list[np.ndarray]:
        return list(probabilities)

    def encode_response(self, probabilities: np.ndarray) -> list[dict]:
        i = int(probabilities.argmax())
        return [{"label": self.classes[i], "probability": float(probabilities[i])}]


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch", type=int, default=32, help="requests per batch")
    parser.add_argument("--api-servers", type=int, help="HTTP server processes (default: LitServe's, one per worker)")
    parser.add_argument("--fast-queue", action="store_true", help="LitServe's ZeroMQ queue between the HTTP servers and the workers")
    args = parser.parse_args()
    declare_tcp()
    api = Classifier(Path(os.environ.get("BENCH_BUNDLE", "models/airbench")), args.workers, args.batch)
    server = ls.LitServer(api, accelerator="cpu", workers_per_device=args.workers, healthcheck_path="/readyz", fast_queue=args.fast_queue)
    server.run(host="127.0.0.1", port=args.port, log_level="warning", generate_client_file=False, num_api_servers=args.api_servers)
