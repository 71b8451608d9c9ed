"""The size-constraint loss layer (Kervadec et al., MIDL 2018 / MedIA 2019), on `rloss.losses.size_constraint`."""

from __future__ import annotations

import math

import torch

from rloss.layers.base import Shape
from rloss.layers.registry import register_layer
from rloss.layers.regularized_loss import RegularizedLossLayer, fork_roi
from rloss.losses.size_constraint import size_constraint_loss


@register_layer("SizeConstraintLoss")
class SizeConstraintLoss(RegularizedLossLayer):
    """(1/N) sum_n sum_k relu(a_nk - V_nk)^2 + relu(V_nk - b_nk)^2 with V_nk = sum_i m_i S_nki, over
    bottoms [image (N,3,H,W) mean-subtracted BGR (only for the DenseCRFLoss layer's roi m),
    probabilities S (N,K,H,W), then either label (N,1,H,W) or lower and upper (N,K) or (N,K,1,1)].

    With a label (image-level tags, the paper's tag setting) the classes present in it (values other
    than ignore_label) get [a, b] = [size_constraint_loss_param.lower, upper] and the absent ones
    [0, 0]; label values must be classes in [0, K) or ignore_label. With two bounds blobs the
    param's lower and upper are unused. normalize (default true) makes sizes and bounds fractions
    of the roi's pixel count. Top (1,1,1,1); the gradient reaches the probabilities only.
    """

    bottoms = (3, 4)
    no_gradient_bottoms = (0, 2, 3)

    def setup_loss(self, bottom_shapes: list[Shape]) -> None:
        down = list(self.param.propagate_down)
        if any(down[2:]):
            raise self.error("back-propagating into the label or the bounds is not supported; set propagate_down: "
                             f"{self.propagate_down_rule(len(bottom_shapes))}")
        param = self.param.size_constraint_loss_param
        self.normalize = bool(param.normalize)
        self.ignore_label = int(param.ignore_label)
        self.tags = len(bottom_shapes) == 3
        self.lower, self.upper = float(param.lower), float(param.upper)
        if self.tags:
            self._check_tag_bounds()

    def _check_tag_bounds(self) -> None:
        """The param's bounds are every present class's: refuse bad ones before any data flows."""
        lower, upper = self.lower, self.upper
        top = 1.0 if self.normalize else math.inf
        if not (math.isfinite(lower) and math.isfinite(upper) and 0 <= lower <= upper <= top):
            scale = "0 <= lower <= upper <= 1 (normalize: fractions of the roi)" if self.normalize else \
                "0 <= lower <= upper, finite (in pixels)"
            raise self.error(f"size_constraint_loss_param needs {scale}; got lower {lower:g}, upper {upper:g}")

    def reshape(self, bottom_shapes: list[Shape]) -> list[Shape]:
        self.check_image_and_segmentation(bottom_shapes[0], bottom_shapes[1])
        n, k, h, w = bottom_shapes[1]
        if self.tags:
            if tuple(bottom_shapes[2]) != (n, 1, h, w):
                raise self.error(f"bottom 2 (the label) must be (N, 1, H, W) = {(n, 1, h, w)} like the "
                                 f"probabilities {bottom_shapes[1]}, got {bottom_shapes[2]}")
        else:
            for index, what in ((2, "lower"), (3, "upper")):
                if tuple(bottom_shapes[index]) not in ((n, k), (n, k, 1, 1)):
                    raise self.error(f"bottom {index} ({what} bounds) must be (N, K) = {(n, k)} or (N, K, 1, 1) "
                                     f"for the probabilities {bottom_shapes[1]}, got {bottom_shapes[index]}")
        return [(1, 1, 1, 1)]

    def forward(self, image: torch.Tensor, probabilities: torch.Tensor,  # type: ignore[override]
                *more: torch.Tensor) -> list[torch.Tensor]:
        self.reshape([tuple(t.shape) for t in (image, probabilities, *more)])
        n, k = probabilities.shape[:2]
        if self.tags:
            lower, upper = self._tag_bounds(more[0], k)
        else:
            lower, upper = (bound.detach().reshape(n, k) for bound in more)
        loss = size_constraint_loss(probabilities, fork_roi(image), lower, upper, self.normalize, self.error)
        return [loss.reshape(1, 1, 1, 1)]

    def _tag_bounds(self, label: torch.Tensor, classes: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(lower, upper) (N, K): the param's bounds for the classes present in each image's label, 0 else."""
        values = label.detach().reshape(label.shape[0], -1)
        tagged = values != self.ignore_label
        bad = tagged & ((values != values.trunc()) | (values < 0) | (values >= classes))
        if bool(bad.any()):
            n, i = (int(j) for j in bad.nonzero()[0])
            raise self.error(f"label value {float(values[n, i]):g} in image {n} is neither a class in [0, {classes}) "
                             f"nor ignore_label {self.ignore_label}")
        index = torch.where(tagged, values, classes).long()  # untagged pixels land in a spare column
        present = torch.zeros(values.shape[0], classes + 1, device=values.device).scatter_(1, index, 1.0)[:, :classes]
        return present * self.lower, present * self.upper
