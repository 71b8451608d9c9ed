"""Caffe's MemoryData layer: batches cut from arrays the caller hands in (pycaffe's
`net.set_input_arrays(data, labels)`).

Each forward gives the next `batch_size` items of the arrays, back to the first after the last
(their length is a multiple of the batch). As in Caffe the layer reads the caller's arrays
themselves, not copies, so a change to them shows in later batches; no transform is applied.
Tops: data (N, C, H, W) and label, (N,) as set up and (N, 1, 1, 1) from the first forward on, the
shape Caffe's forward gives it.
"""

from __future__ import annotations

import logging

import numpy as np
import torch

from rloss.layers.base import Shape
from rloss.layers.data import SourceLayer
from rloss.layers.registry import register_layer

log = logging.getLogger("rloss")


@register_layer("MemoryData")
class MemoryData(SourceLayer):
    """See the module docstring; `reset` takes the arrays (pycaffe's checks included)."""

    tops = (2, 2)

    def setup(self, bottom_shapes: list[Shape]) -> None:
        memory = self.param.memory_data_param
        dims = {name: int(getattr(memory, name)) for name in ("batch_size", "channels", "height", "width")}
        if min(dims.values()) < 1:
            given = ", ".join(f"{name} {value}" for name, value in dims.items())
            raise self.error(f"memory_data_param needs batch_size, channels, height and width, all positive; "
                             f"got {given}")
        self.batch_size = dims["batch_size"]
        self.item_shape: Shape = (dims["channels"], dims["height"], dims["width"])
        if self.param.HasField("transform_param"):
            log.warning("layer '%s' (type MemoryData): transform_param is ignored; MemoryData does not "
                        "transform the arrays it is given (as in Caffe)", self.name)
        self.data: torch.Tensor | None = None
        self.labels: torch.Tensor | None = None
        self.position = 0

    def reshape(self, bottom_shapes: list[Shape]) -> list[Shape]:
        return [(self.batch_size, *self.item_shape), (self.batch_size,)]

    def reset(self, data: np.ndarray, labels: np.ndarray) -> None:
        """Read batches from `data` (N, C, H, W) and `labels` (N, 1, 1, 1), float32 C-contiguous
        arrays with N a positive multiple of batch_size (pycaffe's checks), from the first item on."""
        self._check_array(data, "data array", self.item_shape)
        self._check_array(labels, "labels array", (1, 1, 1))
        count = data.shape[0]
        if labels.shape[0] != count:
            raise self.error(f"data and labels must have the same first dimension, got {count} and {labels.shape[0]}")
        if count == 0 or count % self.batch_size:
            raise self.error(f"the arrays' first dimension ({count}) must be a positive multiple of the batch size "
                             f"{self.batch_size}")
        self.data, self.labels = _shared(data), _shared(labels).reshape(count)
        self.position = 0

    def forward(self) -> list[torch.Tensor]:  # type: ignore[override]
        if self.data is None or self.labels is None:
            raise self.error("has no arrays: call net.set_input_arrays(data, labels) before a forward "
                             "(Caffe fails there too)")
        batch = slice(self.position, self.position + self.batch_size)
        self.position = (self.position + self.batch_size) % self.data.shape[0]
        return [self.place(self.data[batch]), self.place(self.labels[batch].reshape(self.batch_size, 1, 1, 1))]

    def _check_array(self, array: np.ndarray, name: str, item_shape: Shape) -> None:
        if not isinstance(array, np.ndarray):
            raise self.error(f"the {name} must be a numpy array, got {type(array).__name__}")
        if not array.flags.c_contiguous:
            raise self.error(f"the {name} must be C contiguous")
        if array.ndim != 4:
            raise self.error(f"the {name} must be 4-d, got shape {array.shape}")
        if array.dtype != np.float32:
            raise self.error(f"the {name} must be float32, got {array.dtype}")
        if array.shape[1:] != item_shape:
            raise self.error(f"the {name} has items of shape {array.shape[1:]}, the layer takes "
                             f"(channels, height, width) {item_shape}")


def _shared(array: np.ndarray) -> torch.Tensor:
    """A tensor on the array's memory (Caffe keeps the caller's pointer); a read-only array, which
    torch cannot share, is copied."""
    return torch.from_numpy(array if array.flags.writeable else array.copy())
