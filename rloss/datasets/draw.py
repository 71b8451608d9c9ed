"""Drawing strokes into label maps: polylines through points, widened by a disc."""

from __future__ import annotations

import numpy as np
from scipy import ndimage


def disc(diameter: int) -> np.ndarray:
    """A boolean disc `diameter` pixels across (3 gives the 3x3 square, 1 a single pixel)."""
    radius = (diameter - 1) // 2
    y, x = np.mgrid[-radius:radius + 1, -radius:radius + 1]
    return y * y + x * x <= (diameter / 2) ** 2


def widen(marks: np.ndarray, width: int) -> np.ndarray:
    """`marks` (boolean) dilated to strokes `width` pixels wide."""
    return ndimage.binary_dilation(marks, structure=disc(width)) if width > 1 else marks.copy()


def polyline(points_xy: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """A boolean (H, W) map of the pixels on the segments between consecutive (x, y) points, sampled
    every half pixel so that no pixel of a segment is skipped; points outside the image are first
    clamped into it."""
    marks = np.zeros(shape, dtype=bool)
    points = np.asarray(points_xy, dtype=np.float64).reshape(-1, 2)
    points = np.clip(points, 0, (shape[1] - 1, shape[0] - 1))
    pieces = [points]
    for start, end in zip(points[:-1], points[1:]):
        steps = int(np.ceil(2 * np.abs(end - start).max())) + 1
        pieces.append(start + np.linspace(0, 1, steps)[:, None] * (end - start))
    pixels = np.rint(np.concatenate(pieces)).astype(np.int64)
    marks[pixels[:, 1], pixels[:, 0]] = True
    return marks
