"""The size-constraint loss (Kervadec et al., "Constrained-CNN losses for weakly supervised segmentation",
MIDL 2018 / MedIA 2019): a quadratic penalty on each class's soft size leaving an interval [a, b].

With m the roi, each image n and class k has the soft size V_nk = sum_i m_i S_nki; the loss is
(1/N) sum_n sum_k relu(a_nk - V_nk)^2 + relu(V_nk - b_nk)^2, zero while every size lies within its
bounds. With `normalize` sizes and bounds are fractions of the roi's pixel count, so one pair of
bounds fits every crop size. Plain torch on the segmentation's device; autograd's gradient is exact.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from rloss.losses.common import ErrorFactory, check_finite, module_error


def size_constraint_loss(segmentations: torch.Tensor, rois: torch.Tensor, lower: torch.Tensor, upper: torch.Tensor,
                         normalize: bool, make_error: ErrorFactory) -> torch.Tensor:
    """The loss (a 0-d float32 tensor on the segmentations' device) of segmentations (N,K,H,W) within
    rois (N,H,W) for bounds lower, upper of shape (N,K), or (K,) for the same bounds on every image.
    Bad input raises `make_error(...)` naming the image (and class) at fault."""
    _check_shapes(segmentations, rois, lower, upper, make_error)
    with torch.autocast(segmentations.device.type, enabled=False):
        s, m = segmentations.float(), rois.to(segmentations.device, torch.float32)
        lower, upper = (b.to(s.device, torch.float32).expand(s.shape[:2]) for b in (lower, upper))
        check_finite(s, "the segmentations", make_error)
        check_finite(m, "the rois", make_error)
        _check_bounds(lower, upper, normalize, make_error)
        sizes = (s * m[:, None]).sum(dim=(2, 3))
        if normalize:
            sizes = sizes / _roi_sizes(m, make_error)[:, None]
        penalty = F.relu(lower - sizes) ** 2 + F.relu(sizes - upper) ** 2
        return penalty.sum() / s.shape[0]


def _check_shapes(segmentations: torch.Tensor, rois: torch.Tensor, lower: torch.Tensor, upper: torch.Tensor,
                  make_error: ErrorFactory) -> None:
    shapes = (f"segmentations {tuple(segmentations.shape)}, rois {tuple(rois.shape)}, lower {tuple(lower.shape)}, "
              f"upper {tuple(upper.shape)}")
    if segmentations.ndim != 4 or min(segmentations.shape) < 1:
        raise make_error(f"segmentations must be a non-empty (N, K, H, W); got {shapes}")
    n, k, h, w = segmentations.shape
    if tuple(rois.shape) != (n, h, w):
        raise make_error(f"rois must be (N, H, W) = {(n, h, w)}; got {shapes}")
    for bound in (lower, upper):
        if tuple(bound.shape) not in ((n, k), (k,)):
            raise make_error(f"lower and upper must be (N, K) = {(n, k)} or (K,) = {(k,)}; got {shapes}")


def _check_bounds(lower: torch.Tensor, upper: torch.Tensor, normalize: bool, make_error: ErrorFactory) -> None:
    """Finite bounds with 0 <= lower <= upper (<= 1 with normalize); one reduction when they are fine."""
    check_finite(lower, "the lower bounds", make_error)
    check_finite(upper, "the upper bounds", make_error)
    unit = " (fractions of the roi)" if normalize else " (in pixels)"
    rules = [(lower < 0, "the lower bound {lo:g} is negative"),
             (lower > upper, "the lower bound {lo:g} exceeds the upper bound {up:g}")]
    if normalize:
        rules.append((upper > 1, "the upper bound {up:g} exceeds 1"))
    if not bool(torch.stack([bad.any() for bad, _ in rules]).any()):
        return
    for bad, message in rules:
        if bool(bad.any()):
            n, k = (int(i) for i in bad.nonzero()[0])
            text = message.format(lo=float(lower[n, k]), up=float(upper[n, k]))
            raise make_error(f"{text}{unit} for image {n}, class {k}")


def _roi_sizes(rois: torch.Tensor, make_error: ErrorFactory) -> torch.Tensor:
    """Each image's roi pixel count: the normalized sizes divide by it, so an empty roi is refused."""
    sizes = rois.sum(dim=(1, 2))
    empty = sizes <= 0
    if bool(empty.any()):
        raise make_error(f"the region of interest of image {int(empty.nonzero()[0])} is empty: normalize divides "
                         "by its size, which is 0")
    return sizes


_module_error = module_error("SizeConstraintLoss")


class SizeConstraintLoss(nn.Module):
    """`SizeConstraintLoss(weight, normalize=False)(segmentations, rois, lower, upper)`.

    segmentations (N,K,H,W) softmax probabilities, rois (N,H,W) (1 = counted), lower and upper (N,K)
    bounds on each class's soft size, or (K,) for the same bounds on every image; in pixels, or with
    `normalize` fractions in [0, 1] of the roi's pixel count. A class known absent takes [0, 0].
    Returns weight * loss as a float32 tensor of shape (1,) on the segmentations' device (float32
    inside, also under autocast).
    """

    def __init__(self, weight: float, normalize: bool = False) -> None:
        super().__init__()
        self.weight = float(weight)
        self.normalize = bool(normalize)

    def forward(self, segmentations: torch.Tensor, rois: torch.Tensor, lower: torch.Tensor,
                upper: torch.Tensor) -> torch.Tensor:
        loss = size_constraint_loss(segmentations, rois, lower, upper, self.normalize, _module_error)
        return (self.weight * loss).reshape(1)

    def extra_repr(self) -> str:
        return f"weight={self.weight}, normalize={self.normalize}"
