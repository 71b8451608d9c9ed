"""Spatial layers built on vision.py's window geometry: SPP (a pyramid of Caffe poolings, flattened
and concatenated) and Im2col (the column matrix Caffe's convolution multiplies, as a blob)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from rloss.layers._shapes import Pair, conv_out, pool_out
from rloss.layers.base import Layer, Shape
from rloss.layers.registry import register_layer
from rloss.layers.vision import ave_pool, conv_window, max_pool
from rloss.proto import caffe_pb2

# ---- SPP ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _PyramidLevel:
    """One pyramid level's pooling: a square grid of windows, stride = kernel."""

    kernel: Pair
    pad: Pair
    out: Pair


def _level_window(size: int, bins: int) -> tuple[int, int]:
    """(kernel, pad) along one axis for `bins` windows: the kernel is ceil(size / bins) and the pad
    half the shortfall bins * kernel - size, rounded up (Caffe pads that on both sides)."""
    kernel = -(-size // bins)
    return kernel, (kernel * bins - size + 1) // 2


@register_layer("SPP")
class SPP(Layer):
    """Spatial pyramid pooling: level l pools the image into 2^l x 2^l windows with Caffe's Pooling
    (ceil output size, AVE divisor counting the padding), each level flattened to (N, C*bins) and
    the levels concatenated in order. With pyramid_height 1 the top is the 4-D pooled blob itself,
    as Caffe then runs the single Pooling layer on its own. The geometry follows each bottom shape."""

    def setup(self, bottom_shapes: list[Shape]) -> None:
        sp = self.param.spp_param
        methods = caffe_pb2.SPPParameter
        if sp.pool == methods.STOCHASTIC:
            raise self.error("STOCHASTIC pooling is not supported (use MAX or AVE)")
        self.average = sp.pool == methods.AVE
        self.pyramid_height = int(sp.pyramid_height)
        if self.pyramid_height < 1:
            raise self.error(f"spp_param.pyramid_height must be >= 1, got {self.pyramid_height}")

    def _levels(self, shape: Shape) -> list[_PyramidLevel]:
        """Each level's pooling for a bottom of `shape`; Caffe's Pooling refuses pad >= kernel, which
        happens once 2^level comes close to the image size (always when it exceeds it)."""
        if len(shape) != 4:
            raise self.error(f"needs a 4-D bottom (N, C, H, W), got shape {shape}")
        self.check_not_empty(shape, first_axis=1)
        levels = []
        for level in range(self.pyramid_height):
            (kh, ph), (kw, pw) = (_level_window(size, 2**level) for size in shape[2:])
            if ph >= kh or pw >= kw:
                raise self.error(
                    f"pyramid level {level} ({2**level} bins per axis) of input {shape} needs pad {(ph, pw)} "
                    f"with kernel {(kh, kw)}; Caffe's pooling needs pad < kernel: lower pyramid_height"
                )
            out = (pool_out(shape[2], kh, kh, ph), pool_out(shape[3], kw, kw, pw))
            levels.append(_PyramidLevel((kh, kw), (ph, pw), out))
        return levels

    def reshape(self, bottom_shapes: list[Shape]) -> list[Shape]:
        shape = bottom_shapes[0]
        levels = self._levels(shape)
        if self.pyramid_height == 1:
            return [(*shape[:2], *levels[0].out)]
        return [(shape[0], sum(shape[1] * math.prod(level.out) for level in levels))]

    def _pool(self, x: torch.Tensor, level: _PyramidLevel) -> torch.Tensor:
        if self.average:
            return ave_pool(x, level.kernel, level.kernel, level.pad, level.out)
        return max_pool(x, level.kernel, level.kernel, level.pad, level.out, with_mask=False)[0]

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:  # type: ignore[override]
        pooled = [self._pool(x, level) for level in self._levels(tuple(x.shape))]
        if self.pyramid_height == 1:
            return pooled
        return [torch.cat([p.flatten(1) for p in pooled], dim=1)]


# ---- Im2col ---------------------------------------------------------------------------------


@register_layer("Im2col")
class Im2col(Layer):
    """Caffe's im2col as a layer: for each leading index, the (C * kh * kw) rows, channel-major then
    kernel row then kernel column, of the zero-padded, dilated windows at every output position;
    top (..., C * kh * kw, H_out, W_out). F.unfold has exactly that layout, and its autograd is
    col2im (overlapping windows accumulate), which is Caffe's backward. 2-D only: the channel axis
    must be followed by exactly two spatial axes; axes before it are independent items."""

    def setup(self, bottom_shapes: list[Shape]) -> None:
        cp = self.param.convolution_param
        shape = bottom_shapes[0]
        self.axis = self.canonical_axis(cp.axis, shape, "convolution_param.axis")
        if len(shape) - self.axis - 1 != 2:
            raise self.error(
                f"only 2-D im2col is supported: the channel axis {self.axis} of bottom {shape} must be "
                "followed by exactly 2 spatial axes"
            )
        self.kernel, self.stride, self.pad, self.dilation = conv_window(self, cp)

    def _out_size(self, shape: Shape) -> Pair:
        if len(shape) != self.axis + 3:
            raise self.error(f"bottom must have {self.axis + 3} axes as at setup, got shape {shape}")
        self.check_not_empty(shape, first_axis=self.axis)
        out = tuple(
            conv_out(size, k, s, p, d)
            for size, k, s, p, d in zip(shape[-2:], self.kernel, self.stride, self.pad, self.dilation)
        )
        if min(out) <= 0:
            raise self.error(
                f"kernel {self.kernel} (dilation {self.dilation}, pad {self.pad}, stride {self.stride}) "
                f"does not fit the input {shape}"
            )
        return out

    def reshape(self, bottom_shapes: list[Shape]) -> list[Shape]:
        shape = bottom_shapes[0]
        out = self._out_size(shape)
        return [(*shape[: self.axis], shape[self.axis] * math.prod(self.kernel), *out)]

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:  # type: ignore[override]
        out = self._out_size(tuple(x.shape))
        leading = x.shape[: self.axis]
        items = x.reshape(math.prod(leading), *x.shape[self.axis :])
        columns = F.unfold(items, self.kernel, self.dilation, self.pad, self.stride)
        return [columns.reshape(*leading, columns.shape[1], *out)]
