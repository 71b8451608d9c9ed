"""The DenseCRF regularised loss for PyTorch users, and the autograd rule it shares with the Caffe layer.

One implementation, two faces: `DenseCRFLossFunction` computes the relaxed Potts energy
`-(1/N) sum_n sum_c <m S_c, A(m S_c)>` with the fork's unnormalised permutohedral filter A and back-
propagates the fork's rule `-(2/N) A(m S) * m` (spec 2.15). The Caffe layer (`rloss.layers.crf`) feeds it
the mean-subtracted BGR data blob and the mask derived from it; the `DenseCRFLoss` module below feeds it
what the PyTorch port does (spec 7.1): RGB images, an explicit ROI and optional down-scaling.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from rloss.errors import LatticeError, RlossError
from rloss.lattice import bilateral_filter

ErrorFactory = Callable[[str], Exception]
Kernel = Callable[[torch.Tensor], torch.Tensor]


class DenseCRFLossFunction(torch.autograd.Function):
    """loss = -(1/N) sum_{n,c} <m S_c, A(m S_c)>, gradient -(2/N) A(m S) * m.

    `kernel` applies A to a (N, K, H, W) CPU tensor of masked values. The backward is the fork's rule,
    not the autograd derivative of the forward: it equals the true gradient only for a symmetric A,
    and the lattice is only approximately symmetric (spec 2.15). A(mS) from forward is reused.
    Computation happens on the CPU in the segmentation's floating dtype (float32 for the faces, as the
    original's float32 dot products); the loss and the gradient go back to the segmentation's device.
    """

    @staticmethod
    def forward(ctx, segmentation: torch.Tensor, mask: torch.Tensor, kernel: Kernel,  # type: ignore[override]
                make_error: ErrorFactory) -> torch.Tensor:
        dtype = segmentation.dtype
        mask_cpu = mask.detach().to("cpu", dtype).unsqueeze(1)
        values = segmentation.detach().to("cpu") * mask_cpu
        filtered = kernel(values).to(dtype)
        per_class = -(values.flatten(2) * filtered.flatten(2)).sum(-1)  # the K dot products of each image
        _check_finite(per_class, "the loss per image and class", "the segmentation holds NaN or inf", make_error)
        count = segmentation.shape[0]
        ctx.make_error = make_error
        ctx.save_for_backward(filtered.mul_(mask_cpu))
        ctx.scale = -2.0 / count
        ctx.target = (segmentation.device, dtype)
        return (per_class.sum() / count).to(segmentation.device)

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):  # type: ignore[override]
        (masked_filtered,) = ctx.saved_tensors
        device, dtype = ctx.target
        grad = (masked_filtered * (ctx.scale * grad_output.to("cpu", dtype))).to(device, dtype)
        _check_finite(grad, "the gradient", "the gradient arriving on the loss is NaN or inf", ctx.make_error)
        return grad, None, None, None


def _check_finite(values: torch.Tensor, what: str, cause: str, make_error: ErrorFactory) -> None:
    """The fork aborts on a NaN loss or gradient; we raise instead, saying where it appeared.
    A finite sum proves every value finite in one pass; only otherwise are the values inspected."""
    if bool(torch.isfinite(values.sum())):
        return
    bad = ~torch.isfinite(values)
    if bool(bad.any()):
        where = tuple(int(i) for i in bad.nonzero()[0])
        raise make_error(
            f"{what} is not finite (first at index {where} of shape {tuple(values.shape)}): {cause}"
        )


def densecrf_loss(image: torch.Tensor, segmentation: torch.Tensor, mask: torch.Tensor, sigma_rgb: float,
                  sigma_xy: float, make_error: ErrorFactory) -> torch.Tensor:
    """The DenseCRF loss (a 0-d tensor on the segmentation's device) of segmentation (N,K,H,W) over
    image (N,C,H,W) restricted to mask (N,H,W); lattice features (x/sigma_xy, y/sigma_xy, c/sigma_rgb)
    with the image's channels in their stored order. Lattice errors come back as `make_error(...)`."""
    image_cpu = image.detach().to("cpu", torch.float32)

    def bilateral(values: torch.Tensor) -> torch.Tensor:
        try:
            return bilateral_filter(image_cpu, values.to(torch.float32), sigma_rgb, sigma_xy)
        except LatticeError as error:
            raise make_error(str(error)) from None

    return DenseCRFLossFunction.apply(segmentation, mask, bilateral, make_error)


def _module_error(message: str) -> RlossError:
    return RlossError(f"DenseCRFLoss: {message}")


class DenseCRFLoss(nn.Module):
    """The PyTorch port's DenseCRFLoss(weight, sigma_rgb, sigma_xy, scale_factor) (spec 7.1).

    `loss(images, segmentations, rois)`: images (N,3,H,W) RGB in [0, 255] (the de-normalised network
    input), segmentations (N,K,H,W) softmax probabilities, rois (N,H,W) region-of-interest mask (1 =
    counted). With scale_factor != 1 all three are down-scaled first (images and rois nearest,
    segmentations bilinear with align_corners=False) and sigma_xy is multiplied by scale_factor.
    Returns weight * loss as a float32 tensor of shape (1,) (like the port) on the segmentations'
    device; the gradient reaches the segmentations through the down-scaling. The filtering runs on the
    CPU whatever the device; segmentations are cast to float32 inside (safe under autocast).
    """

    def __init__(self, weight: float, sigma_rgb: float, sigma_xy: float, scale_factor: float = 1.0) -> None:
        super().__init__()
        for name, value in (("sigma_rgb", sigma_rgb), ("sigma_xy", sigma_xy), ("scale_factor", scale_factor)):
            if not (math.isfinite(float(value)) and float(value) > 0):
                raise _module_error(f"{name} must be a finite number > 0, got {value!r}")
        self.weight = float(weight)
        self.sigma_rgb = float(sigma_rgb)
        self.sigma_xy = float(sigma_xy)
        self.scale_factor = float(scale_factor)

    def forward(self, images: torch.Tensor, segmentations: torch.Tensor, rois: torch.Tensor) -> torch.Tensor:
        _check_module_shapes(images, segmentations, rois)
        images, segmentations, rois = images.float(), segmentations.float(), rois.float()
        if self.scale_factor != 1.0:
            images = F.interpolate(images, scale_factor=self.scale_factor)
            segmentations = F.interpolate(
                segmentations, scale_factor=self.scale_factor, mode="bilinear", align_corners=False
            )
            rois = F.interpolate(rois.unsqueeze(1), scale_factor=self.scale_factor).squeeze(1)
        if min(segmentations.shape[2:]) < 1:
            raise _module_error(f"scale_factor {self.scale_factor} leaves an empty image {tuple(segmentations.shape)}")
        loss = densecrf_loss(images, segmentations, rois, self.sigma_rgb, self.sigma_xy * self.scale_factor,
                             _module_error)
        return (self.weight * loss).reshape(1)

    def extra_repr(self) -> str:
        return (f"weight={self.weight}, sigma_rgb={self.sigma_rgb}, sigma_xy={self.sigma_xy}, "
                f"scale_factor={self.scale_factor}")


def _check_module_shapes(images: torch.Tensor, segmentations: torch.Tensor, rois: torch.Tensor) -> None:
    shapes = f"images {tuple(images.shape)}, segmentations {tuple(segmentations.shape)}, rois {tuple(rois.shape)}"
    if images.ndim != 4 or images.shape[1] != 3:
        raise _module_error(f"images must have shape (N, 3, H, W); got {shapes}")
    if segmentations.ndim != 4 or rois.ndim != 3:
        raise _module_error(f"segmentations must be (N, K, H, W) and rois (N, H, W); got {shapes}")
    n, _, h, w = images.shape
    if segmentations.shape[0] != n or segmentations.shape[2:] != (h, w) or tuple(rois.shape) != (n, h, w):
        raise _module_error(f"N, H and W must agree; got {shapes}")
    if min(segmentations.shape) < 1:
        raise _module_error(f"empty input: {shapes}")
