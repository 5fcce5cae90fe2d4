"""What users' uploads do to pixels, as a training augmentation on uint8 batches.

Photographs arrive blurred a little and noisy a little, then lossily re-encoded (JPEG from phones
and browsers, WebP from web pages). `simulate` applies that chain, in that order, each step to a
random share of the images at a random strength, with the encoders clients use (Pillow's libjpeg
and libwebp, the service's own decoder library). The strengths are a recipe's
`uploads` entry (training/recipes.py); the test conditions they were chosen against are in
training/robustness.py.
"""

from __future__ import annotations

import io
import math

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from training.recipes import UPLOAD_STRENGTHS

BLUR_RADIUS = math.ceil(2 * UPLOAD_STRENGTHS["blur_sigma"][1])  # the kernel covers ±2σ of the largest blur a recipe may ask for


def simulate(images: torch.Tensor, uploads: dict, generator: torch.Generator) -> torch.Tensor:
    """uint8 [N, 3, H, W] → the same images as they would reach the service after upload.

    uploads: share of images and strength range per step, e.g. {"blur": 0.2, "blur_sigma": (0.3,
    1.0), "noise": 0.2, "noise_sigma": (2, 10), "jpeg": 0.5, "jpeg_quality": (30, 95), "webp": 0.1,
    "webp_quality": (50, 95)}; an empty dict leaves the images as they are. All draws come from
    the CPU generator, so a run repeats on any device.
    """
    if not uploads:
        return images
    device, x = images.device, images.cpu().clone()
    n = len(x)

    def chosen(share: float) -> torch.Tensor:
        return torch.rand(n, generator=generator) < share

    def strengths(count: int, bounds: tuple[float, float]) -> torch.Tensor:
        low, high = bounds
        return low + (high - low) * torch.rand(count, generator=generator)

    blurred = chosen(uploads.get("blur", 0.0))
    if blurred.any():
        x[blurred] = gaussian_blur(x[blurred], strengths(int(blurred.sum()), uploads["blur_sigma"]))
    noisy = chosen(uploads.get("noise", 0.0))
    if noisy.any():
        sigma = strengths(int(noisy.sum()), uploads["noise_sigma"])
        noise = torch.randn(x[noisy].shape, generator=generator) * sigma[:, None, None, None]
        x[noisy] = (x[noisy].float() + noise).round().clamp(0, 255).to(torch.uint8)
    codec = torch.rand(n, generator=generator)
    jpeg_share, webp_share = uploads.get("jpeg", 0.0), uploads.get("webp", 0.0)
    for fmt, chosen_codec in (("JPEG", codec < jpeg_share), ("WEBP", (codec >= jpeg_share) & (codec < jpeg_share + webp_share))):
        for index in torch.nonzero(chosen_codec).flatten().tolist():
            quality = int(torch.randint(*_inclusive(uploads[f"{fmt.lower()}_quality"]), (1,), generator=generator))
            x[index] = round_trip(x[index], fmt, quality)
    return x.to(device)


def _inclusive(bounds: tuple[int, int]) -> tuple[int, int]:
    return int(bounds[0]), int(bounds[1]) + 1


def gaussian_blur(images: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """uint8 [N, 3, H, W] blurred with a separable Gaussian of σ (pixels) per image, edges reflected."""
    taps = torch.arange(-BLUR_RADIUS, BLUR_RADIUS + 1, dtype=torch.float32)
    kernel = torch.exp(-(taps[None, :] ** 2) / (2 * sigma[:, None] ** 2))
    kernel = (kernel / kernel.sum(1, keepdim=True)).repeat_interleave(3, 0)  # one per image and channel
    n, c, h, w = images.shape
    x = F.pad(images.float().reshape(1, n * c, h, w), (BLUR_RADIUS,) * 4, mode="reflect")
    x = F.conv2d(x, kernel[:, None, :, None], groups=n * c)  # vertical
    x = F.conv2d(x, kernel[:, None, None, :], groups=n * c)  # horizontal
    return x.reshape(n, c, h, w).round().clamp(0, 255).to(torch.uint8)


def round_trip(image: torch.Tensor, fmt: str, quality: int) -> torch.Tensor:
    """One uint8 [3, H, W] image saved by Pillow as lossy JPEG (4:2:0 chroma, Pillow's default) or
    WebP at `quality`, and decoded again."""
    buffer = io.BytesIO()
    Image.fromarray(image.permute(1, 2, 0).numpy()).save(buffer, fmt, quality=quality)
    decoded = np.asarray(Image.open(io.BytesIO(buffer.getvalue())).convert("RGB"))
    return torch.from_numpy(decoded.copy()).permute(2, 0, 1)
