"""SPP and Im2col against numpy loops written from Caffe's definitions (SPP's per-level pooling
geometry, im2col's row layout), float64 gradchecks, an explicit col2im, and their errors."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from rloss.errors import LayerError
from tests.helpers import layer_from_text, relative_error


def randn(*shape: int, seed: int = 0) -> np.ndarray:
    return np.random.RandomState(seed).randn(*shape)


def spp(pyramid_height: int, pool: str = "MAX") -> str:
    return f'name: "spp" type: "SPP" bottom: "x" top: "y" spp_param {{ pyramid_height: {pyramid_height} pool: {pool} }}'


def im2col(conv: str) -> str:
    return f'name: "cols" type: "Im2col" bottom: "x" top: "y" convolution_param {{ {conv} }}'


def gradcheck(layer, x: np.ndarray) -> None:
    tensor = torch.tensor(x, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: layer(t)[0], (tensor,), atol=1e-6, rtol=1e-4)


# ---- SPP: a numpy reference of Caffe's pyramid ------------------------------------------------


def caffe_pool_plane(plane: np.ndarray, kernel: tuple[int, int], pad: tuple[int, int], average: bool) -> np.ndarray:
    """Caffe's Pooling of one (H, W) plane with stride = kernel: ceil output size, the last window
    dropped when it starts at or past size + pad (pad > 0), AVE divisor clipped at size + pad."""

    def count(axis: int) -> int:
        n, k, p = plane.shape[axis], kernel[axis], pad[axis]
        out = math.ceil((n + 2 * p - k) / k) + 1
        return out - 1 if p > 0 and (out - 1) * k >= n + p else out

    def window(axis: int, index: int) -> tuple[int, int]:
        start = index * kernel[axis] - pad[axis]
        return start, min(start + kernel[axis], plane.shape[axis] + pad[axis])

    out = np.zeros((count(0), count(1)))
    for i in range(out.shape[0]):
        for j in range(out.shape[1]):
            (h0, h1), (w0, w1) = window(0, i), window(1, j)
            pixels = plane[max(h0, 0) : min(h1, plane.shape[0]), max(w0, 0) : min(w1, plane.shape[1])]
            out[i, j] = pixels.sum() / ((h1 - h0) * (w1 - w0)) if average else pixels.max()
    return out


def ref_spp(x: np.ndarray, pyramid_height: int, average: bool) -> np.ndarray:
    """Level l: 2^l bins per axis, kernel ceil(size / bins), pad (kernel * bins - size + 1) // 2; levels
    flattened per item (channel-major) and concatenated; height 1 keeps the 4-D pooled blob."""
    levels = []
    for level in range(pyramid_height):
        bins = 2**level
        kernel = tuple(math.ceil(size / bins) for size in x.shape[2:])
        pad = tuple((k * bins - size + 1) // 2 for k, size in zip(kernel, x.shape[2:]))
        planes = [[caffe_pool_plane(item[c], kernel, pad, average) for c in range(x.shape[1])] for item in x]
        levels.append(np.array(planes))
    if pyramid_height == 1:
        return levels[0]
    return np.concatenate([p.reshape(x.shape[0], -1) for p in levels], axis=1)


SPP_CASES = [((2, 3, 9, 9), 3), ((1, 2, 7, 7), 3), ((2, 2, 11, 13), 3), ((2, 3, 5, 7), 2), ((1, 2, 9, 7), 3)]


@pytest.mark.parametrize("pool", ["MAX", "AVE"])
@pytest.mark.parametrize(("shape", "height"), SPP_CASES)
def test_spp_matches_the_pooling_loop(pool: str, shape: tuple[int, ...], height: int) -> None:
    x = randn(*shape).astype(np.float32)
    layer = layer_from_text(spp(height, pool), [shape])
    (y,) = layer(torch.from_numpy(x))
    expected = ref_spp(x.astype(np.float64), height, pool == "AVE")
    assert layer.top_shapes == [expected.shape]
    assert relative_error(y, expected) < 1e-6


def test_spp_odd_rectangular_input_pools_each_axis_on_its_own() -> None:
    """9 x 7: level 1 pads the rows by 1 (kernel 5) and the columns by 1 (kernel 4); level 2 has kernel
    3, pad 2 on the rows and kernel 2, pad 1 on the columns; every level still gives 2^l bins."""
    x = randn(2, 2, 9, 7)
    layer = layer_from_text(spp(3, "AVE"), [x.shape])
    (y,) = layer(torch.from_numpy(x))
    assert tuple(y.shape) == (2, 2 * (1 + 4 + 16))
    level2 = y[:, 2 * 5 :].reshape(2, 2, 4, 4).numpy()
    # bin (0, 0) of level 2: rows [-2, 1) and columns [-1, 1): 1 x 1 real pixel over a 3 x 2 window
    np.testing.assert_allclose(level2[:, :, 0, 0], x[:, :, 0, 0] / 6)
    # bin (3, 3): rows [7, 10) clipped at H + pad = 11, columns [5, 7) -> real pixels rows 7-8, cols 5-6
    np.testing.assert_allclose(level2[:, :, 3, 3], x[:, :, 7:9, 5:7].sum(axis=(2, 3)) / 6)
    np.testing.assert_allclose(y[:, :2].numpy(), x.mean(axis=(2, 3)))


def test_spp_height_one_is_a_global_pooling_with_a_4d_top() -> None:
    x = randn(2, 3, 6, 5)
    layer = layer_from_text(spp(1), [x.shape])
    (y,) = layer(torch.from_numpy(x))
    assert layer.top_shapes == [(2, 3, 1, 1)]
    np.testing.assert_array_equal(y.numpy()[:, :, 0, 0], x.max(axis=(2, 3)))


def test_spp_top_shapes_of_caffe_tests() -> None:
    assert layer_from_text(spp(3), [(2, 3, 9, 8)]).top_shapes == [(2, 63)]
    assert layer_from_text(spp(5), [(4, 3, 1024, 765)]).top_shapes == [(4, 3 * 341)]
    assert layer_from_text(spp(3), [(10, 3, 7, 7)]).top_shapes == [(10, 63)]


def test_spp_follows_a_new_bottom_shape() -> None:
    layer = layer_from_text(spp(2, "AVE"), [(1, 1, 6, 6)])
    x = randn(1, 1, 9, 9)
    assert layer.reshape([x.shape]) == [(1, 5)]
    assert relative_error(layer(torch.from_numpy(x))[0], ref_spp(x, 2, True)) < 1e-12


@pytest.mark.parametrize("pool", ["MAX", "AVE"])
def test_spp_gradient(pool: str) -> None:
    x = randn(1, 2, 7, 6)
    gradcheck(layer_from_text(spp(3, pool), [x.shape]).double(), x)


def test_spp_max_gradient_reaches_only_the_maxima() -> None:
    x = torch.zeros(1, 1, 4, 4, dtype=torch.float64)
    x[0, 0, 1, 2] = 5.0  # the maximum of the image and of its level-1 quadrant
    x.requires_grad_(True)
    (y,) = layer_from_text(spp(2), [tuple(x.shape)]).double()(x)
    y[0, 0].backward()  # level 0: the global max
    expected = torch.zeros_like(x)
    expected[0, 0, 1, 2] = 1.0
    assert torch.equal(x.grad, expected)


@pytest.mark.parametrize(
    ("text", "shape", "match"),
    [
        (spp(2, "STOCHASTIC"), (1, 1, 8, 8), "STOCHASTIC"),
        (spp(0), (1, 1, 8, 8), "pyramid_height must be >= 1"),
        (spp(3), (1, 1, 5, 5), r"pyramid level 2 .* pad \(2, 2\) with kernel \(2, 2\)"),
        (spp(4), (1, 1, 64, 4), r"pyramid level 3 \(8 bins"),
        (spp(2), (1, 1, 8), "needs a 4-D bottom"),
        (spp(2), (1, 0, 8, 8), "dims from axis 1"),
    ],
)
def test_spp_errors(text: str, shape: tuple[int, ...], match: str) -> None:
    with pytest.raises(LayerError, match=match) as info:
        layer_from_text(text, [shape])
    assert "layer 'spp' (type SPP)" in str(info.value)


# ---- Im2col: a numpy loop of Caffe's im2col ---------------------------------------------------


def ref_im2col(x: np.ndarray, kernel, stride, pad, dilation) -> np.ndarray:
    """Row (c * kh + i) * kw + j, column (oh, ow): the input at (oh * sh - ph + i * dh, ow * sw - pw + j * dw),
    0 outside the image."""
    n, c, h, w = x.shape
    out_h = (h + 2 * pad[0] - (dilation[0] * (kernel[0] - 1) + 1)) // stride[0] + 1
    out_w = (w + 2 * pad[1] - (dilation[1] * (kernel[1] - 1) + 1)) // stride[1] + 1
    cols = np.zeros((n, c * kernel[0] * kernel[1], out_h, out_w))
    for ch in range(c):
        for i in range(kernel[0]):
            for j in range(kernel[1]):
                row = (ch * kernel[0] + i) * kernel[1] + j
                for oh in range(out_h):
                    for ow in range(out_w):
                        r = oh * stride[0] - pad[0] + i * dilation[0]
                        s = ow * stride[1] - pad[1] + j * dilation[1]
                        if 0 <= r < h and 0 <= s < w:
                            cols[:, row, oh, ow] = x[:, ch, r, s]
    return cols


def ref_col2im(cols: np.ndarray, shape, kernel, stride, pad, dilation) -> np.ndarray:
    """The adjoint: each column entry added back to the pixel it was read from."""
    n, c, h, w = shape
    image = np.zeros(shape)
    for ch in range(c):
        for i in range(kernel[0]):
            for j in range(kernel[1]):
                row = (ch * kernel[0] + i) * kernel[1] + j
                for oh in range(cols.shape[2]):
                    for ow in range(cols.shape[3]):
                        r = oh * stride[0] - pad[0] + i * dilation[0]
                        s = ow * stride[1] - pad[1] + j * dilation[1]
                        if 0 <= r < h and 0 <= s < w:
                            image[:, ch, r, s] += cols[:, row, oh, ow]
    return image


WINDOWS = [
    ("kernel_size: 3", (3, 3), (1, 1), (0, 0), (1, 1)),
    ("kernel_size: 3 stride: 2 pad: 1", (3, 3), (2, 2), (1, 1), (1, 1)),
    ("kernel_h: 2 kernel_w: 3 stride_h: 1 stride_w: 2 pad_h: 2 pad_w: 0", (2, 3), (1, 2), (2, 0), (1, 1)),
    ("kernel_size: 2 kernel_size: 3 dilation: 2 dilation: 1 pad: 1 stride: 3", (2, 3), (3, 3), (1, 1), (2, 1)),
    ("kernel_size: 3 dilation: 2 pad: 2 stride: 2 stride: 1", (3, 3), (2, 1), (2, 2), (2, 2)),
]


@pytest.mark.parametrize(("conv", "kernel", "stride", "pad", "dilation"), WINDOWS)
def test_im2col_matches_the_numpy_loop_and_col2im(conv: str, kernel, stride, pad, dilation) -> None:
    x = randn(2, 3, 7, 6)
    layer = layer_from_text(im2col(conv), [x.shape]).double()
    tensor = torch.tensor(x, requires_grad=True)
    (y,) = layer(tensor)
    expected = ref_im2col(x, kernel, stride, pad, dilation)
    assert layer.top_shapes == [expected.shape]
    np.testing.assert_array_equal(y.detach().numpy(), expected)
    dy = randn(*expected.shape, seed=1)
    y.backward(torch.from_numpy(dy))
    np.testing.assert_allclose(tensor.grad.numpy(), ref_col2im(dy, x.shape, kernel, stride, pad, dilation), rtol=1e-12)


def test_im2col_gradcheck() -> None:
    x = randn(1, 2, 5, 4)
    gradcheck(layer_from_text(im2col("kernel_size: 3 stride: 2 pad: 1 dilation: 1"), [x.shape]).double(), x)


def test_im2col_axes_before_the_channel_axis_are_items() -> None:
    x = randn(2, 3, 2, 5, 4)
    layer = layer_from_text(im2col("axis: 2 kernel_size: 2 pad: 1"), [x.shape])
    (y,) = layer(torch.from_numpy(x))
    assert layer.top_shapes == [(2, 3, 8, 6, 5)]
    expected = ref_im2col(x.reshape(6, 2, 5, 4), (2, 2), (1, 1), (1, 1), (1, 1)).reshape(2, 3, 8, 6, 5)
    np.testing.assert_array_equal(y.numpy(), expected)


@pytest.mark.parametrize(
    ("conv", "shape", "match"),
    [
        ("kernel_size: 0", (1, 1, 4, 4), r"kernel size must be > 0, got \(0, 0\)"),
        ("kernel_h: 2 kernel_w: 0", (1, 1, 4, 4), "kernel size must be > 0"),
        ("stride: 0 kernel_size: 2", (1, 1, 4, 4), "stride must be > 0"),
        ("dilation: 0 kernel_size: 2", (1, 1, 4, 4), "dilation must be > 0"),
        ("pad: 1", (1, 1, 4, 4), "kernel_size .* is required"),
        ("kernel_size: 2 kernel_h: 2 kernel_w: 2", (1, 1, 4, 4), "either kernel_size or kernel_h"),
        ("kernel_size: 2 kernel_size: 2 kernel_size: 2", (1, 1, 4, 4), "given 3 times"),
        ("kernel_size: 5", (1, 1, 4, 4), "does not fit the input"),
        ("kernel_size: 3 dilation: 2", (1, 1, 4, 4), "does not fit the input"),
        ("kernel_size: 2", (1, 1, 4), "exactly 2 spatial axes"),
        ("kernel_size: 2 axis: 4", (1, 1, 4, 4), "axis 4 is out of range"),
        ("kernel_size: 2", (1, 0, 4, 4), "dims from axis 1"),
    ],
)
def test_im2col_errors(conv: str, shape: tuple[int, ...], match: str) -> None:
    with pytest.raises(LayerError, match=match) as info:
        layer_from_text(im2col(conv), [shape])
    assert "layer 'cols' (type Im2col)" in str(info.value)
