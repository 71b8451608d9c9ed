"""Normalizing layers: LRN and MVN."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from rloss.layers.base import Layer, Shape
from rloss.layers.registry import register_layer
from rloss.proto import caffe_pb2

_REGION = caffe_pb2.LRNParameter


# ---- LRN ----------------------------------------------------------------------------------------
@register_layer("LRN")
class LRN(Layer):
    """Local response normalisation of an (N, C, H, W) bottom, Caffe's own engine:

      * ACROSS_CHANNELS: y = x * (k + alpha / n * sum of x^2 over the n channels centred on c)^-beta,
        the window zero-padded at the first and last channels.
      * WITHIN_CHANNEL: y = x * (1 + alpha * mean of x^2 over the n x n window)^-beta. Caffe builds it
        from an AVE pooling padded by (n - 1) / 2 whose divisor counts the padding, so the mean is
        always over n^2 values (alpha / n^2 times the sum), even at the image borders; and the shift
        is a constant 1, so `k` is not used in this region.

    The gradient is autograd's, equal to Caffe's analytic one up to float rounding.
    """

    def setup(self, bottom_shapes: list[Shape]) -> None:
        param = self.param.lrn_param
        self.size = int(param.local_size)
        if self.size % 2 != 1:
            raise self.error(f"local_size must be odd, got {self.size}")
        self.pad = (self.size - 1) // 2
        self.alpha, self.beta, self.k = float(param.alpha), float(param.beta), float(param.k)
        self.within_channel = param.norm_region == _REGION.WITHIN_CHANNEL

    def reshape(self, bottom_shapes: list[Shape]) -> list[Shape]:
        self.check_axes(bottom_shapes, 0, 4)
        self.check_not_empty(bottom_shapes[0], first_axis=1)
        return [bottom_shapes[0]]

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        scale = self._within_channel_scale(x) if self.within_channel else self._across_channels_scale(x)
        return [x * scale.pow(-self.beta)]

    def _across_channels_scale(self, x: torch.Tensor) -> torch.Tensor:
        padded = F.pad(x.square(), (0, 0, 0, 0, self.pad, self.pad))  # zero channels before and after
        n, channels, height, width = padded.shape
        columns = padded.reshape(n, 1, channels, height * width)  # channels as rows: a 2-D pooling
        mean = F.avg_pool2d(columns, (self.size, 1), stride=1)
        return self.k + self.alpha * mean.reshape(x.shape)

    def _within_channel_scale(self, x: torch.Tensor) -> torch.Tensor:
        padded = F.pad(x.square(), (self.pad,) * 4)  # zeros around the image, counted by the mean
        return 1.0 + self.alpha * F.avg_pool2d(padded, self.size, stride=1)


# ---- MVN ----------------------------------------------------------------------------------------
class _CaffeMeanVarianceNorm(torch.autograd.Function):
    """y = (x - mean) / (std + eps) per row of a (groups, size) view, std the biased one, with Caffe's
    gradient dx = (dy - (sum(dy) + y * sum(y * dy)) / size) / (std + eps). That treats the derivative
    of the std as y / size where the exact one is (x - mean) / (size * std): the two differ by the
    factor (std + eps) / std, and Caffe's stays finite for a constant row (std = 0)."""

    @staticmethod
    def forward(ctx, rows: torch.Tensor, eps: float) -> torch.Tensor:
        centred = rows - rows.mean(dim=1, keepdim=True)
        divisor = centred.square().mean(dim=1, keepdim=True).sqrt() + eps
        y = centred / divisor
        ctx.save_for_backward(y, divisor)
        return y

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        y, divisor = ctx.saved_tensors
        size = y.shape[1]
        pulled = dy.sum(dim=1, keepdim=True) + y * (y * dy).sum(dim=1, keepdim=True)
        return (dy - pulled / size) / divisor, None


def _legacy_shape(shape: Shape) -> Shape:
    """Caffe's (num, channels, height, width) of a blob of at most 4 axes: missing axes read as 1."""
    return tuple(shape) + (1,) * (4 - len(shape))


@register_layer("MVN")
class MVN(Layer):
    """Subtracts the mean, and with normalize_variance divides by std + eps (eps added to the
    standard deviation, not the variance), over each (item, channel) or, with across_channels, each
    item. Caffe reads the bottom with its legacy 4-axis accessors: at most 4 axes, and the top is
    the bottom's (N, C, H, W) with missing trailing axes as 1 (an (N, C) bottom gives (N, C, 1, 1))."""

    # Variances are means of squares: cancellation-prone in bf16 (as BatchNorm).
    runs_in_float32 = True

    def setup(self, bottom_shapes: list[Shape]) -> None:
        param = self.param.mvn_param
        self.normalize_variance = param.normalize_variance
        self.across_channels = param.across_channels
        self.eps = float(param.eps)

    def reshape(self, bottom_shapes: list[Shape]) -> list[Shape]:
        shape = bottom_shapes[0]
        if len(shape) > 4:
            raise self.error(f"needs a bottom of at most 4 axes (Caffe's legacy accessors), got shape {shape}")
        return [_legacy_shape(shape)]

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        legacy = _legacy_shape(tuple(x.shape))
        first_pooled = 1 if self.across_channels else 2
        rows = x.reshape(math.prod(legacy[:first_pooled]), math.prod(legacy[first_pooled:]))
        if self.normalize_variance:
            top = _CaffeMeanVarianceNorm.apply(rows, self.eps)
        else:
            top = rows - rows.mean(dim=1, keepdim=True)
        return [top.reshape(legacy)]
