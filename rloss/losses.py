"""The DenseCRF regularised loss for PyTorch users, and the autograd rule it shares with the Caffe layer.

One implementation, two faces: `DenseCRFLossFunction` computes the relaxed Potts energy
`-(1/N) sum_n sum_c <m S_c, A(m S_c)>` with the fork's unnormalised permutohedral filter A and back-
propagates the fork's rule `-(2/N) A(m S) * m`. The Caffe layer (`rloss.layers.crf`) feeds it
the mean-subtracted BGR data blob and the mask derived from it; the `DenseCRFLoss` module below feeds it
what the PyTorch port does: RGB images, an explicit ROI and optional down-scaling.
"""

from __future__ import annotations

import math
from typing import Callable, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from rloss.errors import LatticeError, RlossError
from rloss.lattice import DenseCRFLossTerms

ErrorFactory = Callable[[str], Exception]


class Terms(Protocol):
    """The operator side of the loss (for the lattice: `rloss.lattice.DenseCRFLossTerms`)."""

    def energy(self, segmentation: torch.Tensor) -> torch.Tensor:
        """<m S_c, A(m S)_c> per image and class, (N, K), for S (N, K, H, W) on the CPU."""

    def gradient(self, scale: float) -> torch.Tensor:
        """scale * A(m S) m (N, K, H, W) for the S of the last energy()."""


class DenseCRFLossFunction(torch.autograd.Function):
    """loss = -(1/N) sum_{n,c} <m S_c, A(m S_c)>, gradient -(2/N) A(m S) * m.

    The backward is the fork's rule, not the autograd derivative of the forward: it equals the true
    gradient only for a symmetric A, and the lattice is only approximately symmetric.
    `terms` keeps what forward computed (for the lattice: the blurred lattice values), so backward is
    a single slice. The loss and the gradient go back to the segmentation's device and floating dtype.
    """

    @staticmethod
    def forward(ctx, segmentation: torch.Tensor, terms: Terms,  # type: ignore[override]
                make_error: ErrorFactory) -> torch.Tensor:
        try:
            per_class = terms.energy(segmentation.detach().to("cpu"))
        except LatticeError as error:
            raise make_error(str(error)) from None
        count = segmentation.shape[0]
        loss = (-per_class.sum() / count).to(segmentation.dtype)
        _check_loss(loss, segmentation, make_error)
        ctx.terms, ctx.make_error = terms, make_error
        ctx.scale = -2.0 / count
        ctx.target = (segmentation.device, segmentation.dtype)
        return loss.to(segmentation.device)

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):  # type: ignore[override]
        top_diff = float(grad_output)
        if not math.isfinite(top_diff):
            raise ctx.make_error(f"the gradient is not finite: the gradient arriving on the loss is {top_diff}")
        try:
            grad = ctx.terms.gradient(ctx.scale * top_diff)
        except LatticeError as error:
            raise ctx.make_error(str(error)) from None
        return grad.to(*ctx.target), None, None


def _check_loss(loss: torch.Tensor, segmentation: torch.Tensor, make_error: ErrorFactory) -> None:
    """The fork aborts on a NaN loss or gradient; we raise instead, saying why. The rule: the
    segmentation must be finite (the lattice refuses NaN and Inf while splatting it), and the loss, in
    the segmentation's dtype, and its gradient must come out finite (the lattice refuses a gradient
    that overflows float32 while slicing it): finite but huge values overflow."""
    value = float(loss)
    if math.isfinite(value):
        return
    largest = float(segmentation.detach().abs().max())
    raise make_error(
        f"the loss is not finite ({value} in {segmentation.dtype}): the segmentation's values are too large "
        f"(largest |value| {largest:.3g}; the loss expects probabilities in [0, 1])"
    )


def densecrf_loss(image: torch.Tensor, segmentation: torch.Tensor, mask: torch.Tensor | None, sigma_rgb: float,
                  sigma_xy: float, make_error: ErrorFactory) -> torch.Tensor:
    """The DenseCRF loss (a 0-d tensor on the segmentation's device) of segmentation (N,K,H,W) over
    image (N,C,H,W) restricted to mask (N,H,W), or with mask None to the fork's mask of the image
    (`caffe_roi_mask`, computed in C++); lattice features (x/sigma_xy, y/sigma_xy, c/sigma_rgb) with
    the image's channels in their stored order. Lattice errors come back as `make_error(...)`."""
    image_cpu = image.detach().to("cpu", torch.float32)
    mask_cpu = None if mask is None else mask.detach().to("cpu", torch.float32)
    terms = DenseCRFLossTerms(image_cpu, sigma_rgb, sigma_xy, mask_cpu)
    return DenseCRFLossFunction.apply(segmentation, terms, make_error)


def downscaled(factor: float, images: torch.Tensor, segmentations: torch.Tensor, rois: torch.Tensor | None,
               make_error: ErrorFactory) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """The port's scale_factor: images and rois resampled nearest, segmentations bilinear
    (align_corners=False), to floor(size * factor); the loss then takes sigma_xy * factor. Autograd
    carries the gradient back through the bilinear resampling. Sizes that would reach 0 are refused
    before F.interpolate fails on them."""
    if factor == 1.0:
        return images, segmentations, rois
    height, width = images.shape[2:]
    scaled = (math.floor(height * factor), math.floor(width * factor))
    if min(scaled) < 1:
        raise make_error(f"scale_factor {factor:g} shrinks the {height}x{width} images to {scaled[0]}x{scaled[1]} "
                         f"pixels (the loss needs at least 1x1): use a scale_factor of at least 1/{min(height, width)}")
    images = F.interpolate(images, scale_factor=factor)
    segmentations = F.interpolate(segmentations, scale_factor=factor, mode="bilinear", align_corners=False)
    if rois is not None:
        rois = F.interpolate(rois.unsqueeze(1), scale_factor=factor).squeeze(1)
    return images, segmentations, rois


def _module_error(message: str) -> RlossError:
    return RlossError(f"DenseCRFLoss: {message}")


class DenseCRFLoss(nn.Module):
    """The PyTorch port's DenseCRFLoss(weight, sigma_rgb, sigma_xy, scale_factor).

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
        images, segmentations, rois = downscaled(self.scale_factor, images.float(), segmentations.float(),
                                                 rois.float(), _module_error)
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
