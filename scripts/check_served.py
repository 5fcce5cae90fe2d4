"""Does a running service answer like its bundles offline? Every endpoint, every model, real images.

    PYTHONPATH=. python scripts/check_served.py http://127.0.0.1:3000 --data-dir DATA [--models-dir models] [--images 32]

Sends the first N CIFAR-10 test images as PNG to /classify, /topk, /embed and /knn of each bundle
in --models-dir, and compares the answers with `Bundle.predict` and `Bundle.knn` run here on the
same decoded pixels: labels and neighbours equal, probabilities and embeddings within 1e-4.
Exits 1 naming the first difference; prints one line per model otherwise.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import httpx
import numpy as np

from bench.http_load import test_pngs
from bundle.images import decode
from bundle.runtime import Bundle

TOLERANCE = 1e-4


def check_model(url: str, bundle: Bundle, blobs: list[bytes]) -> str:
    name = bundle.manifest.name
    files = [("images", (f"{i}.png", blob, "image/png")) for i, blob in enumerate(blobs)]
    prediction = bundle.predict(np.stack([decode(b) for b in blobs]))
    classes = list(bundle.manifest.classes)
    expected = [classes[i] for i in prediction.logits.argmax(1)]

    def post(endpoint: str, **fields) -> list[dict]:
        answer = httpx.post(f"{url}/{endpoint}", files=files, data={"model": name, **fields}, timeout=120)
        if answer.status_code != 200:
            sys.exit(f"check_served: {endpoint} for {name} answered {answer.status_code}: {answer.text[:300]}")
        return answer.json()

    labels = [a["label"] for a in post("classify")]
    if labels != expected:
        sys.exit(f"check_served: {name} /classify labels differ from the bundle offline: {labels[:8]} vs {expected[:8]}")
    topk = post("topk", k="3")
    top = np.sort(prediction.probabilities, axis=1)[:, ::-1][:, :3]
    served = np.array([[entry["probability"] for entry in a["top"]] for a in topk])
    if not np.allclose(served, top, atol=TOLERANCE):
        sys.exit(f"check_served: {name} /topk probabilities differ by {np.abs(served - top).max():.2e}")
    embeddings = np.array([a["embedding"] for a in post("embed")])
    if not np.allclose(embeddings, prediction.embeddings, atol=TOLERANCE * np.abs(prediction.embeddings).max()):
        sys.exit(f"check_served: {name} /embed differs by {np.abs(embeddings - prediction.embeddings).max():.2e}")
    neighbours = [[n["index"] for n in a["neighbours"]] for a in post("knn", neighbours="5")]
    offline = bundle.knn(prediction.embeddings, neighbours=5)[2].tolist()
    if neighbours != offline:
        sys.exit(f"check_served: {name} /knn neighbours differ from the bundle offline")
    return f"{name}: {len(blobs)} images, /classify /topk /embed /knn answer as the bundle does offline"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("url")
    parser.add_argument("--data-dir", required=True)
    parser.add_argument("--models-dir", default="models")
    parser.add_argument("--images", type=int, default=32)
    args = parser.parse_args()
    blobs = test_pngs(Path(args.data_dir), args.images)
    folders = sorted(p.parent for p in Path(args.models_dir).glob("*/manifest.json"))
    if not folders:
        sys.exit(f"check_served: no bundle in {args.models_dir}")
    for folder in folders:
        print(check_model(args.url.rstrip("/"), Bundle.load(folder), blobs))


if __name__ == "__main__":
    main()
