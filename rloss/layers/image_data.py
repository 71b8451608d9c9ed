"""Data layers that read the images named in a list file: ImageSegData (the DeepLab fork's image +
label-map layer) and ImageData (upstream Caffe's image + class layer).

Both read `image_data_param.source`, walk it in Caffe's order (optional shuffle, reshuffled at each
wrap-around; optional random skip at the start), transform each sample as Caffe's transformer does
(`rloss.data.transform`) and load batches ahead of the net in background threads
(`rloss.data.prefetch`, 5 batches, as Caffe prefetches). Random numbers come from a generator seeded
from torch's global RNG when the layer is built, so a solver's `random_seed` makes runs repeatable;
Caffe's own random stream is not reproduced. `data_wait_seconds` is the total time `forward` has
waited for data. `data_state()` saves the position (order, cursor, generator) after the batches
`forward` has returned, not the prefetcher's read-ahead position; `load_data_state()` restores it and
restarts the prefetcher from there, so a resumed run reads exactly the batches of an uninterrupted one.

Labels are read as raw 8-bit values; palette PNGs give their indices, where Caffe would read their
luma values (see `rloss.data.imageio`).

`new_height`/`new_width` resize each image when it is read, before the transform crops it, with
`rloss.data.resize.resize_linear`: OpenCV's INTER_LINEAR (`cv::resize`'s default, which Caffe uses)
reproduced in numpy: bilinear with half-pixel centres (source position `(d + 0.5) * src / dst - 0.5`)
and two taps whatever the ratio, not PIL's BILINEAR, which widens its filter when shrinking.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch

from rloss.data.imageio import read_bgr, read_gray, read_label
from rloss.data.listfile import ListEntry, OrderState, SampleOrder, read_class_list, read_list
from rloss.data.resize import resize_linear, resize_nearest
from rloss.data.transform import TransformConfig, read_mean_image, transform_image, transform_segmentation
from rloss.errors import DataError
from rloss.layers.base import Shape
from rloss.layers.data import DataShare, generator_message, torch_drawn_seed
from rloss.layers.prefetching import PrefetchingSource
from rloss.layers.registry import register_layer
from rloss.proto import caffe_pb2

log = logging.getLogger("rloss")

PREFETCH_BATCHES = 5
_LabelType = caffe_pb2.ImageDataParameter
_IGNORED_DATA_FIELDS = ("scale", "mean_file", "crop_size", "mirror")


@dataclass
class Sample:
    """One transformed sample: where it came from (for error messages) and its arrays, one per top."""

    where: str
    arrays: tuple[np.ndarray, ...]


@dataclass
class _Reader:
    """Reads and transforms one list entry (runs in a worker thread; holds no reference to the
    layer, so a layer that is no longer used can be collected and its workers stopped)."""

    entries: list[ListEntry]
    root: str
    source: str
    who: str
    config: TransformConfig
    new_size: tuple[int, int] | None

    def where(self, entry: ListEntry) -> str:
        return f"{self.who}: {entry.where(self.source)}"

    def resized(self, image: np.ndarray, resize: Callable) -> np.ndarray:
        """Caffe's read-time resize to (new_height, new_width), when asked for."""
        if self.new_size is None:
            return image
        return resize(image, *self.new_size)


@dataclass
class _SegReader(_Reader):
    label_type: int = _LabelType.PIXEL

    def read(self, entry: ListEntry) -> tuple[np.ndarray, np.ndarray]:
        """The BGR image and its uint8 label map, same size."""
        where = self.where(entry)
        image_path = self.root + entry.image
        image = self.resized(read_bgr(image_path, where), resize_linear)
        if self.label_type != _LabelType.PIXEL:
            value = self.config.ignore_label if self.label_type == _LabelType.NONE else int(entry.label)
            return image, np.full(image.shape[:2], value, dtype=np.uint8)
        label_path = self.root + entry.label
        label = self.resized(read_label(label_path, where), resize_nearest)
        if label.shape != image.shape[:2]:
            raise DataError(f"{where}: the image '{image_path}' is {image.shape[0]}x{image.shape[1]} "
                            f"but the label '{label_path}' is {label.shape[0]}x{label.shape[1]}")
        return image, label

    def __call__(self, item: tuple[int, int]) -> Sample:
        entry = self.entries[item[0]]
        image, label = self.read(entry)
        try:
            data, labels, data_dim = transform_segmentation(image, label, self.config,
                                                            np.random.default_rng(item[1]))
        except DataError as error:
            raise DataError(f"{self.where(entry)}: {error}") from error
        return Sample(self.where(entry), (data, labels[None], data_dim.reshape(1, 1, 2)))


@dataclass
class _ClassReader(_Reader):
    color: bool = True

    def read(self, entry: ListEntry) -> np.ndarray:
        """The image, (H, W, C) uint8 with C = 3 (BGR) or 1 (grey)."""
        decode = read_bgr if self.color else read_gray
        image = self.resized(decode(self.root + entry.image, self.where(entry)), resize_linear)
        return image if self.color else image[:, :, None]

    def sample(self, entry: ListEntry, rng: np.random.Generator) -> Sample:
        """The transformed image and its class (an int32, stored as float32 as Caffe's label blob)."""
        image = self.read(entry)
        try:
            data = transform_image(image, self.config, rng)
        except DataError as error:
            raise DataError(f"{self.where(entry)}: '{self.root + entry.image}': {error}") from error
        return Sample(self.where(entry), (data, np.array(int(entry.label), dtype=np.float32)))

    def __call__(self, item: tuple[int, int]) -> Sample:
        return self.sample(self.entries[item[0]], np.random.default_rng(item[1]))


def _planner(order: SampleOrder, rng: np.random.Generator, batch_size: int,
             share: DataShare) -> Callable[[], list]:
    """The next batch's (entry index, per-sample seed) pairs, drawn in the consumer thread: the
    batches of all `share.ranks` ranks are drawn, so every rank's order and generator stay those of
    one process, and this rank's is kept."""

    def plan() -> list[tuple[int, int]]:
        batches = [[(index, int(rng.integers(2**63))) for index in order.take(batch_size)]
                   for _ in range(share.ranks)]
        return batches[share.rank]

    return plan


class _ImageListLayer(PrefetchingSource):
    """What ImageSegData and ImageData share: parameters, list, sample order, prefetching, batching."""

    channels = 3
    has_data_state = True

    @classmethod
    def sample_shapes(cls, param: caffe_pb2.LayerParameter, height: int, width: int) -> list[Shape]:
        """The per-sample shape of each top for images of height x width (the crop, when there is one):
        what a net fed instead of this layer takes (rloss.wiring.data_layers_to_inputs)."""
        raise NotImplementedError

    def setup(self, bottom_shapes: list[Shape]) -> None:
        data_param = self.param.image_data_param
        self.who = f"layer '{self.name}' (type {self.type_name})"
        self._warn_ignored_fields(data_param)
        if data_param.batch_size < 1:
            raise self.error(f"image_data_param.batch_size must be positive, got {data_param.batch_size}")
        self.batch_size = int(data_param.batch_size)
        self.source = data_param.source
        entries = self.read_entries()
        rng = np.random.default_rng(torch_drawn_seed())
        order = SampleOrder(len(entries), bool(data_param.shuffle), rng,
                            self._skip(data_param.rand_skip, len(entries), rng))
        self.reader = self.make_reader(entries, self._transform_config(), self._new_size(data_param))
        self.sample_shapes = self.first_sample_shapes(entries[order.peek()])
        self.check_top_shapes(self.reshape(bottom_shapes))  # before the loaders allocate batches
        self.start_prefetching(order, lambda share: _planner(order, rng, self.batch_size, share), self.reader,
                               PREFETCH_BATCHES)

    # ---- for subclasses ---------------------------------------------------------------------------
    def read_entries(self) -> list[ListEntry]:
        """The list's entries, label tokens that cannot be used refused naming the line."""
        raise NotImplementedError

    def mean_image(self, transform) -> np.ndarray | None:
        """The mean image of `transform_param.mean_file`: refused unless the layer overrides this."""
        if transform.HasField("mean_file"):
            raise self.error(f"transform_param.mean_file ('{transform.mean_file}') is not supported by "
                             "this layer; give mean_value (once, or once per channel)")
        return None

    def make_reader(self, entries: list[ListEntry], config: TransformConfig,
                    new_size: tuple[int, int] | None) -> _Reader:
        raise NotImplementedError

    def first_sample_shapes(self, first: ListEntry) -> list[Shape]:
        """The per-sample shape of each top (the first image's size when there is no crop)."""
        raise NotImplementedError

    # ---- shared -----------------------------------------------------------------------------------
    def reshape(self, bottom_shapes: list[Shape]) -> list[Shape]:
        return [(self.batch_size, *shape) for shape in self.sample_shapes]

    def forward(self) -> list[torch.Tensor]:  # type: ignore[override]
        samples: list[Sample] = self.prefetcher.next()
        tops = [self._stack([sample.arrays[i] for sample in samples], samples) for i in range(self.num_tops)]
        return [self.place(top) for top in tops]

    def data_state(self) -> caffe_pb2.DataLayerState:
        """The position after the batches `forward` has returned (the read-ahead is not counted)."""
        position: OrderState = self.consumed_state()
        return self.new_data_state(epoch=position.epoch, cursor=position.cursor, order=position.order.tolist(),
                                   generator=generator_message(position.generator))

    def load_data_state(self, state: caffe_pb2.DataLayerState) -> None:
        """Continue after the batches `state` counts: the batches read ahead are dropped and the
        prefetcher plans again from the restored order and generator."""
        order = self.saved_order(state.order, self.walk.count, f"sample order of the list '{self.source}'")
        cursor = self.saved_index(state.cursor, self.walk.count - 1, "list position")
        self.continue_from(OrderState(order, cursor, int(state.epoch), self.saved_generator(state.generator)))

    def dataset_words(self) -> str:
        return f"the list '{self.source}'"

    def _stack(self, arrays: list[np.ndarray], samples: Sequence[Sample]) -> torch.Tensor:
        for array, sample in zip(arrays, samples):
            if array.shape != arrays[0].shape:
                raise DataError(f"{sample.where}: this sample has shape {array.shape} but the first of "
                                f"its batch has {arrays[0].shape}; without a crop every image of a batch "
                                "must have the same size")
        return torch.from_numpy(np.stack(arrays))

    def _warn_ignored_fields(self, data_param) -> None:
        for field in _IGNORED_DATA_FIELDS:
            if data_param.HasField(field):
                log.warning("%s: image_data_param.%s is ignored (as in Caffe); set it in transform_param",
                            self.who, field)

    def _skip(self, rand_skip: int, count: int, rng: np.random.Generator) -> int:
        if not rand_skip:
            return 0
        if rand_skip > count:
            raise self.error(f"rand_skip {rand_skip} is larger than the list '{self.source}' "
                             f"({count} lines); Caffe fails when it draws a skip past the end")
        return int(rng.integers(rand_skip))

    def _new_size(self, data_param) -> tuple[int, int] | None:
        height, width = int(data_param.new_height), int(data_param.new_width)
        if (height > 0) != (width > 0):
            raise self.error(f"give both new_height and new_width or neither, got {height} and {width}")
        if height:  # before an image is resized to it
            self.check_shape((self.batch_size, self.channels, height, width), "new_height x new_width")
        return (height, width) if height else None

    def _crop(self, transform) -> tuple[int, int] | None:
        size, height, width = int(transform.crop_size), int(transform.crop_height), int(transform.crop_width)
        if size and (height or width):
            raise self.error(f"give crop_size ({size}) or crop_height/crop_width ({height}/{width}), not both")
        if (height > 0) != (width > 0):
            raise self.error(f"give both crop_height and crop_width, got {height} and {width}")
        if size:
            return size, size
        return (height, width) if height else None

    def _transform_config(self) -> TransformConfig:
        transform = self.param.transform_param
        mean_image = self.mean_image(transform)
        means = np.asarray(transform.mean_value, dtype=np.float32)
        if len(means) not in (0, 1, self.channels):
            raise self.error(f"give mean_value once or {self.channels} times (once per channel), "
                             f"not {len(means)} times")
        factors = tuple(float(np.float32(f)) for f in transform.scale_factors)
        if any(f <= 0 for f in factors):
            raise self.error(f"scale_factors must be positive, got {list(factors)}")
        return TransformConfig(
            crop=self._crop(transform),
            mean=np.broadcast_to(means if len(means) else np.float32(0), (self.channels,)).copy(),
            scale=float(np.float32(transform.scale)),
            mirror=bool(transform.mirror),
            random_crop=self.phase == caffe_pb2.TRAIN,
            scale_factors=factors,
            ignore_label=int(self.param.image_data_param.ignore_label),
            mean_image=mean_image,
        )

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, source={self.source!r}, batch_size={self.batch_size}"


@register_layer("ImageSegData")
class ImageSegData(_ImageListLayer):
    """Images and label maps (the DeepLab fork). Tops: data (N, 3, h, w) = (BGR - mean) * scale;
    label (N, 1, h, w) with padding = ignore_label; data_dim (N, 1, 1, 2) = the image size before
    scaling, clipped to the crop. The three tops always exist (`auto_tops`), however many the
    prototxt names."""

    tops = (1, 3)
    auto_tops = 3

    def setup(self, bottom_shapes: list[Shape]) -> None:
        ignore_label = self.param.image_data_param.ignore_label
        if not 0 <= ignore_label <= 255:
            raise self.error(f"ignore_label must be in 0..255 (labels are 8-bit), got {ignore_label}")
        if not self.param.image_data_param.is_color:
            log.warning("layer '%s' (type ImageSegData): is_color: false is ignored; images are read "
                        "in colour", self.name)
        super().setup(bottom_shapes)

    def read_entries(self) -> list[ListEntry]:
        label_type = self.param.image_data_param.label_type
        entries = read_list(self.source, label_type != _LabelType.NONE, self.who)
        for entry in entries if label_type == _LabelType.IMAGE else ():
            if not _is_int_in(entry.label, 0, 255):
                raise DataError(f"{self.who}: {entry.where(self.source)}: label_type IMAGE needs an integer "
                                f"label in 0..255 as the second token, got '{entry.label}'")
        return entries

    def make_reader(self, entries, config, new_size) -> _Reader:
        label_type = self.param.image_data_param.label_type
        return _SegReader(entries, self.param.image_data_param.root_folder, self.source, self.who,
                          config, new_size, label_type)

    def first_sample_shapes(self, first: ListEntry) -> list[Shape]:
        crop = self.reader.config.crop
        height, width = crop if crop else self.reader.read(first)[0].shape[:2]
        return self.sample_shapes(self.param, height, width)

    @classmethod
    def sample_shapes(cls, param: caffe_pb2.LayerParameter, height: int, width: int) -> list[Shape]:
        return [(3, height, width), (1, height, width), (1, 1, 2)]


@register_layer("ImageData")
class ImageData(_ImageListLayer):
    """Images and one integer class each (upstream Caffe). Tops: data (N, C, h, w) with C = 3 (BGR)
    or 1 (`is_color: false`, grey), = (pixel - mean) * scale, the mean from `mean_value` or
    `mean_file`; label (N,). Each list line is split at its last space. Images must be at least as
    large as the crop (no padding); `scale_factors` are not used by this layer. As in Caffe, the
    first image is read at set-up (an unreadable one fails there) and each batch takes the shape of
    its first image."""

    tops = (2, 2)

    def setup(self, bottom_shapes: list[Shape]) -> None:
        self.channels = 3 if self.param.image_data_param.is_color else 1
        transform = self.param.transform_param
        if transform.scale_factors:
            log.warning("layer '%s' (type ImageData): transform_param.scale_factors is ignored (as in "
                        "Caffe); only ImageSegData rescales", self.name)
        if transform.force_color or transform.force_gray:
            log.warning("layer '%s' (type ImageData): transform_param.force_color/force_gray are ignored "
                        "(as in Caffe, they apply to encoded Datums); image_data_param.is_color chooses "
                        "colour or grey", self.name)
        super().setup(bottom_shapes)

    def read_entries(self) -> list[ListEntry]:
        entries = read_class_list(self.source, self.who)
        for entry in entries:
            if not _is_int_in(entry.label, -(2**31), 2**31 - 1):
                raise DataError(f"{self.who}: {entry.where(self.source)}: the text after the last space "
                                f"must be an integer class (int32), got '{entry.label}'")
        return entries

    def mean_image(self, transform) -> np.ndarray | None:
        """Caffe's mean image: the image (after any resize) must have its channels and size."""
        if not transform.HasField("mean_file"):
            return None
        if len(transform.mean_value):
            raise self.error("give transform_param.mean_file or mean_value, not both (Caffe refuses both)")
        try:
            return read_mean_image(transform.mean_file)
        except DataError as error:
            raise self.error(f"transform_param.mean_file: {error}") from None

    def make_reader(self, entries, config, new_size) -> _Reader:
        return _ClassReader(entries, self.param.image_data_param.root_folder, self.source, self.who,
                            config, new_size, bool(self.param.image_data_param.is_color))

    def first_sample_shapes(self, first: ListEntry) -> list[Shape]:
        """The first sample made whatever the crop, as Caffe's set-up reads the first image (its
        random draws come from a generator of its own, not the layer's)."""
        data = self.reader.sample(first, np.random.default_rng(0)).arrays[0]
        return self.sample_shapes(self.param, *data.shape[1:])

    @classmethod
    def sample_shapes(cls, param: caffe_pb2.LayerParameter, height: int, width: int) -> list[Shape]:
        return [(3 if param.image_data_param.is_color else 1, height, width), ()]


_DECIMAL = re.compile(r"\s*[+-]?[0-9]+\s*")


def _is_int_in(token: str | None, low: int, high: int) -> bool:
    """A C-style decimal integer (sign, ASCII digits, surrounding whitespace such as a CRLF's
    carriage return) within [low, high]; Python's extras (`1_000`, other scripts' digits) refused."""
    return token is not None and _DECIMAL.fullmatch(token) is not None and low <= int(token) <= high
