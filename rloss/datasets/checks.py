"""Reading a dataset's files once each and checking them: readable, image and label of one size,
label values within the classes."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from rloss.data.imageio import read_bgr
from rloss.datasets.classes import ClassTable
from rloss.datasets.problems import Problems

Size = tuple[int, int]  # (height, width)
MAX_VALUES_SHOWN = 10


@dataclass(frozen=True)
class LabelInfo:
    """What the checks and the report need of a label map: its size and its 256-bin histogram, and
    how the first problem about it should name it (`where`)."""

    path: Path
    where: str
    size: Size
    counts: np.ndarray


class Inspector:
    """Reads every file once (images fully decoded, so a truncated file is found), remembers image
    sizes and label histograms, and notes each problem once in `problems`."""

    def __init__(self, problems: Problems, read_labels: Callable[[str, str], np.ndarray]):
        self.problems = problems
        self.read_labels = read_labels
        self._images: dict[Path, Size | None] = {}
        self._labels: dict[Path, LabelInfo | None] = {}

    def image_size(self, path: Path, where: str) -> Size | None:
        if path not in self._images:
            image = self.problems.attempt(lambda: read_bgr(str(path), where))
            self._images[path] = None if image is None else image.shape[:2]
        return self._images[path]

    def label(self, path: Path, where: str) -> LabelInfo | None:
        if path not in self._labels:
            labels = self.problems.attempt(lambda: self.read_labels(str(path), where))
            self._labels[path] = None if labels is None else LabelInfo(
                path, where, labels.shape, np.bincount(labels.ravel(), minlength=256))
        return self._labels[path]

    def pair(self, image: Path, label: Path, where_image: str, where_label: str) -> LabelInfo | None:
        """The label's info when both files read and have one size, else None (problems noted)."""
        image_size, info = self.image_size(image, where_image), self.label(label, where_label)
        if image_size is None or info is None:
            return None
        if info.size != image_size:
            swapped = " (width and height swapped: does the image carry an EXIF rotation?)" \
                if info.size == image_size[::-1] else ""
            self.problems.add(f"{where_label}: '{label}' is {_size(info.size)} but its image '{image}' is "
                              f"{_size(image_size)}{swapped}")
            return None
        return info

    @property
    def files_read(self) -> int:
        """How many distinct files were read (or tried)."""
        return len(self._images.keys() | self._labels.keys())

    def label_counts(self) -> np.ndarray:
        """The histogram of every label map read."""
        return sum((info.counts for info in self._labels.values() if info is not None), np.zeros(256, np.int64))

    def check_values(self, classes: ClassTable) -> None:
        """Note, for every label map read, its values that are not classes."""
        for info in self._labels.values():
            invalid = [] if info is None else classes.invalid_values(info.counts)
            if invalid:
                shown = ", ".join(f"{v} ({info.counts[v]} pixels)" for v in invalid[:MAX_VALUES_SHOWN])
                more = f" and {len(invalid) - MAX_VALUES_SHOWN} more" if len(invalid) > MAX_VALUES_SHOWN else ""
                self.problems.add(f"{info.where}: '{info.path}' has values that are not classes: {shown}{more} "
                                  f"({classes.describe()})")


def _size(size: Size) -> str:
    return f"{size[1]}x{size[0]}"
