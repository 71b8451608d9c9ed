"""Scribbles from full masks, for experiments (how would scribbles like these train?): for every
8-connected piece of every labelled value (the background, 0, too; 255 is left out), a stroke along
the middle of the piece, as the MSRC-21 tree's scribbles were made.

Per piece: the piece eroded by `margin` pixels (the whole piece when that leaves nothing), thinned
to its skeleton; for each piece of the skeleton, its longest path, continued straight from both ends
to the edge of the eroded piece (thinning shortens the ends of a blob's skeleton, and a person's
scribble spans the object), of which a seeded stretch (a fraction from KEEP_MIN to 1 of its length,
at a random offset) is kept and widened to `width` pixels within the piece. Every piece gets a
stroke (a piece too small for a skeleton gets its innermost pixel, widened). Each mask's generator
is seeded with the seed and the file's stem, so a file's strokes do not depend on the other files.
"""

from __future__ import annotations

import zlib

import numpy as np
from scipy import ndimage

from rloss.datasets.classes import IGNORE
from rloss.datasets.draw import disc, widen
from rloss.datasets.skeleton import innermost_pixel, longest_paths, thin

KEEP_MIN = 0.6
DIRECTION_PIXELS = 8  # an end is continued in the direction of the path's last pixels
EIGHT = np.ones((3, 3), dtype=bool)


def generator_for(seed: int, stem: str) -> np.random.Generator:
    return np.random.default_rng([seed, zlib.crc32(stem.encode("utf-8"))])


def _continued(end: np.ndarray, before: np.ndarray, core: np.ndarray) -> list[np.ndarray]:
    """The pixels from `end` straight on, away from `before`, while they are in `core` (in half-pixel
    steps, so consecutive pixels touch)."""
    direction = (end - before).astype(np.float64)
    length = np.hypot(*direction)
    if length == 0:
        return []
    step = 0.5 * direction / length
    position, pixels = end.astype(np.float64), []
    while True:
        position = position + step
        pixel = np.rint(position).astype(np.int64)
        if not (0 <= pixel[0] < core.shape[0] and 0 <= pixel[1] < core.shape[1]) or not core[tuple(pixel)]:
            return pixels
        if not pixels or not np.array_equal(pixel, pixels[-1]):
            pixels.append(pixel)


def _extended(path: np.ndarray, core: np.ndarray) -> np.ndarray:
    if len(path) < 2:
        return path
    back = min(DIRECTION_PIXELS, len(path) - 1)
    head = _continued(path[0], path[back], core)[::-1]
    tail = _continued(path[-1], path[-1 - back], core)
    return np.concatenate([np.reshape(head, (-1, 2)), path, np.reshape(tail, (-1, 2))]).astype(np.int64)


def _stretch(path: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    keep = max(1, int(round(rng.uniform(KEEP_MIN, 1.0) * len(path))))
    start = int(rng.integers(0, len(path) - keep + 1))
    return path[start:start + keep]


def _piece_strokes(piece: np.ndarray, rng: np.random.Generator, width: int, margin: int) -> np.ndarray:
    """The stroke marks of one piece (a boolean map of its bounding box, with a 1-pixel border)."""
    core = ndimage.binary_erosion(piece, structure=disc(2 * margin + 1)) if margin > 0 else piece
    if not core.any():
        core = piece
    skeleton = thin(core)
    if not skeleton.any():
        skeleton = innermost_pixel(core)
    marks = np.zeros_like(piece)
    for path in longest_paths(skeleton):
        stretch = _stretch(_extended(path, core), rng)
        marks[stretch[:, 0], stretch[:, 1]] = True
    return widen(marks, width) & piece


def strokes_from_mask(mask: np.ndarray, rng: np.random.Generator, width: int = 3, margin: int = 3) -> np.ndarray:
    """Scribbles for a full label map: (H, W) uint8, each stroke of its piece's value, 255 elsewhere."""
    scribbles = np.full(mask.shape, IGNORE, dtype=np.uint8)
    for value in np.unique(mask):
        if value == IGNORE:
            continue
        pieces, _ = ndimage.label(mask == value, structure=EIGHT)
        for number, box in enumerate(ndimage.find_objects(pieces), 1):
            padded = tuple(slice(max(s.start - 1, 0), s.stop + 1) for s in box)
            piece = pieces[padded] == number
            target = scribbles[padded]
            target[_piece_strokes(piece, rng, width, margin)] = value
    return scribbles
