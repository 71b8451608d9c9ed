"""Embed and Parameter: Embed against numpy indexing and np.add.at gradients, float64 gradchecks,
their errors, and a net in which a Parameter blob feeds an Eltwise and learns from it."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from google.protobuf import text_format

from rloss.errors import LayerError
from rloss.net import Net
from rloss.proto import caffe_pb2
from tests.helpers import layer_from_text, relative_error

FILLERS = 'weight_filler { type: "gaussian" std: 1 } bias_filler { type: "uniform" min: -1 max: 1 }'


def embed(params: str, name: str = "emb", extra: str = "") -> str:
    return f'name: "{name}" type: "Embed" bottom: "i" top: "e" {extra} embed_param {{ {params} }}'


def parameter(dims: str) -> str:
    return f'name: "p" type: "Parameter" top: "p" parameter_param {{ shape {{ {dims} }} }}'


# ---- Embed --------------------------------------------------------------------------------------


@pytest.mark.parametrize("bias", [True, False])
def test_embed_forward_is_row_lookup_plus_bias(bias: bool) -> None:
    indices = np.array([[0, 4, 2], [4, 4, 1]], dtype=np.float32)
    text = embed(f"num_output: 3 input_dim: 5 bias_term: {str(bias).lower()} {FILLERS}")
    layer = layer_from_text(text, [indices.shape])
    weight = layer.blobs[0].detach().numpy().astype(np.float64)
    assert weight.shape == (5, 3) and len(layer.blobs) == (2 if bias else 1)
    expected = weight[indices.astype(int)]
    if bias:
        expected = expected + layer.blobs[1].detach().numpy()
    assert layer.top_shapes == [(2, 3, 3)]
    (y,) = layer(torch.from_numpy(indices))
    assert relative_error(y, expected) < 1e-7


def test_embed_top_appends_num_output_to_any_bottom_shape() -> None:
    for shape in [(4,), (2, 1, 3, 2)]:
        layer = layer_from_text(embed(f"num_output: 2 input_dim: 3 {FILLERS}"), [shape])
        assert layer.top_shapes == [(*shape, 2)]
        (y,) = layer(torch.zeros(shape))
        assert tuple(y.shape) == (*shape, 2)


def test_embed_weight_gradient_accumulates_repeated_indices() -> None:
    indices = np.array([3, 0, 3, 3, 1, 0], dtype=np.float32)
    layer = layer_from_text(embed(f"num_output: 4 input_dim: 5 {FILLERS}"), [indices.shape])
    bottom = torch.from_numpy(indices).requires_grad_(True)
    (y,) = layer(bottom)
    dy = np.random.RandomState(1).randn(6, 4).astype(np.float32)
    y.backward(torch.from_numpy(dy))
    expected = np.zeros((5, 4))
    np.add.at(expected, indices.astype(int), dy)
    np.testing.assert_allclose(layer.blobs[0].grad.numpy(), expected, rtol=1e-6)
    np.testing.assert_allclose(layer.blobs[1].grad.numpy(), dy.sum(axis=0), rtol=1e-6)
    assert bottom.grad is None, "Caffe gives the indices no gradient"


def test_embed_gradcheck_on_the_blobs() -> None:
    layer = layer_from_text(embed(f"num_output: 3 input_dim: 4 {FILLERS}"), [(2, 3)]).double()
    indices = torch.tensor([[0.0, 3.0, 3.0], [1.0, 2.0, 0.0]], dtype=torch.float64)
    # gradcheck perturbs the blobs it is given in place, which the layer reads
    assert torch.autograd.gradcheck(lambda *blobs: layer(indices)[0], tuple(layer.blobs))


@pytest.mark.parametrize("value", [5.0, -1.0, 1.5, float("nan"), float("inf")])
def test_embed_refuses_an_index_that_is_not_an_integer_in_range(value: float) -> None:
    layer = layer_from_text(embed("num_output: 2 input_dim: 5"), [(3,)])
    with pytest.raises(LayerError, match=r"not an integer index in \[0, 5\)") as info:
        layer(torch.tensor([0.0, value, 4.0]))
    assert "layer 'emb' (type Embed)" in str(info.value)


@pytest.mark.parametrize(
    ("text", "match"),
    [
        (embed("input_dim: 5"), "num_output must be > 0, got 0"),
        (embed("num_output: 2"), "input_dim must be > 0, got 0"),
        (embed("num_output: 2 input_dim: 5", extra="propagate_down: true"), "cannot backpropagate to its input"),
        (embed('num_output: 2 input_dim: 5 weight_filler { type: "nope" }'), "unknown filler type"),
    ],
)
def test_embed_parameter_errors(text: str, match: str) -> None:
    with pytest.raises(LayerError, match=match):
        layer_from_text(text, [(3,)])


# ---- Parameter ----------------------------------------------------------------------------------


def test_parameter_top_is_its_zero_blob_and_passes_the_gradient() -> None:
    layer = layer_from_text(parameter("dim: 2 dim: 3 dim: 4"), [])
    assert layer.top_shapes == [(2, 3, 4)] and len(layer.blobs) == 1
    (top,) = layer()
    assert torch.equal(top, torch.zeros(2, 3, 4))
    layer.blobs[0].data.fill_(2.0)
    (top,) = layer()
    assert torch.equal(top, torch.full((2, 3, 4), 2.0)), "the top shows the blob's current values"
    dy = torch.arange(24.0).reshape(2, 3, 4)
    top.backward(dy)
    assert torch.equal(layer.blobs[0].grad, dy)


@pytest.mark.parametrize(("dims", "match"), [("dim: 2 dim: -1", "negative dimension"), ("", None)])
def test_parameter_shapes(dims: str, match: str | None) -> None:
    if match is None:
        assert layer_from_text(parameter(dims), []).top_shapes == [()], "no dims: a scalar blob, as in Caffe"
        return
    with pytest.raises(LayerError, match=match):
        layer_from_text(parameter(dims), [])


def test_parameter_takes_no_bottom() -> None:
    with pytest.raises(LayerError, match="needs 0 bottoms, the prototxt gives 1"):
        layer_from_text(parameter("dim: 2") + ' bottom: "x"', [(2,)])


NET = """
name: "learned"
layer { name: "x" type: "Input" top: "x" input_param { shape { dim: 2 dim: 3 } } }
layer { name: "p" type: "Parameter" top: "p" parameter_param { shape { dim: 2 dim: 3 } } }
layer { name: "prod" type: "Eltwise" bottom: "x" bottom: "p" top: "y" loss_weight: 1
        eltwise_param { operation: PROD } }
"""


def test_parameter_blob_is_learnable_in_a_net_and_receives_the_gradient() -> None:
    net = Net(text_format.Parse(NET, caffe_pb2.NetParameter()), caffe_pb2.TRAIN, source="learned.prototxt")
    (blob,) = net.params["p"]
    assert any(tensor is blob for tensor in net.learnable_tensors())
    assert blob.requires_grad
    x = torch.from_numpy(np.random.RandomState(0).randn(2, 3).astype(np.float32))
    blob.data.copy_(torch.arange(6.0).reshape(2, 3))
    loss = net.forward({"x": x})
    assert float(loss.detach()) == pytest.approx(float((x * torch.arange(6.0).reshape(2, 3)).sum()), rel=1e-6)
    loss.backward()
    assert torch.equal(blob.grad, x), "d sum(x * p) / dp = x"


def test_embed_in_a_net_detaches_its_indices() -> None:
    text = ('name: "e" force_backward: true '
            'layer { name: "i" type: "Input" top: "i" input_param { shape { dim: 4 } } } '
            f'layer {{ {embed(f"num_output: 2 input_dim: 3 {FILLERS}")} loss_weight: 1 }}')
    net = Net(text_format.Parse(text, caffe_pb2.NetParameter()), caffe_pb2.TRAIN, source="e.prototxt")
    loss = net.forward({"i": torch.tensor([0.0, 2.0, 2.0, 1.0])})
    loss.backward()
    expected = np.zeros((3, 2))
    np.add.at(expected, [0, 2, 2, 1], 1.0)
    np.testing.assert_array_equal(net.params["emb"][0].grad.numpy(), expected)


def test_embed_in_a_net_with_a_bad_index_names_the_layer() -> None:
    text = ('name: "e" layer { name: "i" type: "Input" top: "i" input_param { shape { dim: 2 } } } '
            f'layer {{ {embed("num_output: 2 input_dim: 3")} }}')
    net = Net(text_format.Parse(text, caffe_pb2.NetParameter()), caffe_pb2.TRAIN, source="e.prototxt")
    with pytest.raises(LayerError, match=r"layer .emb. \(type Embed\).*3.0"):
        net.forward({"i": torch.tensor([0.0, 3.0])})
