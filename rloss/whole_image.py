"""A test net run on whole images of any size, for `test` (the default scoring) and `infer`.

Caffe's TEST transform pads an image smaller than the crop (bottom/right, with the mean) and keeps
only the centre crop of a larger one, so `caffe test` never sees the rest of a large image. Here the
net still runs at its crop size, the size it was built and tested for (a net need not be fully
convolutional), and:

* an image no larger than the crop is padded as Caffe pads it (data 0 after mean subtraction, labels
  `ignore_label`): one forward, the same scores as Caffe's;
* a larger image is covered by crop-sized tiles, evenly spaced, neighbours overlapping by about a
  third of the crop (`TILE_OVERLAP`); a tile that reaches past the image in the other dimension is
  padded the same way; where tiles overlap their scores are averaged;
* a data layer without a crop runs the net once on the image padded the same way to the next size of
  the form 8k + 1 (`PAD_STEP`), which DeepLab-style nets map to scores of the same size.

The scores (the blob named by the caller) are cut back to the image's size. A score blob smaller than
its input (an un-upsampled score map) is first upsampled bilinearly, corners aligned, as the nets'
Interp layers do. Each labelled pixel is given to exactly one tile (the overlaps are split in their
middle), so the net's own loss and accuracy layers count every pixel once; `data_dim` is the tile's
size inside the image.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from itertools import product

import torch
import torch.nn.functional as F

from rloss.errors import NetError
from rloss.layers import Layer, layer_class
from rloss.net import Net
from rloss.precision import to_float32
from rloss.proto import caffe_pb2
from rloss.scoring import Outputs, Scores, output_values
from rloss.wiring import data_layers_to_inputs

log = logging.getLogger("rloss")

READER_TYPE = "ImageSegData"
TILE_OVERLAP = 1 / 3
# A net whose data layer has no crop is built at this input size, and runs on each image padded to
# the next PAD_STEP * k + 1: what DeepLab-style nets (output stride 8, or 4 for the small net, scores
# interpolated back by that factor) map to scores of the same size.
UNCROPPED_BUILD_SIZE = 65
PAD_STEP = 8


@dataclass(frozen=True)
class Span:
    """One tile along one axis: it covers [start, start + crop) and owns the labels of [own_start, own_end)."""

    start: int
    own_start: int
    own_end: int


def tile_spans(size: int, crop: int) -> list[Span]:
    """Crop-long tiles covering [0, size): one at 0 when it fits, else evenly spaced from 0 to
    size - crop with overlaps of at least about TILE_OVERLAP * crop, each overlap split in its middle."""
    if size <= crop:
        return [Span(0, 0, size)]
    stride = crop - math.ceil(crop * TILE_OVERLAP)
    count = math.ceil((size - crop) / max(1, stride)) + 1
    starts = [i * (size - crop) // (count - 1) for i in range(count)]
    bounds = [0] + [(starts[i + 1] + starts[i] + crop) // 2 for i in range(count - 1)] + [size]
    return [Span(start, bounds[i], bounds[i + 1]) for i, start in enumerate(starts)]


@dataclass
class WholeImage:
    """One image's result: `scores` (C, H, W) float32 at the image's size, the number of forward
    passes it took and the net's loss and outputs averaged over them (Caffe's float32 means)."""

    scores: torch.Tensor
    tiles: int
    loss: float
    outputs: Outputs


def image_reader_param(net_param: caffe_pb2.NetParameter, where: str) -> caffe_pb2.LayerParameter:
    """The net's one ImageSegData layer (whole-image scoring feeds its tops)."""
    readers = [layer for layer in net_param.layer if layer.type == READER_TYPE]
    if len(readers) != 1:
        raise NetError(f"{where}: running a net on whole images needs a net whose TEST phase reads its images "
                       f"with one {READER_TYPE} layer; this one has {len(readers)}")
    return readers[0]


def crop_of(reader: caffe_pb2.LayerParameter) -> tuple[int, int] | None:
    """(height, width) of the data layer's crop, or None."""
    transform = reader.transform_param
    height = transform.crop_height or transform.crop_size
    width = transform.crop_width or transform.crop_size
    return (int(height), int(width)) if height and width else None


def fed_test_param(net_param: caffe_pb2.NetParameter, where: str) -> caffe_pb2.NetParameter:
    """The TEST net with its ImageSegData layer turned into inputs of batch 1 at its crop size (at
    UNCROPPED_BUILD_SIZE without a crop; inputs take any size when fed)."""
    build = caffe_pb2.NetParameter()
    build.CopyFrom(net_param)
    reader = image_reader_param(build, where)
    if crop_of(reader) is None:
        reader.transform_param.crop_size = UNCROPPED_BUILD_SIZE
        reader.transform_param.ClearField("crop_height")
        reader.transform_param.ClearField("crop_width")
    return data_layers_to_inputs(build, batch_size=1)


def uncropped_size(size: int) -> int:
    """The padded size a net without a crop runs at: the next PAD_STEP * k + 1."""
    return math.ceil((size - 1) / PAD_STEP) * PAD_STEP + 1


def whole_image_reader(reader: caffe_pb2.LayerParameter) -> Layer:
    """The data layer without its crop, one image per batch: it gives each image whole, transformed
    otherwise exactly as the net's layer transforms it. Close it (`close()`) to stop its threads."""
    param = caffe_pb2.LayerParameter()
    param.CopyFrom(reader)
    for name in ("crop_size", "crop_height", "crop_width"):
        param.transform_param.ClearField(name)
    param.image_data_param.batch_size = 1
    return layer_class(READER_TYPE)(param, [], caffe_pb2.TEST)


def at_input_size(scores: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(N, C, h, w) scores upsampled bilinearly, corners aligned (as Interp), to `size` when they differ."""
    if tuple(scores.shape[-2:]) == tuple(size):
        return scores
    return F.interpolate(scores, size=size, mode="bilinear", align_corners=True)


class WholeImageNet:
    """A net built from `fed_test_param` that scores whole images (module doc)."""

    def __init__(self, net: Net, reader: caffe_pb2.LayerParameter, score_blob: str):
        self.net = net
        self.score_blob = score_blob
        self.crop = crop_of(reader)
        tops = [top if top in net.inputs else "" for top in list(reader.top) + [""] * 3]
        self.data_top, self.label_top, self.dim_top = tops[:3]
        if not self.data_top:
            raise NetError(f"{net.source}: the scores do not depend on the data layer's first top")
        self.ignore_label = float(reader.image_data_param.ignore_label)
        self._said_upsampling = False

    def run(self, data: torch.Tensor, label: torch.Tensor | None = None, outputs: bool = False) -> WholeImage:
        """Scores for one image: `data` (3, H, W) as the data layer gives it, `label` (H, W) or None;
        with `outputs`, the net's loss and outputs too (else 0 and none)."""
        height, width = data.shape[-2:]
        crop_h, crop_w = self.crop or (uncropped_size(height), uncropped_size(width))
        device = self.net.device
        data = data.to(device)
        total = counts = None
        tally = Scores()
        windows = list(product(tile_spans(height, crop_h), tile_spans(width, crop_w)))
        with torch.no_grad():
            for rows, columns in windows:
                tile_h, tile_w = min(crop_h, height - rows.start), min(crop_w, width - columns.start)
                inside = (slice(rows.start, rows.start + tile_h), slice(columns.start, columns.start + tile_w))
                loss = self.net.forward(self._feeds(data, label, rows, columns, inside, (crop_h, crop_w)))
                scores = self._scores((crop_h, crop_w))[0, :, :tile_h, :tile_w]
                if total is None:
                    total = torch.zeros((scores.shape[0], height, width), device=scores.device)
                    counts = torch.zeros((height, width), device=scores.device)
                total[(slice(None), *inside)] += scores
                counts[inside] += 1
                tally.add(loss.item(), output_values(self.net) if outputs else [])
        return WholeImage(total / counts, len(windows), float(tally.mean_loss()), tally.means())

    def _feeds(self, data: torch.Tensor, label: torch.Tensor | None, rows: Span, columns: Span,
               inside: tuple[slice, slice], crop: tuple[int, int]) -> dict[str, torch.Tensor]:
        """The tile's data padded with 0, its owned labels (ignore elsewhere) and its data_dim."""
        device = data.device
        tile_h, tile_w = inside[0].stop - inside[0].start, inside[1].stop - inside[1].start
        tile = torch.zeros((1, data.shape[0], *crop), device=device, dtype=data.dtype)
        tile[0, :, :tile_h, :tile_w] = data[(slice(None), *inside)]
        feeds = {self.data_top: tile}
        if self.label_top:
            labels = torch.full((1, 1, *crop), self.ignore_label, device=device)
            if label is not None:
                own_rows = slice(rows.own_start - rows.start, rows.own_end - rows.start)
                own_columns = slice(columns.own_start - columns.start, columns.own_end - columns.start)
                labels[0, 0, own_rows, own_columns] = label[rows.own_start:rows.own_end,
                                                            columns.own_start:columns.own_end].to(device)
            feeds[self.label_top] = labels
        if self.dim_top:
            feeds[self.dim_top] = torch.tensor([[[[tile_h, tile_w]]]], dtype=torch.float32, device=device)
        return feeds

    def _scores(self, size: tuple[int, int]) -> torch.Tensor:
        """The score blob of the last forward, float32, at the tile's input size."""
        scores = to_float32(self.net.blob_data[self.score_blob])
        if scores.ndim != 4:
            raise NetError(f"{self.net.source}: score blob '{self.score_blob}' has shape {tuple(scores.shape)}; "
                           "expected (N, C, H, W)")
        if tuple(scores.shape[-2:]) != size and not self._said_upsampling:
            log.info("Score blob '%s' is %dx%d, the input %dx%d: upsampling it bilinearly", self.score_blob,
                     scores.shape[2], scores.shape[3], *size)
            self._said_upsampling = True
        return at_input_size(scores, size)
