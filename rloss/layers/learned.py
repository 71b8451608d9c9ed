"""Layers whose tops come from learned blobs rather than from computing on bottom data: Embed (a
lookup table indexed by the bottom) and Parameter (a blob exposed as a top)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from rloss.layers.base import Layer, Shape
from rloss.layers.registry import register_layer
from rloss.layers.vision import optional_filler


@register_layer("Embed")
class Embed(Layer):
    """top[..., :] = weight[bottom[...]] (+ bias): the bottom holds integer indices stored as floats,
    each in [0, input_dim); weight is (input_dim, num_output), InnerProduct's transposed. Gradients
    reach the weight rows (summed over repeated indices) and the bias, never the bottom: Caffe aborts
    when asked to backpropagate to it, so the net detaches it and propagate_down: true is refused."""

    no_gradient_bottoms = (0,)

    def setup(self, bottom_shapes: list[Shape]) -> None:
        ep = self.param.embed_param
        if self.param.propagate_down and self.param.propagate_down[0]:
            raise self.error("cannot backpropagate to its input (indices); set propagate_down: false")
        self.num_output = int(ep.num_output)
        self.input_dim = int(ep.input_dim)
        for name, value in (("num_output", self.num_output), ("input_dim", self.input_dim)):
            if value <= 0:
                raise self.error(f"embed_param.{name} must be > 0, got {value}")
        self.add_blob((self.input_dim, self.num_output), optional_filler(ep, "weight_filler"))
        self.bias_term = bool(ep.bias_term)
        if self.bias_term:
            self.add_blob((self.num_output,), optional_filler(ep, "bias_filler"))

    def reshape(self, bottom_shapes: list[Shape]) -> list[Shape]:
        return [(*bottom_shapes[0], self.num_output)]

    def _indices(self, x: torch.Tensor) -> torch.Tensor:
        """The bottom as int64 indices, after Caffe's checks that each is an integer in range (NaN fails)."""
        bad = ~((x >= 0) & (x < self.input_dim) & (x == torch.floor(x)))
        if bool(bad.any()):
            value = float(x[bad][0])
            raise self.error(
                f"bottom holds {value!r}, which is not an integer index in [0, {self.input_dim}) (input_dim)"
            )
        return x.to(torch.int64)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:  # type: ignore[override]
        y = F.embedding(self._indices(x.detach()), self.blobs[0])
        return [y + self.blobs[1] if self.bias_term else y]


@register_layer("Parameter")
class Parameter(Layer):
    """No bottoms; the top is the layer's one blob of parameter_param.shape (zeros until trained or
    loaded, as Caffe allocates it), so gradients on the top accumulate in the blob. Caffe's top shares
    the blob's data and diff; a view gives both."""

    bottoms = (0, 0)

    def setup(self, bottom_shapes: list[Shape]) -> None:
        self.add_blob([int(d) for d in self.param.parameter_param.shape.dim])

    def reshape(self, bottom_shapes: list[Shape]) -> list[Shape]:
        return [tuple(self.blobs[0].shape)]

    def forward(self) -> list[torch.Tensor]:  # type: ignore[override]
        return [self.blobs[0].view_as(self.blobs[0])]
