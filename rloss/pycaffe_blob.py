"""pycaffe's Blob interface (`data`, `diff`, `shape`, `count`, the legacy num/channels/height/width),
one class for the blobs pycaffe's Net shows (rloss.caffe.blob) and those a Python layer's code gets
(rloss.layers.python_layer); a module of its own so that the layers need not import rloss.caffe."""

from __future__ import annotations

import numpy as np

from rloss.errors import NetError


class Blob:
    """What pycaffe's Blob shows: `data`, `diff` (numpy arrays), `shape`, `count` and the legacy
    `num`, `channels`, `height`, `width` (1 past the last axis, as Caffe's LegacyShape)."""

    @property
    def data(self) -> np.ndarray:
        return self._data()

    @data.setter
    def data(self, value) -> None:
        self._data()[...] = value

    @property
    def diff(self) -> np.ndarray:
        return self._diff()

    @diff.setter
    def diff(self, value) -> None:
        self._diff()[...] = value

    @property
    def shape(self) -> tuple[int, ...]:
        raise NotImplementedError

    def _data(self) -> np.ndarray:
        raise NotImplementedError

    def _diff(self) -> np.ndarray:
        raise NotImplementedError

    @property
    def count(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))

    def _legacy_axis(self, index: int) -> int:
        shape = self.shape
        if len(shape) > 4:
            raise NetError(f"a blob of shape {shape} has more than 4 axes: use .shape, not num/channels/height/width")
        return shape[index] if index < len(shape) else 1

    @property
    def num(self) -> int:
        return self._legacy_axis(0)

    @property
    def channels(self) -> int:
        return self._legacy_axis(1)

    @property
    def height(self) -> int:
        return self._legacy_axis(2)

    @property
    def width(self) -> int:
        return self._legacy_axis(3)
