"""Caffe's net construction rules: Split insertion and naming, in-place tops, fan-out gradient
sums, parameter sharing, loss weights, propagate_down, outputs, and clear errors for bad wiring."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from google.protobuf import text_format

from rloss import caffe
from rloss.errors import NetError
from rloss.net import Net
from rloss.proto import caffe_pb2

HEAD = 'name: "t" input: "x" input_shape { dim: 2 dim: 3 dim: 5 dim: 5 } '


def build(text: str, phase: int = caffe_pb2.TRAIN) -> Net:
    return Net(text_format.Parse(text, caffe_pb2.NetParameter()), phase, source="test.prototxt")


def conv(name: str, bottom: str, top: str, extra: str = "", n: int = 4) -> str:
    return (f'layer {{ name: "{name}" type: "Convolution" bottom: "{bottom}" top: "{top}" {extra} '
            f'convolution_param {{ num_output: {n} kernel_size: 3 pad: 1 '
            f'weight_filler {{ type: "gaussian" std: 0.1 }} }} }} ')


def test_split_layers_are_named_as_caffe_names_them() -> None:
    net = build(HEAD + conv("c1", "x", "a") + conv("c2", "a", "b") + conv("c3", "a", "c") + conv("c4", "x", "d"))
    names = net.layer_names()
    assert names[0] == "x_input_0_split" and "a_c1_0_split" in names
    assert net.layer_bottoms("c2") == ["a_c1_0_split_0"] and net.layer_bottoms("c3") == ["a_c1_0_split_1"]
    assert net.layer_bottoms("c4") == ["x_input_0_split_1"]
    assert net.outputs == ["b", "c", "d"]


def test_fan_out_gradient_is_the_sum_of_the_consumers() -> None:
    text = (HEAD.replace('name: "t"', 'name: "t" force_backward: true')
            + conv("c1", "x", "a") + conv("c2", "a", "b") + conv("c3", "a", "c"))
    net = caffe.Net._wrap(build(text))
    net.blobs["x"].data[...] = np.random.RandomState(0).randn(2, 3, 5, 5)
    net.forward()
    net.blobs["b"].diff[...] = 1.0
    net.blobs["c"].diff[...] = 2.0
    net.backward()
    split0, split1 = net.blobs["a_c1_0_split_0"].diff, net.blobs["a_c1_0_split_1"].diff
    np.testing.assert_allclose(net.blobs["a"].diff, split0 + split1, rtol=1e-5, atol=1e-6)
    assert np.abs(split0).max() > 0 and np.abs(split1).max() > 0


def test_in_place_diff_is_the_gradient_of_the_first_producer() -> None:
    text = (HEAD.replace('name: "t"', 'name: "t" force_backward: true') + conv("c1", "x", "a")
            + 'layer { name: "r" type: "ReLU" bottom: "a" top: "a" }')
    net = caffe.Net._wrap(build(text))
    net.blobs["x"].data[...] = np.random.RandomState(1).randn(2, 3, 5, 5)
    net.forward()
    after_relu = net.blobs["a"].data.copy()
    assert (after_relu >= 0).all()
    net.blobs["a"].diff[...] = 1.0
    net.backward()
    # the diff Caffe leaves in the shared blob is the ReLU's bottom diff: 1 where the output is > 0
    np.testing.assert_array_equal(net._net.blob_diff("a").numpy(), (after_relu > 0).astype(np.float32))


def test_shared_params_are_one_tensor_and_gradients_add() -> None:
    spec = 'param { name: "w" } param { name: "b" } '
    text = HEAD + conv("c1", "x", "a", spec, n=3) + conv("c2", "a", "b", spec, n=3)
    net = build(text)
    assert net.layers[net.layer_names().index("c1")].blobs[0] is net.layers[net.layer_names().index("c2")].blobs[0]
    assert len(net.learnable) == 2


def test_shared_param_shape_mismatch_is_an_error() -> None:
    spec = 'param { name: "w" } '
    with pytest.raises(NetError, match="shares 'w'"):
        build(HEAD + conv("c1", "x", "a", spec, n=4) + conv("c2", "a", "b", spec, n=3))


def test_lr_mult_zero_freezes_and_loss_weight_scales() -> None:
    text = (HEAD + conv("c1", "x", "a", "param { lr_mult: 0 } param { lr_mult: 0 }") + conv("c2", "a", "b")
            + 'input: "label" input_shape { dim: 2 dim: 1 dim: 5 dim: 5 } '
            + 'layer { name: "loss" type: "SoftmaxWithLoss" bottom: "b" bottom: "label" top: "loss" loss_weight: 3 }')
    net = build(text)
    frozen = [e for e in net.learnable if e.owner.startswith("c1/")]
    assert all(not e.tensor.requires_grad for e in frozen)
    loss = net.forward({"x": torch.randn(2, 3, 5, 5), "label": torch.zeros(2, 1, 5, 5)})
    np.testing.assert_allclose(float(loss.detach()), 3 * float(net.blob_data["loss"].detach()), rtol=1e-6)


def test_propagate_down_false_blocks_the_gradient() -> None:
    text = (HEAD.replace('name: "t"', 'name: "t" force_backward: true') + conv("c1", "x", "a", n=3)
            + 'layer { name: "s" type: "Eltwise" bottom: "a" bottom: "x" top: "s" '
              'propagate_down: true propagate_down: false }')
    net = caffe.Net._wrap(build(text))
    net.forward()
    net.blobs["s"].diff[...] = 1.0
    net.backward()
    assert np.abs(net.blobs["x_input_0_split_1"].diff).max() == 0
    assert np.abs(net.blobs["a"].diff).max() > 0


BAD_NETS = {
    "unknown type": (HEAD + 'layer { name: "c" type: "Convolutoin" bottom: "x" top: "y" }', "did you mean Convolution"),
    "missing bottom": (HEAD + conv("c", "nothere", "y"), "unknown bottom blob 'nothere'"),
    "consumed twice after in-place": (
        HEAD + conv("c", "x", "y") + conv("d", "y", "y2") + 'layer { name: "r" type: "ReLU" bottom: "y2" top: "y" }',
        "produced by multiple sources"),
    "propagate_down count": (
        HEAD + 'layer { name: "r" type: "ReLU" bottom: "x" top: "y" propagate_down: true propagate_down: false }',
        "propagate_down"),
    "too many param specs": (HEAD + conv("c", "x", "y", "param {} param {} param {}"), "3 param specs"),
    "shape mismatch": (HEAD + conv("c", "x", "y") + 'input: "z" input_shape { dim: 2 dim: 3 dim: 4 dim: 4 } '
                       'layer { name: "e" type: "Eltwise" bottom: "y" bottom: "z" top: "e" }', "layer 'e'"),
    "input_dim count": ('name: "t" input: "x" input_dim: 1 input_dim: 3', "input_dim"),
    "loss_weight count": (HEAD + 'layer { name: "r" type: "ReLU" bottom: "x" top: "y" loss_weight: 1 loss_weight: 2 }',
                          "loss_weight"),
}


@pytest.mark.parametrize("case", sorted(BAD_NETS))
def test_bad_nets_give_clear_errors(case: str) -> None:
    text, expected = BAD_NETS[case]
    with pytest.raises(NetError) as info:
        build(text)
    assert expected in str(info.value)
    assert "test.prototxt" in str(info.value)


def test_weights_survive_save_load_save_byte_identically(tmp_path) -> None:
    text = HEAD + conv("c1", "x", "a") + 'layer { name: "r" type: "ReLU" bottom: "a" top: "a" }' + conv("c2", "a", "b")
    first = build(text)
    first.save(tmp_path / "one.caffemodel")
    second = build(text)  # other random fillers
    second.copy_from(tmp_path / "one.caffemodel")
    second.save(tmp_path / "two.caffemodel")
    assert (tmp_path / "one.caffemodel").read_bytes() == (tmp_path / "two.caffemodel").read_bytes()
    for a, b in zip(first.learnable_tensors(), second.learnable_tensors()):
        assert torch.equal(a, b)


V1_NET = '''name: "v1" input: "x" input_dim: 1 input_dim: 3 input_dim: 8 input_dim: 8
layers { name: "conv" type: CONVOLUTION bottom: "x" top: "y" blobs_lr: 1 blobs_lr: 2 weight_decay: 1 weight_decay: 0
  convolution_param { num_output: 2 kernel_size: 3 } }
layers { name: "relu" type: RELU bottom: "y" top: "y" }
'''


def test_v1_net_with_a_v1_caffemodel_loads(tmp_path) -> None:
    from rloss.proto.blob import array_to_blob

    (tmp_path / "v1.prototxt").write_text(V1_NET)
    weights, bias = np.random.RandomState(3).randn(2, 3, 3, 3).astype(np.float32), np.array([0.5, -1], np.float32)
    model = caffe_pb2.NetParameter(name="v1")
    layer = model.layers.add(name="conv", type=caffe_pb2.V1LayerParameter.CONVOLUTION)
    layer.blobs.append(array_to_blob(weights))
    legacy_bias = layer.blobs.add(num=1, channels=1, height=1, width=2)  # the legacy 4-D encoding
    legacy_bias.data.extend(bias.tolist())
    (tmp_path / "v1.caffemodel").write_bytes(model.SerializeToString())

    net = caffe.Net(str(tmp_path / "v1.prototxt"), str(tmp_path / "v1.caffemodel"), caffe.TEST)
    np.testing.assert_array_equal(net.params["conv"][0].data, weights)
    np.testing.assert_array_equal(net.params["conv"][1].data, bias)
    specs = net._net.learnable
    assert [(e.lr_mult, e.decay_mult) for e in specs] == [(1, 1), (2, 0)]
    x = np.random.RandomState(4).randn(1, 3, 8, 8).astype(np.float32)
    out = net.forward(x=x)["y"]
    expected = torch.relu(torch.nn.functional.conv2d(torch.from_numpy(x), torch.from_numpy(weights),
                                                     torch.from_numpy(bias)))
    np.testing.assert_allclose(out, expected.numpy(), rtol=1e-5, atol=1e-6)


def test_input_layer_tops_are_fed_like_net_inputs() -> None:
    text = ('name: "t" layer { name: "in" type: "Input" top: "x" '
            'input_param { shape { dim: 1 dim: 2 dim: 3 dim: 3 } } } '
            'layer { name: "r" type: "ReLU" bottom: "x" top: "y" }')
    net = caffe.Net._wrap(build(text))
    assert net.inputs == ["x"]
    net.blobs["x"].data[...] = -1.0
    net.blobs["x"].data[0, 0, 0, 0] = 5.0
    assert float(net.forward()["y"].sum()) == 5.0
