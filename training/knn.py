"""The study's last step: a k-nearest-neighbour classifier on the network's embeddings.

k and the distance are chosen on a held-out slice of the training set, never on the test set;
the chosen classifier is then refitted on every training embedding.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from bundle.knn import METRICS, NeighbourHead, vote_shares

KS = (1, 3, 5, 10, 20, 50)
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


def fit_pca(embeddings: np.ndarray, components: int) -> tuple[np.ndarray, np.ndarray]:
    """(mean [D], components [C, D]): the directions of largest variance, from the covariance's eigenvectors."""
    if not 1 <= components <= embeddings.shape[1]:
        raise ValueError(f"components must be between 1 and the {embeddings.shape[1]} embedding dimensions, got {components}")
    rows = np.asarray(embeddings, np.float64)
    mean = rows.mean(0)
    centred = rows - mean
    _, vectors = np.linalg.eigh(centred.T @ centred)  # ascending eigenvalues
    return mean, np.ascontiguousarray(vectors[:, ::-1][:, :components].T)


def select_knn(
    embeddings: np.ndarray,
    labels: np.ndarray,
    classes: int,
    validation_indices: np.ndarray,
    ks=KS,
    metrics=METRICS,
    mean=None,
    components=None,
) -> KnnChoice:
    """Fit on the training embeddings outside validation_indices, score on those inside (both projected by
    the PCA mean and components, if given)."""
    is_validation = np.zeros(len(labels), bool)
    is_validation[validation_indices] = True
    fit_indices = np.flatnonzero(~is_validation)
    validation_indices = np.flatnonzero(is_validation)
    from tqdm import tqdm  # here: cifar10.cli imports this module for KNN_COMPONENTS, on installs without the train extra too

    scores = {}
    for metric in tqdm(metrics, desc="KNN: choosing k and distance", unit="distance", leave=False, disable=None):
        # one neighbour search at the largest k serves every smaller k
        search = NeighbourHead.fit(embeddings[fit_indices], labels[fit_indices], classes, max(ks), metric, mean, components)
        _, neighbours = search.nearest(embeddings[validation_indices], max(ks))
        for k in ks:
            predicted = vote_shares(search.labels[neighbours[:, :k]], classes).argmax(1)  # a tie: the lower class
            scores[f"{metric} k={k}"] = float((predicted == labels[validation_indices]).mean())
    best = max(scores, key=scores.get)  # the first of equals: smaller k, euclidean first
    metric, k = best.split(" k=")
    return KnnChoice(int(k), metric, scores[best], scores, fit_indices, validation_indices)


def fit_head(
    train: np.ndarray,
    train_labels: np.ndarray,
    classes: int,
    held: np.ndarray | None = None,
    held_labels: np.ndarray | None = None,
    components: int | None = None,
) -> tuple[NeighbourHead, KnnChoice]:
    """Choose k and distance on `held` (or the tail of `train`), then fit on every `train` row.

    components: reduce the embeddings with PCA (fitted on `train`) before the neighbour search,
    to keep the head small; None keeps them whole.
    """
    mean, directions = fit_pca(train, components) if components else (None, None)
    if held is not None and len(held):
        pool, labels = np.concatenate([train, held]), np.concatenate([train_labels, held_labels])
        validation = np.arange(len(train), len(pool))
    else:
        pool, labels = train, train_labels
        validation = np.arange(len(pool) - min(VALIDATION_TAIL, len(pool) // 5), len(pool))
    choice = select_knn(pool, labels, classes, validation, mean=mean, components=directions)
    return NeighbourHead.fit(train, train_labels, classes, choice.k, choice.metric, mean, directions), choice
