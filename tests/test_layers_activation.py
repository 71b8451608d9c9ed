"""ReLU, Dropout, Softmax, BatchNorm, Scale, Bias: numpy references written from the spec, float64
gradchecks, and Caffe's golden outputs (softmax, bn_global_true, bn_global_true_inplace)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from google.protobuf import text_format

from rloss.errors import LayerError
from rloss.layers import layer_class
from rloss.proto import caffe_pb2
from tests.helpers import layer_from_text, relative_error
from tests.shared_data import shared_path

TRAIN, TEST = caffe_pb2.TRAIN, caffe_pb2.TEST


build = layer_from_text
rel_err = relative_error


def randn(*shape, seed=0, dtype=torch.float32):
    return torch.from_numpy(np.random.RandomState(seed).randn(*shape)).to(dtype)


# ---- ReLU ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("slope", [0.0, 0.1])
def test_relu_forward_and_gradient_at_zero(slope):
    layer = build(
        f'name: "r" type: "ReLU" bottom: "a" top: "b" relu_param {{ negative_slope: {slope} }}',
        [(2, 3, 4, 5)],
    )
    x = randn(2, 3, 4, 5)
    x[0, 0, 0, :3] = 0.0
    x.requires_grad_(True)
    (y,) = layer(x)
    xn = x.detach().numpy()
    np.testing.assert_array_equal(
        y.detach().numpy(), np.maximum(xn, 0) + np.float32(slope) * np.minimum(xn, 0)
    )
    dy = randn(2, 3, 4, 5, seed=1)
    y.backward(dy)
    expected = dy.numpy() * np.where(xn > 0, 1.0, slope)
    np.testing.assert_allclose(x.grad.numpy(), expected, rtol=1e-6)
    assert np.all(x.grad.numpy()[0, 0, 0, :3] == (dy.numpy()[0, 0, 0, :3] * np.float32(slope)))


def test_relu_in_place_tests_the_output_like_caffe():
    """In place, Caffe's backward reads the bottom blob = the output: with a negative slope, a
    negative input gives a positive output and so gradient 1 (not the slope)."""
    text = 'name: "r" type: "ReLU" bottom: "a" top: "{top}" relu_param {{ negative_slope: -0.5 }}'
    x = torch.tensor([-2.0, -0.0, 0.0, 3.0], requires_grad=True)
    dy = torch.tensor([1.0, 2.0, 3.0, 4.0])
    grads = {}
    for top in ("a", "b"):
        (y,) = build(text.format(top=top), [(4,)])(x)
        (grads[top],) = torch.autograd.grad(y, x, dy)
    np.testing.assert_array_equal(grads["b"].numpy(), [-0.5, -1.0, -1.5, 4.0])
    np.testing.assert_array_equal(grads["a"].numpy(), [1.0, -1.0, -1.5, 4.0])


def test_relu_gradcheck():
    layer = build('name: "r" type: "ReLU" bottom: "a" top: "b" relu_param { negative_slope: 0.2 }', [(3, 4)])
    x = randn(3, 4, dtype=torch.float64).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda t: layer(t)[0], (x,))


# ---- Dropout ------------------------------------------------------------------------------------
def test_dropout_train_mask_scale_and_gradient():
    layer = build(
        'name: "d" type: "Dropout" bottom: "a" top: "b" dropout_param { dropout_ratio: 0.3 }',
        [(4, 8, 16, 16)],
        TRAIN,
    )
    x = (randn(4, 8, 16, 16).abs() + 0.5).requires_grad_(True)
    torch.manual_seed(3)
    (y,) = layer(x)
    kept = y.detach().numpy() != 0
    scale = np.float32(1 / (1 - np.float32(0.3)))
    np.testing.assert_allclose(y.detach().numpy()[kept], x.detach().numpy()[kept] * scale, rtol=1e-6)
    assert abs(kept.mean() - 0.7) < 0.02
    dy = randn(4, 8, 16, 16, seed=2)
    (dx,) = torch.autograd.grad(y, x, dy)
    np.testing.assert_allclose(dx.numpy(), dy.numpy() * kept * scale, rtol=1e-6)
    torch.manual_seed(3)
    np.testing.assert_array_equal(layer(x)[0].detach().numpy(), y.detach().numpy())


def test_dropout_test_phase_is_identity():
    layer = build('name: "d" type: "Dropout" bottom: "a" top: "b"', [(2, 3)], TEST)
    x = randn(2, 3).requires_grad_(True)
    (y,) = layer(x)
    assert y is not x
    np.testing.assert_array_equal(y.detach().numpy(), x.detach().numpy())
    (dx,) = torch.autograd.grad(y, x, torch.ones(2, 3))
    np.testing.assert_array_equal(dx.numpy(), np.ones((2, 3)))


def test_dropout_layer_phase_overrides_net_phase():
    layer = build('name: "d" type: "Dropout" bottom: "a" top: "b" phase: TEST', [(2, 3)], TRAIN)
    x = randn(2, 3)
    np.testing.assert_array_equal(layer(x)[0].numpy(), x.numpy())


def test_dropout_rejects_ratio_one():
    with pytest.raises(LayerError, match="dropout_ratio"):
        build('name: "d" type: "Dropout" bottom: "a" top: "b" dropout_param { dropout_ratio: 1 }', [(2, 3)])


# ---- Softmax ------------------------------------------------------------------------------------
def numpy_softmax(x: np.ndarray, axis: int) -> np.ndarray:
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


@pytest.mark.parametrize("axis", [1, 2, -1])
def test_softmax_forward_backward(axis):
    layer = build(
        f'name: "s" type: "Softmax" bottom: "a" top: "b" softmax_param {{ axis: {axis} }}', [(2, 5, 3, 4)]
    )
    x = randn(2, 5, 3, 4).requires_grad_(True)
    (y,) = layer(x)
    expected = numpy_softmax(x.detach().numpy().astype(np.float64), axis)
    assert rel_err(y.detach().numpy(), expected) < 1e-6
    dy = randn(2, 5, 3, 4, seed=4).numpy()
    (dx,) = torch.autograd.grad(y, x, torch.from_numpy(dy))
    expected_dx = (dy - (dy * expected).sum(axis=axis, keepdims=True)) * expected
    assert rel_err(dx.numpy(), expected_dx) < 1e-5


def test_softmax_gradcheck_and_axis_error():
    layer = build('name: "s" type: "Softmax" bottom: "a" top: "b"', [(2, 3, 2)])
    x = randn(2, 3, 2, dtype=torch.float64).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda t: layer(t)[0], (x,))
    with pytest.raises(LayerError, match=r"'s' \(type Softmax\).*axis 3.*\(2, 3, 2\)"):
        build('name: "s" type: "Softmax" bottom: "a" top: "b" softmax_param { axis: 3 }', [(2, 3, 2)])


# ---- golden helpers -----------------------------------------------------------------------------
def golden_layers(case: str):
    folder = shared_path("golden", "01_layers", case)
    net = text_format.Parse((folder / "net.prototxt").read_text(), caffe_pb2.NetParameter())
    shapes = {name: tuple(s.dim) for name, s in zip(net.input, net.input_shape)}
    return folder, net, shapes


def load_params(layer, folder, name):
    for i, blob in enumerate(layer.blobs):
        blob.data.copy_(torch.from_numpy(np.load(folder / f"param_{name}_{i}.npy")))


def test_softmax_golden():
    folder, net, shapes = golden_layers("softmax")
    layer = layer_class("Softmax")(net.layer[0], [shapes["x"]], TRAIN)
    x = torch.from_numpy(np.load(folder / "in_x.npy")).requires_grad_(True)
    (y,) = layer(x)
    assert rel_err(y.detach().numpy(), np.load(folder / "out_prob.npy")) <= 1e-4
    y.backward(torch.from_numpy(np.load(folder / "topdiff_prob.npy")))
    assert rel_err(x.grad.numpy(), np.load(folder / "diff_x.npy")) <= 1e-4


# ---- BatchNorm ----------------------------------------------------------------------------------
BN = 'name: "bn" type: "BatchNorm" bottom: "x" top: "y" {extra}'


def bn_with_blobs(extra: str, shape, mean, var, factor, phase=TRAIN):
    layer = build(BN.format(extra=extra), [shape], phase)
    for blob, values in zip(layer.blobs, (mean, var, [factor])):
        blob.data.copy_(torch.tensor(values, dtype=torch.float32))
    return layer


def test_batchnorm_blobs_created_zero():
    layer = build(BN.format(extra=""), [(2, 3, 4, 4)])
    assert [tuple(b.shape) for b in layer.blobs] == [(3,), (3,), (1,)]
    assert all(not b.detach().any() for b in layer.blobs)


def test_batchnorm_global_stats_divides_by_scale_factor():
    mean_sum, var_sum, s = np.array([1.0, -2.0, 0.5]), np.array([2.0, 0.5, 4.0]), 2.5
    layer = bn_with_blobs("batch_norm_param { use_global_stats: true }", (2, 3, 4, 5), mean_sum, var_sum, s)
    x = randn(2, 3, 4, 5).requires_grad_(True)
    (y,) = layer(x)
    mu, var = (mean_sum / s)[None, :, None, None], (var_sum / s)[None, :, None, None]
    expected = (x.detach().numpy() - mu) / np.sqrt(var + 1e-5)
    assert rel_err(y.detach().numpy(), expected) < 1e-6
    dy = randn(2, 3, 4, 5, seed=5).numpy()
    y.backward(torch.from_numpy(dy))
    assert rel_err(x.grad.numpy(), dy / np.sqrt(var + 1e-5)) < 1e-6
    assert all(b.grad is None for b in layer.blobs)


def test_batchnorm_zero_scale_factor_means_zero_statistics():
    layer = bn_with_blobs(
        "batch_norm_param { use_global_stats: true eps: 0.01 }",
        (2, 3, 2, 2),
        [5.0, 5.0, 5.0],
        [9.0, 9.0, 9.0],
        0.0,
    )
    x = randn(2, 3, 2, 2)
    assert rel_err(layer(x)[0].numpy(), x.numpy() / np.sqrt(np.float32(0.01))) < 1e-6


def test_batchnorm_unset_global_stats_follows_phase():
    args = ((2, 3, 2, 2), [1.0, 2.0, 3.0], [4.0, 4.0, 4.0], 1.0)
    x = randn(2, 3, 2, 2)
    y_test = bn_with_blobs("", *args, phase=TEST)(x)[0].numpy()
    expected_test = (x.numpy() - np.array([1.0, 2.0, 3.0])[None, :, None, None]) / np.sqrt(4 + 1e-5)
    assert rel_err(y_test, expected_test) < 1e-6
    y_train = bn_with_blobs("", *args, phase=TRAIN)(x)[0].numpy()
    assert np.allclose(y_train.mean(axis=(0, 2, 3)), 0, atol=1e-6)


def test_batchnorm_batch_mode_is_textbook():
    layer = build(BN.format(extra="batch_norm_param { use_global_stats: false }"), [(3, 2, 4, 3)], TEST)
    x = randn(3, 2, 4, 3, seed=7).double().numpy() * 3 + 1
    mean = x.mean(axis=(0, 2, 3), keepdims=True)
    var = ((x - mean) ** 2).mean(axis=(0, 2, 3), keepdims=True)
    y = layer(torch.from_numpy(x).float())[0].numpy()
    assert rel_err(y, (x - mean) / np.sqrt(var + 1e-5)) < 1e-5
    assert all(not b.detach().any() for b in layer.blobs)
    x64 = torch.from_numpy(x[:2, :, :2, :2].copy()).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda t: layer(t)[0], (x64,))


def test_batchnorm_global_stats_gradcheck():
    layer = bn_with_blobs(
        "batch_norm_param { use_global_stats: true }", (2, 3, 2, 2), [1.0, 2.0, 3.0], [2.0, 3.0, 4.0], 2.0
    )
    layer.double()
    x = randn(2, 3, 2, 2, dtype=torch.float64).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda t: layer(t)[0], (x,))


def test_batchnorm_update_global_stats_in_train():
    """The fork's update: s = f s + 1, blob0 = stored mean + f blob0, blob1 = m/(m-1) E[(x - stored
    mean)^2] + f blob1; the output divides by that batch deviation."""
    mean_sum, var_sum, s, f = np.array([1.0, -1.0]), np.array([3.0, 2.0]), 2.0, 0.9
    extra = (
        "batch_norm_param { use_global_stats: true update_global_stats: true "
        f"moving_average_fraction: {f} }}"
    )
    layer = bn_with_blobs(extra, (2, 2, 3, 3), mean_sum, var_sum, s)
    x = randn(2, 2, 3, 3, seed=8).requires_grad_(True)
    (y,) = layer(x)
    mu = mean_sum / s
    centred = x.detach().numpy().astype(np.float64) - mu[None, :, None, None]
    deviation = (centred**2).mean(axis=(0, 2, 3))
    m = 18
    np.testing.assert_allclose(layer.blobs[2].detach().numpy(), [f * s + 1], rtol=1e-6)
    np.testing.assert_allclose(layer.blobs[0].detach().numpy(), mu + f * mean_sum, rtol=1e-6)
    np.testing.assert_allclose(
        layer.blobs[1].detach().numpy(), m / (m - 1) * deviation + f * var_sum, rtol=1e-5
    )
    denominator = np.sqrt(deviation + 1e-5)[None, :, None, None]
    assert rel_err(y.detach().numpy(), centred / denominator) < 1e-5
    (dx,) = torch.autograd.grad(y, x, torch.ones_like(x))
    assert rel_err(dx.numpy(), np.ones_like(centred) / denominator) < 1e-5
    frozen = bn_with_blobs(extra, (2, 2, 3, 3), mean_sum, var_sum, s, phase=TEST)
    frozen(x)
    np.testing.assert_array_equal(frozen.blobs[2].detach().numpy(), [s])


def test_batchnorm_channel_mismatch_and_stored_blob_shape():
    layer = build(BN.format(extra=""), [(2, 3, 4, 4)])
    with pytest.raises(LayerError, match=r"'bn' \(type BatchNorm\).*\(2, 5, 4, 4\)"):
        layer.reshape([(2, 5, 4, 4)])
    with pytest.raises(LayerError, match="BatchNorm"):
        build(BN.format(extra=""), [(6,)])


@pytest.mark.parametrize("case, top", [("bn_global_true", "sc"), ("bn_global_true_inplace", "x")])
def test_batchnorm_scale_golden(case, top):
    folder, net, shapes = golden_layers(case)
    bn = layer_class("BatchNorm")(net.layer[0], [shapes["x"]], TRAIN)
    scale = layer_class("Scale")(net.layer[1], [shapes["x"]], TRAIN)
    load_params(bn, folder, "bn")
    load_params(scale, folder, "scale")
    for blob in scale.blobs:
        blob.requires_grad_(True)
    x = torch.from_numpy(np.load(folder / "in_x.npy")).requires_grad_(True)
    (normalised,) = bn(x)
    (y,) = scale(normalised)
    if case == "bn_global_true":
        assert rel_err(normalised.detach().numpy(), np.load(folder / "out_bn.npy")) <= 1e-4
    assert rel_err(y.detach().numpy(), np.load(folder / f"out_{top}.npy")) <= 1e-4
    for i, blob in enumerate(bn.blobs):
        np.testing.assert_array_equal(blob.detach().numpy(), np.load(folder / f"params_after_fwd_bn_{i}.npy"))
        assert not np.any(np.load(folder / f"pdiff_bn_{i}.npy"))
    y.backward(torch.from_numpy(np.load(folder / f"topdiff_{top}.npy")))
    assert rel_err(x.grad.numpy(), np.load(folder / "diff_x.npy")) <= 1e-4
    for i, blob in enumerate(scale.blobs):
        assert rel_err(blob.grad.numpy(), np.load(folder / f"pdiff_scale_{i}.npy")) <= 1e-4
    assert all(blob.grad is None for blob in bn.blobs)


# ---- Scale / Bias -------------------------------------------------------------------------------
def test_scale_default_fillers_and_blob_shapes():
    layer = build(
        'name: "sc" type: "Scale" bottom: "a" top: "b" scale_param { bias_term: true }', [(2, 3, 4, 5)]
    )
    assert [tuple(b.shape) for b in layer.blobs] == [(3,), (3,)]
    np.testing.assert_array_equal(layer.blobs[0].detach().numpy(), np.ones(3))
    np.testing.assert_array_equal(layer.blobs[1].detach().numpy(), np.zeros(3))
    layer = build(
        'name: "sc" type: "Scale" bottom: "a" top: "b" '
        'scale_param { axis: 2 num_axes: -1 filler { type: "constant" value: 3 } }',
        [(2, 3, 4, 5)],
    )
    assert [tuple(b.shape) for b in layer.blobs] == [(4, 5)]
    np.testing.assert_array_equal(layer.blobs[0].detach().numpy(), np.full((4, 5), 3.0))


@pytest.mark.parametrize(
    "params, param_shape, view",
    [
        ("bias_term: true", (3,), (1, 3, 1, 1)),
        ("axis: 1 num_axes: 2 bias_term: true", (3, 4), (1, 3, 4, 1)),
        ("axis: -1 bias_term: true", (5,), (1, 1, 1, 5)),
        ("num_axes: 0 bias_term: true", (), (1, 1, 1, 1)),
        ("axis: 0 num_axes: -1", (2, 3, 4, 5), (2, 3, 4, 5)),
    ],
)
def test_scale_learned_forward_and_gradients(params, param_shape, view):
    layer = build(f'name: "sc" type: "Scale" bottom: "a" top: "b" scale_param {{ {params} }}', [(2, 3, 4, 5)])
    assert tuple(layer.blobs[0].shape) == param_shape
    gamma = randn(*param_shape, seed=11) if param_shape else torch.tensor(1.7)
    layer.blobs[0].data.copy_(gamma)
    has_bias = len(layer.blobs) == 2
    if has_bias:
        layer.blobs[1].data.copy_(randn(*param_shape, seed=12) if param_shape else torch.tensor(-0.3))
    x = randn(2, 3, 4, 5).requires_grad_(True)
    (y,) = layer(x)
    g = gamma.numpy().reshape(view)
    b = layer.blobs[1].detach().numpy().reshape(view) if has_bias else 0.0
    xn = x.detach().numpy()
    assert rel_err(y.detach().numpy(), xn * g + b) < 1e-6
    dy = randn(2, 3, 4, 5, seed=13).numpy()
    y.backward(torch.from_numpy(dy))
    reduce = tuple(i for i, n in enumerate(view) if n == 1)
    assert rel_err(x.grad.numpy(), dy * g) < 1e-6
    assert rel_err(layer.blobs[0].grad.numpy(), (dy * xn).sum(axis=reduce).reshape(param_shape)) < 1e-5
    if has_bias:
        assert rel_err(layer.blobs[1].grad.numpy(), dy.sum(axis=reduce).reshape(param_shape)) < 1e-5


def test_scale_two_bottoms_gradcheck():
    layer = build(
        'name: "sc" type: "Scale" bottom: "a" bottom: "s" top: "b" scale_param { axis: 1 bias_term: true }',
        [(2, 3, 4), (3, 4)],
    )
    assert [tuple(b.shape) for b in layer.blobs] == [(3, 4)]
    layer.double()
    layer.blobs[0].data.normal_()
    x = randn(2, 3, 4, dtype=torch.float64).requires_grad_(True)
    s = randn(3, 4, seed=1, dtype=torch.float64).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda a, b: layer(a, b)[0], (x, s))
    beta = layer.blobs[0].detach().clone().requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda b: torch.func.functional_call(layer, {"blobs.0": b}, (x.detach(), s.detach()))[0], (beta,)
    )


def test_scale_shape_errors():
    with pytest.raises(LayerError, match=r"'sc' \(type Scale\).*\(4,\).*\(2, 3, 4, 5\)"):
        build('name: "sc" type: "Scale" bottom: "a" bottom: "s" top: "b"', [(2, 3, 4, 5), (4,)])
    with pytest.raises(LayerError, match=r"num_axes 4.*\(2, 3, 4, 5\)"):
        build('name: "sc" type: "Scale" bottom: "a" top: "b" scale_param { num_axes: 4 }', [(2, 3, 4, 5)])
    with pytest.raises(LayerError, match=r"axis 4 is out of range"):
        build('name: "sc" type: "Scale" bottom: "a" top: "b" scale_param { axis: 4 }', [(2, 3, 4, 5)])


def test_scale_stored_blob_shape_mismatch():
    param = text_format.Parse('name: "sc" type: "Scale" bottom: "a" top: "b"', caffe_pb2.LayerParameter())
    param.blobs.add().shape.dim.append(4)
    with pytest.raises(LayerError, match=r"'sc' \(type Scale\).*\(4,\).*\(3,\)"):
        layer_class("Scale")(param, [(2, 3, 4, 5)], TRAIN)


def test_bias_learned_and_two_bottoms():
    layer = build(
        'name: "bi" type: "Bias" bottom: "a" top: "b" bias_param { axis: 1 num_axes: 2 }', [(2, 3, 4)]
    )
    assert tuple(layer.blobs[0].shape) == (3, 4) and not layer.blobs[0].detach().any()
    layer.double()
    layer.blobs[0].data.normal_()
    x = randn(2, 3, 4, dtype=torch.float64).requires_grad_(True)
    (y,) = layer(x)
    assert rel_err(y.detach().numpy(), x.detach().numpy() + layer.blobs[0].detach().numpy()[None]) < 1e-12
    y.backward(torch.ones_like(y))
    np.testing.assert_array_equal(layer.blobs[0].grad.numpy(), np.full((3, 4), 2.0))
    two = build('name: "bi" type: "Bias" bottom: "a" bottom: "c" top: "b"', [(2, 3, 4), (3,)])
    assert len(two.blobs) == 0
    c = randn(3, seed=3, dtype=torch.float64).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda a, b: two(a, b)[0], (x, c))
    with pytest.raises(LayerError, match=r"'bi' \(type Bias\).*\(4,\).*\(2, 3, 4\)"):
        build('name: "bi" type: "Bias" bottom: "a" bottom: "c" top: "b"', [(2, 3, 4), (4,)])
