"""SoftmaxWithLoss, Accuracy and SegAccuracy against numpy references written from the spec, finite
differences and the golden outputs of the original Caffe."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from google.protobuf import text_format

from rloss.errors import LayerError
from rloss.layers import layer_class
from rloss.proto import caffe_pb2
from tests.shared_data import shared_path

FLT_MIN = np.finfo(np.float32).tiny


def make(text: str, shapes, phase=caffe_pb2.TRAIN):
    param = text_format.Parse(text, caffe_pb2.LayerParameter())
    return layer_class(param.type)(param, shapes, phase)


def softmax_loss_text(loss_param: str = "", extra: str = "") -> str:
    return (f'name: "loss" type: "SoftmaxWithLoss" bottom: "s" bottom: "l" {extra} '
            f"loss_param {{ {loss_param} }}")


def random_problem(seed: int, shape=(2, 4, 3, 5), ignore_fraction=0.3):
    rng = np.random.RandomState(seed)
    scores = rng.randn(*shape).astype(np.float32) * 2
    n, c, h, w = shape
    labels = rng.randint(0, c, size=(n, 1, h, w)).astype(np.float32)
    labels[rng.rand(*labels.shape) < ignore_fraction] = 255
    return scores, labels


def reference_softmax_loss(scores, labels, ignore, mode):
    """Spec 2.8 location by location: (loss, d loss / d scores)."""
    n, c, h, w = scores.shape
    s = scores.astype(np.float64)
    p = np.exp(s - s.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    total, counted = 0.0, 0
    grad = np.zeros_like(s)
    for i, y, x in np.ndindex(n, h, w):
        label = math.trunc(float(labels[i, 0, y, x]))
        if ignore is not None and label == ignore:
            continue
        total -= math.log(max(p[i, label, y, x], FLT_MIN))
        counted += 1
        grad[i, :, y, x] = p[i, :, y, x]
        grad[i, label, y, x] -= 1
    normaliser = {"VALID": counted, "FULL": n * h * w, "BATCH_SIZE": n, "NONE": 1}[mode]
    normaliser = max(1, normaliser)
    return total / normaliser, grad / normaliser


def run_loss(layer, scores, labels, seed_weight=None):
    s = torch.tensor(scores, requires_grad=True)
    tops = layer(s, torch.tensor(labels))
    weight = layer.loss_weights[0] if seed_weight is None else seed_weight
    tops[0].backward(torch.tensor(weight, dtype=tops[0].dtype))
    return tops, s.grad.numpy()


# ---- SoftmaxWithLoss -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "loss_param, ignore, mode",
    [
        ("ignore_label: 255", 255, "VALID"),
        ("ignore_label: 255 normalization: VALID", 255, "VALID"),
        ("ignore_label: 255 normalization: FULL", 255, "FULL"),
        ("ignore_label: 255 normalization: BATCH_SIZE", 255, "BATCH_SIZE"),
        ("ignore_label: 255 normalization: NONE", 255, "NONE"),
        ("ignore_label: 255 normalize: true", 255, "VALID"),
        ("ignore_label: 255 normalize: false", 255, "BATCH_SIZE"),
        ("ignore_label: 255 normalize: false normalization: FULL", 255, "FULL"),
        ("", None, "VALID"),
    ],
)
def test_softmax_loss_matches_the_reference(loss_param, ignore, mode):
    scores, labels = random_problem(3, ignore_fraction=0.3 if ignore is not None else 0.0)
    layer = make(softmax_loss_text(loss_param), [scores.shape, labels.shape])
    (loss,), grad = run_loss(layer, scores, labels)
    want_loss, want_grad = reference_softmax_loss(scores, labels, ignore, mode)
    assert loss.shape == ()
    assert loss.item() == pytest.approx(want_loss, rel=1e-5)
    np.testing.assert_allclose(grad, want_grad, rtol=1e-4, atol=1e-7)


def test_softmax_loss_full_and_valid_differ_by_the_ignored_count():
    scores, labels = random_problem(4)
    shapes = [scores.shape, labels.shape]
    inputs = torch.tensor(scores), torch.tensor(labels)
    valid = make(softmax_loss_text("ignore_label: 255"), shapes)(*inputs)[0]
    full = make(softmax_loss_text("ignore_label: 255 normalization: FULL"), shapes)(*inputs)[0]
    counted = int((labels != 255).sum())
    assert 0 < counted < labels.size
    assert full.item() * labels.size == pytest.approx(valid.item() * counted, rel=1e-5)


def test_softmax_loss_all_ignored_gives_zero_loss_and_gradient():
    scores, labels = random_problem(5)
    labels[:] = 255
    layer = make(softmax_loss_text("ignore_label: 255"), [scores.shape, labels.shape])
    (loss,), grad = run_loss(layer, scores, labels)
    assert loss.item() == 0.0
    assert not np.any(grad)


def test_softmax_loss_truncates_float_labels():
    scores, labels = random_problem(6, ignore_fraction=0.0)
    shifted = labels + 0.75  # 2.75 -> 2, ...
    layer = make(softmax_loss_text(), [scores.shape, labels.shape])
    assert layer(torch.tensor(scores), torch.tensor(shifted))[0].item() == pytest.approx(
        layer(torch.tensor(scores), torch.tensor(labels))[0].item(), rel=1e-6)


def test_softmax_loss_clamps_the_probability_at_flt_min_but_not_the_gradient():
    scores = np.zeros((1, 2, 1, 2), dtype=np.float32)
    scores[0, 1, 0, :] = 200.0  # p(class 0) = exp(-200) underflows float32
    labels = np.zeros((1, 1, 1, 2), dtype=np.float32)
    layer = make(softmax_loss_text(), [scores.shape, labels.shape])
    (loss,), grad = run_loss(layer, scores, labels)
    assert loss.item() == pytest.approx(-math.log(FLT_MIN), rel=1e-6)  # 87.3365 per location
    np.testing.assert_allclose(grad[0, :, 0, 0], [-0.5, 0.5], atol=1e-7)  # (p - onehot) / 2


def test_softmax_loss_along_another_axis():
    rng = np.random.RandomState(7)
    scores = rng.randn(2, 3, 4, 5).astype(np.float32)  # classes on the last axis
    labels = rng.randint(0, 5, size=(2, 3, 4)).astype(np.float32)
    layer = make(softmax_loss_text(extra="softmax_param { axis: -1 }"), [scores.shape, labels.shape])
    (loss,), grad = run_loss(layer, scores, labels)
    moved = np.moveaxis(scores, 3, 1)
    want_loss, want_grad = reference_softmax_loss(moved, labels.reshape(2, 1, 3, 4), None, "VALID")
    assert loss.item() == pytest.approx(want_loss, rel=1e-5)
    np.testing.assert_allclose(grad, np.moveaxis(want_grad, 1, 3), rtol=1e-4, atol=1e-7)


def test_softmax_loss_gradcheck():
    scores, labels = random_problem(8, shape=(2, 3, 2, 3))
    layer = make(softmax_loss_text("ignore_label: 255"), [scores.shape, labels.shape])
    s = torch.tensor(scores, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: layer(x, torch.tensor(labels))[0], (s,))


def test_softmax_loss_second_top_is_the_detached_probabilities():
    scores, labels = random_problem(9)
    text = softmax_loss_text("ignore_label: 255", extra='top: "loss" top: "prob"')
    layer = make(text, [scores.shape, labels.shape])
    assert layer.top_shapes == [(), scores.shape]
    assert layer.loss_weights == [1.0, 0.0]
    s = torch.tensor(scores, requires_grad=True)
    loss, prob = layer(s, torch.tensor(labels))
    np.testing.assert_allclose(prob.numpy(), torch.softmax(torch.tensor(scores), 1).numpy(), rtol=1e-6)
    assert not prob.requires_grad


def test_softmax_loss_declares_its_automatic_top_and_loss_weight():
    layer = make(softmax_loss_text(), [(2, 3, 4, 4), (2, 1, 4, 4)])
    assert layer.num_tops == 1
    assert layer.loss_weights == [1.0]
    assert layer.no_gradient_bottoms == (1,)


@pytest.mark.parametrize("bad", [4.0, -1.0, 254.0])
def test_softmax_loss_rejects_labels_outside_the_classes(bad):
    scores, labels = random_problem(10)
    labels[1, 0, 2, 3] = bad
    layer = make(softmax_loss_text("ignore_label: 255"), [scores.shape, labels.shape])
    with pytest.raises(LayerError, match=rf"'loss' \(type SoftmaxWithLoss\).*label {int(bad)} at position "
                                         rf"\(1, 0, 2, 3\).*outside \[0, 4\)"):
        layer(torch.tensor(scores), torch.tensor(labels))


def test_softmax_loss_rejects_a_label_count_mismatch():
    with pytest.raises(LayerError, match=r"label bottom \(2, 1, 3, 4\) has 24 values.*\(2, 4, 3, 5\) "
                                         r"make 30"):
        make(softmax_loss_text(), [(2, 4, 3, 5), (2, 1, 3, 4)])


def test_softmax_loss_rejects_a_bad_axis_and_bottom_count():
    with pytest.raises(LayerError, match="axis 4 is out of range"):
        make(softmax_loss_text(extra="softmax_param { axis: 4 }"), [(2, 4, 3, 5), (2, 1, 3, 5)])
    with pytest.raises(LayerError, match="needs 2 bottoms"):
        make('name: "loss" type: "SoftmaxWithLoss" bottom: "s"', [(2, 4, 3, 5)])


def test_softmax_loss_golden_ignore255():
    folder = shared_path("golden", "01_layers", "softmax_loss_ignore255")
    net = text_format.Parse((folder / "net.prototxt").read_text(), caffe_pb2.NetParameter())
    labels = np.load(folder / "in_label.npy")
    for param, score_name in zip(net.layer, ["score", "score2"]):
        scores = np.load(folder / f"in_{score_name}.npy")
        layer = layer_class(param.type)(param, [scores.shape, labels.shape], caffe_pb2.TRAIN)
        (loss,), grad = run_loss(layer, scores, labels)
        want = np.load(folder / f"out_{param.top[0]}.npy")
        assert abs(loss.item() - float(want)) <= 1e-4 * abs(float(want))
        want_grad = np.load(folder / f"diff_{score_name}.npy")
        assert np.abs(grad - want_grad).max() <= 1e-4 * np.abs(want_grad).max()
    assert [layer_param.loss_weight[0] for layer_param in net.layer] == [1.0, 3.0]


# ---- Accuracy ------------------------------------------------------------------------------------


def reference_accuracy(scores, labels, top_k, ignore):
    n, c, h, w = scores.shape
    hits, counts = np.zeros(c), np.zeros(c)
    for i, y, x in np.ndindex(n, h, w):
        label = math.trunc(float(labels[i, 0, y, x]))
        if ignore is not None and label == ignore:
            continue
        ranked = sorted(((scores[i, k, y, x], k) for k in range(c)), reverse=True)
        counts[label] += 1
        hits[label] += label in [k for _, k in ranked[:top_k]]
    total = hits.sum() / counts.sum() if counts.sum() else 0.0
    return total, np.where(counts > 0, hits / np.maximum(counts, 1), 0.0)


@pytest.mark.parametrize("top_k, ignore", [(1, None), (1, 255), (2, 255), (4, None)])
def test_accuracy_matches_the_reference(top_k, ignore):
    rng = np.random.RandomState(11)
    scores = rng.randint(0, 3, size=(2, 4, 3, 5)).astype(np.float32)  # many ties
    labels = rng.randint(0, 4, size=(2, 1, 3, 5)).astype(np.float32)
    if ignore is not None:
        labels[rng.rand(*labels.shape) < 0.3] = ignore
    ignore_text = f"ignore_label: {ignore}" if ignore is not None else ""
    layer = make(f'name: "acc" type: "Accuracy" bottom: "s" bottom: "l" top: "a" top: "per_class" '
                 f"accuracy_param {{ top_k: {top_k} {ignore_text} }}", [scores.shape, labels.shape])
    assert layer.top_shapes == [(), (4,)]
    total, per_class = layer(torch.tensor(scores), torch.tensor(labels))
    want_total, want_per_class = reference_accuracy(scores, labels, top_k, ignore)
    assert total.item() == pytest.approx(want_total, rel=1e-6)
    np.testing.assert_allclose(per_class.numpy(), want_per_class, rtol=1e-6)


def test_accuracy_with_nothing_counted_is_zero():
    layer = make('name: "acc" type: "Accuracy" bottom: "s" bottom: "l" top: "a" '
                 "accuracy_param { ignore_label: 255 }", [(1, 3, 2, 2), (1, 1, 2, 2)])
    assert layer(torch.randn(1, 3, 2, 2), torch.full((1, 1, 2, 2), 255.0))[0].item() == 0.0


def test_accuracy_rejects_top_k_above_the_class_count_and_bad_labels():
    with pytest.raises(LayerError, match=r"'acc' \(type Accuracy\): top_k 4 must be in \[1, 3\]"):
        make('name: "acc" type: "Accuracy" bottom: "s" bottom: "l" top: "a" accuracy_param { top_k: 4 }',
             [(1, 3, 2, 2), (1, 1, 2, 2)])
    layer = make('name: "acc" type: "Accuracy" bottom: "s" bottom: "l" top: "a"',
                 [(1, 3, 2, 2), (1, 1, 2, 2)])
    with pytest.raises(LayerError, match="label 3 at position"):
        layer(torch.randn(1, 3, 2, 2), torch.full((1, 1, 2, 2), 3.0))


# ---- SegAccuracy ---------------------------------------------------------------------------------


def seg_accuracy_text(params: str = "ignore_label: 255") -> str:
    return (f'name: "accuracy" type: "SegAccuracy" bottom: "s" bottom: "l" top: "a" '
            f"seg_accuracy_param {{ {params} }}")


def brute_seg_confusion(scores, labels, ignore: set[int]) -> np.ndarray:
    n, c, h, w = scores.shape
    matrix = np.zeros((c, c), dtype=np.int64)
    for i, y, x in np.ndindex(n, h, w):
        label = math.trunc(float(labels[i, 0, y, x]))
        if label in ignore:
            continue
        prediction = sorted(((scores[i, k, y, x], k) for k in range(c)), reverse=True)[0][1]
        matrix[label, prediction] += 1
    return matrix


def spec_seg_values(matrix: np.ndarray) -> np.ndarray:
    """Spec 2.9 outputs computed directly from the matrix."""
    total = matrix.sum()
    pixel = np.trace(matrix) / total if total else 0.0
    recalls = [matrix[c, c] / matrix[c].sum() for c in range(len(matrix)) if matrix[c].sum() > 0]
    ious = []
    for c in range(len(matrix)):
        union = matrix[c].sum() + matrix[:, c].sum() - matrix[c, c]
        ious.append(1.0 if union == matrix[c, c] else matrix[c, c] / union)
    return np.array([pixel, np.mean(recalls) if recalls else 0.0, np.mean(ious)])


def seg_problem(seed: int, classes: int = 5):
    rng = np.random.RandomState(seed)
    scores = rng.randint(0, 3, size=(2, classes, 4, 6)).astype(np.float32)  # ties on purpose
    labels = rng.randint(0, classes - 1, size=(2, 1, 4, 6)).astype(np.float32)  # last class never in GT
    labels[rng.rand(*labels.shape) < 0.2] = 255
    labels[rng.rand(*labels.shape) < 0.1] = 254
    return scores, labels


def test_seg_accuracy_matches_brute_force_with_ties_and_an_ignore_set():
    scores, labels = seg_problem(12)
    layer = make(seg_accuracy_text("ignore_label: 255 ignore_label: 254"), [scores.shape, labels.shape])
    assert layer.top_shapes == [(1, 1, 1, 3)]
    (out,) = layer(torch.tensor(scores), torch.tensor(labels))
    matrix = brute_seg_confusion(scores, labels, {255, 254})
    np.testing.assert_array_equal(layer.confusion.numpy(), matrix)
    assert out.shape == (1, 1, 1, 3) and not out.requires_grad
    np.testing.assert_allclose(out.numpy().ravel(), spec_seg_values(matrix), rtol=1e-6)


def test_seg_accuracy_reset_true_forgets_and_reset_false_accumulates():
    first, second = seg_problem(13), seg_problem(14)
    shapes = [first[0].shape, first[1].shape]
    resetting = make(seg_accuracy_text("ignore_label: 255 ignore_label: 254"), shapes)
    keeping = make(seg_accuracy_text("ignore_label: 255 ignore_label: 254 reset: false"), shapes)
    for layer in (resetting, keeping):
        for scores, labels in (first, second):
            (out,) = layer(torch.tensor(scores), torch.tensor(labels))
        layer.last = out.numpy().ravel()
    only_second = brute_seg_confusion(*second, {255, 254})
    both = brute_seg_confusion(*first, {255, 254}) + only_second
    np.testing.assert_allclose(resetting.last, spec_seg_values(only_second), rtol=1e-6)
    np.testing.assert_allclose(keeping.last, spec_seg_values(both), rtol=1e-6)
    keeping.reset_confusion()
    (out,) = keeping(torch.tensor(second[0]), torch.tensor(second[1]))
    np.testing.assert_allclose(out.numpy().ravel(), spec_seg_values(only_second), rtol=1e-6)


def test_seg_accuracy_all_ignored_and_empty_classes():
    scores, labels = seg_problem(15)
    labels[:] = 255
    layer = make(seg_accuracy_text(), [scores.shape, labels.shape])
    (out,) = layer(torch.tensor(scores), torch.tensor(labels))
    np.testing.assert_allclose(out.numpy().ravel(), [0.0, 0.0, 1.0])


def test_seg_accuracy_rejects_labels_outside_the_classes():
    scores, labels = seg_problem(16)
    labels[0, 0, 1, 1] = 254  # not in the ignore set {255}
    layer = make(seg_accuracy_text(), [scores.shape, labels.shape])
    with pytest.raises(LayerError, match=r"'accuracy' \(type SegAccuracy\).*label 254 at position "
                                         r"\(0, 0, 1, 1\)"):
        layer(torch.tensor(scores), torch.tensor(labels))


def test_seg_accuracy_rejects_mismatched_shapes():
    with pytest.raises(LayerError, match=r"labels \(2, 1, 4, 5\) must be \(N, 1, H, W\) for scores "
                                         r"\(2, 5, 4, 6\)"):
        make(seg_accuracy_text(), [(2, 5, 4, 6), (2, 1, 4, 5)])
    with pytest.raises(LayerError, match=r"bottom 1 must have 4 axes"):
        make(seg_accuracy_text(), [(2, 5, 4, 6), (2, 4, 6)])


def test_seg_accuracy_golden():
    folder = shared_path("golden", "01_layers", "seg_accuracy")
    net = text_format.Parse((folder / "net.prototxt").read_text(), caffe_pb2.NetParameter())
    scores, labels = np.load(folder / "in_score.npy"), np.load(folder / "in_label.npy")
    layer = layer_class("SegAccuracy")(net.layer[0], [scores.shape, labels.shape], caffe_pb2.TEST)
    (out,) = layer(torch.tensor(scores), torch.tensor(labels))
    want = np.load(folder / "out_accuracy.npy")
    assert out.shape == want.shape
    assert np.abs(out.numpy() - want).max() <= 1e-4 * np.abs(want).max()
