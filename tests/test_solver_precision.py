"""The solver under --precision: fp16's loss scaling inside Caffe's update (a step whose gradients
overflow is skipped and logged, the others equal fp32's update of the unscaled gradients), the scale
kept in the solver state, bf16 training from the command line with float32 snapshots, and bad names
refused before anything is built or written."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from rloss import caffe
from rloss.cli.main import main
from rloss.errors import PrecisionError
from rloss.io import read_net_param, read_solver_state
from rloss.precision import LossScaler
from rloss.proto.blob import blob_to_array
from rloss.solver import Solver
from tests.test_precision import needs_cpu_fp16
from tests.test_solver import solver_file


def weights(solver) -> list[torch.Tensor]:
    return [entry.tensor.detach().clone() for entry in solver.net.learnable]


@needs_cpu_fp16
def test_fp16_scaling_leaves_the_update_unchanged_and_an_overflow_skips_it(tmp_path, caplog):
    """Scales are powers of two, so a scaled-then-unscaled fp16 step equals the update of fp16's
    own gradients; with a scale that overflows float32, the update is skipped and the scale halves."""
    fp16 = Solver(solver_file(tmp_path / "a", max_iter=1), precision="fp16")
    unscaled = Solver(solver_file(tmp_path / "b", max_iter=1), precision="fp16")
    unscaled.scaler = LossScaler(enabled=False)
    fp16.step(1)
    unscaled.step(1)
    for got, want in zip(weights(fp16), weights(unscaled)):
        assert torch.equal(got, want)
    before = weights(fp16)
    fp16.scaler = LossScaler(enabled=True, initial=2.0 ** 127)  # loss * 2^127 makes the gradients inf
    with caplog.at_level(logging.INFO, logger="rloss"):
        fp16.step(1)
    assert "Iteration 1: fp16 gradients overflowed (loss scale 1.70141e+38): update skipped, scale now " \
           "8.50706e+37" in caplog.text
    assert fp16.iter == 2 and fp16.scaler.value == 2.0 ** 126
    for got, want in zip(weights(fp16), before):
        assert torch.equal(got, want)


@needs_cpu_fp16
def test_the_loss_scale_is_kept_in_the_solver_state(tmp_path):
    solver = Solver(solver_file(tmp_path / "a", max_iter=2, snapshot=2), precision="fp16")
    solver.scaler = LossScaler(enabled=True, initial=2.0 ** 10, growth_interval=100)
    solver.solve()
    state = read_solver_state(str(tmp_path / "a" / "snap_iter_2.solverstate"))
    assert (state.resume.loss_scale, state.resume.loss_scale_finite_steps) == (2.0 ** 10, 2)
    resumed = Solver(solver_file(tmp_path / "b", max_iter=2), precision="fp16")
    resumed.restore(tmp_path / "a" / "snap_iter_2.solverstate")
    assert resumed.scaler.state_dict() == {"scale": 2.0 ** 10, "finite_steps": 2}


def test_bf16_training_from_the_command_line_writes_float32_snapshots(tmp_path, capsys):
    solver = solver_file(tmp_path, max_iter=2, snapshot=2)
    assert main(["train", f"--solver={solver}", "--precision=bf16"]) == 0
    model = read_net_param(str(tmp_path / "snap_iter_2.caffemodel"))
    for layer in model.layer:
        for blob in layer.blobs:
            assert len(blob.data) and not len(blob.double_data)  # float32 blobs, as Caffe writes them
            assert np.isfinite(blob_to_array(blob, layer.name)).all()
    state = read_solver_state(str(tmp_path / "snap_iter_2.solverstate"))
    assert not state.resume.HasField("loss_scale")  # bf16 needs no loss scaling


@pytest.mark.parametrize("precision", ["fp64", "half"])
def test_an_unknown_precision_is_refused_before_anything_is_built(tmp_path, capsys, precision):
    solver = solver_file(tmp_path, max_iter=2, snapshot=1)
    assert main(["train", f"--solver={solver}", f"--precision={precision}"]) == 1
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error == f"rloss: error: --precision: unknown precision '{precision}' (known: fp32, bf16, fp16)"
    assert not list(tmp_path.glob("snap*"))
    with pytest.raises(PrecisionError):
        caffe.SGDSolver(str(solver), precision=precision)
