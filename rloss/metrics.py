"""Segmentation metrics from a confusion matrix (rows = ground truth, columns = prediction).

Shared by the SegAccuracy layer, the solver's `test` command and the evaluation tools, so every
number they print comes from the same arithmetic. Two mean-IoU conventions exist: Caffe's
SegAccuracy averages over ALL classes and scores a class absent from both ground truth and
prediction as 1.0 (`mean_iou_caffe`); the usual benchmark convention averages only over classes
present in ground truth or prediction (`mean_iou`).
"""

from __future__ import annotations

from typing import Iterable

import numpy as np
import torch

from rloss.errors import DataError


def _as_tensor(values) -> torch.Tensor:
    return values if isinstance(values, torch.Tensor) else torch.as_tensor(np.asarray(values))


def predict_labels(scores: torch.Tensor, dim: int = 1) -> torch.Tensor:
    """Arg-max class along `dim`, ties going to the LARGER class index (Caffe sorts (score, class)
    pairs in descending order; torch.argmax would take the smaller index)."""
    size = scores.shape[dim]
    return (size - 1) - torch.argmax(torch.flip(scores, dims=(dim,)), dim=dim)


def invalid_label(labels: torch.Tensor, counted: torch.Tensor, num_classes: int) -> str:
    """A message naming the first counted label outside [0, num_classes) and its position, or ''.

    `labels` are already truncated to integers; `counted` masks out the ignored ones."""
    bad = counted & ((labels < 0) | (labels >= num_classes))
    if not bool(bad.any()):
        return ""
    position = tuple(int(i) for i in bad.nonzero()[0])
    return (f"label {int(labels[position])} at position {position} of the label blob (shape "
            f"{tuple(labels.shape)}) is outside [0, {num_classes}) and not ignored")


def confusion_matrix(gt, pred, num_classes: int, ignore: Iterable[int] = ()) -> torch.Tensor:
    """C x C int64 counts of (ground truth, prediction) pairs over the pixels whose truncated label
    is not in `ignore`. A remaining label outside [0, C) raises DataError naming it and its position.

    `gt` may hold float labels (Caffe blobs): they are truncated towards zero like C's `(int)`.
    """
    gt_t, pred_t = _as_tensor(gt), _as_tensor(pred)
    if gt_t.numel() != pred_t.numel():
        raise DataError(f"{gt_t.numel()} labels for {pred_t.numel()} predictions (shapes "
                        f"{tuple(gt_t.shape)} and {tuple(pred_t.shape)})")
    labels = gt_t.to(torch.int64)
    ignored = torch.tensor(sorted({int(v) for v in ignore}), dtype=torch.int64, device=labels.device)
    counted = ~torch.isin(labels, ignored)
    problem = invalid_label(labels, counted, num_classes)
    if problem:
        raise DataError(problem)
    pairs = labels[counted] * num_classes + pred_t.to(device=labels.device, dtype=torch.int64).reshape(
        labels.shape)[counted]
    return torch.bincount(pairs, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def _float64(matrix) -> torch.Tensor:
    return _as_tensor(matrix).to(torch.float64)


def pixel_accuracy(matrix) -> float:
    """Correct pixels / counted pixels; 0 for an empty matrix."""
    m = _float64(matrix)
    total = float(m.sum())
    return float(torch.diagonal(m).sum()) / total if total > 0 else 0.0


def mean_class_accuracy(matrix) -> float:
    """Mean recall over the classes present in the ground truth (non-empty rows); 0 if none."""
    m = _float64(matrix)
    rows = m.sum(dim=1)
    present = rows > 0
    if not bool(present.any()):
        return 0.0
    return float((torch.diagonal(m)[present] / rows[present]).mean())


def class_iou(matrix, empty: float = float("nan")) -> torch.Tensor:
    """Per-class intersection over union (float64); `empty` for classes with an empty union."""
    m = _float64(matrix)
    hits = torch.diagonal(m)
    union = m.sum(dim=0) + m.sum(dim=1) - hits
    return torch.where(union > 0, hits / union.clamp(min=1), torch.full_like(hits, empty))


def mean_iou_caffe(matrix) -> float:
    """Caffe SegAccuracy's mean IoU: over ALL classes, a class with an empty union counting as 1."""
    return float(class_iou(matrix, empty=1.0).mean())


def mean_iou(matrix) -> float:
    """Benchmark mean IoU: over the classes present in ground truth or prediction; 0 if none."""
    iou = class_iou(matrix)
    present = ~torch.isnan(iou)
    return float(iou[present].mean()) if bool(present.any()) else 0.0


def seg_accuracy_values(matrix) -> tuple[float, float, float]:
    """The three numbers Caffe's SegAccuracy layer outputs: pixel accuracy, mean class recall,
    Caffe-convention mean IoU."""
    return pixel_accuracy(matrix), mean_class_accuracy(matrix), mean_iou_caffe(matrix)
