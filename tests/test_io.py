"""Binary files: golden .caffemodel/.solverstate round trips, V1 and HDF5 models, atomic writes,
and malformed files that must become WeightsErrors with a useful message."""

from __future__ import annotations

import os

import numpy as np
import pytest

from rloss import io as rio
from rloss.errors import WeightsError
from rloss.proto import caffe_pb2
from rloss.proto.blob import array_to_blob, blob_to_array
from tests.shared_data import shared_path


def golden_files(pattern: str):
    files = sorted(shared_path("golden").rglob(pattern))
    assert files, pattern
    return files


def model_path():
    return shared_path("golden", "02_solver", "init_iter_0.caffemodel")


def state_path():
    return shared_path("golden", "02_solver", "init_iter_0.solverstate")


def weights_error(function, path) -> str:
    with pytest.raises(WeightsError) as info:
        function(path)
    return str(info.value)


# ---- golden files -----------------------------------------------------------------------------------

def test_golden_models_and_states_round_trip_byte_identical(tmp_path):
    for path in golden_files("*.caffemodel") + golden_files("*.solverstate"):
        read = rio.read_solver_state if path.suffix == ".solverstate" else rio.read_net_param
        message = read(path)
        first, second = tmp_path / "first", tmp_path / "second"
        rio.write_message_atomic(message, first)
        rio.write_message_atomic(read(first), second)
        assert first.read_bytes() == second.read_bytes(), path
        assert first.read_bytes() == path.read_bytes(), path  # our schema writes what Caffe wrote


def test_golden_model_contents():
    net = rio.read_net_param(model_path())
    assert [(layer.name, layer.type, len(layer.blobs)) for layer in net.layer] == [
        ("data", "HDF5Data", 0), ("conv1", "Convolution", 2), ("relu1", "ReLU", 0),
        ("conv2", "Convolution", 2), ("loss", "SoftmaxWithLoss", 0)]
    weights = blob_to_array(net.layer[1].blobs[0])
    assert weights.shape == (8, 3, 3, 3) and np.isfinite(weights).all()
    conv2 = [layer for layer in net.layer if layer.name == "conv2"][0]
    assert list(conv2.blobs[1].shape.dim) == [4]


def test_golden_solver_state():
    state = rio.read_solver_state(state_path())
    assert state.iter == 0 and state.learned_net.endswith("init_iter_0.caffemodel")
    assert [tuple(b.shape.dim) for b in state.history] == [(8, 3, 3, 3), (8,), (4, 8, 1, 1), (4,)]
    later = rio.read_solver_state(shared_path("golden", "02_solver", "step", "snap_iter_3.solverstate"))
    assert later.iter == 3


# ---- V1 and HDF5 models -----------------------------------------------------------------------------

def test_v1_binary_model_is_upgraded(tmp_path):
    net = caffe_pb2.NetParameter(name="old")
    conv = net.layers.add(name="conv1", type=caffe_pb2.V1LayerParameter.CONVOLUTION, bottom=["data"], top=["c"])
    conv.blobs.add(num=2, channels=1, height=1, width=3).data.extend([1, 2, 3, 4, 5, 6])
    conv.blobs.add(num=1, channels=1, height=1, width=2).data.extend([7, 8])
    conv.blobs_lr.extend([1, 2])
    net.layers.add(name="relu", type=caffe_pb2.V1LayerParameter.RELU)
    path = tmp_path / "old.caffemodel"
    path.write_bytes(net.SerializeToString())
    read = rio.read_net_param(path)
    assert [(layer.name, layer.type) for layer in read.layer] == [("conv1", "Convolution"), ("relu", "ReLU")]
    assert blob_to_array(read.layer[0].blobs[0]).tolist() == [[[[1, 2, 3]]], [[[4, 5, 6]]]]
    assert [p.lr_mult for p in read.layer[0].param] == [1, 2]


def test_hdf5_model(tmp_path):
    h5py = pytest.importorskip("h5py")
    path = tmp_path / "model.caffemodel.h5"
    with h5py.File(path, "w") as handle:
        handle.create_dataset("data/conv1/0", data=np.arange(6, dtype=np.float32).reshape(2, 3))
        handle.create_dataset("data/conv1/1", data=np.ones(2, dtype=np.float32))
        handle.create_dataset("data/shared/1", data=np.zeros(3, dtype=np.float32))  # blob 0 owned elsewhere
        handle.create_group("data/relu")
    net = rio.read_net_param(path)
    layers = {layer.name: layer for layer in net.layer}
    assert set(layers) == {"conv1", "shared", "relu"}
    assert blob_to_array(layers["conv1"].blobs[0]).tolist() == [[0, 1, 2], [3, 4, 5]]
    assert list(layers["conv1"].blobs[1].shape.dim) == [2]
    shared = layers["shared"].blobs
    assert len(shared) == 2 and shared[0] == caffe_pb2.BlobProto() and list(shared[1].shape.dim) == [3]
    assert len(layers["relu"].blobs) == 0


def test_hdf5_solver_state(tmp_path):
    h5py = pytest.importorskip("h5py")
    path = tmp_path / "snap_iter_7.solverstate.h5"
    with h5py.File(path, "w") as handle:
        handle["iter"] = 7
        handle["learned_net"] = "snap_iter_7.caffemodel.h5"
        handle["current_step"] = 1
        handle.create_dataset("history/0", data=np.full((2, 2), 0.5, dtype=np.float32))
        handle.create_dataset("history/1", data=np.zeros(2, dtype=np.float32))
    state = rio.read_solver_state(path)
    assert (state.iter, state.learned_net, state.current_step) == (7, "snap_iter_7.caffemodel.h5", 1)
    assert [tuple(b.shape.dim) for b in state.history] == [(2, 2), (2,)]


# ---- atomic writing ---------------------------------------------------------------------------------

def small_net(value: float = 1.0):
    net = caffe_pb2.NetParameter(name="n")
    net.layer.add(name="l").blobs.append(array_to_blob(np.full((2, 2), value)))
    return net


def test_atomic_write_leaves_only_the_target(tmp_path):
    target = tmp_path / "model.caffemodel"
    rio.write_message_atomic(small_net(1), target)
    rio.write_message_atomic(small_net(2), target)  # replaces an existing file
    assert os.listdir(tmp_path) == ["model.caffemodel"]
    assert blob_to_array(rio.read_net_param(target).layer[0].blobs[0]).tolist() == [[2, 2], [2, 2]]


def test_atomic_write_uses_normal_permissions(tmp_path):
    target = tmp_path / "model.caffemodel"
    umask = os.umask(0o022)
    try:
        rio.write_message_atomic(small_net(), target)
    finally:
        os.umask(umask)
    assert target.stat().st_mode & 0o777 == 0o644


def test_failed_serialization_keeps_the_old_file(tmp_path):
    target = tmp_path / "model.caffemodel"
    rio.write_message_atomic(small_net(1), target)
    before = target.read_bytes()
    incomplete = small_net(3)
    incomplete.layer[0].mat_write_param.period = 1  # `prefix` is required and unset
    with pytest.raises(WeightsError, match="incomplete.*prefix"):
        rio.write_message_atomic(incomplete, target)
    assert target.read_bytes() == before and os.listdir(tmp_path) == ["model.caffemodel"]


def test_failure_while_writing_removes_the_temporary(tmp_path, monkeypatch):
    target = tmp_path / "model.caffemodel"
    rio.write_message_atomic(small_net(1), target)
    before = target.read_bytes()

    def broken_fsync(descriptor):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(rio.os, "fsync", broken_fsync)
    with pytest.raises(WeightsError, match="cannot write .*No space left"):
        rio.write_message_atomic(small_net(4), target)
    assert target.read_bytes() == before and os.listdir(tmp_path) == ["model.caffemodel"]


def test_write_into_missing_directory(tmp_path):
    with pytest.raises(WeightsError, match="cannot write"):
        rio.write_message_atomic(small_net(), tmp_path / "absent" / "model.caffemodel")


# ---- malformed files --------------------------------------------------------------------------------

def test_truncated_model(tmp_path):
    data = model_path().read_bytes()
    path = tmp_path / "half.caffemodel"
    path.write_bytes(data[: len(data) // 2])
    message = weights_error(rio.read_net_param, path)
    assert str(path) in message and "truncated/corrupt" in message


def test_empty_model_and_state(tmp_path):
    path = tmp_path / "empty.caffemodel"
    path.write_bytes(b"")
    assert "empty (0 bytes)" in weights_error(rio.read_net_param, path)
    assert "empty (0 bytes)" in weights_error(rio.read_solver_state, path)


def test_random_bytes(tmp_path):
    path = tmp_path / "random.caffemodel"
    path.write_bytes(np.random.default_rng(0).integers(0, 256, 4000, dtype=np.uint8).tobytes())
    message = weights_error(rio.read_net_param, path)
    assert "not a Caffe model" in message


def test_text_file_as_model(tmp_path):
    path = tmp_path / "net.caffemodel"
    path.write_text('name: "net"\nlayer { name: "a" type: "ReLU" }\n')
    assert "it is a text file (a prototxt?)" in weights_error(rio.read_net_param, path)


def test_solverstate_passed_as_model():
    message = weights_error(rio.read_net_param, state_path())
    assert "looks like a .solverstate (iter 0" in message


def test_model_passed_as_solverstate():
    message = weights_error(rio.read_solver_state, model_path())
    assert "not a Caffe solver state" in message and "looks like a .caffemodel (net 'tiny', 5 layers)" in message


def test_hdf5_file_without_h5_name(tmp_path):
    h5py = pytest.importorskip("h5py")
    path = tmp_path / "model.caffemodel"
    with h5py.File(path, "w") as handle:
        handle["x"] = 1
    assert "HDF5 file" in weights_error(rio.read_net_param, path) and ".h5" in weights_error(rio.read_net_param, path)


def test_missing_file(tmp_path):
    assert "cannot read: No such file" in weights_error(rio.read_net_param, tmp_path / "absent.caffemodel")
    assert "cannot read" in weights_error(rio.read_solver_state, tmp_path / "absent.solverstate")


def test_valid_protobuf_without_layers(tmp_path):
    path = tmp_path / "blob.caffemodel"
    path.write_bytes(b"\x08\x05")  # one varint field: protobuf accepts it, but it is no model
    assert "not a Caffe model: it holds no layers" in weights_error(rio.read_net_param, path)
    named_only = tmp_path / "named.caffemodel"
    named_only.write_bytes(caffe_pb2.NetParameter(name="n").SerializeToString())
    assert "holds no layers" in weights_error(rio.read_net_param, named_only)


def test_blob_count_does_not_match_its_shape(tmp_path):
    net = small_net()
    blob = net.layer.add(name="bad").blobs.add()
    blob.shape.dim.extend([2, 3])
    blob.data.extend([0.0] * 5)
    path = tmp_path / "bad.caffemodel"
    path.write_bytes(net.SerializeToString())
    message = weights_error(rio.read_net_param, path)
    assert "layer 'bad' (#1) blob 0: shape (2, 3) needs 6 values but the file holds 5 data values" in message


def test_diff_count_mismatch_and_negative_dims(tmp_path):
    net = small_net()
    net.layer[0].blobs[0].diff.extend([1.0])
    path = tmp_path / "diff.caffemodel"
    path.write_bytes(net.SerializeToString())
    assert "holds 1 diff values" in weights_error(rio.read_net_param, path)
    negative = caffe_pb2.NetParameter()
    negative.layer.add(name="neg").blobs.add().shape.dim.extend([-2, 3])
    path.write_bytes(negative.SerializeToString())
    assert "layer 'neg' (#0) blob 0: negative dimension" in weights_error(rio.read_net_param, path)


def test_legacy_blob_shape_is_checked(tmp_path):
    net = caffe_pb2.NetParameter()
    net.layer.add(name="legacy").blobs.add(num=1, channels=1, height=2, width=2).data.extend([1, 2, 3])
    path = tmp_path / "legacy.caffemodel"
    path.write_bytes(net.SerializeToString())
    assert "shape (1, 1, 2, 2) needs 4 values" in weights_error(rio.read_net_param, path)


def test_solverstate_history_mismatch(tmp_path):
    state = caffe_pb2.SolverState(iter=3, learned_net="x.caffemodel")
    history = state.history.add()
    history.shape.dim.append(4)
    history.data.extend([1, 2])
    path = tmp_path / "bad.solverstate"
    path.write_bytes(state.SerializeToString())
    assert "history blob 0: shape (4,) needs 4 values" in weights_error(rio.read_solver_state, path)


def test_truncated_solverstate(tmp_path):
    data = state_path().read_bytes()
    path = tmp_path / "cut.solverstate"
    path.write_bytes(data[:100])
    assert "not a solver state (.solverstate), or truncated/corrupt" in weights_error(rio.read_solver_state, path)


def test_binary_model_mixing_v1_and_v2_layers(tmp_path):
    net = small_net()
    net.layers.add(name="old", type=caffe_pb2.V1LayerParameter.RELU)
    path = tmp_path / "mixed.caffemodel"
    path.write_bytes(net.SerializeToString())
    message = weights_error(rio.read_net_param, path)
    assert str(path) in message and "mixes 1 V2 `layer` entries with 1 V1" in message


def test_bad_hdf5_models(tmp_path):
    h5py = pytest.importorskip("h5py")
    not_hdf5 = tmp_path / "text.h5"
    not_hdf5.write_text("hello")
    assert "cannot read as HDF5" in weights_error(rio.read_net_param, not_hdf5)
    no_data = tmp_path / "nodata.h5"
    with h5py.File(no_data, "w") as handle:
        handle["weights/conv/0"] = np.zeros(2)
    assert "no HDF5 group 'data'" in weights_error(rio.read_net_param, no_data)
    bad_names = tmp_path / "names.h5"
    with h5py.File(bad_names, "w") as handle:
        handle["data/conv/weight"] = np.zeros(2)
    assert "data/conv: blob names must be 0, 1, 2" in weights_error(rio.read_net_param, bad_names)
    flat = tmp_path / "flat.h5"
    with h5py.File(flat, "w") as handle:
        handle["data/conv"] = np.zeros(2)
        handle["history/0/x"] = np.zeros(2)
    assert "data/conv: expected a group" in weights_error(rio.read_net_param, flat)
    no_iter = tmp_path / "state.solverstate.h5"
    with h5py.File(no_iter, "w") as handle:
        handle.create_group("history")
    assert "missing HDF5 entry" in weights_error(rio.read_solver_state, no_iter)
