"""`python -m rloss infer`: segment one image or a folder of images with a test net and its weights.

Nothing is needed beyond the net file and the weights: the `${VAR}`s of the net's dataset need no
value and the class count comes from the weights (rloss.deploy). Each image is segmented whole at its
own size (rloss.whole_image: padded to the net's crop as Caffe pads it, tiled with overlap where
larger), transformed by the net's own ImageSegData layer (BGR, mean subtraction, scale; mirroring and
random rescaling off). An image whose short side is under `--min_size` (128 by default, as the A100
fork of the PyTorch port) is first upsampled bicubically to that short side, and its label map brought
back to the image's size (nearest); `--no_upsample` turns this off.

Per image `<name>` it writes to the output folder:
* `<name>.png`: the label map (arg-max over the score blob's channels) as a VOC-palette PNG, at the
  image's size;
* `<name>_overlay.png`: the image blended half and half with the label colours, with a legend of the
  classes present when class names are known (`--classes FILE`, else the classes.txt of the net's
  dataset when its DATA_ROOT has a value; rloss.class_names).

The score blob is the one the net's SegAccuracy layer scores (`--score_blob` names another). With
`--crf` the fork's DenseCRF mean-field inference (the DenseCRF layer's) runs on the whole image's
scores and pixels, and the labels come from its output. Its parameters come from
`--crf_params` (DenseCRFParameter text, e.g. `"max_iter: 10 pos_w: 3 pos_xy_std: 3 bi_w: 5
bi_xy_std: 50 bi_rgb_std: 10"`), else from the first commented-out `dense_crf_param` block in the
model file (the original test files carry one), else the values of the original test file of the
net named like the model (`name:`), else DeepLab-LargeFOV's. `--mat_write DIR` also writes the
whole image's scores (at the size the net segmented, after any upsampling) as the fork's MatWrite
layer does: `DIR/<name>_blob_0.mat` holding one single-precision variable `data` with MATLAB
dimensions [W, H, C, N]; with `--crf`, the CRF output goes to `DIR/crf/<name>_blob_0.mat`.
"""

from __future__ import annotations

import argparse
import logging
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch
from google.protobuf import text_format
from PIL import Image

from rloss.class_names import classes_file_of, read_class_names
from rloss.cli.common import add_precision_flag
from rloss.data.imageio import read_bgr
from rloss.deploy import (
    LIST_FIELDS,
    load_weights,
    outputs_from_weights,
    read_for_inference,
    read_weights,
    score_blob_of,
    score_only,
)
from rloss.errors import DataError, ProtoError
from rloss.layers.registry import layer_class
from rloss.metrics import predict_labels
from rloss.net import Net
from rloss.overlay import overlay
from rloss.palette import VOC_PALETTE, write_label_png
from rloss.precision import check_precision
from rloss.progress import Progress
from rloss.proto import caffe_pb2
from rloss.proto.text import read_text
from rloss.variables import parse_assignments
from rloss.whole_image import WholeImageNet, fed_test_param, image_reader_param, whole_image_reader

log = logging.getLogger("rloss")

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".pgm", ".tif", ".tiff", ".webp")
MIN_SIZE = 128  # images with a shorter short side are upsampled first (as the A100 fork)
# DenseCRF settings of the original test files' commented-out blocks, by net name.
ORIGINAL_CRF_PARAMS = {
    "deeplab_largeFOV": "max_iter: 10 pos_w: 3 pos_xy_std: 3 bi_w: 5 bi_xy_std: 50 bi_rgb_std: 10",
    "deeplab_msc_largeFOV": "max_iter: 10 pos_w: 3 pos_xy_std: 3 bi_w: 5 bi_xy_std: 50 bi_rgb_std: 10",
    "deeplab_vgg16": "max_iter: 10 pos_w: 2 pos_xy_std: 2 bi_w: 4 bi_xy_std: 65 bi_rgb_std: 3",
    "resnet-101": "max_iter: 10 pos_w: 3 pos_xy_std: 1 bi_w: 4 bi_xy_std: 67 bi_rgb_std: 3",
}
DEFAULT_CRF_NET = "deeplab_largeFOV"
_COMMENTED_CRF = re.compile(r"dense_crf_param\s*\{([^}]*)\}")


# ---- DenseCRF parameters ----------------------------------------------------------------------------

def parse_crf_params(text: str, where: str) -> caffe_pb2.DenseCRFParameter:
    """DenseCRFParameter from prototxt text (a ProtoError naming `where` if it does not parse)."""
    param = caffe_pb2.DenseCRFParameter()
    try:
        text_format.Parse(text, param)
    except text_format.ParseError as error:
        raise ProtoError(f"{where}: cannot read DenseCRF parameters '{' '.join(text.split())}': {error}") from None
    return param


def commented_crf_params(model_text: str) -> str | None:
    """The body of the first `dense_crf_param { ... }` block inside the file's comments, or None."""
    commented = "\n".join(line.split("#", 1)[1] for line in model_text.splitlines() if "#" in line)
    match = _COMMENTED_CRF.search(commented)
    return match.group(1) if match else None


def crf_params(given: str, model_text: str, net_name: str) -> tuple[caffe_pb2.DenseCRFParameter, str]:
    """(parameters, where they came from): --crf_params, the model's commented block, the original
    file of the net of this name, else DeepLab-LargeFOV's."""
    if given:
        return parse_crf_params(given, "--crf_params"), "--crf_params"
    commented = commented_crf_params(model_text)
    if commented is not None:
        return parse_crf_params(commented, "the model's commented-out DenseCRF layer"), \
            "the model's commented-out DenseCRF layer"
    if net_name in ORIGINAL_CRF_PARAMS:
        return parse_crf_params(ORIGINAL_CRF_PARAMS[net_name], net_name), f"the original {net_name} test file"
    return (parse_crf_params(ORIGINAL_CRF_PARAMS[DEFAULT_CRF_NET], DEFAULT_CRF_NET),
            f"the original {DEFAULT_CRF_NET} test file (the default: net '{net_name}' is not one of the originals)")


def crf_layer(param: caffe_pb2.DenseCRFParameter, shapes: Sequence[tuple[int, ...]]):
    """The fork's DenseCRF layer for bottoms (scores, data_dim, image) of these shapes."""
    layer_param = caffe_pb2.LayerParameter(name="crf", type="DenseCRF", bottom=["scores", "data_dim", "data"],
                                           top=["crf_inf"])
    layer_param.dense_crf_param.CopyFrom(param)
    return layer_class("DenseCRF")(layer_param, list(shapes), caffe_pb2.TEST)


# ---- images and the net -----------------------------------------------------------------------------

def image_paths(image: str, folder: str) -> list[Path]:
    """The images to segment: one file, or the image files of a folder (sorted by name)."""
    if image:
        path = Path(image)
        if not path.is_file():
            raise DataError(f"--image: '{image}' does not exist or is not a file")
        return [path]
    directory = Path(folder)
    if not directory.is_dir():
        raise DataError(f"--images: '{folder}' is not a folder")
    paths = sorted(p for p in directory.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not paths:
        raise DataError(f"--images: no image files ({', '.join(IMAGE_SUFFIXES)}) in '{folder}'")
    return paths


def check_names(paths: Sequence[Path]) -> None:
    """Output files are named after the image's stem: refuse two images with the same stem, and
    whitespace (the list file Caffe's data layer reads separates tokens by it)."""
    seen: dict[str, Path] = {}
    for path in paths:
        if any(c.isspace() for c in str(path.resolve())):
            raise DataError(f"image path '{path}' contains whitespace, which the data layer's list file "
                            "cannot hold; rename or move it")
        if path.stem in seen:
            raise DataError(f"images '{seen[path.stem]}' and '{path}' would both be written as "
                            f"'{path.stem}.png'; segment them separately")
        seen[path.stem] = path


def read_rgb(path: Path) -> np.ndarray:
    """The image's (H, W, 3) uint8 RGB pixels, decoded as the data layer decodes them."""
    return np.ascontiguousarray(read_bgr(str(path), "infer")[:, :, ::-1])


def upsampled_size(size: tuple[int, int], min_size: int) -> tuple[int, int] | None:
    """(height, width) with the short side brought up to `min_size`, or None when it is not shorter."""
    short = min(size)
    if not min_size or short >= min_size:
        return None
    return round(size[0] * min_size / short), round(size[1] * min_size / short)


def centre_indices(src: int, dst: int) -> np.ndarray:
    """For each of `dst` output pixels, the source pixel (of `src`) under its centre."""
    return np.minimum(((np.arange(dst) + 0.5) * src / dst).astype(np.int64), src - 1)


def resize_labels(labels: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """A label map brought to (height, width) by nearest neighbour, pixel centres aligned (as the
    bicubic upsampling aligns them)."""
    if labels.shape == tuple(size):
        return labels
    rows, columns = centre_indices(labels.shape[0], size[0]), centre_indices(labels.shape[1], size[1])
    return np.ascontiguousarray(labels[rows[:, None], columns[None, :]])


@dataclass
class Segmentation:
    """One image's result: its RGB pixels (H, W, 3); the size the net segmented (after any
    upsampling) and the forward passes it took; `scores` (1, C, h, w) at that size; `crf` the
    DenseCRF output (same shape) or None; `labels` (H, W) uint8 at the image's size, from the CRF
    output when there is one."""

    name: str
    path: Path
    image: np.ndarray
    segmented: tuple[int, int]
    tiles: int
    scores: np.ndarray
    crf: np.ndarray | None
    labels: np.ndarray


class Segmenter:
    """A TEST net with its weights that segments whole images (module doc), in `precision`
    (rloss.precision; the scores it returns are float32 whatever the precision)."""

    def __init__(self, model: str, weights: Sequence[str], sets: dict[str, str] | None = None,
                 score_blob: str = "", crf: caffe_pb2.DenseCRFParameter | None = None,
                 device: torch.device | None = None, precision: str = "fp32", min_size: int = MIN_SIZE):
        device = device or torch.device("cpu")
        precision = check_precision(precision, device)
        self.model_path, self.net_param, self.unread = read_for_inference(model, sets or {})
        self.model_text = read_text(self.model_path)
        source = str(self.model_path)
        stored = read_weights(weights)
        outputs_from_weights(self.net_param, stored, source)
        self.reader = image_reader_param(self.net_param, source)
        score = score_blob_of(self.net_param, score_blob, source)
        net = Net(score_only(fed_test_param(self.net_param, source), score), caffe_pb2.TEST, source=source).to(device)
        net.precision = precision
        load_weights(net, weights, stored)
        self.whole = WholeImageNet(net, self.reader, score)
        self.crf_param = crf
        self.min_size = min_size

    @property
    def net_name(self) -> str:
        return self.net_param.name

    def classes_file(self) -> Path | None:
        """The classes.txt of the net's dataset, when its list's location has a value."""
        if any(fields <= set(LIST_FIELDS) for fields in self.unread.values()):
            return None
        return classes_file_of(self.reader.image_data_param)

    def _list_reader(self, list_file: Path) -> caffe_pb2.LayerParameter:
        """The net's data layer reading `list_file` (absolute image paths, no labels) in file order,
        without mirroring or random rescaling."""
        param = caffe_pb2.LayerParameter()
        param.CopyFrom(self.reader)
        data_param = param.image_data_param
        data_param.source = str(list_file)
        data_param.root_folder = ""
        data_param.label_type = caffe_pb2.ImageDataParameter.NONE
        data_param.shuffle = False
        data_param.rand_skip = 0
        param.transform_param.mirror = False
        param.transform_param.ClearField("scale_factors")
        return param

    def _net_input(self, path: Path, copy: Path) -> Path:
        """The file the net reads for `path`: itself, or its bicubic upsampling (saved as `copy`)
        when it is small."""
        try:
            with Image.open(path) as image:
                size = (image.height, image.width)
                target = upsampled_size(size, self.min_size)
                if target is None:
                    return path
                upsampled = image.convert("RGB").resize((target[1], target[0]), Image.BICUBIC)
        except OSError as error:
            raise DataError(f"cannot read the image '{path}': {error}") from None
        upsampled.save(copy)
        return copy

    def segment(self, paths: Sequence[Path]) -> Iterator[Segmentation]:
        """Segment the images in order."""
        check_names(paths)
        with tempfile.TemporaryDirectory(prefix="rloss-infer-") as folder:
            inputs = [self._net_input(path, Path(folder) / f"{k:06d}.png") for k, path in enumerate(paths)]
            list_file = Path(folder) / "images.txt"
            list_file.write_text("".join(f"{p.resolve()}\n" for p in inputs))
            reader = whole_image_reader(self._list_reader(list_file))
            try:
                for path in paths:
                    data, _, dims = reader.forward()
                    yield self._segment_one(path, data, dims)
            finally:
                reader.close()

    def _segment_one(self, path: Path, data: torch.Tensor, dims: torch.Tensor) -> Segmentation:
        result = self.whole.run(data[0])
        scores = result.scores[None]
        refined = None
        if self.crf_param is not None:
            data = data.to(scores.device)
            dims = dims.to(scores.device)
            crf = crf_layer(self.crf_param, [tuple(t.shape) for t in (scores, dims, data)])
            with torch.no_grad():
                refined = crf(scores, dims, data)[0]
        pixels = read_rgb(path)
        segmented = predict_labels(scores if refined is None else refined)[0].cpu().numpy().astype(np.uint8)
        labels = resize_labels(segmented, pixels.shape[:2])
        return Segmentation(path.stem, path, pixels, segmented.shape, result.tiles, scores.cpu().numpy(),
                            None if refined is None else refined.cpu().numpy(), labels)


# ---- writing ----------------------------------------------------------------------------------------

def write_mat(blob: np.ndarray, path: Path) -> None:
    """MatWrite's file: variable `data`, single precision, MATLAB dims [W, H, C, N] (data(w,h,c,n) =
    blob[n,c,h,w])."""
    from scipy.io import savemat

    path.parent.mkdir(parents=True, exist_ok=True)
    savemat(str(path), {"data": np.asarray(blob, dtype=np.float32).transpose(3, 2, 1, 0)})


def write_segmentation(result: Segmentation, output: Path, names: dict[int, str], mat_dir: Path | None) -> None:
    """The label PNG and the overlay, and with `mat_dir` the MatWrite files."""
    write_label_png(result.labels, output / f"{result.name}.png")
    drawn = overlay(result.image, result.labels, VOC_PALETTE, names)
    Image.fromarray(drawn).save(output / f"{result.name}_overlay.png")
    if mat_dir is not None:
        write_mat(result.scores, mat_dir / f"{result.name}_blob_0.mat")
        if result.crf is not None:
            write_mat(result.crf, mat_dir / "crf" / f"{result.name}_blob_0.mat")


# ---- the command ------------------------------------------------------------------------------------

def add_infer_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", "-model", default="", help="test net prototxt (with an ImageSegData layer)")
    parser.add_argument("--weights", "-weights", default="", help="comma-separated .caffemodel files (required)")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--image", "-image", default="", help="one image to segment")
    source.add_argument("--images", "-images", default="", help="a folder of images to segment")
    parser.add_argument("--output_dir", "-output_dir", default="", help="where to write the PNGs (required)")
    parser.add_argument("--score_blob", "-score_blob", default="",
                        help="blob whose channel arg-max is the segmentation (default: SegAccuracy's scores)")
    parser.add_argument("--classes", "-classes", default="",
                        help="class names file for the overlays' legend (lines 'INDEX NAME'; default: the "
                             "classes.txt of the net's dataset, when found)")
    parser.add_argument("--min_size", "-min_size", type=int, default=MIN_SIZE,
                        help=f"upsample (bicubic) images whose short side is shorter to this size before the net "
                             f"(default {MIN_SIZE})")
    parser.add_argument("--no_upsample", "-no_upsample", action="store_true",
                        help="segment small images at their own size")
    parser.add_argument("--crf", "-crf", action="store_true", help="refine with DenseCRF mean-field inference")
    parser.add_argument("--crf_params", "-crf_params", default="",
                        help='DenseCRF parameters, e.g. "max_iter: 10 pos_w: 3 pos_xy_std: 3 bi_w: 5 '
                             'bi_xy_std: 50 bi_rgb_std: 10" (default: see the module doc)')
    parser.add_argument("--mat_write", "-mat_write", default="",
                        help="also write the scores (and CRF output) as MatWrite .mat files in this folder")
    parser.add_argument("--gpu", "-gpu", default="", help="CUDA device id; empty: the CPU")
    add_precision_flag(parser)


def check_infer_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if not args.model:
        parser.error("infer needs a net: --model=TEST.prototxt")
    if not args.weights:
        parser.error("infer needs model weights: --weights=MODEL.caffemodel")
    if not (args.image or args.images):
        parser.error("infer needs --image=FILE or --images=FOLDER")
    if not args.output_dir:
        parser.error("infer needs --output_dir=FOLDER")
    if args.crf_params and not args.crf:
        parser.error("--crf_params needs --crf")
    if args.min_size < 1:
        parser.error(f"--min_size must be at least 1, got {args.min_size}")


def legend_names(given: str, segmenter: Segmenter) -> dict[int, str]:
    """--classes, else the classes.txt of the net's dataset, else none (no legend)."""
    path = Path(given) if given else segmenter.classes_file()
    if path is None:
        return {}
    if not given:
        log.info("Class names from %s", path)
    return read_class_names(path)


def infer(args: argparse.Namespace) -> None:
    """Segment the images of --image/--images and write the results (module doc)."""
    from rloss.device import parse_gpu_flag

    device = parse_gpu_flag(args.gpu) if args.gpu else torch.device("cpu")
    paths = image_paths(args.image, args.images)
    weights = [w.strip() for w in args.weights.split(",") if w.strip()]
    segmenter = Segmenter(args.model, weights, parse_assignments(args.set), args.score_blob, None, device,
                          args.precision, 0 if args.no_upsample else args.min_size)
    if args.crf:
        segmenter.crf_param, origin = crf_params(args.crf_params, segmenter.model_text, segmenter.net_name)
        log.info("DenseCRF parameters from %s: %s", origin, text_format.MessageToString(segmenter.crf_param,
                                                                                         as_one_line=True))
    names = legend_names(args.classes, segmenter)
    output = Path(args.output_dir)
    output.mkdir(parents=True, exist_ok=True)
    mat_dir = Path(args.mat_write) if args.mat_write else None
    progress = Progress(len(paths), "images", 0)
    for result in segmenter.segment(paths):
        write_segmentation(result, output, names, mat_dir)
        height, width = result.image.shape[:2]
        at = "" if result.segmented == (height, width) else " segmented at {}x{},".format(*result.segmented)
        passes = f"{result.tiles} forward pass{'' if result.tiles == 1 else 'es'}"
        log.info("Segmented %s (%dx%d,%s %s): %d labels used; %s", result.path, height, width, at, passes,
                 len(np.unique(result.labels)), progress.advance())
    log.info("Wrote %d segmentations to %s", len(paths), output)
