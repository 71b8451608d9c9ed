"""Eltwise, Concat, Slice, Split, Flatten, Reshape, Silence, ArgMax: numpy references written from
the spec, float64 gradchecks, exact gradient routing, and Caffe's golden `eltwise` case."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from rloss.errors import LayerError
from rloss.layers import layer_class
from rloss.proto import caffe_pb2
from tests.helpers import layer_from_text, relative_error
from tests.shared_data import golden

TRAIN = caffe_pb2.TRAIN


build = layer_from_text
rel_err = relative_error


def randn(*shape, seed=0, dtype=torch.float32):
    return torch.from_numpy(np.random.RandomState(seed).randn(*shape)).to(dtype)


def eltwise(params: str, n: int, shape=(2, 3, 4)):
    bottoms = " ".join(f'bottom: "b{i}"' for i in range(n))
    return build(f'name: "e" type: "Eltwise" {bottoms} top: "t" eltwise_param {{ {params} }}', [shape] * n)


# ---- Eltwise ------------------------------------------------------------------------------------
def test_eltwise_sum_with_coeff():
    layer = eltwise("operation: SUM coeff: 1 coeff: -0.5 coeff: 2", 3)
    xs = [randn(2, 3, 4, seed=i).requires_grad_(True) for i in range(3)]
    (y,) = layer(*xs)
    xn = [x.detach().numpy() for x in xs]
    assert rel_err(y.detach().numpy(), xn[0] - 0.5 * xn[1] + 2 * xn[2]) < 1e-6
    dy = randn(2, 3, 4, seed=9)
    grads = torch.autograd.grad(y, xs, dy)
    for grad, coeff in zip(grads, (1.0, -0.5, 2.0)):
        np.testing.assert_array_equal(grad.numpy(), coeff * dy.numpy())


def test_eltwise_prod_stable_and_unstable_gradients():
    xs = [randn(2, 3, 4, seed=i, dtype=torch.float64).requires_grad_(True) for i in range(3)]
    stable = eltwise("operation: PROD", 3)
    (y,) = stable(*xs)
    xn = [x.detach().numpy() for x in xs]
    assert rel_err(y.detach().numpy(), xn[0] * xn[1] * xn[2]) < 1e-12
    assert torch.autograd.gradcheck(lambda *t: stable(*t)[0], tuple(xs))
    unstable = eltwise("operation: PROD stable_prod_grad: false", 3)
    assert torch.autograd.gradcheck(lambda *t: unstable(*t)[0], tuple(xs))
    zero = [torch.tensor([0.0, 2.0], requires_grad=True), torch.tensor([3.0, 4.0], requires_grad=True)]
    stable_grads = torch.autograd.grad(eltwise("operation: PROD", 2, (2,))(*zero)[0], zero, torch.ones(2))
    np.testing.assert_array_equal(stable_grads[0].numpy(), [3.0, 4.0])
    np.testing.assert_array_equal(stable_grads[1].numpy(), [0.0, 2.0])
    y_over_x = eltwise("operation: PROD stable_prod_grad: false", 2, (2,))
    unstable_grads = torch.autograd.grad(y_over_x(*zero)[0], zero, torch.ones(2))
    assert np.isnan(unstable_grads[0].numpy()[0])  # Caffe's top / bottom at a zero bottom
    np.testing.assert_array_equal(unstable_grads[1].numpy(), [0.0, 2.0])


def numpy_caffe_max(xs):
    """Spec 2.5, CPU: bottoms 0/1 tie -> 1; later bottoms replace only when strictly greater."""
    top = np.where(xs[0] > xs[1], xs[0], xs[1])
    index = np.where(xs[0] > xs[1], 0, 1)
    for i, x in enumerate(xs[2:], start=2):
        index = np.where(x > top, i, index)
        top = np.where(x > top, x, top)
    return top, index


def test_eltwise_max_routes_gradient_with_caffe_ties():
    a = torch.tensor([1.0, 2.0, 5.0, 0.0, 3.0, -1.0])
    b = torch.tensor([1.0, 3.0, 4.0, 0.0, 3.0, -1.0])
    c = torch.tensor([0.0, 3.0, 5.0, 0.0, 3.0, 7.0])
    xs = [t.clone().requires_grad_(True) for t in (a, b, c)]
    (y,) = eltwise("operation: MAX", 3, (6,))(*xs)
    dy = torch.tensor([10.0, 20.0, 30.0, 40.0, 50.0, 60.0])
    grads = [g.numpy() for g in torch.autograd.grad(y, xs, dy)]
    # index: tie 0/1 -> 1; tie 1/2 -> 1; 0 wins 5 vs 4, then tie with 2 keeps 0; all tie -> 1; 2 strictly
    expected_index = np.array([1, 1, 0, 1, 1, 2])
    np.testing.assert_array_equal(y.detach().numpy(), [1.0, 3.0, 5.0, 0.0, 3.0, 7.0])
    for i in range(3):
        np.testing.assert_array_equal(grads[i], np.where(expected_index == i, dy.numpy(), 0.0))
    top, index = numpy_caffe_max([t.numpy() for t in (a, b, c)])
    np.testing.assert_array_equal(index, expected_index)


def test_eltwise_max_random_matches_reference():
    xs = [
        torch.from_numpy(np.random.RandomState(i).randint(-2, 3, (4, 5, 6)).astype(np.float32))
        for i in range(4)
    ]
    xs = [x.requires_grad_(True) for x in xs]
    (y,) = eltwise("operation: MAX", 4, (4, 5, 6))(*xs)
    top, index = numpy_caffe_max([x.detach().numpy() for x in xs])
    np.testing.assert_array_equal(y.detach().numpy(), top)
    dy = randn(4, 5, 6, seed=5)
    for i, grad in enumerate(torch.autograd.grad(y, xs, dy)):
        np.testing.assert_array_equal(grad.numpy(), np.where(index == i, dy.numpy(), 0.0))


def test_eltwise_golden():
    files = golden("01_layers", "eltwise")
    for layer_param in files.net_param().layer:
        layer = layer_class("Eltwise")(layer_param, [(2, 3, 5, 6)] * 2, TRAIN)
        xs = [
            torch.from_numpy(files.array(f"in_{b}")).requires_grad_(True) for b in layer_param.bottom
        ]
        (y,) = layer(*xs)
        top = layer_param.top[0]
        assert rel_err(y.detach().numpy(), files.array(f"out_{top}")) <= 1e-4
        y.backward(torch.from_numpy(files.array(f"topdiff_{top}")))
        for name, x in zip(layer_param.bottom, xs):
            assert rel_err(x.grad.numpy(), files.array(f"diff_{name}")) <= 1e-4


def test_eltwise_errors():
    with pytest.raises(LayerError, match=r"'e' \(type Eltwise\).*\(2, 3\).*\(2, 4\)"):
        build('name: "e" type: "Eltwise" bottom: "a" bottom: "b" top: "t"', [(2, 3), (2, 4)])
    with pytest.raises(LayerError, match=r"'e' \(type Eltwise\).*3 coeffs for 2 bottoms"):
        eltwise("coeff: 1 coeff: 2 coeff: 3", 2)
    with pytest.raises(LayerError, match="only allowed with operation SUM"):
        eltwise("operation: PROD coeff: 1 coeff: 2", 2)
    with pytest.raises(LayerError, match="needs 2..any bottoms"):
        eltwise("", 1)


# ---- Concat / Slice / Split ---------------------------------------------------------------------
def test_concat_axes_and_gradients():
    layer = build('name: "c" type: "Concat" bottom: "a" bottom: "b" top: "t"', [(2, 3, 4), (2, 5, 4)])
    assert layer.top_shapes == [(2, 8, 4)]
    a, b = randn(2, 3, 4).requires_grad_(True), randn(2, 5, 4, seed=1).requires_grad_(True)
    (y,) = layer(a, b)
    np.testing.assert_array_equal(y.detach().numpy(), np.concatenate([a.detach(), b.detach()], axis=1))
    dy = randn(2, 8, 4, seed=2)
    da, db = torch.autograd.grad(y, (a, b), dy)
    np.testing.assert_array_equal(da.numpy(), dy.numpy()[:, :3])
    np.testing.assert_array_equal(db.numpy(), dy.numpy()[:, 3:])
    legacy = build(
        'name: "c" type: "Concat" bottom: "a" bottom: "b" top: "t" concat_param { concat_dim: 0 }',
        [(2, 3), (4, 3)],
    )
    assert legacy.top_shapes == [(6, 3)]
    negative = build(
        'name: "c" type: "Concat" bottom: "a" bottom: "b" top: "t" concat_param { axis: -1 }',
        [(2, 3), (2, 1)],
    )
    assert negative.top_shapes == [(2, 4)]
    single = build('name: "c" type: "Concat" bottom: "a" top: "t"', [(2, 3)])
    x = randn(2, 3)
    assert single(x)[0] is not x and torch.equal(single(x)[0], x)


def test_concat_errors():
    with pytest.raises(LayerError, match=r"'c' \(type Concat\).*\(2, 3, 5\).*\(2, 3, 4\)"):
        build('name: "c" type: "Concat" bottom: "a" bottom: "b" top: "t"', [(2, 3, 4), (2, 3, 5)])
    with pytest.raises(LayerError, match="not both"):
        build(
            'name: "c" type: "Concat" bottom: "a" top: "t" concat_param { axis: 1 concat_dim: 1 }', [(2, 3)]
        )
    with pytest.raises(LayerError, match="concat_dim 2 is out of range"):
        build('name: "c" type: "Concat" bottom: "a" top: "t" concat_param { concat_dim: 2 }', [(2, 3)])


def slice_layer(params: str, tops: int, shape):
    names = " ".join(f'top: "t{i}"' for i in range(tops))
    return build(f'name: "s" type: "Slice" bottom: "a" {names} slice_param {{ {params} }}', [shape])


def test_slice_points_equal_split_and_gradients():
    layer = slice_layer("axis: 1 slice_point: 1 slice_point: 4", 3, (2, 6, 3))
    assert layer.top_shapes == [(2, 1, 3), (2, 3, 3), (2, 2, 3)]
    x = randn(2, 6, 3).requires_grad_(True)
    tops = layer(x)
    for top, (lo, hi) in zip(tops, ((0, 1), (1, 4), (4, 6))):
        np.testing.assert_array_equal(top.detach().numpy(), x.detach().numpy()[:, lo:hi])
    dys = [torch.full(t.shape, float(i + 1)) for i, t in enumerate(tops)]
    (dx,) = torch.autograd.grad(tops, x, dys)
    np.testing.assert_array_equal(dx.numpy()[0, :, 0], [1, 2, 2, 2, 3, 3])
    assert slice_layer("slice_dim: 0", 2, (4, 3)).top_shapes == [(2, 3), (2, 3)]
    assert slice_layer("axis: -1", 3, (2, 6)).top_shapes == [(2, 2)] * 3


def test_slice_errors():
    with pytest.raises(LayerError, match=r"'s' \(type Slice\).*slice_points \[2, 7\].*\(2, 6\)"):
        slice_layer("slice_point: 2 slice_point: 7", 3, (2, 6))
    with pytest.raises(LayerError, match=r"slice_points \[3, 3\]"):
        slice_layer("slice_point: 3 slice_point: 3", 3, (2, 6))
    with pytest.raises(LayerError, match="1 slice_points for 3 tops"):
        slice_layer("slice_point: 3", 3, (2, 6))
    with pytest.raises(LayerError, match=r"4 tops do not evenly divide axis 1 of bottom \(2, 6\)"):
        slice_layer("", 4, (2, 6))


def test_split_tops_are_distinct_and_gradients_sum():
    layer = build('name: "sp" type: "Split" bottom: "a" top: "a0" top: "a1" top: "a2"', [(2, 3)])
    x = randn(2, 3).requires_grad_(True)
    tops = layer(x)
    assert len({id(t) for t in tops} | {id(x)}) == 4
    (dx,) = torch.autograd.grad(tops, x, [torch.full((2, 3), v) for v in (1.0, 2.0, 4.0)])
    np.testing.assert_array_equal(dx.numpy(), np.full((2, 3), 7.0))
    with pytest.raises(LayerError, match="in-place"):
        build('name: "sp" type: "Split" bottom: "a" top: "a"', [(2, 3)])


# ---- Flatten / Reshape --------------------------------------------------------------------------
@pytest.mark.parametrize(
    "params, expected",
    [
        ("", (2, 60)),
        ("axis: 2", (2, 3, 20)),
        ("axis: 1 end_axis: 2", (2, 12, 5)),
        ("axis: 0 end_axis: -2", (24, 5)),
    ],
)
def test_flatten_shapes(params, expected):
    layer = build(
        f'name: "f" type: "Flatten" bottom: "a" top: "b" flatten_param {{ {params} }}', [(2, 3, 4, 5)]
    )
    assert layer.top_shapes == [expected]
    x = randn(2, 3, 4, 5)
    np.testing.assert_array_equal(layer(x)[0].numpy(), x.numpy().reshape(expected))


@pytest.mark.parametrize(
    "params, expected",
    [
        ("shape { dim: 0 dim: -1 }", (2, 60)),
        ("shape { dim: 0 dim: 3 dim: 2 dim: -1 }", (2, 3, 2, 10)),
        ("axis: 1 num_axes: 2 shape { dim: -1 }", (2, 12, 5)),
        ("axis: -1 shape { dim: 1 }", (2, 3, 4, 5, 1)),
        ("axis: 2 num_axes: 0 shape { dim: 1 }", (2, 3, 1, 4, 5)),
        ("shape { dim: 4 dim: 0 dim: -1 }", (4, 3, 10)),
    ],
)
def test_reshape_shapes(params, expected):
    layer = build(
        f'name: "r" type: "Reshape" bottom: "a" top: "b" reshape_param {{ {params} }}', [(2, 3, 4, 5)]
    )
    assert layer.top_shapes == [expected]
    x = randn(2, 3, 4, 5).requires_grad_(True)
    (y,) = layer(x)
    np.testing.assert_array_equal(y.detach().numpy(), x.detach().numpy().reshape(expected))
    (dx,) = torch.autograd.grad(y, x, torch.arange(120.0).reshape(expected))
    np.testing.assert_array_equal(dx.numpy().ravel(), np.arange(120.0))


def test_reshape_and_flatten_errors():
    def reshape(params):
        return build(
            f'name: "r" type: "Reshape" bottom: "a" top: "b" reshape_param {{ {params} }}', [(2, 3, 4)]
        )

    with pytest.raises(LayerError, match=r"'r' \(type Reshape\).*\(2, 3, 4\).*count 24.*\(5, 5\)"):
        reshape("shape { dim: 5 dim: 5 }")
    with pytest.raises(LayerError, match=r"not divisible.*\[5, -1\]"):
        reshape("shape { dim: 5 dim: -1 }")
    with pytest.raises(LayerError, match="more than one -1"):
        reshape("shape { dim: -1 dim: -1 }")
    with pytest.raises(LayerError, match="no axis 3 to copy"):
        reshape("shape { dim: 0 dim: 0 dim: 0 dim: 0 }")
    with pytest.raises(LayerError, match="goes past"):
        reshape("axis: 2 num_axes: 2 shape { dim: -1 }")
    with pytest.raises(LayerError, match="in-place"):
        build('name: "r" type: "Reshape" bottom: "a" top: "a" reshape_param { shape { dim: -1 } }', [(2, 3)])
    with pytest.raises(LayerError, match=r"'f' \(type Flatten\).*end_axis 0 comes before axis 1"):
        build('name: "f" type: "Flatten" bottom: "a" top: "b" flatten_param { end_axis: 0 }', [(2, 3)])


# ---- Silence / ArgMax ---------------------------------------------------------------------------
def test_silence_has_no_tops():
    layer = build('name: "si" type: "Silence" bottom: "a" bottom: "b"', [(2, 3), (4,)])
    assert layer.top_shapes == [] and layer(randn(2, 3), randn(4)) == []


def numpy_argmax(values: np.ndarray, k: int):
    """Caffe's ordering: sort (value, index) pairs descending, so equal values put larger index first."""
    pairs = sorted(((float(v), i) for i, v in enumerate(values)), reverse=True)[:k]
    return [i for _, i in pairs], [v for v, _ in pairs]


def test_argmax_axis_ties_pick_larger_index():
    layer = build('name: "am" type: "ArgMax" bottom: "a" top: "b" argmax_param { axis: 1 }', [(2, 4, 3, 3)])
    x = torch.from_numpy(np.random.RandomState(0).randint(0, 3, (2, 4, 3, 3)).astype(np.float32))
    x.requires_grad_(True)
    (y,) = layer(x)
    assert tuple(y.shape) == (2, 1, 3, 3) and not y.requires_grad
    xn = x.detach().numpy()
    for n, h, w in np.ndindex(2, 3, 3):
        assert y[n, 0, h, w].item() == numpy_argmax(xn[n, :, h, w], 1)[0][0]
    assert (xn.max(axis=1, keepdims=True) == xn).sum(axis=1).max() > 1  # ties really occur


def test_argmax_top_k_values_with_axis():
    layer = build(
        'name: "am" type: "ArgMax" bottom: "a" top: "b" argmax_param { axis: -1 top_k: 3 out_max_val: true }',
        [(2, 3, 6)],
    )
    x = torch.from_numpy(np.random.RandomState(1).randint(0, 4, (2, 3, 6)).astype(np.float32))
    (y,) = layer(x)
    assert tuple(y.shape) == (2, 3, 3)
    for n, c in np.ndindex(2, 3):
        np.testing.assert_array_equal(y[n, c].numpy(), numpy_argmax(x[n, c].numpy(), 3)[1])
    indices = build(
        'name: "am" type: "ArgMax" bottom: "a" top: "b" argmax_param { axis: 2 top_k: 3 }', [(2, 3, 6)]
    )
    (idx,) = indices(x)
    for n, c in np.ndindex(2, 3):
        np.testing.assert_array_equal(idx[n, c].numpy(), numpy_argmax(x[n, c].numpy(), 3)[0])


@pytest.mark.parametrize("out_max_val", [False, True])
def test_argmax_without_axis(out_max_val):
    flag = "true" if out_max_val else "false"
    layer = build(
        f'name: "am" type: "ArgMax" bottom: "a" top: "b" argmax_param {{ top_k: 2 out_max_val: {flag} }}',
        [(3, 2, 2, 2)],
    )
    rows = 2 if out_max_val else 1
    assert layer.top_shapes == [(3, rows, 2, 1)]
    x = torch.from_numpy(np.random.RandomState(2).randint(0, 3, (3, 2, 2, 2)).astype(np.float32))
    (y,) = layer(x)
    assert tuple(y.shape) == (3, rows, 2, 1)
    for n in range(3):
        idx, vals = numpy_argmax(x[n].numpy().ravel(), 2)
        np.testing.assert_array_equal(y[n, 0, :, 0].numpy(), idx)
        if out_max_val:
            np.testing.assert_array_equal(y[n, 1, :, 0].numpy(), vals)
    flat = build('name: "am" type: "ArgMax" bottom: "a" top: "b"', [(3, 5)])
    assert flat.top_shapes == [(3, 1, 1)]


def test_argmax_errors():
    with pytest.raises(LayerError, match=r"'am' \(type ArgMax\).*top_k 5 must be in 1..4.*\(2, 4\)"):
        build('name: "am" type: "ArgMax" bottom: "a" top: "b" argmax_param { axis: 1 top_k: 5 }', [(2, 4)])
    with pytest.raises(LayerError, match="axis 2 is out of range"):
        build('name: "am" type: "ArgMax" bottom: "a" top: "b" argmax_param { axis: 2 }', [(2, 4)])
