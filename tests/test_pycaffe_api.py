"""The Caffe user's Python path: a pycaffe-style script (only the import changed) builds an SGDSolver
on a tiny net over a synthetic dataset, copies weights, takes one step and reads blob diffs. The test
checks those diffs and the update against numpy formulas of Caffe's layers (2.8 SoftmaxWithLoss,
4.3 ApplyUpdate), and that `caffe.Net(model, weights, caffe.TEST)` agrees with `python -m rloss test`."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from rloss import caffe
from rloss.cli.main import main
from rloss.data.synthetic import write_dataset
from rloss.errors import LayerError, NetError, SolverError
from tests.shared_data import REPO

BASE_LR, MOMENTUM, WEIGHT_DECAY = 0.01, 0.9, 0.0005
SCORE_LR_MULT = (10.0, 20.0)  # weights, bias
SCORE_DECAY_MULT = (1.0, 0.0)

NET = """name: "tiny"
layer { name: "data" type: "ImageSegData" top: "data" top: "label" top: "data_dim" include { phase: TRAIN }
  image_data_param { root_folder: "${DATA_ROOT}" source: "${DATA_ROOT}list/train.txt" label_type: PIXEL
                     batch_size: 2 shuffle: true }
  transform_param { mean_value: 104.008 mean_value: 116.669 mean_value: 122.675 crop_size: 25 mirror: true } }
layer { name: "data" type: "ImageSegData" top: "data" top: "label" top: "data_dim" include { phase: TEST }
  image_data_param { root_folder: "${DATA_ROOT}" source: "${DATA_ROOT}list/val.txt" label_type: PIXEL batch_size: 1 }
  transform_param { mean_value: 104.008 mean_value: 116.669 mean_value: 122.675 crop_size: 41 } }
layer { name: "conv1" type: "Convolution" bottom: "data" top: "conv1"
  param { lr_mult: 1 decay_mult: 1 } param { lr_mult: 2 decay_mult: 0 }
  convolution_param { num_output: 4 kernel_size: 3 pad: 1 weight_filler { type: "gaussian" std: 0.05 }
                      bias_filler { type: "constant" value: 0.1 } } }
layer { name: "relu1" type: "ReLU" bottom: "conv1" top: "conv1" }
layer { name: "score" type: "Convolution" bottom: "conv1" top: "score"
  param { lr_mult: 10 decay_mult: 1 } param { lr_mult: 20 decay_mult: 0 }
  convolution_param { num_output: 3 kernel_size: 1 weight_filler { type: "gaussian" std: 0.1 }
                      bias_filler { type: "constant" value: 0.2 } } }
layer { name: "loss" type: "SoftmaxWithLoss" bottom: "score" bottom: "label" top: "loss"
  loss_param { ignore_label: 255 } include { phase: TRAIN } }
layer { name: "accuracy" type: "SegAccuracy" bottom: "score" bottom: "label" top: "accuracy"
  seg_accuracy_param { ignore_label: 255 reset: false } include { phase: TEST } }
layer { name: "silence" type: "Silence" bottom: "data_dim" }
"""

SOLVER = f"""net: "tiny.prototxt"
test_iter: 2
test_interval: 100
base_lr: {BASE_LR}
lr_policy: "fixed"
momentum: {MOMENTUM}
weight_decay: {WEIGHT_DECAY}
display: 1
max_iter: 5
snapshot_prefix: "snap/tiny"
random_seed: 3
solver_mode: GPU
"""

# What a Caffe user writes, with `import caffe` changed to `from rloss import caffe`.
SCRIPT = """
import numpy as np
from rloss import caffe

caffe.set_mode_cpu()
init = caffe.Net("tiny.prototxt", caffe.TRAIN)
init.save("init.caffemodel")

solver = caffe.SGDSolver("solver.prototxt")
solver.net.copy_from("init.caffemodel")
before = {name: [p.data.copy() for p in params] for name, params in solver.net.params.items()}
solver.step(1)
blobs, params = solver.net.blobs, solver.net.params
np.savez("step.npz", iter=solver.iter, label=blobs["label"].data, conv1=blobs["conv1"].data,
         score=blobs["score"].data, score_diff=blobs["score"].diff, conv1_diff=blobs["conv1"].diff,
         loss_diff=blobs["loss"].diff, data_diff=blobs["data"].diff, loss=blobs["loss"].data,
         w_before=before["score"][0], b_before=before["score"][1],
         w_after=params["score"][0].data, b_after=params["score"][1].data,
         w_step=params["score"][0].diff, init_w=caffe.Net("tiny.prototxt", "init.caffemodel",
                                                         caffe.TRAIN).params["score"][0].data)
solver.snapshot()

net = caffe.Net("tiny.prototxt", "snap/tiny_iter_1.caffemodel", caffe.TEST)
accuracy, predictions = [], []
for _ in range(2):
    out = net.forward()
    accuracy.append(out["accuracy"].ravel().copy())
    predictions.append(net.blobs["score"].data.argmax(axis=1)[0])
np.savez("test.npz", accuracy=np.array(accuracy), predictions=np.array(predictions))
print("done at iteration", solver.iter)
"""


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    """A tiny dataset, net and solver, and the script's results."""
    root = tmp_path_factory.mktemp("pycaffe")
    write_dataset(root / "data", train=6, val=2, height=33, width=33, num_classes=3, seed=1)
    (root / "tiny.prototxt").write_text(NET)
    (root / "solver.prototxt").write_text(SOLVER)
    (root / "script.py").write_text(SCRIPT)
    env = dict(os.environ, DATA_ROOT=f"{root / 'data'}/", PYTHONPATH=str(REPO))
    run = subprocess.run([sys.executable, "script.py"], cwd=root, env=env, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "done at iteration 1" in run.stdout
    return root


def softmax(scores: np.ndarray) -> np.ndarray:
    shifted = np.exp(scores - scores.max(axis=1, keepdims=True))
    return shifted / shifted.sum(axis=1, keepdims=True)


def test_blob_diffs_after_step_are_that_iterations_gradients(workspace: Path) -> None:
    r = np.load(workspace / "step.npz")
    assert int(r["iter"]) == 1
    labels = r["label"][:, 0].astype(np.int64)
    valid = labels != 255
    assert valid.any()
    onehot = np.eye(3, dtype=np.float64)[np.where(valid, labels, 0)].transpose(0, 3, 1, 2)
    expected = (softmax(r["score"].astype(np.float64)) - onehot) * valid[:, None] / valid.sum()
    np.testing.assert_allclose(r["score_diff"], expected, rtol=1e-4, atol=1e-7)
    # the loss top holds its loss weight; the data blob gets no gradient
    np.testing.assert_array_equal(r["loss_diff"], np.ones_like(r["loss_diff"]))
    assert not r["data_diff"].any()
    # conv1 is rewritten in place by relu1: its diff is the gradient of conv1's output (Caffe's rule)
    back = np.einsum("ck,nchw->nkhw", r["w_before"][:, :, 0, 0].astype(np.float64), r["score_diff"])
    np.testing.assert_allclose(r["conv1_diff"], back * (r["conv1"] > 0), rtol=1e-4, atol=1e-8)
    log_likelihood = np.log(np.take_along_axis(softmax(r["score"].astype(np.float64)),
                                               np.where(valid, labels, 0)[:, None], axis=1))[:, 0]
    np.testing.assert_allclose(float(r["loss"]), -log_likelihood[valid].mean(), rtol=1e-5)


def test_parameters_moved_by_caffes_first_update(workspace: Path) -> None:
    r = np.load(workspace / "step.npz")
    np.testing.assert_array_equal(r["w_before"], r["init_w"])  # copy_from took the saved weights
    features = r["conv1"].astype(np.float64)
    grad_w = np.einsum("nchw,nkhw->ck", r["score_diff"], features)[:, :, None, None]
    grad_b = r["score_diff"].sum(axis=(0, 2, 3))
    # iteration 0: history is zero, so h = lr * lr_mult * (g + decay * decay_mult * w)
    step_w = BASE_LR * SCORE_LR_MULT[0] * (grad_w + WEIGHT_DECAY * SCORE_DECAY_MULT[0] * r["w_before"])
    step_b = BASE_LR * SCORE_LR_MULT[1] * grad_b
    # The gradient is a float32 sum over N*H*W products: its rounding (a few 1e-7 of the sum, which depends
    # on torch's convolution kernels) times the lr moves a weight by a few float32 ulps of the weights (~1e-8).
    np.testing.assert_allclose(r["w_after"], r["w_before"] - step_w, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(r["b_after"], r["b_before"] - step_b, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(r["w_step"], step_w, rtol=1e-4, atol=1e-9)  # the diff holds the step taken
    assert np.abs(step_w).max() > 1e-6


def test_test_net_agrees_with_the_command_line(workspace: Path, capsys, monkeypatch) -> None:
    r = np.load(workspace / "test.npz")
    monkeypatch.chdir(workspace)
    monkeypatch.setenv("DATA_ROOT", f"{workspace / 'data'}/")
    status = main(["test", "--model=tiny.prototxt", "--weights=snap/tiny_iter_1.caffemodel", "--iterations=2",
                   "--output_dir=predictions"])
    assert status == 0
    log = capsys.readouterr().err
    for i in range(2):
        printed = [float(v) for v in re.findall(rf"Batch {i}, accuracy = (\S+)", log)]
        np.testing.assert_allclose(printed, r["accuracy"][i], rtol=1e-5)
    written = [np.asarray(Image.open(workspace / "predictions" / f"val_{k:04d}.png")) for k in range(2)]
    # the PNGs are cropped to the image (33 x 33) inside the 41 x 41 padded input
    np.testing.assert_array_equal(np.array(written), r["predictions"][:, :33, :33])


def test_solver_wrapper_exposes_iter_test_nets_and_shared_params(workspace: Path, monkeypatch) -> None:
    monkeypatch.chdir(workspace)
    monkeypatch.setenv("DATA_ROOT", f"{workspace / 'data'}/")
    solver = caffe.get_solver("solver.prototxt")
    assert solver.iter == 0 and len(solver.test_nets) == 1
    assert solver.param.max_iter == 5
    solver.restore("snap/tiny_iter_1.solverstate")
    assert solver.iter == 1
    snapshot = caffe.Net("tiny.prototxt", "snap/tiny_iter_1.caffemodel", caffe.TRAIN)
    np.testing.assert_array_equal(solver.net.params["score"][0].data, snapshot.params["score"][0].data)
    solver.step(1)  # iteration 1 is not a test iteration: the test net still has its own weights
    test_net = solver.test_nets[0]
    assert not np.array_equal(test_net.params["score"][0].data, solver.net.params["score"][0].data)
    test_net.share_with(solver.net)
    np.testing.assert_array_equal(test_net.params["score"][0].data, solver.net.params["score"][0].data)
    solver.net.params["score"][1].data[...] = 0.5  # writable, shared memory
    assert (test_net.params["score"][1].data == 0.5).all()
    assert test_net.forward()["accuracy"].shape == (1, 1, 1, 3)


def test_net_errors_are_rloss_errors(workspace: Path, monkeypatch) -> None:
    monkeypatch.chdir(workspace)
    monkeypatch.setenv("DATA_ROOT", f"{workspace / 'data'}/")
    with pytest.raises(NetError, match="phase must be caffe.TRAIN or caffe.TEST"):
        caffe.Net("tiny.prototxt", 7)
    with pytest.raises(SolverError, match="does not exist"):
        caffe.SGDSolver("missing_solver.prototxt")


# ---- pycaffe's Net API (python/caffe/test/test_net.py's cases, checked against numpy) ----------------

SIMPLE_NET = """name: "simple" force_backward: true
layer { name: "data" type: "DummyData" top: "data" top: "label"
  dummy_data_param { num: 5 channels: 2 height: 3 width: 4 num: 5 channels: 1 height: 1 width: 1
                     data_filler { type: "gaussian" std: 1 } data_filler { type: "constant" } } }
layer { name: "conv" type: "Convolution" bottom: "data" top: "conv"
  param { decay_mult: 1 } param { decay_mult: 0 }
  convolution_param { num_output: 6 kernel_size: 2 pad: 1 weight_filler { type: "gaussian" std: 0.5 }
                      bias_filler { type: "constant" value: 0.5 } } }
layer { name: "ip" type: "InnerProduct" bottom: "conv" top: "ip_blob"
  inner_product_param { num_output: 7 weight_filler { type: "gaussian" std: 0.2 }
                        bias_filler { type: "constant" value: -0.3 } } }
layer { name: "loss" type: "SoftmaxWithLoss" bottom: "ip_blob" bottom: "label" top: "loss" }
"""
NUM_CLASSES = 7


def simple_net(folder: Path, phase: int = caffe.TRAIN, **keywords) -> caffe.Net:
    path = folder / "simple.prototxt"
    path.write_text(SIMPLE_NET)
    net = caffe.Net(str(path), phase, **keywords)
    net.blobs["label"].data[...] = np.random.RandomState(0).randint(NUM_CLASSES, size=(5, 1, 1, 1))
    return net


def inner_product(net: caffe.Net, bottom: np.ndarray) -> np.ndarray:
    weights, bias = (p.data.astype(np.float64) for p in net.params["ip"])
    return bottom.reshape(len(bottom), -1).astype(np.float64) @ weights.T + bias


def test_net_structure_names_and_blob_shapes(tmp_path: Path) -> None:
    net = simple_net(tmp_path)
    assert list(net.layer_dict) == net._layer_names == ["data", "conv", "ip", "loss"]
    assert [layer.type for layer in net.layers] == ["DummyData", "Convolution", "InnerProduct", "SoftmaxWithLoss"]
    assert net.layer_dict["conv"].type == "Convolution"
    assert net.inputs == [] and net.outputs == ["loss"]
    assert dict(net.top_names) == {"data": ["data", "label"], "conv": ["conv"], "ip": ["ip_blob"], "loss": ["loss"]}
    assert dict(net.bottom_names) == {"data": [], "conv": ["data"], "ip": ["conv"], "loss": ["ip_blob", "label"]}
    assert dict(net.blob_loss_weights) == {"data": 0, "label": 0, "conv": 0, "ip_blob": 0, "loss": 1}
    assert list(net.blobs) == ["data", "label", "conv", "ip_blob", "loss"]
    data = net.blobs["data"]
    assert (data.shape, data.count, data.num, data.channels, data.height, data.width) == ((5, 2, 3, 4), 120, 5, 2, 3, 4)
    assert net.blobs["ip_blob"].shape == (5, NUM_CLASSES) and net.blobs["ip_blob"].height == 1
    assert [p.shape for p in net.params["conv"]] == [(6, 2, 2, 2), (6,)]
    assert [p.shape for p in net.layers[2].blobs] == [(NUM_CLASSES, 6 * 4 * 5), (NUM_CLASSES,)]
    assert isinstance(net.params["ip"][0], caffe.Blob) and isinstance(data, caffe.Blob)


RESHAPE_NET = """name: "deploy"
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 1 dim: 2 dim: 6 dim: 7 } } }
layer { name: "conv" type: "Convolution" bottom: "data" top: "conv"
  convolution_param { num_output: 4 kernel_size: 3 pad: 1 stride: 2 weight_filler { type: "gaussian" std: 0.5 } } }
layer { name: "pool" type: "Pooling" bottom: "conv" top: "pool" pooling_param { pool: MAX kernel_size: 2 stride: 2 } }
"""


def caffe_output_size(size: int, kernel: int, pad: int, stride: int, ceil: bool) -> int:
    """Caffe's convolution (floor) and pooling (ceil) output size (spec 2.1, 2.3)."""
    span = size + 2 * pad - kernel
    return (-(-span // stride) if ceil else span // stride) + 1


def test_layer_reshape_shapes_the_tops_as_caffes_formulas(tmp_path: Path) -> None:
    (tmp_path / "reshape.prototxt").write_text(RESHAPE_NET)
    net = caffe.Net(str(tmp_path / "reshape.prototxt"), caffe.TEST)
    conv, pool = net.layer_dict["conv"], net.layer_dict["pool"]
    net.blobs["data"].reshape(2, 2, 9, 12)
    conv.reshape([net.blobs["data"]], [net.blobs["conv"]])
    height, width = caffe_output_size(9, 3, 1, 2, False), caffe_output_size(12, 3, 1, 2, False)
    assert net.blobs["conv"].shape == (2, 4, height, width) == (2, 4, 5, 6)
    assert not net.blobs["conv"].data.any()
    pool.reshape([net.blobs["conv"]], [net.blobs["pool"]])
    pooled = (caffe_output_size(height, 2, 0, 2, True), caffe_output_size(width, 2, 0, 2, True))
    assert net.blobs["pool"].shape == (2, 4, *pooled) == (2, 4, 3, 3)
    net.blobs["data"].data[...] = np.random.RandomState(2).uniform(size=(2, 2, 9, 12))
    assert net.forward()["pool"].shape == net.blobs["pool"].shape  # what a forward computes agrees
    net.blobs["data"].reshape(1, 3, 9, 12)  # three channels for a layer set up for two
    with pytest.raises(LayerError, match="layer 'conv'.*3 channels, the layer was set up for 2"):
        conv.reshape([net.blobs["data"]], [net.blobs["conv"]])
    with pytest.raises(NetError, match="1 bottoms and 1 tops; given 2 and 1"):
        conv.reshape([net.blobs["data"], net.blobs["data"]], [net.blobs["conv"]])


def test_layer_setup_keeps_the_parameters_or_refuses_other_ones(tmp_path: Path, workspace: Path,
                                                               monkeypatch) -> None:
    (tmp_path / "reshape.prototxt").write_text(RESHAPE_NET)
    net = caffe.Net(str(tmp_path / "reshape.prototxt"), caffe.TEST)
    conv = net.layer_dict["conv"]
    weights = conv.blobs[0].data.copy()
    net.blobs["data"].reshape(3, 2, 10, 10)  # another batch and size: the same parameters
    conv.setup([net.blobs["data"]], [net.blobs["conv"]])
    np.testing.assert_array_equal(conv.blobs[0].data, weights)  # kept, not filled again
    net.blobs["data"].reshape(1, 5, 10, 10)
    with pytest.raises(LayerError, match=r"layer 'conv'.*need parameter blobs of shapes \[\(4, 5, 3, 3\), \(4,\)\]"):
        conv.setup([net.blobs["data"]], [net.blobs["conv"]])
    net.blobs["data"].reshape(1, 2, 6, 7)  # the refusal left the layer as it was: set up for 2 channels
    assert net.forward()["pool"].shape == (1, 4, 2, 2)
    np.testing.assert_array_equal(conv.blobs[0].data, weights)
    monkeypatch.chdir(workspace)
    monkeypatch.setenv("DATA_ROOT", f"{workspace / 'data'}/")
    reading = caffe.Net("tiny.prototxt", caffe.TRAIN)
    data = reading.layer_dict["data"]
    tops = [reading.blobs[name] for name in ("data", "label", "data_dim")]
    with pytest.raises(LayerError, match="data layer cannot be set up again"):
        data.setup([], tops)


def test_forward_from_start_reads_the_blobs_as_they_stand(tmp_path: Path) -> None:
    net = simple_net(tmp_path)
    written = np.random.RandomState(1).uniform(size=(5, 6, 4, 5)).astype(np.float32)
    net.blobs["conv"].data[...] = written  # before any forward, as in pycaffe's test
    out = net.forward(start="ip", end="ip")
    assert set(out) == {"ip_blob"}
    np.testing.assert_allclose(out["ip_blob"], inner_product(net, written), rtol=1e-5, atol=1e-6)
    assert not net.blobs["loss"].data.any()  # layers after `end` did not run

    full = net.forward()
    data, conv, loss = net.blobs["data"].data.copy(), net.blobs["conv"].data.copy(), float(full["loss"])
    again = net.forward(start="conv")  # the DummyData layer does not run: its blob keeps the data
    np.testing.assert_array_equal(net.blobs["data"].data, data)
    np.testing.assert_array_equal(net.blobs["conv"].data, conv)
    assert float(again["loss"]) == pytest.approx(loss, rel=1e-6)
    net.forward(end="conv")  # the data layer fills a new batch; ip_blob keeps the last value
    assert not np.array_equal(net.blobs["data"].data, data)
    np.testing.assert_allclose(net.blobs["ip_blob"].data, inner_product(net, conv), rtol=1e-5, atol=1e-6)
    with pytest.raises(NetError, match="no layer named 'nope'"):
        net.forward(start="nope")


def softmax_loss_gradient(scores: np.ndarray, labels: np.ndarray) -> np.ndarray:
    shifted = np.exp(scores - scores.max(axis=1, keepdims=True))
    probabilities = shifted / shifted.sum(axis=1, keepdims=True)
    return (probabilities - np.eye(scores.shape[1])[labels]) / len(scores)


def test_backward_ranges_agree_with_a_full_pass_and_numpy(tmp_path: Path) -> None:
    net = simple_net(tmp_path)
    top_diff = np.random.RandomState(2).uniform(size=(5, NUM_CLASSES)).astype(np.float32)
    net.blobs["ip_blob"].diff[...] = top_diff  # no forward yet: the layer runs on the blobs as they stand
    out = net.backward(start="ip", end="ip")
    assert set(out) == {"conv"}
    expected = (top_diff.astype(np.float64) @ net.params["ip"][0].data).reshape(5, 6, 4, 5)
    np.testing.assert_allclose(out["conv"], expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(net.params["ip"][1].diff, top_diff.sum(axis=0), rtol=1e-5)

    net.clear_param_diffs()
    net.forward()
    full = net.backward()
    assert set(full) == set()  # no inputs: nothing asked for
    labels = net.blobs["label"].data.ravel().astype(np.int64)
    score_diff = softmax_loss_gradient(net.blobs["ip_blob"].data.astype(np.float64), labels)
    np.testing.assert_allclose(net.blobs["ip_blob"].diff, score_diff, rtol=1e-4, atol=1e-7)
    whole = {name: net.blobs[name].diff.copy() for name in ("data", "conv", "ip_blob")}
    params = {name: [p.diff.copy() for p in blobs] for name, blobs in net.params.items()}
    assert np.abs(whole["data"]).max() > 0  # force_backward: the data blob gets its diff

    net.clear_param_diffs()
    net.backward(start="loss", end="ip")
    assert set(net.backward(start="conv", diffs=["conv"])) == {"conv"}
    for name, diff in whole.items():
        np.testing.assert_allclose(net.blobs[name].diff, diff, rtol=1e-6, atol=1e-9)
    for name, blobs in params.items():
        for ranged, expected in zip(net.params[name], blobs):
            np.testing.assert_allclose(ranged.diff, expected, rtol=1e-6, atol=1e-9)


def test_param_diffs_add_up_until_cleared(tmp_path: Path) -> None:
    net = simple_net(tmp_path)
    net.forward()
    net.backward()
    diff = net.params["conv"][0].diff  # held across the calls, as pycaffe's test does
    once = diff.copy()
    assert np.abs(once).max() > 0
    net.backward()  # Caffe adds parameter gradients until they are cleared
    np.testing.assert_allclose(diff, 2 * once, rtol=1e-5, atol=1e-8)
    net.clear_param_diffs()
    assert not diff.any() and not net.params["ip"][1].diff.any()


LEVELS_NET = """layer { name: "data" type: "DummyData" top: "data" dummy_data_param { shape { dim: 1 dim: 4 } } }
layer { name: "always" type: "InnerProduct" bottom: "data" top: "always" inner_product_param { num_output: 1 } }
layer { name: "only0" type: "InnerProduct" bottom: "data" top: "only0" include { min_level: 0 max_level: 0 }
  inner_product_param { num_output: 1 } }
layer { name: "only1" type: "InnerProduct" bottom: "data" top: "only1" include { min_level: 1 max_level: 1 }
  inner_product_param { num_output: 1 } }
layer { name: "from1" type: "InnerProduct" bottom: "data" top: "from1" include { min_level: 1 }
  inner_product_param { num_output: 1 } }
layer { name: "A" type: "InnerProduct" bottom: "data" top: "A" include { stage: "A" }
  inner_product_param { num_output: 1 } }
layer { name: "AorB" type: "InnerProduct" bottom: "data" top: "AorB" include { stage: "A" } include { stage: "B" }
  inner_product_param { num_output: 1 } }
layer { name: "AandB" type: "InnerProduct" bottom: "data" top: "AandB" include { stage: "A" stage: "B" }
  inner_product_param { num_output: 1 } }
layer { name: "notB" type: "InnerProduct" bottom: "data" top: "notB" exclude { stage: "B" }
  inner_product_param { num_output: 1 } }
"""


@pytest.mark.parametrize("level, stages, kept", [
    (0, [], ["always", "only0", "notB"]),
    (1, [], ["always", "only1", "from1", "notB"]),
    (0, ["A"], ["always", "only0", "A", "AorB", "notB"]),
    (0, ["B"], ["always", "only0", "AorB"]),
    (2, ["A", "B"], ["always", "from1", "A", "AorB", "AandB"]),
])
def test_levels_and_stages_select_layers_as_net_state_rules(tmp_path: Path, level, stages, kept) -> None:
    (tmp_path / "levels.prototxt").write_text(LEVELS_NET)
    net = caffe.Net(str(tmp_path / "levels.prototxt"), caffe.TEST, level=level, stages=stages)
    assert [name for name in net.blobs if name != "data" and "split" not in name] == kept
    positional = caffe.Net(str(tmp_path / "levels.prototxt"), caffe.TEST, level, stages)
    assert positional._layer_names == net._layer_names


ALL_IN_ONE = """layer { name: "train_data" type: "DummyData" top: "data" top: "label"
  dummy_data_param { shape { dim: 1 dim: 4 } shape { dim: 1 } } include { phase: TRAIN stage: "train" } }
layer { name: "val_data" type: "DummyData" top: "data" top: "label"
  dummy_data_param { shape { dim: 1 dim: 4 } shape { dim: 1 } } include { phase: TEST stage: "val" } }
layer { name: "deploy_data" type: "Input" top: "data" input_param { shape { dim: 1 dim: 4 } }
  include { phase: TEST stage: "deploy" } }
layer { name: "ip" type: "InnerProduct" bottom: "data" top: "ip" inner_product_param { num_output: 2 } }
layer { name: "loss" type: "SoftmaxWithLoss" bottom: "ip" bottom: "label" top: "loss"
  include { phase: TRAIN stage: "train" } include { phase: TEST stage: "val" } }
layer { name: "pred" type: "Softmax" bottom: "ip" top: "pred" include { phase: TEST stage: "deploy" } }
"""


@pytest.mark.parametrize("phase, stage, inputs, outputs", [
    (caffe.TRAIN, "train", [], ["loss"]), (caffe.TEST, "val", [], ["loss"]), (caffe.TEST, "deploy", ["data"], ["pred"]),
])
def test_one_file_serves_train_val_and_deploy(tmp_path: Path, phase, stage, inputs, outputs) -> None:
    (tmp_path / "all.prototxt").write_text(ALL_IN_ONE)
    net = caffe.Net(str(tmp_path / "all.prototxt"), phase, stages=[stage])
    assert net.blobs["data"].shape == (1, 4) and net.inputs == inputs and net.outputs == outputs


DEPLOY_NET = """name: "deploy" force_backward: true
layer { name: "input" type: "Input" top: "data" input_param { shape { dim: 4 dim: 3 } } }
layer { name: "ip" type: "InnerProduct" bottom: "data" top: "score"
  inner_product_param { num_output: 2 weight_filler { type: "gaussian" std: 1 }
                        bias_filler { type: "constant" value: 0.5 } } }
"""


def deploy_net(folder: Path) -> caffe.Net:
    (folder / "deploy.prototxt").write_text(DEPLOY_NET)
    return caffe.Net(str(folder / "deploy.prototxt"), caffe.TEST)


def test_forward_all_batches_pads_and_drops_the_padding(tmp_path: Path) -> None:
    net = deploy_net(tmp_path)
    items = np.random.RandomState(3).randn(10, 3).astype(np.float32)  # 2 full batches of 4, then 2 padded
    weights, bias = (p.data.astype(np.float64) for p in net.params["ip"])
    out = net.forward_all(data=items, blobs=["data"])
    assert set(out) == {"score", "data"} and out["score"].shape == (10, 2)
    np.testing.assert_allclose(out["score"], items @ weights.T + bias, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(out["data"], items)
    np.testing.assert_array_equal(net.blobs["data"].data[2:], 0)  # the last batch's padding

    seeds = np.random.RandomState(4).randn(10, 2).astype(np.float32)
    data, diffs = net.forward_backward_all(data=items, score=seeds)
    np.testing.assert_allclose(data["score"], out["score"], rtol=1e-6)
    assert set(diffs) == {"data"} and diffs["data"].shape == (10, 3)
    np.testing.assert_allclose(diffs["data"], seeds @ weights, rtol=1e-5, atol=1e-6)


def test_inputs_and_top_diffs_must_be_the_nets_and_batch_sized(tmp_path: Path) -> None:
    net = deploy_net(tmp_path)
    with pytest.raises(NetError, match="not the net's inputs"):
        net.forward(image=np.zeros((4, 3)))
    with pytest.raises(NetError, match="batch size"):
        net.forward(data=np.zeros((3, 3)))
    with pytest.raises(NetError, match="not the net's outputs"):
        net.backward(data=np.zeros((4, 3)))
    with pytest.raises(NetError, match="differ in length"):
        net.forward_backward_all(data=np.zeros((5, 3)), score=np.zeros((4, 2)))
    net.blobs["data"].reshape(6, 3)  # a new batch size, as pycaffe's Blob.reshape
    assert net.forward(data=np.ones((6, 3)))["score"].shape == (6, 2)


def test_save_and_copy_from_round_trip_with_each_constructor(tmp_path: Path) -> None:
    net = simple_net(tmp_path)
    net.params["conv"][1].data[...] = np.arange(6)  # the arrays are the weights: writes are saved
    net.save(str(tmp_path / "simple.caffemodel"))
    model, weights = str(tmp_path / "simple.prototxt"), str(tmp_path / "simple.caffemodel")
    nets = [caffe.Net(model, weights, caffe.TRAIN), caffe.Net(model, caffe.TRAIN, weights=weights),
            caffe.Net(model, caffe.TEST, 0, None, weights)]
    fresh = caffe.Net(model, caffe.TRAIN)
    fresh.copy_from(weights)
    for other in [*nets, fresh]:
        for name, blobs in net.params.items():
            for mine, theirs in zip(blobs, other.params[name]):
                np.testing.assert_array_equal(mine.data, theirs.data)
    np.testing.assert_array_equal(fresh.params["conv"][1].data, np.arange(6))
    with pytest.raises(TypeError, match="multiple values"):
        caffe.Net(model, caffe.TRAIN, phase=caffe.TEST)


def test_hdf5_round_trip_whatever_the_file_name(tmp_path: Path) -> None:
    pytest.importorskip("h5py")
    net = simple_net(tmp_path)
    net.save_hdf5(str(tmp_path / "weights.model"))  # pycaffe's test uses a name without .h5
    other = caffe.Net(str(tmp_path / "simple.prototxt"), caffe.TRAIN)
    assert not np.array_equal(other.params["ip"][0].data, net.params["ip"][0].data)
    other.load_hdf5(str(tmp_path / "weights.model"))
    for name, blobs in net.params.items():
        for mine, theirs in zip(blobs, other.params[name]):
            np.testing.assert_array_equal(mine.data, theirs.data)


def test_writes_into_host_copies_reach_the_net(tmp_path: Path) -> None:
    """bf16 blobs are shown as float32 host copies (as CUDA blobs are): what is written into them is
    what the next forward reads, and successive writes into one blob add up."""
    (tmp_path / "bf16.prototxt").write_text(
        'name: "bf16" input: "x" input_shape { dim: 2 dim: 1 dim: 3 dim: 3 }\n'
        'layer { name: "conv" type: "Convolution" bottom: "x" top: "conv" '
        '  convolution_param { num_output: 2 kernel_size: 1 weight_filler { type: "gaussian" std: 1 } } }\n'
        'layer { name: "relu" type: "ReLU" bottom: "conv" top: "r" }\n')
    import torch

    net = caffe.Net(str(tmp_path / "bf16.prototxt"), caffe.TEST, precision="bf16")
    net.forward(x=np.ones((2, 1, 3, 3)))
    assert net._net.blob_data["conv"].dtype == torch.bfloat16
    net.blobs["conv"].data[0] = -1.0
    net.blobs["conv"].data[1] = 3.0
    out = net.forward(start="relu")
    np.testing.assert_array_equal(out["r"][0], 0)
    np.testing.assert_array_equal(out["r"][1], 3)


def test_random_seed_layer_types_and_the_proto_module(tmp_path: Path) -> None:
    from rloss.caffe.proto import caffe_pb2
    from rloss.proto import caffe_pb2 as ours

    caffe.set_random_seed(5)
    first = simple_net(tmp_path).forward(blobs=["data"])["data"].copy()
    caffe.set_random_seed(5)
    second = simple_net(tmp_path).forward(blobs=["data"])["data"]
    np.testing.assert_array_equal(first, second)
    assert {"Convolution", "DenseCRFLoss", "Input", "SoftmaxWithLoss"} <= set(caffe.layer_type_list())
    assert caffe_pb2 is ours and caffe.proto.caffe_pb2 is ours and caffe.TRAIN == ours.TRAIN
