"""The machine under our figures: its description, its fast paths, its peak rate, a model's FLOPs."""

from __future__ import annotations

import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from training.machine import cpu_model


def describe(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{cpu_model()} ({torch.get_num_threads()} threads)"


def bf16_is_fast(device: torch.device) -> bool:
    """bf16 autocast pays off on GPUs that have it and on CPUs with AVX-512 BF16 or AMX."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def peak_flops(device: torch.device, dtype: torch.dtype, seconds: float = 2.0) -> float:
    """The best rate of a large matmul and of a large 3×3 convolution in this dtype: an effective
    peak, since oneDNN may compute 3×3 convolutions with fewer multiplications (Winograd).

    Both count: on AMD CPUs PyTorch's matmul (MKL) reaches far less than its convolutions
    (oneDNN), and a peak below what the models reach would make the ratios meaningless.
    """
    a = torch.randn(2048, 2048, device=device, dtype=dtype)
    x = torch.randn(64, 256, 32, 32, device=device, dtype=dtype).contiguous(memory_format=torch.channels_last)
    w = torch.randn(256, 256, 3, 3, device=device, dtype=dtype).contiguous(memory_format=torch.channels_last)
    kernels = {
        "matmul": (lambda: a @ a, 2 * 2048**3),
        "conv": (lambda: F.conv2d(x, w, padding=1), 2 * 64 * 256 * 32 * 32 * 256 * 9),
    }
    best = 0.0
    for run, flops in kernels.values():
        run()  # warm-up
        end = time.perf_counter() + seconds / len(kernels)
        while time.perf_counter() < end:
            start = time.perf_counter()
            run()
            if device.type == "cuda":
                torch.cuda.synchronize()
            best = max(best, flops / (time.perf_counter() - start))
    return best


def forward_flops(model: torch.nn.Module) -> float:
    """FLOPs of one forward pass for one 32×32 image (a multiply-add counts as 2)."""
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model.eval()(torch.zeros(1, 3, 32, 32))
    return counter.get_total_flops()
