"""DenseCRF layers: the regularised loss `DenseCRFLoss` and mean-field inference `DenseCRF`,
both on the fork's permutohedral lattice (`rloss.lattice`)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from rloss.errors import LatticeError
from rloss.lattice import Permutohedral
from rloss.layers.base import Layer, Shape
from rloss.layers.registry import register_layer
from rloss.layers.regularized_loss import RegularizedLossLayer
from rloss.losses.common import downscaled
from rloss.losses.densecrf import densecrf_loss

FLT_MIN = float(np.finfo(np.float32).tiny)


@register_layer("DenseCRFLoss")
class DenseCRFLoss(RegularizedLossLayer):
    """-(1/N) sum_n sum_c <m S_c, A(m S_c)> over bottoms [image (N,3,H,W) mean-subtracted BGR,
    segmentation S (N,C,H,W)]; top (1,1,1,1). m is the fork's mask (pixels whose three channels
    truncate to 0 are padding) and A the unnormalised bilateral lattice filter with features
    (x/bi_xy_std, y/bi_xy_std, B/bi_rgb_std, G/bi_rgb_std, R/bi_rgb_std).

    Backward is the fork's -(2/N) A(m S) m, not autograd's; no gradient reaches the image.
    `scale_factor` (an rloss extension, the PyTorch port's --rloss-scale) computes the loss on the
    image resampled nearest and the segmentation bilinearly to floor(size * scale_factor), with
    bi_xy_std * scale_factor (the pixel distances shrink with the image); the gradient goes back
    through the bilinear resampling. `normalize` (an rloss extension) divides each image's loss by
    <m, A m>, so that one weight fits every crop size and scale.
    Like the fork the layer has no default loss weight. Unlike the fork, which froze N, H, W at set-up
    and never compared the two bottoms, N is read from the bottoms at every forward and the image and
    the segmentation must agree in N, H and W.
    """

    def setup_loss(self, bottom_shapes: list[Shape]) -> None:
        param = self.param.densecrf_loss_param
        self.sigma_xy = self.positive("densecrf_loss_param.bi_xy_std", param.bi_xy_std)
        self.sigma_rgb = self.positive("densecrf_loss_param.bi_rgb_std", param.bi_rgb_std)
        self.scale_factor = self.positive("densecrf_loss_param.scale_factor", param.scale_factor)
        self.normalize = bool(param.normalize)

    def forward(self, image: torch.Tensor, segmentation: torch.Tensor) -> list[torch.Tensor]:  # type: ignore[override]
        self.check_image_and_segmentation(tuple(image.shape), tuple(segmentation.shape))
        image, segmentation, _ = downscaled(self.scale_factor, image, segmentation, None, self.error)
        loss = densecrf_loss(image, segmentation, None, self.sigma_rgb, self.sigma_xy * self.scale_factor,
                             self.error, self.normalize)
        return [loss.reshape(1, 1, 1, 1)]


@dataclass(frozen=True)
class _Kernel:
    """One Potts potential: weight w and its features' standard deviations (sigma_rgb None = spatial)."""

    weight: float
    sigma_xy: float
    sigma_rgb: float | None


@register_layer("DenseCRF")
class DenseCRF(Layer):
    """Mean-field inference of a fully connected CRF over bottoms [unary scores (N,M,Hp,Wp),
    data_dim (N,1,1,2) = (height, width) of each image, optional image (N,3,Hp,Wp) mean-subtracted BGR].

    Per image, on its top-left min(Hp, height) x min(Wp, width) region: Q = softmax(score), then
    max_iter times Q = softmax(score + sum_k w_k nu_k A_k(Q)) with Potts kernels A_k (Gaussian on
    (x, y)/pos_xy_std, bilateral on ((x, y)/bi_xy_std, (B, G, R)/bi_rgb_std)) and nu_k = 1/(A_k 1 + 1e-20).
    Output Q, or log(max(Q, FLT_MIN)) with output_probability false, inside the region and 0 outside.
    Differences from the fork: exp is exact (the fork's fast approximation is exactly 0 below -20, so
    tiny probabilities differ); the image is indexed per batch item (the fork used image 0 for every
    item: identical for batch 1); a region side larger than the scores is clipped (the fork read out
    of bounds). No gradient (the fork's backward does nothing).
    """

    bottoms = (2, 3)
    tops = (1, 1)
    no_gradient_bottoms = (0, 1, 2)
    runs_in_float32 = True  # mean-field on the float32 lattice; its Q is the final segmentation

    def setup(self, bottom_shapes: list[Shape]) -> None:
        param = self.param.dense_crf_param
        if param.max_iter < 0:
            raise self.error(f"dense_crf_param.max_iter must be >= 0, got {param.max_iter}")
        self.max_iter = int(param.max_iter)
        self.output_probability = bool(param.output_probability)
        self.kernels = self._spatial_kernels(param) + self._bilateral_kernels(param)
        if any(k.sigma_rgb is not None for k in self.kernels) and len(bottom_shapes) < 3:
            raise self.error("bilateral kernels (bi_w) need the image as bottom 2; the prototxt gives 2 bottoms")

    def _spatial_kernels(self, param) -> list[_Kernel]:
        self._equal_lengths(pos_w=param.pos_w, pos_xy_std=param.pos_xy_std)
        return [
            _Kernel(self._weight("pos_w", w), self.positive("pos_xy_std", s), None)
            for w, s in zip(param.pos_w, param.pos_xy_std)
        ]

    def _bilateral_kernels(self, param) -> list[_Kernel]:
        self._equal_lengths(bi_w=param.bi_w, bi_xy_std=param.bi_xy_std, bi_rgb_std=param.bi_rgb_std)
        return [
            _Kernel(self._weight("bi_w", w), self.positive("bi_xy_std", s), self.positive("bi_rgb_std", r))
            for w, s, r in zip(param.bi_w, param.bi_xy_std, param.bi_rgb_std)
        ]

    def _equal_lengths(self, **fields) -> None:
        lengths = {name: len(values) for name, values in fields.items()}
        if len(set(lengths.values())) > 1:
            raise self.error(f"dense_crf_param needs as many values of each of {lengths} (one per kernel)")

    def _weight(self, name: str, value: float) -> float:
        if not math.isfinite(value):
            raise self.error(f"{name} must be finite, got {value}")
        return float(value)

    def reshape(self, bottom_shapes: list[Shape]) -> list[Shape]:
        scores = bottom_shapes[0]
        self.check_axes(bottom_shapes, 0, 4)
        dims = bottom_shapes[1]
        if not dims or dims[0] != scores[0] or math.prod(dims[1:]) != 2:
            raise self.error(f"bottom 1 (data_dim) must be (N, 1, 1, 2) with the scores' N, got {dims} for {scores}")
        if len(bottom_shapes) == 3:
            image = bottom_shapes[2]
            if len(image) != 4 or image[1] != 3 or (image[0], *image[2:]) != (scores[0], *scores[2:]):
                raise self.error(f"bottom 2 (the image) must be (N, 3, Hp, Wp) = ({scores[0]}, 3, "
                                 f"{scores[2]}, {scores[3]}) like the scores {scores}, got {image}")
        return [scores]

    def forward(self, scores: torch.Tensor, data_dim: torch.Tensor,  # type: ignore[override]
                image: torch.Tensor | None = None) -> list[torch.Tensor]:
        self.reshape([tuple(t.shape) for t in (scores, data_dim, image) if t is not None])
        if not bool(torch.isfinite(scores).all()):
            raise self.error(f"the unary scores {tuple(scores.shape)} hold NaN or inf")
        with torch.no_grad():
            cpu_scores = scores.detach().to("cpu", torch.float32)
            cpu_image = None if image is None else image.detach().to("cpu", torch.float32)
            out = torch.zeros_like(cpu_scores)
            for n, (height, width) in enumerate(self._regions(data_dim, cpu_scores.shape)):
                region = cpu_scores[n, :, :height, :width]
                picture = None if cpu_image is None else cpu_image[n, :, :height, :width]
                try:
                    q = self._mean_field(region, picture)
                except LatticeError as error:
                    raise self.error(str(error)) from None
                out[n, :, :height, :width] = q if self.output_probability else torch.log(q.clamp_min(FLT_MIN))
        return [out.to(scores.device, scores.dtype)]

    def _regions(self, data_dim: torch.Tensor, shape: torch.Size) -> list[tuple[int, int]]:
        """(height, width) processed per image: data_dim truncated to int, clipped to the scores' size."""
        dims = data_dim.detach().to("cpu", torch.float64).reshape(shape[0], 2)
        if not bool(torch.isfinite(dims).all()) or bool((dims < 1).any()):
            raise self.error(f"data_dim must hold sizes >= 1, got {dims.tolist()}")
        return [(min(int(h), shape[2]), min(int(w), shape[3])) for h, w in dims.tolist()]

    def _mean_field(self, score: torch.Tensor, image: torch.Tensor | None) -> torch.Tensor:
        """Q (M, H, W) for one image's scores (M, H, W) (the negated unary)."""
        labels, height, width = score.shape
        negated_unary = score.reshape(labels, -1).t().contiguous()  # (pixels, labels)
        potentials = [self._potential(kernel, height, width, image) for kernel in self.kernels]
        q = torch.softmax(negated_unary, dim=1)
        for _ in range(self.max_iter):
            energy = negated_unary.clone()
            for weighted_norm, lattice in potentials:
                energy += weighted_norm * lattice.filter(q)
            q = torch.softmax(energy, dim=1)
        return q.t().reshape(labels, height, width)

    def _potential(self, kernel: _Kernel, height: int, width: int,
                   image: torch.Tensor | None) -> tuple[torch.Tensor, Permutohedral]:
        """(w * nu as a (pixels, 1) column, lattice) of one Potts kernel on an H x W image."""
        if kernel.sigma_rgb is not None and image is not None:
            lattice = Permutohedral.from_image(image, kernel.sigma_xy, kernel.sigma_rgb)
        else:
            lattice = Permutohedral.spatial(height, width, kernel.sigma_xy)
        norm = 1.0 / (lattice.filter(torch.ones(height * width, 1)) + 1e-20)
        return kernel.weight * norm, lattice
