"""The study's analysis as plain numpy functions of (probabilities, labels): easy to check by hand."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    z = logits / temperature
    z = np.exp(z - z.max(1, keepdims=True))
    return z / z.sum(1, keepdims=True)


def confusion_matrix(labels: np.ndarray, predicted: np.ndarray, num_classes: int = 10) -> np.ndarray:
    """Rows are true classes, columns predicted ones."""
    return np.bincount(labels * num_classes + predicted, minlength=num_classes**2).reshape(num_classes, num_classes)


def per_class_scores(confusion: np.ndarray) -> dict[str, np.ndarray]:
    """Precision, recall and F1 per class; 0 where a class was never predicted or never present."""
    hits = np.diag(confusion).astype(float)
    predicted, support = confusion.sum(0), confusion.sum(1)
    precision = np.divide(hits, predicted, out=np.zeros_like(hits), where=predicted > 0)
    recall = np.divide(hits, support, out=np.zeros_like(hits), where=support > 0)
    both = precision + recall
    f1 = np.divide(2 * precision * recall, both, out=np.zeros_like(hits), where=both > 0)
    return {"precision": precision, "recall": recall, "f1": f1, "support": support}


def top_confusions(confusion: np.ndarray, classes, n: int = 10) -> list[tuple[str, str, int]]:
    """The largest off-diagonal cells, as (true class, predicted class, count), largest first."""
    off = confusion.copy()
    np.fill_diagonal(off, 0)
    order = np.argsort(-off, axis=None, kind="stable")[:n]
    cells = [np.unravel_index(i, off.shape) for i in order]
    return [(classes[t], classes[p], int(off[t, p])) for t, p in cells if off[t, p] > 0]


@dataclass(frozen=True)
class Reliability:
    """Per confidence bin: mean confidence, accuracy and count; ECE is their weighted gap."""

    edges: np.ndarray
    confidence: np.ndarray
    accuracy: np.ndarray
    count: np.ndarray

    @property
    def ece(self) -> float:
        weights = self.count / max(self.count.sum(), 1)
        return float(np.sum(weights * np.abs(self.accuracy - self.confidence)))


def reliability(probabilities: np.ndarray, labels: np.ndarray, bins: int = 15) -> Reliability:
    """Equal-width bins of top-1 confidence over (0, 1], as in Guo et al. (2017)."""
    return calibration_bins(probabilities.max(1), probabilities.argmax(1) == labels, bins)


def calibration_bins(confidence: np.ndarray, correct: np.ndarray, bins: int = 15) -> Reliability:
    """The same bins from each answer's top-1 probability and whether it was right."""
    edges = np.linspace(0, 1, bins + 1)
    which = np.clip(np.searchsorted(edges, confidence, side="left") - 1, 0, bins - 1)
    count = np.bincount(which, minlength=bins)
    safe = np.maximum(count, 1)
    return Reliability(
        edges=edges,
        confidence=np.bincount(which, weights=confidence, minlength=bins) / safe,
        accuracy=np.bincount(which, weights=correct.astype(float), minlength=bins) / safe,
        count=count,
    )


def example_indices(probabilities: np.ndarray, labels: np.ndarray, n: int = 10) -> dict[str, np.ndarray]:
    """The study's four tables: right and wrong predictions at the highest and lowest confidence.

    Ties keep index order, so the selection is reproducible.
    """
    confidence = probabilities.max(1)
    correct = probabilities.argmax(1) == labels
    tables = {}
    for name, mask in (("right", correct), ("wrong", ~correct)):
        candidates = np.flatnonzero(mask)
        tables[f"{name}_most_confident"] = candidates[np.argsort(-confidence[candidates], kind="stable")][:n]
        tables[f"{name}_least_confident"] = candidates[np.argsort(confidence[candidates], kind="stable")][:n]
    return tables
