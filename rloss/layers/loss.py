"""Loss and accuracy layers: SoftmaxWithLoss, Accuracy, SegAccuracy.

Labels arrive as float blobs and are truncated towards zero like Caffe's `(int)`. Labels outside
[0, C) that are not ignored raise a LayerError (Caffe would read out of range).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from rloss import metrics
from rloss.errors import DataError
from rloss.layers.base import Layer, Shape
from rloss.layers.registry import register_layer
from rloss.proto import caffe_pb2

# -log(max(p, FLT_MIN)) caps a location's loss at -log(FLT_MIN) = 87.3365.
LOG_FLT_MIN = math.log(float(np.finfo(np.float32).tiny))
_MODE = caffe_pb2.LossParameter


def label_layout(layer: Layer, bottom_shapes: list[Shape], axis: int) -> tuple[int, int, int]:
    """(outer, classes, inner) of the scores around the class axis, after checking that the label
    bottom holds one label per prediction (outer * inner of them)."""
    scores, labels = bottom_shapes[0], bottom_shapes[1]
    outer, classes, inner = math.prod(scores[:axis]), scores[axis], math.prod(scores[axis + 1:])
    if math.prod(labels) != outer * inner:
        raise layer.error(
            f"the label bottom {labels} has {math.prod(labels)} values but the scores {scores} make "
            f"{outer * inner} predictions along axis {axis} (need one integer label in [0, {classes}) each)"
        )
    return outer, classes, inner


def checked_labels(layer: Layer, labels: torch.Tensor, ignore_label: int | None, classes: int):
    """(integer labels truncated towards zero, mask of the counted ones); raises if a counted label
    is outside [0, classes)."""
    int_labels = labels.detach().to(torch.int64)
    if ignore_label is None:
        counted = torch.ones_like(int_labels, dtype=torch.bool)
    else:
        counted = int_labels != ignore_label
    problem = metrics.invalid_label(int_labels, counted, classes)
    if problem:
        raise layer.error(problem)
    return int_labels, counted


def optional_ignore_label(param) -> int | None:
    return int(param.ignore_label) if param.HasField("ignore_label") else None


def normalization_mode(loss_param) -> int:
    """`normalization` when given, else the legacy `normalize` flag (true: VALID, false: BATCH_SIZE),
    else VALID (the fork's default)."""
    if loss_param.HasField("normalization"):
        return loss_param.normalization
    if loss_param.HasField("normalize"):
        return _MODE.VALID if loss_param.normalize else _MODE.BATCH_SIZE
    return _MODE.VALID


def caffe_normaliser(mode: int, valid: torch.Tensor, outer: int, inner: int) -> torch.Tensor | float:
    """BVLC's get_normalizer: FULL outer * inner, VALID the counted predictions (`valid`), BATCH_SIZE
    outer, NONE 1; never below 1, so that a batch with nothing counted has loss 0, not NaN."""
    if mode == _MODE.VALID:
        return valid.clamp(min=1)
    if mode == _MODE.FULL:
        return float(max(1, outer * inner))
    if mode == _MODE.BATCH_SIZE:
        return float(max(1, outer))
    return 1.0


@register_layer("SoftmaxWithLoss")
class SoftmaxWithLoss(Layer):
    """Mean (per the normalisation mode) of -log softmax(score)[label] over non-ignored locations.

    SegNet's fork: with loss_param.weight_by_label_freqs each location's term is multiplied by
    class_weighting[label] (one weight per class), the divisor unchanged (the count of locations,
    not the sum of their weights); without it class_weighting is not read.

    The optional second top (the probabilities) is detached: Caffe's backward reads only the loss
    top's diff, so a gradient arriving on the probabilities never reaches the scores."""

    bottoms = (2, 2)
    tops = (0, 2)  # the prototxt may name none: Caffe then adds an anonymous loss top
    auto_tops = 1
    default_loss_weight = 1.0
    no_gradient_bottoms = (1,)
    runs_in_float32 = True  # log-softmax over bf16/fp16 scores would lose the loss's small differences

    def setup(self, bottom_shapes: list[Shape]) -> None:
        loss_param = self.param.loss_param
        self.ignore_label = optional_ignore_label(loss_param)
        self.normalization = normalization_mode(loss_param)
        self.axis = self.canonical_axis(self.param.softmax_param.axis, bottom_shapes[0])
        self.weighted = bool(loss_param.weight_by_label_freqs)
        if self.weighted:
            weights = torch.tensor(list(loss_param.class_weighting), dtype=torch.float32)
            self.register_buffer("class_weights", weights, persistent=False)

    def reshape(self, bottom_shapes: list[Shape]) -> list[Shape]:
        _, classes, _ = label_layout(self, bottom_shapes, self.axis)
        if self.weighted and len(self.class_weights) != classes:
            raise self.error(f"weight_by_label_freqs needs one class_weighting value per class: "
                             f"{len(self.class_weights)} values for {classes} classes")
        return [()] + [bottom_shapes[0]] * (self.num_tops - 1)

    def forward(self, scores: torch.Tensor, labels: torch.Tensor) -> list[torch.Tensor]:  # type: ignore[override]
        outer, classes, inner = label_layout(self, [tuple(scores.shape), tuple(labels.shape)], self.axis)
        int_labels, counted = checked_labels(self, labels, self.ignore_label, classes)
        int_labels, counted = int_labels.reshape(outer, 1, inner), counted.reshape(outer, inner)
        log_p = torch.log_softmax(scores, dim=self.axis).reshape(outer, classes, inner)
        picked = log_p.gather(1, torch.where(counted[:, None], int_labels, 0)).squeeze(1)
        # Caffe clamps p at FLT_MIN in the value only; its gradient stays p - onehot everywhere.
        picked = picked + (picked.clamp(min=LOG_FLT_MIN) - picked).detach()
        if self.weighted:
            picked = picked * self.class_weights.to(picked.dtype)[torch.where(counted, int_labels[:, 0], 0)]
        total = -torch.where(counted, picked, torch.zeros_like(picked)).sum()
        loss = total / caffe_normaliser(self.normalization, counted.sum(), outer, inner)
        tops = [loss]
        if self.num_tops > 1:
            tops.append(torch.softmax(scores.detach(), dim=self.axis))
        return tops


@register_layer("Accuracy")
class Accuracy(Layer):
    """Fraction of non-ignored locations whose label is among the top_k scores; optional second top
    = per-class accuracy. Ranking sorts (score, class) pairs descending, so ties favour the larger
    class index. With nothing counted the outputs are 0 (not 0/0)."""

    bottoms = (2, 2)
    tops = (1, 2)
    runs_in_float32 = True  # a bf16 top would round the reported accuracy to 2-3 digits

    def setup(self, bottom_shapes: list[Shape]) -> None:
        accuracy_param = self.param.accuracy_param
        self.top_k = int(accuracy_param.top_k)
        self.ignore_label = optional_ignore_label(accuracy_param)
        self.axis = self.canonical_axis(accuracy_param.axis, bottom_shapes[0])

    def reshape(self, bottom_shapes: list[Shape]) -> list[Shape]:
        _, classes, _ = label_layout(self, bottom_shapes, self.axis)
        if not 1 <= self.top_k <= classes:
            raise self.error(f"top_k {self.top_k} must be in [1, {classes}] (the number of classes)")
        return [()] + [(classes,)] * (self.num_tops - 1)

    def forward(self, scores: torch.Tensor, labels: torch.Tensor) -> list[torch.Tensor]:  # type: ignore[override]
        outer, classes, inner = label_layout(self, [tuple(scores.shape), tuple(labels.shape)], self.axis)
        int_labels, counted = checked_labels(self, labels, self.ignore_label, classes)
        int_labels, counted = int_labels.reshape(outer, inner), counted.reshape(outer, inner)
        safe = torch.where(counted, int_labels, 0)
        hits = counted & self._in_top_k(scores.detach().reshape(outer, classes, inner), safe)
        tops = [self._ratio(hits.sum(), counted.sum(), scores).reshape(())]
        if self.num_tops > 1:
            per_class_hits = torch.bincount(int_labels[hits], minlength=classes)
            per_class_count = torch.bincount(int_labels[counted], minlength=classes)
            tops.append(self._ratio(per_class_hits, per_class_count, scores))
        return tops

    def _in_top_k(self, scores: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """True where fewer than top_k (score, class) pairs rank above the label's pair."""
        true_score = scores.gather(1, labels[:, None])
        classes = torch.arange(scores.shape[1], device=scores.device).view(1, -1, 1)
        above = (scores > true_score) | ((scores == true_score) & (classes > labels[:, None]))
        return above.sum(dim=1) < self.top_k

    @staticmethod
    def _ratio(hits: torch.Tensor, counts: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        value = hits.to(torch.float64) / counts.clamp(min=1).to(torch.float64)
        return value.to(dtype=like.dtype)


@register_layer("SegAccuracy")
class SegAccuracy(Layer):
    """[pixel accuracy, mean recall over ground-truth classes, mean IoU over all classes (empty
    union = 1)] from a confusion matrix kept across forwards. With `reset` (default) the matrix is
    cleared at each forward; with `reset: false` it accumulates over the layer's lifetime (a whole
    test run). No gradient: the output is detached."""

    bottoms = (2, 2)
    tops = (1, 1)
    runs_in_float32 = True  # its top (the reported metrics) in bf16 would keep 2-3 digits

    def setup(self, bottom_shapes: list[Shape]) -> None:
        self.check_axes(bottom_shapes, 0, 4)
        self.check_axes(bottom_shapes, 1, 4)
        seg_param = self.param.seg_accuracy_param
        self.ignore_labels = frozenset(int(v) for v in seg_param.ignore_label)
        self.reset = bool(seg_param.reset)
        self.recomputable = self.reset  # an accumulating matrix would count a recomputed batch twice
        self.num_classes = bottom_shapes[0][1]
        if self.num_classes < 1:
            raise self.error(f"the scores {bottom_shapes[0]} need at least one class (channel)")
        self.check_shape((self.num_classes, self.num_classes), "the confusion matrix", itemsize=8)
        self.register_buffer(
            "confusion", torch.zeros(self.num_classes, self.num_classes, dtype=torch.int64), persistent=False
        )

    def reshape(self, bottom_shapes: list[Shape]) -> list[Shape]:
        scores, labels = bottom_shapes
        if scores[1] != self.num_classes:
            raise self.error(f"the scores {scores} have {scores[1]} classes, the layer was set up with "
                             f"{self.num_classes}")
        if labels[1] != 1 or (scores[0], scores[2], scores[3]) != (labels[0], labels[2], labels[3]):
            raise self.error(f"labels {labels} must be (N, 1, H, W) for scores {scores}")
        return [(1, 1, 1, 3)]

    def reset_confusion(self) -> None:
        """Forget every counted pixel (start of a new evaluation run)."""
        self.confusion.zero_()

    def forward(self, scores: torch.Tensor, labels: torch.Tensor) -> list[torch.Tensor]:  # type: ignore[override]
        self.reshape([tuple(scores.shape), tuple(labels.shape)])
        predictions = metrics.predict_labels(scores.detach(), dim=1)
        try:
            counts = metrics.confusion_matrix(labels.detach(), predictions, self.num_classes,
                                              self.ignore_labels)
        except DataError as error:
            raise self.error(str(error)) from error
        if self.reset:
            self.reset_confusion()
        self.confusion += counts.to(self.confusion.device)
        values = metrics.seg_accuracy_values(self.confusion)
        return [torch.tensor(values, dtype=scores.dtype, device=scores.device).reshape(1, 1, 1, 3)]
