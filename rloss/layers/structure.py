"""Layers that combine, split or rearrange blobs: Eltwise, Concat, Slice, Split, Flatten, Reshape,
Silence, ArgMax.

Layers whose tops are the bottom's data in Caffe (Split, Flatten, Reshape, one-input Concat/Slice)
return views, each a distinct tensor object so autograd keeps one gradient per consumer.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch

from rloss.layers.base import Layer, Shape
from rloss.layers.registry import register_layer
from rloss.proto import caffe_pb2

_OP = caffe_pb2.EltwiseParameter


# ---- helpers shared with other layer families ----------------------------------------------------
def legacy_axis(layer: Layer, param, axis_field: str, legacy_field: str, shape: Shape) -> int:
    """The axis of Concat/Slice: the legacy unsigned field (no negative indexing) or `axis`, not both."""
    if param.HasField(axis_field) and param.HasField(legacy_field):
        raise layer.error(f"give either {axis_field} or {legacy_field}, not both")
    if param.HasField(legacy_field):
        legacy = getattr(param, legacy_field)
        if legacy >= len(shape):
            raise layer.error(f"{legacy_field} {legacy} is out of range for a bottom of shape {shape}")
        return legacy
    return layer.canonical_axis(getattr(param, axis_field), shape)


def reject_in_place(layer: Layer) -> None:
    """Caffe refuses in-place use of layers whose top merely shares the bottom's data."""
    if set(layer.param.top) & set(layer.param.bottom):
        raise layer.error(
            f"does not allow in-place computation (tops {list(layer.param.top)}, "
            f"bottoms {list(layer.param.bottom)})"
        )


def fresh_view(x: torch.Tensor) -> torch.Tensor:
    """The same data as a new tensor object (Caffe's ShareData)."""
    return x.view_as(x)


# ---- Eltwise ------------------------------------------------------------------------------------
class _EltwiseProd(torch.autograd.Function):
    """Product of the bottoms with Caffe's two gradients: the product of the other bottoms
    (stable_prod_grad) or top / bottom_i (which gives inf/nan where a bottom is 0, as Caffe does)."""

    @staticmethod
    def forward(ctx, stable: bool, *xs: torch.Tensor) -> torch.Tensor:
        y = xs[0] * xs[1]
        for x in xs[2:]:
            y = y * x
        ctx.stable = stable
        ctx.save_for_backward(y, *xs)
        return y

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        y, *xs = ctx.saved_tensors
        grads: list[torch.Tensor | None] = [None]
        for i, x in enumerate(xs):
            if not ctx.needs_input_grad[i + 1]:
                grads.append(None)
            elif ctx.stable:
                others = [xs[j] for j in range(len(xs)) if j != i]
                product = others[0]
                for other in others[1:]:
                    product = product * other
                grads.append(product * dy)
            else:
                grads.append((y / x) * dy)
        return tuple(grads)


def _eltwise_max(xs: Sequence[torch.Tensor]) -> torch.Tensor:
    """Caffe's CPU max: a tie between bottoms 0 and 1 picks 1, later bottoms replace only when
    strictly greater. `torch.where` sends the whole gradient to the selected bottom only."""
    top = torch.where(xs[0] > xs[1], xs[0], xs[1])
    for x in xs[2:]:
        top = torch.where(x > top, x, top)
    return top


@register_layer("Eltwise")
class Eltwise(Layer):
    """Elementwise SUM (with per-bottom coefficients), PROD or MAX of equally shaped bottoms."""

    bottoms = (2, None)

    def setup(self, bottom_shapes: list[Shape]) -> None:
        param = self.param.eltwise_param
        self.operation = param.operation
        coeffs = list(param.coeff)
        if coeffs and len(coeffs) != len(bottom_shapes):
            raise self.error(
                f"takes one coeff per bottom: {len(coeffs)} coeffs for {len(bottom_shapes)} bottoms"
            )
        if coeffs and self.operation == _OP.PROD:
            raise self.error("coeff is only allowed with operation SUM")
        self.coeffs = [float(c) for c in coeffs] or [1.0] * len(bottom_shapes)
        self.stable_prod_grad = param.stable_prod_grad

    def reshape(self, bottom_shapes: list[Shape]) -> list[Shape]:
        for i in range(1, len(bottom_shapes)):
            self.check_same_shape(bottom_shapes, 0, i)
        return [bottom_shapes[0]]

    def forward(self, *xs: torch.Tensor) -> list[torch.Tensor]:
        if self.operation == _OP.PROD:
            return [_EltwiseProd.apply(self.stable_prod_grad, *xs)]
        if self.operation == _OP.MAX:
            return [_eltwise_max(xs)]
        top = _scaled(xs[0], self.coeffs[0])
        for x, coeff in zip(xs[1:], self.coeffs[1:]):
            top = top + _scaled(x, coeff)
        return [top]


def _scaled(x: torch.Tensor, coeff: float) -> torch.Tensor:
    return x if coeff == 1.0 else x * coeff


# ---- Concat / Slice / Split ---------------------------------------------------------------------
@register_layer("Concat")
class Concat(Layer):
    """Joins the bottoms along `axis` (legacy `concat_dim`); all other axes must agree."""

    bottoms = (1, None)

    def setup(self, bottom_shapes: list[Shape]) -> None:
        self.axis = legacy_axis(self, self.param.concat_param, "axis", "concat_dim", bottom_shapes[0])

    def reshape(self, bottom_shapes: list[Shape]) -> list[Shape]:
        first = bottom_shapes[0]
        total = 0
        for i, shape in enumerate(bottom_shapes):
            others_differ = len(shape) != len(first) or any(
                a != b for j, (a, b) in enumerate(zip(shape, first)) if j != self.axis
            )
            if others_differ:
                raise self.error(
                    f"bottom {i} has shape {shape}, bottom 0 has {first}: all axes but the concat "
                    f"axis {self.axis} must agree"
                )
            total += shape[self.axis]
        return [first[: self.axis] + (total,) + first[self.axis + 1 :]]

    def forward(self, *xs: torch.Tensor) -> list[torch.Tensor]:
        if len(xs) == 1:
            return [fresh_view(xs[0])]
        return [torch.cat(xs, dim=self.axis)]


@register_layer("Slice")
class Slice(Layer):
    """Cuts the bottom along `axis` (legacy `slice_dim`) at `slice_point`s, or into equal parts."""

    tops = (1, None)

    def setup(self, bottom_shapes: list[Shape]) -> None:
        self.axis = legacy_axis(self, self.param.slice_param, "axis", "slice_dim", bottom_shapes[0])
        self.points = [int(p) for p in self.param.slice_param.slice_point]

    def reshape(self, bottom_shapes: list[Shape]) -> list[Shape]:
        shape = bottom_shapes[0]
        self.sizes = self._sizes(shape)
        return [shape[: self.axis] + (size,) + shape[self.axis + 1 :] for size in self.sizes]

    def _sizes(self, shape: Shape) -> list[int]:
        length, parts = shape[self.axis], self.num_tops
        if not self.points:
            if length % parts:
                raise self.error(f"{parts} tops do not evenly divide axis {self.axis} of bottom {shape}")
            return [length // parts] * parts
        if len(self.points) != parts - 1:
            raise self.error(f"{len(self.points)} slice_points for {parts} tops (need {parts - 1})")
        if parts > length:
            raise self.error(f"{parts} tops for axis {self.axis} of length {length} (bottom shape {shape})")
        bounds = [0, *self.points, length]
        sizes = [end - start for start, end in zip(bounds, bounds[1:])]
        if any(size <= 0 for size in sizes[:-1]) or sizes[-1] < 0:
            raise self.error(
                f"slice_points {self.points} must increase strictly from above 0 to at most {length} "
                f"(axis {self.axis} of bottom shape {shape})"
            )
        return sizes

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        if self.num_tops == 1:
            return [fresh_view(x)]
        return list(torch.split(x, self.sizes, dim=self.axis))


@register_layer("Split")
class Split(Layer):
    """One bottom shared by N tops; autograd sums the tops' gradients as Caffe's backward does."""

    tops = (1, None)

    def setup(self, bottom_shapes: list[Shape]) -> None:
        reject_in_place(self)

    def reshape(self, bottom_shapes: list[Shape]) -> list[Shape]:
        return [bottom_shapes[0]] * self.num_tops

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return [fresh_view(x) for _ in range(self.num_tops)]


# ---- Flatten / Reshape --------------------------------------------------------------------------
@register_layer("Flatten")
class Flatten(Layer):
    """Merges axes `axis`..`end_axis` (inclusive) into one."""

    def setup(self, bottom_shapes: list[Shape]) -> None:
        reject_in_place(self)
        param, shape = self.param.flatten_param, bottom_shapes[0]
        self.start = self.canonical_axis(param.axis, shape)
        self.end = self.canonical_axis(param.end_axis, shape, "end_axis")
        if self.end < self.start:
            raise self.error(f"end_axis {param.end_axis} comes before axis {param.axis} for bottom {shape}")

    def reshape(self, bottom_shapes: list[Shape]) -> list[Shape]:
        shape = bottom_shapes[0]
        merged = math.prod(shape[self.start : self.end + 1])
        return [shape[: self.start] + (merged,) + shape[self.end + 1 :]]

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return [x.flatten(self.start, self.end)]


@register_layer("Reshape")
class Reshape(Layer):
    """Replaces axes [axis, axis + num_axes) by `shape`; 0 copies the bottom's dim at that position,
    one -1 is inferred from the count."""

    def setup(self, bottom_shapes: list[Shape]) -> None:
        reject_in_place(self)
        self.new_dims = [int(d) for d in self.param.reshape_param.shape.dim]
        if any(d < -1 for d in self.new_dims):
            raise self.error(f"shape {self.new_dims} has a dim below -1")
        if self.new_dims.count(-1) > 1:
            raise self.error(f"shape {self.new_dims} has more than one -1 dim")

    def reshape(self, bottom_shapes: list[Shape]) -> list[Shape]:
        shape = bottom_shapes[0]
        start, end = self._replaced_axes(shape)
        dims = list(self.new_dims)
        for i, d in enumerate(dims):
            if d == 0:
                if start + i >= len(shape):
                    raise self.error(
                        f"shape {self.new_dims} has a 0 at position {i} but bottom {shape} "
                        f"has no axis {start + i} to copy"
                    )
                dims[i] = shape[start + i]
        top = list(shape[:start]) + dims + list(shape[end:])
        count = math.prod(shape)
        if -1 in dims:
            known = math.prod(d for d in top if d != -1)
            if known == 0 or count % known:
                raise self.error(
                    f"bottom shape {shape} (count {count}) is not divisible by the product "
                    f"{known} of the given dims {top}"
                )
            top[top.index(-1, start)] = count // known
        if math.prod(top) != count:
            raise self.error(
                f"bottom shape {shape} (count {count}) cannot become {tuple(top)} (count {math.prod(top)})"
            )
        return [tuple(top)]

    def _replaced_axes(self, shape: Shape) -> tuple[int, int]:
        param, ndim = self.param.reshape_param, len(shape)
        start = param.axis if param.axis >= 0 else ndim + param.axis + 1
        if not 0 <= start <= ndim:
            raise self.error(f"axis {param.axis} is out of range for bottom shape {shape}")
        if param.num_axes < -1:
            raise self.error(f"num_axes {param.num_axes} must be >= 0, or -1 for all")
        end = ndim if param.num_axes == -1 else start + param.num_axes
        if end > ndim:
            raise self.error(f"axis {param.axis} + num_axes {param.num_axes} goes past bottom shape {shape}")
        return start, end

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return [x.reshape(self.reshape([tuple(x.shape)])[0])]  # explicit dims: torch cannot infer -1 for 0 values


# ---- Silence / ArgMax ---------------------------------------------------------------------------
@register_layer("Silence")
class Silence(Layer):
    """Consumes its bottoms so they are not net outputs; produces nothing."""

    bottoms = (1, None)
    tops = (0, 0)

    def reshape(self, bottom_shapes: list[Shape]) -> list[Shape]:
        return []

    def forward(self, *xs: torch.Tensor) -> list[torch.Tensor]:
        return []


def top_k_larger_index_first(values: torch.Tensor, dim: int, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The k largest values along `dim`, in decreasing order, and their indices; equal values are
    ordered larger index first (Caffe sorts (value, index) pairs with std::greater)."""
    length = values.shape[dim]
    flipped = values.flip(dim)
    ordered, order = torch.sort(flipped, dim=dim, descending=True, stable=True)
    return ordered.narrow(dim, 0, k), (length - 1) - order.narrow(dim, 0, k)


@register_layer("ArgMax")
class ArgMax(Layer):
    """Indices (as floats) of the top_k largest values along `axis`, or per item over all non-batch
    axes when `axis` is unset; `out_max_val` gives the values (with axis) or index/value pairs
    (without). No gradient."""

    def setup(self, bottom_shapes: list[Shape]) -> None:
        param, shape = self.param.argmax_param, bottom_shapes[0]
        if not shape:
            raise self.error("needs a bottom with at least one axis, got a scalar")
        self.top_k = int(param.top_k)
        self.out_max_val = param.out_max_val
        self.axis = self.canonical_axis(param.axis, shape) if param.HasField("axis") else None
        length = shape[self.axis] if self.axis is not None else math.prod(shape[1:])
        if not 1 <= self.top_k <= length:
            raise self.error(f"top_k {self.top_k} must be in 1..{length} for bottom shape {shape}")

    def reshape(self, bottom_shapes: list[Shape]) -> list[Shape]:
        shape = bottom_shapes[0]
        if self.axis is not None:
            return [shape[: self.axis] + (self.top_k,) + shape[self.axis + 1 :]]
        top = [1] * max(len(shape), 3)
        top[0], top[1], top[2] = shape[0], 2 if self.out_max_val else 1, self.top_k
        return [tuple(top)]

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = x.detach()
        if self.axis is not None:
            values, indices = top_k_larger_index_first(x, self.axis, self.top_k)
            return [values if self.out_max_val else indices.to(x.dtype)]
        values, indices = top_k_larger_index_first(x.reshape(x.shape[0], math.prod(x.shape[1:])), 1, self.top_k)
        rows = [indices.to(x.dtype), values] if self.out_max_val else [indices.to(x.dtype)]
        top = torch.stack(rows, dim=1)
        return [top.reshape(top.shape + (1,) * (max(x.dim(), 3) - 3))]
