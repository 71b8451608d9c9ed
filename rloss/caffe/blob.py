"""pycaffe's `Blob`: a net blob or a parameter as numpy arrays `.data` and `.diff`.

The arrays share memory with the net's float32 CPU tensors, so writing into them changes what the
net computes, as in pycaffe. Other tensors (CUDA, or bf16/fp16 blobs of a reduced-precision net) are
shown as float32 host copies that `HostCopies.write_back` copies into the tensors before the net next
runs, the way Caffe's SyncedMemory copies a blob the host touched back to the device.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch

from rloss.precision import to_float32
from rloss.pycaffe_blob import Blob

if TYPE_CHECKING:
    from rloss.caffe.net import Net


class HostCopies:
    """numpy faces of tensors: a view where numpy can share the memory, else a host copy (the same
    copy until `write_back`, so successive writes add up)."""

    def __init__(self) -> None:
        self._copies: dict[int, tuple[torch.Tensor, np.ndarray]] = {}

    def array(self, tensor: torch.Tensor) -> np.ndarray:
        if tensor.device.type == "cpu" and tensor.dtype == torch.float32:
            return tensor.detach().numpy()
        entry = self._copies.get(id(tensor))
        if entry is None or entry[0] is not tensor:
            entry = (tensor, to_float32(tensor.detach()).cpu().numpy())
            self._copies[id(tensor)] = entry
        return entry[1]

    def write_back(self) -> None:
        """Copy every host copy handed out into its tensor (outside autograd's view, like a write into
        a CPU tensor's numpy view), and forget them: the tensors change when the net runs."""
        for tensor, array in self._copies.values():
            tensor.data.copy_(torch.from_numpy(array))
        self._copies.clear()

    def discard(self) -> None:
        """Forget the copies without writing them back (the tensors changed since they were made)."""
        self._copies.clear()


class NetBlob(Blob):
    """A named blob of a net (`net.blobs[name]`)."""

    def __init__(self, owner: Net, name: str):
        self._owner = owner
        self._name = name

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self._owner._net.blob_tensor(self._name).shape)

    def _data(self) -> np.ndarray:
        return self._owner._data_array(self._name)

    def _diff(self) -> np.ndarray:
        return self._owner._diff_array(self._name)

    def reshape(self, *shape: int) -> None:
        """Give an input blob a new shape (its values become zeros), as pycaffe's Blob.reshape; the
        other blobs take their shapes from the inputs at the next forward."""
        self._owner._reshape_input(self._name, tuple(int(s) for s in shape))


class ParamBlob(Blob):
    """A parameter blob of a layer (`net.params[layer][i]`, `net.layers[i].blobs[j]`): `data` is the
    weights, `diff` their accumulated gradient (zeros until a backward reaches them)."""

    def __init__(self, tensor: torch.nn.Parameter, copies: HostCopies):
        self._tensor = tensor
        self._copies = copies

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self._tensor.shape)

    def _data(self) -> np.ndarray:
        return self._copies.array(self._tensor)

    def _diff(self) -> np.ndarray:
        if self._tensor.grad is None:
            self._tensor.grad = torch.zeros_like(self._tensor)
        return self._copies.array(self._tensor.grad)
