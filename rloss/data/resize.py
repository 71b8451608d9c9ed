"""OpenCV's `cv::resize` for 8-bit images, reproduced bit for bit in numpy (no OpenCV needed).

Caffe's transformer resizes images with `INTER_LINEAR` and labels with `INTER_NEAREST`. What these
compute on 8-bit data is not the textbook formula, so we follow OpenCV step by step:

* Coordinates: `scale = 1 / (dst / src)` in double; source position of output `d` is
  `f = (float)((d + 0.5) * scale - 0.5)` (half-pixel centres), `s = floor(f)`, weight `f - s`.
* Columns are clamped by moving the tap (`s < 0` -> `s = 0`, weight 0; `s >= W - 1` -> `s = W - 1`,
  weight 0); rows keep their weights and clamp the row indices into the image instead.
* Weights are 11-bit fixed point: `rint((1 - f) * 2048)` and `rint(f * 2048)` (float32 products).
* The horizontal pass keeps exact integers (`h = p0 * a0 + p1 * a1`, scale 2048). The vertical pass
  is not the exact `(h0 * b0 + h1 * b1 + 2**21) >> 22` but OpenCV's 16-bit SIMD form, which its
  scalar code also uses in the later 2.4 releases and in 3.x to 5.x: `((h0 >> 4) * b0 >> 16) +
  ((h1 >> 4) * b1 >> 16)`, then `(t + 2) >> 2`. The two forms differ by one in about 12 % of the
  pixels. (The first 2.4 releases used the exact form for the last few values of each row.)
* Nearest: `src = min(floor(d * (1 / (dst / src))), size - 1)`, not centre-aligned.

Both were checked equal, pixel for pixel, to OpenCV 5.0's `cv2.resize` on random images of random
sizes and on MSRC-21 photos at DeepLab's scale factors (0.5 to 2).
"""

from __future__ import annotations

import numpy as np

COEF_BITS = 11
COEF_SCALE = 1 << COEF_BITS  # INTER_RESIZE_COEF_SCALE


def _inverse_ratio(src: int, dst: int) -> float:
    """OpenCV's `scale = 1. / inv_scale` with `inv_scale = (double)dst / src` (not `src / dst`)."""
    return 1.0 / (dst / src)


def _linear_taps(src: int, dst: int) -> tuple[np.ndarray, np.ndarray]:
    """Source index `floor(f)` (unclamped) and float32 fraction of every output coordinate."""
    scale = _inverse_ratio(src, dst)
    position = ((np.arange(dst, dtype=np.float64) + 0.5) * scale - 0.5).astype(np.float32)
    first = np.floor(position).astype(np.int64)
    return first, (position - first.astype(np.float32)).astype(np.float32)


def _fixed_weights(fraction: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """OpenCV's `saturate_cast<short>(w * INTER_RESIZE_COEF_SCALE)` of `1 - f` and `f`."""
    scale = np.float32(COEF_SCALE)
    near = np.rint((np.float32(1) - fraction) * scale).astype(np.int64)
    far = np.rint(fraction * scale).astype(np.int64)
    return near, far


def _column_taps(src: int, dst: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Columns: out-of-image taps move onto the border with weight (2048, 0)."""
    first, fraction = _linear_taps(src, dst)
    outside = (first < 0) | (first >= src - 1)
    first = np.clip(first, 0, src - 1)
    fraction = np.where(outside, np.float32(0), fraction).astype(np.float32)
    near, far = _fixed_weights(fraction)
    return first, np.minimum(first + 1, src - 1), near, far


def _row_taps(src: int, dst: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Rows: weights from the unclamped position, row indices clamped into the image."""
    first, fraction = _linear_taps(src, dst)
    near, far = _fixed_weights(fraction)
    return np.clip(first, 0, src - 1), np.clip(first + 1, 0, src - 1), near, far


def _vertical(top: np.ndarray, bottom: np.ndarray, near: np.ndarray, far: np.ndarray) -> np.ndarray:
    """Blend two rows of horizontal results (int32, scale 2048) into uint8, as OpenCV does (the
    products stay below 2**31: (255 * 2048 >> 4) * 2048)."""
    blended = (top >> 4) * near[:, None]
    blended >>= 16
    lower = (bottom >> 4) * far[:, None]
    lower >>= 16
    blended += lower
    blended += 2
    blended >>= 2
    return np.clip(blended, 0, 255).astype(np.uint8)


def resize_linear(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """`cv::resize(image, (width, height), INTER_LINEAR)` of an 8-bit (H, W) or (H, W, C) image."""
    if image.dtype != np.uint8:
        raise TypeError(f"resize_linear needs uint8 pixels, got {image.dtype}")
    if image.shape[:2] == (height, width):
        return image.copy()
    flat = image.reshape(image.shape[0], image.shape[1], -1)
    channels = flat.shape[2]
    left, right, a_near, a_far = _column_taps(image.shape[1], width)
    horizontal = flat[:, left].astype(np.int32) * a_near.astype(np.int32)[None, :, None]
    horizontal += flat[:, right].astype(np.int32) * a_far.astype(np.int32)[None, :, None]
    horizontal = horizontal.reshape(image.shape[0], width * channels)
    upper, lower, b_near, b_far = _row_taps(image.shape[0], height)
    resized = _vertical(horizontal[upper], horizontal[lower], b_near.astype(np.int32), b_far.astype(np.int32))
    return resized.reshape((height, width) + image.shape[2:])


def nearest_indices(src: int, dst: int) -> np.ndarray:
    """OpenCV's INTER_NEAREST source index of every output index (`floor(d * scale)`, clamped)."""
    scale = _inverse_ratio(src, dst)
    return np.minimum(np.floor(np.arange(dst, dtype=np.float64) * scale).astype(np.int64), src - 1)


def resize_nearest(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """`cv::resize(image, (width, height), INTER_NEAREST)`: every value is copied from the source."""
    rows = nearest_indices(image.shape[0], height)
    columns = nearest_indices(image.shape[1], width)
    return image[rows[:, None], columns[None, :]]
