"""LRN and MVN: numpy references written from Caffe's formulas (LRN's zero-padded windows, the
WITHIN_CHANNEL divisor that counts the padding, MVN's eps on the std), Caffe's analytic gradients,
float64 gradchecks and the CHECK failures."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from rloss.errors import LayerError
from tests.helpers import layer_from_text, relative_error


def randn(*shape, seed=0, dtype=torch.float32):
    return torch.from_numpy(np.random.RandomState(seed).randn(*shape)).to(dtype)


def lrn(params: str, shape):
    return layer_from_text(f'name: "n" type: "LRN" bottom: "a" top: "b" lrn_param {{ {params} }}', [shape])


def mvn(params: str, shape):
    return layer_from_text(f'name: "m" type: "MVN" bottom: "a" top: "b" mvn_param {{ {params} }}', [shape])


# ---- LRN references -----------------------------------------------------------------------------
def channel_window_sum(v: np.ndarray, size: int) -> np.ndarray:
    """Sum of v over the channels c - pad .. c + pad that exist (the zero-padded window)."""
    pad, channels = (size - 1) // 2, v.shape[1]
    sums = np.zeros(v.shape, dtype=np.float64)
    for c in range(channels):
        sums[:, c] = v[:, max(0, c - pad) : min(channels, c + pad + 1)].sum(axis=1)
    return sums


def across_scale(x: np.ndarray, size: int, alpha: float, k: float) -> np.ndarray:
    return k + alpha / size * channel_window_sum(x**2, size)


def within_scale(x: np.ndarray, size: int, alpha: float) -> np.ndarray:
    """1 + alpha / size^2 * sum of squares over the size x size window of the zero-padded image."""
    pad = (size - 1) // 2
    padded = np.pad(x**2, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    height, width = x.shape[2:]
    sums = np.zeros(x.shape, dtype=np.float64)
    for dh in range(size):
        for dw in range(size):
            sums += padded[:, :, dh : dh + height, dw : dw + width]
    return 1.0 + alpha / size**2 * sums


@pytest.mark.parametrize(
    "size, alpha, beta, k, channels",
    [(5, 1e-4, 0.75, 1.0, 7), (3, 0.7, 0.5, 2.0, 7), (1, 0.3, 1.2, 0.5, 7), (7, 0.9, 0.75, 1.0, 3)],
)
def test_lrn_across_channels_forward(size, alpha, beta, k, channels):
    layer = lrn(f"local_size: {size} alpha: {alpha} beta: {beta} k: {k}", (2, channels, 3, 4))
    x = randn(2, channels, 3, 4)
    (y,) = layer(x)
    xn = x.numpy().astype(np.float64)
    expected = xn * across_scale(xn, size, np.float32(alpha), np.float32(k)) ** -np.float32(beta)
    assert layer.top_shapes == [(2, channels, 3, 4)]
    assert relative_error(y, expected) < 2e-6


def test_lrn_across_channels_gradient_is_caffes_analytic_one():
    """Caffe's backward: dx = dy * s^-beta - 2 alpha beta / n * x * (window sum of dy * y / s)."""
    size, alpha, beta, k = 3, 0.9, 0.75, 1.5
    layer = lrn(f"local_size: {size} alpha: {alpha} beta: {beta} k: {k}", (2, 5, 3, 3))
    x = randn(2, 5, 3, 3).requires_grad_(True)
    dy = randn(2, 5, 3, 3, seed=1)
    (y,) = layer(x)
    y.backward(dy)
    xn, dyn = x.detach().numpy().astype(np.float64), dy.numpy().astype(np.float64)
    scale = across_scale(xn, size, alpha, k)
    yn = xn * scale**-beta
    window_sums = channel_window_sum(dyn * yn / scale, size)
    expected = dyn * scale**-beta - 2 * alpha * beta / size * xn * window_sums
    assert relative_error(x.grad, expected) < 1e-5


@pytest.mark.parametrize("size, height, width", [(3, 5, 6), (5, 2, 3)])
def test_lrn_within_channel_forward(size, height, width):
    layer = lrn(f"local_size: {size} alpha: 0.8 beta: 0.6 norm_region: WITHIN_CHANNEL", (2, 3, height, width))
    x = randn(2, 3, height, width)
    (y,) = layer(x)
    xn = x.numpy().astype(np.float64)
    expected = xn * within_scale(xn, size, np.float32(0.8)) ** -np.float32(0.6)
    assert relative_error(y, expected) < 2e-6


def test_lrn_within_channel_divides_by_the_padded_window_and_ignores_k():
    """A lone value in a corner: its 3x3 window holds 4 image pixels, the divisor is still 9; k
    (the ACROSS_CHANNELS constant) plays no part: Caffe's power layer shifts by 1."""
    x = torch.zeros(1, 1, 4, 4)
    x[0, 0, 0, 0] = 2.0
    alpha, beta = 0.5, 0.75
    expected = 2.0 * (1 + alpha * 4.0 / 9) ** -beta
    not_counting_padding = 2.0 * (1 + alpha * 4.0 / 4) ** -beta
    for k in (1.0, 7.0):
        layer = lrn(f"local_size: 3 alpha: {alpha} beta: {beta} k: {k} norm_region: WITHIN_CHANNEL", (1, 1, 4, 4))
        (y,) = layer(x)
        assert y[0, 0, 0, 0].item() == pytest.approx(expected, rel=1e-6)
        assert y[0, 0, 0, 0].item() != pytest.approx(not_counting_padding, rel=1e-3)
        assert torch.count_nonzero(y).item() == 1


@pytest.mark.parametrize("region", ["ACROSS_CHANNELS", "WITHIN_CHANNEL"])
def test_lrn_gradcheck(region):
    layer = lrn(f"local_size: 3 alpha: 0.9 beta: 0.75 k: 1.3 norm_region: {region}", (2, 4, 3, 3))
    x = randn(2, 4, 3, 3, dtype=torch.float64).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda t: layer(t)[0], (x,))


def test_lrn_errors():
    with pytest.raises(LayerError, match="local_size must be odd, got 4"):
        lrn("local_size: 4", (1, 3, 2, 2))
    with pytest.raises(LayerError, match="must have 4 axes"):
        lrn("local_size: 3", (2, 3, 4))


# ---- MVN references -----------------------------------------------------------------------------
def mvn_reference(x: np.ndarray, normalize_variance: bool, across: bool, eps: float) -> np.ndarray:
    axes = (1, 2, 3) if across else (2, 3)
    centred = x - x.mean(axis=axes, keepdims=True)
    if not normalize_variance:
        return centred
    return centred / (np.sqrt((centred**2).mean(axis=axes, keepdims=True)) + eps)


def caffe_mvn_gradient(x: np.ndarray, dy: np.ndarray, across: bool, eps: float) -> np.ndarray:
    """(dy - (mean(dy) + y * mean(y * dy))) / (std + eps) per normalised group."""
    axes = (1, 2, 3) if across else (2, 3)
    centred = x - x.mean(axis=axes, keepdims=True)
    divisor = np.sqrt((centred**2).mean(axis=axes, keepdims=True)) + eps
    y = centred / divisor
    return (dy - dy.mean(axis=axes, keepdims=True) - y * (y * dy).mean(axis=axes, keepdims=True)) / divisor


@pytest.mark.parametrize("normalize_variance", [True, False])
@pytest.mark.parametrize("across", [True, False])
def test_mvn_forward(normalize_variance, across):
    params = f"normalize_variance: {str(normalize_variance).lower()} across_channels: {str(across).lower()}"
    layer = mvn(params, (2, 3, 4, 5))
    x = randn(2, 3, 4, 5) * 3 + 1
    (y,) = layer(x)
    expected = mvn_reference(x.numpy().astype(np.float64), normalize_variance, across, 1e-9)
    assert relative_error(y, expected) < 1e-5


def test_mvn_adds_eps_to_the_std_not_the_variance():
    x = randn(1, 2, 3, 3)
    (y,) = mvn("eps: 0.5", (1, 2, 3, 3))(x)
    xn = x.numpy().astype(np.float64)
    assert relative_error(y, mvn_reference(xn, True, False, 0.5)) < 1e-6
    centred = xn - xn.mean(axis=(2, 3), keepdims=True)
    on_variance = centred / np.sqrt((centred**2).mean(axis=(2, 3), keepdims=True) + 0.5)
    assert relative_error(y, on_variance) > 1e-2


def test_mvn_top_has_the_legacy_four_axes():
    layer = mvn("", (3, 4))
    assert layer.top_shapes == [(3, 4, 1, 1)]
    x = randn(3, 4)
    (y,) = layer(x)
    assert tuple(y.shape) == (3, 4, 1, 1)
    assert torch.count_nonzero(y).item() == 0  # one value per (item, channel): it is its own mean
    (y,) = mvn("across_channels: true", (3, 4))(x)
    expected = mvn_reference(x.numpy().astype(np.float64).reshape(3, 4, 1, 1), True, True, 1e-9)
    assert relative_error(y, expected) < 1e-5


@pytest.mark.parametrize("across", [True, False])
def test_mvn_gradient_is_caffes(across):
    """With a large eps Caffe's gradient is visibly not the exact one (it uses y / size for the
    derivative of the std); the layer reproduces Caffe's."""
    eps = 0.5
    layer = mvn(f"eps: {eps} across_channels: {str(across).lower()}", (2, 3, 3, 4))
    x = randn(2, 3, 3, 4, dtype=torch.float64).requires_grad_(True)
    dy = randn(2, 3, 3, 4, seed=1, dtype=torch.float64)
    (y,) = layer(x)
    (grad,) = torch.autograd.grad(y, x, dy)
    xn, dyn = x.detach().numpy(), dy.numpy()
    assert relative_error(grad, caffe_mvn_gradient(xn, dyn, across, eps)) < 1e-12
    axes = (1, 2, 3) if across else (2, 3)
    plain = x - x.mean(dim=axes, keepdim=True)
    plain = plain / ((plain**2).mean(dim=axes, keepdim=True).sqrt() + eps)
    (exact,) = torch.autograd.grad(plain, x, dy)
    assert relative_error(grad, exact) > 1e-3


def test_mvn_gradient_of_a_constant_group_is_finite():
    x = torch.full((1, 2, 2, 2), 3.0, requires_grad=True)
    dy = randn(1, 2, 2, 2, seed=2)
    (y,) = mvn("eps: 0.01", (1, 2, 2, 2))(x)
    assert torch.count_nonzero(y).item() == 0
    y.backward(dy)
    dyn = dy.numpy().astype(np.float64)
    expected = (dyn - dyn.mean(axis=(2, 3), keepdims=True)) / 0.01
    assert relative_error(x.grad, expected) < 1e-5


@pytest.mark.parametrize("params", ["", "across_channels: true", "normalize_variance: false"])
def test_mvn_gradcheck(params):
    layer = mvn(params, (2, 3, 2, 3))
    x = randn(2, 3, 2, 3, dtype=torch.float64).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda t: layer(t)[0], (x,))


def test_mvn_refuses_more_than_four_axes():
    with pytest.raises(LayerError, match="at most 4 axes"):
        mvn("", (2, 3, 4, 5, 6))
