"""Caffe's element-wise neuron layers: numpy references written from Caffe's formulas, float64
gradchecks, Caffe's gradients at the ties (bounds, 0), the in-place readings, and the CHECK errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from google.protobuf import text_format

from rloss import caffe
from rloss.errors import LayerError, NetError
from rloss.net import Net
from rloss.proto import caffe_pb2
from tests.helpers import layer_from_text, relative_error

SHAPE = (2, 3, 4, 5)


def build(kind: str, extra: str = "", shape=SHAPE, top: str = "y"):
    return layer_from_text(f'name: "n" type: "{kind}" bottom: "x" top: "{top}" {extra}', [shape])


def randn(*shape, seed=0, dtype=torch.float32) -> torch.Tensor:
    return torch.from_numpy(np.random.RandomState(seed).randn(*shape)).to(dtype)


def forward_and_grad(layer, x: torch.Tensor, dy: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    x = x.clone().requires_grad_(True)
    (y,) = layer(x)
    (dx,) = torch.autograd.grad(y, x, dy)
    return y.detach().numpy(), dx.numpy()


def sigmoid(z):
    return np.exp(-np.logaddexp(0.0, -np.asarray(z, dtype=np.float64)))


# ---- forward against numpy ----------------------------------------------------------------------
FORWARD = {
    "Sigmoid": ("", lambda x: sigmoid(x)),
    "TanH": ("", np.tanh),
    "AbsVal": ("", np.abs),
    "Exp e": ("", np.exp),
    "Exp base 2": ("exp_param { base: 2 scale: 0.5 shift: -1 }", lambda x: 2.0 ** (-1 + 0.5 * x)),
    "Exp e shifted": ("exp_param { scale: -1.5 shift: 0.25 }", lambda x: np.exp(0.25 - 1.5 * x)),
    "Log e": ("log_param { shift: 12 }", lambda x: np.log(12 + x)),
    "Log base 10": ("log_param { base: 10 scale: 2 shift: 25 }", lambda x: np.log10(25 + 2 * x)),
    "BNLL": ("", lambda x: np.log1p(np.exp(x))),
    "Threshold": ("threshold_param { threshold: 0.3 }", lambda x: (x > 0.3).astype(np.float64)),
    "Clip": ("clip_param { min: -0.5 max: 0.75 }", lambda x: np.minimum(np.maximum(x, -0.5), 0.75)),
    "Swish": ("swish_param { beta: 1.5 }", lambda x: x * sigmoid(1.5 * x)),
    "ELU": ("elu_param { alpha: 0.7 }", lambda x: np.where(x > 0, x, 0.7 * (np.exp(x) - 1))),
    "Power": ("power_param { power: 3 scale: -0.5 shift: 2 }", lambda x: (2 - 0.5 * x) ** 3),
    "Power sqrt": ("power_param { power: 0.5 scale: 0.25 shift: 4 }", lambda x: np.sqrt(4 + 0.25 * x)),
}


@pytest.mark.parametrize("case", sorted(FORWARD))
def test_forward_matches_numpy(case):
    extra, reference = FORWARD[case]
    layer = build(case.split()[0], extra)
    assert layer.top_shapes == [SHAPE]
    x = randn(*SHAPE) * 3
    (y,) = layer(x)
    assert y.shape == SHAPE and y.dtype == torch.float32
    assert relative_error(y, reference(x.numpy().astype(np.float64))) < 2e-6


# ---- backward: float64 gradchecks away from the kinks -------------------------------------------
GRADCHECK = {
    "Sigmoid": "",
    "TanH": "",
    "AbsVal": "",
    "Exp": "exp_param { base: 3 scale: 0.5 shift: 0.5 }",
    "Log": "log_param { base: 2 scale: 0.5 shift: 4 }",
    "BNLL": "",
    "Clip": "clip_param { min: -0.4 max: 0.6 }",
    "Swish": "swish_param { beta: 0.8 }",
    "ELU": "elu_param { alpha: 1.3 }",
    "PReLU": "",
    "Power": "power_param { power: 2.5 scale: 0.5 shift: 3 }",
    "Power square": "power_param { power: 2 scale: -1.5 shift: 0.5 }",
    "Power unshifted": "power_param { power: -1.5 scale: 2 }",
    "Power linear": "power_param { power: 1 scale: 3 shift: 1 }",
}


@pytest.mark.parametrize("case", sorted(GRADCHECK))
def test_gradcheck(case):
    layer = build(case.split()[0], GRADCHECK[case], shape=(2, 3, 3)).double()
    x = randn(2, 3, 3, seed=1, dtype=torch.float64)
    x = torch.where(x.abs() < 0.1, x + 0.3, x)  # keep off the kinks at 0
    if case == "Power unshifted":
        x = x.abs() + 0.5  # a negative base has no real fractional power
    for bound in (-0.4, 0.6):  # and off Clip's bounds
        x = torch.where((x - bound).abs() < 0.05, x + 0.1, x)
    x.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda t: layer(t)[0], (x,))


def test_bnll_gradient_is_the_logistic_and_stays_finite():
    layer = build("BNLL")
    x = torch.tensor([-1000.0, -30.0, -1.0, 0.0, 2.0, 49.0, 60.0, 1000.0])
    y, dx = forward_and_grad(layer, x, torch.ones(8))
    xs = x.numpy().astype(np.float64)
    np.testing.assert_allclose(y, np.maximum(xs, 0) + np.log1p(np.exp(-np.abs(xs))), rtol=1e-6)
    np.testing.assert_allclose(dx, sigmoid(np.minimum(xs, 50)), rtol=1e-6)
    assert dx[-1] == 1.0 and dx[0] == 0.0


def test_bnll_float16_gradient_does_not_overflow():
    """exp(12) is already past float16's range: the backward computes in float32."""
    layer = build("BNLL")
    x = torch.tensor([-5.0, 0.0, 12.0, 40.0], dtype=torch.float16)
    dx = layer.bottom_diff(torch.ones(4, dtype=torch.float16), x, x)
    assert dx.dtype == torch.float16
    np.testing.assert_allclose(dx.numpy().astype(np.float64), sigmoid(x.numpy()), rtol=1e-3)


# ---- Caffe's gradients at ties --------------------------------------------------------------------
def test_clip_gradient_passes_at_the_bounds():
    layer = build("Clip", "clip_param { min: -0.5 max: 0.75 }")
    x = torch.tensor([-1.0, -0.5, -0.49, 0.0, 0.75, 0.76, 2.0])
    dy = torch.arange(1.0, 8.0)
    y, dx = forward_and_grad(layer, x, dy)
    np.testing.assert_array_equal(y, np.float32([-0.5, -0.5, -0.49, 0.0, 0.75, 0.75, 0.75]))
    np.testing.assert_array_equal(dx, [0, 2, 3, 4, 5, 0, 0])


def test_clip_with_min_above_max_gives_min_and_no_gradient():
    """Caffe does not check min <= max: max(min, min(x, max)) is min everywhere."""
    layer = build("Clip", "clip_param { min: 1 max: -1 }")
    y, dx = forward_and_grad(layer, randn(3, 4), torch.ones(3, 4))
    np.testing.assert_array_equal(y, np.ones((3, 4), np.float32))
    np.testing.assert_array_equal(dx, np.zeros((3, 4)))


def test_absval_gradient_is_the_sign_and_zero_at_zero():
    x = torch.tensor([-2.0, -0.0, 0.0, 3.0])
    y, dx = forward_and_grad(build("AbsVal"), x, torch.tensor([1.0, 2.0, 3.0, 4.0]))
    np.testing.assert_array_equal(y, [2, 0, 0, 3])
    np.testing.assert_array_equal(dx, [-1, 0, 0, 4])


def test_elu_gradient_at_zero_is_alpha():
    x = torch.tensor([-1.0, 0.0, 1e-3, 2.0])
    y, dx = forward_and_grad(build("ELU", "elu_param { alpha: 0.5 }"), x, torch.full((4,), 2.0))
    expected_y = np.where(x.numpy() > 0, x.numpy(), 0.5 * (np.exp(x.numpy()) - 1))
    np.testing.assert_allclose(y, expected_y, rtol=1e-6)
    np.testing.assert_allclose(dx, [2 * 0.5 * np.exp(-1.0), 1.0, 2.0, 2.0], rtol=1e-6)


def test_elu_large_input_has_no_nan_gradient():
    _, dx = forward_and_grad(build("ELU"), torch.tensor([100.0, -100.0]), torch.ones(2))
    np.testing.assert_array_equal(dx, [1.0, 0.0])


# ---- Power's special cases ------------------------------------------------------------------------
@pytest.mark.parametrize(
    "params, constant",
    [("power: 0 scale: 2 shift: 1", 1.0), ("power: 3 scale: 0 shift: 2", 8.0), ("power: 2 scale: 0", 0.0)],
)
def test_power_ignores_the_input_when_power_or_scale_is_zero(params, constant):
    """y is the constant 1 or shift^power and the gradient is 0, even for inf / nan inputs or diffs."""
    layer = build("Power", f"power_param {{ {params} }}")
    x = torch.tensor([float("nan"), float("inf"), -2.0, 0.0])
    y, dx = forward_and_grad(layer, x, torch.tensor([float("inf"), 1.0, 2.0, float("nan")]))
    np.testing.assert_array_equal(y, np.full(4, constant, np.float32))
    np.testing.assert_array_equal(dx, np.zeros(4))


def test_power_one_and_two_gradients():
    x = randn(3, 4)
    dy = randn(3, 4, seed=2)
    xs, dys = x.numpy().astype(np.float64), dy.numpy().astype(np.float64)
    _, dx = forward_and_grad(build("Power", "power_param { power: 1 scale: -2 shift: 5 }"), x, dy)
    np.testing.assert_allclose(dx, -2 * dys, rtol=1e-6)
    y, dx = forward_and_grad(build("Power", "power_param { power: 2 scale: 3 shift: -1 }"), x, dy)
    np.testing.assert_allclose(y, (3 * xs - 1) ** 2, rtol=1e-5)
    np.testing.assert_allclose(dx, dys * 2 * 3 * (3 * xs - 1), rtol=1e-5, atol=1e-5)


def test_power_gradient_is_nan_where_the_base_is_zero_as_in_caffe():
    """Caffe divides y by the base (power * y / x for shift 0): 0 / 0 where the base is 0."""
    _, dx = forward_and_grad(build("Power", "power_param { power: 3 }"), torch.tensor([0.0, 2.0]), torch.ones(2))
    assert np.isnan(dx[0]) and dx[1] == pytest.approx(12.0)
    layer = build("Power", "power_param { power: 3 scale: 2 shift: -2 }")
    _, dx = forward_and_grad(layer, torch.tensor([1.0, 2.0]), torch.ones(2))
    assert np.isnan(dx[0]) and dx[1] == pytest.approx(3 * 2 * 2.0**2)


# ---- in place: Caffe's backward reads the top where it reads the bottom ---------------------------
def test_in_place_clip_passes_every_gradient():
    """The bottom blob then holds the clipped values, all inside the bounds."""
    x = torch.tensor([-3.0, -0.5, 0.2, 0.75, 9.0])
    dy = torch.arange(1.0, 6.0)
    _, apart = forward_and_grad(build("Clip", "clip_param { min: -0.5 max: 0.75 }"), x, dy)
    _, in_place = forward_and_grad(build("Clip", "clip_param { min: -0.5 max: 0.75 }", top="x"), x, dy)
    np.testing.assert_array_equal(apart, [0, 2, 3, 4, 0])
    np.testing.assert_array_equal(in_place, dy.numpy())


def test_in_place_log_bnll_power_and_elu_read_the_top():
    x = torch.tensor([0.5, 1.5, 3.0])
    dy = torch.tensor([1.0, -2.0, 0.5])
    dys = dy.numpy().astype(np.float64)

    y, dx = forward_and_grad(build("Log", "log_param { base: 2 shift: 1 }", shape=(3,), top="x"), x, dy)
    np.testing.assert_allclose(dx, dys / (np.log(2) * (y.astype(np.float64) + 1)), rtol=1e-6)

    y, dx = forward_and_grad(build("BNLL", shape=(3,), top="x"), x, dy)
    np.testing.assert_allclose(dx, dys * sigmoid(y.astype(np.float64)), rtol=1e-6)

    y, dx = forward_and_grad(build("Power", "power_param { power: 3 scale: 2 shift: 1 }", shape=(3,), top="x"), x, dy)
    ys = y.astype(np.float64)
    np.testing.assert_allclose(dx, dys * 3 * 2 * ys / (2 * ys + 1), rtol=1e-6)

    xn = torch.tensor([-1.0, -0.2, 2.0])
    y, dx = forward_and_grad(build("ELU", "elu_param { alpha: -0.5 }", shape=(3,), top="x"), xn, dy)
    np.testing.assert_allclose(y, [-0.5 * (np.exp(-1) - 1), -0.5 * (np.exp(-0.2) - 1), 2.0], rtol=1e-6)
    np.testing.assert_array_equal(dx, dy.numpy())  # y > 0 everywhere, so Caffe's test says "x > 0"


@pytest.mark.parametrize("kind, extra", [("Sigmoid", ""), ("TanH", ""), ("Exp", "exp_param { base: 2 }"),
                                         ("Swish", "")])
def test_top_reading_layers_are_unchanged_in_place(kind, extra):
    x, dy = randn(2, 3), randn(2, 3, seed=5)
    _, apart = forward_and_grad(build(kind, extra, shape=(2, 3)), x, dy)
    _, in_place = forward_and_grad(build(kind, extra, shape=(2, 3), top="x"), x, dy)
    np.testing.assert_array_equal(apart, in_place)


# ---- Threshold --------------------------------------------------------------------------------------
def test_threshold_has_no_gradient():
    layer = build("Threshold", "threshold_param { threshold: 0.5 }")
    x = torch.tensor([0.4, 0.5, 0.6]).requires_grad_(True)
    (y,) = layer(x)
    np.testing.assert_array_equal(y.numpy(), [0, 0, 1])
    assert not y.requires_grad and layer.no_gradient_bottoms == (0,)
    with pytest.raises(LayerError, match="propagate_down: false"):
        build("Threshold", "propagate_down: true")
    build("Threshold", "propagate_down: false")


# ---- PReLU ------------------------------------------------------------------------------------------
def prelu_reference(x: np.ndarray, slope: np.ndarray, dy: np.ndarray):
    """y, dx and the slope gradient per channel (axis 1), written from Caffe's loops."""
    s = slope.reshape((1, -1) + (1,) * (x.ndim - 2)) if slope.ndim else slope
    y = np.maximum(x, 0) + s * np.minimum(x, 0)
    dx = dy * np.where(x > 0, 1.0, s)
    per_element = dy * x * (x <= 0)
    axes = tuple(i for i in range(x.ndim) if i != 1 or not slope.ndim)
    return y, dx, per_element.sum(axis=axes)


@pytest.mark.parametrize("shared", [False, True])
def test_prelu_forward_and_both_gradients(shared):
    layer = build("PReLU", f"prelu_param {{ channel_shared: {str(shared).lower()} }}")
    assert tuple(layer.blobs[0].shape) == (() if shared else (3,))
    np.testing.assert_array_equal(layer.blobs[0].detach().numpy(), np.full(layer.blobs[0].shape, 0.25, np.float32))
    with torch.no_grad():
        layer.blobs[0].copy_(torch.tensor(0.3) if shared else torch.tensor([0.1, -0.7, 2.0]))
    x = randn(*SHAPE)
    x[0, :, 0, :2] = 0.0
    x.requires_grad_(True)
    dy = randn(*SHAPE, seed=3)
    (y,) = layer(x)
    dx, dslope = torch.autograd.grad(y, [x, layer.blobs[0]], dy)
    ry, rdx, rslope = prelu_reference(x.detach().numpy().astype(np.float64), layer.blobs[0].detach().numpy(),
                                      dy.numpy().astype(np.float64))
    assert relative_error(y, ry) < 1e-6 and relative_error(dx, rdx) < 1e-6 and relative_error(dslope, rslope) < 1e-5
    slope = layer.blobs[0].detach().numpy()
    at_zero = dy[0, :, 0, :2].numpy() * (slope if shared else slope[:, None])
    np.testing.assert_allclose(dx[0, :, 0, :2].numpy(), at_zero, rtol=1e-6)  # the slope, not 1 + slope


def test_prelu_filler_and_in_place_gradient():
    layer = build("PReLU", 'prelu_param { filler { type: "constant" value: -0.5 } }', shape=(2, 4), top="x")
    np.testing.assert_array_equal(layer.blobs[0].detach().numpy(), np.full(4, -0.5, np.float32))
    x, dy = randn(2, 4), randn(2, 4, seed=7)
    y, dx = forward_and_grad(layer, x, dy)
    ry, rdx, _ = prelu_reference(x.numpy().astype(np.float64), np.full(4, -0.5), dy.numpy().astype(np.float64))
    assert relative_error(y, ry) < 1e-6 and relative_error(dx, rdx) < 1e-6


@pytest.mark.parametrize("shape", [(6,), (1, 2, 3, 4, 5)])
def test_prelu_needs_two_to_four_axes(shape):
    for shared in ("false", "true"):
        with pytest.raises(LayerError, match="2 to 4 axes"):
            build("PReLU", f"prelu_param {{ channel_shared: {shared} }}", shape=shape)


def test_prelu_stored_slopes_must_match_the_channels():
    param = text_format.Parse('name: "p" type: "PReLU" bottom: "x" top: "y"', caffe_pb2.LayerParameter())
    param.blobs.add().shape.dim.extend([5])
    param.blobs[0].data.extend([0.1] * 5)
    with pytest.raises(LayerError, match="stored blob 0"):
        layer_from_text(text_format.MessageToString(param), [SHAPE])


# ---- parameter errors -------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kind, extra, message",
    [
        ("Exp", "exp_param { base: 0 }", "exp_param.base must be -1"),
        ("Exp", "exp_param { base: -2 }", "exp_param.base must be -1"),
        ("Exp", "exp_param { base: inf }", "exp_param.base must be -1"),
        ("Log", "log_param { base: -0.5 }", "log_param.base must be -1"),
        ("Log", "log_param { base: 1 }", "1 / log"),
        ("Clip", "", "both min and max"),
        ("Clip", "clip_param { min: 0 }", "both min and max"),
        ("AbsVal", "", "in-place"),
    ],
)
def test_parameter_errors(kind, extra, message):
    with pytest.raises(LayerError, match=message) as info:
        build(kind, extra, top="x" if kind == "AbsVal" else "y")
    assert "'n'" in str(info.value)


def test_exp_base_one_is_the_constant_base_to_the_shift():
    (y,) = build("Exp", "exp_param { base: 1 scale: 3 shift: 2 }")(randn(*SHAPE))
    np.testing.assert_array_equal(y.numpy(), np.ones(SHAPE, np.float32))


def test_two_bottoms_are_refused():
    with pytest.raises(LayerError, match="needs 1 bottoms"):
        layer_from_text('name: "n" type: "TanH" bottom: "a" bottom: "b" top: "c"', [SHAPE, SHAPE])


# ---- in a net ---------------------------------------------------------------------------------------
NET = '''name: "neurons" force_backward: true input: "x" input_shape { dim: 2 dim: 3 dim: 4 dim: 4 }
layer { name: "pow" type: "Power" bottom: "x" top: "a" power_param { scale: 2 shift: -0.5 } }
layer { name: "prelu" type: "PReLU" bottom: "a" top: "a" prelu_param { filler { type: "uniform" min: 0 max: 1 } } }
layer { name: "clip" type: "Clip" bottom: "a" top: "a" clip_param { min: -0.4 max: 0.9 } }
layer { name: "sig" type: "Sigmoid" bottom: "a" top: "s" }
'''


def test_net_with_in_place_neurons():
    net = caffe.Net._wrap(Net(text_format.Parse(NET, caffe_pb2.NetParameter()), caffe_pb2.TRAIN, source="n"))
    x = np.random.RandomState(8).randn(2, 3, 4, 4).astype(np.float32)
    ds = np.random.RandomState(9).randn(2, 3, 4, 4).astype(np.float32)
    slope = net.params["prelu"][0].data.astype(np.float64)
    s = net.forward(x=x)["s"].copy()

    u = 2 * x.astype(np.float64) - 0.5
    clipped = np.clip(prelu_reference(u, slope, np.ones_like(u))[0], -0.4, 0.9)
    np.testing.assert_allclose(s, sigmoid(clipped), rtol=1e-6)
    np.testing.assert_allclose(net.blobs["a"].data, clipped, rtol=1e-6, atol=1e-7)

    net.backward(s=ds)
    ds_a = ds * s.astype(np.float64) * (1 - s)  # the in-place Clip passes all of it (it reads its top)
    _, du, dslope = prelu_reference(u, slope, ds_a)
    assert relative_error(net.blobs["x"].diff, 2 * du) < 1e-5
    assert relative_error(net.params["prelu"][0].diff, dslope) < 1e-5


def test_net_threshold_bottom_gets_no_gradient():
    text = NET.replace('layer { name: "sig" type: "Sigmoid" bottom: "a" top: "s" }',
                       'layer { name: "t" type: "Threshold" bottom: "a" top: "t" } '
                       'layer { name: "e" type: "Eltwise" bottom: "t" bottom: "x" top: "s" }')
    net = caffe.Net._wrap(Net(text_format.Parse(text, caffe_pb2.NetParameter()), caffe_pb2.TRAIN, source="n"))
    net.forward(x=np.ones((2, 3, 4, 4), np.float32))
    net.backward(s=np.ones((2, 3, 4, 4), np.float32))
    assert np.abs(net.params["prelu"][0].diff).max() == 0
    with pytest.raises(NetError, match="propagate_down"):
        Net(text_format.Parse(text.replace('top: "t" }', 'top: "t" propagate_down: true }'),
                              caffe_pb2.NetParameter()), caffe_pb2.TRAIN, source="n")
