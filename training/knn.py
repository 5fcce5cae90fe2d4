"""The study's last step: a k-nearest-neighbour classifier on the network's embeddings.

k and the distance are chosen on a held-out slice of the training set, never on the test set;
the chosen classifier is then refitted on every training embedding.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # scikit-learn is imported where it is used: `cifar10 --help` reads KNN_COMPONENTS
    from sklearn.neighbors import KNeighborsClassifier
    from sklearn.pipeline import Pipeline

KS = (1, 3, 5, 10, 20, 50)
METRICS = ("euclidean", "cosine")
KNN_COMPONENTS = 64  # PCA dimensions of an exported head: 50,000 × 64 float32 is 12.8 MB
VALIDATION_TAIL = 5000  # without a held-out set, validate on the last N training images (at most a fifth)


@dataclass
class KnnChoice:
    k: int
    metric: str
    validation_accuracy: float
    scores: dict[str, float] = field(default_factory=dict)  # "metric k=…" → validation accuracy
    fit_indices: np.ndarray | None = None
    validation_indices: np.ndarray | None = None


def make_knn(k: int, metric: str) -> KNeighborsClassifier:
    from sklearn.neighbors import KNeighborsClassifier

    # brute force: exact, and fast enough for 50k × D with BLAS; cosine needs it anyway
    return KNeighborsClassifier(n_neighbors=k, metric=metric, algorithm="brute", n_jobs=-1)


def select_knn(
    embeddings: np.ndarray, labels: np.ndarray, validation_indices: np.ndarray, ks=KS, metrics=METRICS
) -> KnnChoice:
    """Fit on the training embeddings outside validation_indices, score on those inside."""
    is_validation = np.zeros(len(labels), bool)
    is_validation[validation_indices] = True
    fit_indices = np.flatnonzero(~is_validation)
    validation_indices = np.flatnonzero(is_validation)
    scores = {}
    for metric in metrics:
        knn = make_knn(max(ks), metric).fit(embeddings[fit_indices], labels[fit_indices])
        # one neighbour search at the largest k serves every smaller k
        _, neighbours = knn.kneighbors(embeddings[validation_indices])
        votes = labels[fit_indices][neighbours]
        for k in ks:
            predicted = _majority(votes[:, :k])
            scores[f"{metric} k={k}"] = float((predicted == labels[validation_indices]).mean())
    best = max(scores, key=scores.get)  # the first of equals: smaller k, euclidean first
    metric, k = best.split(" k=")
    return KnnChoice(int(k), metric, scores[best], scores, fit_indices, validation_indices)


def fit_head(
    train: np.ndarray,
    train_labels: np.ndarray,
    held: np.ndarray | None = None,
    held_labels: np.ndarray | None = None,
    components: int | None = None,
) -> tuple[Pipeline, KnnChoice]:
    """Choose k and distance on `held` (or the tail of `train`), then fit on every `train` row.

    components: reduce the embeddings with PCA (fitted on `train`) before the neighbour search,
    to keep the head small; None keeps them whole.
    """
    from sklearn.decomposition import PCA
    from sklearn.pipeline import Pipeline

    steps = [("pca", PCA(components, random_state=0).fit(train))] if components else []
    reduce = steps[0][1].transform if steps else (lambda x: x)
    if held is not None and len(held):
        pool, labels = np.concatenate([reduce(train), reduce(held)]), np.concatenate([train_labels, held_labels])
        validation = np.arange(len(train), len(pool))
    else:
        pool, labels = reduce(train), train_labels
        validation = np.arange(len(pool) - min(VALIDATION_TAIL, len(pool) // 5), len(pool))
    choice = select_knn(pool, labels, validation)
    knn = make_knn(choice.k, choice.metric).fit(reduce(train), train_labels)
    return Pipeline(steps + [("knn", knn)]), choice


def _majority(votes: np.ndarray, num_classes: int = 10) -> np.ndarray:
    """Uniform vote; ties go to the lower class index, as scikit-learn's predict does."""
    counts = np.zeros((len(votes), num_classes), int)
    np.add.at(counts, (np.arange(len(votes))[:, None], votes), 1)
    return counts.argmax(1)
