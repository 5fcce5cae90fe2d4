"""The app a user would write in twenty lines: Starlette + onnxruntime, one `session.run` per request.

Benchmark use only, never shipped. It serves the bundle's own ONNX graph (uint8 pixels in,
normalisation inside), decodes with Pillow, and answers the same multipart `/classify` form
as our service, so the same client load runs against both:

    BENCH_BUNDLE=models/cnn python -m bench.minimal_app --port 8000 --workers 2
    BENCH_GRAPH=model.int8.onnx ...       # the bundle's int8 variant instead of model.onnx

Its uvicorn workers share one listening socket with Nagle's algorithm off (bench/nodelay.py).
Each worker's session gets BENCH_THREADS onnxruntime threads, by default the cores shared
among the workers, as a careful user would set them: with onnxruntime's own choice (a thread per
core in every worker) the workers fight over the cores.
"""

from __future__ import annotations

import io
import json
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import numpy as np
import onnxruntime as ort
from PIL import Image
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from bench.nodelay import main


def load_session(bundle: Path, workers: int) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = int(os.environ.get("BENCH_THREADS") or max(1, len(os.sched_getaffinity(0)) // workers))
    graph = bundle / os.environ.get("BENCH_GRAPH", "model.onnx")
    return ort.InferenceSession(str(graph), options, providers=["CPUExecutionProvider"])


def classes(bundle: Path) -> list[str]:
    return json.loads((bundle / "manifest.json").read_text())["classes"]


@asynccontextmanager
async def lifespan(app: Starlette) -> AsyncIterator[None]:
    bundle = Path(os.environ.get("BENCH_BUNDLE", "models/airbench"))
    app.state.session = load_session(bundle, int(os.environ.get("BENCH_WORKERS", "1")))  # in each worker
    app.state.classes = classes(bundle)
    yield


async def classify(request: Request) -> Response:
    form = await request.form()
    try:
        pixels = np.stack(
            [np.asarray(Image.open(io.BytesIO(await f.read())).convert("RGB").resize((32, 32))) for f in form.getlist("images")]
        )
    except Exception as exc:
        return JSONResponse({"error": f"send images in the field 'images' ({exc})"}, status_code=400)
    (probabilities,) = request.app.state.session.run(["probabilities"], {"images": pixels})
    names = request.app.state.classes
    return JSONResponse([{"label": names[i], "probability": float(p[i])} for p, i in zip(probabilities, probabilities.argmax(1))])


async def ready(request: Request) -> Response:
    return Response("ok")


app = Starlette(routes=[Route("/classify", classify, methods=["POST"]), Route("/readyz", ready)], lifespan=lifespan)


if __name__ == "__main__":
    main("bench.minimal_app:app", __doc__.splitlines()[0])
