"""Element-wise neuron layers of BVLC Caffe: Sigmoid, TanH, AbsVal, Power, Exp, Log, BNLL, Threshold,
Clip, Swish, ELU, PReLU.

Parameters are turned into the float32 constants Caffe derives from them (log(base), power * scale,
...), computed in float32 as Caffe does. Layers whose Caffe backward equals autograd's use plain
torch ops. Those whose backward reads the bottom data (Power, Log, BNLL, Clip, ELU) reproduce
Caffe's formula, and in place (top == bottom) the bottom blob Caffe reads already holds the top, so
the formula reads the top, as ReLU does (activation.py). This can change the gradient: an in-place
Clip passes every gradient, an in-place Log or Power differentiates at the wrong point.
In a chain of in-place layers Caffe reads whatever the last one left in the blob. Here each layer
reads its own top.
"""

from __future__ import annotations

import numpy as np
import torch

from rloss.layers.base import Layer, Shape
from rloss.layers.registry import register_layer
from rloss.layers.structure import reject_in_place
from rloss.proto import caffe_pb2

BNLL_THRESHOLD = 50.0  # Caffe clamps the bottom at 50 before exp in BNLL's backward (no inf / inf)


def _affine(x: torch.Tensor, scale: float, shift: float) -> torch.Tensor:
    """scale * x + shift, skipping a multiply by 1 or an add of 0 as Caffe does (so -0.0 stays -0.0)."""
    if scale != 1:
        x = x * scale
    if shift != 0:
        x = x + shift
    return x


def _log_of_base(layer: Layer, field: str, base: float) -> np.float32:
    """log(base) in float32; base -1 means e, with log exactly 1. Caffe CHECKs base > 0 and a finite log."""
    if base == -1:
        return np.float32(1)
    with np.errstate(all="ignore"):
        log_base = np.log(np.float32(base))
    if not (base > 0 and np.isfinite(log_base)):
        raise layer.error(f"{field} must be -1 (meaning e) or a finite number > 0, got {base}")
    return log_base


# ---- shared bases -------------------------------------------------------------------------------
class _Neuron(Layer):
    """Caffe's NeuronLayer: one bottom, one top of the bottom's shape; in-place use allowed."""

    def reshape(self, bottom_shapes: list[Shape]) -> list[Shape]:
        return [bottom_shapes[0]]

    @property
    def in_place(self) -> bool:
        return self.param.top[0] == self.param.bottom[0]


class _CaffeBackward(torch.autograd.Function):
    """Runs `layer.value(x)` forward and `layer.bottom_diff(dy, bottom, top)` backward, where `bottom`
    is what Caffe's backward reads as the bottom data: x, or the top for an in-place layer."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, layer: _NeuronWithCaffeBackward) -> torch.Tensor:
        y = layer.value(x)
        ctx.layer = layer
        ctx.save_for_backward(y if layer.in_place else x, y)
        return y

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        bottom, top = ctx.saved_tensors
        return ctx.layer.bottom_diff(dy, bottom, top), None


class _NeuronWithCaffeBackward(_Neuron):
    """A neuron layer whose gradient is Caffe's own formula, not autograd's (`_CaffeBackward`)."""

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return [_CaffeBackward.apply(x, self)]

    def value(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def bottom_diff(self, dy: torch.Tensor, bottom: torch.Tensor, top: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


# ---- autograd layers ----------------------------------------------------------------------------
@register_layer("Sigmoid")
class Sigmoid(_Neuron):
    """y = 1 / (1 + e^-x). Caffe writes it 0.5 tanh(0.5 x) + 0.5 but evaluates that in double (its 0.5
    literals are doubles) before rounding, which torch.sigmoid's float result matches to an ulp;
    the float32 tanh form would not (it gives 0 from x = -18.5 down). Backward y (1 - y), as autograd's."""

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return [torch.sigmoid(x)]


@register_layer("TanH")
class TanH(_Neuron):
    """y = tanh(x); backward 1 - y^2, as autograd's."""

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return [torch.tanh(x)]


@register_layer("AbsVal")
class AbsVal(_Neuron):
    """y = |x|; gradient sign(x), 0 at x == 0 (as autograd's). Caffe refuses in-place use."""

    def setup(self, bottom_shapes: list[Shape]) -> None:
        reject_in_place(self)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return [torch.abs(x)]


@register_layer("Exp")
class Exp(_Neuron):
    """y = base^(shift + scale x) = outer * exp(inner x), with inner = log(base) * scale and
    outer = base^shift (base -1 means e). The backward y * inner is autograd's."""

    def setup(self, bottom_shapes: list[Shape]) -> None:
        param = self.param.exp_param
        log_base = _log_of_base(self, "exp_param.base", param.base)
        with np.errstate(all="ignore"):  # overflow gives inf, as in Caffe
            self.inner = float(log_base * np.float32(param.scale))
            if param.shift == 0:
                self.outer = 1.0
            elif param.base == -1:
                self.outer = float(np.exp(np.float32(param.shift)))
            else:
                self.outer = float(np.power(np.float32(param.base), np.float32(param.shift)))

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        y = torch.exp(_affine(x, self.inner, 0.0))
        return [y * self.outer if self.outer != 1 else y]


@register_layer("Swish")
class Swish(_Neuron):
    """y = x * sigmoid(beta x) (Caffe runs its Sigmoid layer on beta x); Caffe's backward
    beta y + s (1 - beta y) is autograd's."""

    def setup(self, bottom_shapes: list[Shape]) -> None:
        self.beta = float(self.param.swish_param.beta)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return [x * torch.sigmoid(x * self.beta)]


@register_layer("Threshold")
class Threshold(_Neuron):
    """y = 1 where x > threshold, else 0. Caffe implements no backward (a Backward call aborts), so
    the bottom never gets a gradient: the net detaches it, and propagate_down: true is refused."""

    no_gradient_bottoms = (0,)

    def setup(self, bottom_shapes: list[Shape]) -> None:
        if self.param.propagate_down and self.param.propagate_down[0]:
            raise self.error("has no backward (Caffe does not implement one); set propagate_down: false")
        self.threshold = float(self.param.threshold_param.threshold)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return [(x > self.threshold).to(x.dtype)]


@register_layer("PReLU")
class PReLU(_Neuron):
    """y = x for x > 0, else slope * x, with one learned slope blob: a scalar (channel_shared) or one
    per channel (axis 1); filler default constant 0.25. Caffe counts x == 0 on the slope side: the
    bottom gradient there is slope * dy (autograd of clamp + clamp would give (1 + slope) dy), which
    autograd of `where` reproduces. In place, Caffe keeps a copy of the bottom for its backward, so
    the gradient is the plain one. Caffe reads the channels with its legacy accessor, which allows
    2 to 4 axes, channel_shared or not."""

    def setup(self, bottom_shapes: list[Shape]) -> None:
        param = self.param.prelu_param
        shape = self._checked_shape(bottom_shapes[0])
        self.channel_shared = param.channel_shared
        filler = param.filler if param.HasField("filler") else caffe_pb2.FillerParameter(type="constant", value=0.25)
        self.add_blob(() if self.channel_shared else (shape[1],), filler)

    def reshape(self, bottom_shapes: list[Shape]) -> list[Shape]:
        shape = self._checked_shape(bottom_shapes[0])
        if not self.channel_shared and shape[1] != self.blobs[0].numel():
            raise self.error(f"bottom shape {shape} does not have the {self.blobs[0].numel()} channels of set-up")
        return [shape]

    def _checked_shape(self, shape: Shape) -> Shape:
        if not 2 <= len(shape) <= 4:
            raise self.error(f"needs a bottom with 2 to 4 axes (Caffe's legacy channels()), got shape {shape}")
        return shape

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        slope = self.blobs[0]
        if not self.channel_shared:
            slope = slope.reshape((1, -1) + (1,) * (x.dim() - 2))
        return [torch.where(x > 0, x, x * slope)]


# ---- layers with Caffe's own backward -----------------------------------------------------------
@register_layer("Power")
class Power(_NeuronWithCaffeBackward):
    """y = (shift + scale x)^power, with Caffe's special cases: power == 0 or scale == 0 gives the
    constant 1 or shift^power and a zero gradient (not even dy * 0); otherwise dy times
    power * scale for power 1, 2 scale (shift + scale x) for power 2, power * y / x for shift 0,
    and power * scale * y / (shift + scale x) in general (so inf or nan where the base is 0, as Caffe)."""

    def setup(self, bottom_shapes: list[Shape]) -> None:
        param = self.param.power_param
        self.power, self.scale, self.shift = float(param.power), float(param.scale), float(param.shift)
        with np.errstate(all="ignore"):  # overflow gives inf, as in Caffe
            diff_scale = np.float32(self.power) * np.float32(self.scale)
            self.square_slope = float(diff_scale * np.float32(self.scale))
            self.square_offset = float(diff_scale * np.float32(self.shift))
            self.constant = 1.0 if self.power == 0 else float(np.power(np.float32(self.shift), np.float32(self.power)))
        self.diff_scale = float(diff_scale)

    def value(self, x: torch.Tensor) -> torch.Tensor:
        if self.diff_scale == 0:
            return torch.full_like(x, self.constant)
        base = _affine(x, self.scale, self.shift)
        return base if self.power == 1 else torch.pow(base, self.power)

    def bottom_diff(self, dy: torch.Tensor, bottom: torch.Tensor, top: torch.Tensor) -> torch.Tensor:
        if self.diff_scale == 0:
            return torch.zeros_like(dy)
        if self.power == 1:
            return dy * self.diff_scale
        if self.power == 2:
            return dy * _affine(bottom, self.square_slope, self.square_offset)
        if self.shift == 0:
            return dy * (top / bottom * self.power)
        ratio = top / _affine(bottom, self.scale, self.shift)
        return dy * (ratio * self.diff_scale if self.diff_scale != 1 else ratio)


@register_layer("Log")
class Log(_NeuronWithCaffeBackward):
    """y = log_base(shift + scale x) (base -1 means e); backward dy * scale / (log(base) (shift + scale x)).
    Caffe CHECKs base > 0 with finite log(base) and 1 / log(base), so base 1 is refused too."""

    def setup(self, bottom_shapes: list[Shape]) -> None:
        param = self.param.log_param
        log_base = _log_of_base(self, "log_param.base", param.base)
        with np.errstate(all="ignore"):  # overflow gives inf, as in Caffe
            base_scale = np.float32(1) / log_base
            self.backward_scale = float(np.float32(param.scale) / log_base)
        if not np.isfinite(base_scale):
            raise self.error(f"log_param.base {param.base} has log(base) 0: 1 / log(base) is not finite")
        self.base_scale = float(base_scale)
        self.scale, self.shift = float(param.scale), float(param.shift)

    def value(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.log(_affine(x, self.scale, self.shift))
        return y * self.base_scale if self.base_scale != 1 else y

    def bottom_diff(self, dy: torch.Tensor, bottom: torch.Tensor, top: torch.Tensor) -> torch.Tensor:
        inverse = torch.reciprocal(_affine(bottom, self.scale, self.shift))
        return dy * (inverse * self.backward_scale if self.backward_scale != 1 else inverse)


@register_layer("BNLL")
class BNLL(_NeuronWithCaffeBackward):
    """y = log(1 + e^x), computed as max(x, 0) + log(1 + e^-|x|) so it never overflows; backward
    dy * e / (e + 1) with e = exp(min(x, 50)), in at least float32 (exp(50) overflows float16)."""

    def value(self, x: torch.Tensor) -> torch.Tensor:
        return torch.clamp(x, min=0) + torch.log1p(torch.exp(-torch.abs(x)))

    def bottom_diff(self, dy: torch.Tensor, bottom: torch.Tensor, top: torch.Tensor) -> torch.Tensor:
        wide = bottom.to(torch.promote_types(bottom.dtype, torch.float32))
        e = torch.exp(torch.clamp(wide, max=BNLL_THRESHOLD))
        return dy * (e / (e + 1)).to(dy.dtype)


@register_layer("Clip")
class Clip(_NeuronWithCaffeBackward):
    """y = max(min, min(x, max)); the gradient passes where min <= x <= max, bounds included.
    Caffe does not check min <= max: with min > max every y is min and no gradient passes.
    min and max are required in caffe.proto; a Clip without clip_param (Caffe: [0, 0]) is refused."""

    def setup(self, bottom_shapes: list[Shape]) -> None:
        param = self.param.clip_param
        if not (param.HasField("min") and param.HasField("max")):
            raise self.error("needs clip_param with both min and max (required fields in caffe.proto)")
        self.low, self.high = float(param.min), float(param.max)

    def value(self, x: torch.Tensor) -> torch.Tensor:
        return torch.clamp(torch.clamp(x, max=self.high), min=self.low)

    def bottom_diff(self, dy: torch.Tensor, bottom: torch.Tensor, top: torch.Tensor) -> torch.Tensor:
        return dy * ((bottom >= self.low) & (bottom <= self.high))


@register_layer("ELU")
class ELU(_NeuronWithCaffeBackward):
    """y = x for x > 0, else alpha (e^x - 1); backward dy where x > 0, else dy (alpha + y)
    (alpha at x == 0). In place it reads y for x, which differs only for alpha < 0."""

    def setup(self, bottom_shapes: list[Shape]) -> None:
        self.alpha = float(self.param.elu_param.alpha)

    def value(self, x: torch.Tensor) -> torch.Tensor:
        return torch.clamp(x, min=0) + self.alpha * (torch.exp(torch.clamp(x, max=0)) - 1)

    def bottom_diff(self, dy: torch.Tensor, bottom: torch.Tensor, top: torch.Tensor) -> torch.Tensor:
        return torch.where(bottom > 0, dy, dy * (self.alpha + top))
