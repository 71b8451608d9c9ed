"""BlobProto <-> numpy, with Caffe's two shape encodings (legacy num/channels/height/width or `shape`)."""

from __future__ import annotations

import math
import os
from functools import lru_cache
from typing import Sequence

import numpy as np

from rloss.errors import WeightsError
from rloss.proto import caffe_pb2

_LEGACY = ("num", "channels", "height", "width")

# The shape rule every blob (parameter, top, net input, blob in a file) must follow, checked before
# anything is allocated: Caffe's own limits (Blob::Reshape refuses more than kMaxBlobAxes axes and
# more than INT_MAX elements), and its bytes must fit in this machine's physical memory. A 0 dim
# counts as 1 here: an empty (0, C, H, W) blob still makes layers allocate per-position buffers.
MAX_BLOB_AXES = 32
MAX_BLOB_COUNT = 2**31 - 1


@lru_cache(maxsize=1)
def physical_memory() -> int | None:
    """This machine's RAM in bytes (None where the OS does not say)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, OSError, ValueError):
        return None


def shape_problem(shape: Sequence[int], itemsize: int = 4) -> str | None:
    """Why a blob of `shape` (elements of `itemsize` bytes) cannot exist, or None when it can."""
    if len(shape) > MAX_BLOB_AXES:
        return f"shape {tuple(shape)} has {len(shape)} axes; the limit is {MAX_BLOB_AXES} (Caffe's kMaxBlobAxes)"
    if any(d < 0 for d in shape):
        return f"negative dimension in shape {tuple(shape)}"
    count = math.prod(d for d in shape if d)
    if count > MAX_BLOB_COUNT:
        empty = " (counting its 0 dims as 1)" if 0 in shape else ""
        return (f"shape {tuple(shape)} has {count} elements{empty}; the limit is {MAX_BLOB_COUNT} per blob "
                "(Caffe's INT_MAX)")
    memory = physical_memory()
    if memory is not None and count * itemsize > memory:
        return (f"shape {tuple(shape)} needs {count * itemsize / 2**30:.1f} GiB; the limit is this machine's "
                f"memory, {memory / 2**30:.1f} GiB")
    return None


def is_legacy(blob) -> bool:
    """True when the blob uses the legacy 4-D fields (any of them present)."""
    return any(blob.HasField(name) for name in _LEGACY)


def blob_shape(blob) -> tuple[int, ...]:
    """The blob's shape: legacy (num, channels, height, width) when present, else `shape.dim`."""
    if is_legacy(blob):
        return tuple(int(getattr(blob, name)) for name in _LEGACY)
    return tuple(int(d) for d in blob.shape.dim)


def blob_to_array(blob, what: str = "blob") -> np.ndarray:
    """The blob's values (double_data preferred when present) as a float32 array of its shape."""
    shape = blob_shape(blob)
    values = blob.double_data if len(blob.double_data) else blob.data
    problem = shape_problem(shape)
    if problem:
        raise WeightsError(f"{what}: {problem}")
    count = math.prod(shape)
    if len(values) != count:
        raise WeightsError(f"{what}: shape {shape} needs {count} values but the file holds {len(values)}")
    return np.asarray(values, dtype=np.float32).reshape(shape)


def legacy_shape_matches(blob, shape: tuple[int, ...]) -> bool:
    """Caffe's rule for loading a blob into a target of `shape`: legacy 4-D blobs match the target's
    shape right-aligned into 4 axes with leading 1s; `shape`-encoded blobs must be equal."""
    source = blob_shape(blob)
    if not is_legacy(blob):
        return source == tuple(shape)
    if len(shape) > 4:
        return False
    return source == (1,) * (4 - len(shape)) + tuple(shape)


def _packed_floats(field_number: int, values: np.ndarray) -> bytes:
    """The wire bytes of a packed float field: merging them is a memcpy, not a per-value loop."""
    raw = np.ascontiguousarray(values, dtype="<f4").tobytes()
    length, varint = len(raw), bytearray()
    while True:
        byte, length = length & 0x7F, length >> 7
        varint.append(byte | (0x80 if length else 0))
        if not length:
            break
    return bytes([field_number << 3 | 2]) + bytes(varint) + raw


def array_to_blob(array, with_diff=None):
    """A BlobProto with `shape.dim` and float data (how Caffe writes every blob)."""
    blob = caffe_pb2.BlobProto()
    values = np.asarray(array, dtype=np.float32)
    blob.shape.dim.extend(values.shape)
    if values.size:
        blob.MergeFromString(_packed_floats(5, values))
    if with_diff is not None and np.size(with_diff):
        blob.MergeFromString(_packed_floats(6, np.asarray(with_diff)))
    return blob
