"""Inputs and references the regularized-loss tests share: synthetic images with padding, softmax
segmentations, and the dense matrix of the lattice's bilateral filter."""

from __future__ import annotations

import numpy as np
import torch

from rloss.lattice import Permutohedral, bilateral_filter

MEAN_BGR = np.array([104.008, 116.669, 122.675], np.float32)
def synthetic_image(n: int, h: int, w: int, seed: int = 0) -> np.ndarray:
    """Mean-subtracted BGR images: colour blocks plus noise, with zero padding at the bottom/right
    like a crop of a smaller image (the layer's mask must remove it)."""
    rng = np.random.RandomState(seed)
    images = np.empty((n, 3, h, w), np.float32)
    for i in range(n):
        colours = rng.uniform(0, 255, size=(4, 3)).astype(np.float32)
        block = (np.arange(h)[:, None] * 2 // h) * 2 + (np.arange(w)[None, :] * 2 // w)
        noise = rng.randn(3, h, w).astype(np.float32) * 8
        images[i] = colours[block].transpose(2, 0, 1) + noise - MEAN_BGR[:, None, None]
        images[i, :, h - 1 - i:, :] = 0.0
        images[i, :, :, w - 2:] = 0.0
    return images


def synthetic_segmentation(n: int, k: int, h: int, w: int, seed: int = 1) -> np.ndarray:
    logits = torch.from_numpy(np.random.RandomState(seed).randn(n, k, h, w).astype(np.float32) * 2)
    return torch.softmax(logits, dim=1).numpy()


def lattice_matrix(image: np.ndarray, sxy: float, srgb: float) -> np.ndarray:
    """The dense matrix A (pixels x pixels) of the bilateral lattice of one (3, H, W) image: column q is
    the lattice's response to the unit vector at q. Features built here (x = column, y = row)."""
    _, h, w = image.shape
    ys, xs = np.meshgrid(np.arange(h, dtype=np.float32), np.arange(w, dtype=np.float32), indexing="ij")
    features = [xs / np.float32(sxy), ys / np.float32(sxy)] + [c / np.float32(srgb) for c in image]
    lattice = Permutohedral(np.stack(features, axis=-1).reshape(h * w, 5))
    return lattice.filter(np.eye(h * w, dtype=np.float32)).astype(np.float64)


def lattice_operator(image: np.ndarray, sxy: float, srgb: float) -> np.ndarray:
    """The dense matrix A (pixels x pixels) of the filter the losses apply to one (3, H, W) image,
    taken from that filter itself (`bilateral_filter`, the losses' batched path) applied to every unit
    vector: column q is its response to pixel q."""
    _, h, w = image.shape
    unit = np.eye(h * w, dtype=np.float32).reshape(1, h * w, h, w)
    return bilateral_filter(image[None], unit, srgb, sxy)[0].reshape(h * w, h * w).T.astype(np.float64)
