"""Reduction, Tile, Filter, BatchReindex: numpy references, float64 gradchecks, Caffe's sign(0) = 0
for ASUM, Filter's data-dependent top inside a Net, and the CHECK failures."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from google.protobuf import text_format

from rloss.errors import LayerError
from rloss.net import Net
from rloss.proto import caffe_pb2
from tests.helpers import layer_from_text, relative_error


def randn(*shape, seed=0, dtype=torch.float32):
    return torch.from_numpy(np.random.RandomState(seed).randn(*shape)).to(dtype)


def reduction(params: str, shape):
    return layer_from_text(
        f'name: "r" type: "Reduction" bottom: "a" top: "b" reduction_param {{ {params} }}', [shape]
    )


def tile(params: str, shape):
    return layer_from_text(f'name: "t" type: "Tile" bottom: "a" top: "b" tile_param {{ {params} }}', [shape])


def filter_layer(shapes, tops: int | None = None):
    bottoms = " ".join(f'bottom: "b{i}"' for i in range(len(shapes)))
    count = len(shapes) - 1 if tops is None else tops
    top_text = " ".join(f'top: "t{i}"' for i in range(count))
    return layer_from_text(f'name: "f" type: "Filter" {bottoms} {top_text}', shapes)


def reindex(shapes):
    return layer_from_text('name: "r" type: "BatchReindex" bottom: "d" bottom: "i" top: "t"', shapes)


# ---- Reduction ----------------------------------------------------------------------------------
def reduction_reference(x: np.ndarray, operation: str, axis: int, coeff: float) -> np.ndarray:
    rows = x.reshape(x.shape[:axis] + (-1,))
    values = {"SUM": rows, "MEAN": rows, "ASUM": np.abs(rows), "SUMSQ": rows**2}[operation].sum(axis=-1)
    return coeff * values / (rows.shape[-1] if operation == "MEAN" else 1)


@pytest.mark.parametrize("operation", ["SUM", "ASUM", "SUMSQ", "MEAN"])
@pytest.mark.parametrize("axis, canonical", [(0, 0), (1, 1), (-1, 3), (2, 2)])
def test_reduction_forward(operation, axis, canonical):
    layer = reduction(f"operation: {operation} axis: {axis} coeff: -1.5", (2, 3, 4, 5))
    x = randn(2, 3, 4, 5)
    (y,) = layer(x)
    assert layer.top_shapes == [(2, 3, 4, 5)[:canonical]]
    assert relative_error(y, reduction_reference(x.numpy().astype(np.float64), operation, canonical, -1.5)) < 1e-6


def test_reduction_defaults_sum_everything_to_a_scalar():
    layer = reduction("", (3, 4))
    assert layer.top_shapes == [()]
    (y,) = layer(randn(3, 4))
    assert y.shape == () and y.item() == pytest.approx(float(randn(3, 4).double().sum()), rel=1e-6)


@pytest.mark.parametrize("operation", ["SUM", "ASUM", "SUMSQ", "MEAN"])
def test_reduction_gradcheck(operation):
    layer = reduction(f"operation: {operation} axis: 1 coeff: 0.7", (2, 3, 4))
    x = randn(2, 3, 4, dtype=torch.float64).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda t: layer(t)[0], (x,))


def test_reduction_asum_gradient_at_zero_is_zero():
    layer = reduction("operation: ASUM axis: 1 coeff: 2", (2, 3))
    x = torch.tensor([[0.0, -1.0, 2.0], [3.0, 0.0, -0.0]], requires_grad=True)
    (y,) = layer(x)
    y.backward(torch.tensor([1.5, -1.0]))
    expected = 2 * np.array([[1.5], [-1.0]]) * np.sign(x.detach().numpy())
    np.testing.assert_array_equal(x.grad.numpy(), expected)
    assert x.grad[0, 0].item() == 0 and x.grad[1, 1].item() == 0


@pytest.mark.parametrize("axis", [4, -5])
def test_reduction_refuses_an_axis_out_of_range(axis):
    with pytest.raises(LayerError, match=f"axis {axis} is out of range"):
        reduction(f"axis: {axis}", (2, 3, 4, 5))


# ---- Tile ---------------------------------------------------------------------------------------
def tile_reference(x: np.ndarray, axis: int, tiles: int) -> np.ndarray:
    """Caffe's loops: for each index before `axis`, `tiles` copies of the block from `axis` on."""
    outer = int(np.prod(x.shape[:axis]))
    blocks = x.reshape(outer, 1, -1)
    top = np.concatenate([blocks] * tiles, axis=1)
    shape = list(x.shape)
    shape[axis] *= tiles
    return top.reshape(shape)


@pytest.mark.parametrize("axis, canonical", [(0, 0), (1, 1), (-1, 2)])
def test_tile_forward(axis, canonical):
    layer = tile(f"axis: {axis} tiles: 3", (2, 3, 4))
    x = randn(2, 3, 4)
    (y,) = layer(x)
    expected = tile_reference(x.numpy(), canonical, 3)
    assert layer.top_shapes == [expected.shape]
    np.testing.assert_array_equal(y.numpy(), expected)


def test_tile_default_axis_is_one_and_gradient_sums_the_copies():
    layer = tile("tiles: 2", (2, 3))
    x = randn(2, 3, dtype=torch.float64).requires_grad_(True)
    (y,) = layer(x)
    assert tuple(y.shape) == (2, 6)
    dy = randn(2, 6, seed=1, dtype=torch.float64)
    y.backward(dy)
    np.testing.assert_allclose(x.grad.numpy(), dy.numpy()[:, :3] + dy.numpy()[:, 3:], rtol=1e-15)
    assert torch.autograd.gradcheck(lambda t: layer(t)[0], (x.detach().requires_grad_(True),))


@pytest.mark.parametrize(
    "params, message",
    [("tiles: 0", "tiles must be > 0, got 0"), ("tiles: -2", "tiles must be > 0"), ("axis: 1", "tiles is required"),
     ("axis: 3 tiles: 2", "axis 3 is out of range")],
)
def test_tile_errors(params, message):
    with pytest.raises(LayerError, match=message):
        tile(params, (2, 3, 4))


# ---- Filter -------------------------------------------------------------------------------------
@pytest.mark.parametrize("selector_shape", [(5,), (5, 1), (5, 1, 1, 1)])
def test_filter_forward_keeps_the_selected_items(selector_shape):
    """Any non-zero selector value selects (Caffe tests the value's truth), not only 1."""
    layer = filter_layer([(5, 3), (5, 2, 2), selector_shape])
    assert layer.top_shapes == [(5, 3), (5, 2, 2)]  # Caffe's first Reshape: the bottoms' item count
    a, b = randn(5, 3), randn(5, 2, 2, seed=1)
    selector = torch.tensor([1.0, 0.0, 2.0, 0.0, -0.5]).reshape(selector_shape)
    top_a, top_b = layer(a, b, selector)
    keep = selector.numpy().reshape(-1) != 0
    np.testing.assert_array_equal(top_a.numpy(), a.numpy()[keep])
    np.testing.assert_array_equal(top_b.numpy(), b.numpy()[keep])


def test_filter_can_select_nothing():
    (top,) = filter_layer([(3, 2), (3,)])(randn(3, 2), torch.zeros(3))
    assert tuple(top.shape) == (0, 2)


def test_filter_gradient_reaches_the_selected_items_only():
    layer = filter_layer([(4, 3), (4, 1)])
    x = randn(4, 3, dtype=torch.float64).requires_grad_(True)
    selector = torch.tensor([[0.0], [1.0], [1.0], [0.0]], dtype=torch.float64, requires_grad=True)
    (top,) = layer(x, selector)
    dy = randn(2, 3, seed=1, dtype=torch.float64)
    top.backward(dy)
    expected = np.zeros((4, 3))
    expected[[1, 2]] = dy.numpy()
    np.testing.assert_array_equal(x.grad.numpy(), expected)
    assert selector.grad is None
    assert torch.autograd.gradcheck(lambda t: layer(t, selector.detach())[0], (x.detach().requires_grad_(True),))


@pytest.mark.parametrize(
    "shapes, tops, message",
    [
        ([(4, 3), (4, 2)], None, r"selector \(last bottom\) must have shape"),
        ([(4, 3), ()], None, r"selector \(last bottom\) must have shape"),
        ([(4, 3), (5,)], None, "bottom 0 has shape"),
        ([(4, 3), (4, 2), (4,)], 1, "2 data bottoms, 1 tops"),
        ([(4, 3)], 1, "needs 2..any bottoms"),
    ],
)
def test_filter_errors(shapes, tops, message):
    with pytest.raises(LayerError, match=message):
        filter_layer(shapes, tops)


def test_filter_checks_the_shapes_of_the_data_it_gets():
    layer = filter_layer([(4, 3), (4,)])
    with pytest.raises(LayerError, match="bottom 0 has shape"):
        layer(randn(3, 3), torch.ones(4))


def test_filter_in_a_net_passes_the_selected_count_and_no_selector_gradient():
    """The net's static shape is the bottom's (4, 3); the data flowing is the 2 selected items."""
    text = (
        'name: "f" force_backward: true input: "x" input_shape { dim: 4 dim: 3 } '
        'input: "s" input_shape { dim: 4 } '
        'layer { name: "f" type: "Filter" bottom: "x" bottom: "s" top: "y" } '
        'layer { name: "r" type: "Reduction" bottom: "y" top: "loss" loss_weight: 1 '
        'reduction_param { operation: SUMSQ } }'
    )
    net = Net(text_format.Parse(text, caffe_pb2.NetParameter()), caffe_pb2.TRAIN, source="test.prototxt")
    assert net.blob_shapes["y"] == (4, 3)
    x = randn(4, 3)
    loss = net.forward({"x": x, "s": torch.tensor([0.0, 1.0, 0.0, 1.0])})
    assert tuple(net.blob_data["y"].shape) == (2, 3)
    assert loss.item() == pytest.approx(float((x.double()[[1, 3]] ** 2).sum()), rel=1e-6)
    loss.backward()
    expected = np.zeros((4, 3), dtype=np.float32)
    expected[[1, 3]] = 2 * x.numpy()[[1, 3]]
    np.testing.assert_allclose(net.blob_data["x"].grad.numpy(), expected, rtol=1e-6)
    assert net.blob_data["s"].grad is None


# ---- BatchReindex -------------------------------------------------------------------------------
def test_batch_reindex_forward_repeats_and_truncates_indices():
    layer = reindex([(3, 2, 2), (5,)])
    assert layer.top_shapes == [(5, 2, 2)]
    data = randn(3, 2, 2)
    index = torch.tensor([2.0, 0.0, 2.0, 1.7, 0.2])
    (top,) = layer(data, index)
    np.testing.assert_array_equal(top.numpy(), data.numpy()[[2, 0, 2, 1, 0]])


def test_batch_reindex_gradient_accumulates_repeated_items():
    layer = reindex([(3, 2), (4,)])
    data = randn(3, 2, dtype=torch.float64).requires_grad_(True)
    index = torch.tensor([2.0, 0.0, 2.0, 2.0], dtype=torch.float64, requires_grad=True)
    (top,) = layer(data, index)
    dy = randn(4, 2, seed=1, dtype=torch.float64)
    top.backward(dy)
    expected = np.zeros((3, 2))
    np.add.at(expected, [2, 0, 2, 2], dy.numpy())
    np.testing.assert_allclose(data.grad.numpy(), expected, rtol=1e-15)
    assert index.grad is None
    assert torch.autograd.gradcheck(lambda t: layer(t, index.detach())[0], (data.detach().requires_grad_(True),))


@pytest.mark.parametrize("bad", [3.0, -1.0, -0.5, float("nan")])
def test_batch_reindex_refuses_an_index_out_of_range(bad):
    layer = reindex([(3, 2), (2,)])
    with pytest.raises(LayerError, match=r"out of range for data of 3 items \(must be in \[0, 3\)\)"):
        layer(randn(3, 2), torch.tensor([0.0, bad]))


def test_batch_reindex_shape_errors():
    with pytest.raises(LayerError, match=r"index \(bottom 1\) must have 1 axis"):
        reindex([(3, 2), (2, 1)])
    with pytest.raises(LayerError, match="at least one axis"):
        reindex([(), (2,)])
    with pytest.raises(LayerError, match="needs 2 bottoms"):
        layer_from_text('name: "r" type: "BatchReindex" bottom: "d" top: "t"', [(3, 2)])


def test_a_net_names_the_layer_of_a_bad_index():
    text = (
        'name: "b" input: "d" input_shape { dim: 3 dim: 2 } input: "i" input_shape { dim: 2 } '
        'layer { name: "r" type: "BatchReindex" bottom: "d" bottom: "i" top: "t" }'
    )
    net = Net(text_format.Parse(text, caffe_pb2.NetParameter()), caffe_pb2.TEST, source="test.prototxt")
    with pytest.raises(LayerError, match=r"layer 'r' \(type BatchReindex\): index value 5.0 is out of range"):
        net.forward({"d": randn(3, 2), "i": torch.tensor([0.0, 5.0])})
