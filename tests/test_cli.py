"""The command lines: caffe.bin's flag syntaxes, one-line errors with exit codes 1 (bad files) and 2
(bad flags), `test` with its confusion-matrix summary and PNGs, `time`, and `python -m rloss.solve`."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from rloss.cli.main import build_parser, main
from rloss.cli.train import main as solve_main
from rloss.net import Net
from rloss.proto import caffe_pb2
from tests.shared_data import REPO
from tests.test_solver import solver_file, write_dataset

h5py = pytest.importorskip("h5py")

SEG_NET = """name: "seg"
layer {{ name: "data" type: "HDF5Data" top: "data" top: "label"
  hdf5_data_param {{ source: "{source}" batch_size: 2 }} }}
layer {{ name: "score" type: "Convolution" bottom: "data" top: "score"
  convolution_param {{ num_output: 3 kernel_size: 1 weight_filler {{ type: "gaussian" std: 1 }} }} }}
layer {{ name: "accuracy" type: "SegAccuracy" bottom: "score" bottom: "label" top: "accuracy"
  seg_accuracy_param {{ ignore_label: 255 reset: false }} }}
"""


def error_line(text: str) -> str:
    assert "Traceback" not in text
    lines = [line for line in text.splitlines() if line.strip()]
    assert lines and lines[-1].startswith("rloss: error: ")
    return lines[-1]


# ---- flags ------------------------------------------------------------------------------------------

def test_flags_accept_caffe_and_gnu_syntax():
    parser = build_parser()
    for argv in (["train", "--solver=s.prototxt", "--weights=w.caffemodel", "--gpu=0"],
                 ["train", "--solver", "s.prototxt", "--weights", "w.caffemodel", "--gpu", "0"],
                 ["train", "-solver", "s.prototxt", "-weights=w.caffemodel", "-gpu", "0"]):
        args = parser.parse_args(argv)
        assert (args.solver, args.weights, args.gpu) == ("s.prototxt", "w.caffemodel", "0")
    args = parser.parse_args(["test", "--model=m", "--weights=w", "--set", "A=1", "--set=B=2"])
    assert args.iterations is None and args.set == ["A=1", "B=2"]  # None: the whole test list


@pytest.mark.parametrize("argv", [
    ["train", "--solver=s.prototxt", "--bogus"],
    ["train"],
    ["train", "--solver=s", "--weights=w", "--snapshot=x"],
    ["test", "--model=m.prototxt"],
    ["time"],
    ["train", "--solver=s", "--sigint_effect=explode"],
    ["fly"],
])
def test_usage_errors_exit_2(argv, capsys):
    with pytest.raises(SystemExit) as caught:
        main(argv)
    assert caught.value.code == 2
    assert re.search(r"^rloss( \w+)?: error: ", capsys.readouterr().err, re.MULTILINE)


def test_missing_solver_is_one_line_and_exit_1(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["train", "--solver=nope.prototxt"]) == 1
    assert "solver file 'nope.prototxt' does not exist" in error_line(capsys.readouterr().err)


def test_missing_variable_says_how_to_set_it(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("DATA_ROOT", raising=False)
    net = write_dataset(tmp_path)
    net.write_text(net.read_text().replace(str(tmp_path / "list.txt"), "${DATA_ROOT}list.txt"))
    solver = solver_file(tmp_path, net=f'"{net}"')
    assert main(["train", f"--solver={solver}"]) == 1
    line = error_line(capsys.readouterr().err)
    assert "${DATA_ROOT}" in line and "--set DATA_ROOT=" in line
    assert main(["train", f"--solver={solver}", "--set", f"DATA_ROOT={tmp_path}/"]) == 0


def test_a_one_device_command_refuses_several_gpus(tmp_path, capsys):
    """`train --gpu=0,1` trains data-parallel (tests/test_distributed.py); `time` runs on one device."""
    solver_file(tmp_path)
    assert main(["time", f"--model={tmp_path / 'net.prototxt'}", "--gpu=0,1"]) == 1
    assert re.search(r"--gpu=0,1: (this command runs on one device|CUDA is not available)",
                     error_line(capsys.readouterr().err))


def test_solve_module_trains_with_weights_and_set(tmp_path, capsys):
    first = solver_file(tmp_path / "a", max_iter=2, snapshot=2)
    assert solve_main([str(first)]) == 0
    second = solver_file(tmp_path / "b", max_iter=1, net='"${NETFILE}"')
    code = solve_main([str(second), "--weights", str(tmp_path / "a" / "snap_iter_2.caffemodel"),
                       "--set", f"NETFILE={tmp_path / 'a' / 'net.prototxt'}"])
    err = capsys.readouterr().err
    assert code == 0, err
    assert f"Finetuning from {tmp_path / 'a' / 'snap_iter_2.caffemodel'}" in err
    assert "Optimization Done." in err


def test_process_exit_code_and_message():
    result = subprocess.run([sys.executable, "-m", "rloss", "train", "--solver=/nonexistent/solver.prototxt"],
                            capture_output=True, text=True, timeout=120,
                            env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert result.returncode == 1
    assert "does not exist" in error_line(result.stderr)


# ---- test and time ----------------------------------------------------------------------------------

def segmentation_case(folder):
    """4 samples of 3x5x5 data and 1x5x5 labels in {0, 1, 2, 255}, a net scoring them, its weights."""
    rng = np.random.RandomState(5)
    data = rng.randn(4, 3, 5, 5).astype(np.float32)
    label = rng.randint(0, 3, size=(4, 1, 5, 5)).astype(np.float32)
    label[rng.rand(*label.shape) < 0.2] = 255
    folder.mkdir(parents=True, exist_ok=True)
    with h5py.File(folder / "seg.h5", "w") as handle:
        handle["data"], handle["label"] = data, label
    (folder / "list.txt").write_text(f"{folder / 'seg.h5'}\n")
    model = folder / "seg.prototxt"
    model.write_text(SEG_NET.format(source=folder / "list.txt"))
    net = Net.from_prototxt(model, caffe_pb2.TEST)
    net.save(folder / "seg.caffemodel")
    weight, bias = (p.detach().numpy() for p in net.params["score"])
    return data, label, weight.reshape(3, 3), bias, model


def numbers(text: str, name: str) -> float:
    return float(re.search(rf"{re.escape(name)} = (\S+)", text).group(1))


def test_test_command_prints_caffe_lines_and_the_summary(tmp_path, capsys):
    data, label, weight, bias, model = segmentation_case(tmp_path)
    code = main(["test", f"--model={model}", f"--weights={tmp_path / 'seg.caffemodel'}", "--iterations=2",
                 f"--output_dir={tmp_path / 'out'}"])
    err = capsys.readouterr().err
    assert code == 0, err
    scores = np.einsum("oc,nchw->nohw", weight, data) + bias[None, :, None, None]
    prediction = scores.argmax(axis=1)
    truth = label[:, 0].astype(int)
    matrix = np.zeros((3, 3))
    for t, p in zip(truth[truth != 255], prediction[truth != 255]):
        matrix[t, p] += 1
    iou = [matrix[c, c] / (matrix[c].sum() + matrix[:, c].sum() - matrix[c, c]) for c in range(3)]
    summary = err.split("Confusion-matrix summary")[1]
    assert numbers(summary, "pixel accuracy") == pytest.approx(np.trace(matrix) / matrix.sum(), rel=1e-5)
    assert numbers(summary, "mean accuracy") == pytest.approx(np.mean(np.diag(matrix) / matrix.sum(1)), rel=1e-5)
    assert numbers(summary, "mean IoU") == pytest.approx(np.mean(iou), rel=1e-5)
    # Caffe's own lines: SegAccuracy with reset false is cumulative, so the last batch = the dataset
    batch_lines = re.findall(r"Batch 1, accuracy = (\S+)", err)
    assert float(batch_lines[0]) == pytest.approx(np.trace(matrix) / matrix.sum(), rel=1e-5)
    assert re.search(r"\] Loss: 0\n", err) and re.search(r"\] accuracy = \S+\n", err)
    for k in range(4):
        image = Image.open(tmp_path / "out" / f"{k:06d}.png")
        assert image.mode == "P" and np.array_equal(np.array(image), prediction[k])


def test_test_command_with_a_named_score_blob_of_the_wrong_size(tmp_path, capsys):
    _, _, _, _, model = segmentation_case(tmp_path)
    code = main(["test", f"--model={model}", f"--weights={tmp_path / 'seg.caffemodel'}", "--iterations=1",
                 "--score_blob=nothing"])
    assert code == 1
    assert "--score_blob=nothing" in error_line(capsys.readouterr().err)


def test_time_command_reports_every_layer(tmp_path, capsys):
    net = write_dataset(tmp_path)
    assert main(["time", f"--model={net}", "--iterations=2"]) == 0
    err = capsys.readouterr().err
    for layer in ("data", "ip1", "relu", "ip2", "loss"):
        assert re.search(rf"\s{layer}\tforward: \S+ ms\.", err)
        assert re.search(rf"\s{layer}\tbackward: \S+ ms\.", err)
    assert "Average Forward-Backward:" in err and "*** Benchmark ends ***" in err
    assert float(re.search(r"ip1\tbackward: (\S+) ms", err).group(1)) > 0
