"""Caffe's per-sample data transforms, exact to the bit.

`transform_segmentation` is the DeepLab fork's image + label transform used by ImageSegData, in
the fork's order: mirror drawn first, optional rescale by a random `scale_factors` entry (truncated
sizes, OpenCV bilinear image / nearest label), bottom/right padding to the crop with the mean colour
and `ignore_label`, random (TRAIN) or centre (TEST) crop, `(pixel - mean) * scale` in float64,
horizontal flip of data and label together.

`transform_image` is upstream Caffe's image transform used by ImageData: no padding (an image
smaller than the crop is an error), no rescaling, `(pixel - mean) * scale` in float32, the mean
being `mean_value` or a mean image (`mean_file`, `read_mean_image`) of the image's own size, taken at
the crop's source pixels.

Random draws come from the `numpy.random.Generator` given per sample, in Caffe's order: mirror,
scale factor, row offset, column offset.

Padding becomes exactly 0 after mean subtraction whatever the number of mean values (Caffe pads with
`mean_value[0..2]`, which needs three values; with one we use it for every channel, with none 0).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from rloss.data.resize import resize_linear, resize_nearest
from rloss.errors import DataError, WeightsError
from rloss.io import read_blob_proto
from rloss.proto.blob import blob_shape, blob_to_array, shape_problem


@dataclass(frozen=True)
class TransformConfig:
    """What `transform_param` (and the phase) ask for. `mean` is float32, one value per channel
    (zeros when none is given); `scale` and `scale_factors` are float32 values as Caffe stores them;
    `mean_image` is the (H, W, C) float32 mean of `mean_file` (`transform_image` only)."""

    crop: tuple[int, int] | None
    mean: np.ndarray
    scale: float
    mirror: bool
    random_crop: bool
    scale_factors: tuple[float, ...] = ()
    ignore_label: int = 255
    mean_image: np.ndarray | None = None


def _draw_mirror(config: TransformConfig, rng: np.random.Generator) -> bool:
    return bool(config.mirror and rng.integers(2))


def _crop_offset(size: int, crop: int, config: TransformConfig, rng: np.random.Generator) -> int:
    """Uniform in [0, size - crop] when cropping at random (TRAIN), else the integer centre."""
    if config.random_crop:
        return int(rng.integers(size - crop + 1))
    return (size - crop) // 2


def _crop_window(height: int, width: int, config: TransformConfig,
                 rng: np.random.Generator) -> tuple[int, int, int, int]:
    """(row offset, column offset, crop height, crop width) over the image padded to the crop."""
    if config.crop is None:
        return 0, 0, height, width
    crop_h, crop_w = config.crop
    row = _crop_offset(max(height, crop_h), crop_h, config, rng)
    column = _crop_offset(max(width, crop_w), crop_w, config, rng)
    return row, column, crop_h, crop_w


def _padded(inside: np.ndarray, height: int, width: int, fill) -> np.ndarray:
    """`inside` (the part of a crop window within the image) extended at the bottom/right to
    (height, width) with `fill`: Caffe's padding of images smaller than the crop."""
    if inside.shape[:2] == (height, width):
        return inside
    out = np.full((height, width) + inside.shape[2:], fill, dtype=inside.dtype)
    out[:inside.shape[0], :inside.shape[1]] = inside
    return out


def _normalise(pixels: np.ndarray, config: TransformConfig, dtype) -> np.ndarray:
    """(pixel - mean) * scale computed in `dtype` (float64 in the fork's transformer, float32
    upstream), stored as float32; (H, W, C) layout kept."""
    mean = config.mean.astype(dtype)
    return ((pixels.astype(dtype) - mean) * dtype(config.scale)).astype(np.float32)


def _channels_first(data: np.ndarray, mirror: bool) -> np.ndarray:
    """(H, W, C) -> contiguous (C, H, W), flipped left-right when mirrored."""
    data = data.transpose(2, 0, 1)
    return np.ascontiguousarray(data[:, :, ::-1] if mirror else data)


def scaled_size(height: int, width: int, factor: float) -> tuple[int, int]:
    """Caffe's `(int)(size * scale)` with a float32 product, truncated toward zero."""
    factor32 = np.float32(factor)
    return int(np.float32(height) * factor32), int(np.float32(width) * factor32)


def _rescale(image: np.ndarray, label: np.ndarray, config: TransformConfig,
             rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    if not config.scale_factors:
        return image, label
    factor = config.scale_factors[int(rng.integers(len(config.scale_factors)))]
    if factor == 1:
        return image, label
    height, width = scaled_size(image.shape[0], image.shape[1], factor)
    if height < 1 or width < 1:
        raise DataError(f"scale factor {factor} makes the {image.shape[0]}x{image.shape[1]} image empty")
    # The bilinear resize holds a few int32 and float copies of the scaled image: refuse what cannot fit.
    problem = shape_problem((height, width, image.shape[2] if image.ndim == 3 else 1), itemsize=16)
    if problem:
        raise DataError(f"scale factor {factor} makes the {image.shape[0]}x{image.shape[1]} image "
                        f"{height}x{width}: {problem}")
    return resize_linear(image, height, width), resize_nearest(label, height, width)


def transform_segmentation(image: np.ndarray, label: np.ndarray, config: TransformConfig,
                           rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """BGR uint8 (H, W, 3) image and uint8 (H, W) label -> data (3, h, w) float32, label (h, w)
    float32 and data_dim [min(h, H), min(w, W)] (pre-scaling size clipped to the crop)."""
    height, width = image.shape[:2]
    crop_h, crop_w = config.crop or (height, width)
    data_dim = np.array([min(crop_h, height), min(crop_w, width)], dtype=np.float32)
    mirror = _draw_mirror(config, rng)
    image, label = _rescale(image, label, config, rng)
    row, column, out_h, out_w = _crop_window(image.shape[0], image.shape[1], config, rng)
    window = (slice(row, row + out_h), slice(column, column + out_w))
    # Padded pixels hold the mean, so they become (mean - mean) * scale = 0.
    pad_value = np.float32(0.0 * config.scale)
    data = _padded(_normalise(image[window], config, np.float64), out_h, out_w, pad_value)
    labels = _padded(label[window], out_h, out_w, config.ignore_label).astype(np.float32)
    labels = np.ascontiguousarray(labels[:, ::-1] if mirror else labels)
    return _channels_first(data, mirror), labels, data_dim


def read_mean_image(path: str) -> np.ndarray:
    """The first image of the BlobProto in `path` as (H, W, C) float32, its axes read as Caffe's
    legacy accessors read a mean blob (channels, height, width = axes 1, 2, 3; missing ones are 1)."""
    try:
        blob = read_blob_proto(path)
        values = blob_to_array(blob, f"the mean file '{path}'")
    except WeightsError as error:
        raise DataError(str(error)) from None
    shape = blob_shape(blob)
    if not 1 <= len(shape) <= 4 or 0 in shape:
        raise DataError(f"'{path}' holds a blob of shape {shape}; a mean image is (1, channels, height, width)")
    _, channels, height, width = shape + (1,) * (4 - len(shape))
    first = values.reshape(-1)[:channels * height * width].astype(np.float32)
    return np.ascontiguousarray(first.reshape(channels, height, width).transpose(1, 2, 0))


def _minus_mean_image(image: np.ndarray, mean_image: np.ndarray | None) -> np.ndarray:
    """The whole image less the mean image, in float32 (Caffe's `pixel - mean[index]`, so cropping
    and mirroring afterwards take the mean at each pixel's source position); Caffe CHECKs the sizes."""
    if mean_image is None:
        return image
    if mean_image.shape != image.shape:
        height, width, channels = image.shape
        mean_h, mean_w, mean_c = mean_image.shape
        raise DataError(f"the image's channels x height x width {channels} x {height} x {width} differ from "
                        f"the mean file's {mean_c} x {mean_h} x {mean_w}")
    return image.astype(np.float32) - mean_image


def transform_image(image: np.ndarray, config: TransformConfig, rng: np.random.Generator) -> np.ndarray:
    """Upstream Caffe's transform of an (H, W, C) uint8 image -> (C, h, w) float32."""
    height, width = image.shape[:2]
    mirror = _draw_mirror(config, rng)
    if config.crop is not None and (height < config.crop[0] or width < config.crop[1]):
        raise DataError(f"the {height}x{width} image is smaller than the crop "
                        f"{config.crop[0]}x{config.crop[1]} (ImageData does not pad)")
    image = _minus_mean_image(image, config.mean_image)
    row, column, out_h, out_w = _crop_window(height, width, config, rng)
    data = _normalise(image[row:row + out_h, column:column + out_w], config, np.float32)
    return _channels_first(data, mirror)
