"""Do the bundles run on onnxruntime's CUDA provider, and answer there as on the CPU?

    PYTHONPATH=. python scripts/check_cuda.py --data-dir DATA [--models-dir models] [--images 1000] [--report parity.json]

For each bundle in --models-dir: one session asking for CUDAExecutionProvider (then the CPU) and one
on the CPU alone; the provider each really uses is read back from its session. Both predict the
first N CIFAR-10 test images (decoded from PNG, as the service does). The labels must be equal on
every image but near-ties (where the CPU's top two probabilities lie within twice the tolerance)
and the calibrated probabilities within PROBABILITY_TOLERANCE; the largest logit and
embedding differences are reported beside them (onnxruntime's CUDA convolutions may use TF32, whose
10-bit mantissa moves logits by about 1e-3). Exits 1 naming the first failure; writes the figures to
--report as JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from bench.http_load import test_pngs
from bundle.images import decode
from bundle.manifest import MODELS_DIR
from bundle.runtime import Bundle, find_bundles, preload_cuda

CUDA = ["CUDAExecutionProvider", "CPUExecutionProvider"]
PROBABILITY_TOLERANCE = 1e-2


def compare(folder: Path, images: np.ndarray) -> dict:
    preload_cuda(CUDA)
    gpu, cpu = Bundle.load(folder, providers=CUDA), Bundle.load(folder, providers=["CPUExecutionProvider"])
    on_gpu, on_cpu = gpu.predict(images), cpu.predict(images)
    same = on_gpu.logits.argmax(1) == on_cpu.logits.argmax(1)
    top2 = np.sort(on_cpu.probabilities, axis=1)[:, -2:]
    margins = (top2[:, 1] - top2[:, 0])[~same]  # how close the CPU's top two were where the labels differ
    return {
        "bundle": gpu.manifest.name, "provider": gpu.providers[0], "images": len(images),
        "labels_equal": int(same.sum()), "smallest_margin_where_different": float(margins.min()) if len(margins) else None,
        "max_abs_probability": float(np.abs(on_gpu.probabilities - on_cpu.probabilities).max()),
        "max_abs_logit": float(np.abs(on_gpu.logits - on_cpu.logits).max()),
        "max_embedding_relative": float(np.abs(on_gpu.embeddings - on_cpu.embeddings).max() / np.abs(on_cpu.embeddings).max()),
    }  # fmt: skip


def failure(row: dict) -> str | None:
    if row["provider"] != "CUDAExecutionProvider":
        return f"{row['bundle']}: asked for CUDA, onnxruntime runs it on {row['provider']}"
    if row["labels_equal"] != row["images"] and row["smallest_margin_where_different"] > 2 * PROBABILITY_TOLERANCE:
        return f"{row['bundle']}: labels differ from the CPU's on {row['images'] - row['labels_equal']} of {row['images']} images, not near-ties"
    if row["max_abs_probability"] > PROBABILITY_TOLERANCE:
        return f"{row['bundle']}: probabilities differ from the CPU's by {row['max_abs_probability']:.2e}"
    return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", required=True, help="a folder with CIFAR-10's test_batch")
    parser.add_argument("--models-dir", default=MODELS_DIR)
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--report", help="where to write the figures as JSON")
    args = parser.parse_args()

    images = np.stack([decode(blob) for blob in test_pngs(Path(args.data_dir), args.images)])
    folders = find_bundles(Path(args.models_dir))
    rows = [compare(folder, images) for folder in folders]
    for row in rows:
        print(" ".join(f"{key} {value:.2e}" if isinstance(value, float) else f"{key} {value}" for key, value in row.items()))
    if args.report:
        Path(args.report).write_text(json.dumps(rows, indent=2))
    problems = [message for row in rows if (message := failure(row))]
    if problems:
        sys.exit("check_cuda: " + "; ".join(problems))
    print(f"check_cuda: {len(rows)} bundle(s) on CUDAExecutionProvider, labels equal to the CPU's on {len(images)} test images")


if __name__ == "__main__":
    main()
