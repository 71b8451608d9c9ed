"""GatedCRFLoss: the PyTorch module and the Caffe layer.

The reference is an explicit float64 double loop over ordered pixel pairs written here (value, and the
gradient derived by hand from it), plus gradcheck of the autograd Function, and the equivalences of the
module (layer, down-scaling, batch split, autocast)."""

from __future__ import annotations

import logging
import math
from itertools import product

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from google.protobuf import text_format

from rloss import GatedCRFLoss, GatedKernel
from rloss.errors import LayerError, NetError, RlossError
from rloss.layers.registry import layer_class
from rloss.layers.regularized_loss import fork_roi
from rloss.losses.gated_crf import GatedPottsEnergy
from rloss.net import Net
from rloss.proto import caffe_pb2

MEAN_BGR = np.array([104.008, 116.669, 122.675], np.float32)
KERNELS = [(0.8, 3.0, 20.0), (0.3, 2.0, None)]
KERNEL_TEXT = "kernel { weight: 0.8 xy_std: 3 rgb_std: 20 } kernel { weight: 0.3 xy_std: 2 rgb_std: 0 }"


def rgb_images(n: int, h: int, w: int, seed: int = 0) -> np.ndarray:
    """RGB in [0, 255]: four colour blocks plus noise, so that the colour term varies within and across blocks."""
    rng = np.random.RandomState(seed)
    block = (np.arange(h)[:, None] * 2 // h) * 2 + (np.arange(w)[None, :] * 2 // w)
    images = [rng.uniform(30, 220, (4, 3))[block].transpose(2, 0, 1) + rng.randn(3, h, w) * 8 for _ in range(n)]
    return np.stack(images).astype(np.float32)


def segmentations(n: int, k: int, h: int, w: int, seed: int = 1) -> np.ndarray:
    logits = torch.from_numpy(np.random.RandomState(seed).randn(n, k, h, w).astype(np.float32) * 2)
    return torch.softmax(logits, dim=1).numpy()


def rois_with_holes(n: int, h: int, w: int) -> np.ndarray:
    rois = np.ones((n, h, w), np.float32)
    rois[0, 2:4, 3:6] = 0
    rois[-1, :, w - 2:] = 0
    rois[-1, h // 2, w // 2] = 0
    return rois


def caffe_inputs(rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(mean-subtracted BGR with the roi holes as zero padding, the RGB images the module sees)."""
    bgr = rgb[:, ::-1] - MEAN_BGR[:, None, None]
    bgr = bgr * rois_with_holes(*bgr.shape[:1], *bgr.shape[2:])[:, None]
    return np.ascontiguousarray(bgr), np.ascontiguousarray((bgr + MEAN_BGR[:, None, None])[:, ::-1])


def brute_force(images: np.ndarray, seg: np.ndarray, rois: np.ndarray, kernels, radius: int,
                normalize: bool) -> tuple[float, np.ndarray]:
    """(1/N) sum_n E_n [/ Z_n] and its gradient in float64, by a loop over every ordered pair (i, j != i)."""
    images, seg, rois = images.astype(np.float64), seg.astype(np.float64), rois.astype(np.float64)
    count, _, h, w = seg.shape
    loss, grad = 0.0, np.zeros_like(seg)
    for n in range(count):
        energy = mass = 0.0
        for y, x in product(range(h), range(w)):
            for v, u in product(range(y - radius, y + radius + 1), range(x - radius, x + radius + 1)):
                if (v, u) == (y, x) or not (0 <= v < h and 0 <= u < w):
                    continue
                affinity = 0.0
                for weight, sigma_xy, sigma_rgb in kernels:
                    exponent = ((y - v) ** 2 + (x - u) ** 2) / (2 * sigma_xy ** 2)
                    if sigma_rgb is not None:
                        exponent += ((images[n, :, y, x] - images[n, :, v, u]) ** 2).sum() / (2 * sigma_rgb ** 2)
                    affinity += weight * math.exp(-exponent)
                pair = rois[n, y, x] * rois[n, v, u] * affinity
                energy += pair * (1 - seg[n, :, y, x] @ seg[n, :, v, u])
                mass += pair
                grad[n, :, y, x] -= pair * seg[n, :, v, u]
                grad[n, :, v, u] -= pair * seg[n, :, y, x]
        norm = mass if normalize else 1.0
        loss += energy / norm / count
        grad[n] /= norm * count
    return loss, grad


def module_loss_and_grad(module, images, seg, rois) -> tuple[torch.Tensor, torch.Tensor]:
    s = torch.as_tensor(seg).clone().requires_grad_(True)
    loss = module(torch.as_tensor(images), s, torch.as_tensor(rois))
    loss.backward()
    return loss.detach(), s.grad


def make_layer(shapes, params: str = KERNEL_TEXT + " radius: 2",
               extra: str = "loss_weight: 1 propagate_down: false propagate_down: true"):
    text = (f'name: "gcrf" type: "GatedCRFLoss" bottom: "data" bottom: "seg" top: "loss" {extra} '
            f"gated_crf_loss_param {{ {params} }}")
    return layer_class("GatedCRFLoss")(text_format.Parse(text, caffe_pb2.LayerParameter()), shapes, caffe_pb2.TRAIN)


# ---- the definition -----------------------------------------------------------------------------------
@pytest.mark.parametrize("radius,normalize", [(2, False), (3, False), (2, True), (3, True), (10, False)])
def test_value_and_gradient_equal_the_double_loop(radius: int, normalize: bool) -> None:
    images, seg, rois = rgb_images(2, 9, 11), segmentations(2, 3, 9, 11), rois_with_holes(2, 9, 11)
    expected, expected_grad = brute_force(images, seg, rois, KERNELS, radius, normalize)
    module = GatedCRFLoss(0.7, KERNELS, radius=radius, normalize=normalize)
    loss, grad = module_loss_and_grad(module, images, seg, rois)
    assert loss.shape == (1,) and loss.dtype == torch.float32
    assert abs(float(loss) - 0.7 * expected) <= 1e-5 * abs(0.7 * expected)
    assert np.abs(grad.numpy() - 0.7 * expected_grad).max() <= 1e-4 * np.abs(0.7 * expected_grad).max()
    if normalize:
        assert 0 < expected < 1
    hole = np.broadcast_to(rois[:, None] == 0, grad.shape)
    assert (grad.numpy()[hole] == 0).all()


def test_the_function_backward_is_the_exact_derivative() -> None:
    images = torch.from_numpy(rgb_images(2, 6, 5)).double()
    rois = torch.from_numpy(rois_with_holes(2, 6, 5)).double()
    seg = torch.from_numpy(segmentations(2, 3, 6, 5)).double().requires_grad_(True)
    kernels = tuple(GatedKernel(*k) for k in KERNELS)

    def energy(s: torch.Tensor) -> torch.Tensor:
        return GatedPottsEnergy.apply(s, images, rois, kernels, 2)[0]

    assert torch.autograd.gradcheck(energy, (seg,), eps=1e-6, atol=1e-8, rtol=1e-6)


def test_kernels_may_be_dataclasses_dicts_or_tuples() -> None:
    images, seg, rois = rgb_images(1, 7, 8), segmentations(1, 2, 7, 8), np.ones((1, 7, 8), np.float32)
    inputs = (torch.from_numpy(images), torch.from_numpy(seg), torch.from_numpy(rois))
    as_dicts = [{"weight": 0.8, "sigma_xy": 3.0, "sigma_rgb": 20.0}, {"weight": 0.3, "sigma_xy": 2.0}]
    as_classes = [GatedKernel(0.8, 3.0, 20.0), GatedKernel(0.3, 2.0)]
    values = [float(GatedCRFLoss(1.0, kernels, radius=2)(*inputs)) for kernels in (KERNELS, as_dicts, as_classes)]
    assert values[0] == values[1] == values[2] > 0


def test_one_label_everywhere_costs_nothing() -> None:
    seg = torch.zeros(1, 3, 8, 9)
    seg[:, 1] = 1
    loss = GatedCRFLoss(1.0, KERNELS, radius=3)(torch.from_numpy(rgb_images(1, 8, 9)), seg, torch.ones(1, 8, 9))
    assert float(loss) == 0.0


# ---- the module's conventions -----------------------------------------------------------------------------
def test_scale_factor_is_the_loss_of_the_downscaled_inputs_with_a_scaled_sigma_xy() -> None:
    images = torch.from_numpy(rgb_images(2, 20, 24))
    seg = torch.from_numpy(segmentations(2, 3, 20, 24)).requires_grad_(True)
    rois = torch.from_numpy(rois_with_holes(2, 20, 24))
    loss = GatedCRFLoss(2.0, [(0.8, 6.0, 20.0), (0.3, 4.0, None)], radius=3, scale_factor=0.5)(images, seg, rois)
    loss.backward()
    small_seg = F.interpolate(seg.detach(), scale_factor=0.5, mode="bilinear", align_corners=False)
    small_seg.requires_grad_(True)
    small = GatedCRFLoss(2.0, KERNELS, radius=3)(
        F.interpolate(images, scale_factor=0.5), small_seg, F.interpolate(rois[:, None], scale_factor=0.5)[:, 0])
    small.backward()
    assert small_seg.shape == (2, 3, 10, 12)
    assert float(loss.detach()) == pytest.approx(float(small.detach()), rel=1e-6)
    full = seg.detach().requires_grad_(True)
    (expected,) = torch.autograd.grad(
        F.interpolate(full, scale_factor=0.5, mode="bilinear", align_corners=False), full, small_seg.grad)
    assert torch.allclose(seg.grad, expected, rtol=1e-5, atol=1e-9)


@pytest.mark.parametrize("normalize", [False, True])
def test_batch_is_the_mean_of_the_images(normalize: bool) -> None:
    images = torch.from_numpy(rgb_images(3, 10, 12))
    seg, rois = torch.from_numpy(segmentations(3, 3, 10, 12)), torch.from_numpy(rois_with_holes(3, 10, 12))
    module = GatedCRFLoss(1.5, KERNELS, radius=3, normalize=normalize)
    parts = [float(module(images[i:i + 1], seg[i:i + 1], rois[i:i + 1])) for i in range(3)]
    assert float(module(images, seg, rois)) == pytest.approx(sum(parts) / 3, rel=1e-6)


def test_under_bfloat16_autocast_the_loss_is_float32_and_equals_fp32() -> None:
    images, rois = torch.from_numpy(rgb_images(1, 12, 12)), torch.ones(1, 12, 12)
    logits = torch.randn(1, 4, 12, 12, generator=torch.Generator().manual_seed(3))
    conv = torch.nn.Conv2d(4, 3, 1)
    module = GatedCRFLoss(1.0, KERNELS, radius=3, scale_factor=0.5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        seg = torch.softmax(conv(logits), dim=1)
        loss = module(images, seg, rois)
    assert seg.dtype == torch.bfloat16 and loss.dtype == torch.float32 and loss.shape == (1,)
    loss.backward()
    assert conv.weight.grad is not None and torch.isfinite(conv.weight.grad).all()
    assert float(loss.detach()) == float(module(images, seg.detach().float(), rois))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_on_cuda_the_loss_stays_on_the_device_and_equals_the_cpu() -> None:  # pragma: no cover - no GPU here
    images, seg, rois = rgb_images(2, 9, 11), segmentations(2, 3, 9, 11), rois_with_holes(2, 9, 11)
    module = GatedCRFLoss(0.7, KERNELS, radius=3, normalize=True)
    cpu_loss, cpu_grad = module_loss_and_grad(module, images, seg, rois)
    s = torch.from_numpy(seg).cuda().requires_grad_(True)
    loss = module(torch.from_numpy(images).cuda(), s, torch.from_numpy(rois).cuda())
    loss.backward()
    assert loss.device == s.device and s.grad.device == s.device and loss.dtype == torch.float32
    assert float(loss.detach()) == pytest.approx(float(cpu_loss), rel=1e-5)
    assert torch.allclose(s.grad.cpu(), cpu_grad, rtol=1e-4, atol=1e-7)


# ---- the layer ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("params,normalize", [(KERNEL_TEXT + " radius: 2", False),
                                              (KERNEL_TEXT + " radius: 3 normalize: true scale_factor: 0.5", True)])
def test_layer_equals_the_module_on_rgb_images_with_the_fork_roi(params: str, normalize: bool) -> None:
    bgr, rgb = caffe_inputs(rgb_images(2, 10, 12))
    seg = segmentations(2, 3, 10, 12)
    layer = make_layer([bgr.shape, seg.shape], params)
    s = torch.from_numpy(seg).requires_grad_(True)
    (top,) = layer(torch.from_numpy(bgr), s)
    top.sum().backward()
    rois = fork_roi(torch.from_numpy(bgr))
    assert 0 < float(rois.sum()) < rois.numel()
    module = GatedCRFLoss(1.0, KERNELS, radius=layer.radius, scale_factor=layer.scale_factor, normalize=normalize)
    loss, grad = module_loss_and_grad(module, rgb, seg, rois)
    assert top.shape == (1, 1, 1, 1) and top.dtype == torch.float32
    assert float(top.detach()) == pytest.approx(float(loss), rel=1e-5)
    assert torch.allclose(s.grad, grad, rtol=1e-4, atol=1e-8)


def test_layer_defaults_are_the_papers_rgbxy_kernel() -> None:
    param = text_format.Parse('name: "g" type: "GatedCRFLoss" bottom: "a" bottom: "b" loss_weight: 1',
                              caffe_pb2.LayerParameter())
    layer = layer_class("GatedCRFLoss")(param, [(1, 3, 4, 4), (1, 2, 4, 4)], caffe_pb2.TRAIN)
    assert layer.kernels == (GatedKernel(1.0, 6.0, 25.5),)
    assert (layer.radius, layer.scale_factor, layer.normalize, layer.num_tops) == (5, 1.0, False, 1)


def test_layer_in_a_net_gives_the_weighted_loss_and_its_gradient() -> None:
    bgr, rgb = caffe_inputs(rgb_images(2, 9, 11))
    seg = segmentations(2, 3, 9, 11)
    net_text = f"""
        layer {{ name: "data" type: "Input" top: "data" input_param {{ shape {{ dim: 2 dim: 3 dim: 9 dim: 11 }} }} }}
        layer {{ name: "seg" type: "Input" top: "seg" input_param {{ shape {{ dim: 2 dim: 3 dim: 9 dim: 11 }} }} }}
        layer {{ name: "gcrf" type: "GatedCRFLoss" bottom: "data" bottom: "seg" top: "loss" loss_weight: 2
                propagate_down: false propagate_down: true gated_crf_loss_param {{ {KERNEL_TEXT} radius: 2 }} }}"""
    net = Net(text_format.Parse(net_text, caffe_pb2.NetParameter()), caffe_pb2.TRAIN)
    s = torch.from_numpy(seg).requires_grad_(True)
    objective = net.forward({"data": torch.from_numpy(bgr), "seg": s})
    objective.backward()
    rois = fork_roi(torch.from_numpy(bgr)).numpy()
    expected, expected_grad = brute_force(rgb, seg, rois, KERNELS, 2, False)
    assert float(objective.detach()) == pytest.approx(2 * expected, rel=1e-5)
    assert float(net.blob_data["loss"].detach()) == pytest.approx(expected, rel=1e-5)
    assert np.abs(s.grad.numpy() - 2 * expected_grad).max() <= 1e-4 * np.abs(2 * expected_grad).max()


def test_missing_loss_weight_warns(caplog) -> None:
    with caplog.at_level(logging.WARNING, logger="rloss"):
        make_layer([(1, 3, 6, 7), (1, 2, 6, 7)], extra="propagate_down: false propagate_down: true")
    assert any("'gcrf'" in r.getMessage() and "loss_weight" in r.getMessage() for r in caplog.records)


def test_propagate_down_into_the_image_is_refused() -> None:
    with pytest.raises(LayerError, match=r"'gcrf'.*GatedCRFLoss.*propagate_down: false, true"):
        make_layer([(1, 3, 4, 4), (1, 2, 4, 4)], extra="loss_weight: 1 propagate_down: true propagate_down: true")
    net_text = """input: "data" input_shape { dim: 1 dim: 3 dim: 6 dim: 7 }
        input: "seg" input_shape { dim: 1 dim: 2 dim: 6 dim: 7 }
        layer { name: "gcrf" type: "GatedCRFLoss" bottom: "data" bottom: "seg" top: "loss" loss_weight: 1
                propagate_down: true propagate_down: true }"""
    with pytest.raises(NetError, match="propagate_down"):
        Net(text_format.Parse(net_text, caffe_pb2.NetParameter()), caffe_pb2.TRAIN)


# ---- errors -------------------------------------------------------------------------------------------------
def _call(images=(1, 3, 6, 7), seg=(1, 2, 6, 7), rois=(1, 6, 7), poison: str = "", **options):
    tensors = {"images": torch.rand(images) * 255, "seg": torch.rand(seg), "rois": torch.ones(rois)}
    if poison:
        tensors[poison].view(-1)[3] = float("nan")
    module = GatedCRFLoss(1.0, options.pop("kernels", KERNELS), **options)
    return module(tensors["images"], tensors["seg"], tensors["rois"])


@pytest.mark.parametrize("call,message", [
    (lambda: _call(images=(1, 1, 6, 7)), r"images must have shape \(N, 3, H, W\)"),
    (lambda: _call(rois=(1, 6, 6)), r"N, H and W must agree.*\(1, 6, 6\)"),
    (lambda: _call(seg=(2, 2, 6, 7)), r"N, H and W must agree"),
    (lambda: _call(poison="images"), r"images of image 0 .*NaN or Inf"),
    (lambda: _call(poison="seg"), r"segmentations of image 0 .*NaN or Inf"),
    (lambda: _call(poison="rois"), r"rois of image 0 .*NaN or Inf"),
    (lambda: _call(kernels=[(1.0, 0.0, 20.0)]), r"kernel 0: sigma_xy must be a finite number > 0, got 0\.0"),
    (lambda: _call(kernels=[(1.0, 3.0, None), (1.0, 3.0, -5.0)]), r"kernel 1: sigma_rgb must be .*> 0, got -5"),
    (lambda: _call(kernels=[(float("inf"), 3.0, 20.0)]), r"kernel 0: weight must be finite, got inf"),
    (lambda: _call(kernels=[]), r"needs at least one kernel"),
    (lambda: _call(kernels=[{"weight": 1.0, "sigma": 3.0}]), r"kernels must be GatedKernel\(weight, sigma_xy"),
    (lambda: _call(radius=0), r"radius must be an integer >= 1, got 0"),
    (lambda: _call(radius=1.5), r"radius must be an integer >= 1, got 1\.5"),
    (lambda: _call(scale_factor=0.0), r"scale_factor must be a finite number > 0, got 0\.0"),
    (lambda: _call(scale_factor=0.01), r"scale_factor 0\.01 shrinks the 6x7 images"),
    (lambda: GatedCRFLoss(1.0, KERNELS, normalize=True)(torch.rand(2, 3, 6, 7), torch.rand(2, 2, 6, 7),
                                                        torch.stack([torch.ones(6, 7), torch.zeros(6, 7)])),
     r"normalize divides by the sum of gated affinities, which is 0 for image 1: .*empty"),
])
def test_module_rejects_bad_input_clearly(call, message: str) -> None:
    with pytest.raises(RlossError, match=rf"^GatedCRFLoss: {message}"):
        call()


@pytest.mark.parametrize("params,message", [
    ("kernel { xy_std: 0 }", r"gated_crf_loss_param\.kernel\[0\]\.xy_std must be a finite number > 0, got 0"),
    ("kernel { xy_std: 3 } kernel { rgb_std: -1 }",
     r"gated_crf_loss_param\.kernel\[1\]\.rgb_std must be a finite number > 0, got -1"),
    ("kernel { weight: nan }", r"gated_crf_loss_param\.kernel\[0\]\.weight must be finite, got nan"),
    ("radius: 0", r"gated_crf_loss_param\.radius must be >= 1, got 0"),
    ("scale_factor: -1", r"gated_crf_loss_param\.scale_factor must be a finite number > 0, got -1"),
])
def test_layer_rejects_bad_parameters_naming_the_layer(params: str, message: str) -> None:
    with pytest.raises(LayerError, match=rf"'gcrf' \(type GatedCRFLoss\): {message}"):
        make_layer([(1, 3, 4, 4), (1, 2, 4, 4)], params)


def test_layer_rejects_bad_bottoms_naming_the_layer() -> None:
    with pytest.raises(LayerError, match=r"'gcrf'.*\(1, 3, 8, 8\).*\(1, 2, 8, 7\)"):
        make_layer([(1, 3, 8, 8), (1, 2, 8, 7)])
    layer = make_layer([(1, 3, 8, 8), (1, 2, 8, 8)], KERNEL_TEXT + " normalize: true")
    seg = torch.rand(1, 2, 8, 8)
    with pytest.raises(LayerError, match=r"'gcrf'.*which is 0 for image 0"):
        layer(torch.zeros(1, 3, 8, 8), seg)  # all padding: an empty roi
    seg[0, 1, 2, 3] = float("nan")
    with pytest.raises(LayerError, match=r"'gcrf'.*segmentations of image 0 .*NaN or Inf"):
        layer(torch.rand(1, 3, 8, 8) * 50, seg)
