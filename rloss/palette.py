"""Label maps as colour images: the PASCAL VOC colour map and palette PNGs (what `test --output_dir`
and `infer` write)."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def voc_palette() -> list[int]:
    """The PASCAL VOC colour map (class i's colour from the bits of i), flattened for PIL."""
    palette = []
    for index in range(256):
        red = green = blue = 0
        code = index
        for shift in range(7, -1, -1):
            red |= (code & 1) << shift
            green |= ((code >> 1) & 1) << shift
            blue |= ((code >> 2) & 1) << shift
            code >>= 3
        palette += [red, green, blue]
    return palette


VOC_PALETTE = voc_palette()


def write_label_png(labels: np.ndarray, path: Path, palette: list[int] = VOC_PALETTE) -> None:
    """An (H, W) map of class indices as an 8-bit palette PNG."""
    from PIL import Image

    image = Image.fromarray(np.asarray(labels, dtype=np.uint8), mode="P")
    image.putpalette(palette)
    image.save(path)
