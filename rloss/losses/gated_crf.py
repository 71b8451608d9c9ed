"""The Gated CRF loss (Obukhov et al., 2019) for PyTorch users, and the computation the Caffe layer shares.

Per image n, over the ordered pairs (i, j) of distinct pixels with j in the (2r+1)^2 window of i
(clipped at the borders), with the roi m as the gate and the Potts compatibility:

    E_n = sum_{i, j} m_i m_j K_ij (1 - sum_k S_ik S_jk),   K_ij = sum_kernels w exp(-|p_i - p_j|^2 / (2 sigma_xy^2)
                                                                                 - |c_i - c_j|^2 / (2 sigma_rgb^2)),

and the loss is (1/N) sum_n E_n, or with `normalize` (1/N) sum_n E_n / Z_n, Z_n = sum_{i, j} m_i m_j K_ij.
The window is walked one offset at a time, half of them (K is symmetric, so each unordered pair is
visited once and counted twice), and the backward recomputes the affinities per offset: memory stays
O(N K H W) whatever the radius, on any device, without leaving it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Optional, Union

import torch
from torch import nn

from rloss.losses.common import ErrorFactory, check_finite, check_image_inputs, check_positive, downscaled, module_error


@dataclass(frozen=True)
class GatedKernel:
    """One Gaussian of the affinity: weight * exp(-|dp|^2 / (2 sigma_xy^2) - |dc|^2 / (2 sigma_rgb^2)), sigma_xy
    in pixels of the full-size image, sigma_rgb in the image's units; sigma_rgb None = positions only."""

    weight: float
    sigma_xy: float
    sigma_rgb: float | None = None


KernelSpec = Union[GatedKernel, Mapping[str, Optional[float]], Sequence[Optional[float]]]
Slices = tuple[slice, slice]


def _pair_slices(dy: int, dx: int, height: int, width: int) -> tuple[Slices, Slices]:
    """(rows, columns) of the pixels i whose partner j = i + (dy, dx) is inside the image, and of those j."""
    first = (slice(0, height - dy), slice(max(0, -dx), width - max(0, dx)))
    second = (slice(dy, height), slice(max(0, dx), width + min(0, dx)))
    return first, second


def _half_window(radius: int, height: int, width: int) -> list[tuple[int, int]]:
    """One offset of each pair of opposite window offsets ((dy, dx) and (-dy, -dx)), the centre excluded,
    limited to the offsets that fit in the image."""
    ry, rx = min(radius, height - 1), min(radius, width - 1)
    return [(dy, dx) for dy in range(ry + 1) for dx in range(-rx, rx + 1) if dy > 0 or dx > 0]


def _gated_affinities(images: torch.Tensor, rois: torch.Tensor, kernels: tuple[GatedKernel, ...],
                      dy: int, dx: int) -> tuple[torch.Tensor, Slices, Slices]:
    """m_i m_j K_ij (N, h, w) for the pairs at offset (dy, dx), with the slices of i and of j."""
    first, second = _pair_slices(dy, dx, images.shape[2], images.shape[3])
    gate = rois[:, first[0], first[1]] * rois[:, second[0], second[1]]
    squared_xy = dy * dy + dx * dx
    squared_rgb = None
    affinity: torch.Tensor | float = 0.0
    for kernel in kernels:
        spatial = kernel.weight * math.exp(-squared_xy / (2 * kernel.sigma_xy ** 2))
        if kernel.sigma_rgb is None:
            affinity = affinity + spatial
            continue
        if squared_rgb is None:
            squared_rgb = (images[..., first[0], first[1]] - images[..., second[0], second[1]]).square().sum(1)
        affinity = affinity + spatial * torch.exp(squared_rgb * (-0.5 / kernel.sigma_rgb ** 2))
    return gate * affinity, first, second


class GatedPottsEnergy(torch.autograd.Function):
    """(E_n, Z_n) per image, (N,) each (see the module docstring); Z_n does not depend on S.

    The exact gradient dE_n/dS_i = -2 sum_j m_i m_j K_ij S_j (K symmetric), recomputed offset by offset
    in backward rather than kept from forward; images and rois get none."""

    @staticmethod
    def forward(ctx, segmentations: torch.Tensor, images: torch.Tensor, rois: torch.Tensor,  # type: ignore[override]
                kernels: tuple[GatedKernel, ...], radius: int) -> tuple[torch.Tensor, torch.Tensor]:
        disagreement = segmentations.new_zeros(segmentations.shape[0])
        total = segmentations.new_zeros(segmentations.shape[0])
        height, width = segmentations.shape[2:]
        for dy, dx in _half_window(radius, height, width):
            pairs, (ri, ci), (rj, cj) = _gated_affinities(images, rois, kernels, dy, dx)
            agreement = (segmentations[..., ri, ci] * segmentations[..., rj, cj]).sum(1)
            disagreement += (pairs * (1 - agreement)).sum((1, 2))
            total += pairs.sum((1, 2))
        ctx.save_for_backward(segmentations, images, rois)
        ctx.kernels, ctx.radius = kernels, radius
        ctx.mark_non_differentiable(total)
        return 2 * disagreement, 2 * total

    @staticmethod
    def backward(ctx, grad_energy: torch.Tensor, _grad_total: torch.Tensor):  # type: ignore[override]
        segmentations, images, rois = ctx.saved_tensors
        scale = (-2 * grad_energy).reshape(-1, 1, 1, 1)
        grad = torch.zeros_like(segmentations)
        with torch.autocast(segmentations.device.type, enabled=False):
            for dy, dx in _half_window(ctx.radius, *segmentations.shape[2:]):
                pairs, (ri, ci), (rj, cj) = _gated_affinities(images, rois, ctx.kernels, dy, dx)
                weights = scale * pairs.unsqueeze(1)
                grad[..., ri, ci].addcmul_(weights, segmentations[..., rj, cj])
                grad[..., rj, cj].addcmul_(weights, segmentations[..., ri, ci])
        return grad, None, None, None, None


def gated_crf_loss(images: torch.Tensor, segmentations: torch.Tensor, rois: torch.Tensor,
                   kernels: tuple[GatedKernel, ...], radius: int, scale_factor: float, normalize: bool,
                   make_error: ErrorFactory) -> torch.Tensor:
    """The loss (a 0-d float32 tensor on the segmentations' device, without the weight) of segmentations
    (N,K,H,W) over images (N,3,H,W) gated by rois (N,H,W), after `downscaled` by scale_factor (sigma_xy
    scaled with it). Computed in float32 with autocast off: it is a small difference of large sums."""
    check_image_inputs(images, segmentations, rois, make_error)
    for tensor, what in ((images, "images"), (segmentations, "segmentations"), (rois, "rois")):
        check_finite(tensor, what, make_error)
    with torch.autocast(segmentations.device.type, enabled=False):
        images, segmentations, rois = downscaled(scale_factor, images.detach().float(), segmentations.float(),
                                                 rois.detach().float(), make_error)
        if scale_factor != 1.0:
            kernels = tuple(GatedKernel(k.weight, k.sigma_xy * scale_factor, k.sigma_rgb) for k in kernels)
        energy, total = GatedPottsEnergy.apply(segmentations, images, rois, kernels, radius)
        if normalize:
            empty = (total <= 0).nonzero()
            if len(empty):
                n = int(empty[0])
                raise make_error(f"normalize divides by the sum of gated affinities, which is {float(total[n]):g} "
                                 f"for image {n}: its region of interest is empty or holds no two pixels within "
                                 f"radius {radius}")
            energy = energy / total
        return energy.sum() / energy.shape[0]


_module_error = module_error("GatedCRFLoss")


def _as_kernel(spec: KernelSpec) -> GatedKernel:
    if isinstance(spec, GatedKernel):
        return spec
    if isinstance(spec, Mapping):
        return GatedKernel(**spec)
    return GatedKernel(*spec)


def checked_kernels(specs: Sequence[KernelSpec], make_error: ErrorFactory) -> tuple[GatedKernel, ...]:
    """The kernels as GatedKernel, each with a finite weight and sigmas > 0 (sigma_rgb may be None)."""
    try:
        kernels = tuple(_as_kernel(spec) for spec in specs)
    except TypeError as error:
        raise make_error(f"kernels must be GatedKernel(weight, sigma_xy, sigma_rgb=None), a dict or a tuple of "
                         f"those fields: {error}") from None
    if not kernels:
        raise make_error("needs at least one kernel")
    for index, kernel in enumerate(kernels):
        if not math.isfinite(float(kernel.weight)):
            raise make_error(f"kernel {index}: weight must be finite, got {kernel.weight!r}")
        sigmas = {f"kernel {index}: sigma_xy": kernel.sigma_xy}
        if kernel.sigma_rgb is not None:
            sigmas[f"kernel {index}: sigma_rgb"] = kernel.sigma_rgb
        check_positive(sigmas, make_error)
    return kernels


class GatedCRFLoss(nn.Module):
    """The Gated CRF loss: `GatedCRFLoss(weight, kernels, radius=5, scale_factor=1.0, normalize=False)`.

    kernels: a non-empty sequence of `GatedKernel(weight, sigma_xy, sigma_rgb=None)`, or of dicts / tuples
    with those fields, e.g. `[{"weight": 1.0, "sigma_xy": 6.0, "sigma_rgb": 25.5}]` (the paper's RGBXY
    kernel: sigma_rgb 0.1 of [0, 1] images). `loss(images, segmentations, rois)`: images (N,3,H,W) RGB in
    [0, 255], segmentations (N,K,H,W) softmax probabilities, rois (N,H,W) the gate (1 = counted).
    scale_factor as DenseCRFLoss: down-scale first, then sigma_xy * scale_factor. `normalize` divides
    each image's sum by its sum of gated affinities: the loss is then in [0, 1] per image and one weight
    fits every crop size. Returns weight * loss, float32 of shape (1,), on the segmentations' device.
    """

    def __init__(self, weight: float, kernels: Sequence[KernelSpec], radius: int = 5, scale_factor: float = 1.0,
                 normalize: bool = False) -> None:
        super().__init__()
        self.kernels = checked_kernels(kernels, _module_error)
        if int(radius) != radius or radius < 1:
            raise _module_error(f"radius must be an integer >= 1, got {radius!r}")
        check_positive({"scale_factor": scale_factor}, _module_error)
        self.weight = float(weight)
        self.radius = int(radius)
        self.scale_factor = float(scale_factor)
        self.normalize = bool(normalize)

    def forward(self, images: torch.Tensor, segmentations: torch.Tensor, rois: torch.Tensor) -> torch.Tensor:
        loss = gated_crf_loss(images, segmentations, rois, self.kernels, self.radius, self.scale_factor,
                              self.normalize, _module_error)
        return (self.weight * loss).reshape(1)

    def extra_repr(self) -> str:
        return (f"weight={self.weight}, kernels={list(self.kernels)}, radius={self.radius}, "
                f"scale_factor={self.scale_factor}, normalize={self.normalize}")
