"""The KNN head of bundle/knn.py against the definitions it implements, and its file."""

import numpy as np
import pytest

from bundle.knn import NeighbourHead
from training.knn import fit_pca


def brute_force(points: np.ndarray, queries: np.ndarray, metric: str) -> np.ndarray:
    """Every query's distance to every point, from the definitions."""
    if metric == "cosine":
        unit = lambda rows: rows / np.linalg.norm(rows, axis=1, keepdims=True)  # noqa: E731
        return 1 - unit(queries) @ unit(points).T
    return np.linalg.norm(queries[:, None, :] - points[None, :, :], axis=2)


@pytest.fixture
def data():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 10, 300)
    return rng.normal(size=(300, 12)) + labels[:, None], labels, rng.normal(size=(70, 12)) + 4  # 70 queries: two chunks


@pytest.mark.parametrize("metric", ["euclidean", "cosine"])
def test_nearest_rows_and_distances_are_the_definitions(data, metric):
    points, labels, queries = data
    head = NeighbourHead.fit(points, labels, 10, 7, metric)
    distances, indices = head.nearest(queries, 7)
    expected = brute_force(points, queries, metric)
    np.testing.assert_array_equal(indices, np.argsort(expected, axis=1, kind="stable")[:, :7])
    np.testing.assert_allclose(distances, np.sort(expected, axis=1)[:, :7], atol=1e-9)


def test_votes_are_the_k_nearest_labels_shares(data):
    points, labels, queries = data
    head = NeighbourHead.fit(points, labels, 10, 5, "euclidean")
    nearest = np.argsort(brute_force(points, queries, "euclidean"), axis=1)[:, :5]
    votes = head.votes(queries)
    expected = np.stack([np.bincount(labels[row], minlength=10) / 5 for row in nearest])
    np.testing.assert_array_equal(votes, expected)
    assert (head.predict(queries) == votes.argmax(1)).all()


def test_a_projection_searches_among_the_projected_rows(data):
    points, labels, queries = data
    mean, components = fit_pca(points, 4)
    head = NeighbourHead.fit(points, labels, 10, 3, "cosine", mean, components)
    projected = (points - mean) @ components.T
    _, indices = head.nearest(queries, 3)
    expected = np.argsort(brute_force(projected, (queries - mean) @ components.T, "cosine"), axis=1)[:, :3]
    np.testing.assert_array_equal(indices, expected)


def test_pca_finds_the_directions_of_largest_variance():
    rng = np.random.default_rng(1)
    basis = np.linalg.qr(rng.normal(size=(20, 20)))[0][:3]  # three orthonormal directions in 20 dimensions
    rows = (rng.normal(size=(20000, 3)) * [10.0, 4.0, 1.0]) @ basis + 7.0
    mean, components = fit_pca(rows, 3)
    np.testing.assert_allclose(components @ components.T, np.eye(3), atol=1e-9)
    np.testing.assert_allclose(np.abs(components @ basis.T), np.eye(3), atol=0.02)  # in order of variance, up to sign
    np.testing.assert_allclose(((rows - mean) @ components.T) @ components + mean, rows, atol=1e-9)  # rank 3: nothing lost
    with pytest.raises(ValueError, match="components must be between 1 and the 20"):
        fit_pca(rows, 21)


def test_the_file_gives_back_the_same_answers_and_holds_no_pickle(data, tmp_path):
    points, labels, queries = data
    mean, components = fit_pca(points, 6)
    head = NeighbourHead.fit(points, labels, 10, 5, "euclidean", mean, components)
    head.save(tmp_path / "knn.npz")
    loaded = NeighbourHead.load(tmp_path / "knn.npz", 10, 5, "euclidean")
    np.testing.assert_array_equal(loaded.nearest(queries, 5)[1], head.nearest(queries, 5)[1])  # float32 on disk, same order
    np.testing.assert_array_equal(loaded.votes(queries), head.votes(queries))
    with np.load(tmp_path / "knn.npz", allow_pickle=False) as arrays:
        assert sorted(arrays.files) == ["components", "labels", "mean", "points"]


def test_a_zero_row_is_at_cosine_distance_one_and_equal_rows_come_in_index_order():
    points = np.array([[0.0, 0.0], [1.0, 0.0], [0.6, 0.8], [0.6, 0.8], [0.6, 0.8], [0.0, 2.0]])
    head = NeighbourHead.fit(points, np.arange(6) % 3, 3, 2, "cosine")
    distances, indices = head.nearest(np.array([[0.0, 1.0]]), 6)
    assert indices.tolist() == [[5, 2, 3, 4, 0, 1]]  # the three equal rows by index; the zero row at 1.0 before the orthogonal one
    np.testing.assert_allclose(distances, [[0.0, 0.2, 0.2, 0.2, 1.0, 1.0]], atol=1e-12)
    for n in range(1, 6):  # a shorter list is the start of a longer one, ties at its end included
        assert head.nearest(np.array([[0.0, 1.0]]), n)[1].tolist() == [indices[0, :n].tolist()]


def test_a_file_that_does_not_make_a_head_is_refused(tmp_path):
    path = tmp_path / "knn.npz"
    np.savez(path, points=np.zeros((5, 3)), labels=np.zeros(4, np.int16))
    with pytest.raises(ValueError, match=r"points \(5, 3\) and labels \(4,\)"):
        NeighbourHead.load(path, 10, 3, "euclidean")
    np.savez(path, points=np.zeros((5, 3)), labels=np.full(5, 12, np.int16))
    with pytest.raises(ValueError, match="labels outside the 10 classes"):
        NeighbourHead.load(path, 10, 3, "euclidean")
    np.savez(path, points=np.zeros((5, 3)), labels=np.zeros(5, np.int16), extra=np.zeros(1))
    with pytest.raises(ValueError, match="holds arrays"):
        NeighbourHead.load(path, 10, 3, "euclidean")
    np.savez(path, points=np.zeros((5, 3)), labels=np.zeros(5, np.int16), components=np.zeros((3, 4)))  # no mean
    with pytest.raises(ValueError, match="holds arrays"):
        NeighbourHead.load(path, 10, 3, "euclidean")
    np.savez(path, points=np.full((5, 3), np.nan), labels=np.zeros(5, np.int16))
    with pytest.raises(ValueError, match="finite floating-point"):
        NeighbourHead.load(path, 10, 3, "euclidean")
    np.savez(path, points=np.zeros((5, 3)), labels=np.zeros(5))
    with pytest.raises(ValueError, match="class indices"):
        NeighbourHead.load(path, 10, 3, "euclidean")
    with open(path, "wb") as f:  # one array, not an archive of them
        np.save(f, np.zeros((5, 3)))
    with pytest.raises(ValueError, match="one array"):
        NeighbourHead.load(path, 10, 3, "euclidean")
    with pytest.raises(ValueError, match="between 1 and the 5 training rows"):
        NeighbourHead.fit(np.zeros((5, 3)), np.zeros(5), 10, 3, "euclidean").nearest(np.zeros((1, 3)), 6)


@pytest.mark.parametrize("neighbours", [3, 30])  # fewer and more than the committed cnn head's k = 20
def test_a_bundles_answer_is_its_heads_vote_and_nearest_rows(neighbours):
    from bundle.runtime import Bundle
    from tests.conftest import REPO

    bundle = Bundle.load(REPO / "models" / "cnn")
    embeddings = np.random.default_rng(2).normal(size=(5, bundle.manifest.embedding_dim)).astype(np.float32)
    votes, distances, indices, labels = bundle.knn(embeddings, neighbours)
    np.testing.assert_array_equal(votes, bundle.head.votes(embeddings))
    expected = bundle.head.nearest(embeddings, neighbours)
    np.testing.assert_array_equal(indices, expected[1])
    np.testing.assert_allclose(distances, expected[0])
    np.testing.assert_array_equal(labels, bundle.head.labels[indices])
    with pytest.raises(ValueError, match="at least 1, got 0"):
        bundle.knn(embeddings, 0)
