"""Accuracy and calibration under the conditions users upload in: one table per bundle.

Each condition turns an image's uint8 pixels into the bytes a client would send (Pillow's
encoders: the libjpeg and libwebp that phones and browsers use), and the service's own decoder
(`bundle.images.decode`) turns the bytes back into the model's input, so the figures are those of
the served model. Noise and blur are applied to the pixels and then sent losslessly (PNG), at the
mild strengths of real photographs (CIFAR-10-C's first severities, Hendrycks & Dietterich 2019).
Torch-free: it measures a bundle in process (`Bundle.predict`) or a running service over HTTP.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageFilter

from bundle.images import decode
from bundle.manifest import ConditionScore
from bundle.runtime import Bundle
from cifar10.errors import UserError
from training.metrics import calibration_bins, softmax

NOISE_SIGMA = 10.0  # Gaussian sensor noise, in 0..255 levels (CIFAR-10-C severity 1: 0.04 of the range)
BLUR_SIGMA = 0.6  # Gaussian blur, in pixels of the 32×32 image (CIFAR-10-C severity 2)
PHOTO_SIDE, PHOTO_QUALITY = 256, 85  # a larger upload than CIFAR-10 itself: upscaled, then saved as JPEG


@dataclass(frozen=True)
class Condition:
    name: str
    description: str
    encode: Callable[[np.ndarray, int], bytes]  # (uint8 [32, 32, 3] pixels, image index) → upload bytes


def _save(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def _png(pixels: np.ndarray, index: int) -> bytes:
    return _save(Image.fromarray(pixels), "PNG")


def _jpeg(quality: int) -> Callable[[np.ndarray, int], bytes]:
    return lambda pixels, index: _save(Image.fromarray(pixels), "JPEG", quality=quality)


def _webp(pixels: np.ndarray, index: int) -> bytes:
    return _save(Image.fromarray(pixels), "WEBP")  # Pillow's default quality, 80


def _noise(pixels: np.ndarray, index: int) -> bytes:
    rng = np.random.default_rng(index)  # the same noise for an image in every run
    noisy = pixels + rng.normal(0, NOISE_SIGMA, pixels.shape)
    return _png(np.clip(np.round(noisy), 0, 255).astype(np.uint8), index)


def _blur(pixels: np.ndarray, index: int) -> bytes:
    return _save(Image.fromarray(pixels).filter(ImageFilter.GaussianBlur(BLUR_SIGMA)), "PNG")


def _photo(pixels: np.ndarray, index: int) -> bytes:
    large = Image.fromarray(pixels).resize((PHOTO_SIDE, PHOTO_SIDE), Image.Resampling.BICUBIC)
    return _save(large, "JPEG", quality=PHOTO_QUALITY)


CONDITIONS: dict[str, Condition] = {
    c.name: c
    for c in (
        Condition("png", "PNG (lossless)", _png),
        Condition("jpeg95", "JPEG quality 95", _jpeg(95)),
        Condition("jpeg90", "JPEG quality 90", _jpeg(90)),
        Condition("jpeg75", "JPEG quality 75", _jpeg(75)),
        Condition("jpeg50", "JPEG quality 50", _jpeg(50)),
        Condition("webp", "WebP quality 80", _webp),
        Condition("noise", f"Gaussian noise σ {NOISE_SIGMA:g}/255, PNG", _noise),
        Condition("blur", f"Gaussian blur σ {BLUR_SIGMA:g} px, PNG", _blur),
        Condition("photo", f"upscaled to {PHOTO_SIDE}×{PHOTO_SIDE}, JPEG quality {PHOTO_QUALITY}", _photo),
    )
}


def uploads(images: np.ndarray, condition: Condition, workers: int | None = None) -> list[bytes]:
    """uint8 [N, 32, 32, 3] → the N uploads a client would send (Pillow encodes without the GIL)."""
    with ThreadPoolExecutor(workers) as pool:
        return list(pool.map(condition.encode, images, range(len(images)), chunksize=256))


def decoded(data: Iterable[bytes], workers: int | None = None) -> np.ndarray:
    """The pixels the service's decoder makes of the uploads: uint8 [N, 32, 32, 3]."""
    with ThreadPoolExecutor(workers) as pool:
        return np.stack(list(pool.map(decode, data, chunksize=256)))


@dataclass(frozen=True)
class Answers:
    """What a classifier said about N images: its class, the probability it gave that class, and
    the same probability before calibration where the classifier exposes its logits."""

    predicted: np.ndarray  # int [N]
    confidence: np.ndarray  # float [N]
    uncalibrated: np.ndarray | None = None  # float [N]


def bundle_classifier(bundle: Bundle) -> Callable[[list[bytes]], Answers]:
    """Classify uploads as the service does, in process: its decoder, the bundle's graph."""

    def classify(data: list[bytes]) -> Answers:
        prediction = bundle.predict(decoded(data))
        probabilities = prediction.probabilities
        return Answers(probabilities.argmax(1), probabilities.max(1), softmax(prediction.logits).max(1))

    return classify


def http_classifier(url: str, model: str, batch: int = 64, timeout: float = 120) -> Callable[[list[bytes]], Answers]:
    """Classify uploads by POSTing them to a running service's /classify, `batch` files a request."""
    import httpx  # BentoML's own dependency, so on every serving install

    def classify(data: list[bytes]) -> Answers:
        answers = []
        with httpx.Client(base_url=url, timeout=timeout) as client:
            for start in range(0, len(data), batch):
                files = [("images", (f"{start + i}", d)) for i, d in enumerate(data[start : start + batch])]
                try:
                    response = client.post("/classify", files=files, data={"model": model})
                except httpx.HTTPError as exc:
                    raise UserError(f"{url}/classify: {str(exc) or type(exc).__name__}; is `bentoml serve` running there?") from exc
                if response.status_code != 200:
                    raise UserError(f"{url}/classify answered {response.status_code}: {response.text[:300]}")
                answers += response.json()
        return Answers(np.array([a["index"] for a in answers]), np.array([a["probability"] for a in answers]))

    return classify


def score(answers: Answers, labels: np.ndarray) -> dict:
    """accuracy, ECE and mean confidence of the answers (ECE before calibration where known)."""
    correct = answers.predicted == labels
    row = {
        "images": len(labels),
        "accuracy": float(correct.mean()),
        "ece": calibration_bins(answers.confidence, correct).ece,
        "mean_confidence": float(answers.confidence.mean()),
    }
    if answers.uncalibrated is not None:
        row["ece_uncalibrated"] = calibration_bins(answers.uncalibrated, correct).ece
    return row


def measure(
    classify: Callable[[list[bytes]], Answers], images: np.ndarray, names: Iterable[str] = CONDITIONS,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Answers]:
    """{condition: answers} for the images (uint8 [N, 32, 32, 3]) sent as each condition's uploads."""
    answers = {}
    for name in names:
        if progress:
            progress(name)
        answers[name] = classify(uploads(images, CONDITIONS[name]))
    return answers


def table(answers: dict[str, Answers], labels: np.ndarray) -> dict[str, dict]:
    """{condition: its description and score}, in the order measured."""
    return {name: {"description": CONDITIONS[name].description, **score(a, labels)} for name, a in answers.items()}


def condition_scores(rows: dict[str, dict]) -> tuple[ConditionScore, ...]:
    """The table as the manifest records it."""
    return tuple(ConditionScore(condition=name, **row) for name, row in rows.items())


def format_table(table: dict[str, dict]) -> str:
    """The Markdown table docs and reports show."""
    calibrated = any("ece_uncalibrated" in row for row in table.values())
    head = "| upload | accuracy | ECE | mean confidence |" + (" ECE before calibration |" if calibrated else "")
    lines = [head, "| --- | ---: | ---: | ---: |" + (" ---: |" if calibrated else "")]
    for row in table.values():
        line = f"| {row['description']} | {row['accuracy']:.2%} | {row['ece']:.2%} | {row['mean_confidence']:.3f} |"
        if calibrated:
            line += f" {row['ece_uncalibrated']:.2%} |" if "ece_uncalibrated" in row else " |"
        lines.append(line)
    return "\n".join(lines)
