"""Reading images as Caffe's OpenCV calls see them, with PIL.

* Images: 8-bit BGR, `(H, W, 3)` uint8, as `cv::imread(path, IMREAD_COLOR)` gives (grey and palette
  files are expanded to three channels, alpha is dropped). PIL's libjpeg decode gives the same pixels
  as OpenCV's (checked equal to OpenCV 5.0's decode on all 335 MSRC-21 JPEGs). `read_gray` gives OpenCV's
  `IMREAD_GRAYSCALE` result: libjpeg's luma for JPEGs, libpng's rule for PNGs (used for other formats too).
* Labels: raw 8-bit values, `(H, W)` uint8. Grey PNGs give their values. Palette PNGs give their
  palette INDICES, which is what the files mean (class numbers, 255 = void), but not what Caffe
  reads: its OpenCV grayscale decode turns palette colours into luma (`train_palette_label` in the
  golden files: class 1, dark red, becomes 38 and void becomes 220). We deliberately read indices and
  warn once, naming the file, that the original would have read different labels. Colour label
  images (RGB, RGBA) are refused: which value is the class is ambiguous.
"""

from __future__ import annotations

import logging
from typing import Callable

import numpy as np
from PIL import Image

from rloss.errors import DataError

log = logging.getLogger("rloss")

_GREY_MODES = ("L", "LA", "1")
_PALETTE_MODES = ("P", "PA")
_warned_palette = False


def _open(path: str, where: str, convert: Callable[[Image.Image], np.ndarray],
          before_load: Callable[[Image.Image], None] | None = None) -> np.ndarray:
    """Decode `path` fully and convert it, turning every failure into a DataError."""
    try:
        with Image.open(path) as image:
            if before_load is not None:
                before_load(image)
            image.load()
            return convert(image)
    except FileNotFoundError as error:
        raise DataError(f"{where}: file '{path}' does not exist") from error
    except (OSError, ValueError, Image.DecompressionBombError) as error:
        raise DataError(f"{where}: cannot read the image '{path}': {error}") from error


def _check_depth(image: Image.Image, path: str, where: str) -> None:
    if image.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
        raise DataError(f"{where}: '{path}' has {image.mode} pixels; only 8-bit images are supported")


def read_bgr(path: str, where: str) -> np.ndarray:
    """The image as OpenCV's colour decode gives it: (H, W, 3) uint8 in B, G, R order."""

    def convert(image: Image.Image) -> np.ndarray:
        _check_depth(image, path, where)
        rgb = np.asarray(image.convert("RGB"))
        return np.ascontiguousarray(rgb[:, :, ::-1])

    return _open(path, where, convert)


def libpng_gray(rgb: np.ndarray) -> np.ndarray:
    """libpng's RGB -> grey as OpenCV requests it: 0.299 and 0.587 (blue the rest) in 15-bit fixed
    point, truncated (the weights sum to 1, so grey pixels keep their value)."""
    red, green, blue = (rgb[..., i].astype(np.int64) for i in range(3))
    red_coef = 29900 * 32768 // 100000
    green_coef = 58700 * 32768 // 100000
    blue_coef = 32768 - red_coef - green_coef
    return ((red_coef * red + green_coef * green + blue_coef * blue) >> 15).astype(np.uint8)


def read_gray(path: str, where: str) -> np.ndarray:
    """The image as OpenCV's grayscale decode gives it: (H, W) uint8."""

    def ask_libjpeg_for_luma(image: Image.Image) -> None:
        if image.format == "JPEG":
            image.draft("L", image.size)

    def convert(image: Image.Image) -> np.ndarray:
        _check_depth(image, path, where)
        if image.mode in _GREY_MODES:
            return np.asarray(image.convert("L")).copy()
        return libpng_gray(np.asarray(image.convert("RGB")))

    return _open(path, where, convert, ask_libjpeg_for_luma)


def _palette_is_identity(image: Image.Image, indices: np.ndarray) -> bool:
    """True when every used palette entry is the grey (i, i, i), so luma would equal the index."""
    palette = np.asarray(image.getpalette() or [], dtype=np.int64).reshape(-1, 3)
    used = np.unique(indices)
    if used.max(initial=0) >= len(palette):
        return False
    return bool(np.all(palette[used] == used[:, None]))


def _warn_palette_once(path: str) -> None:
    global _warned_palette
    if not _warned_palette:
        _warned_palette = True
        log.warning(
            "label '%s' is a palette PNG: we read its palette indices (the class numbers), but Caffe "
            "reads palette labels as grey luma values (e.g. VOC class 1 -> 38, 255 -> 220); results "
            "will differ from the original on such files (warned once)", path)


def read_label(path: str, where: str) -> np.ndarray:
    """The label map as raw 8-bit values: (H, W) uint8; palette PNGs give their indices."""

    def convert(image: Image.Image) -> np.ndarray:
        _check_depth(image, path, where)
        if image.mode in _PALETTE_MODES:
            indices = np.asarray(image.getchannel(0) if image.mode == "PA" else image).copy()
            if not _palette_is_identity(image, indices):
                _warn_palette_once(path)
            return indices
        if image.mode in _GREY_MODES:
            return np.asarray(image.convert("L")).copy()
        raise DataError(
            f"{where}: label '{path}' is a {image.mode} colour image; labels must be 8-bit grey or "
            "palette PNGs holding class indices (a colour image does not say which value is the class)")

    return _open(path, where, convert)
