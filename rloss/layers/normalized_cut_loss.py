"""The NormalizedCutLoss layer: the normalized cut loss (`rloss.losses.normalized_cut`) over bottoms
[image (N,3,H,W) mean-subtracted BGR, segmentation (N,K,H,W) probabilities] within the fork's roi."""

from __future__ import annotations

import torch

from rloss.layers.base import Shape
from rloss.layers.registry import register_layer
from rloss.layers.regularized_loss import RegularizedLossLayer, fork_roi
from rloss.losses.common import downscaled
from rloss.losses.normalized_cut import normalized_cut_loss


@register_layer("NormalizedCutLoss")
class NormalizedCutLoss(RegularizedLossLayer):
    """(1/N) sum_n sum_k <x_k, A(m - x_k)> / <x_k, A m>, x_k = m S_k, with A the DenseCRFLoss layer's
    bilateral filter (features x/bi_xy_std, y/bi_xy_std, B, G, R/bi_rgb_std) and m its roi; gradient for
    a symmetric A, none into the image. `scale_factor` as in DenseCRFLoss."""

    def setup_loss(self, bottom_shapes: list[Shape]) -> None:
        param = self.param.normalized_cut_loss_param
        self.sigma_xy = self.positive("normalized_cut_loss_param.bi_xy_std", param.bi_xy_std)
        self.sigma_rgb = self.positive("normalized_cut_loss_param.bi_rgb_std", param.bi_rgb_std)
        self.scale_factor = self.positive("normalized_cut_loss_param.scale_factor", param.scale_factor)

    def forward(self, image: torch.Tensor, segmentation: torch.Tensor) -> list[torch.Tensor]:  # type: ignore[override]
        self.check_image_and_segmentation(tuple(image.shape), tuple(segmentation.shape))
        image, segmentation, _ = downscaled(self.scale_factor, image, segmentation, None, self.error)
        loss = normalized_cut_loss(image, segmentation, fork_roi(image), self.sigma_rgb,
                                   self.sigma_xy * self.scale_factor, self.error)
        return [loss.to(segmentation.dtype).reshape(1, 1, 1, 1)]
