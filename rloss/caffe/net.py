"""pycaffe's `caffe.Net` over `rloss.net.Net`.

Blobs keep their data and diff between calls, as Caffe's do: `forward(start=, end=)` runs a range of
layers on the blobs as they stand (what earlier layers computed, or what the caller wrote into them),
and `backward(start=, end=)` runs a range backward from the diffs the blobs hold (a loss top holds its
loss weight), overwriting bottom diffs and adding to parameter diffs until `clear_param_diffs`.

A blob's `.data` is the tensor it holds now, and a forward binds new tensors to the blobs it computes:
read `.data` again after a forward (parameters and diffs keep their memory). Host copies (CUDA or
bf16/fp16 tensors, rloss.caffe.blob) go back into the tensors before each call that runs or saves the
net; a caller running the wrapped net itself (a solver) calls `_push_host_writes` first.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from pathlib import Path
from typing import Callable, Iterable, Mapping, Sequence, Union

import numpy as np
import torch

from rloss.caffe.blob import HostCopies, NetBlob, ParamBlob
from rloss.caffe.mode import current_device
from rloss.errors import NetError
from rloss.layers.memory_data import MemoryData
from rloss.net import Net as _Net
from rloss.proto import caffe_pb2
from rloss.pycaffe_blob import Blob
from rloss.variables import variable_values

PathLike = Union[str, "os.PathLike[str]"]
Arrays = Mapping[str, np.ndarray]


class NetLayer:
    """One layer of a net, as pycaffe shows it: `.type`, `.blobs` (its parameters), `.setup` and
    `.reshape`; also `.param`, its LayerParameter (an rloss addition: pycaffe scripts re-read the
    prototxt for that)."""

    def __init__(self, layer, owner: Net):
        self._layer = layer
        self._owner = owner

    @property
    def type(self) -> str:
        return self._layer.param.type

    @property
    def param(self) -> caffe_pb2.LayerParameter:
        return self._layer.param

    @property
    def blobs(self) -> list[ParamBlob]:
        return [ParamBlob(p, self._owner._copies) for p in self._layer.blobs]

    def setup(self, bottom: Sequence[Blob], top: Sequence[Blob]) -> None:
        """Caffe's LayerSetUp for bottoms of these blobs' shapes (parameters kept); the tops are not
        touched, as in Caffe: `reshape` shapes them."""
        self._check_blob_counts(bottom, top)
        self._layer.setup_again([blob.shape for blob in bottom])

    def reshape(self, bottom: Sequence[Blob], top: Sequence[Blob]) -> None:
        """Caffe's Reshape: the tops take the shapes the layer gives for these bottoms' shapes (a top
        whose shape changes holds zeros), or the layer's error for bottoms it cannot take."""
        self._check_blob_counts(bottom, top)
        shapes = self._layer.reshape([tuple(blob.shape) for blob in bottom])
        for blob, shape in zip(top, shapes):
            if tuple(blob.shape) == tuple(shape):
                continue
            if isinstance(blob, NetBlob):
                self._owner._shape_blob(blob, shape)
            else:
                blob.reshape(*shape)

    def _check_blob_counts(self, bottom: Sequence[Blob], top: Sequence[Blob]) -> None:
        layer = self._layer
        if len(bottom) != len(layer.param.bottom) or len(top) != layer.num_tops:
            raise NetError(f"layer '{layer.name}' (type {self.type}) has {len(layer.param.bottom)} bottoms and "
                           f"{layer.num_tops} tops; given {len(bottom)} and {len(top)} blobs")


class Net:
    """pycaffe's `caffe.Net(file, phase, level=0, stages=None, weights=None)` and the legacy
    `caffe.Net(file, weights, phase)`; rloss adds `values=` (for `${VAR}`s) and `precision=` (fp32,
    bf16, fp16). Built on the device of set_mode_cpu/set_mode_gpu."""

    def __init__(self, model: PathLike, *args, phase: int | None = None, level: int = 0,
                 stages: Iterable[str] | None = None, weights: PathLike | None = None,
                 values: Mapping[str, str] | None = None, precision: str = "fp32"):
        given = _constructor_arguments(args, {"phase": phase, "level": level, "stages": stages, "weights": weights})
        if given["phase"] not in (caffe_pb2.TRAIN, caffe_pb2.TEST):
            raise NetError(f"Net({model!r}): phase must be caffe.TRAIN or caffe.TEST, not {given['phase']!r}")
        merged, defaults = variable_values(values or {}, Path(model))
        net = _Net.from_prototxt(model, given["phase"], values=merged, level=int(given["level"]),
                                 stages=list(given["stages"] or ()), defaults=defaults)
        net.to(current_device())
        net.precision = precision
        self._attach(net)
        if given["weights"]:
            self.copy_from(given["weights"])

    @classmethod
    def _wrap(cls, net: _Net) -> Net:
        """Wrap an already built net (a solver's) without rebuilding it."""
        self = cls.__new__(cls)
        self._attach(net)
        return self

    def _attach(self, net: _Net) -> None:
        self._net = net
        net.keep_blob_diffs = True  # a solver's iteration leaves every blob's gradient to show
        self._copies = HostCopies()
        self._seen_blobs: dict | None = None  # the net's blobs when this wrapper last looked at them
        self.blobs: OrderedDict[str, NetBlob] = OrderedDict(
            (name, NetBlob(self, name)) for name in net.blob_shapes if not name.startswith("("))

    # ---- what the net is made of -----------------------------------------------------------------
    @property
    def params(self) -> OrderedDict[str, list[ParamBlob]]:
        """Per layer, its parameter blobs (read at each access: a solver's test nets take the train
        net's parameters when they are tested)."""
        return OrderedDict((layer, [ParamBlob(p, self._copies) for p in blobs])
                           for layer, blobs in self._net.params.items())

    @property
    def layers(self) -> list[NetLayer]:
        return [NetLayer(layer, self) for layer in self._net.layers]

    @property
    def layer_dict(self) -> OrderedDict[str, NetLayer]:
        return OrderedDict(zip(self._layer_names, self.layers))

    @property
    def _layer_names(self) -> list[str]:
        return self._net.layer_names()

    @property
    def top_names(self) -> OrderedDict[str, list[str]]:
        return OrderedDict((n, list(self._net.layer_tops(n))) for n in self._layer_names)

    @property
    def bottom_names(self) -> OrderedDict[str, list[str]]:
        return OrderedDict((n, list(self._net.layer_bottoms(n))) for n in self._layer_names)

    @property
    def blob_loss_weights(self) -> OrderedDict[str, float]:
        """Per blob, the weight its producer gives it in the objective (0 for blobs that are no loss)."""
        weights = dict(self._net.loss_top_names())
        return OrderedDict((name, weights.get(name, 0.0)) for name in self.blobs)

    @property
    def inputs(self) -> list[str]:
        return self._net.feedable

    @property
    def outputs(self) -> list[str]:
        return list(self._net.outputs)

    # ---- running ---------------------------------------------------------------------------------
    def forward(self, blobs: Sequence[str] | None = None, start: str | None = None, end: str | None = None,
                **inputs: np.ndarray) -> dict[str, np.ndarray]:
        """Run layers `start`..`end` (names; default all) on the blobs as they stand; keyword arguments
        set every input blob first. Returns the outputs' data (the tops of `end` if given) and `blobs`'."""
        first, last = self._position(start, 0), self._position(end, len(self._net.layers) - 1)
        wanted = (self.top_names[end] if end is not None else self.outputs) + list(blobs or [])
        if inputs:
            self._write_batch(inputs, self.inputs, "input", self._data_array)
        self._push_host_writes()
        self._net.forward_layers(first, last)
        return {name: self._data_array(name) for name in dict.fromkeys(wanted)}

    def backward(self, diffs: Sequence[str] | None = None, start: str | None = None, end: str | None = None,
                 **top_diffs: np.ndarray) -> dict[str, np.ndarray]:
        """Run layers `start` down to `end` (names; default all) backward from the diffs the blobs hold;
        keyword arguments set every output's diff first. Returns the inputs' diffs (the bottoms' of
        `end` if given) and `diffs`'."""
        last, first = self._position(start, len(self._net.layers) - 1), self._position(end, 0)
        wanted = (self.bottom_names[end] if end is not None else self.inputs) + list(diffs or [])
        if top_diffs:
            self._write_batch(top_diffs, self.outputs, "output", self._diff_array)
        self._push_host_writes()
        self._net.backward_layers(last, first)
        return {name: self._diff_array(name) for name in dict.fromkeys(wanted)}

    def forward_all(self, blobs: Sequence[str] | None = None, **inputs: np.ndarray) -> dict[str, np.ndarray]:
        """`forward` over arrays of any length, cut into the net's batches (the last padded with zeros,
        its padding dropped from the results). Returns every output (and `blobs`) for all items."""
        outputs, _ = self._run_batches(inputs, {}, blobs, None, with_backward=False)
        return outputs

    def forward_backward_all(self, blobs: Sequence[str] | None = None, diffs: Sequence[str] | None = None,
                             **arrays: np.ndarray) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        """`forward` then `backward` over arrays of any length, batched as `forward_all`: keyword
        arrays named like inputs feed the forwards, those named like outputs are the backwards' top
        diffs (absent ones: the data layers, the diffs the blobs hold). Returns (data, diffs)."""
        feeds = {name: value for name, value in arrays.items() if name in self.inputs}
        seeds = {name: value for name, value in arrays.items() if name in self.outputs}
        unknown = sorted(set(arrays) - set(feeds) - set(seeds))
        if unknown:
            raise NetError(f"forward_backward_all: {', '.join(unknown)} is neither an input nor an output of the net")
        return self._run_batches(feeds, seeds, blobs, diffs, with_backward=True)

    def clear_param_diffs(self) -> None:
        """Zero every parameter's diff (they add up over backward calls otherwise)."""
        self._push_host_writes()
        for tensor in self._net.learnable_tensors():
            if tensor.grad is not None:
                tensor.grad.zero_()

    def reshape(self) -> None:
        """Shapes follow the inputs at every forward; kept for pycaffe compatibility."""

    def set_input_arrays(self, data: np.ndarray, labels: np.ndarray) -> None:
        """Feed the net's MemoryData layer, which must be its first layer (pycaffe's rule): `data`
        (N, C, H, W) and `labels` (N,) or (N, 1, 1, 1), float32 and C-contiguous, N a multiple of
        the batch size. The layer reads these arrays themselves, from their first item."""
        layers = self._net.layers
        if not layers or not isinstance(layers[0], MemoryData):
            raise NetError("set_input_arrays may only be called if the first layer is a MemoryData layer")
        if isinstance(labels, np.ndarray) and labels.ndim == 1:
            labels = np.ascontiguousarray(labels[:, np.newaxis, np.newaxis, np.newaxis])
        layers[0].reset(data, labels)

    # ---- weights ---------------------------------------------------------------------------------
    def copy_from(self, path: PathLike) -> None:
        self._push_host_writes()
        self._net.copy_from(str(path))

    def load_hdf5(self, path: PathLike) -> None:
        """Copy weights from a Caffe HDF5 model, whatever its file name."""
        self._push_host_writes()
        self._net.copy_from(str(path), hdf5=True)

    def save(self, path: PathLike) -> None:
        self._push_host_writes()
        self._net.save(str(path))

    def save_hdf5(self, path: PathLike) -> None:
        self._push_host_writes()
        self._net.save_hdf5(str(path))

    def share_with(self, other: Net) -> None:
        """Use `other`'s parameters in the layers of the same name (as a solver's test nets do)."""
        self._push_host_writes()
        other._push_host_writes()
        self._net.share_trained_layers_with(other._net)

    # ---- internals -------------------------------------------------------------------------------
    def _position(self, layer: str | None, default: int) -> int:
        return default if layer is None else self._net.layer_index(layer)

    def _write_batch(self, arrays: Arrays, expected: list[str], what: str,
                     target: Callable[[str], np.ndarray]) -> None:
        """Write keyword arrays into the blobs, which must be exactly the net's inputs (or outputs),
        each of the blob's batch size, as pycaffe requires."""
        if set(arrays) != set(expected):
            raise NetError(f"the {what} arrays given ({', '.join(sorted(arrays))}) are not the net's {what}s "
                           f"({', '.join(expected) or 'none'})")
        for name, value in arrays.items():
            blob = target(name)
            value = np.asarray(value)
            if value.ndim == 0 or blob.ndim == 0 or value.shape[0] != blob.shape[0]:
                raise NetError(f"{what} '{name}': an array of shape {value.shape} for a blob of shape {blob.shape}: "
                               "not of the blob's batch size (reshape the blob first)")
            blob[...] = value

    def _run_batches(self, feeds: Arrays, seeds: Arrays, blobs: Sequence[str] | None, diffs: Sequence[str] | None,
                     with_backward: bool) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        """pycaffe's batching: items cut into batches of the net's batch size (the first blob's), the
        last padded with zeros; each batch's results copied, joined, and cut back to the item count."""
        count = _item_count({**feeds, **seeds})
        size = next(iter(self.blobs.values())).shape[0]
        data: dict[str, list[np.ndarray]] = {}
        grads: dict[str, list[np.ndarray]] = {}
        for begin in range(0, count, size):
            out = self.forward(blobs=blobs, **_batch(feeds, begin, size))
            for name, value in out.items():
                data.setdefault(name, []).append(value.copy())
            if with_backward:
                for name, value in self.backward(diffs=diffs, **_batch(seeds, begin, size)).items():
                    grads.setdefault(name, []).append(value.copy())
        return _joined(data, count), _joined(grads, count)

    def _sync(self) -> None:
        """After a forward and backward run outside this wrapper (a solver's iteration), show that
        run's data and diffs, as Caffe's blobs would hold them."""
        current = self._net.blob_data
        if current is self._seen_blobs:
            return
        self._seen_blobs = current
        self._copies.discard()  # copies of the tensors before that run are stale
        self._net.adopt_autograd_diffs()

    def _push_host_writes(self) -> None:
        """Before the net runs: what the caller wrote into host copies goes into the tensors."""
        self._sync()
        self._copies.write_back()

    def _data_array(self, name: str) -> np.ndarray:
        self._sync()
        return self._copies.array(self._net.blob_tensor(name))

    def _diff_array(self, name: str) -> np.ndarray:
        self._sync()
        return self._copies.array(self._net.diff_tensor(name))

    def _shape_blob(self, blob: NetBlob, shape: Sequence[int]) -> None:
        """Blob `blob` of this net holds zeros of `shape` (a layer's Reshape through pycaffe)."""
        if blob._owner is not self:
            raise NetError(f"blob '{blob._name}' is a blob of another net")
        self._push_host_writes()
        self._net.blob_data[blob._name] = torch.zeros(tuple(shape), device=self._net.device)

    def _reshape_input(self, name: str, shape: tuple[int, ...]) -> None:
        if name not in self._net.feedable:
            raise NetError(f"blob '{name}' is not a net input; only inputs can be reshaped")
        self._push_host_writes()
        self._net.feed(name, torch.zeros(shape, device=self._net.device))


def _constructor_arguments(args: tuple, keywords: dict[str, object]) -> dict[str, object]:
    """pycaffe's two constructors' positional forms: (phase, level, stages, weights) and the legacy
    (weights, phase), told apart by a file name (or None) first."""
    legacy = len(args) == 2 and (args[0] is None or isinstance(args[0], (str, os.PathLike)))
    names = ("weights", "phase") if legacy else ("phase", "level", "stages", "weights")
    if len(args) > len(names):
        raise TypeError("Net(file, phase, level=0, stages=None, weights=None) or Net(file, weights, phase)")
    defaults = {"phase": None, "level": 0, "stages": None, "weights": None}
    merged = dict(keywords)
    for name, value in zip(names, args):
        if keywords[name] != defaults[name]:
            raise TypeError(f"Net() got multiple values for argument '{name}'")
        merged[name] = value
    return merged


def _item_count(arrays: Arrays) -> int:
    lengths = {name: len(value) for name, value in arrays.items()}
    if not lengths:
        raise NetError("forward_all/forward_backward_all need arrays (blob name=array) to batch")
    if len(set(lengths.values())) > 1:
        raise NetError(f"the arrays to batch differ in length: {lengths}")
    return next(iter(lengths.values()))


def _batch(arrays: Arrays, begin: int, size: int) -> dict[str, np.ndarray]:
    """Items begin..begin+size of each array, zero-padded to `size` items at the end."""
    batch = {}
    for name, value in arrays.items():
        items = np.asarray(value[begin:begin + size])
        if len(items) < size:
            items = np.concatenate([items, np.zeros((size - len(items),) + items.shape[1:], items.dtype)])
        batch[name] = items
    return batch


def _joined(parts: dict[str, list[np.ndarray]], count: int) -> dict[str, np.ndarray]:
    return {name: np.concatenate(arrays)[:count] for name, arrays in parts.items()}
