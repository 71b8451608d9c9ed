"""The Gated CRF loss layer (Obukhov et al., 2019), on the computation of `rloss.losses.gated_crf`."""

from __future__ import annotations

import math

import torch

from rloss.layers.base import Shape
from rloss.layers.registry import register_layer
from rloss.layers.regularized_loss import RegularizedLossLayer, fork_roi
from rloss.losses.gated_crf import GatedKernel, gated_crf_loss
from rloss.proto import caffe_pb2


@register_layer("GatedCRFLoss")
class GatedCRFLoss(RegularizedLossLayer):
    """(1/N) sum_n sum_{i, j != i, |j - i|_inf <= radius} m_i m_j K_ij (1 - sum_k S_ik S_jk) over bottoms
    [image (N,3,H,W) mean-subtracted BGR, segmentation S (N,K,H,W)]; top (1,1,1,1). m is the fork's roi
    (`fork_roi`); K the sum of the `kernel`s, each weight * exp(-|dxy|^2 / (2 xy_std^2) - |dbgr|^2 /
    (2 rgb_std^2)), rgb_std 0 = positions only (colour distances do not depend on the channel order or
    the mean). No kernel given = one kernel with the proto defaults: weight 1, xy_std 6, rgb_std 25.5 (the
    paper's RGBXY kernel). `scale_factor` and `normalize` as in `rloss.GatedCRFLoss`. The gradient is the
    exact derivative; none reaches the image.
    """

    def setup_loss(self, bottom_shapes: list[Shape]) -> None:
        param = self.param.gated_crf_loss_param
        given = list(param.kernel) or [caffe_pb2.GatedCRFKernel()]
        self.kernels = tuple(self._kernel(index, kernel) for index, kernel in enumerate(given))
        if param.radius < 1:
            raise self.error(f"gated_crf_loss_param.radius must be >= 1, got {param.radius}")
        self.radius = int(param.radius)
        self.scale_factor = self.positive("gated_crf_loss_param.scale_factor", param.scale_factor)
        self.normalize = bool(param.normalize)

    def _kernel(self, index: int, kernel) -> GatedKernel:
        name = f"gated_crf_loss_param.kernel[{index}]"
        if not math.isfinite(kernel.weight):
            raise self.error(f"{name}.weight must be finite, got {kernel.weight}")
        sigma_rgb = None if kernel.rgb_std == 0 else self.positive(f"{name}.rgb_std", kernel.rgb_std)
        return GatedKernel(float(kernel.weight), self.positive(f"{name}.xy_std", kernel.xy_std), sigma_rgb)

    def forward(self, image: torch.Tensor, segmentation: torch.Tensor) -> list[torch.Tensor]:  # type: ignore[override]
        self.check_image_and_segmentation(tuple(image.shape), tuple(segmentation.shape))
        loss = gated_crf_loss(image, segmentation, fork_roi(image), self.kernels, self.radius, self.scale_factor,
                              self.normalize, self.error)
        return [loss.reshape(1, 1, 1, 1)]
