"""Per-element and per-channel layers: ReLU, Dropout, Softmax, BatchNorm (the fork's), Scale, Bias."""

from __future__ import annotations

import numpy as np
import torch

from rloss.layers.base import Layer, Shape
from rloss.layers.registry import register_layer
from rloss.layers.structure import fresh_view
from rloss.proto import caffe_pb2


# ---- ReLU ---------------------------------------------------------------------------------------
class _CaffeReLU(torch.autograd.Function):
    """Caffe's ReLU: the backward tests `bottom > 0`, and for an in-place ReLU the bottom blob
    already holds the output, so the test reads the output (matters only for a negative slope)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, slope: float, test_output: bool) -> torch.Tensor:
        if slope == 0.0:
            y = torch.relu(x)
        else:
            y = torch.clamp(x, min=0) + slope * torch.clamp(x, max=0)
        ctx.slope = slope
        ctx.save_for_backward(y if test_output else x)
        return y

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        (tested,) = ctx.saved_tensors
        if ctx.slope == 0.0:
            return dy * (tested > 0), None, None
        return dy * torch.where(tested > 0, 1.0, ctx.slope).to(dy.dtype), None, None


@register_layer("ReLU")
class ReLU(Layer):
    """y = max(x, 0) + negative_slope * min(x, 0); gradient at exactly 0 is negative_slope."""

    def setup(self, bottom_shapes: list[Shape]) -> None:
        self.slope = float(self.param.relu_param.negative_slope)
        self.in_place = self.param.top[0] == self.param.bottom[0]

    def reshape(self, bottom_shapes: list[Shape]) -> list[Shape]:
        return [bottom_shapes[0]]

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return [_CaffeReLU.apply(x, self.slope, self.in_place)]


# ---- Dropout ------------------------------------------------------------------------------------
@register_layer("Dropout")
class Dropout(Layer):
    """TRAIN phase: keep each element with probability 1 - p and scale by 1/(1 - p) (mask drawn
    from torch's global generator); TEST phase: identity. Decided by the layer's phase, as in Caffe;
    SegNet's sample_weights_test drops in the TEST phase too (Bayesian SegNet's Monte Carlo dropout)."""

    def setup(self, bottom_shapes: list[Shape]) -> None:
        self.ratio = float(self.param.dropout_param.dropout_ratio)
        if not 0.0 <= self.ratio < 1.0:
            raise self.error(f"dropout_ratio must be in [0, 1), got {self.ratio}")
        self.scale = float(np.float32(1.0 / (1.0 - self.ratio)))
        self.drops = self.phase == caffe_pb2.TRAIN or bool(self.param.dropout_param.sample_weights_test)

    def reshape(self, bottom_shapes: list[Shape]) -> list[Shape]:
        return [bottom_shapes[0]]

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        if not self.drops:
            return [fresh_view(x)]
        keep = torch.empty_like(x).bernoulli_(1.0 - self.ratio)
        return [x * keep.mul_(self.scale)]


# ---- Softmax ------------------------------------------------------------------------------------
@register_layer("Softmax")
class Softmax(Layer):
    """Softmax along `axis` (default 1, the channels)."""

    # Its probabilities feed losses (DenseCRFLoss) and inference: in bf16 they keep 2-3 digits and
    # small ones flush to 0. CUDA's autocast runs softmax in float32 too; here on every device.
    runs_in_float32 = True

    def setup(self, bottom_shapes: list[Shape]) -> None:
        self.axis = self.canonical_axis(self.param.softmax_param.axis, bottom_shapes[0])

    def reshape(self, bottom_shapes: list[Shape]) -> list[Shape]:
        return [bottom_shapes[0]]

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return [torch.softmax(x, dim=self.axis)]


# ---- BatchNorm ----------------------------------------------------------------------------------
def _per_channel(values: torch.Tensor, ndim: int) -> torch.Tensor:
    """A (C) vector shaped to broadcast over axis 1 of an `ndim`-axis blob."""
    return values.reshape((1, -1) + (1,) * (ndim - 2))


@register_layer("BatchNorm")
class BatchNorm(Layer):
    """The DeepLab/rloss fork's BatchNorm. Blobs: [0] mean sum (C), [1] variance sum (C), [2] scale
    factor s (1), all 0 when new; the stored statistics are blob / s (0 when s == 0). No gradient
    ever reaches the blobs (they are used detached).

    Modes:
      * use_global_stats (unset: phase == TEST): y = (x - mean) / sqrt(var + eps) with the stored
        statistics, a frozen per-channel affine map (dx = dy / sqrt(var + eps)).
      * ... and additionally phase TRAIN with update_global_stats: as the fork does, the divisor is
        the batch's mean square deviation from the *stored* mean (held constant in backward), and
        the blobs are updated: s = f*s + 1, blob0 = mean + f*blob0 (the stored mean, a fork quirk),
        blob1 = m/(m-1) * deviation + f*blob1 with m = count / C, f = moving_average_fraction.
      * use_global_stats false: textbook batch normalisation (batch mean, biased batch variance,
        full gradient), no blob update. This does NOT reproduce the fork, whose batch mode is
        broken (it divides by a stale buffer, see golden bn_global_false); no experiment uses it.
    """

    # Variances are means of squares (cancellation-prone in bf16) and update float32 statistics.
    runs_in_float32 = True

    def setup(self, bottom_shapes: list[Shape]) -> None:
        param, shape = self.param.batch_norm_param, bottom_shapes[0]
        if len(shape) < 2 or shape[1] < 1:
            raise self.error(f"needs a bottom with a channel axis of at least one channel, got shape {shape}")
        self.use_global_stats = (
            param.use_global_stats if param.HasField("use_global_stats") else self.phase == caffe_pb2.TEST
        )
        self.fraction = float(param.moving_average_fraction)
        if not 0.0 <= self.fraction <= 1.0:
            raise self.error(f"moving_average_fraction must be in [0, 1], got {self.fraction}")
        self.eps = float(param.eps)
        self.updates_stats = (
            self.use_global_stats and self.phase == caffe_pb2.TRAIN and param.update_global_stats
        )
        self.recomputable = not self.updates_stats  # a recomputed forward would update the statistics twice
        self.channels = shape[1]
        for blob_shape in ((self.channels,), (self.channels,), (1,)):
            self.add_blob(blob_shape)

    def reshape(self, bottom_shapes: list[Shape]) -> list[Shape]:
        shape = bottom_shapes[0]
        if len(shape) < 2 or shape[1] != self.channels:
            raise self.error(f"bottom shape {shape} does not have the {self.channels} channels of set-up")
        return [shape]

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        if not self.use_global_stats:
            return [self._batch_normalised(x)]
        mean, variance = self._stored_stats()
        centred = x - _per_channel(mean, x.dim())
        if self.updates_stats:
            variance = self._update_stats(centred.detach(), mean)
        return [centred / _per_channel(torch.sqrt(variance + self.eps), x.dim())]

    def _stored_stats(self) -> tuple[torch.Tensor, torch.Tensor]:
        sums_mean, sums_var, factor = (blob.detach() for blob in self.blobs)
        inverse = torch.where(factor == 0, torch.zeros_like(factor), 1.0 / factor)
        return sums_mean * inverse, sums_var * inverse

    def _update_stats(self, centred: torch.Tensor, mean: torch.Tensor) -> torch.Tensor:
        """The fork's moving-average update; returns the deviation it normalises by."""
        reduce_dims = [0] + list(range(2, centred.dim()))
        deviation = (centred * centred).mean(dim=reduce_dims)
        m = centred.numel() // self.channels
        correction = m / (m - 1) if m > 1 else 1.0
        with torch.no_grad():
            self.blobs[2].mul_(self.fraction).add_(1.0)
            self.blobs[0].mul_(self.fraction).add_(mean)
            self.blobs[1].mul_(self.fraction).add_(correction * deviation)
        return deviation

    def _batch_normalised(self, x: torch.Tensor) -> torch.Tensor:
        reduce_dims = [0] + list(range(2, x.dim()))
        mean = x.mean(dim=reduce_dims, keepdim=True)
        centred = x - mean
        variance = (centred * centred).mean(dim=reduce_dims, keepdim=True)
        return centred / torch.sqrt(variance + self.eps)


# ---- Scale / Bias -------------------------------------------------------------------------------
_UNIT_FILLER = caffe_pb2.FillerParameter(type="constant", value=1.0)


def _learned_operand_shape(layer: Layer, bottom: Shape, axis: int, num_axes: int) -> Shape:
    """Shape of a learned scale/bias blob: bottom.shape[axis : axis + num_axes] (-1 = to the end)."""
    start = layer.canonical_axis(axis, bottom)
    if num_axes < -1:
        raise layer.error(f"num_axes must be >= 0, or -1 for all, got {num_axes}")
    end = len(bottom) if num_axes == -1 else start + num_axes
    if end > len(bottom):
        raise layer.error(f"axis {axis} + num_axes {num_axes} goes past bottom shape {bottom}")
    return bottom[start:end]


def _operand_axis(layer: Layer, bottom: Shape, axis: int, operand: Shape, what: str) -> int:
    """First bottom axis an operand of shape `operand` covers (0 for a scalar); checks the dims."""
    start = 0 if len(operand) == 0 else layer.canonical_axis(axis, bottom)
    if bottom[start : start + len(operand)] != tuple(operand):
        raise layer.error(
            f"{what} of shape {tuple(operand)} does not match bottom shape {bottom} from axis {start}"
        )
    return start


def _broadcastable(operand: torch.Tensor, axis: int, ndim: int) -> torch.Tensor:
    """`operand` viewed with singleton axes so it lines up with bottom axes axis.. of an ndim blob."""
    return operand.reshape((1,) * axis + tuple(operand.shape) + (1,) * (ndim - axis - operand.dim()))


@register_layer("Scale")
class Scale(Layer):
    """y = x * scale (+ bias), the scale (and bias) spanning bottom axes [axis, axis + num_axes).
    The scale is a learned blob (filler unset: constant 1) or, with two bottoms, bottom 1.
    With bias_term a learned bias blob follows (bias_filler), spanning the same axes."""

    bottoms = (1, 2)

    def setup(self, bottom_shapes: list[Shape]) -> None:
        param, bottom = self.param.scale_param, bottom_shapes[0]
        self.learned_scale = len(bottom_shapes) == 1
        if self.learned_scale:
            shape = _learned_operand_shape(self, bottom, param.axis, param.num_axes)
            self.add_blob(shape, param.filler if param.HasField("filler") else _UNIT_FILLER)
            scale_axes = len(shape)
        else:
            scale_axes = len(bottom_shapes[1])
        self.has_bias = param.bias_term
        if self.has_bias:
            self.add_blob(_learned_operand_shape(self, bottom, param.axis, scale_axes), param.bias_filler)

    def reshape(self, bottom_shapes: list[Shape]) -> list[Shape]:
        bottom, axis = bottom_shapes[0], self.param.scale_param.axis
        scale_shape = tuple(self.blobs[0].shape) if self.learned_scale else bottom_shapes[1]
        self.scale_axis = _operand_axis(self, bottom, axis, scale_shape, "scale")
        if self.has_bias:
            self.bias_axis = _operand_axis(self, bottom, axis, tuple(self.blobs[-1].shape), "bias")
        return [bottom]

    def forward(self, x: torch.Tensor, scale: torch.Tensor | None = None) -> list[torch.Tensor]:
        scale = self.blobs[0] if scale is None else scale
        top = x * _broadcastable(scale, self.scale_axis, x.dim())
        if self.has_bias:
            top = top + _broadcastable(self.blobs[-1], self.bias_axis, x.dim())
        return [top]


@register_layer("Bias")
class Bias(Layer):
    """y = x + bias, the bias spanning bottom axes [axis, axis + num_axes): a learned blob
    (filler, default constant 0) or, with two bottoms, bottom 1."""

    bottoms = (1, 2)

    def setup(self, bottom_shapes: list[Shape]) -> None:
        param = self.param.bias_param
        if len(bottom_shapes) == 1:
            shape = _learned_operand_shape(self, bottom_shapes[0], param.axis, param.num_axes)
            self.add_blob(shape, param.filler)

    def reshape(self, bottom_shapes: list[Shape]) -> list[Shape]:
        bias_shape = tuple(self.blobs[0].shape) if len(bottom_shapes) == 1 else bottom_shapes[1]
        self.bias_axis = _operand_axis(self, bottom_shapes[0], self.param.bias_param.axis, bias_shape, "bias")
        return [bottom_shapes[0]]

    def forward(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> list[torch.Tensor]:
        bias = self.blobs[0] if bias is None else bias
        return [x + _broadcastable(bias, self.bias_axis, x.dim())]
