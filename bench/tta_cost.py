"""What test-time augmentation buys and costs, measured on the served graph (onnxruntime).

    python -m bench.tta_cost RUN [--data-dir DIR] [--seconds 2] [--rounds 2]

For each level (none, flip, flip-translate) the run is exported to a temporary ONNX graph with
the augmentation inside it, as `cifar10 export --tta` does; then the table gives its accuracy on
the 10,000 test images and its throughput at batch 1 and 64 (best of alternating rounds).
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import onnxruntime as ort
import torch

from bench.model_throughput import rate
from bundle.manifest import TTA_LEVELS
from training.analysis import load_trained
from training.data import load_cifar10
from training.export import export_onnx, run_onnx, to_nhwc
from training.hardware import describe
from training.models import TestTimeAugmentation

BATCHES = (1, 64)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", help="a run folder")
    parser.add_argument("--data-dir")
    parser.add_argument("--seconds", type=float, default=2.0, help="timed seconds per setting and round")
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()

    data = load_cifar10(args.data_dir)
    run = load_trained(Path(args.run), data)
    images, labels = to_nhwc(data.test.images), data.test.labels.numpy()
    print(f"device: {describe(torch.device('cpu'))}; onnxruntime {ort.__version__} CPUExecutionProvider; run {run.name}")
    sessions, accuracy = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for level in TTA_LEVELS:
            path = Path(tmp) / f"{level}.onnx"
            export_onnx(TestTimeAugmentation(run.model.float(), level), 1.0, path)  # accuracy and speed need no calibration
            sessions[level] = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
            accuracy[level] = float((run_onnx(sessions[level], images, f"test, {level}")[0].argmax(1) == labels).mean())
    best: dict[tuple[str, int], float] = {}
    for _ in range(args.rounds):
        for batch in BATCHES:
            pixels = images[:batch]
            for level, session in sessions.items():
                result = rate(lambda s=session, p=pixels: s.run(["logits"], {"images": p}), batch, args.seconds)
                best[level, batch] = max(best.get((level, batch), 0.0), result)
    print("\n| test-time augmentation | views | test accuracy | gain | " + " | ".join(f"img/s at batch {b}" for b in BATCHES) + " |")
    print("| --- | ---: | ---: | ---: |" + " ---: |" * len(BATCHES))
    for level in TTA_LEVELS:
        views = len(TestTimeAugmentation(run.model, level).weights)
        gain = accuracy[level] - accuracy["none"]
        rates = " | ".join(f"{best[level, b]:,.0f}" for b in BATCHES)
        print(f"| {level} | {views} | {accuracy[level]:.2%} | {gain:+.2%} | {rates} |")


if __name__ == "__main__":
    main()
