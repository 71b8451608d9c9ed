"""The six solver types against numpy transcriptions of Caffe's update rules written here (float64):
5 iterations of the tiny net of test_solver (lr_mult 1 and 2, decay_mult 0 on a bias, a frozen layer
whose gradient is only its weight decay, a step lr policy), weights and every history blob within 1e-5;
history layout and resume; the types' checks; the legacy enum; pycaffe's classes."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from rloss import caffe
from rloss.errors import SolverError
from rloss.io import read_solver_state
from rloss.solver import Solver
from tests.test_solver import DATA, LABELS, assert_close, initial_weights, solver_file

pytest.importorskip("h5py")

LR_MULT = (1, 2, 0, 0)  # ip1 weight, ip1 bias, ip2 weight, ip2 bias
DECAY_MULT = (1, 0, 1, 1)
DECAY = 0.01

TYPES = {  # solver fields for each type
    "SGD": {"momentum": 0.9, "base_lr": 0.1},
    "Nesterov": {"momentum": 0.9, "base_lr": 0.1},
    "AdaGrad": {"momentum": 0, "base_lr": 0.1, "delta": 1e-6},
    "RMSProp": {"momentum": 0, "base_lr": 0.05, "rms_decay": 0.9, "delta": 1e-6},
    "AdaDelta": {"momentum": 0.95, "base_lr": 1.0, "delta": 1e-6},
    "Adam": {"momentum": 0.9, "momentum2": 0.99, "base_lr": 0.05, "delta": 1e-8},
}


def gradients(weights: list[np.ndarray], rows: list[int]) -> list[np.ndarray]:
    """d(mean cross-entropy over `rows`)/d(ip1 weight, ip1 bias), float64; the frozen ip2's diffs stay
    0 (Caffe computes no diff for lr_mult 0)."""
    w1, b1, w2, b2 = (torch.tensor(w, dtype=torch.float64, requires_grad=i < 2) for i, w in enumerate(weights))
    x = torch.tensor(DATA[rows], dtype=torch.float64)
    y = torch.tensor(LABELS[rows], dtype=torch.int64)
    scores = torch.clamp(x @ w1.T + b1, min=0) @ w2.T + b2
    loss = -torch.log_softmax(scores, dim=1)[torch.arange(len(rows)), y].mean()
    return [g.numpy() for g in torch.autograd.grad(loss, [w1, b1])] + [np.zeros_like(weights[2]),
                                                                       np.zeros_like(weights[3])]


def caffe_step(kind: str, fields: dict, g: np.ndarray, history: list[np.ndarray], lr: float, t: int) -> np.ndarray:
    """Caffe's ComputeUpdateValue for one parameter: the step, `history` updated in place."""
    momentum, delta = fields.get("momentum", 0.0), fields.get("delta", 1e-8)
    if kind == "SGD":
        history[0][...] = momentum * history[0] + lr * g
        return history[0].copy()
    if kind == "Nesterov":
        previous = history[0].copy()
        history[0][...] = momentum * history[0] + lr * g
        return (1 + momentum) * history[0] - momentum * previous
    if kind == "AdaGrad":
        history[0][...] = history[0] + g * g
        return lr * g / (np.sqrt(history[0]) + delta)
    if kind == "RMSProp":
        decay = fields["rms_decay"]
        history[0][...] = decay * history[0] + (1 - decay) * g * g
        return lr * g / (np.sqrt(history[0]) + delta)
    if kind == "AdaDelta":
        history[0][...] = momentum * history[0] + (1 - momentum) * g * g
        step = g * np.sqrt((history[1] + delta) / (history[0] + delta))
        history[1][...] = momentum * history[1] + (1 - momentum) * step * step
        return lr * step
    beta2 = fields["momentum2"]
    history[0][...] = momentum * history[0] + (1 - momentum) * g
    history[1][...] = beta2 * history[1] + (1 - beta2) * g * g
    correction = np.sqrt(1 - beta2 ** (t + 1)) / (1 - momentum ** (t + 1))
    return lr * correction * history[0] / (np.sqrt(history[1]) + delta)


def caffe_run(kind: str, fields: dict, weights: list[np.ndarray], rates: list[float]):
    """`len(rates)` iterations of Caffe's solver `kind`: regularize (g + decay * decay_mult * w), the
    rule, w -= step; the data layer's batches of 2 take samples 0-1, then 2-3, in turn. Returns the
    weights and the history blobs in Caffe's order."""
    weights = [w.astype(np.float64) for w in weights]
    sets = 2 if kind in ("AdaDelta", "Adam") else 1
    history = [[np.zeros_like(w) for w in weights] for _ in range(sets)]
    for t, rate in enumerate(rates):
        for i, g in enumerate(gradients(weights, [0, 1] if t % 2 == 0 else [2, 3])):
            g = g + DECAY * DECAY_MULT[i] * weights[i]
            step = caffe_step(kind, fields, g, [h[i] for h in history], rate * LR_MULT[i], t)
            weights[i] = weights[i] - step
    return weights, [h for blobs in history for h in blobs]


def typed_solver_file(folder, kind: str, **extra):
    fields = {**TYPES[kind], "type": f'"{kind}"', "lr_policy": '"step"', "gamma": 0.5, "stepsize": 2,
              "weight_decay": DECAY, "max_iter": 5, **extra}
    return solver_file(folder, **fields)


@pytest.mark.parametrize("kind", list(TYPES))
def test_five_iterations_follow_caffes_rule(tmp_path, kind):
    solver = Solver(typed_solver_file(tmp_path, kind))
    start = initial_weights(solver)
    solver.step(5)
    weights, history = caffe_run(kind, TYPES[kind], start, [TYPES[kind]["base_lr"] * 0.5 ** (t // 2)
                                                            for t in range(5)])
    ours = [p.detach().numpy() for name in ("ip1", "ip2") for p in solver.net.params[name]]
    for actual, expected in zip(ours, weights):
        assert_close(actual, expected)
    assert len(solver.history) == len(history)
    for actual, expected in zip(solver.history, history):
        if np.abs(expected).max() == 0:
            assert not actual.any()
        else:
            assert_close(actual.numpy(), expected)
    if kind in ("SGD", "Nesterov"):  # the frozen layer never moves
        assert all(np.array_equal(a, b) for a, b in zip(ours[2:], start[2:]))
    if kind in ("AdaGrad", "RMSProp", "AdaDelta", "Adam"):  # its histories still see the weight decay
        assert solver.history[2].abs().max() > 0


@pytest.mark.parametrize("kind, snapshot_format", [("Nesterov", "BINARYPROTO"), ("AdaDelta", "BINARYPROTO"),
                                                   ("Adam", "BINARYPROTO"), ("Adam", "HDF5")])
def test_resume_equals_an_uninterrupted_run(tmp_path, kind, snapshot_format):
    whole = Solver(typed_solver_file(tmp_path / "whole", kind))
    whole.step(5)
    first = Solver(typed_solver_file(tmp_path / "first", kind, snapshot=2, snapshot_format=snapshot_format))
    first.step(2)
    extension = ".solverstate.h5" if snapshot_format == "HDF5" else ".solverstate"
    state_file = tmp_path / "first" / f"snap_iter_2{extension}"
    state = read_solver_state(str(state_file))
    assert len(state.history) == len(first.history) == 4 * first.rule.history_sets
    resumed = Solver(typed_solver_file(tmp_path / "resumed", kind))
    resumed.restore(str(state_file))
    resumed.step(3)
    for a, b in zip([*whole.net.parameters(), *whole.history], [*resumed.net.parameters(), *resumed.history]):
        assert torch.equal(a, b)


def test_a_state_of_another_type_is_refused(tmp_path):
    sgd = Solver(typed_solver_file(tmp_path / "sgd", "SGD", snapshot=1))
    sgd.step(1)
    adam = Solver(typed_solver_file(tmp_path / "adam", "Adam"))
    with pytest.raises(Exception, match="4 history blobs; a Adam solver keeps 2 per learnable parameter, 8"):
        adam.restore(str(tmp_path / "sgd" / "snap_iter_1.solverstate"))


@pytest.mark.parametrize("kind, fields, message", [
    ("AdaGrad", {"momentum": 0.9}, "momentum cannot be used with AdaGrad"),
    ("RMSProp", {"momentum": 0.5}, "momentum cannot be used with RMSProp"),
    ("RMSProp", {"rms_decay": 1.0}, r"rms_decay must lie in \[0, 1\), got 1"),
    ("Adamax", {}, "unknown solver type 'Adamax' .known types: SGD, Nesterov, AdaGrad, RMSProp, AdaDelta, Adam"),
])
def test_caffes_checks(tmp_path, kind, fields, message):
    base = {**TYPES.get(kind, {}), "type": f'"{kind}"', **fields}
    with pytest.raises(SolverError, match=message):
        Solver(solver_file(tmp_path, **base))


def test_rms_decay_defaults_to_bvlc_masters(tmp_path):
    solver = Solver(solver_file(tmp_path, type='"RMSProp"', momentum=0))
    assert solver.param.rms_decay == pytest.approx(0.99)


def test_the_legacy_enum_chooses_the_rule(tmp_path):
    solver = Solver(solver_file(tmp_path, solver_type="ADAM", momentum=0.9))
    assert solver.rule.type_name == "Adam" and solver.param.type == "Adam"


def test_pycaffe_classes_force_their_type_and_get_solver_reads_the_file(tmp_path):
    caffe.set_mode_cpu()
    forced = caffe.AdaGradSolver(str(solver_file(tmp_path / "a", momentum=0)))
    assert isinstance(forced, caffe.Solver) and forced.type == "AdaGrad"
    typed = caffe.get_solver(str(typed_solver_file(tmp_path / "b", "RMSProp")))
    assert isinstance(typed, caffe.RMSPropSolver) and typed.type == "RMSProp"
    assert typed.lr == pytest.approx(TYPES["RMSProp"]["base_lr"])
    events = []
    typed.add_callback(lambda: events.append(("start", typed.iter)),
                       lambda: events.append(("gradients", typed.iter)))
    typed.step(2)
    assert events == [("start", 0), ("gradients", 0), ("start", 1), ("gradients", 1)]
    assert typed.lr == pytest.approx(TYPES["RMSProp"]["base_lr"] * 0.5)  # step policy, stepsize 2
