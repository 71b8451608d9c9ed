"""`python -m rloss train` against real `caffe.bin train` runs (golden/02_solver): weights and momentum
history after each of 5 iterations (step and poly policies, iter_size 2), the solver states, and the
numbers in the log lines. The golden case is run as Caffe ran it: from the folder holding 02_solver/."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from rloss.cli.main import main
from rloss.io import read_net_param, read_solver_state
from rloss.proto.blob import blob_to_array
from tests.helpers import relative_error
from tests.shared_data import REPO, shared_path

pytest.importorskip("h5py")
LOG_LINE = re.compile(r"(Iteration \d+, (?:loss|lr) = \S+|Train net output #\d+: .*)$")


@pytest.fixture
def golden_copy(tmp_path, monkeypatch):
    """golden/02_solver copied to tmp/02_solver without Caffe's snapshots 1..5; cwd = tmp."""
    source = shared_path("golden", "02_solver")
    target = tmp_path / "02_solver"
    shutil.copytree(source, target, ignore=shutil.ignore_patterns("snap_iter_[1-9]*"))
    monkeypatch.chdir(tmp_path)
    return source


def snapshot_errors(run: Path, golden: Path, k: int) -> float:
    """Largest relative error of snapshot k's weights and history against Caffe's."""
    errors = []
    for layer in read_net_param(run / f"snap_iter_{k}.caffemodel").layer:
        for j, blob in enumerate(layer.blobs):
            expected = np.load(golden / f"snap_iter_{k}_npy" / f"{layer.name}_{j}.npy")
            errors.append(relative_error(blob_to_array(blob, "w").reshape(expected.shape), expected))
    state = read_solver_state(run / f"snap_iter_{k}.solverstate")
    assert len(state.history) == 4
    for i, blob in enumerate(state.history):
        expected = np.load(golden / f"snap_iter_{k}_history_npy" / f"history_{i}.npy")
        errors.append(relative_error(blob_to_array(blob, "h").reshape(expected.shape), expected))
    return max(errors)


def golden_state_fields(golden: Path, k: int) -> tuple[int, int]:
    text = (golden / f"snap_iter_{k}_history_npy" / "iter.txt").read_text().split()
    return int(text[1]), int(text[3])


def log_numbers(text: str) -> list[str]:
    """The Caffe log lines that carry numbers, without their glog prefixes."""
    return [m.group(1) for m in map(LOG_LINE.search, text.splitlines()) if m]


def check_run(policy: str, golden_root: Path, log_text: str) -> None:
    run, golden = Path("02_solver") / policy, golden_root / policy
    for k in range(1, 6):
        assert snapshot_errors(run, golden, k) <= 1e-5, f"snapshot {k}"
        state = read_solver_state(run / f"snap_iter_{k}.solverstate")
        assert (state.iter, state.current_step) == golden_state_fields(golden, k)
        assert state.learned_net == f"02_solver/{policy}/snap_iter_{k}.caffemodel"
    expected = log_numbers((golden / "train_log.txt").read_text())
    assert len(expected) == 16
    assert log_numbers(log_text) == expected


@pytest.mark.parametrize("policy", ["step", "poly"])
def test_train_matches_caffe(golden_copy, capsys, policy):
    code = main(["train", f"--solver=02_solver/{policy}/solver.prototxt",
                 "--weights=02_solver/init_iter_0.caffemodel"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    check_run(policy, golden_copy, captured.err)
    assert "Optimization Done." in captured.err


def test_resume_from_caffe_solverstate(golden_copy, capsys):
    """Caffe's own snapshot 2 (weights + history + current_step) continued by rloss gives Caffe's 5."""
    for suffix in ("caffemodel", "solverstate"):
        shutil.copy(golden_copy / "step" / f"snap_iter_2.{suffix}", Path("02_solver/step"))
    code = main(["train", "--solver", "02_solver/step/solver.prototxt",
                 "--snapshot", "02_solver/step/snap_iter_2.solverstate"])
    assert code == 0, capsys.readouterr().err
    for k in (3, 4, 5):
        assert snapshot_errors(Path("02_solver/step"), golden_copy / "step", k) <= 1e-5


def test_real_command_line_run(golden_copy):
    environment = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    result = subprocess.run(
        [sys.executable, "-m", "rloss", "train", "--solver", "02_solver/poly/solver.prototxt",
         "--weights", "02_solver/init_iter_0.caffemodel"],
        capture_output=True, text=True, env=environment, timeout=300,
    )
    assert result.returncode == 0, result.stderr
    check_run("poly", golden_copy, result.stderr)
