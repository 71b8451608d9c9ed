"""The normalized cut loss (Tang et al., CVPR 2018) on the DenseCRF loss's bilateral lattice filter A.

With m the roi, x_k = m S_k and d = A m, each class's soft segment pays its cut over its association,
<x_k, A(m - x_k)> / <x_k, d>; the loss is their sum over classes, averaged over the batch. It is a
ratio of two sums over the same pixels and the same A, so its scale does not change with the crop
size, the scale factor or the sigmas (it lies in [0, K]): unlike the DenseCRF loss it needs no
`normalize`. One lattice per image filters the K channels of x and the roi together.
"""

from __future__ import annotations

import math

import torch

from rloss.errors import LatticeError
from rloss.lattice import bilateral_filter
from rloss.losses.common import ErrorFactory, LatticeLossModule, check_finite, module_error


class NormalizedCutFunction(torch.autograd.Function):
    """loss = (1/N) sum_n sum_k cut_nk / assoc_nk, cut = <x_k, d> - <x_k, A x_k>, assoc = <x_k, d>.

    Backward is the derivative for a symmetric A (as the DenseCRF loss's rule): (1/N) m *
    [(d - 2 A x_k) / assoc - cut * d / assoc^2]; the lattice is only approximately symmetric. A class
    with no mass in the roi (assoc 0: a hard zero of S) contributes 0 and gets no gradient. The
    filtered values are kept from forward, so backward filters nothing.
    """

    @staticmethod
    def forward(ctx, segmentation: torch.Tensor, image: torch.Tensor,  # type: ignore[override]
                roi: torch.Tensor, sigma_rgb: float, sigma_xy: float, make_error: ErrorFactory) -> torch.Tensor:
        s = segmentation.detach().to("cpu", torch.float32)
        m = roi.detach().to("cpu", torch.float32)
        values = torch.cat([s, torch.ones_like(s[:, :1])], dim=1)  # the ones become d = A m
        try:
            filtered = bilateral_filter(image.detach().to("cpu", torch.float32), values, sigma_rgb, sigma_xy, mask=m)
        except LatticeError as error:
            raise make_error(str(error)) from None
        x = (s * m[:, None]).double()
        blurred, d = filtered[:, :-1].double(), filtered[:, -1:].double()
        roi_mass = (m[:, None].double() * d).sum(dim=(1, 2, 3))
        empty = (roi_mass <= 0).nonzero()
        if len(empty):
            raise make_error(f"the region of interest of image {int(empty[0])} is empty: the normalized cut "
                             "divides by its association, which is 0")
        assoc = (x * d).sum(dim=(2, 3))
        cut = assoc - (x * blurred).sum(dim=(2, 3))
        present = assoc > 0
        safe_assoc = torch.where(present, assoc, torch.ones_like(assoc))
        count = segmentation.shape[0]
        loss = torch.where(present, cut / safe_assoc, torch.zeros_like(cut)).sum() / count
        inverse = (present / safe_assoc)[:, :, None, None]
        ctx.gradient = (m[:, None].double() * ((d - 2 * blurred) * inverse
                                               - (cut[:, :, None, None] * inverse ** 2) * d)).float() / count
        ctx.make_error = make_error
        ctx.target = (segmentation.device, segmentation.dtype)
        return loss.to(segmentation.device, torch.float32)

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):  # type: ignore[override]
        top_diff = float(grad_output)
        if not math.isfinite(top_diff):
            raise ctx.make_error(f"the gradient is not finite: the gradient arriving on the loss is {top_diff}")
        return (ctx.gradient * top_diff).to(*ctx.target), None, None, None, None, None


def normalized_cut_loss(image: torch.Tensor, segmentation: torch.Tensor, roi: torch.Tensor, sigma_rgb: float,
                        sigma_xy: float, make_error: ErrorFactory) -> torch.Tensor:
    """The normalized cut loss (a 0-d float32 tensor on the segmentation's device) of segmentation
    (N,K,H,W) over image (N,C,H,W) (lattice features x/sigma_xy, y/sigma_xy, c/sigma_rgb) within roi
    (N,H,W); the filtering runs on the CPU."""
    check_finite(segmentation, "the segmentations", make_error)
    check_finite(roi, "the rois", make_error)
    return NormalizedCutFunction.apply(segmentation, image, roi, sigma_rgb, sigma_xy, make_error)


class NormalizedCutLoss(LatticeLossModule):
    """`NormalizedCutLoss(weight, sigma_rgb, sigma_xy, scale_factor)(images, segmentations, rois)` with
    the DenseCRFLoss module's conventions: images (N,3,H,W) RGB in [0, 255], segmentations (N,K,H,W)
    softmax probabilities, rois (N,H,W) (1 = counted); scale_factor down-scales all three (images
    and rois nearest, segmentations bilinear) and multiplies sigma_xy. Returns weight * loss, float32,
    shape (1,), on the segmentations' device.
    """

    make_error = staticmethod(module_error("NormalizedCutLoss"))

    def loss(self, images: torch.Tensor, segmentations: torch.Tensor, rois: torch.Tensor,
             sigma_xy: float) -> torch.Tensor:
        return normalized_cut_loss(images, segmentations, rois, self.sigma_rgb, sigma_xy, self.make_error)
