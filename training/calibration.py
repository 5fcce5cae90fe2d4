"""Probabilities that mean what they say: a temperature fitted on held-out training images.

A network trained with label smoothing answers 0.75 where it is right 95% of the time; dividing
its logits by one temperature before the softmax (Guo et al., 2017, "On Calibration of Modern
Neural Networks") fixes most of that without changing any answer. The temperature is fitted on
training images the run held out (`--holdout`), each sent as every upload condition of
training/robustness.py, so that it is right for JPEGs as well as for PNGs; the exported graph
applies it (training/export.py), so every consumer of the bundle returns the same probabilities.
"""

from __future__ import annotations

import numpy as np
import torch
from scipy.optimize import minimize_scalar
from tqdm import tqdm

from bundle.manifest import Calibration
from training.data import Split
from training.evaluate import predict
from training.metrics import reliability, softmax
from training.robustness import CONDITIONS, decoded, uploads

UNCALIBRATED = Calibration(method="none", temperature=1.0, fit_images=0, fit_conditions=(), ece_before=None, ece_after=None)


def fit_temperature(logits: np.ndarray, labels: np.ndarray) -> float:
    """The T minimising the negative log-likelihood of softmax(logits / T)."""

    def nll(log_t: float) -> float:
        p = softmax(logits, float(np.exp(log_t)))
        return float(-np.log(p[np.arange(len(labels)), labels] + 1e-12).mean())

    return float(np.exp(minimize_scalar(nll, bounds=(-3, 3), method="bounded").x))


def calibrate(model: torch.nn.Module, held: Split, conditions: tuple[str, ...] = tuple(CONDITIONS)) -> Calibration:
    """The temperature for `model` (as it will be exported: fp32, with its test-time augmentation)."""
    if not len(held):
        return UNCALIBRATED
    nhwc = held.images.permute(0, 2, 3, 1).contiguous().numpy()
    logits = []
    for name in tqdm(conditions, desc="calibration: held-out uploads", unit="condition", leave=False, disable=None):
        pixels = torch.from_numpy(decoded(uploads(nhwc, CONDITIONS[name]))).permute(0, 3, 1, 2).contiguous()
        logits.append(predict(model, pixels, torch.device("cpu"), bf16=False)[0].numpy())
    logits, labels = np.concatenate(logits), np.tile(held.labels.numpy(), len(conditions))
    temperature = fit_temperature(logits, labels)
    return Calibration(
        method="temperature", temperature=temperature, fit_images=len(held), fit_conditions=conditions,
        ece_before=reliability(softmax(logits), labels).ece, ece_after=reliability(softmax(logits, temperature), labels).ece,
    )  # fmt: skip
