"""An image blended with its label colours, and a legend of the classes it shows (`infer`'s
`<name>_overlay.png`). The legend is a panel to the right of the image (the canvas grows downwards
when the panel is taller than the image): one row per class present in the label map, a swatch of its
colour and `INDEX NAME`."""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw, ImageFont

OVERLAY_ALPHA = 0.5
ROW = 16  # legend row height, pixels
SWATCH = 12
MARGIN = 4
PANEL = (32, 32, 32)
TEXT = (255, 255, 255)
OUTLINE = (160, 160, 160)  # so that a black swatch shows on the panel


def blend(pixels: np.ndarray, labels: np.ndarray, palette: list[int]) -> np.ndarray:
    """RGB pixels (H, W, 3) blended half and half with the colours of the labels (H, W)."""
    colours = np.asarray(palette, dtype=np.float32).reshape(-1, 3)[labels]
    blended = (1 - OVERLAY_ALPHA) * pixels.astype(np.float32) + OVERLAY_ALPHA * colours
    return np.clip(blended + 0.5, 0, 255).astype(np.uint8)


def legend_entries(labels: np.ndarray, names: dict[int, str]) -> list[tuple[int, str]]:
    """(index, text) of each class present in the label map, in index order."""
    return [(int(index), f"{int(index)} {names.get(int(index), '')}".rstrip()) for index in np.unique(labels)]


def with_legend(image: np.ndarray, entries: list[tuple[int, str]], palette: list[int]) -> np.ndarray:
    """The RGB image (H, W, 3) with a legend panel of `entries` on its right."""
    font = ImageFont.load_default()
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    text_width = max(_text_width(measure, text, font) for _, text in entries)
    panel_width = MARGIN + SWATCH + MARGIN + text_width + MARGIN
    height = max(image.shape[0], MARGIN + ROW * len(entries))
    canvas = Image.new("RGB", (image.shape[1] + panel_width, height), PANEL)
    canvas.paste(Image.fromarray(image), (0, 0))
    draw = ImageDraw.Draw(canvas)
    colours = np.asarray(palette).reshape(-1, 3)
    left = image.shape[1] + MARGIN
    for row, (index, text) in enumerate(entries):
        top = MARGIN + row * ROW
        draw.rectangle([left, top, left + SWATCH - 1, top + SWATCH - 1], fill=tuple(int(c) for c in colours[index]),
                       outline=OUTLINE)
        draw.text((left + SWATCH + MARGIN, top), text, fill=TEXT, font=font)
    return np.asarray(canvas)


def overlay(pixels: np.ndarray, labels: np.ndarray, palette: list[int], names: dict[int, str] | None) -> np.ndarray:
    """The blend, with a legend when class names are known."""
    blended = blend(pixels, labels, palette)
    return with_legend(blended, legend_entries(labels, names), palette) if names else blended


def _text_width(draw: ImageDraw.ImageDraw, text: str, font) -> int:
    """Pixels `text` takes in `font`: Pillow >= 9.2 measures bitmap fonts with textbbox, older ones
    only with getsize (removed in Pillow 10)."""
    try:
        return int(draw.textbbox((0, 0), text, font=font)[2])
    except ValueError:
        return int(font.getsize(text)[0])
