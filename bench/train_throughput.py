"""Training-step throughput of each model at its recipe's batch size, against the FLOP floor.

    python -m bench.train_throughput [--models seed_cnn vgg16_3block] [--seconds 10] [--rounds 3]

For each model and setting it times full training steps (forward, backward, its recipe's optimizer) on random
pixels and prints images/s, and the fraction of the machine's peak that the step reaches:
forward FLOPs × 3 per image × images/s over the peak FLOP/s of the step's dtype (the best of
a large matmul and a large convolution), measured in the same run. Settings are timed in alternating rounds and the best round is
kept, since a shared machine's throughput swings between runs.
"""

from __future__ import annotations

import argparse
import time
from typing import NamedTuple

import torch
import torch.nn.functional as F

from training import fast, study
from training.evaluate import autocast
from training.hardware import bf16_is_fast, describe, forward_flops, peak_flops
from training.loop import pick_device
from training.models import build_model
from training.recipes import RECIPES

MODELS = {
    "seed_cnn": "cnn-baseline", "airbench": "fast", "airbench_wide": "fast-wide", "vgg16_3block": "vgg16-3block", "vgg16_full": "vgg16-full"
}  # fmt: skip


class Setting(NamedTuple):
    bf16: bool  # autocast
    channels_last: bool
    compiled: bool  # torch.compile, inductor's default mode; the training loop stays eager (docs/training.md)


SETTINGS = {
    "eager fp32": Setting(bf16=False, channels_last=False, compiled=False),
    "bf16 + channels_last": Setting(bf16=True, channels_last=True, compiled=False),
    "the same, torch.compile": Setting(bf16=True, channels_last=True, compiled=True),
}


def step_throughput(name: str, device: torch.device, setting: Setting, seconds: float) -> float:
    recipe = dict(RECIPES[MODELS[name]], weights="none")
    model = build_model(name, [0.0] * 3, [255.0] * 3, **({"weights": "none"} if name.startswith("vgg") else {}))
    memory_format = torch.channels_last if setting.channels_last else torch.contiguous_format
    model = model.to(device, memory_format=memory_format).train()
    forward = torch.compile(model) if setting.compiled else model
    optimizer = (fast.make_optimizer if recipe["loop"] == "fast" else study.make_optimizer)(model, recipe)
    batch = recipe["batch_size"]
    x = (torch.rand(batch, 3, 32, 32, device=device) * 255).contiguous(memory_format=memory_format)
    y = torch.randint(0, 10, (batch,), device=device)

    def step() -> None:
        with autocast(device, setting.bf16):
            loss = F.cross_entropy(forward(x).float(), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    for _ in range(3):  # warm-up: kernel selection, allocator, compilation
        step()
    steps, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        step()
        steps += 1
    if device.type == "cuda":
        torch.cuda.synchronize()
    return steps * batch / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--device", default="auto")
    parser.add_argument("--seconds", type=float, default=8.0, help="timed seconds per model, setting and round")
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()

    device = pick_device(args.device)
    settings = {k: v for k, v in SETTINGS.items() if not v.bf16 or bf16_is_fast(device)}
    peaks = {False: peak_flops(device, torch.float32)}
    if any(setting.bf16 for setting in settings.values()):
        peaks[True] = peak_flops(device, torch.bfloat16)
    print(f"device: {describe(device)}; torch {torch.__version__}")
    print("peak (best of matmul and 3×3 conv): " + ", ".join(f"{'bf16' if k else 'fp32'} {v / 1e9:.0f} GFLOP/s" for k, v in peaks.items()))

    best: dict[tuple[str, str], float] = {}
    for _ in range(args.rounds):
        for name in args.models:
            for label, setting in settings.items():
                rate = step_throughput(name, device, setting, args.seconds)
                best[name, label] = max(best.get((name, label), 0.0), rate)

    print(f"\n{'model':13s} {'batch':>5s} {'GFLOP/img':>9s}  {'setting':24s} {'img/s':>7s} {'speed-up':>8s} {'of peak':>7s}")
    for name in args.models:
        flops = forward_flops(build_model(name, [0.0] * 3, [255.0] * 3))
        batch = RECIPES[MODELS[name]]["batch_size"]
        eager = best[name, "eager fp32"]
        for label, setting in settings.items():
            rate = best[name, label]
            floor = rate * 3 * flops / peaks[setting.bf16]
            print(f"{name:13s} {batch:5d} {flops / 1e9:9.3f}  {label:24s} {rate:7.0f} {rate / eager:7.2f}x {floor:6.0%}")


if __name__ == "__main__":
    main()
