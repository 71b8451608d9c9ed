"""The contract every Caffe layer class follows.

A layer is built from its `LayerParameter` and its bottoms' shapes, checks them, creates its
parameter blobs, and knows its tops' shapes before any data flows (Caffe's SetUp + Reshape).
Forward is plain PyTorch; backward comes from autograd unless a layer defines its own
`torch.autograd.Function` (where Caffe's gradient is not the autograd one).
"""

from __future__ import annotations

import math
from typing import ClassVar, Sequence

import torch
from torch import nn

from rloss.errors import LayerError, NetError
from rloss.layers.fillers import fill
from rloss.proto import caffe_pb2
from rloss.proto.blob import blob_shape, blob_to_array, legacy_shape_matches, shape_problem

Shape = tuple[int, ...]


class Layer(nn.Module):
    """One Caffe layer. Subclasses set the class attributes and implement `setup`, `reshape`, `forward`.

    Class attributes:
      bottoms: (min, max) number of bottoms, max None = unbounded.
      tops: (min, max) number of tops as written in the prototxt, max None = unbounded.
      auto_tops: tops Caffe creates anonymously when the prototxt names fewer (ImageSegData 3,
        SoftmaxWithLoss/DenseCRFLoss 1); forward must return max(len(param.top), auto_tops) tensors.
      default_loss_weight: loss weight of top 0 when the prototxt gives none (1 for Caffe loss layers).
      no_gradient_bottoms: bottom indices that can never receive a gradient (labels); asking for
        one is an error, as in Caffe.
      runs_in_float32: under bf16/fp16 autocast the Net runs the layer with autocast off and its
        bf16/fp16 bottoms cast to float32 (losses, accuracies: numerically sensitive or user-facing).
      recomputable: the forward is a function of the bottoms, the parameters and torch's generator
        only, so activation checkpointing may run it again in backward (False for a layer that updates
        state in forward; an instance may set it in `setup`).
    """

    type_name: ClassVar[str] = ""
    bottoms: ClassVar[tuple[int, int | None]] = (1, 1)
    tops: ClassVar[tuple[int, int | None]] = (1, 1)
    auto_tops: ClassVar[int] = 0
    default_loss_weight: ClassVar[float] = 0.0
    no_gradient_bottoms: ClassVar[tuple[int, ...]] = ()
    feedable: ClassVar[bool] = False  # its tops take tensors from the caller (`feed`), as net inputs do
    runs_in_float32: ClassVar[bool] = False
    recomputable: bool = True

    def __init__(self, param, bottom_shapes: Sequence[Shape], phase: int = caffe_pb2.TRAIN):
        super().__init__()
        self.param = param
        self.name: str = param.name
        self.phase: int = param.phase if param.HasField("phase") else phase
        self.blobs = nn.ParameterList()
        self.num_tops = max(len(param.top), self.auto_tops)
        self._check_count("bottom", len(bottom_shapes), self.bottoms)
        self._check_count("top", len(param.top), self.tops)
        shapes = [tuple(int(d) for d in s) for s in bottom_shapes]
        self.setup(shapes)
        if len(param.blobs) > len(self.blobs):
            raise self.error(f"the file gives {len(param.blobs)} parameter blobs, the layer has {len(self.blobs)}")
        self.top_shapes: list[Shape] = [tuple(s) for s in self.reshape(shapes)]
        self.check_top_shapes(self.top_shapes)
        self.loss_weights: list[float] = self._loss_weights()

    # ---- to implement -------------------------------------------------------------------------
    def setup(self, bottom_shapes: list[Shape]) -> None:
        """Read and check parameters; create parameter blobs with `add_blob` (Caffe's LayerSetUp)."""

    def reshape(self, bottom_shapes: list[Shape]) -> list[Shape]:
        """The tops' shapes for these bottoms' shapes; raise `self.error(...)` on a mismatch."""
        raise NotImplementedError

    def forward(self, *bottoms: torch.Tensor) -> list[torch.Tensor]:  # type: ignore[override]
        """The tops, computed from the bottoms (Caffe's Forward)."""
        raise NotImplementedError

    def setup_again(self, bottom_shapes: Sequence[Shape]) -> None:
        """Caffe's LayerSetUp called on a built layer (pycaffe's `layer.setup`): the parameters read and
        checked for these bottoms again, the parameter blobs kept (Caffe skips the initialisation of
        blobs a layer has) and refused when these bottoms would need others. A refusal leaves the
        layer as it was."""
        if getattr(self, "has_data_state", False):
            raise self.error("a data layer cannot be set up again: it would restart its reading (Caffe "
                             "fails the same way); build a new net instead")
        shapes = [tuple(int(d) for d in s) for s in bottom_shapes]
        self._check_count("bottom", len(shapes), self.bottoms)
        saved = {key: dict(value) if isinstance(value, dict) else value for key, value in vars(self).items()}
        kept = self.blobs
        try:
            self.blobs = nn.ParameterList()
            self.setup(shapes)
            needed, have = [tuple(b.shape) for b in self.blobs], [tuple(b.shape) for b in kept]
            if needed != have:
                raise self.error(f"bottoms of shapes {shapes} need parameter blobs of shapes {needed}, the "
                                 f"layer's are {have}")
        except BaseException:
            vars(self).clear()
            vars(self).update(saved)
            raise
        self.blobs = kept

    # ---- helpers for subclasses ---------------------------------------------------------------
    def error(self, message: str) -> LayerError:
        """An error naming this layer and its type."""
        return LayerError(self.name, self.type_name, message)

    def add_blob(self, shape: Sequence[int], filler=None) -> nn.Parameter:
        """Create the next parameter blob: from the LayerParameter's stored blobs when it has them
        (a net built from a .caffemodel), else filled by `filler` (None = constant 0)."""
        shape = tuple(int(d) for d in shape)
        index = len(self.blobs)
        self.check_shape(shape, f"parameter blob {index}")
        if index < len(self.param.blobs):
            stored = self.param.blobs[index]
            if not legacy_shape_matches(stored, shape):
                raise self.error(f"stored blob {index} has shape {blob_shape(stored)}, the layer needs {shape}")
            values = blob_to_array(stored, f"layer '{self.name}' blob {index}")
            data = torch.from_numpy(values.reshape(shape).copy())
        else:
            try:
                data = fill(shape, filler)
            except NetError as error:
                raise self.error(f"parameter blob {index}: {error}") from None
        blob = nn.Parameter(data)
        self.blobs.append(blob)
        return blob

    def canonical_axis(self, axis: int, shape: Shape, what: str = "axis") -> int:
        """Caffe's CanonicalAxisIndex: a negative axis counts from the end; out of range is an error."""
        ndim = len(shape)
        if not -ndim <= axis < ndim:
            raise self.error(f"{what} {axis} is out of range for a bottom of shape {tuple(shape)}")
        return axis + ndim if axis < 0 else axis

    def positive(self, name: str, value: float) -> float:
        """`value` of the parameter `name`, which must be a finite number > 0 (sigmas, scales)."""
        if not (math.isfinite(value) and value > 0):
            raise self.error(f"{name} must be a finite number > 0, got {value}")
        return float(value)

    def check_shape(self, shape: Sequence[int], what: str, itemsize: int = 4) -> None:
        """Refuse, before it is allocated, a blob that Caffe could not hold or this machine could not
        allocate (`rloss.proto.blob.shape_problem`): an error naming the layer, not an allocator crash."""
        problem = shape_problem(shape, itemsize)
        if problem:
            raise self.error(f"{what}: {problem}")

    def check_top_shapes(self, shapes: Sequence[Sequence[int]]) -> None:
        """`check_shape` for each top (a layer that allocates its tops early calls it before)."""
        for index, shape in enumerate(shapes):
            self.check_shape(shape, f"top {index}")

    def check_same_shape(self, bottom_shapes: list[Shape], first: int = 0, second: int = 1) -> None:
        if bottom_shapes[first] != bottom_shapes[second]:
            raise self.error(
                f"bottoms {first} and {second} must have the same shape, got "
                f"{bottom_shapes[first]} and {bottom_shapes[second]}"
            )

    def check_not_empty(self, shape: Shape, first_axis: int = 0) -> None:
        """Refuse a bottom with a 0 dim from `first_axis` on (for layers whose torch kernels take none)."""
        if 0 in shape[first_axis:]:
            raise self.error(f"needs a bottom whose dims from axis {first_axis} on are > 0, got shape {shape}")

    def check_axes(self, bottom_shapes: list[Shape], index: int, axes: int) -> None:
        if len(bottom_shapes[index]) != axes:
            raise self.error(f"bottom {index} must have {axes} axes, got shape {bottom_shapes[index]}")

    # ---- internals ----------------------------------------------------------------------------
    def _check_count(self, what: str, count: int, bounds: tuple[int, int | None]) -> None:
        low, high = bounds
        if count < low or (high is not None and count > high):
            wanted = f"{low}" if low == high else f"{low}..{'any' if high is None else high}"
            raise self.error(f"needs {wanted} {what}s, the prototxt gives {count}")

    def _loss_weights(self) -> list[float]:
        given = list(self.param.loss_weight)
        if given:
            if len(given) != self.num_tops:
                raise self.error(f"{len(given)} loss_weight values for {self.num_tops} tops")
            return [float(w) for w in given]
        weights = [0.0] * self.num_tops
        if self.num_tops and self.default_loss_weight:
            weights[0] = self.default_loss_weight
        return weights

    def extra_repr(self) -> str:
        return f"name={self.name!r}, type={self.type_name}, tops={self.top_shapes}"
