"""SizeConstraintLoss (Kervadec et al., MIDL 2018 / MedIA 2019): the PyTorch module and the Caffe layer.

References: a numpy float64 brute force of the loss and of its analytic gradient (loops over images and
classes), the brute gradient checked by central finite differences, and the layer against the module
with its bounds and roi built here by hand."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from google.protobuf import text_format

from rloss import SizeConstraintLoss
from rloss.errors import LayerError, RlossError
from rloss.layers.registry import layer_class
from rloss.net import Net
from rloss.proto import caffe_pb2

N, K, H, W = 2, 3, 5, 6


def segmentation(n: int = N, k: int = K, h: int = H, w: int = W, seed: int = 0) -> np.ndarray:
    logits = np.random.RandomState(seed).randn(n, k, h, w)
    e = np.exp(logits - logits.max(axis=1, keepdims=True))
    return (e / e.sum(axis=1, keepdims=True)).astype(np.float32)


def image(n: int = N, h: int = H, w: int = W, seed: int = 1) -> np.ndarray:
    """Mean-subtracted BGR with crop padding (all channels 0) on the last rows of each image."""
    values = np.random.RandomState(seed).uniform(-100, 100, (n, 3, h, w)).astype(np.float32)
    for i in range(n):
        values[i, :, h - 1 - i:] = 0
    return values


def roi_of(picture: np.ndarray) -> np.ndarray:
    return (np.trunc(picture) != 0).any(axis=1).astype(np.float32)


def brute(seg: np.ndarray, roi: np.ndarray, lower: np.ndarray, upper: np.ndarray,
          normalize: bool) -> tuple[float, np.ndarray]:
    """The loss and its analytic gradient in float64, one image and class at a time."""
    seg, roi = seg.astype(np.float64), roi.astype(np.float64)
    n_images, classes = seg.shape[:2]
    loss, grad = 0.0, np.zeros_like(seg)
    for n in range(n_images):
        scale = roi[n].sum() if normalize else 1.0
        for k in range(classes):
            size = (seg[n, k] * roi[n]).sum() / scale
            below, above = max(lower[n, k] - size, 0.0), max(size - upper[n, k], 0.0)
            loss += below ** 2 + above ** 2
            grad[n, k] = 2 * (above - below) * roi[n] / scale
    return loss / n_images, grad / n_images


def sizes(seg: np.ndarray, roi: np.ndarray, normalize: bool) -> np.ndarray:
    total = (seg.astype(np.float64) * roi[:, None]).sum(axis=(2, 3))
    return total / roi.sum(axis=(1, 2))[:, None] if normalize else total


def mixed_bounds(size: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per (image, class), cycling: the lower bound active, the upper bound active, neither."""
    case = np.arange(size.size).reshape(size.shape) % 3
    d = 0.2 * size
    lower = np.choose(case, [size + d, size - 2 * d, size - d])
    upper = np.choose(case, [size + 2 * d, size - d, size + d])
    return lower, upper


def module_loss_and_grad(seg: np.ndarray, roi: np.ndarray, lower, upper, normalize: bool, weight: float = 1.0):
    s = torch.from_numpy(seg).requires_grad_(True)
    loss = SizeConstraintLoss(weight, normalize)(s, torch.from_numpy(roi), torch.as_tensor(lower, dtype=torch.float32),
                                                 torch.as_tensor(upper, dtype=torch.float32))
    loss.backward()
    return loss.detach(), s.grad


# ---- the module: value and gradient ------------------------------------------------------------------
@pytest.mark.parametrize("normalize", [False, True])
def test_value_and_gradient_equal_the_float64_brute_force(normalize: bool) -> None:
    seg, roi = segmentation(), roi_of(image())
    lower, upper = mixed_bounds(sizes(seg, roi, normalize))
    loss, grad = module_loss_and_grad(seg, roi, lower, upper, normalize, weight=0.7)
    expected, expected_grad = brute(seg, roi, lower, upper, normalize)
    assert loss.shape == (1,) and loss.dtype == torch.float32
    assert expected > 0
    assert float(loss) == pytest.approx(0.7 * expected, rel=1e-4)
    np.testing.assert_allclose(grad.numpy(), 0.7 * expected_grad, rtol=1e-4, atol=1e-6 * np.abs(expected_grad).max())
    inactive = (np.arange(N * K).reshape(N, K) % 3) == 2
    assert (grad.numpy()[inactive] == 0).all() and (grad.numpy()[~inactive] != 0).any()


@pytest.mark.parametrize("normalize", [False, True])
def test_brute_force_gradient_equals_finite_differences(normalize: bool) -> None:
    seg, roi = segmentation().astype(np.float64), roi_of(image())
    lower, upper = mixed_bounds(sizes(seg, roi, normalize))
    _, grad = brute(seg, roi, lower, upper, normalize)
    eps, numeric = 1e-6, np.zeros_like(seg)
    for index in np.ndindex(seg.shape):
        step = np.zeros_like(seg)
        step[index] = eps
        numeric[index] = (brute(seg + step, roi, lower, upper, normalize)[0]
                          - brute(seg - step, roi, lower, upper, normalize)[0]) / (2 * eps)
    np.testing.assert_allclose(grad, numeric, rtol=1e-5, atol=1e-9)


@pytest.mark.parametrize("normalize", [False, True])
def test_bounds_that_hold_give_zero_loss_and_gradient(normalize: bool) -> None:
    seg, roi = segmentation(), roi_of(image())
    size = sizes(seg, roi, normalize)
    loss, grad = module_loss_and_grad(seg, roi, 0.9 * size, np.minimum(1.1 * size, 1.0 if normalize else 1e9),
                                      normalize)
    assert float(loss) == 0.0 and (grad == 0).all()


def test_batch_is_the_mean_of_images() -> None:
    seg, roi = segmentation(n=3), roi_of(image(n=3))
    lower, upper = mixed_bounds(sizes(seg, roi, True))
    module = SizeConstraintLoss(2.0, normalize=True)
    t = [torch.from_numpy(a).float() for a in (seg, roi, lower, upper)]
    both = float(module(*t))
    parts = [float(module(*(a[i:i + 1] for a in t))) for i in range(3)]
    assert both == pytest.approx(sum(parts) / 3, rel=1e-6)


def test_per_class_bounds_of_shape_k_apply_to_every_image() -> None:
    seg, roi = torch.from_numpy(segmentation()), torch.ones(N, H, W)
    lower, upper = torch.tensor([0.5, 0.0, 0.1]), torch.tensor([0.6, 0.2, 0.3])
    module = SizeConstraintLoss(1.0, normalize=True)
    assert float(module(seg, roi, lower, upper)) == float(module(seg, roi, lower.expand(N, K), upper.expand(N, K)))


def test_under_bfloat16_autocast_the_loss_is_float32_and_equals_fp32() -> None:
    logits = torch.randn(N, 4, H, W, generator=torch.Generator().manual_seed(3))
    conv = torch.nn.Conv2d(4, K, 1)
    roi = torch.from_numpy(roi_of(image()))
    lower, upper = torch.full((N, K), 0.5), torch.full((N, K), 0.6)
    module = SizeConstraintLoss(1.0, normalize=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        seg = torch.softmax(conv(logits), dim=1).to(torch.bfloat16)
        loss = module(seg, roi, lower, upper)
    assert seg.dtype == torch.bfloat16 and loss.dtype == torch.float32 and loss.shape == (1,)
    loss.backward()
    assert conv.weight.grad is not None and bool(conv.weight.grad.abs().sum() > 0)
    assert float(loss.detach()) == float(module(seg.detach().float(), roi, lower, upper))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_module_on_cuda() -> None:  # pragma: no cover - no GPU on the test machine
    seg, roi = segmentation(), roi_of(image())
    lower, upper = mixed_bounds(sizes(seg, roi, True))
    s = torch.from_numpy(seg).cuda().requires_grad_(True)
    loss = SizeConstraintLoss(1.0, normalize=True)(s, torch.from_numpy(roi).cuda(), torch.from_numpy(lower).cuda(),
                                                   torch.from_numpy(upper).cuda())
    loss.backward()
    assert loss.device == s.device and s.grad.device == s.device and loss.dtype == torch.float32
    expected, expected_grad = brute(seg, roi, lower, upper, True)
    assert float(loss.detach()) == pytest.approx(expected, rel=1e-4)
    np.testing.assert_allclose(s.grad.cpu().numpy(), expected_grad, rtol=1e-4, atol=1e-7)


# ---- the module: bad input ---------------------------------------------------------------------------
def bad(**changes):
    """Valid arguments (pixels), with some replaced."""
    args = {"segmentations": torch.from_numpy(segmentation()), "rois": torch.ones(N, H, W),
            "lower": torch.zeros(N, K), "upper": torch.full((N, K), 5.0)}
    args.update(changes)
    return args


@pytest.mark.parametrize("changes,message", [
    ({"segmentations": torch.zeros(N, K, H)}, r"segmentations must be a non-empty \(N, K, H, W\)"),
    ({"segmentations": torch.zeros(N, 0, H, W)}, "non-empty"),
    ({"rois": torch.ones(N, H, W + 1)}, r"rois must be \(N, H, W\) = \(2, 5, 6\).*\(2, 5, 7\)"),
    ({"lower": torch.zeros(N, K + 1)}, r"lower and upper must be \(N, K\) = \(2, 3\) or \(K,\).*lower \(2, 4\)"),
    ({"upper": torch.ones(N, K, 1, 1)}, r"upper \(2, 3, 1, 1\)"),
    ({"upper": torch.ones(1, K)}, r"upper \(1, 3\)"),
])
def test_module_refuses_bad_shapes(changes, message: str) -> None:
    with pytest.raises(RlossError, match="^SizeConstraintLoss: .*" + message):
        SizeConstraintLoss(1.0)(**bad(**changes))


def with_value(tensor: torch.Tensor, index: tuple[int, ...], value: float) -> torch.Tensor:
    tensor = tensor.clone()
    tensor[index] = value
    return tensor


@pytest.mark.parametrize("name,value,what", [
    ("segmentations", float("nan"), "the segmentations of image 1"),
    ("rois", float("inf"), "the rois of image 1"),
    ("lower", float("nan"), "the lower bounds of image 1"),
    ("upper", float("inf"), "the upper bounds of image 1"),
])
def test_module_refuses_nan_and_inf_naming_the_image(name: str, value: float, what: str) -> None:
    args = bad()
    args[name] = with_value(args[name], (1,) + (0,) * (args[name].ndim - 1), value)
    with pytest.raises(RlossError, match=f"^SizeConstraintLoss: {what}.*NaN or Inf"):
        SizeConstraintLoss(1.0)(**args)


@pytest.mark.parametrize("normalize,changes,message", [
    (False, {"lower": with_value(torch.zeros(N, K), (1, 2), 6.0)},
     r"lower bound 6 exceeds the upper bound 5 \(in pixels\) for image 1, class 2"),
    (False, {"lower": with_value(torch.zeros(N, K), (0, 1), -1.0)}, r"lower bound -1 is negative .* image 0, class 1"),
    (False, {"upper": with_value(torch.ones(N, K), (1, 0), -0.5)}, r"image 1, class 0"),
    (True, {"upper": with_value(torch.ones(N, K), (1, 1), 1.5)},
     r"upper bound 1.5 exceeds 1 \(fractions of the roi\) for image 1, class 1"),
    (True, {"upper": torch.ones(N, K), "rois": with_value(torch.ones(N, H, W), (1,), 0.0)},
     "region of interest of image 1 is empty: normalize divides by its size"),
])
def test_module_refuses_bad_bounds_naming_image_and_class(normalize: bool, changes, message: str) -> None:
    with pytest.raises(RlossError, match="^SizeConstraintLoss: .*" + message):
        SizeConstraintLoss(1.0, normalize)(**bad(**changes))


def test_an_empty_roi_in_pixels_is_a_size_of_zero() -> None:
    args = bad(rois=torch.zeros(N, H, W), lower=torch.ones(N, K))
    assert float(SizeConstraintLoss(1.0)(**args)) == pytest.approx(1.0 * K)


# ---- the layer -------------------------------------------------------------------------------------
def make_layer(shapes, bottoms: str = 'bottom: "label"', param: str = "",
               extra: str = "loss_weight: 1"):
    text = (f'name: "size" type: "SizeConstraintLoss" bottom: "data" bottom: "prob" {bottoms} top: "loss" {extra} '
            f"size_constraint_loss_param {{ {param} }}")
    return layer_class("SizeConstraintLoss")(text_format.Parse(text, caffe_pb2.LayerParameter()), shapes,
                                             caffe_pb2.TRAIN)


def tags_label() -> np.ndarray:
    """Image 0 holds classes 0 and 2, image 1 only class 1; the rest is unlabelled (255)."""
    label = np.full((N, 1, H, W), 255, np.float32)
    label[0, 0, 0, :2], label[0, 0, 1, 3] = 0, 2
    label[1, 0, 2, 2:4] = 1
    return label


def layer_loss_and_grad(layer, *bottoms: np.ndarray):
    s = torch.from_numpy(bottoms[1]).requires_grad_(True)
    (top,) = layer(torch.from_numpy(bottoms[0]), s, *(torch.from_numpy(b) for b in bottoms[2:]))
    top.sum().backward()
    return top.detach(), s.grad


@pytest.mark.parametrize("normalize", [False, True])
def test_tags_mode_equals_the_module_with_bounds_built_by_hand(normalize: bool) -> None:
    picture, seg, label = image(), segmentation(), tags_label()
    lo, up = (0.2, 0.5) if normalize else (4.0, 9.0)
    layer = make_layer([picture.shape, seg.shape, label.shape],
                       param=f"lower: {lo} upper: {up} normalize: {str(normalize).lower()}")
    top, grad = layer_loss_and_grad(layer, picture, seg, label)
    lower, upper = np.zeros((N, K)), np.zeros((N, K))
    for n in range(N):
        for k in range(K):
            if (label[n] == k).any():
                lower[n, k], upper[n, k] = lo, up
    assert (lower > 0).sum() == 3
    expected, expected_grad = module_loss_and_grad(seg, roi_of(picture), lower, upper, normalize)
    assert top.shape == (1, 1, 1, 1) and float(top) > 0
    assert float(top) == pytest.approx(float(expected), rel=1e-6)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("bound_shape", [(N, K), (N, K, 1, 1)])
def test_bounds_blob_mode_equals_the_module(bound_shape) -> None:
    picture, seg = image(), segmentation()
    roi = roi_of(picture)
    lower, upper = (b.astype(np.float32) for b in mixed_bounds(sizes(seg, roi, True)))
    shapes = [picture.shape, seg.shape, bound_shape, bound_shape]
    layer = make_layer(shapes, bottoms='bottom: "lower" bottom: "upper"', param="lower: 0.9 upper: 0.1")
    top, grad = layer_loss_and_grad(layer, picture, seg, lower.reshape(bound_shape), upper.reshape(bound_shape))
    expected, expected_grad = module_loss_and_grad(seg, roi, lower, upper, True)
    assert float(top) == pytest.approx(float(expected), rel=1e-6)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-6, atol=1e-9)


NET = """name: "size"
layer {{ name: "input" type: "Input" top: "data" top: "prob" top: "label"
        input_param {{ shape {{ dim: {n} dim: 3 dim: {h} dim: {w} }} shape {{ dim: {n} dim: {k} dim: {h} dim: {w} }}
                      shape {{ dim: {n} dim: 1 dim: {h} dim: {w} }} }} }}
layer {{ name: "size" type: "SizeConstraintLoss" bottom: "data" bottom: "prob" bottom: "label" top: "loss"
        loss_weight: 0.5 size_constraint_loss_param {{ lower: 0.4 upper: 0.6 }} }}"""


def test_layer_in_a_net_gives_loss_and_gradient_on_the_probabilities_only() -> None:
    net_param = text_format.Parse(NET.format(n=N, k=K, h=H, w=W), caffe_pb2.NetParameter())
    net = Net(net_param, caffe_pb2.TRAIN)
    picture, seg, label = (torch.from_numpy(a).requires_grad_(True) for a in (image(), segmentation(), tags_label()))
    objective = net.forward({"data": picture, "prob": seg, "label": label})
    objective.backward()
    lower = torch.tensor([[0.4, 0, 0.4], [0, 0.4, 0]])
    upper = torch.tensor([[0.6, 0, 0.6], [0, 0.6, 0]])
    expected, expected_grad = module_loss_and_grad(seg.detach().numpy(), roi_of(image()), lower, upper, True, 0.5)
    assert float(objective.detach()) == pytest.approx(float(expected), rel=1e-6)
    assert float(net.blob_data["loss"].detach()) == pytest.approx(float(expected) / 0.5, rel=1e-6)
    torch.testing.assert_close(seg.grad, expected_grad, rtol=1e-6, atol=1e-9)
    assert picture.grad is None and label.grad is None


def test_defaults_and_missing_loss_weight_warning(caplog) -> None:
    with caplog.at_level(logging.WARNING, logger="rloss"):
        layer = make_layer([(N, 3, H, W), (N, K, H, W), (N, 1, H, W)], extra="")
    assert any("'size'" in r.getMessage() and "loss_weight" in r.getMessage() for r in caplog.records)
    assert layer.normalize and layer.ignore_label == 255 and (layer.lower, layer.upper) == (0.0, 1.0)
    assert layer.top_shapes == [(1, 1, 1, 1)] and layer.loss_weights == [0.0]


# ---- the layer: bad input ----------------------------------------------------------------------------
TAGS = [(N, 3, H, W), (N, K, H, W), (N, 1, H, W)]
BOUNDS = [(N, 3, H, W), (N, K, H, W), (N, K), (N, K)]
TWO_BOUNDS = 'bottom: "lower" bottom: "upper"'


@pytest.mark.parametrize("shapes,param,extra,message", [
    (TAGS[:2], "", "loss_weight: 1", "needs 3..4 bottoms, the prototxt gives 2"),
    (TAGS, "", "loss_weight: 1 propagate_down: true propagate_down: true propagate_down: false",
     "into the image.*propagate_down: false, true, false"),
    (TAGS, "", "loss_weight: 1 propagate_down: false propagate_down: true propagate_down: true",
     "into the label or the bounds.*propagate_down: false, true, false"),
    (BOUNDS, "", "loss_weight: 1 " + "propagate_down: false " * 3 + "propagate_down: true",
     "propagate_down: false, true, false, false"),
    ([TAGS[0], TAGS[1], (N, 1, H, W + 1)], "", "loss_weight: 1", r"bottom 2 \(the label\).*\(2, 1, 5, 7\)"),
    ([TAGS[0], (N, K, H, W + 1), TAGS[2]], "", "loss_weight: 1", "must agree in N, H and W"),
    ([BOUNDS[0], BOUNDS[1], (N, K), (N, K + 1)], "", "loss_weight: 1",
     r"bottom 3 \(upper bounds\).*\(2, 4\)"),
    ([BOUNDS[0], BOUNDS[1], (N, K, 1, 2), (N, K)], "", "loss_weight: 1", r"bottom 2 .*\(2, 3, 1, 2\)"),
    (TAGS, "lower: 0.7 upper: 0.3", "loss_weight: 1", "0 <= lower <= upper <= 1.*lower 0.7, upper 0.3"),
    (TAGS, "lower: 0.5 upper: 2", "loss_weight: 1", "upper <= 1.*upper 2"),
    (TAGS, "lower: -1 upper: 20 normalize: false", "loss_weight: 1", r"\(in pixels\); got lower -1"),
])
def test_layer_refuses_bad_set_up(shapes, param: str, extra: str, message: str) -> None:
    bottoms = " ".join(f'bottom: "b{i}"' for i in range(2, len(shapes)))
    with pytest.raises(LayerError, match=r"layer 'size' \(type SizeConstraintLoss\).*" + message):
        make_layer(shapes, bottoms=bottoms, param=param, extra=extra)


@pytest.mark.parametrize("value", [3.0, -1.0, 1.5, float("nan")])
def test_layer_refuses_label_values_that_are_not_classes(value: float) -> None:
    label = tags_label()
    label[1, 0, 4, 5] = value
    layer = make_layer(TAGS)
    shown = "nan" if np.isnan(value) else f"{value:g}"
    with pytest.raises(LayerError, match=rf"'size'.*label value {shown} in image 1 .*\[0, 3\) nor ignore_label 255"):
        layer(torch.from_numpy(image()), torch.from_numpy(segmentation()), torch.from_numpy(label))


def test_layer_honours_its_ignore_label() -> None:
    label = tags_label()
    label[label == 255] = -1
    layer = make_layer(TAGS, param="ignore_label: -1")
    default = make_layer(TAGS)
    bottoms = [torch.from_numpy(a) for a in (image(), segmentation())]
    expected = float(default(*bottoms, torch.from_numpy(tags_label()))[0])
    assert float(layer(*bottoms, torch.from_numpy(label))[0]) == expected > 0


def test_layer_errors_at_forward_name_the_layer() -> None:
    picture, seg = torch.from_numpy(image()), torch.from_numpy(segmentation())
    layer = make_layer(BOUNDS, bottoms=TWO_BOUNDS)
    lower, upper = torch.zeros(N, K), torch.full((N, K), 0.5)
    with pytest.raises(LayerError, match=r"'size'.*lower bound 0.7 exceeds the upper bound 0.5.*image 0, class 1"):
        layer(picture, seg, with_value(lower, (0, 1), 0.7), upper)
    with pytest.raises(LayerError, match=r"'size'.*the segmentations of image 1.*NaN or Inf"):
        layer(picture, with_value(seg, (1, 0, 0, 0), float("nan")), lower, upper)
    with pytest.raises(LayerError, match=r"'size'.*region of interest of image 0 is empty"):
        layer(torch.zeros_like(picture), seg, lower, upper)
    with pytest.raises(LayerError, match=r"'size'.*bottom 3 \(upper bounds\)"):
        layer(picture, seg, lower, upper[:1])
