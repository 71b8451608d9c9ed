"""`python -m rloss infer`: segment one image or a folder of images with a test net and its weights.

The net's own TEST-phase ImageSegData layer reads the images (from a temporary list, batch 1, no
labels), so every image is transformed exactly as `caffe test` would transform it: BGR, mean
subtraction, bottom/right padding with the mean up to the crop size, and a centre crop when the image
is larger than the crop (then only that window is segmented, and the outputs cover that window).

Per image `<name>` it writes to the output folder:
* `<name>.png`: the label map (arg-max over the score blob's channels) as a VOC-palette PNG, cropped
  to the image (the `data_dim` region);
* `<name>_overlay.png`: the image blended half and half with the label colours.

The score blob is the one the net's SegAccuracy layer scores (`--score_blob` names another); scores
smaller than the input (an un-upsampled score map) are upsampled bilinearly, corners aligned, as
the nets' Interp layers do. With `--crf` the fork's DenseCRF mean-field inference (the DenseCRF layer's) runs on
the scores, the image and `data_dim`, and the labels come from its output. Its parameters come from
`--crf_params` (DenseCRFParameter text, e.g. `"max_iter: 10 pos_w: 3 pos_xy_std: 3 bi_w: 5
bi_xy_std: 50 bi_rgb_std: 10"`), else from the first commented-out `dense_crf_param` block in the
model file (the original test files carry one), else the values of the original test file of the
net named like the model (`name:`), else DeepLab-LargeFOV's. `--mat_write DIR` also writes the
score blob as the fork's MatWrite layer does: `DIR/<name>_blob_0.mat` holding one single-precision
variable `data` with MATLAB dimensions [W, H, C, N]; with `--crf`, the CRF output goes to
`DIR/crf/<name>_blob_0.mat`.
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
import torch.nn.functional as F
from google.protobuf import text_format

from rloss.cli.common import add_precision_flag, prediction_blob, read_model
from rloss.errors import DataError, NetError, ProtoError
from rloss.layers.registry import layer_class
from rloss.metrics import predict_labels
from rloss.net import Net
from rloss.palette import VOC_PALETTE, write_label_png
from rloss.precision import check_precision, to_float32
from rloss.proto import caffe_pb2
from rloss.proto.text import read_text
from rloss.variables import parse_assignments

log = logging.getLogger("rloss")

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".pgm", ".tif", ".tiff", ".webp")
OVERLAY_ALPHA = 0.5
# DenseCRF settings of the original test files' commented-out blocks, by net name.
ORIGINAL_CRF_PARAMS = {
    "deeplab_largeFOV": "max_iter: 10 pos_w: 3 pos_xy_std: 3 bi_w: 5 bi_xy_std: 50 bi_rgb_std: 10",
    "deeplab_msc_largeFOV": "max_iter: 10 pos_w: 3 pos_xy_std: 3 bi_w: 5 bi_xy_std: 50 bi_rgb_std: 10",
    "deeplab_vgg16": "max_iter: 10 pos_w: 2 pos_xy_std: 2 bi_w: 4 bi_xy_std: 65 bi_rgb_std: 3",
    "resnet-101": "max_iter: 10 pos_w: 3 pos_xy_std: 1 bi_w: 4 bi_xy_std: 67 bi_rgb_std: 3",
}
DEFAULT_CRF_NET = "deeplab_largeFOV"
_COMMENTED_CRF = re.compile(r"dense_crf_param\s*\{([^}]*)\}")


@dataclass
class Segmentation:
    """One image's result. `window` = (row, column, height, width) of the image region segmented and
    `image` its RGB pixels (height, width, 3); `scores` (1, C, Hp, Wp) at the input's size; `crf`
    the DenseCRF output (same shape) or None; `labels` (height, width) uint8, from the CRF output
    when there is one."""

    name: str
    path: Path
    window: tuple[int, int, int, int]
    image: np.ndarray
    scores: np.ndarray
    crf: np.ndarray | None
    labels: np.ndarray


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


def image_reader(net_param, list_file: Path, model: str):
    """The TEST net's ImageSegData layer, pointed at `list_file` (absolute image paths, no labels,
    batch 1, file order); the net is changed in place."""
    readers = [layer for layer in net_param.layer if layer.type == "ImageSegData"]
    if len(readers) != 1:
        raise NetError(f"{model}: infer needs a net whose TEST phase reads its images with one ImageSegData "
                       f"layer; this one has {len(readers)}")
    reader = readers[0]
    data_param = reader.image_data_param
    data_param.source = str(list_file)
    data_param.root_folder = ""
    data_param.label_type = caffe_pb2.ImageDataParameter.NONE
    data_param.batch_size = 1
    data_param.shuffle = False
    data_param.rand_skip = 0
    return reader


def _resize_to(reader) -> tuple[int, int] | None:
    """(height, width) the data layer resizes images to when read, or None."""
    data_param = reader.image_data_param
    if data_param.new_height and data_param.new_width:
        return int(data_param.new_height), int(data_param.new_width)
    return None


def segmented_window(size: tuple[int, int], reader) -> tuple[int, int, int, int]:
    """(row, column, height, width) of the region of an image of `size` = (H, W) (after the layer's
    resize) that the TEST transform keeps: the centre crop where the image is larger than the crop,
    else all of it."""
    transform = reader.transform_param
    height, width = size
    crop_h = transform.crop_height or transform.crop_size or height
    crop_w = transform.crop_width or transform.crop_size or width
    return (max(0, height - crop_h) // 2, max(0, width - crop_w) // 2, min(height, crop_h), min(width, crop_w))


def window_pixels(path: Path, reader) -> tuple[tuple[int, int, int, int], np.ndarray]:
    """The segmented window of an image and its RGB pixels (resized first if the layer resizes)."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            rgb = image.convert("RGB")
    except OSError as error:
        raise DataError(f"cannot read the image '{path}': {error}") from None
    resize = _resize_to(reader)
    if resize is not None and (rgb.height, rgb.width) != resize:
        rgb = rgb.resize((resize[1], resize[0]), Image.BILINEAR)
    pixels = np.asarray(rgb)
    window = segmented_window(pixels.shape[:2], reader)
    row, column, height, width = window
    if (height, width) != pixels.shape[:2]:
        log.warning("%s is %dx%d, larger than the net's crop: only the centre %dx%d window is segmented "
                    "(as caffe test does)", path, pixels.shape[0], pixels.shape[1], height, width)
    return window, np.ascontiguousarray(pixels[row:row + height, column:column + width])


class Segmenter:
    """A TEST net with its weights that segments images with its own data layer (see module doc), in
    `precision` (rloss.precision; the scores it returns are float32 whatever the precision)."""

    def __init__(self, model: str, weights: Sequence[str], sets: dict[str, str] | None = None,
                 score_blob: str = "", crf: caffe_pb2.DenseCRFParameter | None = None,
                 device: torch.device | None = None, precision: str = "fp32"):
        self.device = device or torch.device("cpu")
        self.precision = check_precision(precision, self.device)
        self.model_path, self.net_param = read_model(model, sets or {}, caffe_pb2.TEST)
        self.model_text = read_text(self.model_path)
        self.weights = list(weights)
        self.requested_score_blob = score_blob
        self.crf_param = crf
        self._warned_upsampling = False

    @property
    def net_name(self) -> str:
        return self.net_param.name

    def _build(self, list_file: Path) -> tuple[Net, object]:
        net_param = caffe_pb2.NetParameter()
        net_param.CopyFrom(self.net_param)
        reader = image_reader(net_param, list_file, str(self.model_path))
        net = Net(net_param, caffe_pb2.TEST, source=str(self.model_path)).to(self.device)
        net.precision = self.precision
        for weights in self.weights:
            net.copy_from(weights)
        return net, reader

    def score_blob(self, net: Net) -> str:
        """--score_blob, else the scores the net's SegAccuracy layer reads."""
        name = prediction_blob(net, self.requested_score_blob)
        if not name:
            raise NetError(f"{self.model_path}: no SegAccuracy layer names the scores; give --score_blob")
        return name

    def segment(self, paths: Sequence[Path]) -> Iterator[Segmentation]:
        """Segment the images in order (one forward each)."""
        check_names(paths)
        with tempfile.TemporaryDirectory(prefix="rloss-infer-") as folder:
            list_file = Path(folder) / "images.txt"
            list_file.write_text("".join(f"{p.resolve()}\n" for p in paths))
            net, reader = self._build(list_file)
            score_name = self.score_blob(net)
            data_name, _, dim_name = net.layer_tops(reader.name)[:3]
            crf = None
            for path in paths:
                with torch.no_grad():
                    net.forward()
                    data, dims = net.blob_data[data_name], net.blob_data[dim_name]
                    scores = self._at_input_size(to_float32(net.blob_data[score_name]), data, score_name)
                    refined = None
                    if self.crf_param is not None:
                        if crf is None:
                            crf = crf_layer(self.crf_param, [tuple(t.shape) for t in (scores, dims, data)])
                        refined = crf(scores, dims, data)[0]
                window, pixels = window_pixels(path, reader)
                final = scores if refined is None else refined
                labels = predict_labels(final)[0, :window[2], :window[3]].cpu().numpy().astype(np.uint8)
                yield Segmentation(path.stem, path, window, pixels, scores.cpu().numpy(),
                                   None if refined is None else refined.cpu().numpy(), labels)

    def _at_input_size(self, scores: torch.Tensor, data: torch.Tensor, name: str) -> torch.Tensor:
        """The scores, upsampled (bilinear, corners aligned, as Interp) when smaller than the input."""
        if scores.ndim != 4:
            raise NetError(f"score blob '{name}' has shape {tuple(scores.shape)}; expected (N, C, H, W)")
        if scores.shape[-2:] == data.shape[-2:]:
            return scores
        if not self._warned_upsampling:
            log.info("Score blob '%s' is %dx%d, the input %dx%d: upsampling it bilinearly", name,
                     scores.shape[2], scores.shape[3], data.shape[2], data.shape[3])
            self._warned_upsampling = True
        return F.interpolate(scores, size=tuple(data.shape[-2:]), mode="bilinear", align_corners=True)


# ---- writing ----------------------------------------------------------------------------------------

def overlay(pixels: np.ndarray, labels: np.ndarray, palette: list[int]) -> np.ndarray:
    """RGB pixels (H, W, 3) blended half and half with the colours of the labels (H, W)."""
    colours = np.asarray(palette, dtype=np.float32).reshape(-1, 3)[labels]
    blended = (1 - OVERLAY_ALPHA) * pixels.astype(np.float32) + OVERLAY_ALPHA * colours
    return np.clip(blended + 0.5, 0, 255).astype(np.uint8)


def write_mat(blob: np.ndarray, path: Path) -> None:
    """MatWrite's file: variable `data`, single precision, MATLAB dims [W, H, C, N] (data(w,h,c,n) =
    blob[n,c,h,w])."""
    from scipy.io import savemat

    path.parent.mkdir(parents=True, exist_ok=True)
    savemat(str(path), {"data": np.asarray(blob, dtype=np.float32).transpose(3, 2, 1, 0)})


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


def infer(args: argparse.Namespace) -> None:
    """Segment the images of --image/--images and write the results (module doc)."""
    from PIL import Image

    from rloss.device import parse_gpu_flag

    device = parse_gpu_flag(args.gpu) if args.gpu else torch.device("cpu")
    paths = image_paths(args.image, args.images)
    weights = [w.strip() for w in args.weights.split(",") if w.strip()]
    segmenter = Segmenter(args.model, weights, parse_assignments(args.set), args.score_blob, None, device,
                          args.precision)
    if args.crf:
        segmenter.crf_param, origin = crf_params(args.crf_params, segmenter.model_text, segmenter.net_name)
        log.info("DenseCRF parameters from %s: %s", origin, text_format.MessageToString(segmenter.crf_param,
                                                                                         as_one_line=True))
    output = Path(args.output_dir)
    output.mkdir(parents=True, exist_ok=True)
    mat_dir = Path(args.mat_write) if args.mat_write else None
    count = 0
    for result in segmenter.segment(paths):
        write_label_png(result.labels, output / f"{result.name}.png")
        Image.fromarray(overlay(result.image, result.labels, VOC_PALETTE)).save(output / f"{result.name}_overlay.png")
        if mat_dir is not None:
            write_mat(result.scores, mat_dir / f"{result.name}_blob_0.mat")
            if result.crf is not None:
                write_mat(result.crf, mat_dir / "crf" / f"{result.name}_blob_0.mat")
        row, column, height, width = result.window
        log.info("Segmented %s: %dx%d window at (%d, %d), %d labels used", result.path, height, width, row, column,
                 len(np.unique(result.labels)))
        count += 1
    log.info("Wrote %d segmentations to %s", count, output)

