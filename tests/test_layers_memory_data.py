"""MemoryData and pycaffe's `net.set_input_arrays`: batches cut from the caller's arrays in order with
wrap-around, read without copying, label shapes as Caffe gives them, the checks pycaffe makes, and a
net whose loss and accuracy are computed from the fed batch (numpy formulas written here)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from rloss import caffe
from rloss.errors import LayerError, NetError
from tests.helpers import layer_from_text, relative_error

LAYER = ('name: "mem" type: "MemoryData" top: "data" top: "label" '
         "memory_data_param { batch_size: 2 channels: 3 height: 4 width: 5 }")


def arrays(count: int = 6) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    data = rng.normal(size=(count, 3, 4, 5)).astype(np.float32)
    labels = np.arange(count, dtype=np.float32).reshape(count, 1, 1, 1)
    return data, labels


def test_forwards_take_the_next_batch_and_wrap_around():
    layer = layer_from_text(LAYER, [])
    assert layer.top_shapes == [(2, 3, 4, 5), (2,)]
    data, labels = arrays()
    layer.reset(data, labels)
    for items in ([0, 1], [2, 3], [4, 5], [0, 1]):
        top_data, top_label = layer()
        np.testing.assert_array_equal(top_data.numpy(), data[items])
        assert top_label.shape == (2, 1, 1, 1)  # Caffe's forward reshapes the label top so
        np.testing.assert_array_equal(top_label.numpy().reshape(-1), items)


def test_the_layer_reads_the_callers_arrays_and_a_reset_starts_again():
    layer = layer_from_text(LAYER, [])
    data, labels = arrays(4)
    layer.reset(data, labels)
    layer()
    data[2:] = 7.0  # written after the reset, before the batch is read
    top_data, _ = layer()
    assert (top_data.numpy() == 7.0).all()
    layer.reset(data, labels)
    np.testing.assert_array_equal(layer()[1].numpy().reshape(-1), [0, 1])


def test_tops_follow_the_module_dtype():
    layer = layer_from_text(LAYER, []).double()
    layer.reset(*arrays())
    assert all(top.dtype == torch.float64 for top in layer())


@pytest.mark.parametrize("param", ["batch_size: 0 channels: 3 height: 4 width: 5",
                                   "batch_size: 2 channels: 3 height: 4"])
def test_missing_or_zero_dims_are_refused(param):
    with pytest.raises(LayerError, match="all positive"):
        layer_from_text(f'name: "mem" type: "MemoryData" top: "data" top: "label" memory_data_param {{ {param} }}',
                        [])


def test_it_needs_two_tops():
    with pytest.raises(LayerError, match="needs 2 tops"):
        layer_from_text('name: "mem" type: "MemoryData" top: "data" memory_data_param { batch_size: 1 channels: 1 '
                        "height: 1 width: 1 }", [])


def test_a_forward_before_any_arrays_is_an_error():
    with pytest.raises(LayerError, match="set_input_arrays"):
        layer_from_text(LAYER, [])()


DATA, LABELS = arrays()
BAD_ARRAYS = {
    "not contiguous": (np.asfortranarray(DATA), LABELS, "C contiguous"),
    "not 4-d": (DATA.reshape(6, 60), LABELS, "4-d"),
    "not float32": (DATA.astype(np.float64), LABELS, "float32"),
    "wrong item shape": (DATA[:, :2].copy(), LABELS, r"items of shape \(2, 4, 5\)"),
    "labels not 4-d": (DATA, LABELS.reshape(6, 1), "labels array must be 4-d"),
    "different counts": (DATA, LABELS[:4].copy(), "same first dimension"),
    "not a multiple of the batch": (DATA[:5].copy(), LABELS[:5].copy(), "multiple of the batch size 2"),
    "empty": (DATA[:0].copy(), LABELS[:0].copy(), "positive multiple"),
}


@pytest.mark.parametrize("case", BAD_ARRAYS)
def test_arrays_are_checked_as_pycaffe_checks_them(case):
    bad_data, bad_labels, message = BAD_ARRAYS[case]
    with pytest.raises(LayerError, match=message):
        layer_from_text(LAYER, []).reset(bad_data, bad_labels)


NET = """name: "memnet"
layer { name: "mem" type: "MemoryData" top: "data" top: "label"
  memory_data_param { batch_size: 2 channels: 3 height: 4 width: 5 } }
layer { name: "ip" type: "InnerProduct" bottom: "data" top: "ip"
  inner_product_param { num_output: 4 weight_filler { type: "gaussian" std: 0.3 } } }
layer { name: "loss" type: "SoftmaxWithLoss" bottom: "ip" bottom: "label" top: "loss" }
layer { name: "accuracy" type: "Accuracy" bottom: "ip" bottom: "label" top: "accuracy" }
"""


def test_pycaffe_set_input_arrays_feeds_the_net(tmp_path):
    path = tmp_path / "net.prototxt"
    path.write_text(NET)
    net = caffe.Net(str(path), caffe.TEST)
    data, _ = arrays(4)
    labels = np.array([0, 3, 1, 2], dtype=np.float32)  # 1-d labels, as pycaffe takes them
    net.set_input_arrays(data, labels)
    weights = net.params["ip"][0].data.astype(np.float64)
    bias = net.params["ip"][1].data.astype(np.float64)
    for items in ([0, 1], [2, 3]):
        out = net.forward()
        np.testing.assert_array_equal(net.blobs["data"].data, data[items])
        scores = data[items].reshape(2, -1).astype(np.float64) @ weights.T + bias
        log_softmax = scores - scores.max(1, keepdims=True)
        log_softmax -= np.log(np.exp(log_softmax).sum(1, keepdims=True))
        truth = labels[items].astype(int)
        assert relative_error(out["loss"], -log_softmax[[0, 1], truth].mean()) < 1e-5
        assert float(out["accuracy"]) == np.mean(scores.argmax(1) == truth)


def test_set_input_arrays_needs_memory_data_first(tmp_path):
    path = tmp_path / "net.prototxt"
    path.write_text('name: "plain" layer { name: "in" type: "Input" top: "x" input_param { shape { dim: 2 } } }')
    with pytest.raises(NetError, match="first layer is a MemoryData layer"):
        caffe.Net(str(path), caffe.TEST).set_input_arrays(*arrays())
