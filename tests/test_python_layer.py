"""The Python layer against pycaffe's contract: param_str and phase, forward/backward through a net,
in-place blobs, propagate_down, a learnable blob trained by the solver (Caffe's SGD written out here),
a Python data layer whose tops change shape, the module found beside the net file, and errors.

The layer classes below are what a user writes; the nets name them as module `tests.test_python_layer`."""

from __future__ import annotations

import json
import sys
import uuid

import numpy as np
import pytest
import torch
from google.protobuf import text_format

from rloss.errors import LayerError, NetError
from rloss.layers.python_layer import PythonLayerBase
from rloss.net import Net
from rloss.proto import caffe_pb2
from rloss.solver import Solver
from tests.helpers import layer_from_text

MODULE = __name__


class MultiplyLayer(PythonLayerBase):
    """top = k * bottom, k read from param_str (pycaffe's test_python_layer_with_param_str)."""

    def setup(self, bottom, top):
        self.k = float(self.param_str)

    def reshape(self, bottom, top):
        top[0].reshape(*bottom[0].data.shape)

    def forward(self, bottom, top):
        top[0].data[...] = self.k * bottom[0].data

    def backward(self, top, propagate_down, bottom):
        bottom[0].diff[...] = self.k * top[0].diff


class DoubleInPlaceLayer(PythonLayerBase):
    """Doubles its blob in place: correct only if top and bottom are one blob, data and diff."""

    def reshape(self, bottom, top):
        top[0].reshape(*bottom[0].shape)

    def forward(self, bottom, top):
        top[0].data[...] *= 2

    def backward(self, top, propagate_down, bottom):
        bottom[0].diff[...] *= 2


class WeightedSumLayer(PythonLayerBase):
    """top = a + 3 b; remembers the propagate_down it was given."""

    def reshape(self, bottom, top):
        top[0].reshape(*bottom[0].shape)

    def forward(self, bottom, top):
        top[0].data[...] = bottom[0].data + 3 * bottom[1].data

    def backward(self, top, propagate_down, bottom):
        self.seen = list(propagate_down)
        for blob, weight, wanted in zip(bottom, (1.0, 3.0), propagate_down):
            if wanted:
                blob.diff[...] = weight * top[0].diff


class PhaseLayer(PythonLayerBase):
    def reshape(self, bottom, top):
        top[0].reshape()

    def forward(self, bottom, top):
        top[0].data[()] = self.phase


class VaryingImageData(PythonLayerBase):
    """A data layer as FCN's voc_layers.py: param_str is JSON, reshape shapes the tops for the next
    sample, forward fills them and moves on."""

    def setup(self, bottom, top):
        if bottom:
            raise ValueError("a data layer takes no bottoms")
        params = json.loads(self.param_str)
        self.sizes, self.channels, self.index = params["sizes"], params["channels"], 0

    def reshape(self, bottom, top):
        height, width = self.sizes[self.index % len(self.sizes)]
        top[0].reshape(1, self.channels, height, width)
        top[1].reshape(1, 1, height, width)

    def forward(self, bottom, top):
        top[0].data[...] = expected_image(self.index, top[0].shape)
        top[1].data[...] = self.index
        self.index += 1


def expected_image(index: int, shape) -> np.ndarray:
    return np.arange(np.prod(shape), dtype=np.float32).reshape(shape) - 4.0 * index


class UnshapedLayer(PythonLayerBase):
    def forward(self, bottom, top):
        pass


class RaisingLayer(PythonLayerBase):
    """Raises in the method named by param_str."""

    def setup(self, bottom, top):
        self.fail("setup")

    def reshape(self, bottom, top):
        top[0].reshape(*bottom[0].shape)

    def forward(self, bottom, top):
        self.fail("forward")
        top[0].data[...] = bottom[0].data

    def backward(self, top, propagate_down, bottom):
        self.fail("backward")

    def fail(self, method: str) -> None:
        if self.param_str == method:
            raise KeyError(f"failing in {method}")


class WrongShapeLayer(PythonLayerBase):
    def reshape(self, bottom, top):
        top[0].reshape(*bottom[0].shape)

    def forward(self, bottom, top):
        top[0].data[...] = np.zeros(7)


class LateBlobLayer(PythonLayerBase):
    def reshape(self, bottom, top):
        top[0].reshape(*bottom[0].shape)

    def forward(self, bottom, top):
        self.blobs.add_blob(2)


class TupleReshapeLayer(PythonLayerBase):
    def reshape(self, bottom, top):
        top[0].reshape(bottom[0].shape)


class NotALayer:
    pass


# ---- helpers --------------------------------------------------------------------------------------

def layer_body(name: str, cls: str, bottoms=("x",), tops=("y",), param_str: str = "", extra: str = "",
               module: str = MODULE) -> str:
    """The inside of a Python `layer { ... }`."""
    wiring = " ".join([f'bottom: "{b}"' for b in bottoms] + [f'top: "{t}"' for t in tops])
    return (f'name: "{name}" type: "Python" {wiring} {extra} python_param {{ module: "{module}" '
            f'layer: "{cls}" param_str: {json.dumps(param_str)} }}')


def python_layer(*args, **kwargs) -> str:
    return f"layer {{ {layer_body(*args, **kwargs)} }} "


def build(text: str, phase: int = caffe_pb2.TRAIN, source: str = "test.prototxt") -> Net:
    return Net(text_format.Parse(text, caffe_pb2.NetParameter()), phase, source=source)


def net_with_input(shape, layers: str, inputs=("x",)) -> Net:
    head = 'name: "py" force_backward: true ' + " ".join(
        f'input: "{name}" input_shape {{ {" ".join(f"dim: {d}" for d in shape)} }}' for name in inputs)
    net = build(head + " " + layers)
    net.keep_blob_diffs = True
    return net


def single_layer(cls: str, shapes=((2, 3),), param_str: str = "", tops=("y",)):
    return layer_from_text(layer_body("p", cls, [f"b{i}" for i in range(len(shapes))], tops, param_str), shapes)


@pytest.fixture
def fresh_module_name():
    """A module name no test imported before (the import system caches modules by name)."""
    name = f"beside_{uuid.uuid4().hex}"
    yield name
    sys.modules.pop(name, None)


class CountingScaleLayer(PythonLayerBase):
    """top = w * bottom with one learnable blob w of the bottom's width; counts its setups."""

    def setup(self, bottom, top):
        self.setups = getattr(self, "setups", 0) + 1
        self.blobs.add_blob(bottom[0].shape[-1])
        self.blobs[0].data[...] = 2.0

    def reshape(self, bottom, top):
        top[0].reshape(*bottom[0].shape)

    def forward(self, bottom, top):
        top[0].data[...] = self.setups * bottom[0].data * self.blobs[0].data


def test_pycaffe_layer_setup_runs_again_on_the_same_instance_and_keeps_the_blobs(tmp_path):
    from rloss import caffe
    path = tmp_path / "count.prototxt"
    path.write_text('name: "count" input: "x" input_shape { dim: 2 dim: 3 } '
                    + python_layer("count", "CountingScaleLayer", ["x"], ["y"]))
    net = caffe.Net(str(path), caffe.TEST)
    layer = net.layer_dict["count"]
    layer.blobs[0].data[...] = [1.0, -1.0, 0.5]  # as trained: a second setup must not fill it again
    layer.setup([net.blobs["x"]], [net.blobs["y"]])
    np.testing.assert_array_equal(layer.blobs[0].data, [1.0, -1.0, 0.5])
    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    np.testing.assert_allclose(net.forward(x=x)["y"], 2 * x * [1.0, -1.0, 0.5])  # setups == 2: one instance
    net.blobs["x"].reshape(2, 4)
    with pytest.raises(LayerError, match=r"need parameter blobs of shapes \[\(4,\)\], the layer's are \[\(3,\)\]"):
        layer.setup([net.blobs["x"]], [net.blobs["y"]])


# ---- forward and backward -------------------------------------------------------------------------

def test_multiply_layers_forward_and_backward_through_a_net():
    net = net_with_input((2, 3, 4), python_layer("mul10", "MultiplyLayer", ["x"], ["a"], "10")
                         + python_layer("mul2", "MultiplyLayer", ["a"], ["b"], "-2.5"))
    rng = np.random.RandomState(0)
    x, d = rng.randn(2, 3, 4).astype(np.float32), rng.randn(2, 3, 4).astype(np.float32)
    net.forward({"x": torch.from_numpy(x)})
    assert net.blob_shapes["b"] == (2, 3, 4)
    np.testing.assert_allclose(net.blob_data["b"].detach().numpy(), -25.0 * x, rtol=1e-6)
    net.backward_from({"b": torch.from_numpy(d)})
    np.testing.assert_allclose(net.blob_diff("x").numpy(), -25.0 * d, rtol=1e-6)
    np.testing.assert_allclose(net.blob_diff("a").numpy(), -2.5 * d, rtol=1e-6)


def test_the_round_trip_passes_a_float64_gradient_check():
    layer = single_layer("MultiplyLayer", [(3, 2)], "1.75").double()
    x = torch.randn(3, 2, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda value: layer(value)[0], (x,))
    assert layer(x)[0].dtype == torch.float64


def test_in_place_top_and_bottom_are_one_blob():
    net = net_with_input((4,), python_layer("m", "MultiplyLayer", ["x"], ["y"], "3")
                         + python_layer("double", "DoubleInPlaceLayer", ["y"], ["y"]))
    x, d = np.array([1, -2, 3, 0.5], np.float32), np.array([1, 2, -1, 4], np.float32)
    net.forward({"x": torch.from_numpy(x)})
    np.testing.assert_allclose(net.blob_data["y"].detach().numpy(), 6 * x)
    net.backward_from({"y": torch.from_numpy(d)})
    np.testing.assert_allclose(net.blob_diff("x").numpy(), 6 * d)


def test_propagate_down_reaches_the_users_backward():
    layers = python_layer("sum", "WeightedSumLayer", ["a", "b"], ["y"], extra="propagate_down: true "
                          "propagate_down: false")
    net = net_with_input((2, 2), layers, inputs=("a", "b"))
    a, b, d = (np.random.RandomState(i).randn(2, 2).astype(np.float32) for i in range(3))
    net.forward({"a": torch.from_numpy(a), "b": torch.from_numpy(b)})
    np.testing.assert_allclose(net.blob_data["y"].detach().numpy(), a + 3 * b, rtol=1e-6)
    net.backward_from({"y": torch.from_numpy(d)})
    assert net.layers[0].user.seen == [True, False]
    np.testing.assert_allclose(net.blob_diff("a").numpy(), d)
    assert not net.blob_diff("b").numpy().any()


@pytest.mark.parametrize("phase", [caffe_pb2.TRAIN, caffe_pb2.TEST])
def test_phase_is_the_nets(phase):
    net = build('name: "p" ' + python_layer("phase", "PhaseLayer", [], ["phase"]), phase)
    net.forward()
    assert net.blob_shapes["phase"] == () and float(net.blob_data["phase"]) == phase


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_tops_and_gradients_stay_on_the_bottoms_device():
    layer = single_layer("MultiplyLayer", [(2, 3)], "2").cuda()
    x = torch.randn(2, 3, device="cuda", requires_grad=True)
    (y,) = layer(x)
    y.backward(torch.ones_like(y))
    assert y.device == x.device == x.grad.device
    torch.testing.assert_close(y, 2 * x.detach())
    torch.testing.assert_close(x.grad, torch.full_like(x, 2.0))


# ---- a Python data layer --------------------------------------------------------------------------

def test_python_data_layer_tops_change_shape_every_forward():
    sizes = [[2, 3], [4, 1], [3, 5]]
    layers = (python_layer("data", "VaryingImageData", [], ["data", "label"],
                           json.dumps({"sizes": sizes, "channels": 2}))
              + 'layer { name: "relu" type: "ReLU" bottom: "data" top: "rectified" } ')
    net = build('name: "d" ' + layers)
    assert net.blob_shapes["data"] == (1, 2, 2, 3) and net.blob_shapes["label"] == (1, 1, 2, 3)
    for index in range(4):
        net.forward()
        height, width = sizes[index % 3]
        image = expected_image(index, (1, 2, height, width))
        np.testing.assert_array_equal(net.blob_data["data"].numpy(), image)
        np.testing.assert_array_equal(net.blob_data["rectified"].numpy(), np.maximum(image, 0))
        np.testing.assert_array_equal(net.blob_data["label"].numpy(), np.full((1, 1, height, width), index))


# ---- a learnable blob and the solver --------------------------------------------------------------

FIT_MODULE = '''
import json
import numpy as np
from rloss.layers.python_layer import PythonLayerBase


class FitLoss(PythonLayerBase):
    """loss = 0.5 * sum over the batch of sum((w * x - t)^2), w a learnable blob, t from param_str."""

    def setup(self, bottom, top):
        params = json.loads(self.param_str)
        self.target = np.array(params["target"], np.float32)
        self.blobs.add_blob(*self.target.shape)
        self.blobs[0].data[...] = params["start"]

    def reshape(self, bottom, top):
        top[0].reshape(1)

    def forward(self, bottom, top):
        self.residual = self.blobs[0].data * bottom[0].data - self.target
        top[0].data[0] = 0.5 * np.sum(self.residual ** 2)

    def backward(self, top, propagate_down, bottom):
        self.seen = list(propagate_down)
        self.blobs[0].diff[...] = top[0].diff[0] * (self.residual * bottom[0].data).sum(axis=0)
'''


def write_fit_net(folder, module: str):
    """fit.prototxt (a batch of 2 x = 2 from DummyData, the FitLoss layer with lr_mult 2) and its module beside it."""
    (folder / f"{module}.py").write_text(FIT_MODULE)
    net = folder / "fit.prototxt"
    net.write_text(
        'name: "fit" layer { name: "x" type: "DummyData" top: "x" dummy_data_param { shape { dim: 2 dim: 3 } '
        'data_filler { type: "constant" value: 2 } } } '
        + python_layer("fit", "FitLoss", ["x"], ["loss"], json.dumps({"target": [1.0, 3.0, -2.0], "start": 0.5}),
                       "loss_weight: 1 param { lr_mult: 2 }", module))
    return net


def test_a_learnable_blob_follows_caffes_sgd(tmp_path, fresh_module_name, monkeypatch):
    monkeypatch.delenv("RLOSS_SKIP_MEMORY_CHECK", raising=False)  # its trial nets run the layer too
    net = write_fit_net(tmp_path, fresh_module_name)
    x = np.full(3, 2.0)
    solver_file = tmp_path / "solver.prototxt"
    solver_file.write_text(f'net: "{net}"\nbase_lr: 0.1\nlr_policy: "fixed"\nmomentum: 0.9\nweight_decay: 0.01\n'
                           f'max_iter: 3\ndisplay: 0\nsolver_mode: CPU\nsnapshot_prefix: "{tmp_path / "snap"}"\n')
    solver = Solver(solver_file)
    solver.step(3)
    w, history, target = np.full(3, 0.5), np.zeros(3), np.array([1.0, 3.0, -2.0])
    for _ in range(3):  # Caffe's SGD: g = dL/dw + decay * w; h = momentum * h + lr * lr_mult * g; w -= h
        gradient = 2 * (w * x - target) * x + 0.01 * w  # two equal rows in the batch
        history = 0.9 * history + 0.1 * 2 * gradient
        w = w - history
    (parameter,) = solver.net.params["fit"]
    np.testing.assert_allclose(parameter.detach().numpy(), w, rtol=1e-5)
    assert solver.net.layers[1].user.seen == [False]  # DummyData needs no gradient


def test_add_blob_outside_setup_is_an_error():
    layer = single_layer("LateBlobLayer", [(3,)])
    with pytest.raises(LayerError, match=r"LateBlobLayer.forward raised RuntimeError: add_blob is for setup"):
        layer(torch.zeros(3))


def test_stored_blob_values_and_the_solver_see_the_same_parameter(tmp_path, fresh_module_name):
    net_file = write_fit_net(tmp_path, fresh_module_name)
    net = Net.from_prototxt(net_file, caffe_pb2.TRAIN)
    (parameter,) = net.params["fit"]
    np.testing.assert_array_equal(parameter.detach().numpy(), np.full(3, 0.5, np.float32))  # written in setup
    assert net.learnable[0].lr_mult == 2
    saved = net.to_proto()
    with torch.no_grad():
        parameter.fill_(-7)
    net.forward()  # the user's code sees the parameter as it is now
    np.testing.assert_allclose(net.layers[1].user.blobs[0].data, np.full(3, -7))
    net.copy_from(saved)
    np.testing.assert_array_equal(parameter.detach().numpy(), np.full(3, 0.5, np.float32))


# ---- finding the module ---------------------------------------------------------------------------

def test_the_module_is_found_beside_the_net_file_only(tmp_path, fresh_module_name):
    net_file = write_fit_net(tmp_path, fresh_module_name)
    with pytest.raises(NetError, match=f"no module '{fresh_module_name}' on sys.path"):
        build(net_file.read_text(), source="<net>")
    net = Net.from_prototxt(net_file, caffe_pb2.TRAIN)
    assert str(tmp_path) not in sys.path
    assert net.layers[1].user.blobs[0].shape == (3,)


# ---- errors ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("text, message", [
    ('name: "p" type: "Python" bottom: "x" top: "y" python_param { layer: "MultiplyLayer" }',
     "python_param needs a module and a layer"),
    ('name: "p" type: "Python" bottom: "x" top: "y" python_param { module: "no_such_module_rloss" layer: "L" }',
     "no module 'no_such_module_rloss' on sys.path"),
    (f'name: "p" type: "Python" bottom: "x" top: "y" python_param {{ module: "{MODULE}" layer: "Missing" }}',
     r"has no 'Missing'; its Python layer classes: .*MultiplyLayer"),
    (f'name: "p" type: "Python" bottom: "x" top: "y" python_param {{ module: "{MODULE}" layer: "NotALayer" }}',
     "is not a subclass of caffe.Layer"),
    (f'name: "p" type: "Python" bottom: "x" top: "y" python_param {{ module: "{MODULE}" layer: "UnshapedLayer" }}',
     r"never shaped top 0 \('y'\): its setup or reshape must call top\[0\].reshape"),
    (f'name: "p" type: "Python" bottom: "x" top: "y" python_param {{ module: "{MODULE}" '
     'layer: "TupleReshapeLayer" }', r"TupleReshapeLayer.reshape raised TypeError: the dims must be ints"),
])
def test_construction_errors(text, message):
    with pytest.raises(LayerError, match=message):
        layer_from_text(text, [(2, 3)])


def test_an_exception_in_setup_names_the_class_and_keeps_its_cause():
    with pytest.raises(LayerError, match=r"RaisingLayer.setup raised KeyError: 'failing in setup' \(at .*"
                                         r"test_python_layer.py:\d+, in fail\)") as caught:
        single_layer("RaisingLayer", param_str="setup")
    assert isinstance(caught.value.__cause__, KeyError)
    with pytest.raises(NetError, match="RaisingLayer.setup raised KeyError"):
        net_with_input((2, 3), python_layer("p", "RaisingLayer", param_str="setup"))


def test_exceptions_in_forward_and_backward_keep_their_cause():
    net = net_with_input((2, 3), python_layer("p", "RaisingLayer", param_str="forward"))
    with pytest.raises(LayerError, match="layer 'p' .*RaisingLayer.forward raised KeyError") as caught:
        net.forward()
    assert isinstance(caught.value.__cause__, KeyError)
    layer = single_layer("RaisingLayer", param_str="backward")
    x = torch.zeros(2, 3, requires_grad=True)
    (y,) = layer(x)
    with pytest.raises(LayerError, match="RaisingLayer.backward raised KeyError") as caught:
        y.sum().backward()
    assert isinstance(caught.value.__cause__, KeyError)


def test_a_missing_backward_and_a_top_of_the_wrong_shape_are_errors():
    x = torch.zeros(2, 3, requires_grad=True)
    (y,) = single_layer("PhaseLayer", [(2, 3)])(x)
    with pytest.raises(LayerError, match="PhaseLayer.backward raised NotImplementedError: PhaseLayer defines no "
                                         "backward"):
        y.sum().backward()
    with pytest.raises(LayerError, match="WrongShapeLayer.forward raised ValueError"):
        single_layer("WrongShapeLayer")(torch.zeros(2, 3))
