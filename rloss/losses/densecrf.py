"""The DenseCRF regularised loss for PyTorch users, and the autograd rule it shares with the Caffe layer.

One implementation, two faces: `DenseCRFLossFunction` computes the relaxed Potts energy
`-(1/N) sum_n sum_c <m S_c, A(m S_c)>` with the fork's unnormalised permutohedral filter A and back-
propagates the fork's rule `-(2/N) A(m S) * m`. The Caffe layer (`rloss.layers.crf`) feeds it
the mean-subtracted BGR data blob and the mask derived from it; the `DenseCRFLoss` module below feeds it
what the PyTorch port does: RGB images, an explicit ROI and optional down-scaling.
"""

from __future__ import annotations

import math
from typing import Protocol

import torch

from rloss.errors import LatticeError
from rloss.lattice import DenseCRFLossTerms
from rloss.losses.common import ErrorFactory, LatticeLossModule, module_error


class Terms(Protocol):
    """The operator side of the loss (for the lattice: `rloss.lattice.DenseCRFLossTerms`)."""

    def energy(self, segmentation: torch.Tensor) -> torch.Tensor:
        """<m S_c, A(m S)_c> per image and class, (N, K), for S (N, K, H, W) on the CPU."""

    def gradient(self, scale: float) -> torch.Tensor:
        """scale * A(m S) m (N, K, H, W) for the S of the last energy()."""


class DenseCRFLossFunction(torch.autograd.Function):
    """loss = -(1/N) sum_{n,c} <m S_c, A(m S_c)> / z_n, gradient -(2/N) A(m S) * m / z_n, with z_n = 1, or
    with `normalize` z_n = <m, A m> of image n (its roi's pixel count times the filter's mean response
    there: the loss then lies in [-1, 0] whatever the crop size, scale_factor or sigmas).

    The backward is the fork's rule, not the autograd derivative of the forward: it equals the true
    gradient only for a symmetric A, and the lattice is only approximately symmetric. z_n does not
    depend on S. `terms` keeps what forward computed (for the lattice: the blurred lattice values), so
    backward is a single slice. The loss and the gradient go back to the segmentation's device and
    floating dtype.
    """

    @staticmethod
    def forward(ctx, segmentation: torch.Tensor, terms: Terms,  # type: ignore[override]
                make_error: ErrorFactory, normalize: bool = False) -> torch.Tensor:
        values = segmentation.detach().to("cpu")
        if normalize:  # one more channel of ones: its energy is <m, A m>
            values = torch.cat([values, torch.ones_like(values[:, :1])], dim=1)
        try:
            per_class = terms.energy(values)
        except LatticeError as error:
            raise make_error(str(error)) from None
        count = segmentation.shape[0]
        norms = _roi_norms(per_class, make_error) if normalize else None
        if norms is not None:
            per_class = per_class[:, :-1] / norms[:, None]
        loss = (-per_class.sum() / count).to(segmentation.dtype)
        _check_loss(loss, segmentation, make_error)
        ctx.terms, ctx.make_error, ctx.norms = terms, make_error, norms
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
        if ctx.norms is not None:
            grad = grad[:, :-1] / ctx.norms.to(grad.dtype)[:, None, None, None]
        return grad.to(*ctx.target), None, None, None


def _roi_norms(per_class: torch.Tensor, make_error: ErrorFactory) -> torch.Tensor:
    """<m, A m> per image (the last channel's energy); an empty roi has none to divide by."""
    norms = per_class[:, -1]
    empty = (norms <= 0).nonzero()
    if len(empty):
        raise make_error(f"the region of interest of image {int(empty[0])} is empty: normalize divides by its "
                         "size, which is 0")
    return norms


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
                  sigma_xy: float, make_error: ErrorFactory, normalize: bool = False) -> torch.Tensor:
    """The DenseCRF loss (a 0-d tensor on the segmentation's device) of segmentation (N,K,H,W) over
    image (N,C,H,W) restricted to mask (N,H,W), or with mask None to the fork's mask of the image
    (`caffe_roi_mask`, computed in C++); lattice features (x/sigma_xy, y/sigma_xy, c/sigma_rgb) with
    the image's channels in their stored order; `normalize` as in DenseCRFLossFunction. Lattice
    errors come back as `make_error(...)`."""
    image_cpu = image.detach().to("cpu", torch.float32)
    mask_cpu = None if mask is None else mask.detach().to("cpu", torch.float32)
    terms = DenseCRFLossTerms(image_cpu, sigma_rgb, sigma_xy, mask_cpu)
    return DenseCRFLossFunction.apply(segmentation, terms, make_error, normalize)


class DenseCRFLoss(LatticeLossModule):
    """The PyTorch port's DenseCRFLoss(weight, sigma_rgb, sigma_xy, scale_factor), and `normalize`.

    `loss(images, segmentations, rois)`: images (N,3,H,W) RGB in [0, 255] (the de-normalised network
    input), segmentations (N,K,H,W) softmax probabilities, rois (N,H,W) region-of-interest mask (1 =
    counted). With scale_factor != 1 all three are down-scaled first (images and rois nearest,
    segmentations bilinear with align_corners=False) and sigma_xy is multiplied by scale_factor.
    Returns weight * loss as a float32 tensor of shape (1,) (like the port) on the segmentations'
    device; the gradient reaches the segmentations through the down-scaling. The filtering runs on the
    CPU whatever the device; segmentations are cast to float32 inside (safe under autocast). With
    `normalize` each image's loss is divided by <m, A m> (see DenseCRFLossFunction).
    """

    make_error = staticmethod(module_error("DenseCRFLoss"))

    def __init__(self, weight: float, sigma_rgb: float, sigma_xy: float, scale_factor: float = 1.0,
                 normalize: bool = False) -> None:
        super().__init__(weight, sigma_rgb, sigma_xy, scale_factor)
        self.normalize = bool(normalize)

    def loss(self, images: torch.Tensor, segmentations: torch.Tensor, rois: torch.Tensor,
             sigma_xy: float) -> torch.Tensor:
        return densecrf_loss(images, segmentations, rois, self.sigma_rgb, sigma_xy, self.make_error, self.normalize)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, normalize={self.normalize}"
