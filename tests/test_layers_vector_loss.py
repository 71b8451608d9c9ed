"""BVLC master's vector losses (EuclideanLoss, SigmoidCrossEntropyLoss, HingeLoss, InfogainLoss,
ContrastiveLoss, MultinomialLogisticLoss) against numpy references written from Caffe's formulas
(values and Caffe's hand-written gradients), float64 gradcheck, and nets built from prototxt text
for the loss weights, propagate_down and the label bottoms."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from google.protobuf import text_format

from rloss.errors import LayerError, NetError
from rloss.net import Net
from rloss.proto import caffe_pb2
from rloss.proto.blob import array_to_blob
from tests.helpers import layer_from_text

THRESHOLD = float(np.float32(1e-20))  # Caffe's kLOG_THRESHOLD
MODES = ("FULL", "VALID", "BATCH_SIZE", "NONE")


def make(text: str, shapes):
    return layer_from_text(f'name: "loss" {text}', shapes)


def rng(seed: int) -> np.random.RandomState:
    return np.random.RandomState(seed)


def tensors(*arrays, grad=(0,), dtype=torch.float32):
    """Torch copies of `arrays`; those at the indices in `grad` require a gradient."""
    return [torch.tensor(a, dtype=dtype, requires_grad=i in grad) for i, a in enumerate(arrays)]


def loss_and_grads(layer, *arrays, grad=(0,), seed=1.0):
    """(loss, gradients of the bottoms at `grad`) with the loss top seeded with `seed`."""
    inputs = tensors(*arrays, grad=grad)
    loss = layer(*inputs)[0]
    loss.backward(torch.tensor(seed))
    return loss.item(), [inputs[i].grad.numpy() for i in grad]


def normaliser(mode: str, valid: int, outer: int, inner: int) -> float:
    return max(1.0, {"FULL": outer * inner, "VALID": valid, "BATCH_SIZE": outer, "NONE": 1}[mode])


# ---- EuclideanLoss --------------------------------------------------------------------------------


def euclidean_reference(a, b):
    diff = a.astype(np.float64) - b.reshape(a.shape)
    n = a.shape[0]
    return (diff ** 2).sum() / (2 * n), diff / n, -(diff / n).reshape(b.shape)


def test_euclidean_loss_value_and_both_gradients():
    a, b = rng(0).randn(4, 6).astype(np.float32), rng(1).randn(4, 2, 3).astype(np.float32)
    layer = make('type: "EuclideanLoss" bottom: "a" bottom: "b"', [a.shape, b.shape])
    assert layer.top_shapes == [()] and layer.loss_weights == [1.0] and layer.no_gradient_bottoms == ()
    loss, (grad_a, grad_b) = loss_and_grads(layer, a, b, grad=(0, 1), seed=0.5)
    want, want_a, want_b = euclidean_reference(a, b)
    assert loss == pytest.approx(want, rel=1e-5)
    np.testing.assert_allclose(grad_a, 0.5 * want_a, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(grad_b, 0.5 * want_b, rtol=1e-5, atol=1e-7)


def test_euclidean_loss_gradcheck():
    layer = make('type: "EuclideanLoss" bottom: "a" bottom: "b"', [(3, 2, 2), (3, 4)])
    a, b = tensors(rng(2).randn(3, 2, 2), rng(3).randn(3, 4), grad=(0, 1), dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda x, y: layer(x, y)[0], (a, b))


@pytest.mark.parametrize("shapes, message", [
    ([(4, 6), (4, 5)], r"same count per sample \(6 != 5\)"),
    ([(4, 6), (3, 8)], "same first dimension"),
    ([(1, 1, 1, 1, 6), (1, 6)], "at most 4 axes"),
    ([(), ()], "at least one axis"),
])
def test_euclidean_loss_shape_errors(shapes, message):
    with pytest.raises(LayerError, match=r"'loss' \(type EuclideanLoss\).*" + message):
        make('type: "EuclideanLoss" bottom: "a" bottom: "b"', shapes)


# ---- SigmoidCrossEntropyLoss ----------------------------------------------------------------------


def sigmoid_ce_reference(x, t, ignore, mode):
    """-[t log sigmoid(x) + (1 - t) log(1 - sigmoid(x))] element by element in float64."""
    x64, t64 = x.astype(np.float64).ravel(), t.astype(np.float64).ravel()
    total, valid, grad = 0.0, 0, np.zeros_like(x64)
    for i in range(x64.size):
        if ignore is not None and math.trunc(t64[i]) == ignore:
            continue
        total += t64[i] * np.logaddexp(0, -x64[i]) + (1 - t64[i]) * np.logaddexp(0, x64[i])
        grad[i] = 1 / (1 + math.exp(-x64[i])) - t64[i]
        valid += 1
    scale = normaliser(mode, valid, x.shape[0], x.size // x.shape[0])
    return total / scale, (grad / scale).reshape(x.shape)


def sigmoid_problem(seed: int, ignore: int | None):
    r = rng(seed)
    x = (r.randn(3, 4, 5) * 3).astype(np.float32)
    x[0, 0, :2] = [80.0, -80.0]  # exp(80) overflows float32: the stable formula must not
    t = r.rand(3, 1, 20).astype(np.float32)  # soft targets, another shape of the same count
    if ignore is not None:
        t[r.rand(*t.shape) < 0.3] = ignore - 0.6  # truncates towards zero to the ignore label
    return x, t


@pytest.mark.parametrize("loss_param, mode", [
    ("", "BATCH_SIZE"),  # BVLC's own default for this layer
    ("normalization: VALID", "VALID"),
    ("normalization: FULL", "FULL"),
    ("normalization: NONE", "NONE"),
    ("normalization: BATCH_SIZE", "BATCH_SIZE"),
    ("normalize: true", "VALID"),
    ("normalize: false", "BATCH_SIZE"),
    ("normalize: true normalization: FULL", "FULL"),
])
@pytest.mark.parametrize("ignore", [None, -1])
def test_sigmoid_cross_entropy_loss_matches_the_reference(loss_param, mode, ignore):
    x, t = sigmoid_problem(4, ignore)
    ignore_text = "" if ignore is None else f"ignore_label: {ignore}"
    layer = make(f'type: "SigmoidCrossEntropyLoss" bottom: "x" bottom: "t" loss_param {{ {loss_param} '
                 f"{ignore_text} }}", [x.shape, t.shape])
    loss, (grad,) = loss_and_grads(layer, x, t, seed=2.0)
    want, want_grad = sigmoid_ce_reference(x, t, ignore, mode)
    assert math.isfinite(loss) and loss == pytest.approx(want, rel=1e-5)
    np.testing.assert_allclose(grad, 2.0 * want_grad, rtol=1e-4, atol=1e-7)


def test_sigmoid_cross_entropy_gradient_at_zero_is_caffes():
    """sigmoid(0) - t = 0.5 - t: the indicator [x >= 0] is a constant, not a relu's kink."""
    t = np.array([[0.0, 0.25, 1.0]], dtype=np.float32)
    layer = make('type: "SigmoidCrossEntropyLoss" bottom: "x" bottom: "t"', [t.shape, t.shape])
    loss, (grad,) = loss_and_grads(layer, np.zeros_like(t), t)
    assert loss == pytest.approx(3 * math.log(2), rel=1e-6)
    np.testing.assert_allclose(grad, 0.5 - t, rtol=1e-6)


def test_sigmoid_cross_entropy_gradcheck_and_all_ignored():
    x, t = sigmoid_problem(5, -1)
    text = 'type: "SigmoidCrossEntropyLoss" bottom: "x" bottom: "t" loss_param { ignore_label: -1 }'
    layer = make(text, [x.shape, t.shape])
    xs = torch.tensor(x / 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda v: layer(v, torch.tensor(t))[0], (xs,))
    loss, (grad,) = loss_and_grads(layer, x, np.full_like(t, -1.0))
    assert loss == 0.0 and not grad.any()


def test_sigmoid_cross_entropy_errors():
    with pytest.raises(LayerError, match=r"same count \(6 != 5\)"):
        make('type: "SigmoidCrossEntropyLoss" bottom: "x" bottom: "t"', [(1, 6), (1, 5)])
    with pytest.raises(LayerError, match="cannot back-propagate to bottom 1"):
        make('type: "SigmoidCrossEntropyLoss" bottom: "x" bottom: "t" propagate_down: true '
             "propagate_down: true", [(1, 6), (1, 6)])


# ---- HingeLoss ------------------------------------------------------------------------------------


def hinge_reference(x, labels, squared):
    n = x.shape[0]
    flat = x.reshape(n, -1).astype(np.float64)
    total, grad = 0.0, np.zeros_like(flat)
    for i in range(n):
        label = math.trunc(float(labels.ravel()[i]))
        for j in range(flat.shape[1]):
            sign = -1.0 if j == label else 1.0
            margin = max(0.0, 1.0 + sign * flat[i, j])
            total += margin ** 2 if squared else margin
            slope = 2 * margin if squared else float(margin > 0)
            grad[i, j] = sign * slope / n
    return total / n, grad.reshape(x.shape)


@pytest.mark.parametrize("norm", ["L1", "L2"])
def test_hinge_loss_matches_the_reference(norm):
    r = rng(6)
    x = r.randn(5, 2, 2).astype(np.float32)
    x[0, 0, 0] = -1.0  # a tie: 1 + x = 0 (Caffe's sign(0) = 0)
    labels = r.randint(0, 4, size=5).astype(np.float32) + 0.5  # truncated towards zero
    labels[1] = 3.0
    x[1, 1, 1] = 1.0  # a tie at the label: 1 - x = 0
    layer = make(f'type: "HingeLoss" bottom: "x" bottom: "l" hinge_loss_param {{ norm: {norm} }}',
                 [x.shape, labels.shape])
    loss, (grad,) = loss_and_grads(layer, x, labels, seed=3.0)
    want, want_grad = hinge_reference(x, labels, norm == "L2")
    assert loss == pytest.approx(want, rel=1e-5)
    np.testing.assert_allclose(grad, 3.0 * want_grad, rtol=1e-5, atol=1e-7)
    assert grad[0, 0, 0] == 0.0 and grad[1, 1, 1] == 0.0


def test_hinge_loss_reads_the_first_n_label_values_in_memory_order():
    x = rng(7).randn(2, 3).astype(np.float32)
    labels = np.array([[2.0, 0.0], [1.0, 1.0]], dtype=np.float32)  # samples 0, 1 read 2 and 0
    layer = make('type: "HingeLoss" bottom: "x" bottom: "l"', [x.shape, labels.shape])
    loss, _ = loss_and_grads(layer, x, labels)
    assert loss == pytest.approx(hinge_reference(x, np.array([2.0, 0.0]), False)[0], rel=1e-6)


def test_hinge_loss_errors():
    layer = make('type: "HingeLoss" bottom: "x" bottom: "l"', [(2, 3), (2,)])
    with pytest.raises(LayerError, match=r"label 3 at position \(1,\).*outside \[0, 3\)"):
        layer(torch.zeros(2, 3), torch.tensor([0.0, 3.0]))
    with pytest.raises(LayerError, match="holds 0 values for 2 samples"):
        make('type: "HingeLoss" bottom: "x" bottom: "l"', [(2, 3), (2, 0)])
    with pytest.raises(LayerError, match="dims from axis 0 on are > 0"):
        make('type: "HingeLoss" bottom: "x" bottom: "l"', [(0, 3), (0,)])
    with pytest.raises(LayerError, match="cannot back-propagate to bottom 1"):
        make('type: "HingeLoss" bottom: "x" bottom: "l" propagate_down: false propagate_down: true',
             [(2, 3), (2,)])


# ---- InfogainLoss ---------------------------------------------------------------------------------


def infogain_reference(scores, labels, h, axis, ignore, mode):
    """Caffe's loss -sum_l H[y, l] log max(p_l, 1e-20) and its gradient p * rowsum(H)[y] - H[y]."""
    moved = np.moveaxis(scores.astype(np.float64), axis, -1)
    classes = moved.shape[-1]
    flat = moved.reshape(-1, classes)
    p = np.exp(flat - flat.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    h = h.reshape(classes, classes).astype(np.float64)
    total, valid, grad = 0.0, 0, np.zeros_like(flat)
    for k, value in enumerate(labels.ravel()):
        label = math.trunc(float(value))
        if ignore is not None and label == ignore:
            continue
        total -= sum(h[label, c] * math.log(max(p[k, c], THRESHOLD)) for c in range(classes))
        grad[k] = p[k] * h[label].sum() - h[label]
        valid += 1
    outer = int(np.prod(scores.shape[:axis]))
    scale = normaliser(mode, valid, outer, flat.shape[0] // outer)
    grad = np.moveaxis(grad.reshape(moved.shape), -1, axis)
    return total / scale, grad / scale


def infogain_problem(seed: int, shape=(2, 4, 3, 2), axis=1, ignore=None):
    r = rng(seed)
    scores = r.randn(*shape).astype(np.float32) * 2
    classes = shape[axis]
    label_shape = shape[:axis] + (1,) + shape[axis + 1:] if axis == 1 else shape[:axis]
    labels = r.randint(0, classes, size=label_shape).astype(np.float32)
    if ignore is not None:
        labels[r.rand(*labels.shape) < 0.3] = ignore
    h = r.rand(classes, classes).astype(np.float32) + np.eye(classes, dtype=np.float32)
    return scores, labels, h


def write_blob(path, array, legacy=False):
    blob = array_to_blob(array)
    if legacy:  # Caffe's old encoding: num/channels/height/width
        blob.ClearField("shape")
        blob.num, blob.channels, (blob.height, blob.width) = 1, 1, array.shape
    path.write_bytes(blob.SerializeToString())
    return path


def infogain_text(loss_param: str = "", extra: str = "", source=None) -> str:
    infogain = f'infogain_loss_param {{ source: "{source}" }}' if source else ""
    return f'type: "InfogainLoss" bottom: "s" bottom: "l" {extra} {infogain} loss_param {{ {loss_param} }}'


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("legacy", [False, True])
def test_infogain_loss_with_h_from_a_binaryproto_file(tmp_path, mode, legacy):
    scores, labels, h = infogain_problem(8, ignore=255)
    source = write_blob(tmp_path / "h.binaryproto", h, legacy)
    layer = make(infogain_text(f"ignore_label: 255 normalization: {mode}", source=source),
                 [scores.shape, labels.shape])
    assert layer.top_shapes == [()] and layer.loss_weights == [1.0]
    loss, (grad,) = loss_and_grads(layer, scores, labels, seed=0.5)
    want, want_grad = infogain_reference(scores, labels, h, 1, 255, mode)
    assert loss == pytest.approx(want, rel=1e-5)
    np.testing.assert_allclose(grad, 0.5 * want_grad, rtol=1e-4, atol=1e-7)


def test_infogain_loss_with_h_from_a_bottom_along_the_last_axis():
    scores, labels, h = infogain_problem(9, shape=(3, 2, 5), axis=2)
    text = 'type: "InfogainLoss" bottom: "s" bottom: "l" bottom: "h" infogain_loss_param { axis: -1 }'
    layer = make(text, [scores.shape, labels.shape, (1, 25)])
    assert layer.no_gradient_bottoms == (1, 2)
    s, lab, hs = tensors(scores, labels, h.reshape(1, 25), grad=(0, 2))
    layer(s, lab, hs)[0].backward()
    want, want_grad = infogain_reference(scores, labels, h, 2, None, "VALID")
    assert layer(s, lab, hs)[0].item() == pytest.approx(want, rel=1e-5)
    np.testing.assert_allclose(s.grad.numpy(), want_grad, rtol=1e-4, atol=1e-7)
    assert hs.grad is None  # Caffe never back-propagates into H


def test_infogain_loss_clamps_the_log_in_the_value_only():
    scores = np.zeros((1, 3), dtype=np.float32)
    scores[0, 0] = 120.0  # p_1 = p_2 = exp(-120) < 1e-20
    h = np.array([[0, 1, 2], [0, 0, 0], [0, 0, 0]], dtype=np.float32)
    layer = make('type: "InfogainLoss" bottom: "s" bottom: "l" bottom: "h"', [(1, 3), (1,), (3, 3)])
    loss, (grad,) = loss_and_grads(layer, scores, np.zeros(1, np.float32), h)
    assert loss == pytest.approx(-3 * math.log(THRESHOLD), rel=1e-6)
    np.testing.assert_allclose(grad, [[3.0, -1.0, -2.0]], rtol=1e-6)  # p * rowsum(H) - H, unclamped


def test_infogain_loss_gradcheck_and_second_top():
    scores, labels, h = infogain_problem(10, ignore=255)
    layer = make(infogain_text("ignore_label: 255", extra='bottom: "h" top: "loss" top: "prob"'),
                 [scores.shape, labels.shape, h.shape])
    assert layer.top_shapes == [(), scores.shape] and layer.loss_weights == [1.0, 0.0]
    s = torch.tensor(scores, dtype=torch.float64, requires_grad=True)
    label_t, h_t = torch.tensor(labels), torch.tensor(h, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda v: layer(v, label_t, h_t)[0], (s,))
    _, prob = layer(s, label_t, h_t)
    assert not prob.requires_grad
    np.testing.assert_allclose(prob.numpy(), torch.softmax(s.detach(), 1).numpy(), rtol=1e-12)


def test_infogain_loss_errors(tmp_path):
    shapes = [(2, 3, 2), (2, 1, 2)]
    with pytest.raises(LayerError, match=r"infogain_loss_param.source.*or a third bottom"):
        make(infogain_text(), shapes)
    with pytest.raises(LayerError, match=r"nothere.binaryproto: cannot read"):
        make(infogain_text(source=tmp_path / "nothere.binaryproto"), shapes)
    (tmp_path / "junk").write_bytes(b"\xff\xff\xff\xff")
    with pytest.raises(LayerError, match="not a BlobProto"):
        make(infogain_text(source=tmp_path / "junk"), shapes)
    source = write_blob(tmp_path / "h4.binaryproto", np.eye(2, dtype=np.float32))
    with pytest.raises(LayerError, match=r"has 4 values; 3 classes need 3 x 3 = 9"):
        make(infogain_text(source=source), shapes)
    with pytest.raises(LayerError, match=r"\(bottom 2\) has 8 values"):
        make(infogain_text(extra='bottom: "h"'), shapes + [(2, 4)])
    with pytest.raises(LayerError, match="normalize is deprecated"):
        make(infogain_text("normalize: true", extra='bottom: "h"'), shapes + [(3, 3)])
    with pytest.raises(LayerError, match=r"label bottom \(2, 1, 3\) has 6 values.*make 4"):
        make(infogain_text(extra='bottom: "h"'), [(2, 3, 2), (2, 1, 3), (3, 3)])
    with pytest.raises(LayerError, match="cannot back-propagate to bottom 2"):
        make(infogain_text(extra='bottom: "h" propagate_down: true propagate_down: false propagate_down: true'),
             shapes + [(3, 3)])
    layer = make(infogain_text(extra='bottom: "h"'), shapes + [(3, 3)])
    with pytest.raises(LayerError, match=r"label 3 at position .* outside \[0, 3\)"):
        layer(torch.zeros(2, 3, 2), torch.full((2, 1, 2), 3.0), torch.eye(3))


# ---- ContrastiveLoss ------------------------------------------------------------------------------


def contrastive_reference(a, b, y, margin, legacy):
    """Caffe's loss and its backward for bottom a (bottom b's is the negative)."""
    n = a.shape[0]
    diff = (a.astype(np.float64) - b).reshape(n, -1)
    total, grad = 0.0, np.zeros_like(diff)
    for i in range(n):
        d2 = float(diff[i] @ diff[i])
        if math.trunc(float(y.ravel()[i])) != 0:
            total += d2
            grad[i] = diff[i] / n
        elif legacy:
            total += max(margin - d2, 0.0)
            grad[i] = -diff[i] / n if margin - d2 > 0 else 0.0
        else:
            d = math.sqrt(d2)
            total += max(margin - d, 0.0) ** 2
            grad[i] = -(margin - d) / (d + 1e-4) * diff[i] / n if margin - d > 0 else 0.0
    return total / (2 * n), grad.reshape(a.shape)


@pytest.mark.parametrize("legacy", [False, True])
def test_contrastive_loss_matches_caffes_value_and_gradient(legacy):
    r = rng(11)
    a = r.randn(8, 3, 1, 1).astype(np.float32) * 0.7
    b = r.randn(8, 3, 1, 1).astype(np.float32) * 0.7
    b[0] = a[0]  # an identical dissimilar pair: Caffe's gradient is 0, not NaN
    y = np.array([0, 1, 0, 0.7, -1, 0, 1, 0], dtype=np.float32).reshape(8, 1, 1, 1)  # 0.7 -> 0, -1 -> similar
    text = (f'type: "ContrastiveLoss" bottom: "a" bottom: "b" bottom: "y" contrastive_loss_param {{ '
            f"margin: 1.5 legacy_version: {str(legacy).lower()} }}")
    layer = make(text, [a.shape, b.shape, y.shape])
    assert layer.no_gradient_bottoms == (2,)
    loss, (grad_a, grad_b) = loss_and_grads(layer, a, b, y, grad=(0, 1), seed=2.0)
    want, want_grad = contrastive_reference(a, b, y, 1.5, legacy)
    assert loss == pytest.approx(want, rel=1e-5)
    np.testing.assert_allclose(grad_a, 2.0 * want_grad, rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(grad_b, -2.0 * want_grad, rtol=1e-4, atol=1e-7)
    assert not grad_a[0].any()


def test_contrastive_loss_legacy_gradcheck_and_the_damped_non_legacy_gradient():
    r = rng(12)
    a, b = r.randn(4, 3), r.randn(4, 3)
    b[1] = a[1] + 0.005  # a close dissimilar pair: d / (d + 1e-4) is 0.99 there
    y = np.array([1.0, 0.0, 0.0, 1.0])
    shapes = [a.shape, b.shape, (4, 1)]
    legacy = make('type: "ContrastiveLoss" bottom: "a" bottom: "b" bottom: "y" contrastive_loss_param { '
                  "margin: 4 legacy_version: true }", shapes)
    xs = tensors(a, b, grad=(0, 1), dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda u, v: legacy(u, v, torch.tensor(y).reshape(4, 1))[0], xs)
    current = make('type: "ContrastiveLoss" bottom: "a" bottom: "b" bottom: "y" contrastive_loss_param { '
                   "margin: 4 }", shapes)
    # Caffe's non-legacy backward divides by d + 1e-4: not the true derivative
    assert not torch.autograd.gradcheck(lambda u, v: current(u, v, torch.tensor(y).reshape(4, 1))[0], xs,
                                        raise_exception=False)


@pytest.mark.parametrize("shapes, message", [
    ([(2, 3, 1, 1), (2, 4, 1, 1), (2, 1, 1, 1)], "same C"),
    ([(2, 3, 2, 1), (2, 3, 2, 1), (2, 1, 1, 1)], r"\(N, C, 1, 1\)"),
    ([(2, 3), (2, 3), (2, 2)], r"\(M, 1, 1, 1\)"),
    ([(2, 3), (2, 3), (1,)], "M >= 2"),
    ([(2, 3), (3, 3), (3,)], "same first dimension"),
])
def test_contrastive_loss_shape_errors(shapes, message):
    with pytest.raises(LayerError, match=message):
        make('type: "ContrastiveLoss" bottom: "a" bottom: "b" bottom: "y"', shapes)


# ---- MultinomialLogisticLoss ----------------------------------------------------------------------


def multinomial_reference(p, labels):
    n = p.shape[0]
    flat = p.reshape(n, -1).astype(np.float64)
    total, grad = 0.0, np.zeros_like(flat)
    for i in range(n):
        label = math.trunc(float(labels.ravel()[i]))
        clamped = max(flat[i, label], THRESHOLD)
        total -= math.log(clamped)
        grad[i, label] = -1.0 / (n * clamped)
    return total / n, grad.reshape(p.shape)


def test_multinomial_logistic_loss_matches_caffe_also_below_the_threshold():
    r = rng(13)
    p = r.dirichlet(np.ones(6), size=4).astype(np.float32).reshape(4, 6, 1, 1)
    labels = r.randint(0, 6, size=(4, 1, 1, 1)).astype(np.float32)
    p[2, int(labels[2, 0, 0, 0])] = 1e-30  # clamped at 1e-20 in the value; gradient -1 / (N 1e-20)
    layer = make('type: "MultinomialLogisticLoss" bottom: "p" bottom: "l"', [p.shape, labels.shape])
    loss, (grad,) = loss_and_grads(layer, p, labels, seed=0.5)
    want, want_grad = multinomial_reference(p, labels)
    assert loss == pytest.approx(want, rel=1e-5)
    np.testing.assert_allclose(grad, 0.5 * want_grad, rtol=1e-5)
    assert grad[2].min() == pytest.approx(-0.5 / (4 * THRESHOLD), rel=1e-6)


def test_multinomial_logistic_loss_gradcheck_and_errors():
    p = rng(14).dirichlet(np.ones(3), size=3) + 0.1
    labels = np.array([2.0, 0.0, 1.0])
    layer = make('type: "MultinomialLogisticLoss" bottom: "p" bottom: "l"', [p.shape, labels.shape])
    ps = torch.tensor(p, requires_grad=True)
    assert torch.autograd.gradcheck(lambda v: layer(v, torch.tensor(labels))[0], (ps,))
    with pytest.raises(LayerError, match=r"label 3 at position \(1,\)"):
        layer(ps, torch.tensor([0.0, 3.0, 1.0]))
    with pytest.raises(LayerError, match=r"label bottom \(3, 2\) must be \(N, 1, 1, 1\)"):
        make('type: "MultinomialLogisticLoss" bottom: "p" bottom: "l"', [(3, 3), (3, 2)])
    with pytest.raises(LayerError, match="cannot back-propagate to bottom 1"):
        make('type: "MultinomialLogisticLoss" bottom: "p" bottom: "l" propagate_down: true '
             "propagate_down: true", [(3, 3), (3,)])


# ---- in a net: loss weights, propagate_down, label bottoms ----------------------------------------


def net_of(inputs: dict, layer: str) -> Net:
    head = 'name: "t" force_backward: true ' + " ".join(
        f'input: "{name}" input_shape {{ {" ".join(f"dim: {d}" for d in value.shape)} }}'
        for name, value in inputs.items())
    bottoms = " ".join(f'bottom: "{name}"' for name in inputs)
    text = f'{head} layer {{ name: "loss" {bottoms} top: "loss" {layer} }}'
    return Net(text_format.Parse(text, caffe_pb2.NetParameter()), caffe_pb2.TRAIN, source="test.prototxt")


def net_gradients(inputs: dict, layer: str) -> tuple[float, float, dict]:
    """(objective, loss top, gradient of every input) of a net holding one loss layer."""
    net = net_of(inputs, layer)
    objective = net.forward({k: torch.tensor(v) for k, v in inputs.items()})
    objective.backward()
    grads = {name: net.blob_diff(name).numpy() for name in inputs}
    return objective.item(), net.blob_data["loss"].item(), grads


def infogain_inputs(tmp_path):
    scores, labels, h = infogain_problem(15, ignore=255)
    source = write_blob(tmp_path / "h.binaryproto", h)
    want, want_grad = infogain_reference(scores, labels, h, 1, 255, "VALID")
    return ({"s": scores, "l": labels},
            f'type: "InfogainLoss" infogain_loss_param {{ source: "{source}" }} loss_param {{ ignore_label: 255 }}',
            want, {"s": want_grad})


def sigmoid_inputs(tmp_path):
    x, t = sigmoid_problem(16, None)
    want, want_grad = sigmoid_ce_reference(x, t, None, "BATCH_SIZE")
    return {"x": x, "t": t}, 'type: "SigmoidCrossEntropyLoss"', want, {"x": want_grad}


def euclidean_inputs(tmp_path):
    a, b = rng(17).randn(3, 4).astype(np.float32), rng(18).randn(3, 4).astype(np.float32)
    want, grad_a, grad_b = euclidean_reference(a, b)
    return {"a": a, "b": b}, 'type: "EuclideanLoss"', want, {"a": grad_a, "b": grad_b}


def hinge_inputs(tmp_path):
    x, labels = rng(19).randn(4, 3).astype(np.float32), np.array([0, 2, 1, 1], dtype=np.float32)
    want, want_grad = hinge_reference(x, labels, False)
    return {"x": x, "l": labels}, 'type: "HingeLoss"', want, {"x": want_grad}


def contrastive_inputs(tmp_path):
    a, b = rng(20).randn(4, 2).astype(np.float32), rng(21).randn(4, 2).astype(np.float32)
    y = np.array([1, 0, 0, 1], dtype=np.float32).reshape(4, 1)
    want, grad_a = contrastive_reference(a, b, y, 3.0, False)
    return ({"a": a, "b": b, "y": y}, 'type: "ContrastiveLoss" contrastive_loss_param { margin: 3 }', want,
            {"a": grad_a, "b": -grad_a})


def multinomial_inputs(tmp_path):
    p = rng(22).dirichlet(np.ones(3), size=4).astype(np.float32)
    labels = np.array([0, 2, 1, 1], dtype=np.float32)
    want, want_grad = multinomial_reference(p, labels)
    return {"p": p, "l": labels}, 'type: "MultinomialLogisticLoss"', want, {"p": want_grad}


CASES = [euclidean_inputs, sigmoid_inputs, hinge_inputs, infogain_inputs, contrastive_inputs, multinomial_inputs]


@pytest.mark.parametrize("case", CASES, ids=lambda case: case.__name__)
@pytest.mark.parametrize("weight", [None, 2.5])
def test_in_a_net_the_loss_weight_scales_the_gradient_and_labels_get_none(tmp_path, case, weight):
    inputs, layer, want, want_grads = case(tmp_path)
    text = layer if weight is None else f"{layer} loss_weight: {weight}"
    objective, loss, grads = net_gradients(inputs, text)
    scale = 1.0 if weight is None else weight  # every BVLC loss layer defaults to loss weight 1
    assert loss == pytest.approx(want, rel=1e-5)
    assert objective == pytest.approx(scale * want, rel=1e-5)
    for name, grad in grads.items():
        np.testing.assert_allclose(grad, scale * want_grads.get(name, 0.0), rtol=1e-4, atol=1e-7)


def test_in_a_net_propagate_down_selects_the_euclidean_bottoms(tmp_path):
    inputs, layer, _, want_grads = euclidean_inputs(tmp_path)
    _, _, grads = net_gradients(inputs, f"{layer} propagate_down: false propagate_down: true")
    assert not grads["a"].any()
    np.testing.assert_allclose(grads["b"], want_grads["b"], rtol=1e-4, atol=1e-7)


def test_in_a_net_asking_for_a_label_gradient_is_an_error(tmp_path):
    inputs, layer, _, _ = hinge_inputs(tmp_path)
    with pytest.raises(NetError, match=r"test.prototxt: layer 'loss' \(type HingeLoss\).*cannot back-propagate"):
        net_of(inputs, f"{layer} propagate_down: true propagate_down: true")
