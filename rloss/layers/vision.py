"""Spatial layers: Convolution, Deconvolution, InnerProduct, Pooling, Interp and Crop.

Each reproduces Caffe's window geometry exactly (pooling's ceil rounding, Interp's float32
align-corners sampling) and otherwise leans on the matching torch operator, whose autograd gives
Caffe's backward.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from rloss.layers._shapes import (
    Pair,
    conv_out,
    conv_pair,
    deconv_out,
    pool_out,
    pool_pair,
    torch_ceil_pool_out,
)
from rloss.layers.base import Layer, Shape
from rloss.layers.registry import register_layer
from rloss.proto import caffe_pb2

FLT_MAX = 3.4028234663852886e38  # Caffe's initial MAX-pooling value and our padding value


def optional_filler(message, name: str):
    """The FillerParameter `name` of `message` when the prototxt gives it, else None (constant 0)."""
    return getattr(message, name) if message.HasField(name) else None


# ---- Convolution and Deconvolution ----------------------------------------------------------


def conv_window(layer: Layer, cp) -> tuple[Pair, Pair, Pair, Pair]:
    """(kernel, stride, pad, dilation) of a ConvolutionParameter with Caffe's defaults (stride 1,
    pad 0, dilation 1); kernel, stride and dilation must be > 0 (Convolution, Im2col)."""
    kernel = conv_pair(layer, cp, "kernel_size", None)
    stride = conv_pair(layer, cp, "stride", 1)
    pad = conv_pair(layer, cp, "pad", 0)
    dilation = conv_pair(layer, cp, "dilation", 1)
    for what, pair in (("kernel size", kernel), ("stride", stride), ("dilation", dilation)):
        if min(pair) <= 0:
            raise layer.error(f"{what} must be > 0, got {pair}")
    return kernel, stride, pad, dilation


class _ConvolutionBase(Layer):
    """What Convolution and Deconvolution share: parameters, blobs, checks, one top per bottom."""

    bottoms = (1, None)
    tops = (1, None)

    def setup(self, bottom_shapes: list[Shape]) -> None:
        cp = self.param.convolution_param
        if len(self.param.top) != len(bottom_shapes):
            raise self.error(
                f"needs one top per bottom, got {len(bottom_shapes)} bottoms and {len(self.param.top)} tops"
            )
        self._check_bottom(bottom_shapes[0], 0)
        if self.canonical_axis(cp.axis, bottom_shapes[0]) != 1:
            raise self.error(f"only axis 1 (channels of a 4-D blob) is supported, got axis {cp.axis}")
        self.kernel, self.stride, self.pad, self.dilation = conv_window(self, cp)
        self.channels = bottom_shapes[0][1]
        self.num_output = int(cp.num_output)
        self.group = int(cp.group)
        self._check_groups()
        self.add_blob(self.weight_shape(), optional_filler(cp, "weight_filler"))
        self.bias_term = bool(cp.bias_term)
        if self.bias_term:
            self.add_blob((self.num_output,), optional_filler(cp, "bias_filler"))

    def _check_groups(self) -> None:
        if self.num_output <= 0:
            raise self.error(f"num_output must be > 0, got {self.num_output}")
        if self.group <= 0:
            raise self.error(f"group must be > 0, got {self.group}")
        if self.channels % self.group or self.num_output % self.group:
            raise self.error(
                f"group {self.group} must divide both the input channels ({self.channels}) "
                f"and num_output ({self.num_output})"
            )

    def _check_bottom(self, shape: Shape, index: int) -> None:
        if len(shape) != 4:
            raise self.error(
                f"only 2-D convolution of 4-D blobs (N, C, H, W) is supported, bottom {index} is {shape}"
            )
        self.check_not_empty(shape, first_axis=1)

    def reshape(self, bottom_shapes: list[Shape]) -> list[Shape]:
        for index, shape in enumerate(bottom_shapes):
            self._check_bottom(shape, index)
            if shape != bottom_shapes[0]:
                raise self.error(f"all bottoms must have the same shape, got {bottom_shapes[0]} and {shape}")
        n, c, h, w = bottom_shapes[0]
        if c != self.channels:
            raise self.error(
                f"bottom has {c} channels, the layer was set up for {self.channels}: shape {bottom_shapes[0]}"
            )
        out = tuple(self.out_size(size, axis) for axis, size in enumerate((h, w)))
        if min(out) <= 0:
            raise self.error(
                f"kernel {self.kernel} (dilation {self.dilation}, pad {self.pad}, stride {self.stride}) "
                f"does not fit the input {bottom_shapes[0]}"
            )
        return [(n, self.num_output, *out)] * len(bottom_shapes)

    def forward(self, *bottoms: torch.Tensor) -> list[torch.Tensor]:
        bias = self.blobs[1] if self.bias_term else None
        return [self.apply(x, self.blobs[0], bias) for x in bottoms]

    def weight_shape(self) -> Shape:
        raise NotImplementedError

    def out_size(self, size: int, axis: int) -> int:
        raise NotImplementedError

    def apply(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        raise NotImplementedError


@register_layer("Convolution")
class Convolution(_ConvolutionBase):
    """Cross-correlation with zero padding, dilation and channel groups (Caffe = F.conv2d)."""

    def weight_shape(self) -> Shape:
        return (self.num_output, self.channels // self.group, *self.kernel)

    def out_size(self, size: int, axis: int) -> int:
        return conv_out(size, self.kernel[axis], self.stride[axis], self.pad[axis], self.dilation[axis])

    def apply(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return F.conv2d(x, weight, bias, self.stride, self.pad, self.dilation, self.group)


@register_layer("Deconvolution")
class Deconvolution(_ConvolutionBase):
    """Caffe's Deconvolution: the transpose of Convolution; weight (C_in, num_output/group, kh, kw)."""

    def weight_shape(self) -> Shape:
        return (self.channels, self.num_output // self.group, *self.kernel)

    def out_size(self, size: int, axis: int) -> int:
        return deconv_out(size, self.kernel[axis], self.stride[axis], self.pad[axis], self.dilation[axis])

    def apply(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return F.conv_transpose2d(x, weight, bias, self.stride, self.pad, 0, self.group, self.dilation)


# ---- InnerProduct ---------------------------------------------------------------------------


@register_layer("InnerProduct")
class InnerProduct(Layer):
    """Fully connected: axes >= `axis` are flattened into one input vector per leading index."""

    def setup(self, bottom_shapes: list[Shape]) -> None:
        ip = self.param.inner_product_param
        shape = bottom_shapes[0]
        self.axis = self.canonical_axis(ip.axis, shape)
        self.num_output = int(ip.num_output)
        if self.num_output <= 0:
            raise self.error(f"num_output must be > 0, got {self.num_output}")
        self.inputs = math.prod(shape[self.axis :])
        self.transpose = bool(ip.transpose)
        weight = (self.inputs, self.num_output) if self.transpose else (self.num_output, self.inputs)
        self.add_blob(weight, optional_filler(ip, "weight_filler"))
        self.bias_term = bool(ip.bias_term)
        if self.bias_term:
            self.add_blob((self.num_output,), optional_filler(ip, "bias_filler"))

    def reshape(self, bottom_shapes: list[Shape]) -> list[Shape]:
        shape = bottom_shapes[0]
        axis = self.canonical_axis(self.param.inner_product_param.axis, shape)
        if math.prod(shape[axis:]) != self.inputs:
            raise self.error(
                f"bottom shape {shape} gives {math.prod(shape[axis:])} inputs from axis {axis}, "
                f"the weights expect {self.inputs}"
            )
        return [(*shape[:axis], self.num_output)]

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:  # type: ignore[override]
        leading = x.shape[: self.axis]
        flat = x.reshape(math.prod(leading), self.inputs)
        weight = self.blobs[0].t() if self.transpose else self.blobs[0]
        y = F.linear(flat, weight, self.blobs[1] if self.bias_term else None)
        return [y.reshape(*leading, self.num_output)]


# ---- Pooling --------------------------------------------------------------------------------


def _native_pooling_ok(size: Pair, kernel: Pair, stride: Pair, pad: Pair) -> bool:
    """Whether torch's ceil-mode pooling has Caffe's windows here (same count, pad allowed)."""
    return all(
        p <= k // 2 and torch_ceil_pool_out(n, k, s, p) == pool_out(n, k, s, p)
        for n, k, s, p in zip(size, kernel, stride, pad)
    )


def _pad_to_windows(
    x: torch.Tensor, kernel: Pair, stride: Pair, pad: Pair, out: Pair, value: float
) -> torch.Tensor:
    """`x` padded by `pad` before and to exactly the extent of Caffe's last window after (cropped if
    that window ends before the image does), so that unpadded floor-mode pooling sees Caffe's windows."""
    (kh, kw), (sh, sw), (ph, pw), (oh, ow) = kernel, stride, pad, out
    after_h = (oh - 1) * sh + kh - x.shape[-2] - ph
    after_w = (ow - 1) * sw + kw - x.shape[-1] - pw
    return F.pad(x, (pw, after_w, ph, after_h), value=value)


def _window_counts(
    size: int, kernel: int, stride: int, pad: int, out: int, like: torch.Tensor
) -> torch.Tensor:
    """Caffe's AVE divisor along one axis: window length clipped to [-pad, size + pad) (at least 1;
    windows wholly beyond the image sum to 0 anyway)."""
    starts = torch.arange(out, device=like.device) * stride - pad
    ends = torch.clamp(starts + kernel, max=size + pad)
    return (ends - starts).clamp(min=1).to(like.dtype)


def max_pool(
    x: torch.Tensor, kernel: Pair, stride: Pair, pad: Pair, out: Pair, with_mask: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """MAX pooling over real pixels only, ties to the first in row-major order; the optional mask
    is Caffe's argmax index h*W + w within the plane (-1 for a window without pixels)."""
    if _native_pooling_ok(tuple(x.shape[-2:]), kernel, stride, pad):
        if not with_mask:
            return F.max_pool2d(x, kernel, stride, pad, ceil_mode=True), None
        y, index = F.max_pool2d(x, kernel, stride, pad, ceil_mode=True, return_indices=True)
        return y, index.to(_mask_dtype(x))
    padded = _pad_to_windows(x, kernel, stride, pad, out, -FLT_MAX)
    if not with_mask:
        return F.max_pool2d(padded, kernel, stride), None
    y, index = F.max_pool2d(padded, kernel, stride, return_indices=True)
    height, width = x.shape[-2:]
    rows = torch.div(index, padded.shape[-1], rounding_mode="floor") - pad[0]
    cols = index % padded.shape[-1] - pad[1]
    inside = (rows >= 0) & (rows < height) & (cols >= 0) & (cols < width)
    mask = torch.where(inside, rows * width + cols, torch.full_like(index, -1))
    return y, mask.to(_mask_dtype(x))


def _mask_dtype(x: torch.Tensor) -> torch.dtype:
    """The mask top's dtype: Caffe's float blob, never narrower than float32, whose 24-bit significand
    holds every index of a plane up to 2^24 pixels (bf16 would round indices from 256 on)."""
    return torch.promote_types(x.dtype, torch.float32)


def ave_pool(x: torch.Tensor, kernel: Pair, stride: Pair, pad: Pair, out: Pair) -> torch.Tensor:
    """AVE pooling: sum of the real pixels over a divisor that counts padding up to image + pad."""
    if _native_pooling_ok(tuple(x.shape[-2:]), kernel, stride, pad):
        return F.avg_pool2d(x, kernel, stride, pad, ceil_mode=True, count_include_pad=True)
    sums = F.avg_pool2d(_pad_to_windows(x, kernel, stride, pad, out, 0.0), kernel, stride, divisor_override=1)
    rows, cols = (
        _window_counts(x.shape[-2 + axis], kernel[axis], stride[axis], pad[axis], out[axis], x)
        for axis in (0, 1)
    )
    return sums / (rows[:, None] * cols[None, :])


@register_layer("Pooling")
class Pooling(Layer):
    """MAX or AVE pooling with Caffe's output size (ceil, clipped only when padded); an optional
    second top (MAX only) holds the argmax positions."""

    tops = (1, 2)

    def setup(self, bottom_shapes: list[Shape]) -> None:
        pp = self.param.pooling_param
        methods = caffe_pb2.PoolingParameter
        self.method = pp.pool
        if self.method == methods.STOCHASTIC:
            raise self.error("STOCHASTIC pooling is not supported (use MAX or AVE)")
        if self.num_tops == 2 and self.method != methods.MAX:
            raise self.error("only MAX pooling has a second top (the argmax mask)")
        self.global_pooling = bool(pp.global_pooling)
        if self.global_pooling:
            if pp.HasField("kernel_size") or pp.HasField("kernel_h") or pp.HasField("kernel_w"):
                raise self.error("global_pooling takes the kernel from the bottom; do not give kernel_size")
            self.kernel: Pair | None = None
        else:
            self.kernel = pool_pair(self, pp, "kernel_size", None)
        self.stride = pool_pair(self, pp, "stride", 1)
        self.pad = pool_pair(self, pp, "pad", 0)
        self._check_params()

    def _check_params(self) -> None:
        if self.global_pooling and (self.pad != (0, 0) or self.stride != (1, 1)):
            raise self.error(
                f"global_pooling needs pad 0 and stride 1, got pad {self.pad}, stride {self.stride}"
            )
        if self.kernel is not None and min(self.kernel) <= 0:
            raise self.error(f"kernel size must be > 0, got {self.kernel}")
        if min(self.stride) <= 0:
            raise self.error(f"stride must be > 0, got {self.stride}")
        if self.kernel is not None and (self.pad[0] >= self.kernel[0] or self.pad[1] >= self.kernel[1]):
            raise self.error(f"pad {self.pad} must be smaller than the kernel {self.kernel}")

    def _geometry(self, shape: Shape) -> tuple[Pair, Pair, Pair]:
        """(kernel, stride, output size) for a bottom of `shape`. The stride is capped at image + pad:
        windows starting past the image hold no pixel whatever the stride, so the cap changes no value
        but keeps the input padded to the last window small. That padded input must be a possible blob."""
        if len(shape) != 4:
            raise self.error(f"needs a 4-D bottom (N, C, H, W), got shape {shape}")
        self.check_not_empty(shape, first_axis=1)
        size = (shape[2], shape[3])
        kernel = size if self.kernel is None else self.kernel
        out = tuple(pool_out(n, k, s, p) for n, k, s, p in zip(size, kernel, self.stride, self.pad))
        if min(out) <= 0:
            raise self.error(f"kernel {kernel} is larger than the input {shape} padded by {self.pad}")
        stride = tuple(min(s, n + p) for s, n, p in zip(self.stride, size, self.pad))
        padded = tuple((o - 1) * s + k for o, s, k in zip(out, stride, kernel))
        self.check_shape((*shape[:2], *padded), f"the input padded for kernel {kernel} and pad {self.pad}")
        return kernel, stride, out

    def reshape(self, bottom_shapes: list[Shape]) -> list[Shape]:
        _, _, out = self._geometry(bottom_shapes[0])
        return [(*bottom_shapes[0][:2], *out)] * self.num_tops

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:  # type: ignore[override]
        kernel, stride, out = self._geometry(tuple(x.shape))
        if self.method == caffe_pb2.PoolingParameter.AVE:
            return [ave_pool(x, kernel, stride, self.pad, out)]
        y, mask = max_pool(x, kernel, stride, self.pad, out, self.num_tops == 2)
        return [y] if mask is None else [y, mask]


# ---- Interp ---------------------------------------------------------------------------------


def _sampling(size_in: int, size_out: int, like: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Caffe's align-corners sampling along one axis, in `like`'s dtype (float32 for Caffe's
    rounding): lower and upper source index and their weights for each output position."""
    zero = torch.zeros((), dtype=like.dtype, device=like.device)
    ratio = (zero + (size_in - 1)) / (size_out - 1) if size_out > 1 else zero
    position = torch.arange(size_out, dtype=like.dtype, device=like.device) * ratio
    lower = position.to(torch.int64)
    upper = torch.where(lower < size_in - 1, lower + 1, lower)
    upper_weight = position - lower.to(like.dtype)
    return lower, upper, 1 - upper_weight, upper_weight


def _resize_align_corners(x: torch.Tensor, out_h: int, out_w: int) -> torch.Tensor:
    """Bilinear resize with align-corners sampling, in the same operation order as Caffe (columns
    first, then rows), so float32 results are bit-identical; autograd gives the exact adjoint.
    In-place products on fresh gathers halve the time (F.interpolate differs by an ulp)."""
    col_lo, col_hi, col_w_lo, col_w_hi = _sampling(x.shape[-1], out_w, x)
    row_lo, row_hi, row_w_lo, row_w_hi = _sampling(x.shape[-2], out_h, x)
    rows = x.index_select(-1, col_lo).mul_(col_w_lo).add_(x.index_select(-1, col_hi).mul_(col_w_hi))
    upper = rows.index_select(-2, row_hi).mul_(row_w_hi[:, None])
    return rows.index_select(-2, row_lo).mul_(row_w_lo[:, None]).add_(upper)


@register_layer("Interp")
class Interp(Layer):
    """The fork's bilinear resize: crop by pad_beg/pad_end (<= 0), then align-corners resampling to
    the size given by shrink/zoom factors or height/width (presence decides which)."""

    def setup(self, bottom_shapes: list[Shape]) -> None:
        ip = self.param.interp_param
        self.pad_beg, self.pad_end = int(ip.pad_beg), int(ip.pad_end)
        if self.pad_beg > 0 or self.pad_end > 0:
            raise self.error(
                f"pad_beg and pad_end must be <= 0 (they crop), got {self.pad_beg} and {self.pad_end}"
            )

    def _factor(self, name: str) -> int:
        value = int(getattr(self.param.interp_param, name))
        if value < 1:
            raise self.error(f"{name} must be >= 1, got {value}")
        return value

    def _resized(self, size: int) -> int:
        """Output length of one cropped axis under the shrink/zoom rules (not height/width)."""
        ip = self.param.interp_param
        if ip.HasField("shrink_factor"):
            size = (size - 1) // self._factor("shrink_factor") + 1
        if ip.HasField("zoom_factor"):
            size = size + (size - 1) * (self._factor("zoom_factor") - 1)
        return size

    def _out_size(self, shape: Shape) -> tuple[Pair, Pair]:
        """(cropped size, output size) for a bottom of `shape`."""
        if len(shape) != 4:
            raise self.error(f"needs a 4-D bottom (N, C, H, W), got shape {shape}")
        self.check_not_empty(shape)
        crop = self.pad_beg + self.pad_end
        cropped = (shape[2] + crop, shape[3] + crop)
        if min(cropped) <= 0:
            raise self.error(
                f"pad_beg {self.pad_beg} and pad_end {self.pad_end} crop away all of input {shape}"
            )
        ip = self.param.interp_param
        has_shrink, has_zoom = ip.HasField("shrink_factor"), ip.HasField("zoom_factor")
        # Caffe's order: one factor alone; else height and width; else both factors.
        if has_shrink != has_zoom:
            out = (self._resized(cropped[0]), self._resized(cropped[1]))
        elif ip.HasField("height") and ip.HasField("width"):
            out = (int(ip.height), int(ip.width))
        elif has_shrink:
            out = (self._resized(cropped[0]), self._resized(cropped[1]))
        else:
            raise self.error("give shrink_factor and/or zoom_factor, or both height and width")
        if min(out) <= 0:
            raise self.error(f"output size {out} for input {shape} must be positive")
        return cropped, out

    def reshape(self, bottom_shapes: list[Shape]) -> list[Shape]:
        _, out = self._out_size(bottom_shapes[0])
        return [(*bottom_shapes[0][:2], *out)]

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:  # type: ignore[override]
        (height, width), out = self._out_size(tuple(x.shape))
        first = -self.pad_beg  # Caffe starts the crop at -pad_beg on both axes
        source = x[..., first : first + height, first : first + width]
        if (height, width) == out:
            return [source.clone()]
        if _is_label_map(source):
            return [_resize_align_corners(source, *out)]
        return [F.interpolate(source, size=out, mode="bilinear", align_corners=True)]


def _is_label_map(x: torch.Tensor) -> bool:
    """One channel and no gradient: a label map, whose values consumers truncate to int. It takes the
    bit-exact path, since one ulp can flip a truncated label; everything else (scores, images) takes
    F.interpolate, the same sampling within an ulp and 10-40x faster with its backward."""
    return x.shape[1] == 1 and not x.requires_grad


# ---- Crop -----------------------------------------------------------------------------------


@register_layer("Crop")
class Crop(Layer):
    """Crops bottom 0 to bottom 1's shape on every axis from `axis` on, starting at the offsets."""

    bottoms = (2, 2)

    def setup(self, bottom_shapes: list[Shape]) -> None:
        cp = self.param.crop_param
        self.start = self.canonical_axis(cp.axis, bottom_shapes[0])
        cropped_axes = len(bottom_shapes[0]) - self.start
        offsets = [int(o) for o in cp.offset]
        if len(offsets) > 1 and len(offsets) != cropped_axes:
            raise self.error(
                f"{len(offsets)} offsets for {cropped_axes} cropped axes (from axis {self.start} of "
                f"{bottom_shapes[0]}); give 0, 1 or {cropped_axes}"
            )
        if len(offsets) <= 1:
            offsets = (offsets or [0]) * cropped_axes
        self.offsets = offsets

    def reshape(self, bottom_shapes: list[Shape]) -> list[Shape]:
        big, like = bottom_shapes
        if len(big) != len(like):
            raise self.error(f"both bottoms need the same number of axes, got {big} and {like}")
        for axis, offset in enumerate(self.offsets, start=self.start):
            if offset + like[axis] > big[axis]:
                raise self.error(
                    f"cannot crop axis {axis} of {big} to {like[axis]} at offset {offset} (bottom 1: {like})"
                )
        return [(*big[: self.start], *like[self.start :])]

    def forward(self, x: torch.Tensor, like: torch.Tensor) -> list[torch.Tensor]:  # type: ignore[override]
        window = [slice(None)] * self.start + [
            slice(offset, offset + like.shape[axis])
            for axis, offset in enumerate(self.offsets, start=self.start)
        ]
        return [x[tuple(window)].clone()]
