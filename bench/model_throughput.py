"""Inference throughput of a bundle in process: onnxruntime against PyTorch eager, by batch size.

    python -m bench.model_throughput [--bundle models/cnn] [--run runs/cnn-schedule-…] [--seconds 3] [--device cuda]

onnxruntime runs the bundle's `model.onnx` on uint8 pixels exactly as the service does. PyTorch
eager runs the same trained weights (from --run, else an untrained model of the bundle's
architecture: the cost is the same) in fp32 and in bf16 autocast. Each figure is the best of
alternating rounds, and "of peak" relates it to the machine's effective fp32 peak measured in
the same run (training.hardware.peak_flops), forward FLOPs × images/s over that peak. A bundle
with an int8 variant (`cifar10 quantize`) gets an onnxruntime int8 column and its gain over fp32.
Both sides run the bundle's test-time augmentation views. On a machine with CUDA both run there
by default (onnxruntime-gpu's CUDA provider, PyTorch on the GPU), against the GPU's peak.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

from bundle.runtime import Bundle, default_providers, preload_cuda
from training.evaluate import autocast
from training.hardware import describe, forward_flops, peak_flops
from training.models import TestTimeAugmentation, build_model

BATCHES = (1, 8, 64, 256)


def rate(run, batch: int, seconds: float) -> float:
    run()  # warm-up
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        run()
        count += 1
    return count * batch / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", default="models/cnn")
    parser.add_argument("--run", help="the run the bundle came from, for the PyTorch side (optional)")
    parser.add_argument("--seconds", type=float, default=3.0, help="timed seconds per setting and round")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()

    device = torch.device(args.device)
    providers = default_providers() if device.type == "cuda" else ["CPUExecutionProvider"]
    preload_cuda(providers)
    bundle = Bundle.load(args.bundle, providers)
    manifest = bundle.manifest
    has_int8 = any(v.precision == "int8" for v in manifest.variants)
    int8 = Bundle.load(args.bundle, providers, precision="int8") if has_int8 else None
    model = build_model(manifest.architecture, manifest.normalization.mean, manifest.normalization.std)
    if args.run:
        from training.loop import load_checkpoint

        model.load_state_dict(load_checkpoint(Path(args.run))["model"])
    model = TestTimeAugmentation(model.eval(), manifest.test_time_augmentation).eval()  # the graph's views, too
    flops = forward_flops(model)  # counted on the CPU
    model = model.to(device)
    peak = peak_flops(device, torch.float32)
    print(f"device: {describe(device)}; onnxruntime on {bundle.providers[0]}; bundle {manifest.name} ({manifest.architecture})")
    print(f"forward: {flops / 1e9:.3f} GFLOP/image (test-time augmentation: {manifest.test_time_augmentation}); effective fp32 peak {peak / 1e9:.0f} GFLOP/s")
    if int8:
        print(f"test accuracy (manifest, every test image): fp32 {bundle.test_accuracy:.2%}, int8 {int8.test_accuracy:.2%}")

    def settings(batch: int) -> dict:
        pixels = np.random.default_rng(0).integers(0, 256, (batch, 32, 32, 3), dtype=np.uint8)
        nchw = torch.from_numpy(pixels).to(device).permute(0, 3, 1, 2).contiguous(memory_format=torch.channels_last)

        def eager(bf16: bool):
            def run():
                with torch.no_grad(), autocast(device, bf16):
                    model(nchw)
                if device.type == "cuda":
                    torch.cuda.synchronize()  # onnxruntime's calls return with their outputs on the host

            return run

        runs = {"onnxruntime fp32": lambda: bundle.predict(pixels), "PyTorch eager fp32": eager(False), "PyTorch eager bf16": eager(True)}
        return runs | ({"onnxruntime int8": lambda: int8.predict(pixels)} if int8 else {})

    best: dict[tuple[int, str], float] = {}
    for _ in range(args.rounds):
        for batch in BATCHES:
            for name, run in settings(batch).items():
                best[batch, name] = max(best.get((batch, name), 0.0), rate(run, batch, args.seconds))

    names = list(settings(1))
    int8_column = f"  {'int8 / fp32':>11s}" if int8 else ""
    print(f"\n{'batch':>5s}  " + "  ".join(f"{n:>20s}" for n in names) + f"  {'ort / eager fp32':>16s}  {'ort of peak':>11s}" + int8_column)
    for batch in BATCHES:
        row = [best[batch, n] for n in names]
        ratio = row[0] / row[1]
        gain = f"  {row[3] / row[0]:10.2f}x" if int8 else ""
        print(f"{batch:5d}  " + "  ".join(f"{r:14.0f} img/s" for r in row) + f"  {ratio:15.2f}x  {row[0] * flops / peak:10.0%}" + gain)


if __name__ == "__main__":
    main()
