"""Permutohedral lattice filtering with the numerics of the DeepLab/rloss Caffe fork.

The C++ extension `rloss._lattice` builds the lattice of an image once and filters all K channels in
one pass (bit-identical to filtering them one at a time like the original, but much faster), in
parallel over images and inside each image. This module is the Python face: it accepts numpy arrays
or torch tensors, validates input and raises `LatticeError` with a clear message instead of crashing.

The filter is the *unnormalised* approximate Gaussian `A v` with `A ~ c * exp(-|f_i - f_j|^2 / 2)`
(c ~ 0.6-0.7, self term included), exactly what `DenseCRFLoss` uses; callers that want a normalised
filter divide by `A 1` themselves (as DenseCRF inference does).
"""

from __future__ import annotations

import math
from typing import Any, Union

import numpy as np
import torch

from rloss.errors import LatticeError
from rloss.host_memory import host_available_bytes

try:
    from rloss import _lattice as _ext
except ImportError as _import_error:  # pragma: no cover - only without a built extension
    _ext = None
    _IMPORT_ERROR: ImportError | None = _import_error
else:
    _IMPORT_ERROR = None

Array = Union[np.ndarray, torch.Tensor]

__all__ = [
    "Permutohedral",
    "bilateral_filter",
    "spatial_filter",
    "caffe_roi_mask",
    "extension",
]

# Memory model of one lattice, for the up-front check: per point and vertex (offset + weight), per
# lattice point (hash slots, key, count, neighbours) and per lattice point and channel (two blur
# buffers). The number of lattice points is data dependent; images give about N/10, we assume N.
_BYTES_PER_VERTEX = 8
_BYTES_PER_LATTICE_POINT = 2 * 16 + 8 + 4 + 8 * 4
_BYTES_PER_LATTICE_VALUE = 2 * 4


def extension() -> Any:
    """The compiled module; raises LatticeError with build instructions when it is missing."""
    if _ext is None:
        raise LatticeError(
            "the C++ lattice extension rloss._lattice is not built "
            f"({_IMPORT_ERROR}); run `python setup.py build_ext --inplace` or `pip install -e .`"
        )
    return _ext


def _threads(num_threads: int | None) -> int:
    n = torch.get_num_threads() if num_threads is None else int(num_threads)
    if n < 1:
        raise LatticeError(f"num_threads must be >= 1, got {num_threads}")
    return n


def _as_numpy(x: Array, name: str) -> np.ndarray:
    """C-contiguous float32 view (or copy) of a numpy array or torch tensor."""
    if isinstance(x, torch.Tensor):
        x = x.detach()
        if x.device.type != "cpu":
            x = x.cpu()
        if x.dtype != torch.float32:
            if not (x.is_floating_point() or x.dtype in (torch.uint8, torch.int16, torch.int32, torch.int64)):
                raise LatticeError(f"{name} must be a real-valued tensor, got dtype {x.dtype}")
            x = x.float()
        return x.contiguous().numpy()
    if not isinstance(x, np.ndarray):
        try:
            x = np.asarray(x)
        except Exception as e:
            raise LatticeError(f"{name} must be a numpy array or torch tensor, got {type(x).__name__}") from e
    if x.dtype.kind not in "fiub":
        raise LatticeError(f"{name} must be real-valued, got dtype {x.dtype}")
    return np.ascontiguousarray(x, dtype=np.float32)


def _wrap_like(result: np.ndarray, like: Array) -> Array:
    if isinstance(like, torch.Tensor):
        t = torch.from_numpy(result)
        return t if like.device.type == "cpu" else t.to(like.device)
    return result


def _check_sigma(value: float, name: str) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError) as e:
        raise LatticeError(f"{name} must be a number, got {value!r}") from e
    if not math.isfinite(v) or v <= 0.0:
        raise LatticeError(f"{name} must be a finite number > 0, got {value!r}")
    return v


def _check_finite(a: np.ndarray, name: str) -> None:
    if not np.isfinite(a).all():
        raise LatticeError(f"{name} contains NaN or Inf")


def _check_memory(points: int, dim: int, channels: int, images_at_once: int) -> None:
    """Refuses sizes that overflow the lattice's int32 indices or clearly exceed the available memory."""
    if points * (dim + 1) >= 2**31 - 64:
        raise LatticeError(
            f"image too large for the lattice: {points} points x {dim + 1} vertices exceeds 2^31 "
            "(split the image or downscale it)"
        )
    kp = channels if channels <= 4 else (channels + 7) // 8 * 8
    per_lattice = points * (dim + 1) * _BYTES_PER_VERTEX + points * (
        _BYTES_PER_LATTICE_POINT + (dim + 1) * 8 + kp * _BYTES_PER_LATTICE_VALUE
    )
    need = images_at_once * per_lattice
    avail = host_available_bytes()
    if avail is not None and need > avail:
        raise LatticeError(
            f"lattice filtering needs about {need / 2**30:.1f} GiB of memory but only {avail / 2**30:.1f} GiB are "
            "available (reduce the image size, the batch or the thread count)"
        )


def _call(fn: Any, *args: Any, **kwargs: Any) -> Any:
    """Calls into C++, turning its ValueError/MemoryError into LatticeError."""
    try:
        return fn(*args, **kwargs)
    except ValueError as e:
        raise LatticeError(str(e)) from e
    except MemoryError as e:
        raise LatticeError("out of memory while building or filtering the lattice") from e


class Permutohedral:
    """Lattice over N points with d-dimensional features (already divided by their sigmas).

    Build once, then `filter` any number of (N, K) value arrays; building is the expensive part
    that the original repeated for every channel's pass.
    """

    def __init__(self, features: Array, num_threads: int | None = None, sse_pad: bool = True) -> None:
        fshape = _shape(features, "features")
        if len(fshape) != 2:
            raise LatticeError(f"features must have shape (N, d), got {fshape}")
        n, d = fshape
        if n < 1 or d < 1:
            raise LatticeError(f"features must be non-empty (N >= 1 points, d >= 1 dims), got {fshape}")
        if d > 32:
            raise LatticeError(f"feature dimension {d} is larger than the supported maximum 32")
        _check_memory(n, d, 1, 1)
        f = _as_numpy(features, "features")
        _check_finite(f, "features")
        self._threads = _threads(num_threads)
        self._lattice = _call(extension().Lattice, f, num_threads=self._threads, sse_pad=sse_pad)

    @classmethod
    def from_image(cls, image: Array, sigma_xy: float, sigma_rgb: float, num_threads: int | None = None,
                   sse_pad: bool = True) -> Permutohedral:
        """Lattice over the H*W pixels of image (C, H, W), in row-major pixel order, with the DenseCRF
        features (x/sigma_xy, y/sigma_xy, c_0/sigma_rgb, ..., c_{C-1}/sigma_rgb), x the column and y
        the row: made in C++, where the loss makes them. C may be 0 (spatial features only)."""
        shape = _shape(image, "image")
        if len(shape) != 3 or min(shape[1:]) < 1:
            raise LatticeError(f"image must have shape (C, H, W) with H, W >= 1, got {shape}")
        c, h, w = shape
        if c + 2 > 32:
            raise LatticeError(f"image has {c} channels; at most 30 are supported")
        sxy = _check_sigma(sigma_xy, "sigma_xy")
        sr = _check_sigma(sigma_rgb, "sigma_rgb")
        _check_memory(h * w, c + 2, 1, 1)
        img = _as_numpy(image, "image")
        _check_finite(img, "image")
        lattice = cls.__new__(cls)
        lattice._threads = _threads(num_threads)
        lattice._lattice = _call(extension().Lattice.from_image, img, sxy, sr, num_threads=lattice._threads,
                                 sse_pad=sse_pad)
        return lattice

    @classmethod
    def spatial(cls, height: int, width: int, sigma_xy: float, num_threads: int | None = None,
                sse_pad: bool = True) -> Permutohedral:
        """Lattice over the pixels of an H x W image with the features (x/sigma_xy, y/sigma_xy) only."""
        return cls.from_image(np.zeros((0, height, width), np.float32), sigma_xy, 1.0, num_threads, sse_pad)

    @property
    def num_points(self) -> int:
        return int(self._lattice.num_points)

    @property
    def dim(self) -> int:
        return int(self._lattice.dim)

    @property
    def lattice_size(self) -> int:
        """Number of lattice points M (vertices of the simplices that enclose the features)."""
        return int(self._lattice.lattice_size)

    def filter(self, values: Array, num_threads: int | None = None) -> Array:
        """A @ values for values of shape (N, K) (or (N,), treated as K = 1); same type as the input."""
        v = _as_numpy(values, "values")
        squeeze = v.ndim == 1
        if squeeze:
            v = v[:, None]
        if v.ndim != 2 or v.shape[0] != self.num_points:
            raise LatticeError(
                f"values must have shape (N, K) with N = {self.num_points}, got {tuple(np.shape(values))}"
            )
        if v.shape[1] < 1:
            raise LatticeError("values must have at least one channel")
        threads = self._threads if num_threads is None else _threads(num_threads)
        out = _call(self._lattice.filter, v, num_threads=threads)
        return _wrap_like(out[:, 0] if squeeze else out, values)


def _shape(x: Any, name: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in np.shape(x))
    except Exception as e:
        raise LatticeError(f"{name} must be a numpy array or torch tensor, got {type(x).__name__}") from e


def _check_batch(image_shape: tuple[int, ...], values_shape: tuple[int, ...]) -> None:
    """Shape checks, done before any conversion so that absurd sizes fail fast and cheaply."""
    if len(image_shape) != 4:
        raise LatticeError(f"image must have shape (B, C, H, W), got {image_shape}")
    if len(values_shape) != 4:
        raise LatticeError(f"values must have shape (B, K, H, W), got {values_shape}")
    b, c, h, w = image_shape
    if min(b, h, w) < 1 or c < 1 or min(values_shape) < 1:
        raise LatticeError(f"empty input: image {image_shape}, values {values_shape} (all sizes must be >= 1)")
    if values_shape[0] != b or values_shape[2:] != (h, w):
        raise LatticeError(
            f"values {values_shape} do not match image {image_shape}: need (B, K, H, W) with the image's B, H and W"
        )
    if c + 2 > 32:
        raise LatticeError(f"image has {c} channels; at most 30 are supported")


def bilateral_filter(
    image: Array,
    values: Array,
    sigma_rgb: float,
    sigma_xy: float,
    mask: Array | None = None,
    mask_output: bool = False,
    num_threads: int | None = None,
    out: Array | None = None,
    sse_pad: bool = True,
    roi_from_image: bool = False,
) -> Array:
    """Bilateral lattice filter of a batch: image (B, C, H, W), values (B, K, H, W) -> (B, K, H, W).

    Features are (x/sigma_xy, y/sigma_xy, c_0/sigma_rgb, ..., c_{C-1}/sigma_rgb) with x the column
    and y the row, each divided by its sigma in float32 (the colour order is whatever `image` holds).
    One lattice per image filters all K channels at once. `mask` (B, H, W), when given, multiplies the values before
    filtering (the DenseCRF loss's S * m) and, with `mask_output`, the result too; `roi_from_image`
    uses `caffe_roi_mask(image)` as that mask, computed on the fly in C++ (cheaper than a tensor).
    `out` may be a preallocated (B, K, H, W) float32 buffer. `sse_pad` reproduces the original SSE
    build's extra lattice points when H*W % 4 != 0 (they act as blur relays near the feature origin;
    on the golden cases leaving them out changes the gradient by up to 1%).
    """
    call = _BatchCall(image, values, sigma_rgb, sigma_xy, mask, num_threads, out, roi_from_image)
    res = _call(extension().filter_image_batch, *call.args, mask_output=mask_output, sse_pad=sse_pad,
                **call.kwargs)
    return call.result(res)


class DenseCRFLossTerms:
    """The lattice half of the DenseCRF loss of one batch, -(1/N) sum <m S, A(m S)>, split as autograd calls it.

    `energy(S)` builds one lattice per image, spreads x = m S (m = `mask`, or the fork's mask of
    the image when None) and returns <x_c, (A x)_c> per image and class as a (B, K) float64 tensor,
    computed on the lattice points (the slice is the splat's transpose). The lattices and their
    blurred values are kept, so `gradient(scale)` slices them straight into scale * (A x) m,
    (B, K, H, W) float32, without filtering again and without any N x K intermediate.
    """

    def __init__(self, image: Array, sigma_rgb: float, sigma_xy: float, mask: Array | None = None,
                 num_threads: int | None = None, sse_pad: bool = True) -> None:
        self.image, self.mask = image, mask
        self.sigma_rgb, self.sigma_xy = sigma_rgb, sigma_xy
        self.num_threads, self.sse_pad = num_threads, sse_pad
        self._batch = extension().DenseCRFLossBatch()
        self._shape: tuple[int, ...] | None = None

    def energy(self, segmentation: Array) -> torch.Tensor:
        call = _BatchCall(self.image, segmentation, self.sigma_rgb, self.sigma_xy, self.mask, self.num_threads,
                          out=None, roi_from_image=False, lattices_kept=True)
        img, seg, sxy, sr = call.args
        dots = _call(self._batch.forward, img, seg, sxy, sr, mask=call.kwargs["mask"],
                     num_threads=call.kwargs["num_threads"], sse_pad=self.sse_pad)
        self._shape = tuple(seg.shape)
        return torch.from_numpy(dots)

    def gradient(self, scale: float) -> torch.Tensor:
        if self._shape is None:
            raise LatticeError("DenseCRFLossTerms.gradient called before energy")
        grad = _call(self._batch.backward, float(scale), num_threads=_threads(self.num_threads))
        return torch.from_numpy(grad).reshape(self._shape)


class _BatchCall:
    """Checks and converts the arguments of the batched image filters (shapes first, so that absurd
    sizes fail fast and cheaply), and wraps the result like the input."""

    def __init__(self, image: Array, values: Array, sigma_rgb: float, sigma_xy: float, mask: Array | None,
                 num_threads: int | None, out: Array | None, roi_from_image: bool, lattices_kept: bool = False) -> None:
        ishape, vshape = _shape(image, "image"), _shape(values, "values")
        _check_batch(ishape, vshape)
        sr = _check_sigma(sigma_rgb, "sigma_rgb")
        sxy = _check_sigma(sigma_xy, "sigma_xy")
        b, c, h, w = ishape
        k = vshape[1]
        threads = _threads(num_threads)
        # The loss keeps every image's lattice until backward; filters hold one per thread.
        _check_memory(h * w, c + 2, k, b if lattices_kept else min(b, threads))
        img = _as_numpy(image, "image")
        _check_finite(img, "image")
        if mask is not None and roi_from_image:
            raise LatticeError("give either mask or roi_from_image, not both")
        mk = None
        if mask is not None:
            mk = _as_numpy(mask, "mask")
            if mk.shape != (b, h, w):
                raise LatticeError(f"mask must have shape (B, H, W) = {(b, h, w)}, got {tuple(mk.shape)}")
        self.out, self.like = out, values
        out_np = None if out is None else _out_array(out, (b, k, h, w))
        self.args = (img, _as_numpy(values, "values"), sxy, sr)
        self.kwargs = {"mask": mk, "num_threads": threads, "out": out_np, "roi_from_image": roi_from_image}

    def result(self, res: np.ndarray) -> Array:
        return self.out if self.out is not None else _wrap_like(res, self.like)


def _out_array(out: Array, shape: tuple[int, ...]) -> np.ndarray:
    if isinstance(out, torch.Tensor):
        if out.dtype != torch.float32 or out.device.type != "cpu" or not out.is_contiguous():
            raise LatticeError("out must be a contiguous float32 CPU tensor")
        out_np = out.detach().numpy()
    else:
        out_np = out
    if tuple(out_np.shape) != shape:
        raise LatticeError(f"out must have shape {shape}, got {tuple(out_np.shape)}")
    return out_np


def spatial_filter(values: Array, sigma_xy: float, num_threads: int | None = None, sse_pad: bool = True) -> Array:
    """Lattice filter with 2-D features (x/sigma_xy, y/sigma_xy) only (DenseCRF's Gaussian kernel).

    values (B, K, H, W) -> (B, K, H, W); same lattice for all images of the batch shape.
    """
    vshape = _shape(values, "values")
    if len(vshape) != 4:
        raise LatticeError(f"values must have shape (B, K, H, W), got {vshape}")
    if min(vshape) < 1:
        raise LatticeError(f"empty input: values {vshape} (all sizes must be >= 1)")
    sxy = _check_sigma(sigma_xy, "sigma_xy")
    b, k, h, w = vshape
    threads = _threads(num_threads)
    _check_memory(h * w, 2, k * b, 1)
    val = _as_numpy(values, "values")
    # The features do not depend on the image, so the batch is filtered as one image with B*K channels.
    empty = np.zeros((1, 0, h, w), dtype=np.float32)
    res = _call(
        extension().filter_image_batch,
        empty,
        val.reshape(1, b * k, h, w),
        sxy,
        1.0,
        num_threads=threads,
        sse_pad=sse_pad,
    )
    return _wrap_like(res.reshape(b, k, h, w), values)


def caffe_roi_mask(image: Array) -> Array:
    """DenseCRFLoss's region of interest, as the loss computes it when given no mask (in C++): 0 where
    all channels of the mean-subtracted image truncate to integer 0 (|value| < 1, i.e. crop padding),
    else 1. image (B, C, H, W) -> float32 mask (B, H, W), same type as the input."""
    shape = _shape(image, "image")
    if len(shape) != 4 or min(shape[0], shape[2], shape[3]) < 1:
        raise LatticeError(f"image must have shape (B, C, H, W) with B, H, W >= 1, got {shape}")
    return _wrap_like(_call(extension().roi_mask, _as_numpy(image, "image")), image)
