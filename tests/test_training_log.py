"""Training logs read back into runs and records (rloss.training_log): a real `python -m rloss train`
log, caffe.bin's own logs, prefixes, other tools' lines, runs appended in one file; and the
TensorBoard handler that reads the solver's records the same way (rloss.tensorboard_log)."""

from __future__ import annotations

import logging
import os
import subprocess
import sys

import pytest

from rloss.errors import LogError
from rloss.solver import Solver
from rloss.training_log import TrainingLog, parse_line, read_log
from tests.shared_data import REPO, shared_path
from tests.test_solver import solver_file, write_dataset

ACCURACY = """layer { name: "accuracy" type: "Accuracy" bottom: "ip2" bottom: "label" top: "accuracy"
  include { phase: TEST } }
"""
# 5 iterations shown, lr halved every 2, tests (with Caffe's `Test loss`) at 0, 2 and 4
FIELDS = {"max_iter": 4, "lr_policy": '"step"', "gamma": 0.5, "stepsize": 2, "test_iter": 2, "test_interval": 2,
          "test_compute_loss": "true"}


def tiny_solver(folder, **fields):
    """tests/test_solver.py's tiny HDF5 net with an Accuracy output in its test phase."""
    net = write_dataset(folder)
    net.write_text(net.read_text() + ACCURACY)
    return solver_file(folder, net=f'"{net}"', **{**FIELDS, **fields})


@pytest.fixture(scope="module")
def trained_log(tmp_path_factory):
    """The log (stderr) of a real `python -m rloss train` run of the tiny solver."""
    folder = tmp_path_factory.mktemp("run")
    solver = tiny_solver(folder)
    log = folder / "train.log"
    with open(log, "w") as stderr:
        result = subprocess.run([sys.executable, "-m", "rloss", "train", f"--solver={solver}"], stderr=stderr,
                                timeout=300, env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert result.returncode == 0, log.read_text()
    return log


def values_after(text: str, marker: str) -> dict[int, float]:
    """{N: X} of the lines `... Iteration N<marker>X`, read with plain string splits."""
    found = {}
    for line in text.splitlines():
        head, sep, value = line.partition(marker)
        if sep and "] Iteration " in head:
            found[int(head.rsplit("Iteration ", 1)[1])] = float(value)
    return found


def test_a_real_training_log(trained_log):
    text = trained_log.read_text()
    [run] = read_log(trained_log)
    assert [r.iteration for r in run.records] == [0, 1, 2, 3, 4]
    assert {r.iteration: r.loss for r in run.records} == values_after(text, ", loss = ")
    assert {r.iteration: r.lr for r in run.records if r.lr is not None} == values_after(text, ", lr = ")
    assert [r.lr for r in run.records] == [0.1, 0.1, 0.05, 0.05, None]
    assert all(set(r.train) == {"loss"} for r in run.records[:4])
    assert [sorted(r.test) for r in run.records] == [[0], [], [0], [], [0]]
    for record in run.records[::2]:
        assert set(record.test[0]) == {"total loss", "accuracy", "loss"}
        assert 0 <= record.test[0]["accuracy"] <= 1
    series = run.series()
    assert list(series) == ["loss", "lr", "train/loss", "test#0/total loss", "test#0/accuracy", "test#0/loss"]
    assert series["test#0/accuracy"][0] == [0, 2, 4]


def test_caffe_bin_logs():
    poly = shared_path("golden", "02_solver", "poly", "train_log.txt")
    [run] = read_log(poly)
    records = {r.iteration: r for r in run.records}
    assert sorted(records) == [0, 1, 2, 3, 4, 5]
    assert (records[0].loss, records[0].lr, records[0].train) == (1.61717, 0.01, {"loss": 1.63081})
    assert records[1].lr == 0.00818052 and records[4].train == {"loss": 1.51081}
    assert (records[5].loss, records[5].lr) == (1.48167, None)  # Solve's last display, after the updates
    step = shared_path("golden", "02_solver", "step", "train_log.txt")
    [run] = read_log(step)
    assert [r.lr for r in run.records] == [0.01, 0.01, 0.001, 0.001, 0.0001, None]


def test_runs_appended_in_one_file(trained_log, tmp_path):
    """A second run (its `Solving` line) and a pycaffe-style restart without one both start runs."""
    lines = trained_log.read_text().splitlines(keepends=True)
    without_solving = [line for line in lines if "] Solving " not in line]
    both = tmp_path / "both.log"
    both.write_text("".join(lines + ["sh: phase 2\n"] + lines + without_solving))
    runs = read_log(both)
    assert len(runs) == 3
    assert all(run.records == runs[0].records for run in runs)


def test_a_restart_at_the_same_iteration_is_a_new_run():
    log = TrainingLog()
    for text in ["Iteration 0, loss = 2", "Iteration 0, lr = 0.1", "Iteration 5, loss = 1",
                 "Iteration 5, loss = 1.5", "Iteration 5, lr = 0.1", "Iteration 6, loss = 1.4",
                 "Iteration 2, loss = 3"]:
        log.feed(text)
    assert [[(r.iteration, r.loss, r.lr) for r in run.records] for run in log.runs] == [
        [(0, 2.0, 0.1), (5, 1.0, None)], [(5, 1.5, 0.1), (6, 1.4, None)], [(2, 3.0, None)]]


@pytest.mark.parametrize("line", [
    "I1121 22:53:01.123456 12345 solver.py:144] Iteration 7, loss = 0.25",
    "I20261121 21:05:06.850150 24500 solver.cpp:229] Iteration 7, loss = 0.25\r\n",
    "[rank0]: I1121 22:53:01.123456   123 solver.cpp:229] Iteration 7, loss = 0.25",
    "50%|#####     | I1121 22:53:01.1 7 solver.py:144] Iteration 7, loss = 0.25",
    "Iteration 7, loss = 0.25",
    "I0101 00:00:00.000000 9 solver.cpp:228] Iteration 7 (3.1 iter/s, 6.4s/20 iters), loss = 0.25",
])
def test_prefixes(line):
    assert parse_line(line)[:2] == ("loss", 7) and parse_line(line).value == 0.25


@pytest.mark.parametrize("line", [
    "INFO:root:Iteration 7, loss = 0.25", "I1121 22:53:01.123456 1 solver.py:1] Iteration 7, loss = fast",
    "I1121 22:53:01.123456 1 solver.py:1] Iteration 7: fp16 gradients overflowed (loss scale 65536): ...",
    "    Progress: 7/10 iterations, 0.1 s/iter, about 1s left", "",
])
def test_other_lines_are_skipped(line):
    assert parse_line(line) is None


def test_outputs_tests_and_other_tools_lines():
    log = TrainingLog()
    points = [log.feed(text) for text in [
        "    Train net output #0: loss = 9",  # the start of the log is missing: no loss line before it
        "Iteration 10, Testing net (#1)",
        "Test loss: 0.5",
        "    Test net output #0: accuracy = 0.9",
        "some other tool: Test net output ... ",
        "    Test net output #1: accuracy = 0.6",
        "    Test net output #2: accuracy = 0.4",
        "    Test net output #3: loss = 0.5 (* 1 = 0.5 loss)",
        "Iteration 10, loss = -nan",
        "    Train net output #0: loss = inf (* 1 = inf loss)",
        "    Test net output #0: accuracy = 0.1",  # not after a test line
        "Iteration 10, lr = 1e-08",
    ]]
    [run] = log.runs
    [record] = run.records
    assert record.test == {1: {"total loss": 0.5, "accuracy": 0.9, "accuracy[1]": 0.6, "accuracy[2]": 0.4,
                               "loss": 0.5}}
    assert record.train == {"loss": float("inf")} and record.lr == 1e-08 and record.loss != record.loss
    assert [p for p in points if p is not None][:3] == [(10, "test#1/total loss", 0.5),
                                                        (10, "test#1/accuracy", 0.9), (10, "test#1/accuracy[1]", 0.6)]
    assert points[0] is None and points[4] is None and points[10] is None


def test_a_log_without_iteration_lines(tmp_path):
    path = tmp_path / "empty.log"
    path.write_text("I1121 22:53:01.123456 1 caffe.cpp:1] Use CPU.\nSolving tiny\n")
    with pytest.raises(LogError, match=f"{path}: no training lines"):
        read_log(path)


# ---- TensorBoard ------------------------------------------------------------------------------------

def test_tensorboard_handler_writes_the_solver_scalars(tmp_path, caplog):
    pytest.importorskip("tensorboard", reason="tensorboard is not installed (pip install tensorboard)")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from rloss.tensorboard_log import TensorBoardHandler, attach_tensorboard

    solver = Solver(tiny_solver(tmp_path / "net"))
    detach = attach_tensorboard(str(tmp_path / "tb"))
    try:
        with caplog.at_level(logging.INFO, logger="rloss"):
            solver.solve()
    finally:
        detach()
    assert not any(isinstance(handler, TensorBoardHandler) for handler in logging.getLogger("rloss").handlers)
    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    assert set(events.Tags()["scalars"]) == {"loss", "lr", "train/loss", "test#0/total loss", "test#0/accuracy",
                                             "test#0/loss"}
    text = "\n".join(f"I0101 00:00:00.0 1 s.py:1] {message}" for message in caplog.messages)
    for tag, marker in (("loss", ", loss = "), ("lr", ", lr = ")):
        scalars = {event.step: event.value for event in events.Scalars(tag)}
        assert scalars == pytest.approx(values_after(text, marker), rel=1e-6)
    assert [event.step for event in events.Scalars("test#0/accuracy")] == [0, 2, 4]


def test_tensorboard_missing_is_our_error(tmp_path, monkeypatch):
    from rloss.tensorboard_log import attach_tensorboard

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    with pytest.raises(LogError, match="pip install tensorboard"):
        attach_tensorboard(str(tmp_path / "tb"))
    assert not (tmp_path / "tb").exists()


def test_train_writes_tensorboard_scalars_from_the_command_line(tmp_path, capsys):
    pytest.importorskip("tensorboard", reason="tensorboard is not installed (pip install tensorboard)")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from rloss.cli.main import main
    from rloss.tensorboard_log import TensorBoardHandler

    assert main(["train", f"--solver={tiny_solver(tmp_path / 'net')}", f"--tensorboard={tmp_path / 'tb'}"]) == 0
    assert not any(isinstance(handler, TensorBoardHandler) for handler in logging.getLogger("rloss").handlers)
    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    assert {"loss", "lr"} <= set(events.Tags()["scalars"])
    assert [event.step for event in events.Scalars("lr")] == sorted({event.step for event in events.Scalars("lr")})
