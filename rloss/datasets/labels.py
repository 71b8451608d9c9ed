"""Label maps as the data commands read and write them: written as 8-bit grey PNGs of the class
indices, which Caffe's grayscale decode and ImageSegData read alike (a palette PNG is read as
luma by Caffe), so a tree written here trains the same in both."""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
from PIL import Image

from rloss.data.imageio import read_label
from rloss.datasets.staging import staged_folder

_PALETTE_WARNING = "is a palette PNG"


class _DropPaletteWarning(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return _PALETTE_WARNING not in record.getMessage()


@contextlib.contextmanager
def _without_palette_warning() -> Iterator[None]:
    logger = logging.getLogger("rloss")
    drop = _DropPaletteWarning()
    logger.addFilter(drop)
    try:
        yield
    finally:
        logger.removeFilter(drop)


def read_source_label(path: str, where: str) -> np.ndarray:
    """A label map that is converted, not trained on (palette PNGs give their indices): without
    read_label's warning that Caffe would read such a file differently, since what we write from it
    is a grey PNG that Caffe reads the same."""
    with _without_palette_warning():
        return read_label(path, where)


def write_label(labels: np.ndarray, path: Path) -> None:
    Image.fromarray(np.asarray(labels, dtype=np.uint8), mode="L").save(path, format="PNG")


def write_label_folder(out: Path, stems: list[str], make: Callable[[str], np.ndarray],
                       texts: dict[str, str] | None = None) -> None:
    """`out` with `make(stem)` as STEM.png for every stem, and the text files `texts` (name: text),
    written whole or not at all."""
    with staged_folder(out) as stage:
        for stem in stems:
            write_label(make(stem), stage / f"{stem}.png")
        for name, text in (texts or {}).items():
            (stage / name).write_text(text, encoding="utf-8")
