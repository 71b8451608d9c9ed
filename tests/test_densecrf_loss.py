"""DenseCRFLoss: the Caffe layer and the PyTorch module.

References: the real fork's outputs (golden files), the loss and the fork's gradient rule recomputed
with an independently built lattice (`Permutohedral` on features made here), finite differences of the
quadratic form with a symmetric dense operator, and the module's equivalences (layer, down-scaling,
batch split)."""

from __future__ import annotations

import logging
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from google.protobuf import text_format

from rloss import DenseCRFLoss as DenseCRFLossModule
from rloss.errors import LayerError, NetError, RlossError
from rloss.lattice import caffe_roi_mask
from rloss.layers.registry import layer_class
from rloss.losses.densecrf import DenseCRFLossFunction
from rloss.net import Net
from rloss.proto import caffe_pb2
from tests.loss_data import MEAN_BGR, lattice_matrix, lattice_operator, synthetic_image, synthetic_segmentation
from tests.shared_data import golden

LAYER = ('name: "crf" type: "DenseCRFLoss" bottom: "data" bottom: "seg" top: "loss" {extra} '
         "densecrf_loss_param {{ bi_xy_std: {sxy} bi_rgb_std: {srgb} {more} }}")


def make_layer(shapes, extra: str = "loss_weight: 1 propagate_down: false propagate_down: true",
               sxy: float = 5.0, srgb: float = 20.0, more: str = ""):
    text = LAYER.format(extra=extra, sxy=sxy, srgb=srgb, more=more)
    param = text_format.Parse(text, caffe_pb2.LayerParameter())
    return layer_class("DenseCRFLoss")(param, shapes, caffe_pb2.TRAIN)


def layer_loss_and_grad(layer, image: np.ndarray, seg: np.ndarray, weight: float = 1.0):
    s = torch.from_numpy(seg).requires_grad_(True)
    (top,) = layer(torch.from_numpy(image), s)
    (weight * top.sum()).backward()
    return top.detach(), s.grad


# ---- (a) golden cases, at the layer level (the net-level run is in test_golden_layers.py) ---------
@pytest.mark.parametrize("case", ["densecrf_loss_81_w1", "densecrf_loss_41_w1e-8"])
def test_layer_matches_caffe_golden(case: str) -> None:
    files = golden("01_layers", case)
    param = next(p for p in files.net_param().layer if p.type == "DenseCRFLoss")
    image, seg = files.array("in_data"), files.array("out_seg")
    layer = layer_class("DenseCRFLoss")(param, [image.shape, seg.shape], caffe_pb2.TRAIN)
    top, grad = layer_loss_and_grad(layer, image, seg, weight=param.loss_weight[0])
    expected_loss = files.array("out_densecrf_loss")
    expected_grad = files.array("diff_seg")
    assert top.shape == (1, 1, 1, 1)
    expected = float(expected_loss.ravel()[0])
    loss_error = abs(float(top.detach()) - expected) / abs(expected)
    grad_error = float((grad.numpy() - expected_grad).__abs__().max() / np.abs(expected_grad).max())
    assert loss_error <= 1e-4 and grad_error <= 1e-3, (loss_error, grad_error)


# ---- (b) loss and gradient rule --------------------------------------------------------------------
def test_loss_and_gradient_equal_independent_lattice_computation() -> None:
    n, k, h, w = 2, 3, 9, 11
    image, seg = synthetic_image(n, h, w), synthetic_segmentation(n, k, h, w)
    weight = 0.7
    top, grad = layer_loss_and_grad(make_layer([image.shape, seg.shape]), image, seg, weight)
    mask = (np.trunc(image) != 0).any(axis=1).reshape(n, 1, h * w).astype(np.float64)
    masked = seg.reshape(n, k, h * w) * mask
    filtered = np.stack([masked[i] @ lattice_matrix(image[i], 5.0, 20.0).T for i in range(n)])
    expected_loss = -(masked * filtered).sum() / n
    expected_grad = (-2.0 * weight / n) * filtered * mask
    assert float(top) < 0
    assert abs(float(top) - expected_loss) <= 1e-5 * abs(expected_loss)
    assert np.abs(grad.numpy().reshape(n, k, h * w) - expected_grad).max() <= 1e-5 * np.abs(expected_grad).max()
    assert (grad.numpy().reshape(n, k, h * w)[np.broadcast_to(mask == 0, expected_grad.shape)] == 0).all()


def test_backward_rule_is_the_exact_gradient_for_a_symmetric_operator() -> None:
    """What this checks: the Function's backward -(2/N) A(mS) m is the derivative of its forward
    -(1/N) sum <mS, A mS> when A is symmetric (masking included). The lattice A is only nearly
    symmetric, so with it the rule is, as in the fork, not the exact derivative (next test)."""
    image = synthetic_image(2, 6, 5)
    a_sym = [torch.from_numpy((a + a.T) / 2) for a in (lattice_matrix(im, 3.0, 30.0) for im in image)]

    def symmetric_kernel(values: torch.Tensor) -> torch.Tensor:
        flat = values.reshape(2, values.shape[1], 30)
        return torch.stack([flat[i] @ a_sym[i] for i in range(2)]).reshape(values.shape)

    mask = torch.from_numpy(caffe_roi_mask(image)).double()
    seg = torch.from_numpy(synthetic_segmentation(2, 3, 6, 5)).double().requires_grad_(True)
    assert 0 < float(mask.sum()) < mask.numel()

    class SymmetricTerms:
        def energy(self, s: torch.Tensor) -> torch.Tensor:
            m = mask.unsqueeze(1)
            self.masked_filtered = symmetric_kernel(s * m) * m
            return (s * self.masked_filtered).sum((2, 3))

        def gradient(self, scale: float) -> torch.Tensor:
            return scale * self.masked_filtered

    def loss(s: torch.Tensor) -> torch.Tensor:
        return DenseCRFLossFunction.apply(s, SymmetricTerms(), RlossError)

    assert torch.autograd.gradcheck(loss, (seg,), eps=1e-6, atol=1e-8, rtol=1e-6)


def test_rule_differs_from_true_derivative_only_by_lattice_asymmetry() -> None:
    """-2 A(mS) vs the exact derivative -(A + A^T)(mS) of the forward: close, not equal (as in the fork)."""
    image, seg = synthetic_image(1, 10, 12), synthetic_segmentation(1, 2, 10, 12)
    _, grad = layer_loss_and_grad(make_layer([image.shape, seg.shape]), image, seg)
    a = lattice_matrix(image[0], 5.0, 20.0)
    mask = caffe_roi_mask(image).reshape(1, -1).astype(np.float64)
    masked = seg.reshape(2, -1) * mask
    exact = -(masked @ (a + a.T)) * mask
    mismatch = np.abs(grad.numpy().reshape(2, -1) - exact).max() / np.abs(exact).max()
    assert 1e-4 < mismatch < 0.1


# ---- (d) construction rules and errors --------------------------------------------------------------
def test_missing_loss_weight_warns_and_contributes_nothing(caplog) -> None:
    net_text = """input: "data" input_shape { dim: 1 dim: 3 dim: 6 dim: 7 }
        input: "seg" input_shape { dim: 1 dim: 2 dim: 6 dim: 7 }
        layer { name: "crf" type: "DenseCRFLoss" bottom: "data" bottom: "seg" top: "loss"
                propagate_down: false propagate_down: true }"""
    with caplog.at_level(logging.WARNING, logger="rloss"):
        net = Net(text_format.Parse(net_text, caffe_pb2.NetParameter()), caffe_pb2.TRAIN)
    assert any("'crf'" in r.getMessage() and "loss_weight" in r.getMessage() for r in caplog.records)
    image, seg = synthetic_image(1, 6, 7), synthetic_segmentation(1, 2, 6, 7)
    objective = net.forward({"data": torch.from_numpy(image), "seg": torch.from_numpy(seg)})
    assert float(objective) == 0.0
    assert float(net.blob_data["loss"]) < 0  # the top is still computed


def test_explicit_loss_weight_does_not_warn(caplog) -> None:
    with caplog.at_level(logging.WARNING, logger="rloss"):
        layer = make_layer([(1, 3, 4, 4), (1, 2, 4, 4)])
    assert layer.loss_weights == [1.0] and not caplog.records
    assert layer.top_shapes == [(1, 1, 1, 1)] and layer.num_tops == 1


def test_anonymous_top_and_proto_defaults() -> None:
    param = text_format.Parse('name: "c" type: "DenseCRFLoss" bottom: "a" bottom: "b" loss_weight: 1',
                              caffe_pb2.LayerParameter())
    layer = layer_class("DenseCRFLoss")(param, [(1, 3, 4, 4), (1, 2, 4, 4)], caffe_pb2.TRAIN)
    assert layer.num_tops == 1 and (layer.sigma_xy, layer.sigma_rgb) == (15.0, 40.0)


def test_propagate_down_into_image_is_refused() -> None:
    with pytest.raises(LayerError, match=r"'crf'.*DenseCRFLoss.*propagate_down: false, true"):
        make_layer([(1, 3, 4, 4), (1, 2, 4, 4)], extra="loss_weight: 1 propagate_down: true propagate_down: true")


@pytest.mark.parametrize("shapes,shown", [
    ([(2, 3, 8, 8), (1, 2, 8, 8)], "(1, 2, 8, 8)"), ([(1, 3, 8, 8), (1, 2, 8, 9)], "(1, 2, 8, 9)"),
    ([(1, 3, 7, 8), (1, 2, 8, 8)], "(1, 3, 7, 8)"), ([(1, 4, 8, 8), (1, 2, 8, 8)], "(1, 4, 8, 8)"),
    ([(1, 3, 8), (1, 2, 8, 8)], "(1, 3, 8)"),
])
def test_shape_mismatch_is_a_layer_error(shapes, shown: str) -> None:
    with pytest.raises(LayerError, match=r"'crf'.*DenseCRFLoss") as caught:
        make_layer(shapes)
    assert shown in str(caught.value)


def test_shape_mismatch_at_forward_is_a_layer_error() -> None:
    layer = make_layer([(1, 3, 8, 8), (1, 2, 8, 8)])
    with pytest.raises(LayerError, match=r"\(1, 3, 8, 8\).*\(1, 2, 8, 7\)"):
        layer(torch.zeros(1, 3, 8, 8), torch.zeros(1, 2, 8, 7))


def test_bad_sigma_is_a_layer_error() -> None:
    with pytest.raises(LayerError, match="bi_xy_std"):
        make_layer([(1, 3, 4, 4), (1, 2, 4, 4)], sxy=0.0)


def test_non_finite_inputs_and_gradients_are_layer_errors() -> None:
    image, seg = synthetic_image(1, 6, 7), synthetic_segmentation(1, 2, 6, 7)
    layer = make_layer([image.shape, seg.shape])
    bad_seg = seg.copy()
    bad_seg[0, 1, 2, 3] = np.nan
    with pytest.raises(LayerError, match=r"'crf'.*(NaN or Inf|not finite)"):
        layer(torch.from_numpy(image), torch.from_numpy(bad_seg))
    bad_image = image.copy()
    bad_image[0, 0, 1, 1] = np.inf
    with pytest.raises(LayerError, match=r"'crf'.*NaN or Inf"):
        layer(torch.from_numpy(bad_image), torch.from_numpy(seg))
    s = torch.from_numpy(seg).requires_grad_(True)
    (top,) = layer(torch.from_numpy(image), s)
    with pytest.raises(LayerError, match=r"'crf'.*gradient is not finite"):
        top.backward(torch.full_like(top, float("nan")))


def test_batch_size_is_read_at_forward() -> None:
    """The fork froze N at set-up; here a layer built for 2 images divides by the batch it gets."""
    image, seg = synthetic_image(2, 7, 8), synthetic_segmentation(2, 2, 7, 8)
    layer = make_layer([image.shape, seg.shape])
    both = float(layer(torch.from_numpy(image), torch.from_numpy(seg))[0])
    single = [float(layer(torch.from_numpy(image[i:i + 1]), torch.from_numpy(seg[i:i + 1]))[0]) for i in range(2)]
    assert both == pytest.approx(sum(single) / 2, rel=1e-6)


# ---- (c) the PyTorch module --------------------------------------------------------------------------
def test_module_equals_layer_on_the_same_data() -> None:
    image, seg = synthetic_image(2, 9, 10), synthetic_segmentation(2, 4, 9, 10)
    top, layer_grad = layer_loss_and_grad(make_layer([image.shape, seg.shape]), image, seg, weight=0.3)
    s = torch.from_numpy(seg).requires_grad_(True)
    rois = caffe_roi_mask(torch.from_numpy(image))
    module = DenseCRFLossModule(weight=0.3, sigma_rgb=20.0, sigma_xy=5.0, scale_factor=1.0)
    loss = module(torch.from_numpy(image), s, rois)
    loss.backward()
    assert loss.shape == (1,) and loss.dtype == torch.float32
    assert float(loss.detach()) == pytest.approx(0.3 * float(top), rel=1e-6)
    assert torch.allclose(s.grad, layer_grad, rtol=1e-6, atol=1e-12)


def test_module_on_rgb_images_is_close_to_layer_on_mean_subtracted_bgr() -> None:
    """The port feeds RGB in [0, 255] with an explicit ROI: the same Gaussian, but the lattice is not
    exactly invariant to shifting and permuting the features, so the values agree to a few percent."""
    image, seg = synthetic_image(2, 16, 18), synthetic_segmentation(2, 3, 16, 18)
    top, _ = layer_loss_and_grad(make_layer([image.shape, seg.shape]), image, seg)
    rgb = torch.from_numpy((image + MEAN_BGR[:, None, None])[:, ::-1].copy())
    rois = torch.from_numpy(caffe_roi_mask(image))
    loss = DenseCRFLossModule(1.0, sigma_rgb=20.0, sigma_xy=5.0)(rgb, torch.from_numpy(seg), rois)
    assert float(loss) == pytest.approx(float(top), rel=0.05)


def test_module_scale_factor_downscales_inputs_and_sigma_xy() -> None:
    images = torch.from_numpy(synthetic_image(1, 20, 24) + MEAN_BGR[:, None, None])
    seg = torch.from_numpy(synthetic_segmentation(1, 3, 20, 24)).requires_grad_(True)
    rois = torch.ones(1, 20, 24)
    rois[:, 15:, :] = 0
    loss = DenseCRFLossModule(2.0, sigma_rgb=15.0, sigma_xy=8.0, scale_factor=0.5)(images, seg, rois)
    loss.backward()
    small_seg = F.interpolate(seg.detach(), scale_factor=0.5, mode="bilinear", align_corners=False).requires_grad_(True)
    small = DenseCRFLossModule(2.0, sigma_rgb=15.0, sigma_xy=4.0)(
        F.interpolate(images, scale_factor=0.5), small_seg, F.interpolate(rois[:, None], scale_factor=0.5)[:, 0])
    small.backward()
    assert small_seg.shape == (1, 3, 10, 12)
    assert float(loss.detach()) == float(small.detach())
    full = seg.detach().requires_grad_(True)
    (expected,) = torch.autograd.grad(
        F.interpolate(full, scale_factor=0.5, mode="bilinear", align_corners=False), full, small_seg.grad)
    assert seg.grad.shape == seg.shape
    assert torch.allclose(seg.grad, expected, rtol=1e-6, atol=1e-12)


def test_module_batch_is_mean_of_images() -> None:
    images = torch.from_numpy(synthetic_image(2, 11, 13) + MEAN_BGR[:, None, None])
    seg, rois = torch.from_numpy(synthetic_segmentation(2, 3, 11, 13)), torch.ones(2, 11, 13)
    module = DenseCRFLossModule(1.5, 15.0, 6.0)
    parts = [float(module(images[i:i + 1], seg[i:i + 1], rois[i:i + 1])) for i in range(2)]
    assert float(module(images, seg, rois)) == pytest.approx(sum(parts) / 2, rel=1e-6)


def test_module_under_bfloat16_autocast() -> None:
    images = torch.from_numpy(synthetic_image(1, 12, 12) + MEAN_BGR[:, None, None])
    logits = torch.randn(1, 4, 12, 12, generator=torch.Generator().manual_seed(3))
    conv = torch.nn.Conv2d(4, 3, 1)
    module = DenseCRFLossModule(1.0, 15.0, 5.0, scale_factor=0.5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        seg = torch.softmax(conv(logits), dim=1)
        loss = module(images, seg, torch.ones(1, 12, 12))
    assert seg.dtype == torch.bfloat16 and loss.dtype == torch.float32 and loss.shape == (1,)
    loss.backward()
    assert conv.weight.grad is not None and torch.isfinite(conv.weight.grad).all()
    reference = module(images, seg.detach().float(), torch.ones(1, 12, 12))
    assert float(loss.detach()) == pytest.approx(float(reference), rel=1e-6)


def test_module_rejects_bad_input() -> None:
    module = DenseCRFLossModule(1.0, 15.0, 5.0)
    with pytest.raises(RlossError, match=r"N, H and W must agree.*\(1, 6, 7\)"):
        module(torch.zeros(1, 3, 6, 6), torch.zeros(1, 2, 6, 6), torch.ones(1, 6, 7))
    with pytest.raises(RlossError, match=r"\(N, 3, H, W\)"):
        module(torch.zeros(1, 1, 6, 6), torch.zeros(1, 2, 6, 6), torch.ones(1, 6, 6))
    with pytest.raises(RlossError, match="sigma_xy"):
        DenseCRFLossModule(1.0, 15.0, -1.0)


def test_module_refuses_a_scale_factor_that_empties_the_images_before_interpolating() -> None:
    module = DenseCRFLossModule(1.0, 15.0, 5.0, scale_factor=0.01)
    with pytest.raises(RlossError, match=r"scale_factor 0\.01 shrinks the 16x16 images to 0x0 pixels.*1/16"):
        module(torch.rand(1, 3, 16, 16) * 255, torch.rand(1, 2, 16, 16), torch.ones(1, 16, 16))
    with pytest.raises(RlossError, match=r"20x10 images to 1x0"):  # one side is enough
        DenseCRFLossModule(1.0, 15.0, 5.0, scale_factor=0.07)(
            torch.rand(1, 3, 20, 10), torch.rand(1, 2, 20, 10), torch.ones(1, 20, 10))
    small = DenseCRFLossModule(1.0, 15.0, 5.0, scale_factor=1 / 16)  # 1x1 is still an image
    assert torch.isfinite(small(torch.rand(1, 3, 16, 16) * 255, torch.rand(1, 2, 16, 16), torch.ones(1, 16, 16)))


@pytest.mark.parametrize("value", [1e20, 1e30, 3e38])
def test_huge_segmentations_are_refused_not_turned_into_an_infinite_loss(value: float) -> None:
    """The rule: the segmentation must be finite, and the loss (in the segmentation's dtype) and its
    gradient must come out finite. Finite values this large overflow: refused, naming the largest."""
    images = torch.rand(1, 3, 16, 16) * 255
    seg = torch.full((1, 2, 16, 16), value)
    largest = re.escape(f"{value:.3g}")
    with pytest.raises(RlossError, match=rf"DenseCRFLoss: the loss is not finite .*too large .*{largest}"):
        DenseCRFLossModule(1.0, 15.0, 5.0)(images, seg, torch.ones(1, 16, 16))
    image, layer_seg = synthetic_image(1, 6, 7), np.full((1, 2, 6, 7), value, np.float32)
    with pytest.raises(LayerError, match=r"'crf'.*the loss is not finite.*too large"):
        make_layer([image.shape, layer_seg.shape])(torch.from_numpy(image), torch.from_numpy(layer_seg))
    moderate = DenseCRFLossModule(1.0, 15.0, 5.0)(images, torch.full((1, 2, 16, 16), 1e3), torch.ones(1, 16, 16))
    assert torch.isfinite(moderate)  # large but representable: accepted


def test_non_finite_segmentations_name_the_image() -> None:
    seg = torch.rand(3, 2, 8, 8)
    seg[2, 1, 4, 4] = float("inf")
    with pytest.raises(RlossError, match=r"segmentation of image 2 \(of 3\) contains NaN or Inf"):
        DenseCRFLossModule(1.0, 15.0, 5.0)(torch.rand(3, 3, 8, 8) * 255, seg, torch.ones(3, 8, 8))


def test_a_gradient_that_overflows_is_refused() -> None:
    seg = torch.full((1, 2, 8, 8), 100.0, requires_grad=True)
    loss = DenseCRFLossModule(1.0, 15.0, 5.0)(torch.rand(1, 3, 8, 8) * 255, seg, torch.ones(1, 8, 8))
    assert torch.isfinite(loss)
    with pytest.raises(RlossError, match=r"gradient of image 0 \(of 1\) overflows float32: the gradient arriving"):
        loss.backward(torch.tensor([3e38]))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_module_on_cuda() -> None:  # pragma: no cover - no GPU on the test machine
    images = torch.from_numpy(synthetic_image(1, 10, 10) + MEAN_BGR[:, None, None]).cuda()
    seg = torch.from_numpy(synthetic_segmentation(1, 3, 10, 10)).cuda().requires_grad_(True)
    loss = DenseCRFLossModule(1.0, 15.0, 5.0)(images, seg, torch.ones(1, 10, 10, device="cuda"))
    loss.backward()
    assert loss.device == seg.device and seg.grad.device == seg.device


def test_net_error_wraps_layer_error_in_net() -> None:
    net_text = """input: "data" input_shape { dim: 1 dim: 3 dim: 6 dim: 7 }
        input: "seg" input_shape { dim: 1 dim: 2 dim: 6 dim: 7 }
        layer { name: "crf" type: "DenseCRFLoss" bottom: "data" bottom: "seg" top: "loss"
                loss_weight: 1 propagate_down: true propagate_down: true }"""
    with pytest.raises(NetError, match="propagate_down"):
        Net(text_format.Parse(net_text, caffe_pb2.NetParameter()), caffe_pb2.TRAIN)


# ---- scale_factor (rloss's extension of densecrf_loss_param) ---------------------------------------------

def test_the_layers_scale_factor_is_the_loss_of_the_resampled_inputs_with_a_scaled_sigma_xy():
    """scale_factor 0.5 equals the plain layer on the image resampled nearest and the segmentation
    bilinearly to half size with bi_xy_std halved; the gradient comes back through the resampling."""
    image = torch.from_numpy(synthetic_image(2, 12, 14))
    seg = torch.from_numpy(synthetic_segmentation(2, 3, 12, 14)).requires_grad_(True)
    text = LAYER.format(extra="loss_weight: 1 propagate_down: false propagate_down: true", sxy=6.0, srgb=20.0, more="")
    param = text_format.Parse(text.replace("bi_rgb_std: 20.0", "bi_rgb_std: 20.0 scale_factor: 0.5"),
                              caffe_pb2.LayerParameter())
    assert param.densecrf_loss_param.scale_factor == 0.5
    scaled = layer_class("DenseCRFLoss")(param, [(2, 3, 12, 14), (2, 3, 12, 14)], caffe_pb2.TRAIN)
    loss = scaled(image, seg)[0].sum()
    (grad,) = torch.autograd.grad(loss, seg)

    seg_ref = seg.detach().clone().requires_grad_(True)
    small_image = F.interpolate(image, scale_factor=0.5)
    small_seg = F.interpolate(seg_ref, scale_factor=0.5, mode="bilinear", align_corners=False)
    plain = make_layer([tuple(small_image.shape), tuple(small_seg.shape)], sxy=3.0)
    reference = plain(small_image, small_seg)[0].sum()
    (grad_ref,) = torch.autograd.grad(reference, seg_ref)
    assert small_image.shape[2:] == (6, 7)
    assert float(loss) == pytest.approx(float(reference), rel=1e-6)
    np.testing.assert_allclose(grad.numpy(), grad_ref.numpy(), rtol=1e-5, atol=1e-9)
    assert float(grad.abs().sum()) > 0


def test_a_scale_factor_that_leaves_no_pixel_is_refused_naming_the_layer():
    text = LAYER.format(extra="loss_weight: 1 propagate_down: false propagate_down: true", sxy=5.0, srgb=20.0, more="")
    param = text_format.Parse(text.replace("bi_rgb_std: 20.0", "bi_rgb_std: 20.0 scale_factor: 0.01"),
                              caffe_pb2.LayerParameter())
    layer = layer_class("DenseCRFLoss")(param, [(1, 3, 16, 16), (1, 2, 16, 16)], caffe_pb2.TRAIN)
    with pytest.raises(LayerError, match=r"'crf' \(type DenseCRFLoss\): scale_factor 0.01 shrinks the 16x16"):
        layer(torch.from_numpy(synthetic_image(1, 16, 16)), torch.from_numpy(synthetic_segmentation(1, 2, 16, 16)))
    with pytest.raises(LayerError, match="scale_factor must be a finite number > 0, got -1"):
        bad = text_format.Parse(text.replace("bi_rgb_std: 20.0", "bi_rgb_std: 20.0 scale_factor: -1"),
                                caffe_pb2.LayerParameter())
        layer_class("DenseCRFLoss")(bad, [(1, 3, 16, 16), (1, 2, 16, 16)], caffe_pb2.TRAIN)


# ---- (e) normalize: one weight for every crop size and scale ----------------------------------------
def test_normalize_divides_each_image_by_its_roi_response() -> None:
    n, k, h, w = 2, 3, 9, 11
    images, seg = synthetic_image(n, h, w), synthetic_segmentation(n, k, h, w)
    layer = make_layer([images.shape, seg.shape], more="normalize: true")
    assert layer.normalize
    top, grad = layer_loss_and_grad(layer, images, seg, weight=0.7)
    mask = caffe_roi_mask(images).reshape(n, 1, h * w).astype(np.float64)
    masked = seg.reshape(n, k, h * w) * mask
    operators = [lattice_operator(images[i], 5.0, 20.0) for i in range(n)]
    norms = np.array([mask[i, 0] @ operators[i] @ mask[i, 0] for i in range(n)])
    filtered = np.stack([masked[i] @ operators[i].T for i in range(n)])
    expected = -((masked * filtered).sum(axis=(1, 2)) / norms).sum() / n
    expected_grad = (-2.0 * 0.7 / n) * filtered * mask / norms[:, None, None]
    assert -1 < expected < 0 and abs(float(top) - expected) <= 1e-5 * abs(expected)
    assert np.abs(grad.numpy().reshape(n, k, -1) - expected_grad).max() <= 1e-5 * np.abs(expected_grad).max()


def test_normalized_loss_of_a_uniform_segmentation_is_minus_one_over_k() -> None:
    images = torch.from_numpy(synthetic_image(2, 12, 10) + MEAN_BGR[:, None, None])
    rois = torch.ones(2, 12, 10)
    rois[1, :4] = 0
    loss = DenseCRFLossModule(1.0, 15.0, 5.0, normalize=True)(images, torch.full((2, 4, 12, 10), 0.25), rois)
    assert float(loss) == pytest.approx(-0.25, rel=1e-5)


def test_normalize_makes_the_loss_independent_of_the_resolution() -> None:
    """The same picture at twice the size (sigma_xy doubled): about 16 times the plain loss (pixels
    squared), the same normalized loss."""
    images = torch.from_numpy(synthetic_image(1, 16, 16) + MEAN_BGR[:, None, None])
    seg = torch.from_numpy(synthetic_segmentation(1, 3, 16, 16))
    rois = torch.ones(1, 16, 16)
    big = [F.interpolate(images, scale_factor=2.0), F.interpolate(seg, scale_factor=2.0), torch.ones(1, 32, 32)]
    ratios = {}
    for normalize in (False, True):
        small_loss = DenseCRFLossModule(1.0, 15.0, 4.0, normalize=normalize)(images, seg, rois)
        big_loss = DenseCRFLossModule(1.0, 15.0, 8.0, normalize=normalize)(*big)
        ratios[normalize] = float(big_loss) / float(small_loss)
    assert 12 < ratios[False] < 20 and ratios[True] == pytest.approx(1.0, abs=0.05)


def test_normalize_refuses_an_empty_roi() -> None:
    module = DenseCRFLossModule(1.0, 15.0, 5.0, normalize=True)
    rois = torch.ones(2, 6, 6)
    rois[1] = 0
    with pytest.raises(RlossError, match="^DenseCRFLoss: the region of interest of image 1 is empty"):
        module(torch.zeros(2, 3, 6, 6), torch.full((2, 2, 6, 6), 0.5), rois)
