"""Data-parallel training (rloss.distributed, rloss.data_parallel) on the CPU with gloo, as torchrun runs it:
N ranks at iter_size I make the updates of one process at iter_size I*N (weights and history within 1e-6
relative), with shuffle, mirror, rescaling and the DenseCRF loss; one log and one set of snapshots; a
2-rank state resumes on 2 ranks and on 1; a killed rank or SIGTERM stops every rank; bad flags and data
too small for the ranks give our errors. The data layers' round-robin dealing is also checked in-process."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from google.protobuf import text_format

from rloss.data import synthetic
from rloss.errors import DistributedError
from rloss.io import read_net_param, read_solver_state
from rloss.layers import layer_class
from rloss.proto import caffe_pb2
from rloss.proto.blob import blob_to_array
from rloss.solver import Solver

TRAIN_IMAGES = 5  # batches of 2: 3 batches per pass, so ranks' batches straddle passes and reshuffles
LAUNCH_TIMEOUT_S = 300  # a rank that hangs still fails the test, with a margin for loaded CI cores
NET = """name: "tinyseg"
layer {{ name: "data" type: "ImageSegData" top: "data" top: "label" top: "data_dim"
  image_data_param {{ root_folder: "{root}/" source: "{source}" batch_size: {batch} shuffle: true label_type: PIXEL }}
  transform_param {{ mean_value: 104 mean_value: 117 mean_value: 123 crop_size: 13 mirror: true
    scale_factors: 0.75 scale_factors: 1 }} }}
layer {{ name: "conv1" type: "Convolution" bottom: "data" top: "conv1"
  convolution_param {{ num_output: 4 kernel_size: 3 pad: 1 weight_filler {{ type: "gaussian" std: 0.1 }} }} }}
layer {{ name: "relu1" type: "ReLU" bottom: "conv1" top: "conv1" }}
layer {{ name: "score" type: "Convolution" bottom: "conv1" top: "score"
  convolution_param {{ num_output: 3 kernel_size: 1 weight_filler {{ type: "gaussian" std: 0.1 }} }} }}
layer {{ name: "loss" type: "SoftmaxWithLoss" bottom: "score" bottom: "label" top: "loss"
  loss_param {{ ignore_label: 255 }} }}
layer {{ name: "prob" type: "Softmax" bottom: "score" top: "prob" }}
layer {{ name: "crf" type: "DenseCRFLoss" bottom: "data" bottom: "prob" top: "crf" loss_weight: 0.001
  propagate_down: false propagate_down: true densecrf_loss_param {{ bi_xy_std: 5 bi_rgb_std: 10 }} }}
layer {{ name: "silence" type: "Silence" bottom: "data_dim" }}
"""


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return synthetic.write_dataset(tmp_path_factory.mktemp("ddp") / "data", train=TRAIN_IMAGES, val=2,
                                   height=16, width=18, num_classes=3, seed=2)


def write_net(folder: Path, dataset, batch: int = 2, images: int = TRAIN_IMAGES) -> Path:
    source = folder / f"train_{images}.txt"
    source.write_text("".join(dataset.train_list.read_text().splitlines(keepends=True)[:images]))
    net = folder / f"net_{batch}_{images}.prototxt"
    net.write_text(NET.format(root=dataset.root, source=source, batch=batch))
    return net


def write_solver(folder: Path, net: Path, iter_size: int, max_iter: int = 5, snapshot: int = 0) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "solver.prototxt"
    path.write_text(f'net: "{net}"\nbase_lr: 0.05 lr_policy: "step" gamma: 0.5 stepsize: 3 momentum: 0.9\n'
                    f"weight_decay: 0.0005 max_iter: {max_iter} snapshot: {snapshot} display: 1 random_seed: 5\n"
                    f'solver_mode: CPU iter_size: {iter_size} snapshot_prefix: "{folder / "snap"}"\n')
    return path


def torchrun(ranks: int, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}",
               "-m", "rloss", "train", "--threads=1", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout)


def snapshot_arrays(prefix: Path, iteration: int) -> list[np.ndarray]:
    """The weights of the model and the history of the state of one snapshot."""
    model = read_net_param(str(prefix) + f"_iter_{iteration}.caffemodel")
    state = read_solver_state(str(prefix) + f"_iter_{iteration}.solverstate")
    weights = [blob_to_array(blob, layer.name) for layer in model.layer for blob in layer.blobs]
    return weights + [blob_to_array(blob, "history") for blob in state.history]


def assert_same_run(actual: list[np.ndarray], expected: list[np.ndarray]) -> None:
    assert len(actual) == len(expected)
    for got, want in zip(actual, expected):
        scale = max(float(np.abs(want).max()), 1e-12)
        assert float(np.abs(got - want).max()) / scale <= 1e-6


@pytest.fixture(scope="module")
def one_process(dataset, tmp_path_factory) -> list[np.ndarray]:
    """One process at iter_size 2: the run the 2-rank runs must equal."""
    folder = tmp_path_factory.mktemp("single")
    solver = Solver(write_solver(folder, write_net(folder, dataset), iter_size=2))
    solver.solve()
    for layer in solver.net.data_layers():
        layer.close()
    return snapshot_arrays(folder / "snap", 5)


@pytest.fixture(scope="module")
def two_ranks(dataset, tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    """2 ranks at iter_size 1, a snapshot at iteration 3 and the final one at 5."""
    folder = tmp_path_factory.mktemp("two")
    solver = write_solver(folder, write_net(folder, dataset), iter_size=1, snapshot=3)
    return folder, torchrun(2, f"--solver={solver}")


# ---- through torchrun ----------------------------------------------------------------------------------

def test_two_ranks_equal_one_process_at_twice_the_iter_size(two_ranks, one_process):
    folder, run = two_ranks
    assert run.returncode == 0, run.stderr[-3000:]
    assert_same_run(snapshot_arrays(folder / "snap", 5), one_process)
    for iteration in range(5):  # one log: rank 0's
        assert len(re.findall(rf"\] Iteration {iteration}, loss = ", run.stderr)) == 1
    assert "Data-parallel training on 2 ranks (gloo)" in run.stderr
    written = sorted(path.name for path in folder.iterdir() if path.name.startswith("snap"))
    assert written == ["snap_iter_3.caffemodel", "snap_iter_3.solverstate",
                       "snap_iter_5.caffemodel", "snap_iter_5.solverstate"]
    state = read_solver_state(str(folder / "snap_iter_5.solverstate"))
    assert len(state.resume.other_ranks_torch_random) == 1  # rank 1's generators are kept too


def test_a_two_rank_state_resumes_on_two_ranks_and_on_one(two_ranks, one_process, dataset, tmp_path):
    folder, run = two_ranks
    assert run.returncode == 0, run.stderr[-3000:]
    state = folder / "snap_iter_3.solverstate"
    again = write_solver(tmp_path / "again", write_net(tmp_path, dataset), iter_size=1)
    resumed = torchrun(2, f"--solver={again}", f"--snapshot={state}")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_same_run(snapshot_arrays(tmp_path / "again" / "snap", 5), one_process)
    alone = Solver(write_solver(tmp_path / "alone", write_net(tmp_path, dataset), iter_size=2))
    alone.solve(resume_file=state)
    for layer in alone.net.data_layers():
        layer.close()
    assert_same_run(snapshot_arrays(tmp_path / "alone" / "snap", 5), one_process)


def test_more_ranks_than_batches_is_refused(dataset, tmp_path):
    solver = write_solver(tmp_path, write_net(tmp_path, dataset, batch=2, images=2), iter_size=1)
    run = torchrun(2, f"--solver={solver}")
    assert run.returncode != 0
    assert re.search(r"rloss: error: .*layer 'data' \(type ImageSegData\): the list '.*train_2.txt' makes 1 "
                     r"batch per pass, fewer than the 2 ranks", run.stderr)
    assert not list(tmp_path.glob("snap*"))


def _rank_pids(launcher: subprocess.Popen) -> dict[int, int]:
    """The worker processes torchrun started, by RANK (read from their environment)."""
    found = {}
    for child in Path(f"/proc/{launcher.pid}/task/{launcher.pid}/children").read_text().split():
        environ = Path(f"/proc/{child}/environ").read_bytes().split(b"\0")
        for entry in environ:
            if entry.startswith(b"RANK="):
                found[int(entry[5:])] = int(child)
    return found


def _start_long_run(dataset, folder: Path) -> subprocess.Popen:
    solver = write_solver(folder, write_net(folder, dataset), iter_size=1, max_iter=100000)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               "-m", "rloss", "train", "--threads=1", f"--solver={solver}"]
    log = open(folder / "run.log", "w")
    return subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, text=True)


def _wait_for(folder: Path, pattern: str, seconds: float = 90) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if re.search(pattern, (folder / "run.log").read_text()):
            return
        time.sleep(0.2)
    raise AssertionError(f"no '{pattern}' in the log within {seconds} s:\n{(folder / 'run.log').read_text()[-3000:]}")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="finds the ranks through /proc")
def test_a_killed_rank_stops_the_others_and_is_named(dataset, tmp_path):
    launcher = _start_long_run(dataset, tmp_path)
    try:
        _wait_for(tmp_path, r"Iteration 3, loss")
        os.kill(_rank_pids(launcher)[1], signal.SIGKILL)
        started = time.monotonic()
        code = launcher.wait(timeout=60)
        assert time.monotonic() - started < 60
    finally:
        launcher.kill()
    text = (tmp_path / "run.log").read_text()
    assert code != 0
    assert re.search(r"rank\s*: 1 \(local_rank: 1\)\s+exitcode\s*: -9", text), text[-3000:]  # torchrun's
    # rank 0's own error, when it has time to print it before torchrun stops it (older torchruns stop it
    # at once), names rank 1 too
    for line in re.findall(r"rloss: error: .*", text):
        assert re.search(r"rank 0: .* failed: rank 1 is gone \(killed, or its machine failed\)", line), line


def test_sigterm_stops_every_rank_with_one_snapshot(dataset, tmp_path):
    launcher = _start_long_run(dataset, tmp_path)
    try:
        _wait_for(tmp_path, r"Iteration 3, loss")
        launcher.send_signal(signal.SIGTERM)  # torchrun passes it on to every rank
        launcher.wait(timeout=60)
    finally:
        launcher.kill()
    text = (tmp_path / "run.log").read_text()
    models = sorted(tmp_path.glob("snap_iter_*.caffemodel"))
    states = sorted(tmp_path.glob("snap_iter_*.solverstate"))
    assert len(models) == 1 and len(states) == 1, text[-3000:]
    assert text.count("Optimization stopped early.") == 1


def run_launcher(*python_args: str) -> subprocess.CompletedProcess:
    """Runs `python *python_args`; a launch still running after LAUNCH_TIMEOUT_S fails with its ranks'
    last log lines (where it waited), not a bare TimeoutExpired (the gpu-flags test's two launches take
    15 s on 2 idle cores, 66 s in the oldest environment)."""
    try:
        return subprocess.run([sys.executable, *python_args], capture_output=True, text=True,
                              timeout=LAUNCH_TIMEOUT_S)
    except subprocess.TimeoutExpired as expired:
        stderr = expired.stderr.decode() if isinstance(expired.stderr, bytes) else (expired.stderr or "")
        pytest.fail(f"the launch ran past {LAUNCH_TIMEOUT_S} s; its last log lines:\n{stderr[-3000:]}")


def test_the_gpu_flags_launcher_runs_the_ranks(dataset, one_process, tmp_path):
    """`--gpu=0,1` starts its ranks with rloss.distributed.launch (here `python -m rloss.solve`'s);
    on the CPU it is driven directly."""
    solver = write_solver(tmp_path, write_net(tmp_path, dataset), iter_size=1)
    script = f"from rloss.distributed import launch; launch(2, 'rloss.solve', ['{solver}', '--threads=1'])"
    run = run_launcher("-c", script)
    assert run.returncode == 0, run.stderr[-3000:]
    assert_same_run(snapshot_arrays(tmp_path / "snap", 5), one_process)
    failing = ("from rloss.distributed import launch; from rloss.errors import DistributedError\n"
               "try:\n    launch(2, 'rloss', ['train', '--solver=missing.prototxt'])\n"
               "except DistributedError as error:\n    print(error)\n")
    run = run_launcher("-c", failing)
    assert re.search(r"rank \d \(pid \d+\) exited with code 1.*the other ranks were stopped", run.stdout), run.stderr
    assert "solver file 'missing.prototxt' does not exist" in run.stderr


# ---- flags ---------------------------------------------------------------------------------------------

@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the messages of a machine without CUDA")
@pytest.mark.parametrize("flag, message", [
    ("--gpu=0,1", r"CUDA is not available, so 2 GPUs cannot be used; on the CPU, run the ranks with torchrun"),
    ("--gpu=1,1", r"expected distinct non-negative device ids"),
    ("--gpu=0,x", r"expected device ids separated by commas"),
])
def test_bad_gpu_flags(flag, message, dataset, tmp_path):
    solver = write_solver(tmp_path, write_net(tmp_path, dataset), iter_size=1)
    run = subprocess.run([sys.executable, "-m", "rloss", "train", f"--solver={solver}", flag],
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 1
    assert re.search(message, run.stderr.splitlines()[-1])
    assert not list(tmp_path.glob("snap*"))


# ---- the data layers' dealing, in-process ------------------------------------------------------------

def _layer(dataset, tmp_path, batch: int = 2):
    net = text_format.Parse(write_net(tmp_path, dataset, batch=batch).read_text(), caffe_pb2.NetParameter())
    return layer_class("ImageSegData")(net.layer[0], [], caffe_pb2.TRAIN)


def test_image_ranks_read_every_nth_batch_of_one_process(dataset, tmp_path):
    torch.manual_seed(3)
    whole = _layer(dataset, tmp_path)
    batches = [whole()[0] for _ in range(9)]
    for rank in range(3):
        torch.manual_seed(3)
        layer = _layer(dataset, tmp_path)
        layer.shard(rank, 3)  # the batches read ahead at set-up are planned again
        for k in range(3):
            assert torch.equal(layer()[0], batches[3 * k + rank])
        assert layer.data_state() == whole.data_state()  # every rank stands where one process does
        layer.close()
    whole.close()


def test_hdf5_ranks_read_every_nth_batch_of_one_process(tmp_path, monkeypatch):
    h5py = pytest.importorskip("h5py")
    monkeypatch.chdir(tmp_path)
    with h5py.File("a.h5", "w") as h5:
        h5["data"] = np.arange(7, dtype=np.float32)[:, None]
        h5["label"] = np.zeros((7, 1), np.float32)
    Path("list.txt").write_text("a.h5\n")
    text = ('name: "h5" type: "HDF5Data" top: "data" top: "label" '
            'hdf5_data_param { source: "list.txt" batch_size: 2 shuffle: true }')
    param = text_format.Parse(text, caffe_pb2.LayerParameter())

    def layer():
        torch.manual_seed(4)
        return layer_class("HDF5Data")(param, [], caffe_pb2.TRAIN)

    whole = layer()
    batches = [whole()[0] for _ in range(6)]
    for rank in range(2):
        shard = layer()
        shard.shard(rank, 2)
        for k in range(3):
            assert torch.equal(shard()[0], batches[2 * k + rank])
        assert shard.data_state() == whole.data_state()
    with pytest.raises(DistributedError, match=r"the 7 rows of the files in 'list.txt' makes 4 batches per "
                                               r"pass, fewer than the 5 ranks"):
        layer().shard(0, 5)


def _collectives_rank(rank: int, port: int, results) -> None:
    """One of 2 gloo ranks: rank-dependent tensors of two dtypes through broadcast_tensors and
    average_gradients (the flat grouping must give every tensor its own values back)."""
    import torch.distributed as dist

    from rloss import distributed

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        shared = [torch.full((2, 3), 10.0 * rank + 1), torch.arange(4, dtype=torch.float64) + rank, torch.tensor(rank)]
        distributed.broadcast_tensors(shared, "test")
        grads = [torch.full((3,), float(rank)), torch.full((2, 2), 2.0 * rank, dtype=torch.float64)]
        distributed.average_gradients(grads)
        results.put((rank, [t.tolist() for t in shared], [t.tolist() for t in grads]))
    finally:
        dist.destroy_process_group()


def test_the_flat_collectives_give_each_tensor_its_own_result() -> None:
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    context = mp.get_context("spawn")
    results = context.Queue()
    workers = [context.Process(target=_collectives_rank, args=(rank, port, results)) for rank in range(2)]
    for worker in workers:
        worker.start()
    outcomes = dict((rank, (shared, grads)) for rank, shared, grads in (results.get(timeout=60) for _ in workers))
    for worker in workers:
        worker.join(timeout=30)
    for shared, grads in outcomes.values():
        assert shared == [[[1.0] * 3] * 2, [0.0, 1.0, 2.0, 3.0], 0]  # rank 0's values
        assert grads == [[0.5] * 3, [[1.0, 1.0], [1.0, 1.0]]]  # the means of ranks 0 and 1


def test_no_rank_leaves_training_before_the_others_are_done(tmp_path):
    """distributed.finish holds every rank until the last one is done (rank 0 snapshots after the last
    iteration), so that no rank tears its connections down while another still uses them."""
    script = tmp_path / "finish.py"
    script.write_text(
        "import time\n"
        "from rloss import distributed\n"
        "ranks = distributed.environment_ranks()\n"
        "distributed.start(ranks)\n"
        "if ranks.rank == 0:\n"
        "    time.sleep(3)\n"
        "start = time.monotonic()\n"
        "distributed.finish()\n"
        "print(f'rank {ranks.rank} waited {time.monotonic() - start:.2f}', flush=True)\n"
        "distributed.stop()\n")
    done = run_launcher("-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script))
    assert done.returncode == 0, done.stderr[-3000:]
    waited = {int(rank): float(seconds) for rank, seconds in re.findall(r"rank (\d) waited ([\d.]+)", done.stdout)}
    assert waited.keys() == {0, 1}, done.stdout
    assert waited[1] >= 2.5 and waited[0] < 2.5, waited
