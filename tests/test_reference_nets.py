"""The 12 net files of the original experiments (../shared/reference) parse and build for their phase,
with the shapes, outputs, parameter counts and sharing of Caffe's nets."""

from __future__ import annotations

import pytest

from rloss.net import Net
from rloss.proto import caffe_pb2
from tests.shared_data import shared_path

NETS = ["deeplab_largeFOV", "deeplab_msc_largeFOV", "deeplab_vgg16", "resnet-101"]
# Owner (learnable) parameter counts = solverstate history length (shared blobs count once).
LEARNABLE = {"deeplab_largeFOV": 32, "deeplab_msc_largeFOV": 62, "deeplab_vgg16": 50, "resnet-101": 632}
# Net outputs in Caffe's order (its output set is sorted by name).
OUTPUTS = {
    ("deeplab_largeFOV", "train"): ["accuracy"],
    ("deeplab_largeFOV", "trainwithdensecrfloss"): ["accuracy", "densecrf_loss", "softmax_loss"],
    ("deeplab_largeFOV", "test"): ["accuracy"],
    ("deeplab_msc_largeFOV", "train"): ["accuracy"],
    ("deeplab_msc_largeFOV", "trainwithdensecrfloss"): ["accuracy", "densecrf_loss"],
    ("deeplab_msc_largeFOV", "test"): ["accuracy", "data_dim"],
    ("deeplab_vgg16", "train"): ["accuracy"],
    ("deeplab_vgg16", "trainwithdensecrfloss"): ["accuracy", "densecrf_loss"],
    ("deeplab_vgg16", "test"): ["accuracy", "data_dim"],
    ("resnet-101", "train"): ["accuracy", "accuracy_res05", "accuracy_res075", "accuracy_res1"],
    ("resnet-101", "trainwithdensecrfloss"):
        ["accuracy", "accuracy_res05", "accuracy_res075", "accuracy_res1", "densecrf_loss"],
    ("resnet-101", "test"): ["fc1_accuracy"],
}


def _values(net_id: str) -> dict[str, str]:
    return {
        "NUM_LABELS": "21", "DENSECRF_LOSS_WEIGHT": "1e-8", "DATA_ROOT": "/nonexistent/", "EXP": "pascal_scribble",
        "TRAIN_SET": "train", "TEST_SET": "val", "NET_ID": net_id, "FEATURE_DIR": "/tmp/features",
    }


def _build(net_id: str, name: str) -> Net:
    path = shared_path("reference", "rloss-exper", "exper", "pascal_scribble", "config", net_id, f"{name}.prototxt")
    phase = caffe_pb2.TEST if name == "test" else caffe_pb2.TRAIN
    return Net.from_prototxt(path, phase, values=_values(net_id), feed_data_layers=True)


@pytest.mark.parametrize("net_id", NETS)
@pytest.mark.parametrize("name", ["train", "trainwithdensecrfloss", "test"])
def test_reference_net_builds_with_spec_shapes(net_id: str, name: str) -> None:
    net = _build(net_id, name)
    assert net.outputs == OUTPUTS[(net_id, name)]
    crop = net.blob_shapes["data"][2]
    assert crop == (513 if name == "test" else 321)
    scores = 65 if name == "test" else 41
    for layer in net.layers:
        if layer.type_name == "SoftmaxWithLoss":
            size = 21 if layer.name == "loss_res05" else scores  # the 0.5 branch is scored at 1/16
            assert net.blob_shapes[net.layer_bottoms(layer.name)[0]][1:] == (21, size, size), layer.name
    if name != "test":
        assert len(net.learnable) == LEARNABLE[net_id]


def test_resnet_shared_parameters_are_one_tensor() -> None:
    net = _build("resnet-101", "train")
    by_name: dict[str, list[int]] = {}
    for layer in net.layers:
        for j, spec in enumerate(layer.param.param):
            if spec.name:
                by_name.setdefault(spec.name, []).append(id(layer.blobs[j]))
    assert len(by_name) == 632
    assert all(len(ids) == 3 and len(set(ids)) == 1 for ids in by_name.values())
    per_layer_blobs = sum(len(layer.blobs) for layer in net.layers)
    assert per_layer_blobs == 1896
