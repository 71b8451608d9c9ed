"""NormalizedCutLoss: the module and the layer against the dense formula with the lattice's own operator
(A applied to unit vectors), the gradient formula against finite differences with a symmetric A, and
the conventions the DenseCRF loss sets (roi, down-scaling, batch mean, autocast, errors)."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from rloss import NormalizedCutLoss
from rloss.errors import LayerError, RlossError
from rloss.lattice import caffe_roi_mask
from rloss.layers.regularized_loss import fork_roi
from rloss.net import Net
from rloss.proto import caffe_pb2
from tests.helpers import layer_from_text
from tests.loss_data import MEAN_BGR, lattice_operator, synthetic_image, synthetic_segmentation

LAYER = ('name: "ncut" type: "NormalizedCutLoss" bottom: "data" bottom: "seg" top: "loss" {extra} '
         "normalized_cut_loss_param {{ bi_xy_std: {sxy} bi_rgb_std: {srgb} {more} }}")


def make_layer(shapes, extra: str = "loss_weight: 1 propagate_down: false propagate_down: true",
               sxy: float = 5.0, srgb: float = 20.0, more: str = ""):
    return layer_from_text(LAYER.format(extra=extra, sxy=sxy, srgb=srgb, more=more), shapes)


def dense_value_and_gradient(a: np.ndarray, seg: np.ndarray, roi: np.ndarray) -> tuple[float, np.ndarray]:
    """One image's sum_k <x_k, A(m - x_k)> / <x_k, A m> and the issue's gradient formula (A assumed
    symmetric), in float64 with the explicit matrix: seg (K, P), roi (P,)."""
    x = seg * roi
    d = a @ roi
    blurred = x @ a.T
    assoc = x @ d
    cut = assoc - (x * blurred).sum(axis=1)
    value = float((cut / assoc).sum())
    gradient = roi * ((d - 2 * blurred) / assoc[:, None] - (cut / assoc ** 2)[:, None] * d)
    return value, gradient


def module_loss_and_grad(images, seg, rois, weight=1.0, **options):
    s = torch.from_numpy(seg).requires_grad_(True)
    loss = NormalizedCutLoss(weight, **{"sigma_rgb": 20.0, "sigma_xy": 5.0, **options})(
        torch.from_numpy(images), s, torch.from_numpy(rois))
    loss.backward()
    return loss.detach(), s.grad


@pytest.mark.parametrize("size", [(9, 11), (64, 64)])
def test_value_and_gradient_equal_the_dense_formula_with_the_lattice_operator(size) -> None:
    h, w = size
    n, k, weight = 2, 3, 0.7
    images, seg = synthetic_image(n, h, w), synthetic_segmentation(n, k, h, w)
    rois = np.ones((n, h, w), np.float32)
    rois[0, h // 3:h // 2, w // 4:w // 2] = 0  # a hole inside the image
    rois[1, :, -2:] = 0
    loss, grad = module_loss_and_grad(images, seg, rois, weight)
    values, gradients = zip(*(
        dense_value_and_gradient(lattice_operator(images[i], 5.0, 20.0), seg[i].reshape(k, -1).astype(np.float64),
                                 rois[i].reshape(-1).astype(np.float64)) for i in range(n)))
    expected = weight * sum(values) / n
    expected_grad = weight / n * np.stack(gradients)
    assert 0 < expected < weight * k
    assert abs(float(loss) - expected) <= 1e-5 * abs(expected)
    actual = grad.numpy().reshape(n, k, -1).astype(np.float64)
    assert np.abs(actual - expected_grad).max() <= 1e-4 * np.abs(expected_grad).max()
    assert (actual[np.broadcast_to(rois.reshape(n, 1, -1) == 0, actual.shape)] == 0).all()


def test_gradient_formula_is_the_derivative_for_a_symmetric_operator() -> None:
    """The formula the implementation follows is the exact derivative of the value when A is
    symmetric (the lattice's A is only nearly so): finite differences in float64."""
    image = synthetic_image(1, 6, 7)[0]
    a = lattice_operator(image, 3.0, 30.0)
    a_sym = (a + a.T) / 2
    roi = caffe_roi_mask(image[None])[0].reshape(-1).astype(np.float64)
    seg = synthetic_segmentation(1, 3, 6, 7)[0].reshape(3, -1).astype(np.float64)
    _, formula = dense_value_and_gradient(a_sym, seg, roi)
    numeric = np.zeros_like(seg)
    step = 1e-6
    for index in np.ndindex(*seg.shape):
        up, down = seg.copy(), seg.copy()
        up[index] += step
        down[index] -= step
        numeric[index] = (dense_value_and_gradient(a_sym, up, roi)[0]
                          - dense_value_and_gradient(a_sym, down, roi)[0]) / (2 * step)
    assert np.abs(formula - numeric).max() <= 1e-6 * np.abs(numeric).max()


def test_a_segmentation_that_follows_the_colour_edges_costs_less_than_one_that_crosses_them() -> None:
    h, w = 16, 16
    image = np.zeros((1, 3, h, w), np.float32)
    image[:, :, :, w // 2:] = 200.0  # two flat colour halves
    left = np.zeros((1, 2, h, w), np.float32)
    left[:, 0, :, :w // 2], left[:, 1, :, w // 2:] = 1, 1
    top = np.zeros((1, 2, h, w), np.float32)
    top[:, 0, :h // 2], top[:, 1, h // 2:] = 1, 1
    rois = np.ones((1, h, w), np.float32)
    along, _ = module_loss_and_grad(image, left * 0.98 + 0.01, rois, sigma_rgb=10.0, sigma_xy=4.0)
    across, _ = module_loss_and_grad(image, top * 0.98 + 0.01, rois, sigma_rgb=10.0, sigma_xy=4.0)
    assert 0 <= float(along) < 0.1 < float(across)


def test_a_class_without_mass_contributes_nothing() -> None:
    images, seg = synthetic_image(1, 8, 9), synthetic_segmentation(1, 3, 8, 9)
    seg[:, 2] = 0  # a hard zero: association 0
    rois = np.ones((1, 8, 9), np.float32)
    loss, grad = module_loss_and_grad(images, seg, rois)
    two, _ = module_loss_and_grad(images, seg[:, :2].copy(), rois)
    assert float(loss) == pytest.approx(float(two), rel=1e-6)
    assert (grad[:, 2] == 0).all() and torch.isfinite(grad).all()


def test_scale_factor_is_the_loss_of_the_downscaled_inputs_with_a_scaled_sigma_xy() -> None:
    images = torch.from_numpy(synthetic_image(1, 20, 24) + MEAN_BGR[:, None, None])
    seg = torch.from_numpy(synthetic_segmentation(1, 3, 20, 24))
    rois = torch.ones(1, 20, 24)
    rois[:, 15:] = 0
    loss = NormalizedCutLoss(2.0, 15.0, 8.0, scale_factor=0.5)(images, seg, rois)
    small = NormalizedCutLoss(2.0, 15.0, 4.0)(
        F.interpolate(images, scale_factor=0.5), F.interpolate(seg, scale_factor=0.5, mode="bilinear"),
        F.interpolate(rois[:, None], scale_factor=0.5)[:, 0])
    assert float(loss) == float(small)


def test_batch_is_the_mean_of_its_images() -> None:
    images, seg = synthetic_image(2, 11, 13), synthetic_segmentation(2, 3, 11, 13)
    rois = np.ones((2, 11, 13), np.float32)
    both, _ = module_loss_and_grad(images, seg, rois)
    parts = [float(module_loss_and_grad(images[i:i + 1], seg[i:i + 1], rois[i:i + 1])[0]) for i in range(2)]
    assert float(both) == pytest.approx(sum(parts) / 2, rel=1e-6)


def test_layer_equals_module_with_the_forks_roi() -> None:
    images, seg = synthetic_image(2, 9, 10), synthetic_segmentation(2, 4, 9, 10)
    layer = make_layer([images.shape, seg.shape])
    s = torch.from_numpy(seg).requires_grad_(True)
    (top,) = layer(torch.from_numpy(images), s)
    (0.3 * top.sum()).backward()
    rois = caffe_roi_mask(images)
    assert np.array_equal(fork_roi(torch.from_numpy(images)).numpy(), rois)
    loss, grad = module_loss_and_grad(images, seg, rois, weight=0.3)
    assert top.shape == (1, 1, 1, 1) and float(loss) == pytest.approx(0.3 * float(top.detach()), rel=1e-6)
    assert torch.allclose(s.grad, grad, rtol=1e-6, atol=1e-12)


def test_layer_in_a_net_with_a_scale_factor() -> None:
    text = """input: "data" input_shape { dim: 1 dim: 3 dim: 12 dim: 14 }
        input: "seg" input_shape { dim: 1 dim: 2 dim: 12 dim: 14 }
        layer { name: "ncut" type: "NormalizedCutLoss" bottom: "data" bottom: "seg" top: "ncut"
                loss_weight: 0.5 propagate_down: false propagate_down: true
                normalized_cut_loss_param { bi_xy_std: 6 bi_rgb_std: 15 scale_factor: 0.5 } }"""
    from google.protobuf import text_format

    net = Net(text_format.Parse(text, caffe_pb2.NetParameter()), caffe_pb2.TRAIN)
    seg = torch.from_numpy(synthetic_segmentation(1, 2, 12, 14)).requires_grad_(True)
    objective = net.forward({"data": torch.from_numpy(synthetic_image(1, 12, 14)), "seg": seg})
    objective.backward()
    assert float(objective) == pytest.approx(0.5 * float(net.blob_data["ncut"]), rel=1e-6) and float(objective) > 0
    assert seg.grad is not None and torch.isfinite(seg.grad).all() and seg.grad.abs().sum() > 0


def test_bfloat16_autocast_gives_float32_equal_to_float32() -> None:
    images = torch.from_numpy(synthetic_image(1, 12, 12) + MEAN_BGR[:, None, None])
    conv = torch.nn.Conv2d(4, 3, 1)
    logits = torch.randn(1, 4, 12, 12, generator=torch.Generator().manual_seed(3))
    module = NormalizedCutLoss(1.0, 15.0, 5.0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        seg = torch.softmax(conv(logits), dim=1)
        loss = module(images, seg, torch.ones(1, 12, 12))
    assert seg.dtype == torch.bfloat16 and loss.dtype == torch.float32 and loss.shape == (1,)
    loss.backward()
    assert torch.isfinite(conv.weight.grad).all()
    assert float(loss.detach()) == pytest.approx(float(module(images, seg.detach().float(), torch.ones(1, 12, 12))))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_module_on_cuda() -> None:  # pragma: no cover - no GPU on the test machine
    images = torch.from_numpy(synthetic_image(1, 10, 10) + MEAN_BGR[:, None, None]).cuda()
    seg = torch.from_numpy(synthetic_segmentation(1, 3, 10, 10)).cuda().requires_grad_(True)
    loss = NormalizedCutLoss(1.0, 15.0, 5.0)(images, seg, torch.ones(1, 10, 10, device="cuda"))
    loss.backward()
    assert loss.device.type == "cuda" and seg.grad.device.type == "cuda"


def test_missing_loss_weight_warns(caplog) -> None:
    with caplog.at_level(logging.WARNING, logger="rloss"):
        make_layer([(1, 3, 4, 4), (1, 2, 4, 4)], extra="propagate_down: false propagate_down: true")
    assert any("'ncut'" in r.getMessage() and "loss_weight" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("extra,more,match", [
    ("loss_weight: 1 propagate_down: true propagate_down: true", "", "propagate_down: false, true"),
    ("loss_weight: 1", "scale_factor: 0", "scale_factor must be a finite number > 0"),
])
def test_layer_refuses_bad_settings(extra: str, more: str, match: str) -> None:
    with pytest.raises(LayerError, match=rf"'ncut'.*NormalizedCutLoss.*{match}"):
        make_layer([(1, 3, 4, 4), (1, 2, 4, 4)], extra=extra, more=more)
    with pytest.raises(LayerError, match="bi_xy_std"):
        make_layer([(1, 3, 4, 4), (1, 2, 4, 4)], sxy=-1.0)
    with pytest.raises(LayerError, match=r"\(1, 3, 4, 4\).*\(1, 2, 4, 5\)"):
        make_layer([(1, 3, 4, 4), (1, 2, 4, 5)])


def test_layer_refuses_an_image_without_roi_and_non_finite_diffs() -> None:
    layer = make_layer([(1, 3, 5, 5), (1, 2, 5, 5)])
    seg = torch.from_numpy(synthetic_segmentation(1, 2, 5, 5))
    with pytest.raises(LayerError, match=r"'ncut'.*region of interest of image 0 is empty"):
        layer(torch.zeros(1, 3, 5, 5), seg)
    s = seg.clone().requires_grad_(True)
    (top,) = layer(torch.from_numpy(synthetic_image(1, 5, 5)), s)
    with pytest.raises(LayerError, match="gradient is not finite"):
        top.backward(torch.full_like(top, float("inf")))


def test_module_refuses_bad_input() -> None:
    images, seg, rois = torch.zeros(1, 3, 6, 6), torch.full((1, 2, 6, 6), 0.5), torch.ones(1, 6, 6)
    module = NormalizedCutLoss(1.0, 15.0, 5.0)
    cases = [
        ((torch.zeros(1, 4, 6, 6), seg, rois), r"images must have shape \(N, 3, H, W\)"),
        ((images, seg[:, :, :5], rois), "N, H and W must agree"),
        ((images, seg.masked_fill(seg > 0, float("nan")), rois), "segmentations of image 0 hold NaN or Inf"),
        ((images.masked_fill(images == 0, float("inf")), seg, rois), "NaN or Inf"),
        ((images, seg, rois.masked_fill(rois > 0, float("nan"))), "rois of image 0 hold NaN or Inf"),
        ((images, seg, torch.zeros(1, 6, 6)), "region of interest of image 0 is empty"),
    ]
    for arguments, match in cases:
        with pytest.raises(RlossError, match=rf"^NormalizedCutLoss: .*{match}"):
            module(*arguments)
    for options in ({"sigma_rgb": 0.0, "sigma_xy": 5.0}, {"sigma_rgb": 15.0, "sigma_xy": float("nan")},
                    {"sigma_rgb": 15.0, "sigma_xy": 5.0, "scale_factor": -1.0}):
        with pytest.raises(RlossError, match="must be a finite number > 0"):
            NormalizedCutLoss(1.0, **options)
    with pytest.raises(RlossError, match="scale_factor 0.1 shrinks the 6x6 images"):
        NormalizedCutLoss(1.0, 15.0, 5.0, scale_factor=0.1)(images, seg, rois)
