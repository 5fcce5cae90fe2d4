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
ARRAYS = ("points", "labels", "mean", "components")  # what knn.npz holds; the last two only with a projection
QUERY_CHUNK = 64  # query rows per distance matrix: 64 × 50,000 float64 is 25 MB, about three times that at the peak


@dataclass(frozen=True, eq=False)
class NeighbourHead:
    """k nearest training rows by `metric`, after projecting onto `components` (none: the embedding whole).

    Distances are computed in float64, whatever the embeddings' dtype: float32's rounding would
    reorder neighbours whose distances agree to six digits. Rows at equal distance come in the
    order of their index, so the k nearest are the first k of any longer list.
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

    def distances(self, queries: np.ndarray) -> np.ndarray:
        """[len(queries), N] from projected queries: 1 - cosine similarity, or squared Euclidean distance."""
        products = queries @ self.points.T
        if self.metric == "cosine":  # unit rows (a zero row stays zero: distance 1, as scikit-learn has it)
            return np.clip(np.subtract(1, products, out=products), 0, 2, out=products)
        products *= -2  # |q - p|² = |q|² - 2 q·p + |p|², in place: the matrix is the memory
        products += self._squared_norms
        products += np.einsum("ij,ij->i", queries, queries)[:, None]
        return np.maximum(products, 0, out=products)

    def nearest(self, embeddings: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
        """(distances, indices into the training rows) of the n nearest, nearest first, equals by index."""
        if not 1 <= n <= len(self.points):
            raise ValueError(f"n must be between 1 and the {len(self.points)} training rows, got {n}")
        queries = self.project(embeddings)
        found = np.empty((len(queries), n), np.int64)
        values = np.empty((len(queries), n))
        for start in range(0, len(queries), QUERY_CHUNK):
            distances = self.distances(queries[start : start + QUERY_CHUNK])
            for row, (line, out) in enumerate(zip(distances, found[start : start + len(distances)])):
                out[:] = smallest(line, n)
                values[start + row] = line[out]
        return (values if self.metric == "cosine" else np.sqrt(values)), found

    def search(self, embeddings: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(votes [N, classes], and the n nearest rows' distances and indices), from one search."""
        if n < 1:
            raise ValueError(f"n must be at least 1, got {n}")
        distances, indices = self.nearest(embeddings, max(n, self.k))
        return vote_shares(self.labels[indices[:, : self.k]], self.classes), distances[:, :n], indices[:, :n]

    def votes(self, embeddings: np.ndarray) -> np.ndarray:
        """[N, classes]: the share of the k nearest training rows in each class."""
        return self.search(embeddings, self.k)[0]

    def predict(self, embeddings: np.ndarray) -> np.ndarray:
        """The majority class of the k nearest; a tie goes to the lower class index."""
        return self.votes(embeddings).argmax(1)

    def accuracy(self, embeddings: np.ndarray, labels: np.ndarray) -> float:
        return float((self.predict(embeddings) == labels).mean())

    def save(self, path: Path) -> None:
        """Points as float32 (half the bytes), labels as int16; the PCA arrays only where there is a projection."""
        if self.classes > np.iinfo(np.int16).max:
            raise ValueError(f"{self.classes} classes do not fit the file's int16 labels")
        pca = {} if self.components is None else {"mean": self.mean, "components": self.components}
        arrays = dict(points=self.points.astype(np.float32), labels=self.labels.astype(np.int16), **pca)
        with open(path, "wb") as out:  # a file object: np.savez would append .npz to a name without it
            np.savez(out, **arrays)

    @classmethod
    def load(cls, path: Path, classes: int, k: int, metric: str) -> NeighbourHead:
        """classes, k and metric come from the bundle's manifest, which states them once. Raises ValueError
        for a file that is not a head of that shape: whatever it holds is refused at load, not at a request."""
        arrays = np.load(path, allow_pickle=False)  # a pickled object array raises ValueError
        if not isinstance(arrays, np.lib.npyio.NpzFile):
            raise ValueError("holds one array, not an .npz of arrays")
        with arrays:
            found = set(arrays.files)
            if found not in ({"points", "labels"}, set(ARRAYS)):
                raise ValueError(f"holds arrays {sorted(found)}, not points and labels, with or without mean and components")
            loaded = {name: np.asarray(arrays[name]) for name in found}
        floats = [loaded[name] for name in ("points", "mean", "components") if name in loaded]
        if not all(np.issubdtype(a.dtype, np.floating) and np.isfinite(a).all() for a in floats):
            raise ValueError("points, mean and components must be finite floating-point numbers")
        points, labels = loaded["points"].astype(np.float64), loaded["labels"]
        if not np.issubdtype(labels.dtype, np.integer) or points.ndim != 2 or labels.shape != (len(points),):
            raise ValueError(f"points {points.shape} and labels {labels.shape} {labels.dtype} are not rows and their class indices")
        if not 1 <= k <= len(points):
            raise ValueError(f"{len(points)} training rows cannot give k={k} neighbours")
        if labels.min(initial=0) < 0 or labels.max(initial=0) >= classes:
            raise ValueError(f"labels outside the {classes} classes")
        mean, components = loaded.get("mean"), loaded.get("components")
        if components is not None and (components.ndim != 2 or components.shape[0] != points.shape[1] or mean.shape != components.shape[1:]):
            raise ValueError(f"PCA mean {mean.shape} and components {components.shape} do not project onto {points.shape[1]} dimensions")
        return cls(points, labels.astype(np.int64), classes, k, metric, mean, components)


def smallest(line: np.ndarray, n: int) -> np.ndarray:
    """Indices of the n smallest values, smallest first, equal values by index: the same n whatever n's neighbours."""
    if n < len(line):
        boundary = np.partition(line, n - 1)[n - 1]
        candidates = np.flatnonzero(line <= boundary)  # every row tied at the boundary too, in index order
    else:
        candidates = np.arange(len(line))
    return candidates[np.argsort(line[candidates], kind="stable")[:n]]


def search_space(embeddings: np.ndarray, metric: str, mean: np.ndarray | None, components: np.ndarray | None) -> np.ndarray:
    """Rows as the neighbours are searched among them: projected onto the PCA components, if any, and
    for cosine made unit length (a zero row stays zero)."""
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
