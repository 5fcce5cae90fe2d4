"""The baseline a user would otherwise write: a Starlette app running the PyTorch model eagerly.

Benchmark use only, never shipped. One request's images are decoded with Pillow and run through
the network in one eager fp32 forward under `torch.inference_mode()`, no batching across requests:

    BENCH_BUNDLE=models/cnn python -m bench.naive_app --port 8000 --workers 2

which is `uvicorn bench.naive_app:app --workers 2` without uvicorn's 40 ms per answer (bench/nodelay.py).

It builds the bundle's architecture (with the bundle's test-time augmentation, so it does the
same arithmetic per image) from `training.models`, with the trained weights of BENCH_RUN if given,
else untrained ones: the cost per image is the same either way.
"""

from __future__ import annotations

import io
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from bench.nodelay import main
from bundle.runtime import read_manifest
from training.models import TestTimeAugmentation, build_model

if threads := os.environ.get("BENCH_THREADS"):  # unset: PyTorch's default, as a naive app would leave it
    torch.set_num_threads(int(threads))


def load_model() -> tuple[torch.nn.Module, list[str]]:
    manifest = read_manifest(Path(os.environ.get("BENCH_BUNDLE", "models/cnn")))
    model = build_model(manifest.architecture, manifest.normalization.mean, manifest.normalization.std)
    if run := os.environ.get("BENCH_RUN"):
        model.load_state_dict(torch.load(Path(run) / "checkpoint.pt", map_location="cpu", weights_only=True)["model"])
    return TestTimeAugmentation(model.eval(), manifest.test_time_augmentation).eval(), list(manifest.classes)


@asynccontextmanager
async def lifespan(app: Starlette) -> AsyncIterator[None]:
    app.state.model, app.state.classes = load_model()  # in each worker, not in the supervisor
    yield


async def classify(request: Request) -> Response:
    form = await request.form()
    try:
        images = [
            Image.open(io.BytesIO(await upload.read())).convert("RGB").resize((32, 32)) for upload in form.getlist("images")
        ]
    except Exception as exc:
        return JSONResponse({"error": f"not an image: {exc}"}, status_code=400)
    if not images:
        return JSONResponse({"error": "send at least one file in the field 'images'"}, status_code=400)
    pixels = torch.from_numpy(np.stack([np.asarray(image) for image in images])).permute(0, 3, 1, 2)
    with torch.inference_mode():
        probabilities = request.app.state.model(pixels).softmax(1)
    confidence, index = probabilities.max(1)
    classes = request.app.state.classes
    return JSONResponse(
        [{"label": classes[i], "confidence": float(c)} for i, c in zip(index.tolist(), confidence.tolist(), strict=True)]
    )


async def ready(request: Request) -> Response:
    return Response("ok")


app = Starlette(routes=[Route("/classify", classify, methods=["POST"]), Route("/readyz", ready)], lifespan=lifespan)


if __name__ == "__main__":
    main("bench.naive_app:app", __doc__.splitlines()[0])
