"""The analysis metrics against values computed by hand on seven fixed predictions."""

import numpy as np
import pytest

from training.metrics import confusion_matrix, example_indices, per_class_scores, reliability, top_confusions

CLASSES = ["cat", "dog", "frog"]
LABELS = np.array([0, 0, 1, 1, 2, 2, 2])
PROBS = np.array(
    [
        [0.70, 0.20, 0.10],  # 0: cat  → cat   right, .70
        [0.40, 0.50, 0.10],  # 1: cat  → dog   wrong, .50
        [0.10, 0.85, 0.05],  # 2: dog  → dog   right, .85
        [0.25, 0.30, 0.45],  # 3: dog  → frog  wrong, .45
        [0.05, 0.05, 0.90],  # 4: frog → frog  right, .90
        [0.65, 0.20, 0.15],  # 5: frog → cat   wrong, .65
        [0.55, 0.25, 0.20],  # 6: frog → cat   wrong, .55
    ]
)


def test_confusion_matrix_rows_are_true_classes():
    cm = confusion_matrix(LABELS, PROBS.argmax(1), num_classes=3)
    assert cm.tolist() == [[1, 1, 0], [0, 1, 1], [2, 0, 1]]


def test_per_class_scores():
    scores = per_class_scores(confusion_matrix(LABELS, PROBS.argmax(1), num_classes=3))
    assert scores["precision"] == pytest.approx([1 / 3, 1 / 2, 1 / 2])
    assert scores["recall"] == pytest.approx([1 / 2, 1 / 2, 1 / 3])
    assert scores["f1"] == pytest.approx([0.4, 0.5, 0.4])
    assert scores["support"].tolist() == [2, 2, 3]


def test_a_class_never_predicted_scores_zero_not_nan():
    scores = per_class_scores(np.array([[2, 0], [1, 0]]))
    assert scores["precision"].tolist() == [2 / 3, 0.0] and scores["f1"][1] == 0.0


def test_top_confusions_are_ranked():
    cm = confusion_matrix(LABELS, PROBS.argmax(1), num_classes=3)
    assert top_confusions(cm, CLASSES) == [("frog", "cat", 2), ("cat", "dog", 1), ("dog", "frog", 1)]
    assert top_confusions(cm, CLASSES, n=1) == [("frog", "cat", 2)]


def test_expected_calibration_error():
    rel = reliability(PROBS, LABELS, bins=5)
    assert rel.count.tolist() == [0, 0, 3, 2, 2]
    assert rel.accuracy[2:].tolist() == pytest.approx([0.0, 0.5, 1.0])
    assert rel.confidence[2:].tolist() == pytest.approx([0.5, 0.675, 0.875])
    assert rel.ece == pytest.approx((3 * 0.5 + 2 * 0.175 + 2 * 0.125) / 7)


def test_the_four_example_tables():
    tables = example_indices(PROBS, LABELS, n=3)
    assert tables["right_most_confident"].tolist() == [4, 2, 0]
    assert tables["right_least_confident"].tolist() == [0, 2, 4]
    assert tables["wrong_most_confident"].tolist() == [5, 6, 1]
    assert tables["wrong_least_confident"].tolist() == [3, 1, 6]
