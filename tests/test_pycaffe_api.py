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
from rloss.errors import NetError, SolverError
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
