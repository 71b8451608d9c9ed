"""The Python layer: a user's class with pycaffe's layer interface.

`layer { type: "Python" python_param { module: "my_layers" layer: "MyLayer" param_str: "..." } }` builds
`my_layers.MyLayer(layer_param)`, a subclass of `PythonLayerBase` (pycaffe's `caffe.Layer`), gives it
`param_str`, `phase` and `blobs`, and calls it as Caffe's PythonLayer does: `setup(bottom, top)` once,
`reshape(bottom, top)` at construction and before every `forward(bottom, top)`, and
`backward(top, propagate_down, bottom)`. `bottom` and `top` are lists of `PythonBlob`s (pycaffe's Blob:
numpy `data` and `diff` written in place, `reshape(*dims)`); the learnable blobs the class adds with
`self.blobs.add_blob(*shape)` are parameters of the net, which its solver updates.

The module is looked up in the folder of the net file being built (pycaffe users keep it beside the
net: `modules_beside`), then on sys.path. The user's code runs on host numpy arrays whatever the net's
device, as pycaffe's does, so this layer, unlike the others, copies its bottoms to the host and its
tops back to the bottoms' device in forward.
"""

from __future__ import annotations

import contextlib
import contextvars
import importlib
import math
import operator
import sys
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch
from torch.autograd.function import once_differentiable

from rloss.errors import LayerError
from rloss.layers.base import Layer, Shape
from rloss.layers.registry import register_layer
from rloss.proto import caffe_pb2
from rloss.proto.blob import shape_problem
from rloss.pycaffe_blob import Blob

_NUMPY_DTYPES = {torch.float32: np.float32, torch.float64: np.float64}
_net_folder: contextvars.ContextVar[Path | None] = contextvars.ContextVar("python_layer_net_folder", default=None)


@contextlib.contextmanager
def modules_beside(source: str) -> Iterator[None]:
    """While a net read from the file `source` is built, its Python layers find their module in the
    file's folder too (a `source` that names no file, such as "<net>", adds none)."""
    path = Path(source)
    token = _net_folder.set(path.resolve().parent if path.is_file() else None)
    try:
        yield
    finally:
        _net_folder.reset(token)


def _import_module(name: str, folder: Path | None):
    """Module `name`, imported with `folder` first on sys.path for the import only (the net's folder
    must not shadow other modules for the rest of the process)."""
    importlib.invalidate_caches()  # a module written after the import system last listed its folder
    if folder is None or str(folder) in sys.path:
        return importlib.import_module(name)
    sys.path.insert(0, str(folder))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(str(folder))


def _dims(dims: Sequence) -> Shape:
    """pycaffe's reshape/add_blob arguments: the dims as separate ints, each >= 0."""
    try:
        shape = tuple(operator.index(d) for d in dims)
    except TypeError:
        raise TypeError(f"the dims must be ints given one by one, as reshape(*shape); got {tuple(dims)}") from None
    problem = shape_problem(shape)
    if problem:
        raise ValueError(problem)
    return shape


def _host_copy(tensor: torch.Tensor, dtype: torch.dtype) -> np.ndarray:
    """A host numpy copy of `tensor` that the user's code may write without touching the tensor."""
    return tensor.detach().to(device="cpu", dtype=dtype, copy=True).numpy()


class PythonBlob(Blob):
    """A blob as a Python layer's code sees it (pycaffe's Blob): `data` and `diff` are numpy arrays of
    `shape`, written in place (`top[0].data[...] = x`). `reshape` to a new shape gives zeros (Caffe
    keeps the memory, its values then undefined); to the same shape it keeps the values, as Caffe."""

    def __init__(self, dtype, shape: Sequence[int] | None = None):
        self._values = np.zeros((0,), dtype)
        self._gradient: np.ndarray | None = None
        self.reshaped = False  # a top the user's code never shaped is an error, not a 0-sized blob
        if shape is not None:
            self.reshape(*shape)

    def _data(self) -> np.ndarray:
        return self._values

    def _diff(self) -> np.ndarray:
        if self._gradient is None:  # made when first asked for: most forwards never read a diff
            self._gradient = np.zeros_like(self._values)
        return self._gradient

    @property
    def shape(self) -> Shape:
        return tuple(self._values.shape)

    def reshape(self, *dims: int) -> None:
        shape = _dims(dims)
        if self.reshaped and shape == self.shape:
            return
        self._values, self._gradient, self.reshaped = np.zeros(shape, self._values.dtype), None, True

    def hold(self, data: np.ndarray, diff: np.ndarray | None = None) -> None:
        """Make the blob show these arrays (the layer's side: values in, before a call)."""
        self._values, self._gradient, self.reshaped = data, diff, True

    def cast(self, dtype) -> None:
        """Hold float64 arrays in a net moved to double (gradient checks), float32 otherwise."""
        if self._values.dtype != dtype:
            self._values, self._gradient = self._values.astype(dtype), None


class LearnableBlobs(list):
    """`self.blobs` of a user's layer: its learnable blobs. Each is a parameter of the rloss layer (so
    the solver updates it and `param { lr_mult decay_mult name }` apply), shown to each call of the
    user's code as a host copy whose changes are written back after the call."""

    def __init__(self, layer: Python):
        super().__init__()
        self._layer = layer
        self._before: list[np.ndarray] = []
        self.accepting = False  # add_blob is for setup: the net hands its parameters to the solver once

    def add_blob(self, *shape: int) -> None:
        """Add a learnable blob of `shape` (zeros, or the values a .caffemodel-built net stores)."""
        if not self.accepting:
            raise RuntimeError("add_blob is for setup only: the net's learnable blobs are fixed once it is built")
        try:
            parameter = self._layer.add_blob(_dims(shape))
        except LayerError as error:
            raise ValueError(error.message) from None
        blob = PythonBlob(np.float32)
        blob.hold(_host_copy(parameter, self._layer.host_dtype))
        self.append(blob)
        self._before.append(blob.data.copy())

    def stage(self) -> None:
        """Before a call: each blob holds its parameter's current values and a zero diff."""
        self._before = []
        for blob, parameter in zip(self, self._layer.blobs):
            blob.hold(_host_copy(parameter, self._layer.host_dtype))
            self._before.append(blob.data.copy())

    def write_back(self) -> None:
        """After a call: values the user's code changed go into the parameters."""
        for index, (blob, parameter, before) in enumerate(zip(self, self._layer.blobs, self._before)):
            if blob.shape != tuple(parameter.shape):
                raise ValueError(f"learnable blob {index} was reshaped to {blob.shape}; it is a parameter of "
                                 f"shape {tuple(parameter.shape)}")
            if not np.array_equal(blob.data, before):
                with torch.no_grad():
                    parameter.copy_(torch.from_numpy(blob.data))


class PythonLayerBase:
    """What a Python layer's class subclasses (pycaffe's `caffe.Layer`). It is built with its
    LayerParameter; before `setup` it gets `param_str` (python_param.param_str), `phase`
    (caffe.TRAIN 0 or caffe.TEST 1) and `blobs` (`LearnableBlobs`). setup and reshape do nothing
    unless overridden (every top must be shaped in one of them); forward must be written, and
    backward when a gradient flows through the layer."""

    type = "Python"

    def __init__(self, param: caffe_pb2.LayerParameter | None = None):
        self.param_str: str = param.python_param.param_str if param is not None else ""
        self.phase: int = param.phase if param is not None else caffe_pb2.TRAIN

    def setup(self, bottom: list[PythonBlob], top: list[PythonBlob]) -> None:
        """Read param_str, check the bottoms, add learnable blobs (Caffe's LayerSetUp)."""

    def reshape(self, bottom: list[PythonBlob], top: list[PythonBlob]) -> None:
        """Shape the tops for these bottoms (called before every forward)."""

    def forward(self, bottom: list[PythonBlob], top: list[PythonBlob]) -> None:
        raise NotImplementedError(f"{type(self).__name__} defines no forward")

    def backward(self, top: list[PythonBlob], propagate_down: list[bool], bottom: list[PythonBlob]) -> None:
        raise NotImplementedError(
            f"{type(self).__name__} defines no backward, and a gradient flows through it (give its bottoms "
            "propagate_down: false and its blobs lr_mult: 0, or write backward)")


@dataclass
class _Pass:
    """What one forward leaves for its backward: the host arrays its blobs held after the user's
    forward, and the (shape, dtype, device) its bottoms' gradients must have."""

    bottoms: list[np.ndarray]
    tops: list[np.ndarray]
    bottom_specs: list[tuple[torch.Size, torch.dtype, torch.device]]


class _PythonLayerFunction(torch.autograd.Function):
    """The user's forward and backward as one autograd node; its inputs are the bottoms, then the
    learnable blobs, so that the diffs the user's backward writes become their gradients."""

    @staticmethod
    def forward(ctx, layer: Python, bottom_count: int, *inputs: torch.Tensor):
        ctx.layer = layer
        ctx.run, tops = layer.run_forward(inputs[:bottom_count])
        return tuple(tops)

    @staticmethod
    @once_differentiable
    def backward(ctx, *top_diffs: torch.Tensor):
        return (None, None, *ctx.layer.run_backward(ctx.run, top_diffs, ctx.needs_input_grad[2:]))


@register_layer("Python")
class Python(Layer):
    """Caffe's PythonLayer: a user's `PythonLayerBase` subclass run on host copies of its blobs. Any
    number of bottoms and tops; a top that is also the bottom of its index (in place) is one blob for
    the user's code, as in Caffe. The tops' shapes may change at every forward (data layers written in
    Python). python_param's share_in_parallel has no effect: each data-parallel rank is a process with
    its own instance."""

    bottoms = (0, None)
    tops = (0, None)
    runs_in_float32 = True  # numpy has no bfloat16; the user's code computes in float32, as Caffe's
    recomputable = False  # the user's forward may read data or keep state

    def setup(self, bottom_shapes: list[Shape]) -> None:
        # an empty buffer: it follows module.to(...), so it tells the device and dtype of the net
        self.register_buffer("_anchor", torch.empty(0), persistent=False)
        python = self.param.python_param
        if not (python.module and python.layer):
            raise self.error("python_param needs a module and a layer (the name of the class in the module)")
        self.class_name = f"{python.module}.{python.layer}"
        self._module_file: str | None = None
        if not hasattr(self, "user"):  # pycaffe's layer.setup runs the same instance's setup again
            self.user = self._instantiate(python.module, python.layer)
        self.user.param_str = python.param_str
        self.user.phase = self.phase
        self.user.blobs = LearnableBlobs(self)
        dtype = _NUMPY_DTYPES[self.host_dtype]
        self.bottom_blobs = [PythonBlob(dtype, shape) for shape in bottom_shapes]
        self.top_blobs = [self.bottom_blobs[i] if self._in_place(i) else PythonBlob(dtype)
                          for i in range(self.num_tops)]
        self.user.blobs.accepting = True
        try:
            self._call("setup", self.bottom_blobs, self.top_blobs)
        finally:
            self.user.blobs.accepting = False

    def reshape(self, bottom_shapes: list[Shape]) -> list[Shape]:
        """Caffe's SetUp: the user's reshape on bottoms of these shapes (zeros) gives the tops' shapes."""
        for blob, shape in zip(self.bottom_blobs, bottom_shapes):
            if blob.shape != tuple(shape):
                blob.hold(np.zeros(shape, _NUMPY_DTYPES[self.host_dtype]))
        self._call("reshape", self.bottom_blobs, self.top_blobs)
        return self._top_shapes()

    def forward(self, *bottoms: torch.Tensor) -> list[torch.Tensor]:  # type: ignore[override]
        if not self.num_tops:  # nothing can depend on it: run it for what it does, outside autograd
            self.run_forward(bottoms)
            return []
        return list(_PythonLayerFunction.apply(self, len(bottoms), *bottoms, *self.blobs))

    @property
    def host_dtype(self) -> torch.dtype:
        """float64 in a net moved to double (gradient checks), else float32 (Caffe's Dtype)."""
        return torch.float64 if self._anchor.dtype == torch.float64 else torch.float32

    # ---- the round trip through the user's code -------------------------------------------------
    def run_forward(self, bottoms: Sequence[torch.Tensor]) -> tuple[_Pass, list[torch.Tensor]]:
        """The user's reshape and forward on host copies of `bottoms`; the tops on the bottoms' device."""
        dtype = self.host_dtype
        for blob, bottom in zip(self.bottom_blobs, bottoms):
            blob.hold(_host_copy(bottom, dtype))
        for blob in self.top_blobs:
            blob.cast(_NUMPY_DTYPES[dtype])
        self._call("reshape", self.bottom_blobs, self.top_blobs)
        self._top_shapes()
        self._call("forward", self.bottom_blobs, self.top_blobs)
        values = [blob.data.copy() for blob in self.top_blobs]  # the next forward writes the top blobs again
        device = bottoms[0].device if bottoms else self._anchor.device
        run = _Pass([blob.data for blob in self.bottom_blobs], values,
                    [(bottom.shape, bottom.dtype, bottom.device) for bottom in bottoms])
        return run, [torch.from_numpy(value).to(device) for value in values]

    def run_backward(self, run: _Pass, top_diffs: Sequence[torch.Tensor],
                     needs_gradient: Sequence[bool]) -> list[torch.Tensor | None]:
        """The user's backward on the blobs as `run` left them, the tops' diffs given; the gradients of
        the bottoms, then of the learnable blobs (zeros where the user's code wrote none)."""
        count = len(run.bottoms)
        for blob, data in zip(self.bottom_blobs, run.bottoms):
            blob.hold(data)
        for blob, data, diff in zip(self.top_blobs, run.tops, top_diffs):
            blob.hold(data.copy(), _host_copy(diff, self.host_dtype))  # the copy: `data` is also the CPU top
        propagate_down = [bool(need) for need in needs_gradient[:count]]
        self._call("backward", self.top_blobs, propagate_down, self.bottom_blobs)
        gradients = [self._gradient(blob.diff, spec, f"bottom {i}") if need else None
                     for i, (blob, spec, need) in enumerate(zip(self.bottom_blobs, run.bottom_specs, propagate_down))]
        for j, (blob, parameter, need) in enumerate(zip(self.user.blobs, self.blobs, needs_gradient[count:])):
            spec = (parameter.shape, parameter.dtype, parameter.device)
            gradients.append(self._gradient(blob.diff, spec, f"learnable blob {j}") if need else None)
        return gradients

    def _gradient(self, diff: np.ndarray, spec: tuple[torch.Size, torch.dtype, torch.device],
                  what: str) -> torch.Tensor:
        shape, dtype, device = spec
        if diff.size != math.prod(shape):
            raise self.error(f"after {self.class_name}.backward the diff of {what} has {diff.size} values, "
                             f"its blob has shape {tuple(shape)} (was the blob reshaped?)")
        return torch.from_numpy(np.array(diff)).reshape(shape).to(device, dtype)

    def _call(self, method: str, *arguments) -> None:
        """The user's `method`, its learnable blobs staged around the call; whatever it raises becomes
        a LayerError naming the class, the method, the exception and where the module raised it."""
        try:
            self.user.blobs.stage()
            getattr(self.user, method)(*arguments)
            self.user.blobs.write_back()
        except Exception as error:
            raise self.error(f"{self.class_name}.{method} raised {self._describe(error)}") from error

    def _top_shapes(self) -> list[Shape]:
        for index, blob in enumerate(self.top_blobs):
            if not blob.reshaped:
                raise self.error(f"{self.class_name} never shaped top {index} ('{self.param.top[index]}'): "
                                 f"its setup or reshape must call top[{index}].reshape(*dims)")
        return [blob.shape for blob in self.top_blobs]

    def _in_place(self, index: int) -> bool:
        return index < len(self.param.bottom) and self.param.top[index] == self.param.bottom[index]

    # ---- finding the user's class -----------------------------------------------------------------
    def _instantiate(self, module_name: str, class_name: str) -> PythonLayerBase:
        folder = _net_folder.get()
        try:
            module = _import_module(module_name, folder)
        except ModuleNotFoundError as error:
            if error.name is not None and (module_name + ".").startswith(error.name + "."):
                where = f"in {folder} (the net file's folder) or on sys.path" if folder else "on sys.path"
                raise self.error(f"no module '{module_name}' {where}") from error
            raise self.error(f"importing module '{module_name}' raised {self._describe(error)}") from error
        except Exception as error:
            raise self.error(f"importing module '{module_name}' raised {self._describe(error)}") from error
        self._module_file = getattr(module, "__file__", None)
        cls = getattr(module, class_name, None)
        if cls is None:
            found = sorted(name for name, value in vars(module).items() if _is_layer_class(value))
            raise self.error(f"module '{module_name}' ({self._module_file}) has no '{class_name}'; its Python "
                             f"layer classes: {', '.join(found) or 'none'}")
        if not _is_layer_class(cls):
            raise self.error(f"'{self.class_name}' is not a subclass of caffe.Layer "
                             "(rloss.layers.python_layer.PythonLayerBase)")
        try:
            return cls(self.param)
        except Exception as error:
            raise self.error(f"building {self.class_name} raised {self._describe(error)}") from error

    def _describe(self, error: BaseException) -> str:
        """`Type: message`, with the line of the user's module that raised it (the net drops the
        chained traceback of an error raised while it is built)."""
        text = f"{type(error).__name__}: {error}"
        frames = [frame for frame in traceback.extract_tb(error.__traceback__) if frame.filename == self._module_file]
        if frames:
            text += f" (at {frames[-1].filename}:{frames[-1].lineno}, in {frames[-1].name})"
        return text

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, layer={self.class_name}"


def _is_layer_class(value: object) -> bool:
    return isinstance(value, type) and issubclass(value, PythonLayerBase) and value is not PythonLayerBase
