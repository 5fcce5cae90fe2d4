"""The KNN head in plain NumPy arrays: a PCA projection, then exact nearest training rows.

A bundle's head is a `.npz` of arrays, not a pickle: it loads without running code and without
scikit-learn, whose import alone costs a serving process about 135 MiB (docs/performance.md).
Training fits it (training/knn.py) and every consumer (the service, `cifar10 score` local and
on Spark, the export's own accuracy figure) runs this one class, so they agree by construction.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np

METRICS = ("euclidean", "cosine")
QUERY_CHUNK = 64  # query rows per distance matrix: 64 × 50,000 float64 is 25 MB


@dataclass(frozen=True)
class NeighbourHead:
    """k nearest training rows by `metric`, after projecting onto `components` (none: the embedding whole).

    Distances are computed in float64, whatever the embeddings' dtype: float32's rounding would
    reorder neighbours whose distances agree to six digits.
    """

    points: np.ndarray  # [N, C] the training rows, projected (and unit length for cosine), float64
    labels: np.ndarray  # [N] their class indices
    classes: int
    k: int
    metric: str
    mean: np.ndarray | None = None  # [D] PCA: rows are (embedding - mean) @ components.T
    components: np.ndarray | None = None  # [C, D]

    @classmethod
    def fit(
        cls, embeddings: np.ndarray, labels: np.ndarray, classes: int, k: int, metric: str, mean=None, components=None
    ) -> NeighbourHead:
        if metric not in METRICS:
            raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
        points = search_space(embeddings, metric, mean, components)
        return cls(points, np.asarray(labels, np.int64), classes, int(k), metric, mean, components)

    def project(self, embeddings: np.ndarray) -> np.ndarray:
        return search_space(embeddings, self.metric, self.mean, self.components)

    @cached_property
    def _squared_norms(self) -> np.ndarray:
        return np.einsum("ij,ij->i", self.points, self.points)

    def nearest(self, embeddings: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
        """(distances, indices into the training rows) of the n nearest, nearest first."""
        if not 1 <= n <= len(self.points):
            raise ValueError(f"n must be between 1 and the {len(self.points)} training rows, got {n}")
        queries = self.project(embeddings)
        squared, found = np.empty((len(queries), n)), np.empty((len(queries), n), np.int64)
        for start in range(0, len(queries), QUERY_CHUNK):
            chunk = queries[start : start + QUERY_CHUNK]
            # |q - p|² = |q|² - 2 q·p + |p|², one matrix product for the whole chunk
            distances = np.einsum("ij,ij->i", chunk, chunk)[:, None] - 2 * chunk @ self.points.T + self._squared_norms
            nearest = np.argpartition(distances, n - 1, axis=1)[:, :n]
            nearest = np.take_along_axis(nearest, np.take_along_axis(distances, nearest, 1).argsort(axis=1), 1)
            found[start : start + len(chunk)] = nearest
            squared[start : start + len(chunk)] = np.maximum(np.take_along_axis(distances, nearest, 1), 0)
        return (squared / 2 if self.metric == "cosine" else np.sqrt(squared)), found

    def votes(self, embeddings: np.ndarray) -> np.ndarray:
        """[N, classes]: the share of the k nearest training rows in each class."""
        return vote_shares(self.labels[self.nearest(embeddings, self.k)[1]], self.classes)

    def predict(self, embeddings: np.ndarray) -> np.ndarray:
        """The majority class of the k nearest; a tie goes to the lower class index."""
        return self.votes(embeddings).argmax(1)

    def accuracy(self, embeddings: np.ndarray, labels: np.ndarray) -> float:
        return float((self.predict(embeddings) == labels).mean())

    def save(self, path: Path) -> None:
        """float32 on disk (half the bytes); the PCA arrays only where there is a projection."""
        pca = {} if self.components is None else {"mean": self.mean, "components": self.components}
        arrays = dict(points=self.points.astype(np.float32), labels=self.labels.astype(np.int16), **pca)
        with open(path, "wb") as out:  # a file object: np.savez would append .npz to a name without it
            np.savez(out, **arrays)

    @classmethod
    def load(cls, path: Path, classes: int, k: int, metric: str) -> NeighbourHead:
        """classes, k and metric come from the bundle's manifest, which states them once."""
        with np.load(path, allow_pickle=False) as arrays:
            found = set(arrays.files)
            if not {"points", "labels"} <= found or found - {"points", "labels", "mean", "components"}:
                raise ValueError(f"holds arrays {sorted(found)}, not points, labels and optionally mean and components")
            points, labels = arrays["points"].astype(np.float64), arrays["labels"].astype(np.int64)
            mean, components = (arrays["mean"], arrays["components"]) if "components" in found else (None, None)
        if points.ndim != 2 or labels.shape != (len(points),) or not 1 <= k <= len(points):
            raise ValueError(f"points {points.shape} and labels {labels.shape} do not make a head for k={k}")
        if components is not None and (
            components.ndim != 2 or components.shape[0] != points.shape[1] or mean.shape != components.shape[1:]
        ):
            raise ValueError(
                f"PCA mean {mean.shape} and components {components.shape} do not project onto {points.shape[1]} dimensions"
            )
        if labels.min(initial=0) < 0 or labels.max(initial=0) >= classes:
            raise ValueError(f"labels outside the {classes} classes")
        return cls(points, labels, classes, k, metric, mean, components)


def search_space(embeddings: np.ndarray, metric: str, mean: np.ndarray | None, components: np.ndarray | None) -> np.ndarray:
    """Rows as the neighbours are searched among them: projected onto the PCA components, if any, and
    for cosine made unit length (cosine distance is then half the squared Euclidean one)."""
    rows = np.asarray(embeddings, np.float64)
    if components is not None:
        rows = (rows - mean) @ np.asarray(components, np.float64).T
    if metric == "cosine":
        rows = rows / np.maximum(np.linalg.norm(rows, axis=1, keepdims=True), np.finfo(np.float64).tiny)
    return rows


def vote_shares(neighbour_labels: np.ndarray, classes: int) -> np.ndarray:
    """[N, classes]: each class's share of each row's neighbours, a uniform vote (scikit-learn's predict_proba)."""
    counts = np.zeros((len(neighbour_labels), classes))
    np.add.at(counts, (np.arange(len(neighbour_labels))[:, None], neighbour_labels), 1)
    return counts / max(neighbour_labels.shape[1], 1)
