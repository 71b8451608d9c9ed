"""What the regularized-loss layers share (DenseCRFLoss, NormalizedCutLoss, GatedCRFLoss, SizeConstraintLoss).

Bottoms [image (N, 3, H, W) mean-subtracted BGR, segmentation (N, K, H, W) probabilities, *more];
one top (1, 1, 1, 1), anonymous if the prototxt names none; no default loss weight (as the fork's
DenseCRFLoss), hence a warning when none is given; no gradient into the image. The region of
interest is the fork's: pixels where some channel of the image does not truncate to 0 (crop padding
holds the mean, i.e. 0 after subtraction).
"""

from __future__ import annotations

import logging
from typing import ClassVar

import torch

from rloss.layers.base import Layer, Shape

log = logging.getLogger("rloss")


class RegularizedLossLayer(Layer):
    """The shared set-up, shape checks and roi of the regularized-loss layers; subclasses read their
    own `*_param` in `setup_loss` and compute the loss in `forward`."""

    bottoms = (2, 2)
    tops = (0, 1)
    auto_tops = 1
    default_loss_weight = 0.0
    no_gradient_bottoms = (0,)
    runs_in_float32 = True  # the losses are small differences of large sums
    segmentation_gets_gradient: ClassVar[bool] = True

    def setup(self, bottom_shapes: list[Shape]) -> None:
        down = list(self.param.propagate_down)
        if down and down[0]:
            raise self.error("back-propagating into the image is not supported; set propagate_down: "
                             f"{self.propagate_down_rule(len(bottom_shapes))}")
        if not self.param.loss_weight:
            log.warning(
                "layer '%s' (type %s) has no loss_weight: it contributes nothing to the objective and gets no "
                "gradient (this layer has no default loss weight, as the fork's DenseCRFLoss)",
                self.name, self.type_name,
            )
        self.setup_loss(bottom_shapes)

    @staticmethod
    def propagate_down_rule(bottom_count: int) -> str:
        """The propagate_down values these layers accept: a gradient into the segmentation only."""
        return ", ".join(["false", "true"] + ["false"] * (bottom_count - 2))

    def setup_loss(self, bottom_shapes: list[Shape]) -> None:
        """Read and check the layer's own parameters."""

    def reshape(self, bottom_shapes: list[Shape]) -> list[Shape]:
        self.check_image_and_segmentation(bottom_shapes[0], bottom_shapes[1])
        return [(1, 1, 1, 1)]

    def check_image_and_segmentation(self, image: Shape, segmentation: Shape) -> None:
        if len(image) != 4 or image[1] != 3:
            raise self.error(f"bottom 0 (the image) must have shape (N, 3, H, W), got {image}")
        if len(segmentation) != 4:
            raise self.error(f"bottom 1 (the segmentation) must have shape (N, C, H, W), got {segmentation}")
        if (image[0], image[2], image[3]) != (segmentation[0], segmentation[2], segmentation[3]):
            raise self.error(
                f"the image {image} and the segmentation {segmentation} must agree in N, H and W"
            )


def fork_roi(image: torch.Tensor) -> torch.Tensor:
    """The fork's region of interest of mean-subtracted images (N, C, H, W) -> (N, H, W) float 0/1 on
    the image's device: 1 where some channel truncates to a non-zero integer (the rule of
    `rloss.lattice.caffe_roi_mask`, here in torch so that GPU losses need no CPU round trip)."""
    return (image.detach().trunc() != 0).any(dim=1).to(torch.float32)
