"""Does a running service answer like its bundles offline? Every endpoint, every model, real images.

    PYTHONPATH=. python scripts/check_served.py http://127.0.0.1:3000 --data-dir DATA [--models-dir models] [--images 32] [--tolerance 1e-4]

Sends the first N CIFAR-10 test images as PNG to /classify, /topk, /embed and /knn of each bundle
in --models-dir, and compares the answers with `Bundle.predict` and `Bundle.knn` run here, on the
CPU, on the same decoded pixels: probabilities and embeddings within the tolerance, labels equal
but where the offline top two lie within twice it, the neighbours equal (or, above the default
tolerance, their distances rank by rank within it: a GPU's TF32 arithmetic may swap near-equal
neighbours). Exits 1 naming the first difference; prints one line per model otherwise.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import httpx
import numpy as np

from bench.http_load import test_pngs
from bundle.images import decode
from bundle.manifest import MODELS_DIR
from bundle.runtime import Bundle, find_bundles

TOLERANCE = 1e-4


def check_model(url: str, bundle: Bundle, blobs: list[bytes], tolerance: float = TOLERANCE) -> str:
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
    top2 = np.sort(prediction.probabilities, axis=1)[:, -2:]
    near_ties = top2[:, 1] - top2[:, 0] <= 2 * tolerance
    if any(a != b and not tie for a, b, tie in zip(labels, expected, near_ties)):
        sys.exit(f"check_served: {name} /classify labels differ from the bundle offline: {labels[:8]} vs {expected[:8]}")
    topk = post("topk", k="3")
    top = np.sort(prediction.probabilities, axis=1)[:, ::-1][:, :3]
    served = np.array([[entry["probability"] for entry in a["top"]] for a in topk])
    if not np.allclose(served, top, atol=tolerance):
        sys.exit(f"check_served: {name} /topk probabilities differ by {np.abs(served - top).max():.2e}")
    embeddings = np.array([a["embedding"] for a in post("embed")])
    if not np.allclose(embeddings, prediction.embeddings, atol=tolerance * np.abs(prediction.embeddings).max()):
        sys.exit(f"check_served: {name} /embed differs by {np.abs(embeddings - prediction.embeddings).max():.2e}")
    knn = post("knn", neighbours="5")
    _, distances, indices, _ = bundle.knn(prediction.embeddings, neighbours=5)
    if tolerance <= TOLERANCE and [[n["index"] for n in a["neighbours"]] for a in knn] != indices.tolist():
        sys.exit(f"check_served: {name} /knn neighbours differ from the bundle offline")
    served_distances = np.array([[n["distance"] for n in a["neighbours"]] for a in knn])
    if not np.allclose(served_distances, distances, atol=tolerance * max(float(np.abs(distances).max()), 1e-6)):
        sys.exit(f"check_served: {name} /knn distances differ by {np.abs(served_distances - distances).max():.2e}")
    return f"{name}: {len(blobs)} images, /classify /topk /embed /knn answer as the bundle does offline"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("url")
    parser.add_argument("--data-dir", required=True)
    parser.add_argument("--models-dir", default=MODELS_DIR)
    parser.add_argument("--images", type=int, default=32)
    parser.add_argument("--tolerance", type=float, default=TOLERANCE, help="above the default for a GPU-served bundle (TF32)")
    args = parser.parse_args()
    blobs = test_pngs(Path(args.data_dir), args.images)
    folders = find_bundles(Path(args.models_dir))
    if not folders:
        sys.exit(f"check_served: no bundle in {args.models_dir}")
    for folder in folders:
        print(check_model(args.url.rstrip("/"), Bundle.load(folder), blobs, args.tolerance))


if __name__ == "__main__":
    main()
