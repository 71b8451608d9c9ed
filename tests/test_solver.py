"""Solver against Caffe's rules written out independently here: the update
(clip, /iter_size, weight decay, momentum with the rate folded in), lr policies, the smoothed
loss, snapshots/resume, NaN handling, signals, test nets, and rloss.paths' resolution rules."""

from __future__ import annotations

import logging
import math
import os
import signal
from pathlib import Path

import numpy as np
import pytest
import torch
from google.protobuf import text_format

from rloss.caffe_log import caffe_number
from rloss.errors import SolverError, VariableError
from rloss.io import read_net_param, read_solver_state
from rloss.lr_policy import LearningRate, check_policy
from rloss.paths import resolve_input, resolve_net_file, resolve_output_prefix
from rloss.proto import caffe_pb2
from rloss.proto.blob import blob_to_array
from rloss.solver import Solver
from rloss.variables import parse_assignments, variable_values

h5py = pytest.importorskip("h5py")

RNG = np.random.RandomState(7)
DATA = RNG.randn(4, 3).astype(np.float32)
LABELS = np.array([0, 2, 1, 2], dtype=np.float32)

NET = """name: "tiny"
layer {{ name: "data" type: "HDF5Data" top: "data" top: "label"
  hdf5_data_param {{ source: "{source}" batch_size: {batch} }} }}
layer {{ name: "ip1" type: "InnerProduct" bottom: "data" top: "ip1"
  param {{ lr_mult: 1 decay_mult: 1 }} param {{ lr_mult: 2 decay_mult: 0 }}
  inner_product_param {{ num_output: 4 weight_filler {{ type: "gaussian" std: 0.5 }}
    bias_filler {{ type: "constant" value: 0.1 }} }} }}
layer {{ name: "relu" type: "ReLU" bottom: "ip1" top: "ip1" }}
layer {{ name: "ip2" type: "InnerProduct" bottom: "ip1" top: "ip2"
  param {{ lr_mult: 0 }} param {{ lr_mult: 0 }}
  inner_product_param {{ num_output: 3 weight_filler {{ type: "gaussian" std: 0.5 }}
    bias_filler {{ type: "constant" value: -0.2 }} }} }}
layer {{ name: "loss" type: "SoftmaxWithLoss" bottom: "ip2" bottom: "label" top: "loss" }}
"""


def write_dataset(folder: Path, batch: int = 2) -> Path:
    """The 4-sample HDF5 dataset, its list file and the tiny net; returns the net path."""
    folder.mkdir(parents=True, exist_ok=True)
    with h5py.File(folder / "data.h5", "w") as handle:
        handle["data"] = DATA
        handle["label"] = LABELS
    (folder / "list.txt").write_text(f"{folder / 'data.h5'}\n")
    net = folder / "net.prototxt"
    net.write_text(NET.format(source=folder / "list.txt", batch=batch))
    return net


def solver_file(folder: Path, **fields) -> Path:
    """A solver prototxt for the tiny net with `fields` over the defaults below."""
    settings = {"base_lr": 0.1, "lr_policy": '"fixed"', "momentum": 0.9,
                "weight_decay": 0.01, "max_iter": 3, "display": 1, "random_seed": 3, "solver_mode": "CPU",
                "snapshot_prefix": f'"{folder / "snap"}"'}
    settings.update(fields)
    folder.mkdir(parents=True, exist_ok=True)
    if "net" not in settings and "train_net" not in settings:
        settings["net"] = f'"{write_dataset(folder)}"'
    path = folder / "solver.prototxt"
    path.write_text("\n".join(f"{key}: {value}" for key, value in settings.items()) + "\n")
    return path


# ---- an independent Caffe reference for the tiny net --------------------------------------------------

def reference_loss(tensors: list[torch.Tensor], rows) -> torch.Tensor:
    """Mean cross-entropy of softmax(relu(x W1' + b1) W2' + b2) over `rows`, written out."""
    w1, b1, w2, b2 = tensors
    x = torch.tensor(DATA[rows], dtype=torch.float64)
    y = torch.tensor(LABELS[rows], dtype=torch.int64)
    scores = torch.clamp(x @ w1.T + b1, min=0) @ w2.T + b2
    return -torch.log_softmax(scores, dim=1)[torch.arange(len(rows)), y].mean()


def reference_gradients(weights: list[np.ndarray], rows) -> list[np.ndarray]:
    """d(mean cross-entropy over `rows`)/d(ip1 weight, ip1 bias), float64."""
    tensors = [torch.tensor(w, dtype=torch.float64, requires_grad=i < 2) for i, w in enumerate(weights)]
    return [g.numpy() for g in torch.autograd.grad(reference_loss(tensors, rows), tensors[:2])]


def caffe_reference(weights, iterations, rates, batches, momentum=0.9, decay=0.01, clip=-1.0):
    """Caffe's SGD on ip1 (lr_mult 1/2, decay_mult 1/0): g = sum over passes (clipped as a whole),
    /iter_size, + decay*w; h = momentum*h + rate*lr_mult*g; w -= h. Returns weights and history."""
    weights = [w.astype(np.float64) for w in weights]
    history = [np.zeros_like(weights[0]), np.zeros_like(weights[1])]
    for it in range(iterations):
        grads = [np.zeros_like(history[0]), np.zeros_like(history[1])]
        for rows in batches:
            for total, g in zip(grads, reference_gradients(weights, rows)):
                total += g
        norm = math.sqrt(sum(float((g ** 2).sum()) for g in grads))
        if 0 <= clip < norm:
            grads = [g * clip / norm for g in grads]
        for i, (lr_mult, decay_mult) in enumerate(((1, 1), (2, 0))):
            g = grads[i] / len(batches) + decay * decay_mult * weights[i]
            history[i] = momentum * history[i] + rates[it] * lr_mult * g
            weights[i] = weights[i] - history[i]
    return weights, history


def initial_weights(solver: Solver) -> list[np.ndarray]:
    return [p.detach().numpy().copy() for name in ("ip1", "ip2") for p in solver.net.params[name]]


def assert_close(actual, expected, tolerance=1e-5):
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    scale = max(np.abs(expected).max(), 1e-12)
    assert np.abs(actual - expected).max() / scale <= tolerance, (actual, expected)


# ---- caffe_number -----------------------------------------------------------------------------------

@pytest.mark.parametrize("value, text", [
    (1e-08, "1e-08"), (-1.5e9, "-1.5e+09"), (0.001, "0.001"), (100000, "100000"), (1e6, "1e+06"),
    (1.6171712, "1.61717"), (0.0001, "0.0001"), (0.00001, "1e-05"), (123456789, "1.23457e+08"),
    (0.5, "0.5"), (0, "0"), (-2.25, "-2.25"), (float("inf"), "inf"), (float("nan"), "nan"),
])
def test_caffe_number(value, text):
    assert caffe_number(value) == text


# ---- learning-rate policies -------------------------------------------------------------------------

def policy(**fields):
    param = caffe_pb2.SolverParameter()
    for key, value in fields.items():
        if key == "stepvalue":
            param.stepvalue.extend(value)
        else:
            setattr(param, key, value)
    return param


@pytest.mark.parametrize("fields, formula", [
    ({"lr_policy": "fixed"}, lambda it: 0.01),
    ({"lr_policy": "step", "gamma": 0.1, "stepsize": 3}, lambda it: 0.01 * 0.1 ** (it // 3)),
    ({"lr_policy": "exp", "gamma": 0.9}, lambda it: 0.01 * 0.9 ** it),
    ({"lr_policy": "inv", "gamma": 0.5, "power": 0.75}, lambda it: 0.01 * (1 + 0.5 * it) ** -0.75),
    ({"lr_policy": "poly", "power": 0.9, "max_iter": 10}, lambda it: 0.01 * (1 - it / 10) ** 0.9),
    ({"lr_policy": "sigmoid", "gamma": -0.5, "stepsize": 4}, lambda it: 0.01 / (1 + math.exp(0.5 * (it - 4)))),
])
def test_lr_policies_follow_the_formulas(fields, formula):
    param = policy(base_lr=0.01, **fields)
    check_policy(param)
    rate = LearningRate(param)
    for it in range(10):
        assert rate(it) == pytest.approx(formula(it), rel=2e-6)


def test_step_policy_stores_current_step():
    rate = LearningRate(policy(base_lr=0.01, lr_policy="step", gamma=0.1, stepsize=2))
    rate(5)
    assert rate.current_step == 2


def test_multistep_advances_at_most_one_step_per_call(caplog):
    rate = LearningRate(policy(base_lr=1.0, lr_policy="multistep", gamma=0.5, stepvalue=[2, 3]))
    with caplog.at_level(logging.INFO, logger="rloss"):
        assert rate(0) == 1.0
        # jumping to iteration 10 passes both step values, but one call advances one step only
        assert rate(10) == 0.5
        assert rate(10) == 0.25
        assert rate(11) == 0.25
    assert "MultiStep Status: Iteration 10, step = 1" in caplog.text
    assert "MultiStep Status: Iteration 10, step = 2" in caplog.text


@pytest.mark.parametrize("fields, message", [
    ({"lr_policy": "cosine"}, "unknown lr_policy 'cosine'"),
    ({"lr_policy": "step"}, "stepsize > 0"),
    ({"lr_policy": "poly", "power": 1.0}, "max_iter > 0"),
])
def test_bad_policies_are_rejected(fields, message):
    with pytest.raises(SolverError, match=message):
        check_policy(policy(base_lr=0.1, **fields))


# ---- the update rule --------------------------------------------------------------------------------

def test_update_follows_caffe_across_an_lr_step(tmp_path):
    """iter_size 2 (two different half-batches), momentum across a step-policy rate change, L2 decay
    with decay_mult 0 on the bias, lr_mult 2 on the bias, a frozen layer (lr_mult 0)."""
    path = solver_file(tmp_path, lr_policy='"step"', gamma=0.1, stepsize=2, iter_size=2, max_iter=4)
    solver = Solver(path)
    start = initial_weights(solver)
    solver.step(4)
    rates = [0.1, 0.1, 0.01, 0.01]
    weights, history = caffe_reference(start, 4, rates, [[0, 1], [2, 3]])
    for name_index, (param, h) in enumerate(zip(solver.net.params["ip1"], solver.history[:2])):
        assert_close(param.detach().numpy(), weights[name_index])
        assert_close(h.numpy(), history[name_index])
    frozen = [p.detach().numpy() for p in solver.net.params["ip2"]]
    assert all(np.array_equal(a, b) for a, b in zip(frozen, start[2:]))
    assert all(not h.any() for h in solver.history[2:])


def test_torch_sgd_differs_after_an_lr_change(tmp_path):
    """torch.optim.SGD keeps raw gradients in its buffer, so an lr change rescales the whole momentum
    term; Caffe's buffer keeps steps taken at the old rate. We match Caffe, not torch."""
    path = solver_file(tmp_path, lr_policy='"step"', gamma=0.1, stepsize=2, iter_size=2, max_iter=4)
    solver = Solver(path)
    start = initial_weights(solver)
    solver.step(4)
    ours = solver.net.params["ip1"][0].detach().numpy().astype(np.float64)
    caffe, _ = caffe_reference(start, 4, [0.1, 0.1, 0.01, 0.01], [[0, 1], [2, 3]])

    w1 = torch.tensor(start[0], dtype=torch.float64, requires_grad=True)
    b1 = torch.tensor(start[1], dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.SGD([{"params": [w1], "weight_decay": 0.01, "lr": 0.1},
                                 {"params": [b1], "weight_decay": 0.0, "lr": 0.2}], momentum=0.9)
    for it in range(4):
        optimizer.zero_grad()
        grads = [reference_gradients([w1.detach().numpy(), b1.detach().numpy(), *start[2:]], rows)
                 for rows in ([0, 1], [2, 3])]
        w1.grad = torch.tensor((grads[0][0] + grads[1][0]) / 2)
        b1.grad = torch.tensor((grads[0][1] + grads[1][1]) / 2)
        for group, base in zip(optimizer.param_groups, (0.1, 0.2)):
            group["lr"] = base * 0.1 ** (it // 2)
        optimizer.step()
    assert_close(ours, caffe[0])
    difference = np.abs(w1.detach().numpy() - caffe[0]).max() / np.abs(caffe[0]).max()
    assert difference > 1e-3


def test_clip_gradients_on_the_accumulated_diff(tmp_path, caplog):
    path = solver_file(tmp_path, clip_gradients=0.05, iter_size=2, max_iter=2)
    solver = Solver(path)
    start = initial_weights(solver)
    with caplog.at_level(logging.INFO, logger="rloss"):
        solver.step(2)
    weights, _ = caffe_reference(start, 2, [0.1, 0.1], [[0, 1], [2, 3]], clip=0.05)
    assert_close(solver.net.params["ip1"][0].detach().numpy(), weights[0])
    assert_close(solver.net.params["ip1"][1].detach().numpy(), weights[1])
    assert "Gradient clipping: scaling down gradients (L2 norm" in caplog.text


def test_lr_mult_zero_and_decay_mult_zero(tmp_path):
    """A frozen layer never changes (bitwise) although weight_decay is set; a decay_mult 0 bias with a
    zero gradient does not decay."""
    path = solver_file(tmp_path, weight_decay=0.5, base_lr=1.0, momentum=0.0, max_iter=2, iter_size=2)
    solver = Solver(path)
    frozen = [p.detach().clone() for p in solver.net.params["ip2"]]
    with torch.no_grad():
        solver.net.params["ip1"][0].zero_()  # relu(0 + 0.1) only: ip1 bias still gets a gradient
    solver.step(1)
    assert all(torch.equal(a, b) for a, b in zip(frozen, solver.net.params["ip2"]))
    # ip1 weight: grad = outer(dL/dip1, x) is nonzero; with w = 0 decay adds nothing in step 1,
    # in step 2 it adds 0.5 * w: compare against the reference with those settings
    start = initial_weights(solver)
    solver.step(1)
    weights, _ = caffe_reference(start, 1, [1.0], [[0, 1], [2, 3]], momentum=0.0, decay=0.5)
    assert_close(solver.net.params["ip1"][0].detach().numpy(), weights[0])
    assert_close(solver.net.params["ip1"][1].detach().numpy(), weights[1])


# ---- smoothed loss ----------------------------------------------------------------------------------

def displayed_losses(text: str) -> list[float]:
    return [float(line.rsplit("= ", 1)[1]) for line in text.splitlines()
            if ", loss = " in line and "Iteration" in line]


def test_smoothed_loss_ring_of_three_over_five_iterations(tmp_path, caplog):
    raw_solver = Solver(solver_file(tmp_path / "a", max_iter=5))
    with caplog.at_level(logging.INFO, logger="rloss"):
        raw_solver.step(5)
    raw = displayed_losses(caplog.text)
    caplog.clear()
    smooth_solver = Solver(solver_file(tmp_path / "b", max_iter=5, average_loss=3))
    with caplog.at_level(logging.INFO, logger="rloss"):
        smooth_solver.step(5)
    smoothed = displayed_losses(caplog.text)
    expected = [raw[0], (raw[0] + raw[1]) / 2, sum(raw[:3]) / 3, sum(raw[1:4]) / 3, sum(raw[2:5]) / 3]
    assert len(raw) == 5 and smoothed == pytest.approx(expected, rel=2e-5)


# ---- snapshots, resume, stops -----------------------------------------------------------------------

def final_state(solver: Solver):
    return [p.tensor.detach().clone() for p in solver.net.learnable], [h.clone() for h in solver.history]


def test_resume_equals_an_uninterrupted_run_bit_for_bit(tmp_path):
    """The data here does not depend on the cursor (each iteration reads the whole dataset), since
    snapshots do not store data positions (neither do Caffe's)."""
    fields = {"lr_policy": '"step"', "gamma": 0.5, "stepsize": 2, "iter_size": 2, "max_iter": 6, "snapshot": 3}
    whole = Solver(solver_file(tmp_path / "whole", **fields))
    whole.solve()
    resumed = Solver(solver_file(tmp_path / "resumed", **fields))
    resumed.solve(resume_file=str(tmp_path / "whole" / "snap_iter_3.solverstate"))
    assert resumed.iter == whole.iter == 6
    assert resumed.lr.current_step == whole.lr.current_step == 2
    for first, second in zip(final_state(whole), final_state(resumed)):
        assert all(torch.equal(a, b) for a, b in zip(first, second))


def test_snapshot_files_and_no_temporary_files(tmp_path):
    solver = Solver(solver_file(tmp_path, max_iter=4, snapshot=2))
    solver.solve()
    names = sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("snap") or p.name.startswith("."))
    assert names == ["snap_iter_2.caffemodel", "snap_iter_2.solverstate",
                     "snap_iter_4.caffemodel", "snap_iter_4.solverstate"]
    state = read_solver_state(tmp_path / "snap_iter_4.solverstate")
    assert state.iter == 4 and state.learned_net == str(tmp_path / "snap_iter_4.caffemodel")
    assert len(state.history) == 4
    history = blob_to_array(state.history[0], "h").reshape(solver.history[0].shape)
    assert np.array_equal(history, solver.history[0].numpy())


def test_final_snapshot_when_max_iter_is_not_a_multiple(tmp_path):
    Solver(solver_file(tmp_path, max_iter=3, snapshot=2)).solve()
    assert (tmp_path / "snap_iter_2.caffemodel").exists() and (tmp_path / "snap_iter_3.solverstate").exists()


def test_hdf5_snapshot_round_trip(tmp_path):
    fields = {"max_iter": 4, "snapshot": 2, "snapshot_format": "HDF5"}
    whole = Solver(solver_file(tmp_path / "whole", **fields))
    whole.solve()
    assert (tmp_path / "whole" / "snap_iter_2.caffemodel.h5").exists()
    resumed = Solver(solver_file(tmp_path / "resumed", **fields))
    resumed.solve(resume_file=str(tmp_path / "whole" / "snap_iter_2.solverstate.h5"))
    for first, second in zip(final_state(whole), final_state(resumed)):
        assert all(torch.equal(a, b) for a, b in zip(first, second))


def test_restore_finds_the_model_beside_a_moved_state(tmp_path):
    Solver(solver_file(tmp_path / "run", max_iter=2, snapshot=2)).solve()
    moved = tmp_path / "moved"
    (tmp_path / "run").rename(moved)
    solver = Solver(solver_file(tmp_path / "again", max_iter=2))
    solver.restore(moved / "snap_iter_2.solverstate")
    assert solver.iter == 2


def finite_model(path: Path) -> bool:
    net = read_net_param(path)
    return all(np.isfinite(blob_to_array(blob, "b")).all() for layer in net.layer for blob in layer.blobs)


@pytest.mark.parametrize("base_lr", [1e30, 3e38])
def test_exploding_run_stops_and_names_the_last_finite_snapshot(tmp_path, base_lr):
    solver = Solver(solver_file(tmp_path, base_lr=base_lr, momentum=0, max_iter=6, snapshot=1))
    with pytest.raises(SolverError, match="training stopped") as caught:
        solver.solve()
    message = str(caught.value)
    models = sorted(tmp_path.glob("snap_iter_*.caffemodel"))
    assert all(finite_model(model) for model in models), "a non-finite snapshot was written"
    if models:
        newest = max(models, key=lambda p: int(p.stem.split("_")[-1]))
        assert f"the last snapshot with finite weights is {newest}" in message
    else:
        assert "no snapshot with finite weights was written" in message
    assert ("the loss is" in message) != ("non-finite" in message)


def test_non_finite_weights_are_never_snapshotted(tmp_path):
    solver = Solver(solver_file(tmp_path, max_iter=2, snapshot=1))
    solver.step(1)
    solver.snapshot()
    with torch.no_grad():
        solver.net.learnable[1].tensor[0] = float("inf")
    with pytest.raises(SolverError, match=r"snapshot at iteration 1 made the parameter ip1/1 non-finite.*"
                                          r"the last snapshot with finite weights is .*snap_iter_1.caffemodel"):
        solver.snapshot()
    with pytest.raises(SolverError, match="iteration 1: the loss is nan.*snap_iter_1.caffemodel"):
        solver.step(1)
    assert sorted(p.name for p in tmp_path.glob("snap_iter_*")) == ["snap_iter_1.caffemodel",
                                                                   "snap_iter_1.solverstate"]


def test_interrupted_writes_are_cleaned_up_by_the_next_write(tmp_path):
    solver = Solver(solver_file(tmp_path, max_iter=2, snapshot=2))
    leftover = tmp_path / ".snap_iter_2.caffemodel.0123456789ab.tmp"
    other = tmp_path / ".snap_iter_20.caffemodel.0123456789ab.tmp"
    leftover.write_bytes(b"half a model")
    other.write_bytes(b"another target's")
    solver.solve()
    assert not leftover.exists() and other.exists()
    assert sorted(p.name for p in tmp_path.glob(".*")) == [other.name]


def signal_at_iteration(solver: Solver, number: int, iteration: int) -> None:
    """Make the solver receive signal `number` during the update of `iteration`."""
    update = solver.apply_update

    def signalled_update(display=False):
        update(display)
        if solver.iter == iteration:
            os.kill(os.getpid(), number)

    solver.apply_update = signalled_update


def test_sigint_stops_after_the_iteration_with_a_snapshot(tmp_path, caplog):
    solver = Solver(solver_file(tmp_path, max_iter=10))
    signal_at_iteration(solver, signal.SIGINT, 2)
    before = signal.getsignal(signal.SIGINT)  # Python's default_int_handler, or SIG_IGN in a background job
    with caplog.at_level(logging.INFO, logger="rloss"):
        solver.solve()
    assert solver.iter == 3
    assert (tmp_path / "snap_iter_3.caffemodel").exists()
    assert "Optimization stopped early." in caplog.text
    assert signal.getsignal(signal.SIGINT) is before


@pytest.mark.skipif(not hasattr(signal, "SIGHUP"), reason="no SIGHUP on this platform")
def test_sighup_snapshots_and_goes_on(tmp_path):
    solver = Solver(solver_file(tmp_path, max_iter=5, snapshot_after_train="false"))
    signal_at_iteration(solver, signal.SIGHUP, 1)
    solver.solve()
    assert solver.iter == 5
    assert sorted(p.name for p in tmp_path.glob("snap_iter_*")) == ["snap_iter_2.caffemodel",
                                                                     "snap_iter_2.solverstate"]


# ---- configuration checks and test nets -------------------------------------------------------------

@pytest.mark.parametrize("fields, message", [
    ({"average_loss": 0}, "average_loss must be >= 1"),
    ({"snapshot": 5, "snapshot_prefix": '""'}, "snapshot_prefix is not set"),
    ({"type": '"Adamax"'}, "unknown solver type 'Adamax'"),
    ({"regularization_type": '"L3"'}, "regularization_type"),
    ({"train_net": '"x.prototxt"', "net": '"y.prototxt"'}, "2 \\(net, train_net\\) train net"),
])
def test_bad_solver_settings(tmp_path, fields, message):
    with pytest.raises(SolverError, match=message):
        Solver(solver_file(tmp_path, **fields))


def test_test_net_shares_the_trained_weights(tmp_path, caplog):
    path = solver_file(tmp_path, max_iter=2, test_iter=1, test_interval=2, test_initialization="false")
    solver = Solver(path)
    with caplog.at_level(logging.INFO, logger="rloss"):
        solver.solve()
    assert solver.test_nets[0].params["ip1"][0] is solver.net.params["ip1"][0]
    line = next(line for line in caplog.text.splitlines() if "Test net output #0" in line)
    # the test net's own data layer reads rows 0 and 1, with the weights after 2 updates
    weights = [torch.tensor(w, dtype=torch.float64) for w in initial_weights(solver)]
    expected = float(reference_loss(weights, [0, 1]))
    assert float(line.split("= ")[1].split()[0]) == pytest.approx(expected, rel=1e-5)


def test_random_seed_makes_fillers_reproducible(tmp_path):
    first = Solver(solver_file(tmp_path / "a", random_seed=11))
    second = Solver(solver_file(tmp_path / "b", random_seed=11))
    assert torch.equal(first.net.params["ip1"][0], second.net.params["ip1"][0])


# ---- paths and variables ----------------------------------------------------------------------------

def test_inputs_resolve_from_the_working_directory_then_the_ancestors(tmp_path, monkeypatch):
    config = tmp_path / "exper" / "pascal" / "config" / "net"
    config.mkdir(parents=True)
    (tmp_path / "exper" / "pascal" / "list.txt").write_text("x\n")
    monkeypatch.chdir(tmp_path)
    anchors = [config, *config.parents]
    assert resolve_input("pascal/list.txt", anchors) == tmp_path / "exper" / "pascal" / "list.txt"
    (tmp_path / "pascal").mkdir()
    (tmp_path / "pascal" / "list.txt").write_text("y\n")
    assert resolve_input("pascal/list.txt", anchors) == Path("pascal/list.txt")
    assert resolve_input("missing.txt", anchors) == Path("missing.txt")


def test_net_file_falls_back_to_its_template(tmp_path, monkeypatch):
    config = tmp_path / "exper" / "pascal_scribble" / "config" / "resnet-101"
    config.mkdir(parents=True)
    (config / "train.prototxt").write_text('name: "${NET_ID}"\n')
    monkeypatch.chdir(tmp_path)
    values, defaults = variable_values({}, config / "solver.prototxt", environ={})
    found = resolve_net_file("pascal_scribble/config/resnet-101/train_train.prototxt",
                             [config, *config.parents], values, defaults)
    assert found == config / "train.prototxt"
    values, defaults = variable_values({"TRAIN_SET": "train_aug"}, config / "solver.prototxt", environ={})
    assert resolve_net_file(config / "train_train_aug.prototxt", [], values, defaults) == config / "train.prototxt"


def test_output_prefix_goes_where_its_folder_exists(tmp_path, monkeypatch):
    exper = tmp_path / "exper"
    config = exper / "pascal" / "config" / "net"
    config.mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    anchors = [config, *config.parents]
    # only exper/pascal exists: that base has the longest existing part; model/net is created
    prefix = resolve_output_prefix("pascal/model/net/train", anchors)
    assert prefix == exper / "pascal" / "model" / "net" / "train" and prefix.parent.is_dir()
    (tmp_path / "pascal" / "model" / "net").mkdir(parents=True)
    assert resolve_output_prefix("pascal/model/net/train", anchors) == Path("pascal/model/net/train")


def test_variables_set_then_environment_then_defaults(tmp_path):
    solver = tmp_path / "config" / "deeplab_vgg16" / "solver.prototxt"
    values, defaults = variable_values({"EXP": "mine"}, solver, environ={"EXP": "env", "NUM_LABELS": "5"})
    assert values["EXP"] == "mine" and values["NUM_LABELS"] == "5"
    assert defaults["NET_ID"] == "deeplab_vgg16" and defaults["TRAIN_SET"] == "train"
    assert defaults["FEATURE_DIR"] == "mine/features/deeplab_vgg16" and "DATA_ROOT" not in defaults
    assert parse_assignments(["A=1", "B=x=y", "C="]) == {"A": "1", "B": "x=y", "C": ""}
    with pytest.raises(VariableError, match="VAR=VALUE"):
        parse_assignments(["novalue"])


def test_missing_data_root_names_the_variable(tmp_path, monkeypatch):
    monkeypatch.delenv("DATA_ROOT", raising=False)
    folder = tmp_path / "cfg"
    net = write_dataset(folder)
    net.write_text(net.read_text().replace(str(folder / "list.txt"), "${DATA_ROOT}list.txt"))
    with pytest.raises(VariableError, match=r"DATA_ROOT.*--set DATA_ROOT="):
        Solver(solver_file(folder, net=f'"{net}"'))
    monkeypatch.chdir(tmp_path)
    solver = Solver(solver_file(folder, net=f'"{net}"'), values={"DATA_ROOT": f"{folder}/"})
    assert solver.net.name == "tiny"


def test_solver_parameter_object_with_inline_net(tmp_path):
    net_text = write_dataset(tmp_path).read_text()
    param = text_format.Parse(f"net_param {{ {net_text} }} base_lr: 0.1 lr_policy: 'fixed' max_iter: 1 "
                              f"solver_mode: CPU", caffe_pb2.SolverParameter())
    solver = Solver(param)
    solver.step(1)
    assert solver.iter == 1


def test_net_input_paths_resolve_like_a_run_from_the_experiment_folder(tmp_path, monkeypatch):
    """The solver names its net and the net its list file relative to exper/; we run from elsewhere."""
    exper = tmp_path / "exper"
    folder = exper / "cfg"
    net = write_dataset(folder)
    net.write_text(net.read_text().replace(str(folder / "list.txt"), "cfg/list.txt"))
    solver = solver_file(folder, net='"cfg/net.prototxt"', snapshot_prefix='"cfg/snap"', max_iter=1)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    trained = Solver(solver)
    trained.solve()
    assert (folder / "snap_iter_1.caffemodel").exists()
    assert not any(elsewhere.iterdir())
