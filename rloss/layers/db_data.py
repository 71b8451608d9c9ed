"""Caffe's Data layer: batches of Datum records read from an LMDB database.

The records are read in key order, starting again at the first key after the last (Caffe's cursor
over the database); each is decoded (raw bytes or floats C x H x W, or an encoded JPEG/PNG decoded
as OpenCV's `imdecode` gives it) and transformed as Caffe's DataTransformer transforms a Datum:
optional mirror coin, crop (random in TRAIN, centred in TEST), `(value - mean) * scale` in float32
with the mean from `mean_file` (a mean image, cropped with the datum) or `mean_value`. Tops: data
(N, C, h, w) and, when named, label (N,). The shape comes from each batch's first record, so
databases of uncropped images of several sizes work as in Caffe, one size per batch.

LMDB is the only backend (LEVELDB is refused) and needs the optional `lmdb` package. The cursor
moves in the consumer thread; decoding and transforms run in background threads
(`rloss.data.prefetch`, `data_param.prefetch` batches ahead). Random draws come from a generator
seeded from torch's when the layer is built, one seed per record, as ImageData draws them;
`data_state()` saves the position after the batches `forward` returned (cursor, passes, generator),
so a resumed run reads exactly the batches of an uninterrupted one.
"""

from __future__ import annotations

import io
import logging
import os
import threading
from dataclasses import dataclass
from functools import partial
from typing import Any, Callable

import numpy as np
import torch
from google.protobuf.message import DecodeError
from PIL import Image

from rloss.data.imageio import libpng_gray
from rloss.data.transform import TransformConfig, read_mean_image, transform_image
from rloss.errors import DataError
from rloss.layers.base import Shape
from rloss.layers.data import DataShare, generator_message, torch_drawn_seed
from rloss.layers.prefetching import PrefetchingSource
from rloss.layers.registry import register_layer
from rloss.proto import caffe_pb2

log = logging.getLogger("rloss")

# data_param fields Caffe's Data layer does not read: the transform ones moved to transform_param
# (a V1 net's are moved there on upgrade), rand_skip and force_encoded_color are unused.
_IGNORED_DATA_FIELDS = ("scale", "mean_file", "crop_size", "mirror", "rand_skip", "force_encoded_color")
_GREY_MODES = ("L", "1")
_ALPHA_MODES = ("RGBA", "LA", "PA")


@dataclass(frozen=True)
class _Record:
    """One database entry as the cursor handed it out: its index in key order, key, value, and the
    seed of its random draws."""

    index: int
    key: bytes
    value: bytes
    seed: int


@dataclass(frozen=True)
class _Position:
    """Where the cursor stands: the index of the next entry, the passes completed, the generator."""

    cursor: int
    epoch: int
    generator: dict[str, Any]


class _KeyOrderCursor:
    """Caffe's LMDB cursor: entries in key order, back to the first one after the last. It also
    draws each record's seed, so that `state()` covers every draw the layer makes."""

    def __init__(self, environment, rng: np.random.Generator):
        self.count = int(environment.stat()["entries"])
        self.rng = rng
        self._cursor = environment.begin(buffers=False).cursor()
        self._cursor.first()
        self.index = 0
        self.epoch = 0

    def current(self) -> _Record:
        """The entry the cursor is at (the first one, before any `take`) with seed 0, without moving:
        what Caffe reads at set-up to shape the tops."""
        key, value = self._cursor.item()
        return _Record(self.index, key, value, 0)

    def take(self) -> _Record:
        key, value = self._cursor.item()
        record = _Record(self.index, key, value, int(self.rng.integers(2**63)))
        self.index += 1
        if not self._cursor.next():
            self._cursor.first()
            self.index = 0
            self.epoch += 1
        return record

    def state(self) -> _Position:
        return _Position(self.index, self.epoch, self.rng.bit_generator.state)

    def set_state(self, position: _Position) -> None:
        """Continue from `position` (its cursor checked by the caller to be < count): the cursor walks
        there from the first key, as LMDB has no seek by index."""
        self._cursor.first()
        for _ in range(position.cursor):
            self._cursor.next()
        self.index, self.epoch = position.cursor, position.epoch
        self.rng.bit_generator.state = position.generator


def _planner(cursor: _KeyOrderCursor, batch_size: int, share: DataShare) -> Callable[[], list[_Record]]:
    """The next batch's records, read in the consumer thread: the batches of all `share.ranks` ranks
    are read, so that every rank walks the one-process sequence, and this rank's is kept."""

    def plan() -> list[_Record]:
        batches = [[cursor.take() for _ in range(batch_size)] for _ in range(share.ranks)]
        return batches[share.rank]

    return plan


def _opencv_like(image: Image.Image, colour: str) -> np.ndarray:
    """The decoded image as `cv::imdecode` gives it, (H, W, C) uint8: `colour` "native" (Caffe's
    default, flag -1: grey stays 1 channel, alpha or a transparency gives BGRA, else BGR), "color"
    (force_color: BGR) or "gray" (force_gray: libpng's luma for non-grey images)."""
    if image.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
        raise DataError(f"it has {image.mode} pixels; Caffe's Data layer takes 8-bit images only")
    if colour == "gray":
        grey = image.convert("L") if image.mode in _GREY_MODES + ("LA",) else None
        return (np.asarray(grey) if grey else libpng_gray(np.asarray(image.convert("RGB"))))[:, :, None]
    if colour == "native" and image.mode in _GREY_MODES:
        return np.asarray(image.convert("L"))[:, :, None]
    if colour == "native" and (image.mode in _ALPHA_MODES or "transparency" in image.info):
        rgba = np.asarray(image.convert("RGBA"))
        return rgba[:, :, [2, 1, 0, 3]]
    return np.asarray(image.convert("RGB"))[:, :, ::-1]


def decode_encoded(data: bytes, colour: str) -> np.ndarray:
    """An encoded datum's image (JPEG, PNG, ...) as (H, W, C) uint8, see `_opencv_like`."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            if colour == "gray" and image.format == "JPEG":
                image.draft("L", image.size)  # libjpeg's own luma, as OpenCV's grey decode asks for
            image.load()
            return np.ascontiguousarray(_opencv_like(image, colour))
    except (OSError, ValueError, Image.DecompressionBombError) as error:
        raise DataError(f"the encoded image cannot be decoded: {error}") from error


def datum_pixels(datum: caffe_pb2.Datum, colour: str) -> np.ndarray:
    """The datum's values as (H, W, C): decoded when `encoded`, else its bytes (uint8) when it has
    any, else its float_data (float32), both stored C x H x W."""
    if datum.encoded:
        return decode_encoded(datum.data, colour)
    dims = (int(datum.channels), int(datum.height), int(datum.width))
    if min(dims) < 1:
        raise DataError(f"its channels x height x width {dims[0]} x {dims[1]} x {dims[2]} must all be positive")
    values = np.frombuffer(datum.data, dtype=np.uint8) if datum.data else np.asarray(datum.float_data, np.float32)
    count = dims[0] * dims[1] * dims[2]
    if values.size != count:
        field = "data bytes" if datum.data else "float_data values"
        raise DataError(f"it holds {values.size} {field}, its shape {dims[0]} x {dims[1]} x {dims[2]} "
                        f"needs {count}")
    return values.reshape(dims).transpose(1, 2, 0)


@dataclass(frozen=True)
class _Sample:
    where: str
    data: np.ndarray
    label: np.float32


@dataclass(frozen=True)
class _DatumTransform:
    """Decodes and transforms one record (in a worker thread; holds no reference to the layer).

    With a mean image the mean is subtracted first, in float32, over the whole datum, and the
    transform then subtracts 0: the same two float operations per value as Caffe's
    `(value - mean[index]) * scale`, with the mean cropped and mirrored along with the datum."""

    config: TransformConfig
    mean_image: np.ndarray | None  # (H, W, C) float32, from mean_file
    mean_file: str
    colour: str
    who: str
    source: str

    def where(self, record: _Record) -> str:
        key = record.key.decode("utf-8", "backslashreplace")
        return f"{self.who}: entry {record.index} (key '{key}') of the LMDB database '{self.source}'"

    def __call__(self, record: _Record) -> _Sample:
        where = self.where(record)
        try:
            datum = caffe_pb2.Datum.FromString(record.value)
        except DecodeError as error:
            raise DataError(f"{where} is not a Caffe Datum: {error}") from error
        try:
            pixels = self._checked(datum_pixels(datum, self.colour))
            data = transform_image(pixels, self.config, np.random.default_rng(record.seed))
        except DataError as error:
            raise DataError(f"{where}: {error}") from error
        return _Sample(where, data, np.float32(datum.label))

    def _checked(self, pixels: np.ndarray) -> np.ndarray:
        """The pixels, with the mean image subtracted; Caffe's CHECKs of a datum against the transform."""
        height, width, channels = pixels.shape
        crop = self.config.crop
        if crop is not None and (height < crop[0] or width < crop[1]):
            raise DataError(f"its {height}x{width} image is smaller than crop_size {crop[0]} "
                            "(Caffe's Data layer does not pad)")
        if len(self.config.mean) not in (1, channels):
            raise DataError(f"it has {channels} channels: give mean_value once or {channels} times, "
                            f"not {len(self.config.mean)} times")
        if self.mean_image is None:
            return pixels
        if self.mean_image.shape != pixels.shape:
            mean_h, mean_w, mean_c = self.mean_image.shape
            raise DataError(f"its channels x height x width {channels} x {height} x {width} differ from the "
                            f"mean's in '{self.mean_file}', {mean_c} x {mean_h} x {mean_w} (Caffe reads a "
                            "mean blob's axes 1, 2, 3)")
        return pixels.astype(np.float32) - self.mean_image


def _stack(samples: list[_Sample]) -> np.ndarray:
    """The batch's data; every record must give the first one's shape (Caffe shapes a batch by its
    first datum)."""
    first = samples[0].data.shape
    for sample in samples:
        if sample.data.shape != first:
            raise DataError(f"{sample.where}: this record gives shape {sample.data.shape}, the first of its "
                            f"batch {first}; without a crop every image of a batch must have the same size")
    return np.stack([sample.data for sample in samples])


class _OpenDatabases:
    """The process's open LMDB environments. LMDB allows one per database and process, so layers
    reading the same database (a solver's train and test nets, a net built again) share it; it is
    closed when its last layer lets it go. Opened read-only and without LMDB's lock file (data
    databases are not written while read, and their folder may be read-only)."""

    def __init__(self):
        self._lock = threading.RLock()  # a layer's finalizer may run (garbage collection) while it is held
        self._open: dict[str, list] = {}  # real path -> [environment, number of layers using it]

    def acquire(self, source: str, layer: PrefetchingSource) -> tuple[str, Any]:
        """(the key to `release` it with, the environment)."""
        try:
            import lmdb
        except ImportError:
            raise layer.error("the Data layer needs the lmdb package: pip install rloss[lmdb]") from None
        try:
            path = os.path.realpath(source)
        except (OSError, ValueError) as error:
            raise layer.error(f"data_param.source '{source}' is no usable path: {error}") from None
        with self._lock:
            if path not in self._open:
                try:
                    environment = lmdb.open(path, readonly=True, lock=False, readahead=False, create=False)
                except (lmdb.Error, ValueError) as error:
                    raise DataError(f"layer '{layer.name}' (type Data): cannot open the LMDB database '{source}' "
                                    f"(data_param.source, a folder holding data.mdb): {error}") from error
                self._open[path] = [environment, 0]
            entry = self._open[path]
            entry[1] += 1
            return path, entry[0]

    def release(self, path: str) -> None:
        with self._lock:
            entry = self._open[path]
            entry[1] -= 1
            if not entry[1]:
                del self._open[path]
                entry[0].close()


_DATABASES = _OpenDatabases()


@register_layer("Data")
class Data(PrefetchingSource):
    """Caffe's Data layer over an LMDB database (see the module docstring)."""

    tops = (1, 2)

    def setup(self, bottom_shapes: list[Shape]) -> None:
        data_param = self.param.data_param
        self.who = f"layer '{self.name}' (type Data)"
        if data_param.backend != caffe_pb2.DataParameter.LMDB:
            raise self.error("data_param.backend LEVELDB (the default) is not supported: convert the database "
                             "to LMDB (Caffe's convert_imageset -backend lmdb) and set backend: LMDB")
        if data_param.batch_size < 1:
            raise self.error(f"data_param.batch_size must be positive, got {data_param.batch_size}")
        if data_param.prefetch < 1:
            raise self.error(f"data_param.prefetch must be positive, got {data_param.prefetch}")
        if not data_param.source:
            raise self.error("data_param.source must name the LMDB database (its folder)")
        self._warn_ignored_fields(data_param)
        self.batch_size = int(data_param.batch_size)
        self.source = data_param.source
        transform = self._datum_transform()
        database, environment = _DATABASES.acquire(self.source, self)
        try:
            cursor = _KeyOrderCursor(environment, np.random.default_rng(torch_drawn_seed()))
            if not cursor.count:
                raise DataError(f"{self.who}: the LMDB database '{self.source}' is empty")
            record = cursor.current()
            first = transform(record)
            self.sample_shape: Shape = tuple(first.data.shape)
            self.check_top_shapes(self.reshape(bottom_shapes))  # before the loaders allocate batches
        except BaseException:
            _DATABASES.release(database)
            raise
        self._warn_forced_decoding(record, first.where)
        self.start_prefetching(cursor, lambda share: _planner(cursor, self.batch_size, share), transform,
                               int(data_param.prefetch), partial(_DATABASES.release, database))

    def reshape(self, bottom_shapes: list[Shape]) -> list[Shape]:
        shapes = [(self.batch_size, *self.sample_shape)]
        return shapes + [(self.batch_size,)] if self.num_tops == 2 else shapes

    def forward(self) -> list[torch.Tensor]:  # type: ignore[override]
        samples: list[_Sample] = self.prefetcher.next()
        tops = [torch.from_numpy(_stack(samples))]
        if self.num_tops == 2:
            tops.append(torch.from_numpy(np.array([sample.label for sample in samples], dtype=np.float32)))
        return [self.place(top) for top in tops]

    # ---- resume and data-parallel sharing -------------------------------------------------------
    def data_state(self) -> caffe_pb2.DataLayerState:
        """The position after the batches `forward` has returned (the read-ahead is not counted)."""
        position: _Position = self.consumed_state()
        return self.new_data_state(epoch=position.epoch, cursor=position.cursor,
                                   generator=generator_message(position.generator))

    def load_data_state(self, state: caffe_pb2.DataLayerState) -> None:
        """Continue after the batches `state` counts: the read-ahead is dropped and planned again."""
        cursor = self.saved_index(state.cursor, self.walk.count - 1, f"position in the LMDB database '{self.source}'")
        self.continue_from(_Position(cursor, int(state.epoch), self.saved_generator(state.generator)))

    def dataset_words(self) -> str:
        return f"the {self.walk.count} entries of '{self.source}'"

    # ---- parameters -----------------------------------------------------------------------------
    def _datum_transform(self) -> _DatumTransform:
        transform = self.param.transform_param
        if transform.crop_height or transform.crop_width:
            raise self.error("transform_param.crop_height/crop_width are not read by Caffe's Data layer, which "
                             "crops squares: give crop_size")
        if transform.HasField("mean_file") and len(transform.mean_value):
            raise self.error("give transform_param.mean_file or mean_value, not both (Caffe refuses both)")
        if transform.force_color and transform.force_gray:
            raise self.error("give transform_param.force_color or force_gray, not both")
        if transform.scale_factors:
            log.warning("%s: transform_param.scale_factors is ignored (as in Caffe); only ImageSegData rescales",
                        self.who)
        crop = int(transform.crop_size)
        config = TransformConfig(
            crop=(crop, crop) if crop else None,
            mean=np.asarray(list(transform.mean_value) or [0.0], dtype=np.float32),
            scale=float(np.float32(transform.scale)),
            mirror=bool(transform.mirror),
            random_crop=self.phase == caffe_pb2.TRAIN,
        )
        colour = "color" if transform.force_color else "gray" if transform.force_gray else "native"
        mean_image = self._mean_image(transform.mean_file) if transform.HasField("mean_file") else None
        return _DatumTransform(config, mean_image, transform.mean_file, colour, self.who, self.param.data_param.source)

    def _mean_image(self, path: str) -> np.ndarray:
        """The mean file's first image as (H, W, C) float32 (rloss.data.transform.read_mean_image)."""
        try:
            return read_mean_image(path)
        except DataError as error:
            raise self.error(f"transform_param.mean_file: {error}") from None

    def _warn_ignored_fields(self, data_param) -> None:
        for field in _IGNORED_DATA_FIELDS:
            if data_param.HasField(field):
                log.warning("%s: data_param.%s is ignored (as in Caffe)%s", self.who, field,
                            "; set it in transform_param" if field in ("scale", "mean_file", "crop_size", "mirror")
                            else "")

    def _warn_forced_decoding(self, record: _Record, where: str) -> None:
        transform = self.param.transform_param
        if (transform.force_color or transform.force_gray) and not caffe_pb2.Datum.FromString(record.value).encoded:
            log.warning("%s: transform_param.force_color/force_gray apply to encoded datums only (as in Caffe), "
                        "and the first one is not encoded", where)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, source={self.source!r}, batch_size={self.batch_size}"
