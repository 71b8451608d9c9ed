"""A pycaffe-like face over `rloss.net.Net`, so Caffe users' scripts run with only the import changed:

    from rloss import caffe
    net = caffe.Net("deploy.prototxt", "weights.caffemodel", caffe.TEST)
    net.blobs["data"].data[...] = image
    out = net.forward()
    net.backward()
    net.params["conv1"][0].diff

    solver = caffe.SGDSolver("solver.prototxt")
    solver.net.copy_from("init.caffemodel")
    solver.step(1)
    solver.net.blobs["fc8_interp"].diff      # that iteration's gradient

Blob data and diffs are numpy arrays that share memory with the net's tensors where Caffe's do
(inputs, parameters), so writing into them changes what the net computes, as in pycaffe.
`${VAR}` placeholders in prototxt files take the `values=` keyword (an rloss extension), then the
run script's variables from the environment, then its defaults (`rloss.variables`). As in pycaffe, the device
is the one chosen with set_mode_cpu/set_mode_gpu (the solver file's solver_mode is not used).
`precision="bf16"` (or "fp16"; rloss.precision) runs a Net or a solver's nets under torch.autocast, the
weights kept float32; blobs autocast computed in bf16 show as float32 copies. `SGDSolver` also takes
`checkpoint_activations=True` (it has no effect on the solver's own net while pycaffe shows every blob's
diff, which needs every activation kept).
"""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path
from typing import Mapping, Union

import numpy as np
import torch

from rloss.errors import NetError
from rloss.net import Net as _Net
from rloss.precision import to_float32
from rloss.proto import caffe_pb2
from rloss.solver import SGDSolver as _SGDSolver
from rloss.variables import variable_values

TRAIN = caffe_pb2.TRAIN
TEST = caffe_pb2.TEST
_device = {"type": "cpu", "index": 0}


def set_mode_cpu() -> None:
    """Run nets built afterwards on the CPU."""
    _device["type"] = "cpu"


def set_mode_gpu() -> None:
    """Run nets built afterwards on CUDA (device from set_device); falls back to the CPU if absent."""
    _device["type"] = "cuda"


def set_device(index: int) -> None:
    _device["index"] = int(index)


def current_device() -> torch.device:
    if _device["type"] == "cuda" and torch.cuda.is_available():
        return torch.device("cuda", _device["index"])
    return torch.device("cpu")


class Blob:
    """A named blob: `.data` and `.diff` as numpy arrays (N, C, H, W)."""

    def __init__(self, owner: Net, name: str):
        self._owner = owner
        self._name = name

    @property
    def data(self) -> np.ndarray:
        return self._owner._data_array(self._name)

    @data.setter
    def data(self, value) -> None:
        self.data[...] = value

    @property
    def diff(self) -> np.ndarray:
        return self._owner._diff_array(self._name)

    @diff.setter
    def diff(self, value) -> None:
        self.diff[...] = value

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.data.shape)

    @property
    def count(self) -> int:
        return int(np.prod(self.shape))

    def _axis(self, index: int) -> int:
        shape = self.shape
        return shape[index] if len(shape) > index else 1

    num = property(lambda self: self._axis(0))
    channels = property(lambda self: self._axis(1))
    height = property(lambda self: self._axis(2))
    width = property(lambda self: self._axis(3))

    def reshape(self, *shape: int) -> None:
        """Give an input blob a new shape (its values become zeros), as pycaffe's Blob.reshape."""
        self._owner._reshape_input(self._name, tuple(int(s) for s in shape))


class Param:
    """One parameter blob of a layer: `.data` (shares memory with the weights) and `.diff`."""

    def __init__(self, tensor: torch.nn.Parameter):
        self._tensor = tensor

    @property
    def data(self) -> np.ndarray:
        return _numpy_view(self._tensor.data)

    @data.setter
    def data(self, value) -> None:
        self.data[...] = value

    @property
    def diff(self) -> np.ndarray:
        if self._tensor.grad is None:
            self._tensor.grad = torch.zeros_like(self._tensor)
        return _numpy_view(self._tensor.grad)

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self._tensor.shape)

    @property
    def count(self) -> int:
        return self._tensor.numel()


class Layer:
    """One layer of a net, as pycaffe shows it: `.type` and `.blobs` (its parameters); also `.param`,
    its LayerParameter (an rloss addition: pycaffe scripts re-read the prototxt for that)."""

    def __init__(self, layer):
        self._layer = layer

    @property
    def type(self) -> str:
        return self._layer.param.type

    @property
    def param(self) -> caffe_pb2.LayerParameter:
        return self._layer.param

    @property
    def blobs(self) -> list[Param]:
        return [Param(p) for p in self._layer.blobs]


def _numpy_view(tensor: torch.Tensor) -> np.ndarray:
    """Shares memory on the CPU; a copy for CUDA tensors (pycaffe's GPU blobs are also synced copies)
    and for bf16/fp16 blobs (a float32 copy: numpy has no bfloat16)."""
    tensor = to_float32(tensor.detach())
    return tensor.numpy() if tensor.device.type == "cpu" else tensor.cpu().numpy()


class Net:
    """pycaffe's `caffe.Net(model, [weights], phase)`; also accepts `weights=` and `phase=` keywords, and
    `precision=` (fp32, bf16, fp16)."""

    def __init__(self, model: Union[str, Path], *args, weights: str | None = None, phase: int | None = None,
                 values: Mapping[str, str] | None = None, precision: str = "fp32"):
        if len(args) == 1:
            phase = args[0] if phase is None else phase
        elif len(args) == 2:
            weights, phase = args
        elif len(args) > 2:
            raise TypeError("Net(model, [weights], phase)")
        if phase not in (TRAIN, TEST):
            raise NetError(f"Net({model!r}): phase must be caffe.TRAIN or caffe.TEST")
        merged, defaults = variable_values(values or {}, Path(model))
        net = _Net.from_prototxt(model, phase, values=merged, defaults=defaults)
        net.to(current_device())
        net.precision = precision
        self._attach(net)
        if weights:
            self.copy_from(weights)

    @classmethod
    def _wrap(cls, net: _Net) -> Net:
        """Wrap an already built net (the solver's) without rebuilding it."""
        self = cls.__new__(cls)
        self._attach(net)
        return self

    def _attach(self, net: _Net) -> None:
        self._net = net
        net.keep_blob_diffs = True
        self._diffs: dict[str, np.ndarray] = {}
        self._overwritten: set[str] = set()
        self._seen_blobs: dict | None = None  # the net's blobs when this wrapper last looked at them
        self._seed_loss_diffs()
        self.blobs: OrderedDict[str, Blob] = OrderedDict((name, Blob(self, name)) for name in self._blob_names())

    @property
    def params(self) -> OrderedDict[str, list[Param]]:
        """Per layer, its parameter blobs (read at each access: a solver's test nets take the train
        net's parameters when they are tested)."""
        return OrderedDict((layer, [Param(p) for p in blobs]) for layer, blobs in self._net.params.items())

    # ---- pycaffe API ------------------------------------------------------------------------
    @property
    def inputs(self) -> list[str]:
        return self._net.feedable

    @property
    def outputs(self) -> list[str]:
        return list(self._net.outputs)

    @property
    def layers(self) -> list[Layer]:
        return [Layer(layer) for layer in self._net.layers]

    @property
    def _layer_names(self) -> list[str]:
        return self._net.layer_names()

    @property
    def top_names(self) -> OrderedDict:
        return OrderedDict((n, self._net.layer_tops(n)) for n in self._net.layer_names())

    @property
    def bottom_names(self) -> OrderedDict:
        return OrderedDict((n, self._net.layer_bottoms(n)) for n in self._net.layer_names())

    def forward(self, blobs: list[str] | None = None, **inputs) -> dict[str, np.ndarray]:
        """Run the net; keyword arguments set input blobs first. Returns the output blobs' data."""
        self._feed_overwritten_inputs()
        for name, value in inputs.items():
            self.blobs[name].data[...] = value
        self._loss = self._net.forward()
        self._seen_blobs = self._net.blob_data
        self._note_in_place_inputs()
        return {name: self.blobs[name].data for name in list(self.outputs) + list(blobs or [])}

    def backward(self, diffs: list[str] | None = None, **output_diffs) -> dict[str, np.ndarray]:
        """Back-propagate from the diffs the output blobs hold (loss tops hold their loss weight);
        keyword arguments set output diffs first. Returns the input blobs' diffs."""
        self._sync()
        for name, value in output_diffs.items():
            self.blobs[name].diff[...] = value
        seeds = {name: torch.from_numpy(self._diff_array(name)) for name in self.outputs}
        for name, weight in self._net.loss_top_names():
            seeds.setdefault(name, torch.full(self._net.blob_data[name].shape, weight))
        self._net.backward_from(seeds)
        for name in self.blobs:
            # a seeded blob keeps its diff unless in-place layers rewrote it (then, as in Caffe, the
            # shared diff ends as the gradient of the chain's first input)
            if name not in seeds or self._net.is_rewritten_in_place(name):
                self._diffs[name] = self._net.blob_diff(name).detach().cpu().numpy()
        return {name: self.blobs[name].diff for name in list(self.inputs) + list(diffs or [])}

    def copy_from(self, path: Union[str, Path]) -> None:
        self._net.copy_from(str(path))

    def save(self, path: Union[str, Path]) -> None:
        self._net.save(str(path))

    def share_with(self, other: Net) -> None:
        """Use `other`'s parameters in the layers of the same name (as a solver's test nets do)."""
        self._net.share_trained_layers_with(other._net)

    def reshape(self) -> None:
        """Shapes follow the inputs at every forward; kept for pycaffe compatibility."""

    # ---- internals --------------------------------------------------------------------------
    def _blob_names(self) -> list[str]:
        return [name for name in self._net.blob_shapes if not name.startswith("(")]

    def _seed_loss_diffs(self) -> None:
        for name, weight in self._net.loss_top_names():
            if not name.startswith("("):
                self._diffs[name] = np.full(self._net.blob_shapes[name], weight, dtype=np.float32)

    def _sync(self) -> None:
        """After a forward and backward run outside this wrapper (a solver's step), show that run's
        data and diffs, as Caffe's blobs would hold them."""
        current = self._net.blob_data
        if current is self._seen_blobs or not current:
            return
        self._seen_blobs = current
        self._note_in_place_inputs()
        loss_weights = dict(self._net.loss_top_names())
        self._diffs = {name: self._solver_diff(name, loss_weights.get(name)) for name in self.blobs}

    def _solver_diff(self, name: str, loss_weight: float | None) -> np.ndarray:
        """A blob's diff after the last backward; a loss top holds its loss weight (as in Caffe) even
        when nothing was back-propagated through it."""
        diff = self._net.blob_diff(name).detach()
        if loss_weight is not None and not self._net.blob_data[name].requires_grad:
            diff = torch.full_like(diff, loss_weight)
        return diff.cpu().numpy()

    def _data_array(self, name: str) -> np.ndarray:
        self._sync()
        if name in self._net.feedable and name not in self._overwritten:
            return _numpy_view(self._net.input_tensor(name))
        value = self._net.blob_data.get(name)
        if value is None:
            return np.zeros(self._net.blob_shapes[name], dtype=np.float32)
        return _numpy_view(value)

    def _diff_array(self, name: str) -> np.ndarray:
        self._sync()
        if name not in self._diffs or self._diffs[name].shape != self._data_array(name).shape:
            self._diffs[name] = np.zeros(self._data_array(name).shape, dtype=np.float32)
        return self._diffs[name]

    def _note_in_place_inputs(self) -> None:
        """Inputs that in-place layers overwrote: their blob shows the result, and the next forward
        starts from it, as Caffe's shared blob memory does."""
        self._overwritten = {n for n in self._net.feedable if self._net.blob_data[n] is not self._net.input_tensor(n)}

    def _feed_overwritten_inputs(self) -> None:
        for name in self._overwritten:
            self._net.feed(name, self._net.blob_data[name].detach().clone())
        self._overwritten = set()

    def _reshape_input(self, name: str, shape: tuple[int, ...]) -> None:
        if name not in self._net.feedable:
            raise NetError(f"blob '{name}' is not a net input; only inputs can be reshaped")
        self._net.feed(name, torch.zeros(shape, device=self._net.device))
        self._diffs.pop(name, None)
        self._overwritten.discard(name)


class SGDSolver:
    """pycaffe's `caffe.SGDSolver(solver_prototxt)`: Caffe's SGD solver (rloss.solver) on the device of
    set_mode_cpu/set_mode_gpu, `${VAR}`s as for `Net`. `net` and `test_nets` are `Net`s over
    the solver's own nets, so after `step(n)` their blobs hold the last iteration's data and diffs
    (the weights already updated, each parameter diff holding the step taken). `precision` and
    `checkpoint_activations` go to rloss.solver.SGDSolver."""

    def __init__(self, solver_file: Union[str, Path], values: Mapping[str, str] | None = None,
                 precision: str = "fp32", checkpoint_activations: bool = False):
        self._solver = _SGDSolver(str(solver_file), values=values, device=current_device(), precision=precision,
                                  checkpoint_activations=checkpoint_activations)
        self.net = Net._wrap(self._solver.net)
        self.test_nets = [Net._wrap(net) for net in self._solver.test_nets]

    @property
    def iter(self) -> int:
        return self._solver.iter

    @property
    def param(self) -> caffe_pb2.SolverParameter:
        return self._solver.param

    def step(self, iterations: int) -> None:
        """`iterations` training iterations (forward, backward, update), with Caffe's display and tests."""
        self._solver.step(int(iterations))

    def solve(self, resume_file: Union[str, Path, None] = None) -> None:
        """Train to max_iter (resuming from a .solverstate if given), then snapshot and test as Caffe does."""
        self._solver.solve(str(resume_file) if resume_file else None)

    def restore(self, state_file: Union[str, Path]) -> None:
        self._solver.restore(str(state_file))

    def snapshot(self) -> None:
        """Write `<snapshot_prefix>_iter_<iter>.caffemodel` and `.solverstate`."""
        self._solver.snapshot()


def get_solver(solver_file: Union[str, Path]) -> SGDSolver:
    """pycaffe's `caffe.get_solver`: the solver of the file's type (rloss implements SGD)."""
    return SGDSolver(solver_file)
