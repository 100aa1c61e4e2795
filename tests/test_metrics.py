"""Task metrics on tiny arrays, every expected value worked out by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest

from deployopt import metrics

LOGITS = np.array([[2, 1, 0], [0, 3, 1], [1, 0, 2], [0, 1, 0]], dtype=np.float32)
# argmax: 0, 1, 2, 1


def test_classification_accuracy_macro_f1_and_agreement():
    labels = [0, 1, 1, 2]
    ref = np.array([[1, 0, 0], [0, 1, 0], [0, 0, 1], [1, 0, 0]])  # argmax 0, 1, 2, 0
    got = metrics.classification(LOGITS, labels, ref)
    # right on samples 0 and 1: 2 of 4
    assert got["accuracy"] == 50.0
    # class 0: tp 1 -> F1 1; class 1: tp 1, fp 1 (sample 3), fn 1 (sample 2) -> 2/4 = 0.5;
    # class 2: no true positive -> 0; macro (1 + 0.5 + 0) / 3
    assert got["macro_f1"] == pytest.approx(50.0)
    # the reference's argmax differs on sample 3 only
    assert got["argmax_agreement"] == 75.0
    assert metrics.classification(LOGITS, labels)["argmax_agreement"] == 100.0


def test_macro_f1_counts_predicted_classes_missing_from_the_labels():
    # predictions 0, 1, 2, 1 against all-zero labels: class 0 F1 = 2*1/(2+0+3) = 0.4,
    # classes 1 and 2 (predicted, never true) 0 -> 0.4 / 3
    got = metrics.classification(LOGITS, [0, 0, 0, 0])
    assert got["accuracy"] == 25.0
    assert got["macro_f1"] == pytest.approx(40 / 3)


def test_classification_checks_lengths():
    with pytest.raises(ValueError, match="3 labels for 4 samples"):
        metrics.classification(LOGITS, [0, 1, 2])


def test_topk_ranks_ties_by_class_index():
    z = np.array([[3, 2, 1], [1, 2, 3], [1, 1, 0]])
    y = [1, 0, 1]
    # top-2 sets {0, 1}, {2, 1}, {0, 1} (a tie goes to the lower index): rows 0 and 2 hit
    assert metrics.topk(z, y, 2) == pytest.approx(200 / 3)
    # top-1: 0, 2, 0 -> no hit; with label 0 on the tied row, the tie's winner is class 0
    assert metrics.topk(z, y, 1) == 0.0
    assert metrics.topk(z, [0, 0, 0], 1) == pytest.approx(200 / 3)
    assert metrics.topk(z, y, 3) == 100.0


def test_knn_accuracy_leave_one_out():
    # two tight clusters, one point of each label sitting in the other cluster
    e = np.array([[1, 0], [1, 0.1], [1, -0.1], [0, 1], [0.1, 1], [-0.1, 1], [1, 0.05], [0.05, 1]])
    y = ["a", "a", "a", "b", "b", "b", "b", "a"]
    # k=3: in cluster one the neighbours of a point are the other three members. Samples
    # 0, 1, 2 see two 'a' and the stray 'b' -> right; the stray 6 sees three 'a' -> wrong.
    # The same in cluster two: 3, 4, 5 right, 7 wrong: 6 of 8
    assert metrics.knn_accuracy(e, y, k=3) == 75.0
    # k=1 (angles: 6 at 0.050 rad, 1 at 0.0997, 2 at -0.0997): 0 -> 6 ('b', wrong),
    # 1 -> 6 (wrong), 2 -> 0 (right), 6 -> 1 (0.0497 rad away, nearer than 0: 'a', wrong);
    # mirrored in cluster two: only 5 is right. 2 of 8
    assert metrics.knn_accuracy(e, y, k=1) == 25.0


def test_knn_ties_are_broken_by_index():
    e = np.array([[1.0, 0.0]] * 3)  # three identical points: every similarity ties
    # k=1: each point's neighbour is the lowest other index: 0 -> 1, 1 -> 0, 2 -> 0
    assert metrics.knn_accuracy(e, [0, 1, 0], k=1) == pytest.approx(100 / 3)  # only 2 right
    # k=2: samples 0 and 1 each see one 'x' and one 'y'; the tied vote goes to the nearer,
    # the lower index, which is 'x' (right); sample 2 sees 'x', 'x' (wrong)
    assert metrics.knn_accuracy(e, ["x", "x", "y"], k=2) == pytest.approx(200 / 3)
    assert metrics.knn_accuracy(e[:1], [0]) == 0.0  # one sample has no neighbour


def test_spearman_with_ties_and_degenerate_input():
    assert metrics.spearman([1, 2, 3, 4], [10, 20, 30, 45]) == pytest.approx(1.0)
    assert metrics.spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    # ranks [1, 2.5, 2.5, 4] vs [1, 2, 3, 4]: 4.5 / sqrt(4.5 * 5) = 3 / sqrt(10)
    assert metrics.spearman([1, 2, 2, 3], [1, 2, 3, 4]) == pytest.approx(3 / math.sqrt(10))
    assert metrics.spearman([1, 1, 1], [1, 2, 3]) == 0.0
    assert metrics.spearman([1], [1]) == 0.0


def test_pair_cosine():
    a = np.array([[1, 0], [1, 1], [0, 0]])
    b = np.array([[0, 1], [2, 2], [1, 0]])
    assert metrics.pair_cosine(a, b) == pytest.approx([0.0, 1.0, 0.0])
