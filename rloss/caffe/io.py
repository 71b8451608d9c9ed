"""pycaffe's caffe.io: image loading, resizing, the Transformer and blob/datum conversions.

Images are H x W x K float arrays in [0, 1] with RGB channels, as pycaffe's (which read them with
scikit-image); here PIL reads them and scipy.ndimage resizes them. Where pycaffe changes the caller's
array in place or fails on a case it documents (grey images in `deprocess`, 2-D means), these functions
give pycaffe's documented result instead and say so.
"""

from __future__ import annotations

import io as _bytes_io
import math
from typing import Mapping, Sequence

import numpy as np
from google.protobuf.message import DecodeError
from PIL import Image, UnidentifiedImageError
from scipy.ndimage import zoom

from rloss.errors import DataError, NetError, ProtoError
from rloss.proto import caffe_pb2
from rloss.proto.blob import array_to_blob, blob_shape

# ---- blobs and datums ------------------------------------------------------------------------------


def blobproto_to_array(blob, return_diff: bool = False) -> np.ndarray:
    """The blob's data (or diff) as a float64 array (pycaffe's dtype) of the blob's shape: the legacy
    num/channels/height/width when any of them is set, else `shape.dim`. The double fields are read
    when the float ones are empty (pycaffe reads only the float ones)."""
    if return_diff:
        values, what = (blob.diff if len(blob.diff) else blob.double_diff), "diff"
    else:
        values, what = (blob.data if len(blob.data) else blob.double_data), "data"
    shape = blob_shape(blob)
    if len(values) != math.prod(shape):
        raise ProtoError(f"BlobProto of shape {shape} needs {math.prod(shape)} {what} values but holds {len(values)}")
    return np.asarray(values, dtype=np.float64).reshape(shape)


def array_to_blobproto(arr, diff=None) -> caffe_pb2.BlobProto:
    """A BlobProto with `shape.dim`, the float data and, when given, the diff (of the same shape)."""
    array = np.asarray(arr)
    if diff is not None and np.shape(diff) != array.shape:
        raise DataError(f"array_to_blobproto: diff of shape {np.shape(diff)} differs from the array's {array.shape}")
    return array_to_blob(array, diff)


def arraylist_to_blobprotovector_str(arraylist: Sequence) -> bytes:
    """The arrays as a serialized BlobProtoVector."""
    vector = caffe_pb2.BlobProtoVector()
    vector.blobs.extend(array_to_blobproto(array) for array in arraylist)
    return vector.SerializeToString()


def blobprotovector_str_to_arraylist(serialized: bytes) -> list[np.ndarray]:
    """The arrays of a serialized BlobProtoVector."""
    vector = caffe_pb2.BlobProtoVector()
    try:
        vector.ParseFromString(serialized)
    except DecodeError as error:
        raise ProtoError(f"not a serialized BlobProtoVector: {error}") from error
    return [blobproto_to_array(blob) for blob in vector.blobs]


def array_to_datum(arr, label: int | None = None) -> caffe_pb2.Datum:
    """A Datum of a C x H x W array: uint8 arrays become the `data` bytes (as convert_imageset writes
    them), any other dtype the `float_data` values."""
    array = np.asarray(arr)
    if array.ndim != 3:
        raise DataError(f"array_to_datum: a datum holds a C x H x W array, not one of shape {array.shape}")
    datum = caffe_pb2.Datum()
    datum.channels, datum.height, datum.width = array.shape
    if array.dtype == np.uint8:
        datum.data = array.tobytes()
    else:
        datum.float_data.extend(array.astype(np.float64).ravel().tolist())
    if label is not None:
        datum.label = int(label)
    return datum


def datum_to_array(datum) -> np.ndarray:
    """A datum's C x H x W array (its label is `datum.label`): uint8 from the `data` bytes, float64
    from `float_data`. An encoded datum (an image file in `data`) is decoded as Caffe's data layers
    decode it: colour images in BGR order, grey ones with one channel."""
    if datum.encoded:
        return _decoded_datum(datum.data)
    shape = (datum.channels, datum.height, datum.width)
    values = np.frombuffer(datum.data, dtype=np.uint8) if len(datum.data) else np.asarray(datum.float_data, np.float64)
    if values.size != math.prod(shape):
        raise DataError(f"datum of shape {shape} needs {math.prod(shape)} values but holds {values.size}")
    return values.reshape(shape)


def _decoded_datum(encoded: bytes) -> np.ndarray:
    pixels = _read_pixels(_bytes_io.BytesIO(encoded), "encoded datum")
    as_bytes = np.round(np.clip(pixels, 0.0, 1.0) * 255).astype(np.uint8)
    if as_bytes.ndim == 2:
        return as_bytes[np.newaxis]
    return np.ascontiguousarray(as_bytes[:, :, ::-1].transpose(2, 0, 1))


# ---- image files -----------------------------------------------------------------------------------

# skimage's rgb2gray weights (Rec. 709 luma), which pycaffe's load_image(color=False) applies
GREY_WEIGHTS = np.array([0.2125, 0.7154, 0.0721])


def load_image(filename: str, color: bool = True) -> np.ndarray:
    """The image as float32 in [0, 1]: H x W x 3 RGB when `color` (grey images repeated in the three
    channels), else H x W x 1 (colour images weighted into grey as skimage's rgb2gray). Alpha is
    dropped, as pycaffe drops it."""
    pixels = _read_pixels(filename, f"'{filename}'")
    if pixels.ndim == 2:
        grey = pixels[:, :, np.newaxis]
        return np.tile(grey, (1, 1, 3)) if color else grey
    if color:
        return pixels
    return (pixels.astype(np.float64) @ GREY_WEIGHTS).astype(np.float32)[:, :, np.newaxis]


def _read_pixels(source, what: str) -> np.ndarray:
    """H x W (grey) or H x W x 3 (RGB) float32 values in [0, 1], scaled by the file's bit depth as
    skimage's img_as_float scales them (8-bit by 255, 16-bit by 65535; float images kept)."""
    try:
        with Image.open(source) as image:
            image.load()
            return _unit_pixels(image)
    except (OSError, UnidentifiedImageError) as error:
        raise DataError(f"cannot read {what} as an image: {error}") from error


def _unit_pixels(image: Image.Image) -> np.ndarray:
    if image.mode in ("1", "L", "LA"):
        return np.asarray(image.convert("L"), dtype=np.float32) / 255
    if image.mode.startswith("I"):
        return np.asarray(image, dtype=np.float32) / 65535
    if image.mode == "F":
        return np.asarray(image, dtype=np.float32)
    return np.asarray(image.convert("RGB"), dtype=np.float32) / 255


# ---- resizing and cropping -------------------------------------------------------------------------


def resize_image(im, new_dims: Sequence[int], interp_order: int = 1) -> np.ndarray:
    """An H x W x K image resized to `new_dims` (height, width) with spline interpolation of order
    `interp_order`, as float32.

    1- and 3-channel images follow pycaffe's skimage path: values scaled to [0, 1] by the image's
    min and max, resized as skimage.transform.resize(mode='constant', anti_aliasing=False) does (the
    pixel-area grid, zeros beyond the border, clipped to [0, 1]), scaled back; a constant image
    comes back filled with its value. Other channel counts follow pycaffe's scipy.ndimage.zoom path
    (corner pixels aligned)."""
    image = np.asarray(im)
    if image.ndim != 3 or 0 in image.shape:
        raise DataError(f"resize_image: needs a non-empty H x W x K image, not one of shape {image.shape}")
    if len(new_dims) != 2:
        raise DataError(f"resize_image: new_dims must be (height, width), not {tuple(new_dims)}")
    height, width = (int(d) for d in new_dims)
    factors = (height / image.shape[0], width / image.shape[1], 1.0)
    if image.shape[-1] not in (1, 3):
        return zoom(image, factors, order=interp_order).astype(np.float32)
    low, high = float(image.min()), float(image.max())
    if high <= low:
        return np.full((height, width, image.shape[-1]), low, dtype=np.float32)
    unit = (image.astype(np.float64) - low) / (high - low)
    resized = zoom(unit, factors, order=interp_order, mode="grid-constant", cval=0.0, grid_mode=True)
    return (np.clip(resized, 0.0, 1.0) * (high - low) + low).astype(np.float32)


def center_crop_corner(image_dims: Sequence[int], crop_dims: Sequence[int]) -> tuple[int, int]:
    """(top, left) of pycaffe's centre crop: the centre minus half the crop, rounded down."""
    return ((int(image_dims[0]) - int(crop_dims[0])) // 2, (int(image_dims[1]) - int(crop_dims[1])) // 2)


def oversample(images, crop_dims: Sequence[int]) -> np.ndarray:
    """The 10 crops of each H x W x K image, image after image: the top-left, top-right, bottom-left,
    bottom-right and centre crops, then the same five mirrored left-right (10 N x h x w x K float32)."""
    stack = _image_stack(images)
    height, width = stack.shape[1:3]
    crop_h, crop_w = (int(d) for d in crop_dims)
    if not (0 < crop_h <= height and 0 < crop_w <= width):
        raise DataError(f"oversample: crop {crop_h} x {crop_w} does not fit the images' {height} x {width}")
    corners = [(0, 0), (0, width - crop_w), (height - crop_h, 0), (height - crop_h, width - crop_w),
               center_crop_corner((height, width), (crop_h, crop_w))]
    crops = [stack[:, top:top + crop_h, left:left + crop_w] for top, left in corners]
    crops += [crop[:, :, ::-1] for crop in crops]
    return np.stack(crops, axis=1).reshape(-1, crop_h, crop_w, stack.shape[3]).astype(np.float32)


def _image_stack(images) -> np.ndarray:
    """N x H x W x K from a sequence of images that all share one H x W x K shape."""
    arrays = [np.asarray(image) for image in images]
    if not arrays:
        raise DataError("no images given")
    shapes = {array.shape for array in arrays}
    if len(shapes) > 1 or arrays[0].ndim != 3:
        raise DataError(f"images must all be H x W x K of one shape; got shapes {sorted(shapes)}")
    return np.stack(arrays)


# ---- the Transformer -------------------------------------------------------------------------------


class Transformer:
    """pycaffe's preprocessing of an H x W x K image into a net input (and back), per input blob:
    resize to the blob's H x W, transpose, channel swap, raw scale, mean subtraction, input scale.
    `inputs` maps input names to their blob shapes (N, C, H, W)."""

    def __init__(self, inputs: Mapping[str, Sequence[int]]):
        self.inputs = inputs
        self.transpose: dict[str, Sequence[int]] = {}
        self.channel_swap: dict[str, Sequence[int]] = {}
        self.raw_scale: dict[str, float] = {}
        self.mean: dict[str, np.ndarray] = {}
        self.input_scale: dict[str, float] = {}

    def _shape(self, in_: str) -> tuple[int, ...]:
        if in_ not in self.inputs:
            raise NetError(f"'{in_}' is not one of the net inputs: {list(self.inputs)}")
        return tuple(int(d) for d in self.inputs[in_])

    def preprocess(self, in_: str, data) -> np.ndarray:
        """The net input (K x H x W float32) for one image, in pycaffe's order of operations; the
        caller's array is never changed (pycaffe scales it in place when no step copies it)."""
        shape = self._shape(in_)
        caffe_in = np.array(data, dtype=np.float32)
        if caffe_in.shape[:2] != shape[2:]:
            caffe_in = resize_image(caffe_in, shape[2:])
        if self.transpose.get(in_) is not None:
            caffe_in = caffe_in.transpose(self.transpose[in_])
        if self.channel_swap.get(in_) is not None:
            caffe_in = caffe_in[list(self.channel_swap[in_])]
        if self.raw_scale.get(in_) is not None:
            caffe_in *= self.raw_scale[in_]
        if self.mean.get(in_) is not None:
            caffe_in -= self.mean[in_]
        if self.input_scale.get(in_) is not None:
            caffe_in *= self.input_scale[in_]
        return caffe_in

    def deprocess(self, in_: str, data) -> np.ndarray:
        """The image back from a net input (K x H x W, or a batch of one): preprocess's steps undone in
        reverse order (without the resize). Only leading unit axes are dropped, where pycaffe squeezes
        every unit axis and so fails on grey inputs."""
        shape = self._shape(in_)
        decaf_in = np.array(data, dtype=np.result_type(np.asarray(data).dtype, np.float32))
        while decaf_in.ndim > len(shape) - 1 and decaf_in.shape[0] == 1:
            decaf_in = decaf_in[0]
        if decaf_in.ndim != len(shape) - 1:
            raise NetError(f"deprocess('{in_}'): data of shape {np.shape(data)} is not one input item "
                           f"of {len(shape) - 1} axes (input shape {shape})")
        if self.input_scale.get(in_) is not None:
            decaf_in /= self.input_scale[in_]
        if self.mean.get(in_) is not None:
            decaf_in += self.mean[in_]
        if self.raw_scale.get(in_) is not None:
            decaf_in /= self.raw_scale[in_]
        if self.channel_swap.get(in_) is not None:
            decaf_in = decaf_in[np.argsort(self.channel_swap[in_])]
        if self.transpose.get(in_) is not None:
            decaf_in = decaf_in.transpose(np.argsort(self.transpose[in_]))
        return decaf_in

    def set_transpose(self, in_: str, order: Sequence[int]) -> None:
        """Axis order taking the image to the blob's item layout: (2, 0, 1) turns H x W x K into K x H x W."""
        shape = self._shape(in_)
        if len(order) != len(shape) - 1:
            raise NetError(f"set_transpose('{in_}', {tuple(order)}): the order needs {len(shape) - 1} axes, "
                           f"one per axis of an input item {shape[1:]}")
        self.transpose[in_] = order

    def set_channel_swap(self, in_: str, order: Sequence[int]) -> None:
        """Channel order after the transpose: (2, 1, 0) turns RGB into BGR."""
        channels = self._shape(in_)[1]
        if len(order) != channels:
            raise NetError(f"set_channel_swap('{in_}', {tuple(order)}): the order needs {channels} entries, "
                           "one per input channel")
        self.channel_swap[in_] = order

    def set_raw_scale(self, in_: str, scale: float) -> None:
        """Factor applied before the mean: 255 for models trained on [0, 255] pixels."""
        self._shape(in_)
        self.raw_scale[in_] = scale

    def set_mean(self, in_: str, mean) -> None:
        """The mean to subtract: one value per channel (C,), or a mean image (H, W) or (C, H, W)
        (one channel or C), resized to the input's H x W when its size differs (as pycaffe resizes a
        227 x 227 input's 256 x 256 ImageNet mean)."""
        shape = self._shape(in_)
        mean = np.asarray(mean)
        if mean.ndim == 1:
            if mean.shape[0] != shape[1]:
                raise NetError(f"set_mean('{in_}'): the mean has {mean.shape[0]} channel values but the input "
                               f"has {shape[1]} channels")
            mean = mean[:, np.newaxis, np.newaxis]
        else:
            mean = mean[np.newaxis] if mean.ndim == 2 else mean
            if mean.ndim != 3 or mean.shape[0] not in (1, shape[1]):
                raise NetError(f"set_mean('{in_}'): a mean of shape {np.shape(mean)} fits no input of shape "
                               f"{shape}; give (C,), (H, W) or (C, H, W) with C = 1 or {shape[1]}")
            if mean.shape[1:] != shape[2:]:
                mean = resize_image(mean.transpose(1, 2, 0), shape[2:]).transpose(2, 0, 1)
        self.mean[in_] = mean

    def set_input_scale(self, in_: str, scale: float) -> None:
        """Factor applied last, after the mean (raw_scale comes before it)."""
        self._shape(in_)
        self.input_scale[in_] = scale
