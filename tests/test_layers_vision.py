"""Vision layers (Convolution, Deconvolution, InnerProduct, Pooling, Interp, Crop) against numpy
references written from the Caffe semantics, finite differences, and the real Caffe golden cases."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from google.protobuf import text_format

from rloss.errors import LayerError
from rloss.layers import layer_class, vision
from rloss.proto import caffe_pb2
from tests.helpers import layer_from_text, relative_error
from tests.shared_data import golden

FLT_MAX = float(np.finfo(np.float32).max)


def make(text: str, *shapes: tuple[int, ...], phase: int = caffe_pb2.TRAIN):
    return layer_from_text(text, shapes, phase)


def randn(*shape: int, seed: int = 0) -> np.ndarray:
    return np.random.RandomState(seed).randn(*shape).astype(np.float32)


def set_blobs(layer, arrays) -> None:
    for blob, array in zip(layer.blobs, arrays):
        blob.data.copy_(torch.as_tensor(array))


def gradcheck_layer(layer, *inputs: np.ndarray) -> None:
    """Finite differences in float64 w.r.t. every bottom and parameter blob."""
    layer = layer.double()
    tensors = [torch.tensor(x, dtype=torch.float64, requires_grad=True) for x in inputs]
    params = list(layer.blobs)

    def run(*args):
        for blob, value in zip(params, args[len(tensors) :]):
            blob.data = value.data
        return tuple(layer(*args[: len(tensors)]))

    assert torch.autograd.gradcheck(lambda *a: run(*a), (*tensors, *params), atol=1e-6, rtol=1e-4)


def assert_layer_error(text: str, *shapes: tuple[int, ...], match: str) -> None:
    with pytest.raises(LayerError, match=match) as info:
        make(text, *shapes)
    param = text_format.Parse(text, caffe_pb2.LayerParameter())
    assert f"layer '{param.name}' (type {param.type})" in str(info.value)


# ---- numpy references written from Caffe's formulas ----------------------------------------------------


def ref_conv(x, w, b, stride, pad, dilation, group):
    """Direct cross-correlation with zero padding, dilation and contiguous channel groups."""
    n, c, h, wd = x.shape
    o, cg, kh, kw = w.shape
    xp = np.zeros((n, c, h + 2 * pad[0], wd + 2 * pad[1]))
    xp[:, :, pad[0] : pad[0] + h, pad[1] : pad[1] + wd] = x
    oh = (h + 2 * pad[0] - (dilation[0] * (kh - 1) + 1)) // stride[0] + 1
    ow = (wd + 2 * pad[1] - (dilation[1] * (kw - 1) + 1)) // stride[1] + 1
    y = np.zeros((n, o, oh, ow))
    per_group = o // group
    for oc in range(o):
        g = oc // per_group
        for i in range(oh):
            for j in range(ow):
                rows = i * stride[0] + dilation[0] * np.arange(kh)
                cols = j * stride[1] + dilation[1] * np.arange(kw)
                patch = xp[:, g * cg : (g + 1) * cg][:, :, rows][:, :, :, cols]
                y[:, oc, i, j] = (patch * w[oc]).sum(axis=(1, 2, 3)) + (b[oc] if b is not None else 0)
    return y


def ref_deconv(x, w, b, stride, pad, dilation, group):
    """Scatter form of the transposed convolution: each input pixel adds w * x at its window."""
    n, c, h, wd = x.shape
    _, og, kh, kw = w.shape
    full_h = stride[0] * (h - 1) + dilation[0] * (kh - 1) + 1
    full_w = stride[1] * (wd - 1) + dilation[1] * (kw - 1) + 1
    full = np.zeros((n, og * group, full_h, full_w))
    per_group = c // group
    for ic in range(c):
        g = ic // per_group
        for i in range(h):
            for j in range(wd):
                for a in range(kh):
                    for e in range(kw):
                        r, q = i * stride[0] + a * dilation[0], j * stride[1] + e * dilation[1]
                        full[:, g * og : (g + 1) * og, r, q] += x[:, ic, i, j][:, None] * w[ic, :, a, e]
    y = full[:, :, pad[0] : full_h - pad[0], pad[1] : full_w - pad[1]]
    return y + (b[None, :, None, None] if b is not None else 0)


def caffe_pool_size(size: int, kernel: int, stride: int, pad: int) -> int:
    """Spec 2.2: float ceil, then the clip only when pad > 0."""
    out = int(math.ceil(float(size + 2 * pad - kernel) / stride)) + 1
    if pad > 0 and (out - 1) * stride >= size + pad:
        out -= 1
    return out


def ref_pool(x, method, kernel, stride, pad):
    """Caffe's pooling loops: returns (top, argmax mask, function computing the bottom diff)."""
    n, c, h, w = x.shape
    oh, ow = (caffe_pool_size(s, k, st, p) for s, k, st, p in zip((h, w), kernel, stride, pad))
    y = np.zeros((n, c, oh, ow))
    mask = -np.ones((n, c, oh, ow), dtype=np.int64)
    windows = []
    for i in range(oh):
        for j in range(ow):
            hs, ws = i * stride[0] - pad[0], j * stride[1] - pad[1]
            he, we = min(hs + kernel[0], h + pad[0]), min(ws + kernel[1], w + pad[1])
            size = (he - hs) * (we - ws)
            hs, ws, he, we = max(hs, 0), max(ws, 0), min(he, h), min(we, w)
            windows.append((i, j, hs, he, ws, we, size))
            block = x[:, :, hs:he, ws:we].reshape(n, c, -1).astype(np.float64)
            if block.shape[-1] == 0:  # a window wholly beyond the image (stride > kernel, pad 0):
                # Caffe's MAX gives -FLT_MAX (and back-propagates through index -1); its AVE divides
                # 0 by a count <= 0 (NaN or -0). We give -FLT_MAX / 0 and no gradient.
                y[:, :, i, j] = -FLT_MAX if method == "MAX" else 0.0
            elif method == "AVE":
                y[:, :, i, j] = block.sum(-1) / size
            else:
                first = block.argmax(-1)  # numpy keeps the first maximum, like Caffe's strict '>'
                y[:, :, i, j] = block.max(-1)
                mask[:, :, i, j] = (hs + first // (we - ws)) * w + ws + first % (we - ws)

    def backward(dy):
        dx = np.zeros((n, c, h * w))
        for i, j, hs, he, ws, we, size in windows:
            if method == "AVE":
                dx.reshape(n, c, h, w)[:, :, hs:he, ws:we] += dy[:, :, i, j, None, None] / max(size, 1)
            else:
                for a in range(n):
                    for b in range(c):
                        if mask[a, b, i, j] >= 0:
                            dx[a, b, mask[a, b, i, j]] += dy[a, b, i, j]
        return dx.reshape(n, c, h, w)

    return y, mask, backward


def ref_interp(x, out_h, out_w):
    """Spec 2.6 in float32: ratio (in-1)/(out-1), (int) truncation, upper index clamped."""
    f32 = np.float32
    h, w = x.shape[-2:]

    def axis(size_in, size_out):
        ratio = f32(size_in - 1) / f32(size_out - 1) if size_out > 1 else f32(0)
        taps = []
        for k in range(size_out):
            r = f32(ratio * f32(k))
            lo = int(r)
            lam = f32(r - f32(lo))
            taps.append((lo, lo + 1 if lo < size_in - 1 else lo, f32(1) - lam, lam))
        return taps

    y = np.zeros(x.shape[:-2] + (out_h, out_w), np.float32)
    for i, (y0, y1, hy0, hy1) in enumerate(axis(h, out_h)):
        for j, (x0, x1, wx0, wx1) in enumerate(axis(w, out_w)):
            top = wx0 * x[..., y0, x0] + wx1 * x[..., y0, x1]
            bottom = wx0 * x[..., y1, x0] + wx1 * x[..., y1, x1]
            y[..., i, j] = hy0 * top + hy1 * bottom
    return y


# ---- Convolution ----------------------------------------------------------------------------

CONV_CASES = [
    ("num_output: 4 kernel_size: 3", (2, 3, 7, 8)),
    ("num_output: 4 kernel_size: 3 pad: 2 dilation: 2", (1, 3, 9, 9)),
    ("num_output: 6 kernel_size: 3 pad: 1 stride: 2 group: 3", (2, 6, 9, 8)),
    ("num_output: 2 kernel_h: 3 kernel_w: 2 pad_h: 1 pad_w: 0 stride_h: 2 stride_w: 1", (1, 2, 8, 7)),
    (
        "num_output: 2 kernel_size: 3 kernel_size: 1 pad: 1 pad: 0 dilation: 1 dilation: 3 bias_term: false",
        (1, 2, 6, 9),
    ),
]


def conv_text(body: str, kind: str = "Convolution") -> str:
    return f'name: "c" type: "{kind}" bottom: "x" top: "y" convolution_param {{ {body} }}'


def _conv_geometry(layer):
    return layer.stride, layer.pad, layer.dilation, layer.group


@pytest.mark.parametrize("body,shape", CONV_CASES)
def test_convolution_matches_direct_correlation(body, shape):
    layer = make(conv_text(body), shape)
    blobs = [randn(*b.shape, seed=i + 1) for i, b in enumerate(layer.blobs)]
    set_blobs(layer, blobs)
    x = randn(*shape)
    (y,) = layer(torch.from_numpy(x))
    bias = blobs[1] if len(blobs) > 1 else None
    expected = ref_conv(x, blobs[0], bias, *_conv_geometry(layer))
    assert tuple(y.shape) == layer.top_shapes[0] == expected.shape
    assert relative_error(y, expected) < 1e-5


@pytest.mark.parametrize("body,shape", CONV_CASES[1:4])
def test_convolution_gradients(body, shape):
    layer = make(conv_text(body), shape)
    set_blobs(layer, [randn(*b.shape, seed=i + 1) for i, b in enumerate(layer.blobs)])
    gradcheck_layer(layer, randn(*shape))


def test_convolution_blobs_fillers_and_several_bottoms():
    text = (
        'name: "c" type: "Convolution" bottom: "a" bottom: "b" top: "ya" top: "yb" convolution_param { '
        "num_output: 4 kernel_size: 3 group: 2 weight_filler { type: 'constant' value: 0.5 } }"
    )
    layer = make(text, (1, 6, 5, 5), (1, 6, 5, 5))
    assert [tuple(b.shape) for b in layer.blobs] == [(4, 3, 3, 3), (4,)]
    assert torch.all(layer.blobs[0] == 0.5) and torch.all(layer.blobs[1] == 0)
    a, b = randn(1, 6, 5, 5, seed=1), randn(1, 6, 5, 5, seed=2)
    ya, yb = layer(torch.from_numpy(a), torch.from_numpy(b))
    (single,) = make(
        conv_text("num_output: 4 kernel_size: 3 group: 2 weight_filler { type: 'constant' value: 0.5 }"),
        (1, 6, 5, 5),
    )(torch.from_numpy(b))
    assert (
        relative_error(
            ya, ref_conv(a, layer.blobs[0].detach().numpy(), np.zeros(4), (1, 1), (0, 0), (1, 1), 2)
        )
        < 1e-5
    )
    assert torch.equal(yb, single)
    assert layer.top_shapes == [(1, 4, 3, 3), (1, 4, 3, 3)]


def test_convolution_errors():
    assert_layer_error(
        conv_text("num_output: 4 kernel_size: 3 group: 2"), (1, 3, 5, 5), match=r"group 2.*channels \(3\)"
    )
    assert_layer_error(conv_text("num_output: 3 kernel_size: 3 group: 2"), (1, 4, 5, 5), match="num_output")
    assert_layer_error(conv_text("num_output: 4"), (1, 3, 5, 5), match="kernel_size .*required")
    assert_layer_error(
        conv_text("num_output: 4 kernel_size: 7"), (1, 3, 5, 5), match=r"does not fit.*\(1, 3, 5, 5\)"
    )
    assert_layer_error(conv_text("num_output: 4 kernel_size: 3"), (3, 5, 5), match=r"4-D.*\(3, 5, 5\)")
    assert_layer_error(
        conv_text("num_output: 4 kernel_size: 3 kernel_h: 3 kernel_w: 3"), (1, 3, 5, 5), match="not both"
    )
    assert_layer_error(conv_text("num_output: 4 kernel_size: 3 stride: 0"), (1, 3, 5, 5), match="stride")
    assert_layer_error(
        conv_text("num_output: 4 kernel_size: 1 kernel_size: 1 kernel_size: 1"), (1, 3, 5, 5), match="3 times"
    )
    assert_layer_error(conv_text("num_output: 4 kernel_size: 3 axis: 2"), (1, 3, 5, 5), match="axis")
    two_tops = conv_text("num_output: 1 kernel_size: 1").replace('top: "y"', 'top: "y" top: "z"')
    assert_layer_error(two_tops, (1, 3, 5, 5), match="one top per bottom")
    layer = make(conv_text("num_output: 4 kernel_size: 3"), (1, 3, 5, 5))
    with pytest.raises(LayerError, match=r"2 channels.*\(1, 2, 5, 5\)"):
        layer.reshape([(1, 2, 5, 5)])


def _golden_layer_case(case: str, monkeypatch=None):
    """Every layer of a golden net built alone from its LayerParameter, fed the golden inputs and
    params, with the golden top diffs; yields (what, our value, Caffe's value)."""
    files = golden("01_layers", case)
    net = files.net_param()
    inputs = {name: files.array(f"in_{name}") for name in net.input}
    grads = {name: [] for name in inputs}
    for lp in net.layer:
        layer = layer_class(lp.type)(lp, [inputs[b].shape for b in lp.bottom], caffe_pb2.TRAIN)
        set_blobs(layer, [files.array(f"param_{lp.name}_{i}") for i in range(len(layer.blobs))])
        bottoms = [torch.tensor(inputs[b], requires_grad=True) for b in lp.bottom]
        tops = layer(*bottoms)
        for name, top in zip(lp.top, tops):
            yield f"out {name}", top, files.array(f"out_{name}")
        torch.autograd.backward(
            tops, [torch.from_numpy(files.array(f"topdiff_{t}")) for t in lp.top]
        )
        for name, bottom in zip(lp.bottom, bottoms):
            grads[name].append(bottom.grad)
        for i, blob in enumerate(layer.blobs):
            yield f"pdiff {lp.name} {i}", blob.grad, files.array(f"pdiff_{lp.name}_{i}")
    for index, (name, per_consumer) in enumerate(grads.items()):
        yield f"diff {name}", sum(per_consumer), files.array(f"diff_{name}")
        if len(per_consumer) > 1:
            for k, grad in enumerate(per_consumer):
                yield (
                    f"diff {name} split {k}",
                    grad,
                    files.array(f"diff_{name}_input_{index}_split_{k}"),
                )


def check_golden(case: str) -> dict[str, float]:
    errors = {what: relative_error(ours, theirs) for what, ours, theirs in _golden_layer_case(case)}
    too_big = {k: v for k, v in errors.items() if not v <= 1e-4}
    assert not too_big, f"{case}: {too_big}"
    return errors


def test_golden_conv_dilation():
    errors = check_golden("conv_dilation")
    assert len(errors) == 3 * 4  # 3 outputs, 6 param diffs, 3 bottom diffs


# ---- Deconvolution --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "body,shape,out_hw",
    [
        ("num_output: 3 kernel_size: 4 stride: 2 pad: 1", (1, 2, 5, 4), (10, 8)),
        ("num_output: 4 kernel_size: 3 stride: 3 group: 2 dilation: 2", (2, 4, 3, 3), (11, 11)),
        (
            "num_output: 2 kernel_h: 2 kernel_w: 3 stride_h: 1 stride_w: 2 bias_term: false",
            (1, 3, 4, 4),
            (5, 9),
        ),
    ],
)
def test_deconvolution_matches_scatter_reference(body, shape, out_hw):
    layer = make(conv_text(body, "Deconvolution"), shape)
    cp = layer.param.convolution_param
    assert tuple(layer.blobs[0].shape) == (shape[1], cp.num_output // layer.group, *layer.kernel)
    set_blobs(layer, [randn(*b.shape, seed=i + 3) for i, b in enumerate(layer.blobs)])
    x = randn(*shape)
    (y,) = layer(torch.from_numpy(x))
    blobs = [b.detach().numpy() for b in layer.blobs]
    expected = ref_deconv(x, blobs[0], blobs[1] if len(blobs) > 1 else None, *_conv_geometry(layer))
    assert layer.top_shapes[0] == (shape[0], cp.num_output, *out_hw) == expected.shape
    assert relative_error(y, expected) < 1e-5
    gradcheck_layer(layer, x)


def test_deconvolution_bilinear_upsampling_filler():
    text = conv_text(
        "num_output: 2 kernel_size: 4 stride: 2 pad: 1 group: 2 bias_term: false "
        "weight_filler { type: 'bilinear' }",
        "Deconvolution",
    )
    layer = make(text, (1, 2, 3, 3))
    (y,) = layer(torch.ones(1, 2, 3, 3))
    assert y.shape == (1, 2, 6, 6)
    # away from the border, the bilinear kernel upsamples a constant to the same constant
    assert torch.allclose(y[:, :, 1:-1, 1:-1], torch.ones(1, 2, 4, 4))


# ---- InnerProduct ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "body,shape,top",
    [
        ("num_output: 5", (3, 2, 2, 2), (3, 5)),
        ("num_output: 4 axis: 2", (2, 3, 2, 3), (2, 3, 4)),
        ("num_output: 4 axis: -1 transpose: true", (2, 3, 6), (2, 3, 4)),
        ("num_output: 3 bias_term: false", (4, 7), (4, 3)),
    ],
)
def test_inner_product(body, shape, top):
    layer = make(
        f'name: "ip" type: "InnerProduct" bottom: "x" top: "y" inner_product_param {{ {body} }}', shape
    )
    set_blobs(layer, [randn(*b.shape, seed=i + 5) for i, b in enumerate(layer.blobs)])
    axis = layer.axis
    x = randn(*shape)
    (y,) = layer(torch.from_numpy(x))
    weight = layer.blobs[0].detach().numpy().astype(np.float64)
    matrix = weight if layer.transpose else weight.T
    expected = x.reshape(math.prod(shape[:axis]), -1).astype(np.float64) @ matrix
    if layer.bias_term:
        expected = expected + layer.blobs[1].detach().numpy()
    assert layer.top_shapes[0] == top == tuple(y.shape)
    assert relative_error(y, expected.reshape(top)) < 1e-5
    gradcheck_layer(layer, x)


def test_inner_product_input_size_mismatch():
    layer = make(
        'name: "ip" type: "InnerProduct" bottom: "x" top: "y" inner_product_param { num_output: 2 }', (1, 6)
    )
    with pytest.raises(LayerError, match=r"\(1, 7\).*expect 6"):
        layer.reshape([(1, 7)])


# ---- Pooling --------------------------------------------------------------------------------


def pool_text(body: str, tops: int = 1) -> str:
    top_fields = " ".join(f'top: "t{i}"' for i in range(tops))
    return f'name: "p" type: "Pooling" bottom: "x" {top_fields} pooling_param {{ {body} }}'


@pytest.mark.parametrize("size", [7, 8, 9, 10, 33, 34])
@pytest.mark.parametrize(
    "kernel,stride,pad", [(3, 1, 0), (3, 1, 1), (3, 2, 0), (3, 2, 1), (2, 2, 0), (2, 2, 1)]
)
def test_pooling_output_size_follows_caffe(size, kernel, stride, pad):
    layer = make(pool_text(f"kernel_size: {kernel} stride: {stride} pad: {pad}"), (1, 1, size, size + 1))
    expected = (
        1,
        1,
        caffe_pool_size(size, kernel, stride, pad),
        caffe_pool_size(size + 1, kernel, stride, pad),
    )
    assert layer.top_shapes == [expected]
    assert tuple(layer(torch.zeros(1, 1, size, size + 1))[0].shape) == expected


def test_pooling_sizes_of_the_deeplab_nets():
    chain = {321: [161, 81, 41], 513: [257, 129, 65]}
    for size, expected in chain.items():
        for out in expected:
            layer = make(pool_text("kernel_size: 3 stride: 2 pad: 1"), (1, 1, size, size))
            assert layer.top_shapes[0][2:] == (out, out)
            size = out
    assert make(pool_text("kernel_size: 3 stride: 1 pad: 1"), (1, 1, 41, 41)).top_shapes[0][2:] == (41, 41)


POOL_CASES = [  # (kernel, stride, pad, input H, W); the last ones need the exact (non-torch) path
    ((3, 3), (2, 2), (1, 1), 9, 9),
    ((3, 3), (2, 2), (0, 0), 10, 10),
    ((3, 3), (2, 2), (1, 1), 10, 7),
    ((2, 3), (1, 2), (1, 0), 6, 9),
    ((3, 3), (1, 1), (1, 1), 5, 6),
    ((3, 3), (2, 2), (2, 2), 7, 8),  # pad > kernel // 2
    ((1, 2), (3, 4), (0, 0), 5, 4),  # stride > kernel, pad 0: Caffe keeps windows torch drops
    ((4, 4), (3, 2), (3, 1), 8, 5),
]


@pytest.mark.parametrize("method", ["MAX", "AVE"])
@pytest.mark.parametrize("kernel,stride,pad,h,w", POOL_CASES)
def test_pooling_matches_caffe_loops(method, kernel, stride, pad, h, w):
    body = (
        f"pool: {method} kernel_h: {kernel[0]} kernel_w: {kernel[1]} stride_h: {stride[0]} "
        f"stride_w: {stride[1]} pad_h: {pad[0]} pad_w: {pad[1]}"
    )
    tops = 2 if method == "MAX" else 1
    layer = make(pool_text(body, tops), (2, 3, h, w))
    x = randn(2, 3, h, w, seed=h * w)
    expected, mask, backward = ref_pool(x, method, kernel, stride, pad)
    xt = torch.tensor(x, requires_grad=True)
    outs = layer(xt)
    assert [tuple(o.shape) for o in outs] == layer.top_shapes == [expected.shape] * tops
    assert relative_error(outs[0], expected) < 1e-6
    if method == "MAX":
        assert torch.equal(outs[1], torch.from_numpy(mask).float())
    dy = randn(*expected.shape, seed=7)
    outs[0].backward(torch.from_numpy(dy))
    assert relative_error(xt.grad, backward(dy)) < 1e-6


def test_pooling_native_and_exact_paths_are_both_used():
    native = [vision._native_pooling_ok((h, w), k, s, p) for k, s, p, h, w in POOL_CASES]
    assert native == [True] * 5 + [False] * 3


@pytest.mark.parametrize("method", ["MAX", "AVE"])
def test_pooling_gradcheck(method):
    layer = make(pool_text(f"pool: {method} kernel_size: 3 stride: 2 pad: 1"), (1, 2, 7, 6))
    gradcheck_layer(layer, randn(1, 2, 7, 6))


def test_max_pooling_ties_keep_the_first_position():
    layer = make(pool_text("pool: MAX kernel_size: 2 stride: 2", tops=2), (1, 1, 4, 4))
    x = torch.ones(1, 1, 4, 4, requires_grad=True)
    y, mask = layer(x)
    assert mask.flatten().tolist() == [0, 2, 8, 10]
    y.sum().backward()
    assert x.grad[0, 0].flatten().tolist() == [1, 0, 1, 0, 0, 0, 0, 0, 1, 0, 1, 0, 0, 0, 0, 0]


def test_max_pooling_shared_argmax_accumulates():
    layer = make(pool_text("pool: MAX kernel_size: 3 stride: 1"), (1, 1, 3, 4))
    x = torch.zeros(1, 1, 3, 4)
    x[0, 0, 1, 2] = 5.0
    x.requires_grad_(True)
    (y,) = layer(x)
    y.backward(torch.tensor([[[[2.0, 3.0]]]]))
    assert x.grad[0, 0, 1, 2] == 5.0 and x.grad.abs().sum() == 5.0


def test_global_pooling():
    layer = make(pool_text("pool: AVE global_pooling: true"), (2, 3, 5, 4))
    x = randn(2, 3, 5, 4)
    (y,) = layer(torch.from_numpy(x))
    assert layer.top_shapes == [(2, 3, 1, 1)]
    assert relative_error(y, x.mean(axis=(2, 3), keepdims=True)) < 1e-6


@pytest.mark.parametrize("patch_native", [False, True])
def test_golden_pooling(monkeypatch, patch_native):
    if patch_native:  # the exact fallback path must reproduce Caffe as well
        monkeypatch.setattr(vision, "_native_pooling_ok", lambda *args: False)
    errors = check_golden("pooling")
    assert len(errors) == 12 + 3 + 12


def test_pooling_errors():
    assert_layer_error(
        pool_text("kernel_size: 3 pad: 3"), (1, 1, 9, 9), match=r"pad \(3, 3\).*kernel \(3, 3\)"
    )
    assert_layer_error(
        pool_text("kernel_size: 5"), (1, 1, 3, 9), match=r"larger than the input \(1, 1, 3, 9\)"
    )
    assert_layer_error(pool_text("stride: 2"), (1, 1, 9, 9), match="kernel_size .*required")
    assert_layer_error(pool_text("kernel_h: 3"), (1, 1, 9, 9), match="both kernel_h and kernel_w")
    assert_layer_error(pool_text("kernel_size: 3 kernel_h: 3 kernel_w: 3"), (1, 1, 9, 9), match="either")
    assert_layer_error(pool_text("pool: STOCHASTIC kernel_size: 3"), (1, 1, 9, 9), match="STOCHASTIC")
    assert_layer_error(pool_text("pool: AVE kernel_size: 3", tops=2), (1, 1, 9, 9), match="second top")
    assert_layer_error(pool_text("kernel_size: 3"), (1, 9, 9), match=r"4-D.*\(1, 9, 9\)")
    assert_layer_error(pool_text("global_pooling: true kernel_size: 3"), (1, 1, 9, 9), match="global_pooling")
    assert_layer_error(pool_text("global_pooling: true stride: 2"), (1, 1, 9, 9), match="global_pooling")
    assert_layer_error(pool_text("kernel_size: 3 stride: 0"), (1, 1, 9, 9), match="stride")


# ---- Interp ---------------------------------------------------------------------------------


def interp_text(body: str) -> str:
    return f'name: "i" type: "Interp" bottom: "x" top: "y" interp_param {{ {body} }}'


@pytest.mark.parametrize(
    "body,size,out",
    [
        ("shrink_factor: 8", 321, 41),
        ("shrink_factor: 16", 321, 21),
        ("shrink_factor: 2", 321, 161),
        ("zoom_factor: 3 shrink_factor: 4", 321, 241),
        ("zoom_factor: 8", 41, 321),
        ("zoom_factor: 2", 21, 41),
        ("zoom_factor: 4 shrink_factor: 3", 31, 41),
        ("shrink_factor: 2", 513, 257),
        ("zoom_factor: 3 shrink_factor: 4", 513, 385),
        ("zoom_factor: 8", 65, 513),
        ("zoom_factor: 2", 257, 513),
        ("zoom_factor: 4", 129, 513),
        ("zoom_factor: 2", 33, 65),
        ("zoom_factor: 4 shrink_factor: 3", 49, 65),
        ("shrink_factor: 8", 37, 5),
    ],
)
def test_interp_sizes_as_in_the_fork(body, size, out):
    assert make(interp_text(body), (1, 1, size, size)).top_shapes == [(1, 1, out, out)]


@pytest.mark.parametrize(
    "body,out",
    [
        ("shrink_factor: 2 height: 7 width: 9", (11, 16)),  # one factor alone beats height/width
        ("zoom_factor: 2 height: 7 width: 9", (41, 61)),
        ("zoom_factor: 2 shrink_factor: 2 height: 7 width: 9", (7, 9)),  # height/width beat both factors
        ("zoom_factor: 3 shrink_factor: 2", (31, 46)),  # shrink first, then zoom
        ("zoom_factor: 1", (21, 31)),  # presence counts, even of the default value
        ("height: 5 width: 6 pad_beg: -2 pad_end: -1", (5, 6)),
        ("zoom_factor: 2 pad_beg: -2 pad_end: -1", (35, 55)),  # zoom of the 18 x 28 crop
    ],
)
def test_interp_rule_order_by_presence(body, out):
    assert make(interp_text(body), (1, 1, 21, 31)).top_shapes[0][2:] == out


@pytest.mark.parametrize(
    "body,shape",
    [
        ("shrink_factor: 8", (1, 2, 37, 45)),
        ("zoom_factor: 8", (2, 1, 11, 11)),
        ("zoom_factor: 3 shrink_factor: 4", (1, 2, 41, 37)),
        ("height: 50 width: 60", (1, 2, 37, 45)),
        ("height: 1 width: 5", (1, 1, 13, 7)),
        ("zoom_factor: 2 pad_beg: -2 pad_end: -3", (1, 2, 20, 17)),
        ("height: 9 width: 4 pad_beg: -1", (1, 1, 12, 10)),
    ],
)
def test_interp_is_bit_exact_with_the_float32_formula(body, shape):
    """Label maps (one channel, no gradient): bit-exact, since consumers truncate them to int; scores
    and images (several channels or a gradient): the same sampling within float32 round-off."""
    for channels in (1, 3):
        layer = make(interp_text(body), (shape[0], channels, *shape[2:]))
        x = randn(shape[0], channels, *shape[2:], seed=shape[-1])
        beg, end = layer.pad_beg, layer.pad_end
        source = x[..., -beg : shape[2] + end, -beg : shape[3] + end]
        expected = ref_interp(source, *layer.top_shapes[0][2:])
        (y,) = layer(torch.from_numpy(x))
        if channels == 1:
            assert np.array_equal(y.numpy(), expected)
        else:
            np.testing.assert_allclose(y.numpy(), expected, rtol=0, atol=4e-7 * np.abs(expected).max())


def test_interp_same_size_is_the_crop():
    x = randn(1, 2, 9, 8)
    (y,) = make(interp_text("height: 6 width: 5 pad_beg: -1 pad_end: -2"), x.shape)(torch.from_numpy(x))
    assert np.array_equal(y.numpy(), x[:, :, 1:7, 1:6])


def test_interp_backward_is_the_adjoint_and_crop_border_gets_zero():
    layer = make(interp_text("zoom_factor: 3 shrink_factor: 2 pad_beg: -1 pad_end: -1"), (1, 2, 11, 9))
    gradcheck_layer(layer, randn(1, 2, 11, 9))
    x = torch.tensor(randn(1, 2, 11, 9), requires_grad=True)
    layer = make(interp_text("zoom_factor: 3 shrink_factor: 2 pad_beg: -1 pad_end: -1"), (1, 2, 11, 9))
    (y,) = layer(x)
    dy = torch.from_numpy(randn(*y.shape, seed=4))
    y.backward(dy)
    border = torch.ones(11, 9, dtype=torch.bool)
    border[1:-1, 1:-1] = False
    assert torch.all(x.grad[:, :, border] == 0)
    # adjoint identity <I x, dy> = <x, I* dy>
    with torch.no_grad():
        assert abs(float((y * dy).sum() - (x * x.grad).sum())) < 1e-4 * float((y * dy).abs().sum())


def test_interp_label_shrink_is_exact_subsampling():
    values = list(range(21)) + [255]
    labels = np.random.RandomState(3).choice(values, size=(2, 1, 321, 321)).astype(np.float32)
    for factor, out in ((8, 41), (16, 21)):
        layer = make(interp_text(f"shrink_factor: {factor}"), labels.shape)
        (y,) = layer(torch.from_numpy(labels))
        assert y.shape == (2, 1, out, out)
        assert np.array_equal(y.numpy(), labels[:, :, ::factor, ::factor])


def test_golden_interp():
    errors = check_golden("interp")
    assert len(errors) == 9 + 3 + 9
    outputs = [v for k, v in errors.items() if k.startswith("out")]
    assert max(outputs) <= 1e-6  # multi-channel inputs: F.interpolate, Caffe's sampling within round-off


def test_interp_errors():
    assert_layer_error(
        interp_text("zoom_factor: 2 pad_beg: 1"), (1, 1, 9, 9), match="pad_beg and pad_end must be <= 0"
    )
    assert_layer_error(interp_text("pad_end: 2 zoom_factor: 2"), (1, 1, 9, 9), match="<= 0")
    assert_layer_error(interp_text("height: 5"), (1, 1, 9, 9), match="height and width")
    assert_layer_error(interp_text("shrink_factor: 0"), (1, 1, 9, 9), match="shrink_factor must be >= 1")
    assert_layer_error(interp_text("height: 0 width: 4"), (1, 1, 9, 9), match=r"\(0, 4\)")
    assert_layer_error(interp_text("zoom_factor: 2 pad_beg: -5 pad_end: -4"), (1, 1, 9, 9), match="crop away")
    assert_layer_error(interp_text("zoom_factor: 2"), (9, 9), match=r"4-D.*\(9, 9\)")


# ---- Crop -----------------------------------------------------------------------------------


def crop_text(body: str) -> str:
    return f'name: "cr" type: "Crop" bottom: "x" bottom: "like" top: "y" crop_param {{ {body} }}'


@pytest.mark.parametrize(
    "body,like,window",
    [
        ("", (2, 3, 4, 5), (slice(None), slice(None), slice(0, 4), slice(0, 5))),
        ("offset: 2", (2, 3, 4, 5), (slice(None), slice(None), slice(2, 6), slice(2, 7))),
        ("offset: 1 offset: 3", (7, 7, 4, 5), (slice(None), slice(None), slice(1, 5), slice(3, 8))),
        (
            "axis: 1 offset: 1 offset: 0 offset: 2",
            (9, 2, 6, 5),
            (slice(None), slice(1, 3), slice(0, 6), slice(2, 7)),
        ),
        ("axis: -1 offset: 3", (2, 3, 6, 4), (slice(None), slice(None), slice(None), slice(3, 7))),
    ],
)
def test_crop(body, like, window):
    x = randn(2, 3, 7, 8)
    layer = make(crop_text(body), x.shape, like)
    xt = torch.tensor(x, requires_grad=True)
    (y,) = layer(xt, torch.zeros(like))
    assert np.array_equal(y.detach().numpy(), x[window])
    assert layer.top_shapes == [x[window].shape]
    y.backward(torch.ones_like(y))
    expected = np.zeros_like(x)
    expected[window] = 1
    assert np.array_equal(xt.grad.numpy(), expected)


def test_crop_errors():
    assert_layer_error(
        crop_text("offset: 1 offset: 2 offset: 3"), (2, 3, 7, 8), (2, 3, 4, 4), match="3 offsets for 2"
    )
    assert_layer_error(crop_text("offset: 4"), (2, 3, 7, 8), (2, 3, 4, 4), match=r"axis 2 of \(2, 3, 7, 8\)")
    assert_layer_error(crop_text(""), (2, 3, 7, 8), (2, 3, 4), match="same number of axes")
    assert_layer_error(crop_text("axis: 4"), (2, 3, 7, 8), (2, 3, 4, 4), match="axis 4 is out of range")


def test_the_max_pooling_mask_stays_exact_in_bf16():
    """The mask holds plane indices: in bf16 (8-bit significand) 257 would round to 256, so the mask
    is float32 whatever the input's dtype."""
    from rloss.layers.vision import max_pool

    x = torch.zeros(1, 1, 40, 40)
    x[..., 1::2, 1::2] = 1.0  # each window's maximum at its bottom right: indices up to 1599, values exact in bf16
    _, mask = max_pool(x.to(torch.bfloat16), (2, 2), (2, 2), (0, 0), (20, 20), with_mask=True)
    _, exact = max_pool(x, (2, 2), (2, 2), (0, 0), (20, 20), with_mask=True)
    assert mask.dtype == torch.float32
    assert torch.equal(mask, exact) and float(mask.max()) == 40 * 40 - 1
