"""Layers that rearrange, select or reduce blobs: Reduction, Tile, Filter, BatchReindex."""

from __future__ import annotations

import torch

from rloss.layers.base import Layer, Shape
from rloss.layers.registry import register_layer
from rloss.proto import caffe_pb2

_OP = caffe_pb2.ReductionParameter


# ---- Reduction ----------------------------------------------------------------------------------
@register_layer("Reduction")
class Reduction(Layer):
    """coeff times the SUM, ASUM (sum of |x|), SUMSQ (sum of x^2) or MEAN of all the axes from `axis`
    on: the top has the bottom's axes before `axis` (a scalar for axis 0). Autograd's |x| gradient
    is sign(x) with sign(0) = 0, as Caffe's."""

    # A sum over whole blobs (often a loss): bf16 would keep 2-3 digits of it.
    runs_in_float32 = True

    def setup(self, bottom_shapes: list[Shape]) -> None:
        param = self.param.reduction_param
        self.axis = self.canonical_axis(param.axis, bottom_shapes[0])
        self.operation = param.operation
        self.coeff = float(param.coeff)

    def reshape(self, bottom_shapes: list[Shape]) -> list[Shape]:
        return [bottom_shapes[0][: self.axis]]

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        reduced = x.flatten(self.axis)
        if self.operation == _OP.ASUM:
            reduced = reduced.abs()
        elif self.operation == _OP.SUMSQ:
            reduced = reduced.square()
        total = reduced.mean(dim=-1) if self.operation == _OP.MEAN else reduced.sum(dim=-1)
        return [total * self.coeff]


# ---- Tile ---------------------------------------------------------------------------------------
@register_layer("Tile")
class Tile(Layer):
    """`tiles` copies of the bottom laid end to end along `axis` (required, > 0); the gradient sums
    the copies'."""

    def setup(self, bottom_shapes: list[Shape]) -> None:
        param = self.param.tile_param
        self.axis = self.canonical_axis(param.axis, bottom_shapes[0])
        if not param.HasField("tiles"):
            raise self.error("tile_param.tiles is required")
        self.tiles = int(param.tiles)
        if self.tiles < 1:
            raise self.error(f"tiles must be > 0, got {self.tiles}")

    def reshape(self, bottom_shapes: list[Shape]) -> list[Shape]:
        shape = list(bottom_shapes[0])
        shape[self.axis] *= self.tiles
        return [tuple(shape)]

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        repeats = [1] * x.dim()
        repeats[self.axis] = self.tiles
        return [x.repeat(repeats)]


# ---- Filter -------------------------------------------------------------------------------------
@register_layer("Filter")
class Filter(Layer):
    """Bottoms: K data blobs, then a selector of one value per item (shape (N,) or (N, 1, ...)). Top
    k holds the items of data blob k whose selector value is non-zero, in order. The gradient goes
    to the selected items of the data bottoms (0 for the others), never to the selector.

    How many items the tops hold is known only once the selector's data flows, while the net fixes
    its blobs' shapes when it is built: the reported top shapes are the data bottoms' own (N items),
    as Caffe's first Reshape gives, and forward returns the items actually selected (possibly none).
    Layers after it see the smaller batch at run time; one that fixed the item count at set-up
    would not fit it.
    """

    bottoms = (2, None)
    tops = (1, None)
    no_gradient_bottoms = (-1,)  # the selector, whatever the number of data bottoms

    def setup(self, bottom_shapes: list[Shape]) -> None:
        if self.num_tops != len(bottom_shapes) - 1:
            raise self.error(
                f"needs one top per data bottom: {len(bottom_shapes) - 1} data bottoms, {self.num_tops} tops"
            )

    def reshape(self, bottom_shapes: list[Shape]) -> list[Shape]:
        *data, selector = bottom_shapes
        if not selector or any(d != 1 for d in selector[1:]):
            raise self.error(f"the selector (last bottom) must have shape (N,) or (N, 1, ...), got {selector}")
        for index, shape in enumerate(data):
            if not shape or shape[0] != selector[0]:
                raise self.error(
                    f"bottom {index} has shape {shape}: its first axis must be the selector's {selector[0]} items"
                )
        return list(data)

    def forward(self, *bottoms: torch.Tensor) -> list[torch.Tensor]:
        self.reshape([tuple(b.shape) for b in bottoms])  # Caffe checks the shapes at every forward
        *data, selector = bottoms
        selected = torch.nonzero(selector.detach().reshape(-1)).squeeze(1)
        return [blob.index_select(0, selected) for blob in data]


# ---- BatchReindex -------------------------------------------------------------------------------
@register_layer("BatchReindex")
class BatchReindex(Layer):
    """top[i] = data[index[i]] for a 1-axis index blob whose values (truncated to integers) must lie
    in [0, N); items may repeat or be left out, and the gradient of a repeated item is the sum."""

    bottoms = (2, 2)
    no_gradient_bottoms = (1,)

    def reshape(self, bottom_shapes: list[Shape]) -> list[Shape]:
        data, index = bottom_shapes
        if not data:
            raise self.error("needs a data bottom with at least one axis, got a scalar")
        if len(index) != 1:
            raise self.error(f"the index (bottom 1) must have 1 axis, got shape {index}")
        return [index + data[1:]]

    def forward(self, data: torch.Tensor, index: torch.Tensor) -> list[torch.Tensor]:
        self.reshape([tuple(data.shape), tuple(index.shape)])  # Caffe checks the shapes at every forward
        index = index.detach()
        items = data.shape[0]
        in_range = (index >= 0) & (index < items)
        if not bool(in_range.all()):
            bad = index[~in_range][0].item()
            raise self.error(f"index value {bad} is out of range for data of {items} items (must be in [0, {items}))")
        return [data.index_select(0, index.long())]
