"""What every regularized loss module shares: its error type, argument checks, the port's down-scaling."""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from rloss.errors import RlossError

ErrorFactory = Callable[[str], Exception]


def module_error(module_name: str) -> ErrorFactory:
    """The error factory of one loss module: RlossError("<module_name>: <message>")."""
    return lambda message: RlossError(f"{module_name}: {message}")


def check_positive(values: dict[str, float], make_error: ErrorFactory) -> None:
    """Each named value must be a finite number > 0 (sigmas, scale factors)."""
    for name, value in values.items():
        if not (math.isfinite(float(value)) and float(value) > 0):
            raise make_error(f"{name} must be a finite number > 0, got {value!r}")


def check_image_inputs(images: torch.Tensor, segmentations: torch.Tensor, rois: torch.Tensor,
                       make_error: ErrorFactory) -> None:
    """The modules' conventions: images (N, 3, H, W), segmentations (N, K, H, W), rois (N, H, W)."""
    shapes = f"images {tuple(images.shape)}, segmentations {tuple(segmentations.shape)}, rois {tuple(rois.shape)}"
    if images.ndim != 4 or images.shape[1] != 3:
        raise make_error(f"images must have shape (N, 3, H, W); got {shapes}")
    if segmentations.ndim != 4 or rois.ndim != 3:
        raise make_error(f"segmentations must be (N, K, H, W) and rois (N, H, W); got {shapes}")
    n, _, h, w = images.shape
    if segmentations.shape[0] != n or segmentations.shape[2:] != (h, w) or tuple(rois.shape) != (n, h, w):
        raise make_error(f"N, H and W must agree; got {shapes}")
    if min(segmentations.shape) < 1:
        raise make_error(f"empty input: {shapes}")


def check_finite(tensor: torch.Tensor, what: str, make_error: ErrorFactory) -> None:
    """Refuse NaN and Inf, naming the first image that holds one (one device-side reduction)."""
    bad = ~torch.isfinite(tensor.detach()).flatten(1).all(dim=1)
    if bool(bad.any()):
        raise make_error(f"{what} of image {int(bad.nonzero()[0])} hold NaN or Inf")


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


class LatticeLossModule(nn.Module):
    """The face the losses on the lattice's bilateral filter share (DenseCRF, normalized cut):
    `Loss(weight, sigma_rgb, sigma_xy, scale_factor)(images, segmentations, rois)` with the PyTorch
    port's conventions. Inputs are checked, cast to float32 (autocast off), down-scaled by scale_factor
    (images and rois nearest, segmentations bilinear) and passed to `loss` with sigma_xy * scale_factor;
    returns weight * loss as float32 of shape (1,) on the segmentations' device."""

    make_error: ErrorFactory

    def __init__(self, weight: float, sigma_rgb: float, sigma_xy: float, scale_factor: float = 1.0) -> None:
        super().__init__()
        check_positive({"sigma_rgb": sigma_rgb, "sigma_xy": sigma_xy, "scale_factor": scale_factor}, self.make_error)
        self.weight = float(weight)
        self.sigma_rgb = float(sigma_rgb)
        self.sigma_xy = float(sigma_xy)
        self.scale_factor = float(scale_factor)

    def loss(self, images: torch.Tensor, segmentations: torch.Tensor, rois: torch.Tensor,
             sigma_xy: float) -> torch.Tensor:
        """The unweighted loss (0-d) of float32 inputs at the size it is computed at."""
        raise NotImplementedError

    def forward(self, images: torch.Tensor, segmentations: torch.Tensor, rois: torch.Tensor) -> torch.Tensor:
        check_image_inputs(images, segmentations, rois, self.make_error)
        with torch.autocast(segmentations.device.type, enabled=False):
            images, segmentations, rois = downscaled(self.scale_factor, images.float(), segmentations.float(),
                                                     rois.float(), self.make_error)
            loss = self.loss(images, segmentations, rois, self.sigma_xy * self.scale_factor)
        return (self.weight * loss).reshape(1)

    def extra_repr(self) -> str:
        return (f"weight={self.weight}, sigma_rgb={self.sigma_rgb}, sigma_xy={self.sigma_xy}, "
                f"scale_factor={self.scale_factor}")
