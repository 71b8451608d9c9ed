"""The layers of SegNet's Caffe fork (alexgkendall/caffe-segnet): BN, Upsample and DenseImageData.

BN is the fork's batch normalization with its own scale and shift (not BVLC's BatchNorm + Scale);
Upsample is max-unpooling by the argmax mask of a Pooling layer's second top; DenseImageData reads
`image label_image` lists into data and dense label tops, through ImageSegData's machinery.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Sequence

import numpy as np
import torch

from rloss.data.imageio import read_bgr, read_gray, read_label
from rloss.data.listfile import ListEntry, read_list
from rloss.data.resize import resize_linear, resize_nearest
from rloss.data.transform import TransformConfig, transform_image
from rloss.errors import DataError
from rloss.layers.base import Layer, Shape
from rloss.layers.image_data import Sample, _ImageListLayer, _Reader
from rloss.layers.registry import register_layer
from rloss.proto import caffe_pb2

_BN_MODE = caffe_pb2.BNParameter
BN_EPS = 1e-9  # the fork's var_eps_, fixed (compute_bn_statistics.py folds with the same)


# ---- BN -----------------------------------------------------------------------------------------
@register_layer("BN")
class BN(Layer):
    """SegNet's batch normalization of an (N, C, H, W) bottom, with blobs scale and shift (1, C, 1, 1).

    bn_mode LEARN, in every phase: y = (x - mean) / sqrt(var + 1e-9) * scale + shift, mean and var
    over N, H, W of this batch, var = E[x^2] - E[x]^2 (biased, the fork's formula); optional tops
    1 and 2 are that mean and var (1, C, 1, 1), which compute_bn_statistics.py averages. bn_mode
    INFERENCE: y = x * scale + shift, the script having folded the statistics into scale and shift;
    the fork then allows one top only. The gradient is autograd's, equal to the fork's analytic one
    (the mean and var tops carry none, as the fork reads no diff of them)."""

    tops = (1, 3)

    def setup(self, bottom_shapes: list[Shape]) -> None:
        self.check_axes(bottom_shapes, 0, 4)
        bn_param = self.param.bn_param
        self.learn = bn_param.bn_mode == _BN_MODE.LEARN
        if not self.learn and self.num_tops > 1:
            raise self.error(f"bn_mode INFERENCE has one top (SegNet's fork), the prototxt gives {self.num_tops}")
        self.channels = bottom_shapes[0][1]
        self.add_blob((1, self.channels, 1, 1), bn_param.scale_filler)
        self.add_blob((1, self.channels, 1, 1), bn_param.shift_filler)

    def reshape(self, bottom_shapes: list[Shape]) -> list[Shape]:
        self.check_axes(bottom_shapes, 0, 4)
        if bottom_shapes[0][1] != self.channels:
            raise self.error(f"the bottom {bottom_shapes[0]} has {bottom_shapes[0][1]} channels, the layer "
                             f"was set up with {self.channels}")
        if self.learn:
            self.check_not_empty(bottom_shapes[0])
        return [bottom_shapes[0]] + [(1, self.channels, 1, 1)] * (self.num_tops - 1)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:  # type: ignore[override]
        scale, shift = self.blobs
        if not self.learn:
            return [x * scale + shift]
        axes = (0, 2, 3)
        mean = x.mean(dim=axes, keepdim=True)
        var = x.square().mean(dim=axes, keepdim=True) - mean.square()
        y = (x - mean) / (var + BN_EPS).sqrt() * scale + shift
        return [y, mean.detach(), var.detach()][: self.num_tops]


# ---- Upsample -----------------------------------------------------------------------------------
class _MaxUnpool(torch.autograd.Function):
    """Each input value written at its mask index in a zero plane; where indices repeat, the last
    input in row-major order wins (the fork's loop writes in that order). The fork's backward gives
    every input the output diff at its index, the overwritten ones included: not autograd's."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, index: torch.Tensor, plane: int) -> torch.Tensor:
        n, c = x.shape[:2]
        flat = x.reshape(n, c, -1)
        source = torch.arange(flat.shape[2], device=x.device).expand_as(index)
        winner = torch.full((n, c, plane), -1, dtype=torch.int64, device=x.device)
        winner = winner.scatter_reduce(2, index, source, reduce="amax")
        placed = flat.gather(2, winner.clamp(min=0))
        ctx.save_for_backward(index)
        ctx.input_shape = x.shape
        return torch.where(winner >= 0, placed, torch.zeros_like(placed))

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        (index,) = ctx.saved_tensors
        return dy.gather(2, index).reshape(ctx.input_shape), None, None


@register_layer("Upsample")
class Upsample(Layer):
    """Max-unpooling: bottoms the data (N, C, h, w) and a Pooling layer's argmax mask of the same
    shape (index h' * W + w' in each output plane, as a float); top (N, C, H, W) zero but at the
    masked positions. H x W is upsample_h x upsample_w when both are given, else h * scale_h -
    pad_out_h by w * scale_w - pad_out_w (scale_h = scale_w = scale unless scale_h/scale_w are given).
    A mask index outside the output plane is an error (the fork aborts). The mask gets no gradient."""

    bottoms = (2, 2)

    def setup(self, bottom_shapes: list[Shape]) -> None:
        param = self.param.upsample_param
        by_size = param.HasField("upsample_h") and param.HasField("upsample_w")
        by_scales = not param.HasField("scale") and param.HasField("scale_h") and param.HasField("scale_w")
        if not (by_size or by_scales or not (param.HasField("scale_h") or param.HasField("scale_w"))):
            raise self.error("give upsample_h and upsample_w, or scale, or scale_h and scale_w (not with scale)")
        self.size: tuple[int, int] | None = None
        if by_size:
            self.size = (self._above_one("upsample_h", param.upsample_h),
                         self._above_one("upsample_w", param.upsample_w))
            return
        if param.HasField("scale_h"):
            self.scales = (self._above_one("scale_h", param.scale_h), self._above_one("scale_w", param.scale_w))
        else:
            self.scales = (self._above_one("scale", param.scale),) * 2
        self.pads = (int(param.pad_out_h), int(param.pad_out_w))
        for axis, pad, scale in zip("hw", self.pads, self.scales):
            if pad and scale != 2:
                raise self.error(f"pad_out_{axis} needs a scale of 2 along {axis}, got {scale}")

    def _above_one(self, name: str, value: int) -> int:
        if value <= 1:
            raise self.error(f"{name} must be > 1, got {value}")
        return int(value)

    def reshape(self, bottom_shapes: list[Shape]) -> list[Shape]:
        self.check_axes(bottom_shapes, 0, 4)
        self.check_axes(bottom_shapes, 1, 4)
        self.check_same_shape(bottom_shapes)
        n, c, h, w = bottom_shapes[0]
        if self.size is not None:
            return [(n, c, *self.size)]
        return [(n, c, h * self.scales[0] - self.pads[0], w * self.scales[1] - self.pads[1])]

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> list[torch.Tensor]:  # type: ignore[override]
        n, c, height, width = self.reshape([tuple(x.shape), tuple(mask.shape)])[0]
        plane = height * width
        index = mask.detach().to(torch.int64).reshape(n, c, -1)  # (int) truncates, as the fork's cast
        outside = (index < 0) | (index >= plane)
        if bool(outside.any()):
            bad = int(index[outside][0])
            raise self.error(f"mask index {bad} is outside the {height} x {width} output plane: the "
                             "pooling that made the mask had an input of another size")
        return [_MaxUnpool.apply(x, index, plane).reshape(n, c, height, width)]


# ---- DenseImageData -----------------------------------------------------------------------------
@dataclass
class _DenseReader(_Reader):
    """Reads one `image label_image` line as the fork does: the image (colour or grey) and its label
    map, resized at read time when asked, mirrored (one coin) and cropped (random window, in every
    phase) together, then the image normalized as Caffe's transformer does, the label kept as is."""

    color: bool = True
    crop: tuple[int, int] | None = None
    mirror: bool = False

    def read(self, entry: ListEntry) -> tuple[np.ndarray, np.ndarray]:
        where = self.where(entry)
        image_path, label_path = self.root + entry.image, self.root + entry.label
        image = read_bgr(image_path, where) if self.color else read_gray(image_path, where)[:, :, None]
        image = self.resized(image, resize_linear)
        label = self.resized(read_label(label_path, where), resize_nearest)
        if label.shape != image.shape[:2]:
            raise DataError(f"{where}: the image '{image_path}' is {image.shape[0]}x{image.shape[1]} but the "
                            f"label '{label_path}' is {label.shape[0]}x{label.shape[1]}; they must match")
        if self.crop and (image.shape[0] < self.crop[0] or image.shape[1] < self.crop[1]):
            raise DataError(f"{where}: the image '{image_path}' is {image.shape[0]}x{image.shape[1]}, smaller "
                            f"than the crop {self.crop[0]}x{self.crop[1]} (the fork does not pad)")
        return image, label

    def __call__(self, item: tuple[int, int]) -> Sample:
        entry = self.entries[item[0]]
        image, label = self.read(entry)
        rng = np.random.default_rng(item[1])
        if self.mirror and rng.integers(2):
            image, label = image[:, ::-1], label[:, ::-1]
        if self.crop:
            row = int(rng.integers(image.shape[0] - self.crop[0] + 1))
            column = int(rng.integers(image.shape[1] - self.crop[1] + 1))
            window = (slice(row, row + self.crop[0]), slice(column, column + self.crop[1]))
            image, label = image[window], label[window]
        data = transform_image(np.ascontiguousarray(image), self.config, rng)
        return Sample(self.where(entry), (data, np.ascontiguousarray(label, dtype=np.float32)[None]))


def _as_image_list_param(param: caffe_pb2.LayerParameter) -> caffe_pb2.LayerParameter:
    """A copy whose image_data_param holds the dense_image_data_param fields of the same meaning, so
    that the list, order, skip, resize and prefetching of ImageSegData's base class serve."""
    copy = caffe_pb2.LayerParameter()
    copy.CopyFrom(param)
    dense, listed = param.dense_image_data_param, copy.image_data_param
    listed.Clear()
    listed.source, listed.batch_size, listed.rand_skip = dense.source, dense.batch_size, dense.rand_skip
    listed.shuffle, listed.is_color, listed.root_folder = dense.shuffle, dense.is_color, dense.root_folder
    listed.new_height, listed.new_width = dense.new_height, dense.new_width
    return copy


@register_layer("DenseImageData")
class DenseImageData(_ImageListLayer):
    """Images and dense label maps (SegNet's fork). Tops: data (N, C, h, w) = (pixel - mean) * scale
    (C = 3 BGR, or 1 with is_color false; mean and scale from transform_param) and label (N, 1, h, w),
    the label image's raw values. dense_image_data_param gives the list and its walk (shuffle,
    rand_skip), new_height/new_width, crop_height/crop_width and mirror; transform_param's crop and
    mirror are refused, as the fork refuses them (they would transform image and label apart)."""

    tops = (2, 2)

    def __init__(self, param, bottom_shapes: Sequence[Shape], phase: int = caffe_pb2.TRAIN):
        super().__init__(_as_image_list_param(param), bottom_shapes, phase)
        self.param = param  # the prototxt's own, as written (the copy served the set-up only)

    def setup(self, bottom_shapes: list[Shape]) -> None:
        dense, transform = self.param.dense_image_data_param, self.param.transform_param
        self.channels = 3 if dense.is_color else 1
        if transform.crop_size or transform.crop_height or transform.crop_width or transform.mirror:
            raise self.error("transform_param crop and mirror are refused by SegNet's fork; give "
                             "dense_image_data_param crop_height/crop_width and mirror instead")
        if transform.scale_factors:
            raise self.error("transform_param.scale_factors is not supported by this layer (SegNet's fork "
                             "has no rescaling)")
        if (dense.crop_height > 0) != (dense.crop_width > 0):
            raise self.error(f"give both crop_height and crop_width or neither, got {dense.crop_height} and "
                             f"{dense.crop_width}")
        if dense.batch_size < 1:
            raise self.error(f"dense_image_data_param.batch_size must be positive, got {dense.batch_size}")
        super().setup(bottom_shapes)

    def read_entries(self) -> list[ListEntry]:
        return read_list(self.source, True, self.who)

    def make_reader(self, entries, config: TransformConfig, new_size) -> _Reader:
        dense = self.param.dense_image_data_param
        crop = (int(dense.crop_height), int(dense.crop_width)) if dense.crop_height else None
        return _DenseReader(entries, dense.root_folder, self.source, self.who, replace(config, crop=None),
                            new_size, bool(dense.is_color), crop, bool(dense.mirror))

    def first_sample_shapes(self, first: ListEntry) -> list[Shape]:
        crop = self.reader.crop
        height, width = crop if crop else self.reader.read(first)[0].shape[:2]
        return self.sample_shapes(self.param, height, width)

    @classmethod
    def sample_shapes(cls, param: caffe_pb2.LayerParameter, height: int, width: int) -> list[Shape]:
        return [(3 if param.dense_image_data_param.is_color else 1, height, width), (1, height, width)]
