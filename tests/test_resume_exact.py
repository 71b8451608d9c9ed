"""Exact resume (rloss's `resume` extension of the solver state): a run stopped at a snapshot and
continued by a fresh solver equals an uninterrupted run bit for bit on the CPU, with shuffle, mirror,
random crops and rescaling, dropout and background prefetching, across epoch boundaries (in the
batches consumed and in those read ahead), for ImageSegData and HDF5Data; Caffe states without the
extension still restore. Each ingredient is shown to matter: without it the runs differ."""

from __future__ import annotations

import logging
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from google.protobuf import descriptor_pool, text_format

from rloss.data import synthetic
from rloss.data.prefetch import Prefetcher
from rloss.errors import WeightsError
from rloss.io import read_net_param, read_solver_state, write_message_atomic
from rloss.layers import layer_class
from rloss.net import Net
from rloss.proto import caffe_pb2
from rloss.proto.blob import blob_to_array
from rloss.proto.compat import has_unknown_fields, message_class
from rloss.proto.schema import parse_proto
from rloss.solver import Solver

MEAN = "mean_value: 104 mean_value: 117 mean_value: 123"
SEG_NET = """name: "tinyseg"
layer {{ name: "data" type: "ImageSegData" top: "data" top: "label" top: "data_dim" include {{ phase: TRAIN }}
  image_data_param {{ root_folder: "{root}/" source: "{train}" batch_size: {batch} shuffle: true label_type: PIXEL }}
  transform_param {{ {mean} crop_size: 13 mirror: true scale_factors: 0.75 scale_factors: 1 }} }}
layer {{ name: "data" type: "ImageSegData" top: "data" top: "label" top: "data_dim" include {{ phase: TEST }}
  image_data_param {{ root_folder: "{root}/" source: "{val}" batch_size: 1 label_type: PIXEL }}
  transform_param {{ {mean} crop_size: 13 }} }}
layer {{ name: "conv1" type: "Convolution" bottom: "data" top: "conv1"
  convolution_param {{ num_output: 4 kernel_size: 3 pad: 1 weight_filler {{ type: "gaussian" std: 0.1 }} }} }}
layer {{ name: "relu1" type: "ReLU" bottom: "conv1" top: "conv1" }}
layer {{ name: "drop1" type: "Dropout" bottom: "conv1" top: "conv1" dropout_param {{ dropout_ratio: 0.3 }} }}
layer {{ name: "score" type: "Convolution" bottom: "conv1" top: "score"
  convolution_param {{ num_output: 3 kernel_size: 1 weight_filler {{ type: "gaussian" std: 0.1 }} }} }}
layer {{ name: "loss" type: "SoftmaxWithLoss" bottom: "score" bottom: "label" top: "loss"
  loss_param {{ ignore_label: 255 }} }}
layer {{ name: "silence" type: "Silence" bottom: "data_dim" }}
"""
HDF5_NET = """name: "tinyh5"
layer {{ name: "data" type: "HDF5Data" top: "data" top: "label"
  hdf5_data_param {{ source: "{source}" batch_size: 3 shuffle: true }} }}
layer {{ name: "ip1" type: "InnerProduct" bottom: "data" top: "ip1"
  inner_product_param {{ num_output: 6 weight_filler {{ type: "gaussian" std: 0.5 }} }} }}
layer {{ name: "drop1" type: "Dropout" bottom: "ip1" top: "ip1" dropout_param {{ dropout_ratio: 0.5 }} }}
layer {{ name: "ip2" type: "InnerProduct" bottom: "ip1" top: "ip2"
  inner_product_param {{ num_output: 3 weight_filler {{ type: "gaussian" std: 0.5 }} }} }}
layer {{ name: "loss" type: "SoftmaxWithLoss" bottom: "ip2" bottom: "label" top: "loss" }}
"""
MAX_ITER = 8
TRAIN_IMAGES = 5  # with batches of 2, batches straddle passes and every pass is reshuffled


@pytest.fixture(scope="module")
def seg_net(tmp_path_factory) -> Path:
    """The tiny ImageSegData net (train and test phases) on a synthetic dataset."""
    folder = tmp_path_factory.mktemp("seg")
    data = synthetic.write_dataset(folder / "data", train=TRAIN_IMAGES, val=3, height=16, width=18,
                                   num_classes=3, seed=2)
    return write_seg_net(folder, data, batch=2)


def write_seg_net(folder: Path, data, batch: int) -> Path:
    net = folder / f"net_batch{batch}.prototxt"
    net.write_text(SEG_NET.format(root=data.root, train=data.train_full_list, val=data.val_list, batch=batch,
                                  mean=MEAN))
    return net


@pytest.fixture(scope="module")
def hdf5_net(tmp_path_factory) -> Path:
    """The tiny HDF5Data net on two files of 4 and 5 rows (batches of 3 straddle files)."""
    h5py = pytest.importorskip("h5py")
    folder = tmp_path_factory.mktemp("h5")
    rng = np.random.default_rng(4)
    names = []
    for index, rows in enumerate((4, 5)):
        name = folder / f"part{index}.h5"
        with h5py.File(name, "w") as handle:
            handle["data"] = rng.normal(size=(rows, 5)).astype(np.float32)
            handle["label"] = rng.integers(3, size=rows).astype(np.float32)
        names.append(str(name))
    (folder / "list.txt").write_text("".join(f"{name}\n" for name in names))
    net = folder / "net.prototxt"
    net.write_text(HDF5_NET.format(source=folder / "list.txt"))
    return net


def solver_file(folder: Path, net: Path, snapshot: int, **fields) -> Path:
    settings = {"net": f'"{net}"', "base_lr": 0.05, "lr_policy": '"step"', "gamma": 0.5, "stepsize": 3,
                "momentum": 0.9, "weight_decay": 0.0005, "max_iter": MAX_ITER, "snapshot": snapshot,
                "snapshot_after_train": "false", "display": 0, "random_seed": 5, "solver_mode": "CPU",
                "snapshot_prefix": f'"{folder / "snap"}"'}
    settings.update(fields)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "solver.prototxt"
    path.write_text("".join(f"{key}: {value}\n" for key, value in settings.items()))
    return path


def close(solver: Solver) -> None:
    """Stop the data layers' background loaders."""
    for net in [solver.net, *solver.test_nets]:
        for layer in net.layers:
            getattr(layer, "close", lambda: None)()


def uninterrupted(folder: Path, net: Path, snapshot: int, **fields) -> Solver:
    solver = Solver(solver_file(folder, net, snapshot, **fields))
    solver.solve()
    close(solver)
    return solver


def stop_at_snapshot(folder: Path, net: Path, snapshot: int, **fields) -> Path:
    """Train up to the first snapshot and stop there (as a Ctrl-C would); the state file."""
    solver = Solver(solver_file(folder, net, snapshot, **fields))
    solver.step(snapshot)
    close(solver)
    extension = ".solverstate.h5" if fields.get("snapshot_format") == "HDF5" else ".solverstate"
    return folder / f"snap_iter_{snapshot}{extension}"


def resumed(folder: Path, net: Path, snapshot: int, state: Path, **fields) -> Solver:
    """A fresh solver (fresh nets, fresh generators) continued from `state` to max_iter."""
    solver = Solver(solver_file(folder, net, snapshot, **fields))
    solver.solve(resume_file=str(state))
    close(solver)
    return solver


def trained(solver: Solver) -> list[torch.Tensor]:
    return [p.tensor.detach() for p in solver.net.learnable] + list(solver.history)


def same_run(first: Solver, second: Solver) -> bool:
    """Bit-identical weights and history, and the data layers at the same place."""
    return (first.iter == second.iter
            and all(torch.equal(a, b) for a, b in zip(trained(first), trained(second)))
            and first.net.data_states() == second.net.data_states()
            and [n.data_states() for n in first.test_nets] == [n.data_states() for n in second.test_nets])


def interrupted_run(tmp_path: Path, net: Path, snapshot: int, **fields) -> Solver:
    state = stop_at_snapshot(tmp_path / "first", net, snapshot, **fields)
    return resumed(tmp_path / "resumed", net, snapshot, state, **fields)


# ---- ImageSegData: shuffle, mirror, crop, rescale, dropout, prefetch -------------------------------

@pytest.mark.parametrize("snapshot, fields, consumed", [
    # 4 samples consumed (pass 0); the 5 batches read ahead reach into pass 2, reshuffled twice
    (2, {}, (0, 4)),
    # 8 samples consumed, so the snapshot is inside pass 1; the rest crosses passes 2 and 3
    (4, {}, (1, 3)),
    # iter_size 2 and test nets: 12 samples consumed (pass 2); the test data position is saved too
    (3, {"iter_size": 2, "test_iter": 2, "test_interval": 2}, (2, 2)),
])
def test_resume_equals_an_uninterrupted_run_bit_for_bit(tmp_path, seg_net, snapshot, fields, consumed):
    whole = uninterrupted(tmp_path / "whole", seg_net, snapshot, **fields)
    state = read_solver_state(tmp_path / "whole" / f"snap_iter_{snapshot}.solverstate")
    saved = state.resume.train_data[0]
    assert (saved.name, saved.type, (saved.epoch, saved.cursor)) == ("data", "ImageSegData", consumed)
    assert len(state.resume.test_net) == len(whole.test_nets)
    again = interrupted_run(tmp_path, seg_net, snapshot, **fields)
    assert whole.net.data_states()[0].epoch >= consumed[0] + 2  # the resumed part crossed reshuffles
    assert same_run(whole, again)


def _keep_generators(state) -> None:
    """A torch.set_rng_state that changes nothing."""


def _read_ahead_state(prefetcher: Prefetcher):
    """The planner's position now, which is past the batches read ahead."""
    return prefetcher.capture()


SABOTAGE = {
    "data positions not restored": (Net, "load_data_states", lambda self, states, where: None),
    "torch generators not restored": (torch, "set_rng_state", _keep_generators),
    "read-ahead position saved": (Prefetcher, "consumed_state", _read_ahead_state),
}


@pytest.mark.parametrize("what", SABOTAGE)
def test_the_resume_test_fails_without_each_part(tmp_path, seg_net, monkeypatch, what):
    """The comparison above can fail: each part of the saved state is needed for the equality."""
    whole = uninterrupted(tmp_path / "whole", seg_net, 4)
    monkeypatch.setattr(*SABOTAGE[what])
    again = interrupted_run(tmp_path, seg_net, 4)
    assert not any(torch.equal(a, b) for a, b in zip(trained(whole), trained(again)))


def test_the_layer_continues_after_the_batches_it_returned(tmp_path, seg_net):
    """A layer's state is taken after the batches `forward` returned, whatever was read ahead; a
    fresh layer (other generator) loading it returns the same next batches."""
    param = caffe_pb2.NetParameter()
    text_format.Parse(seg_net.read_text(), param)
    train_layer = param.layer[0]
    torch.manual_seed(1)
    first = layer_class("ImageSegData")(train_layer, [], caffe_pb2.TRAIN)
    for _ in range(3):
        first()
    state = first.data_state()
    expected = [[top.clone() for top in first()] for _ in range(6)]
    torch.manual_seed(2)
    second = layer_class("ImageSegData")(train_layer, [], caffe_pb2.TRAIN)
    second.load_data_state(state)
    got = [second() for _ in range(6)]
    first.close()
    second.close()
    assert all(torch.equal(a, b) for batch, other in zip(expected, got) for a, b in zip(batch, other))


def test_the_prefetcher_state_is_that_of_the_batches_returned():
    planned = [0]

    def plan() -> list[int]:
        planned[0] += 1
        return [planned[0]]

    loader = Prefetcher(plan, lambda item: item, depth=3, workers=1, capture=lambda: planned[0])
    assert planned[0] == 3 and loader.consumed_state() == 0  # three batches read ahead, none returned
    assert loader.next() == [1] and loader.consumed_state() == 1
    planned[0] = 10  # the consumer restores its planning state, then restarts
    loader.restart()
    assert loader.next() == [11] and loader.consumed_state() == 11
    loader.close()
    assert loader.consumed_state() == 11


def test_no_code_draws_from_the_numpy_or_python_global_generators():
    """The state saves torch's global generators and each data layer's own numpy generator; numpy's
    and Python's global generators are seeded by random_seed but drawn by no rloss code (a new draw
    from them would have to be saved too)."""
    allowed = {"seed", "default_rng", "Generator"}
    package = Path(__file__).resolve().parents[1] / "rloss"
    draws = [f"{path.name}: {match.group(0)}" for path in sorted(package.rglob("*.py"))
             for match in re.finditer(r"\brandom\.(\w+)\(", path.read_text()) if match.group(1) not in allowed]
    assert not draws


# ---- HDF5Data (torch-drawn shuffles) and the HDF5 solver state ----------------------------------------

@pytest.mark.parametrize("snapshot_format", ["BINARYPROTO", "HDF5"])
def test_hdf5data_resume_is_exact(tmp_path, hdf5_net, snapshot_format):
    fields = {"snapshot_format": snapshot_format, "max_iter": 9}
    whole = uninterrupted(tmp_path / "whole", hdf5_net, 4, **fields)
    again = interrupted_run(tmp_path, hdf5_net, 4, **fields)
    assert same_run(whole, again)


# ---- states without the extension, and states that do not fit ------------------------------------------

def test_a_caffe_state_restores_and_the_data_order_restarts(tmp_path, seg_net, caplog):
    state_file = stop_at_snapshot(tmp_path / "first", seg_net, 4)
    state = read_solver_state(state_file)
    state.ClearField("resume")
    caffe_state = tmp_path / "caffe.solverstate"
    write_message_atomic(state, caffe_state)
    fresh = Solver(solver_file(tmp_path / "fresh", seg_net, 4))
    solver = Solver(solver_file(tmp_path / "resumed", seg_net, 4))
    with caplog.at_level(logging.INFO, logger="rloss"):
        solver.restore(caffe_state)
    assert "the data order restarts from the beginning, as in Caffe" in caplog.text
    assert solver.iter == 4 and solver.net.data_states() == fresh.net.data_states()
    for layer in read_net_param(state.learned_net).layer:
        for blob, param in zip(layer.blobs, solver.net.params.get(layer.name, [])):
            assert np.array_equal(blob_to_array(blob, layer.name).reshape(param.shape), param.detach().numpy())
    solver.solve()
    assert solver.iter == MAX_ITER
    close(fresh)
    close(solver)


def test_caffe_reads_our_state_and_skips_the_extension(tmp_path, seg_net):
    """Parsed with Caffe's SolverState (ours without field 1000), our state keeps Caffe's fields and
    leaves the extension as an unknown field, which Caffe ignores."""
    text = caffe_pb2.SCHEMA_PATH.read_text()
    assert text.count("optional ResumeState resume = 1000;") == 1
    pool = descriptor_pool.DescriptorPool()
    pool.Add(parse_proto(text.replace("optional ResumeState resume = 1000;", ""), "caffe_without_rloss.proto"))
    caffe_state = message_class(pool.FindMessageTypeByName("caffe.SolverState"), pool)
    ours = read_solver_state(stop_at_snapshot(tmp_path / "first", seg_net, 2))
    theirs = caffe_state.FromString(ours.SerializeToString())
    assert (theirs.iter, theirs.learned_net, theirs.current_step) == (ours.iter, ours.learned_net, ours.current_step)
    assert [h.SerializeToString() for h in theirs.history] == [h.SerializeToString() for h in ours.history]
    assert has_unknown_fields(theirs) and ours.HasField("resume")


def edit_train_state(state, what: str) -> None:
    saved = state.resume.train_data[0]
    if what == "name":
        saved.name = "elsewhere"
    elif what == "stateless layer":
        saved.name = "conv1"
    elif what == "type":
        saved.type = "ImageData"
    elif what == "list length":
        del saved.order[-1]
    elif what == "generator":
        saved.generator.state = b"\x01"
    elif what == "torch":
        state.resume.torch_random.cpu = b"\x00" * 7


@pytest.mark.parametrize("what, message", [
    ("name", "layer 'elsewhere' .* the net has no layer of that name"),
    ("stateless layer", "layer 'conv1' .* of type Convolution, which has no data state"),
    ("type", "its layer 'data' is of type ImageSegData"),
    ("list length", "not a permutation of its 5 entries"),
    ("generator", "no valid PCG64 generator"),
    ("torch", "torch generator state cannot be restored"),
])
def test_states_that_do_not_fit_are_refused(tmp_path, seg_net, what, message):
    state = read_solver_state(stop_at_snapshot(tmp_path / "first", seg_net, 2))
    edit_train_state(state, what)
    edited = tmp_path / "edited.solverstate"
    write_message_atomic(state, edited)
    solver = Solver(solver_file(tmp_path / "resumed", seg_net, 2))
    try:
        with pytest.raises(WeightsError, match=message):
            solver.restore(edited)
    finally:
        close(solver)
