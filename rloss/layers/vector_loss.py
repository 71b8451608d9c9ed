"""BVLC Caffe's losses on per-sample vectors: EuclideanLoss, SigmoidCrossEntropyLoss, HingeLoss,
InfogainLoss, ContrastiveLoss, MultinomialLogisticLoss (BVLC master's versions).

All follow BVLC's LossLayer: a scalar (0-axis) top, added anonymously when the prototxt names
none; loss weight 1 unless one is given; bottoms 0 and 1 agree in their first dimension. Labels
arrive as float blobs and are truncated towards zero like Caffe's `static_cast<int>`; a counted
label outside the classes raises a LayerError (Caffe would index out of range).
"""

from __future__ import annotations

import math
from typing import ClassVar

import numpy as np
import torch

from rloss.errors import WeightsError
from rloss.io import read_blob_proto
from rloss.layers.base import Layer, Shape
from rloss.layers.loss import (
    caffe_normaliser,
    checked_labels,
    label_layout,
    normalization_mode,
    optional_ignore_label,
)
from rloss.layers.registry import register_layer
from rloss.proto import caffe_pb2
from rloss.proto.blob import blob_to_array

# Caffe's kLOG_THRESHOLD, a float: probabilities are clamped there before their log.
LOG_THRESHOLD = float(np.float32(1e-20))
_MODE = caffe_pb2.LossParameter
_HINGE = caffe_pb2.HingeLossParameter
# BVLC's ContrastiveLoss adds this to the distance it divides by in its (non-legacy) backward.
_CONTRASTIVE_DISTANCE_EPSILON = 1e-4


class _ClampInValueOnly(torch.autograd.Function):
    """max(x, floor) with the incoming gradient passed through everywhere. Caffe clamps before its
    logs in the value, but its hand-written backward knows no clamp: InfogainLoss's is
    p * rowsum(H) - H for every p, MultinomialLogisticLoss's -1 / max(p, floor) even where p < floor,
    where autograd of the clamp would give 0."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, floor: float) -> torch.Tensor:
        return x.clamp(min=floor)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad, None


class _DampedDistance(torch.autograd.Function):
    """Row norms ||diff_i|| whose backward divides by ||diff_i|| + 1e-4 as BVLC's ContrastiveLoss
    does, not by ||diff_i|| (autograd's sqrt would give NaN for identical pairs, Caffe 0)."""

    @staticmethod
    def forward(ctx, diff: torch.Tensor) -> torch.Tensor:
        distance = (diff * diff).sum(dim=1).sqrt()
        ctx.save_for_backward(diff, distance)
        return distance

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        diff, distance = ctx.saved_tensors
        return (grad / (distance + _CONTRASTIVE_DISTANCE_EPSILON))[:, None] * diff


def _legacy_dims(layer: Layer, shape: Shape, index: int) -> tuple[int, int, int, int]:
    """(num, channels, height, width) of bottom `index` as Caffe's legacy accessors read them:
    missing trailing axes count as 1, more than 4 axes is an error."""
    if len(shape) > 4:
        raise layer.error(f"bottom {index} {shape} has {len(shape)} axes; this layer reads it as "
                          "(num, channels, height, width), at most 4 axes")
    return tuple(shape) + (1,) * (4 - len(shape))  # type: ignore[return-value]


def _per_sample(x: torch.Tensor) -> torch.Tensor:
    """x viewed as (N, count / N), Caffe's (num, dim) view of a blob (also for N = 0)."""
    return x.reshape(x.shape[0], math.prod(x.shape[1:]))


def _per_sample_labels(layer: Layer, labels: torch.Tensor, num: int, classes: int) -> torch.Tensor:
    """The first `num` values of the label blob in memory order (Caffe reads label[i] for sample i),
    truncated to integers and checked to be in [0, classes)."""
    int_labels, _ = checked_labels(layer, labels.reshape(-1)[:num], None, classes)
    return int_labels


class BvlcLossLayer(Layer):
    """What BVLC's LossLayer gives its subclasses: the bottom and top counts, the default loss
    weight, the scalar top and the first-dimension check. Subclasses read their parameters in
    `setup_loss`, check their own bottom rules in `check_bottoms` and compute the loss in `forward`.

    Class attributes:
      legacy_bottoms: bottoms Caffe reads through num()/channels()/..., which refuse > 4 axes.
      fatal_gradient_bottoms: bottoms whose Caffe Backward LOG(FATAL)s when asked for a gradient
        ("cannot backpropagate to label inputs"): an explicit propagate_down true there is an error.
    """

    bottoms = (2, 2)
    tops = (0, 1)  # the prototxt may name none: Caffe then adds an anonymous loss top
    auto_tops = 1
    default_loss_weight = 1.0
    no_gradient_bottoms = (1,)
    runs_in_float32 = True  # losses are sums of many small terms: not in bf16/fp16
    legacy_bottoms: ClassVar[tuple[int, ...]] = ()
    fatal_gradient_bottoms: ClassVar[tuple[int, ...]] = (1,)

    def setup(self, bottom_shapes: list[Shape]) -> None:
        down = list(self.param.propagate_down)
        asked = [i for i in self.fatal_gradient_bottoms if i < len(down) and down[i]]
        if asked:
            raise self.error(f"Caffe's {self.type_name} cannot back-propagate to bottom {asked[0]} (labels or "
                             "a fixed matrix); set propagate_down false for it")
        self.setup_loss(bottom_shapes)

    def setup_loss(self, bottom_shapes: list[Shape]) -> None:
        """Read and check the layer's own parameters (Caffe's LayerSetUp)."""

    def reshape(self, bottom_shapes: list[Shape]) -> list[Shape]:
        first, second = bottom_shapes[0], bottom_shapes[1]
        if not first or not second:
            raise self.error(f"bottoms 0 and 1 need at least one axis, got shapes {first} and {second}")
        if first[0] != second[0]:
            raise self.error(f"bottoms 0 {first} and 1 {second} must have the same first dimension "
                             "(the data and the label of each sample)")
        for index in self.legacy_bottoms:
            _legacy_dims(self, bottom_shapes[index], index)
        return [()] + self.check_bottoms(bottom_shapes)

    def check_bottoms(self, bottom_shapes: list[Shape]) -> list[Shape]:
        """Check the layer's own bottom rules; return the shapes of its tops after the loss."""
        return []


@register_layer("EuclideanLoss")
class EuclideanLoss(BvlcLossLayer):
    """sum((a - b)^2) / (2 N), N = a's first dimension; the bottoms may differ in shape but not in
    their count per sample. Both get a gradient, +-(a - b) / N (propagate_down picks them)."""

    no_gradient_bottoms = ()
    fatal_gradient_bottoms = ()
    legacy_bottoms = (0, 1)

    def check_bottoms(self, bottom_shapes: list[Shape]) -> list[Shape]:
        first, second = bottom_shapes[0], bottom_shapes[1]
        if math.prod(first[1:]) != math.prod(second[1:]):
            raise self.error(f"bottoms 0 {first} and 1 {second} must have the same count per sample "
                             f"({math.prod(first[1:])} != {math.prod(second[1:])})")
        return []

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> list[torch.Tensor]:  # type: ignore[override]
        diff = a - b.reshape(a.shape)
        return [(diff * diff).sum() / a.shape[0] / 2]


@register_layer("SigmoidCrossEntropyLoss")
class SigmoidCrossEntropyLoss(BvlcLossLayer):
    """-sum(t log sigmoid(x) + (1 - t) log(1 - sigmoid(x))) over non-ignored elements, normalised.

    Computed with BVLC's overflow-safe x (t - [x >= 0]) - log(1 + exp(x - 2 x [x >= 0])), the
    indicator a constant: its autograd gradient is Caffe's sigmoid(x) - t everywhere, also at
    x = 0 (written with relu and |x|, autograd would give -t there). Targets may be any reals; one
    is ignored when it truncates to ignore_label. Normalisation: `normalization`, else the legacy
    `normalize`, else BATCH_SIZE (this layer's own default in BVLC, not VALID)."""

    def setup_loss(self, bottom_shapes: list[Shape]) -> None:
        loss_param = self.param.loss_param
        self.ignore_label = optional_ignore_label(loss_param)
        chosen = loss_param.HasField("normalization") or loss_param.HasField("normalize")
        self.normalization = normalization_mode(loss_param) if chosen else _MODE.BATCH_SIZE

    def check_bottoms(self, bottom_shapes: list[Shape]) -> list[Shape]:
        scores, targets = bottom_shapes[0], bottom_shapes[1]
        if math.prod(scores) != math.prod(targets):
            raise self.error(f"the scores {scores} and the targets {targets} must have the same count "
                             f"({math.prod(scores)} != {math.prod(targets)})")
        return []

    def forward(self, x: torch.Tensor, targets: torch.Tensor) -> list[torch.Tensor]:  # type: ignore[override]
        t = targets.detach().reshape(x.shape).to(x.dtype)
        positive = (x >= 0).to(x.dtype)
        log_likelihood = x * (t - positive) - torch.log(1 + torch.exp(x - 2 * x * positive))
        if self.ignore_label is None:
            counted = torch.ones_like(t, dtype=torch.bool)
        else:
            counted = t.to(torch.int64) != self.ignore_label
        total = -torch.where(counted, log_likelihood, torch.zeros_like(log_likelihood)).sum()
        outer = x.shape[0]
        inner = x.numel() // outer if outer else 0
        return [total / caffe_normaliser(self.normalization, counted.sum(), outer, inner)]


@register_layer("HingeLoss")
class HingeLoss(BvlcLossLayer):
    """One-vs-all hinge: m_ij = max(0, 1 - s_ij x_ij) with s = +1 at the label j = l_i and -1
    elsewhere, x viewed as (N, count / N); loss sum(m) / N (L1) or sum(m^2) / N (L2). Sample i's
    label is the i-th value of the label blob. Autograd is Caffe's gradient: relu's slope at a tie
    (1 - s x = 0) is 0, as Caffe's sign(m) there."""

    legacy_bottoms = (0,)

    def setup_loss(self, bottom_shapes: list[Shape]) -> None:
        self.squared = self.param.hinge_loss_param.norm == _HINGE.L2

    def check_bottoms(self, bottom_shapes: list[Shape]) -> list[Shape]:
        scores, labels = bottom_shapes[0], bottom_shapes[1]
        self.check_not_empty(scores)  # Caffe divides the count by N: 0 in any dim leaves no class to pick
        if math.prod(labels) < scores[0]:
            raise self.error(f"the label bottom {labels} holds {math.prod(labels)} values for {scores[0]} "
                             "samples (needs at least one label per sample)")
        return []

    def forward(self, x: torch.Tensor, labels: torch.Tensor) -> list[torch.Tensor]:  # type: ignore[override]
        num = x.shape[0]
        flat = _per_sample(x)
        int_labels = _per_sample_labels(self, labels.detach(), num, flat.shape[1])
        signs = torch.ones_like(flat).scatter_(1, int_labels[:, None], -1.0)
        margins = torch.relu(1 + signs * flat)
        terms = margins * margins if self.squared else margins
        return [terms.sum() / num]


@register_layer("InfogainLoss")
class InfogainLoss(BvlcLossLayer):
    """-sum_l H[y, l] log max(softmax(x)_l, 1e-20) over non-ignored predictions, normalised (BVLC
    master: the softmax is inside, along infogain_loss_param.axis). H (C x C, any shape of that
    count) comes from bottom 2 or, with two bottoms, from the BlobProto file `source`. The gradient
    is Caffe's p * rowsum(H)[y] - H[y]: the clamp holds in the value only. `normalize` is refused,
    as in BVLC; `normalization` defaults to VALID. The optional second top holds the probabilities,
    detached (Caffe's backward reads only the loss's diff). No gradient reaches the labels or H."""

    bottoms = (2, 3)
    tops = (0, 2)
    no_gradient_bottoms = (1, 2)
    fatal_gradient_bottoms = (1, 2)

    def setup_loss(self, bottom_shapes: list[Shape]) -> None:
        loss_param = self.param.loss_param
        if loss_param.HasField("normalize"):
            raise self.error("loss_param.normalize is deprecated for InfogainLoss; use normalization")
        self.ignore_label = optional_ignore_label(loss_param)
        self.normalization = loss_param.normalization
        self.axis = self.canonical_axis(self.param.infogain_loss_param.axis, bottom_shapes[0],
                                        "infogain_loss_param.axis")
        matrix = self._read_infogain() if len(bottom_shapes) < 3 else None
        self.register_buffer("infogain", matrix, persistent=False)  # moves with the layer's device

    def _read_infogain(self) -> torch.Tensor:
        source = self.param.infogain_loss_param.source
        if not self.param.infogain_loss_param.HasField("source"):
            raise self.error("needs the infogain matrix: infogain_loss_param.source (a .binaryproto) or a "
                             "third bottom")
        try:
            blob = read_blob_proto(source)
            values = blob_to_array(blob, f"infogain matrix {source}")
        except WeightsError as error:
            raise self.error(str(error)) from None
        return torch.from_numpy(values.reshape(-1).copy())

    def check_bottoms(self, bottom_shapes: list[Shape]) -> list[Shape]:
        _, classes, _ = label_layout(self, bottom_shapes, self.axis)
        count = self.infogain.numel() if self.infogain is not None else math.prod(bottom_shapes[2])
        if count != classes * classes:
            where = "bottom 2" if self.infogain is None else f"'{self.param.infogain_loss_param.source}'"
            raise self.error(f"the infogain matrix ({where}) has {count} values; {classes} classes need "
                             f"{classes} x {classes} = {classes * classes}")
        return [bottom_shapes[0]] * (self.num_tops - 1)

    def forward(self, scores: torch.Tensor, labels: torch.Tensor,  # type: ignore[override]
                infogain: torch.Tensor | None = None) -> list[torch.Tensor]:
        outer, classes, inner = label_layout(self, [tuple(scores.shape), tuple(labels.shape)], self.axis)
        int_labels, counted = checked_labels(self, labels.detach(), self.ignore_label, classes)
        int_labels, counted = int_labels.reshape(outer, inner), counted.reshape(outer, inner)
        matrix = (self.infogain if infogain is None else infogain.detach()).to(scores.dtype)
        rows = matrix.reshape(classes, classes)[torch.where(counted, int_labels, 0)]  # (outer, inner, C)
        log_p = torch.log_softmax(scores, dim=self.axis).reshape(outer, classes, inner)
        log_p = _ClampInValueOnly.apply(log_p, math.log(LOG_THRESHOLD))
        per_prediction = -(rows.permute(0, 2, 1) * log_p).sum(dim=1)
        total = torch.where(counted, per_prediction, torch.zeros_like(per_prediction)).sum()
        tops = [total / caffe_normaliser(self.normalization, counted.sum(), outer, inner)]
        if self.num_tops > 1:
            tops.append(torch.softmax(scores.detach(), dim=self.axis))
        return tops


@register_layer("ContrastiveLoss")
class ContrastiveLoss(BvlcLossLayer):
    """sum_i (y_i ? d_i^2 : max(margin - d_i, 0)^2) / (2 N), d_i = ||a_i - b_i||, a and b
    (N, C, 1, 1), y (N, 1, 1, 1) truncated to an integer (non-zero: a similar pair). With
    legacy_version the dissimilar term is max(margin - d_i^2, 0). The non-legacy backward divides by
    d_i + 1e-4 as Caffe's (`_DampedDistance`). a and b get gradients; y never does (Caffe skips it
    silently, without the FATAL of the label-taking losses)."""

    bottoms = (3, 3)
    no_gradient_bottoms = (2,)
    fatal_gradient_bottoms = ()
    legacy_bottoms = (0, 1, 2)

    def setup_loss(self, bottom_shapes: list[Shape]) -> None:
        param = self.param.contrastive_loss_param
        self.margin = float(param.margin)
        self.legacy = bool(param.legacy_version)

    def check_bottoms(self, bottom_shapes: list[Shape]) -> list[Shape]:
        a, b, y = (_legacy_dims(self, shape, i) for i, shape in enumerate(bottom_shapes))
        if a[1] != b[1] or a[2:] != (1, 1) or b[2:] != (1, 1):
            raise self.error(f"bottoms 0 {bottom_shapes[0]} and 1 {bottom_shapes[1]} must both be "
                             "(N, C, 1, 1) with the same C")
        if y[1:] != (1, 1, 1) or y[0] < a[0]:
            raise self.error(f"bottom 2 (the similarity) {bottom_shapes[2]} must be (M, 1, 1, 1) with at least "
                             f"one value per pair, M >= {a[0]}")
        return []

    def forward(self, a: torch.Tensor, b: torch.Tensor, similar: torch.Tensor) -> list[torch.Tensor]:  # type: ignore[override]
        num = a.shape[0]
        diff = _per_sample(a) - _per_sample(b)
        distance_sq = (diff * diff).sum(dim=1)
        is_similar = similar.detach().reshape(-1)[:num].to(torch.int64) != 0
        if self.legacy:
            dissimilar = torch.relu(self.margin - distance_sq)
        else:
            dissimilar = torch.relu(self.margin - _DampedDistance.apply(diff)) ** 2
        return [torch.where(is_similar, distance_sq, dissimilar).sum() / num / 2]


@register_layer("MultinomialLogisticLoss")
class MultinomialLogisticLoss(BvlcLossLayer):
    """-sum_i log max(p[i, l_i], 1e-20) / N for probabilities p viewed as (N, count / N) and labels
    (N, 1, 1, 1). Caffe's gradient -1 / (N max(p, 1e-20)) at the label holds also where p is below
    the threshold (`_ClampInValueOnly`)."""

    legacy_bottoms = (0, 1)

    def check_bottoms(self, bottom_shapes: list[Shape]) -> list[Shape]:
        self.check_not_empty(bottom_shapes[0])  # as HingeLoss: Caffe divides the count by N
        if _legacy_dims(self, bottom_shapes[1], 1)[1:] != (1, 1, 1):
            raise self.error(f"the label bottom {bottom_shapes[1]} must be (N, 1, 1, 1)")
        return []

    def forward(self, probabilities: torch.Tensor, labels: torch.Tensor) -> list[torch.Tensor]:  # type: ignore[override]
        num = probabilities.shape[0]
        flat = _per_sample(probabilities)
        int_labels = _per_sample_labels(self, labels.detach(), num, flat.shape[1])
        picked = _ClampInValueOnly.apply(flat.gather(1, int_labels[:, None]), LOG_THRESHOLD)
        return [-torch.log(picked).sum() / num]
