"""Confusion-matrix metrics against brute-force loops and hand-computed values."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from rloss import metrics
from rloss.errors import DataError


def brute_confusion(gt: np.ndarray, pred: np.ndarray, classes: int, ignore: set[int]) -> np.ndarray:
    matrix = np.zeros((classes, classes), dtype=np.int64)
    for g, p in zip(gt.ravel(), pred.ravel()):
        label = math.trunc(float(g))
        if label in ignore:
            continue
        matrix[label, int(p)] += 1
    return matrix


def test_predict_labels_breaks_ties_towards_the_larger_class():
    scores = torch.tensor([[[[1.0, 3.0, 2.0]], [[1.0, 3.0, 0.5]], [[0.2, 1.0, 2.0]]]])  # (1, 3, 1, 3)
    assert metrics.predict_labels(scores).tolist() == [[[1, 1, 2]]]


def test_predict_labels_matches_a_sorted_pair_ranking():
    rng = np.random.RandomState(0)
    scores = rng.randint(0, 3, size=(2, 4, 5, 6)).astype(np.float32)  # many exact ties
    got = metrics.predict_labels(torch.from_numpy(scores)).numpy()
    for n, h, w in np.ndindex(2, 5, 6):
        ranked = sorted(((scores[n, c, h, w], c) for c in range(4)), reverse=True)
        assert got[n, h, w] == ranked[0][1]


def test_confusion_matrix_matches_brute_force_with_ignore_set_and_truncation():
    rng = np.random.RandomState(1)
    gt = rng.randint(0, 5, size=(3, 1, 7, 8)).astype(np.float32)
    gt[rng.rand(*gt.shape) < 0.2] = 255
    gt[rng.rand(*gt.shape) < 0.1] = 254
    gt[0, 0, 0, :3] = [2.9, -0.5, 4.99]  # truncated towards zero: 2, 0, 4
    pred = rng.randint(0, 5, size=(3, 7, 8))
    got = metrics.confusion_matrix(torch.from_numpy(gt), torch.from_numpy(pred), 5, ignore=(255, 254))
    assert got.dtype == torch.int64
    np.testing.assert_array_equal(got.numpy(), brute_confusion(gt, pred, 5, {255, 254}))


def test_confusion_matrix_accepts_numpy():
    got = metrics.confusion_matrix(np.array([0, 1, 1, 9]), np.array([0, 1, 0, 1]), 2, ignore=[9])
    np.testing.assert_array_equal(got.numpy(), [[1, 0], [1, 1]])


@pytest.mark.parametrize("bad", [5.0, -1.0, 255.0])
def test_confusion_matrix_rejects_labels_outside_the_classes(bad):
    gt = torch.zeros(1, 1, 2, 3)
    gt[0, 0, 1, 2] = bad
    with pytest.raises(DataError, match=rf"label {int(bad)} at position \(0, 0, 1, 2\).*outside \[0, 5\)"):
        metrics.confusion_matrix(gt, torch.zeros(1, 2, 3), 5, ignore=(254,))


def test_confusion_matrix_rejects_a_count_mismatch():
    with pytest.raises(DataError, match="4 labels for 3 predictions"):
        metrics.confusion_matrix(torch.zeros(4), torch.zeros(3), 2)


def test_metrics_of_a_hand_computed_matrix():
    # class 0: 3 right, 1 called 1; class 1: 2 right; class 2 absent from GT but predicted once
    # (by a class-1 pixel); class 3 absent from both.
    matrix = np.array([[3, 1, 0, 0], [0, 2, 1, 0], [0, 0, 0, 0], [0, 0, 0, 0]])
    assert metrics.pixel_accuracy(matrix) == pytest.approx(5 / 7)
    assert metrics.mean_class_accuracy(matrix) == pytest.approx((3 / 4 + 2 / 3) / 2)
    iou = metrics.class_iou(matrix)
    np.testing.assert_allclose(iou[:3].numpy(), [3 / 4, 2 / 4, 0.0])
    assert math.isnan(float(iou[3]))
    assert metrics.mean_iou_caffe(matrix) == pytest.approx((3 / 4 + 2 / 4 + 0 + 1) / 4)
    assert metrics.mean_iou(matrix) == pytest.approx((3 / 4 + 2 / 4 + 0) / 3)
    assert metrics.seg_accuracy_values(matrix) == pytest.approx(
        (5 / 7, (3 / 4 + 2 / 3) / 2, (3 / 4 + 2 / 4 + 1) / 4)
    )


def test_metrics_of_an_empty_matrix():
    empty = torch.zeros(3, 3, dtype=torch.int64)
    assert metrics.pixel_accuracy(empty) == 0.0
    assert metrics.mean_class_accuracy(empty) == 0.0
    assert metrics.mean_iou_caffe(empty) == 1.0  # every class has an empty union
    assert metrics.mean_iou(empty) == 0.0
