"""`python -m rloss test`: caffe.bin test (Batch lines, Loss, per-output means), then a summary from a
confusion matrix accumulated over the whole run (pixel accuracy, mean accuracy, mean IoU, the IoU of
each class with its name), and with `--output_dir` the predicted label maps as VOC-palette PNGs.

Where caffe.bin runs 50 iterations unless told, and wraps around its list silently, `--iterations`
defaults to as many batches as the test net's list holds (ceil(lines / batch_size)); fewer score a
prefix of the list; more are an error unless `--allow_wrap` asks for Caffe's wrap-around. Each image
is counted once in the confusion matrix (the wrapped part of a last, partial batch is not).

By default every image is scored whole (rloss.whole_image: padded to the net's crop as Caffe pads it,
tiled with overlap and averaged scores where larger); the Batch lines then show, per iteration, the
net's outputs averaged over its tiles and images (Caffe's own numbers for batches of one image no
larger than the crop). `--center_crop` scores what caffe.bin scores, the centre crop of the TEST
transform; so does a net without an ImageSegData layer. Both agree on images no larger than the crop.

Class names come from `--classes FILE`, else from a classes.txt of the test list's dataset
(rloss.class_names), else the summary names classes by their index.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from rloss.caffe_log import caffe_float, caffe_number, loss_suffix
from rloss.class_names import classes_file_of, labels_of, read_class_names
from rloss.cli.common import accuracy_layer, load_model, prediction_blob
from rloss.data.listfile import read_list
from rloss.errors import DataError, RlossError
from rloss.metrics import (
    class_iou,
    confusion_matrix,
    mean_class_accuracy,
    mean_iou,
    mean_iou_caffe,
    pixel_accuracy,
    predict_labels,
)
from rloss.net import Net
from rloss.palette import write_label_png
from rloss.paths import resolve_input
from rloss.progress import Progress
from rloss.proto import caffe_pb2
from rloss.scoring import Outputs, Scores, score
from rloss.whole_image import READER_TYPE, WholeImageNet, fed_test_param, image_reader_param, whole_image_reader

log = logging.getLogger("rloss")

LIST_LAYERS = ("ImageSegData", "ImageData")
PROGRESS_SECONDS = 10.0


CAFFE_ITERATIONS = 50  # caffe.bin test's default, for a net that reads no list
ITERATIONS_HELP = ("test iterations (default: as many batches as the test net's list holds; "
                   "50 for a net that reads no list)")


def add_test_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--weights", "-weights", default="", help=".caffemodel to score (required)")
    parser.add_argument("--output_dir", "-output_dir", default="",
                        help="write the predicted label maps there as VOC-palette PNGs")
    parser.add_argument("--metrics_json", "-metrics_json", default="",
                        help="also write the metrics (pixel accuracy, mean IoU, IoU per class, ...) to this JSON file")
    parser.add_argument("--score_blob", "-score_blob", default="",
                        help="blob whose channel argmax is the prediction (default: SegAccuracy's scores)")
    parser.add_argument("--center_crop", "-center_crop", action="store_true",
                        help="score only the centre crop of the net's TEST transform, as caffe.bin test does "
                             "(default: whole images)")
    parser.add_argument("--allow_wrap", "-allow_wrap", action="store_true",
                        help="let --iterations read past the end of the list, wrapping around as Caffe does")
    parser.add_argument("--classes", "-classes", default="",
                        help="class names file (lines 'INDEX NAME'; default: classes.txt of the test list's dataset)")


# ---- how many iterations ------------------------------------------------------------------------

@dataclass(frozen=True)
class TestList:
    """The list the test net's first image data layer reads, its length and that layer's batch size."""

    source: str
    length: int
    batch_size: int

    @property
    def batches(self) -> int:
        return math.ceil(self.length / self.batch_size)


@dataclass(frozen=True)
class Plan:
    """The iterations to run and the samples to count (None: every sample of every batch)."""

    iterations: int
    samples: int | None


def test_list(net: Net) -> TestList | None:
    layer = next((layer for layer in net.layers if layer.param.type in LIST_LAYERS), None)
    if layer is None:
        return None
    return TestList(layer.source, layer.walk.count, layer.batch_size)


def plan_iterations(requested: int | None, listed: TestList | None, allow_wrap: bool) -> Plan:
    """The list's batches by default (`requested` None); an explicit count past the list is an error
    unless `allow_wrap`."""
    if listed is None:
        if requested is None:
            log.info("The net reads no list file: %d iterations (Caffe's default)", CAFFE_ITERATIONS)
        return Plan(CAFFE_ITERATIONS if requested is None else requested, None)
    if requested is None:
        return Plan(listed.batches, listed.length)
    samples = requested * listed.batch_size
    if requested > listed.batches and not allow_wrap:
        raise DataError(f"--iterations={requested}: {requested} batches of {listed.batch_size} would read "
                        f"{samples} images, but the list '{listed.source}' has {listed.length} (at most "
                        f"{listed.batches} iterations); leave --iterations out to score the whole list, or give "
                        "--allow_wrap to wrap around it as Caffe does")
    if requested > listed.batches:
        log.warning("--allow_wrap: %d iterations read %d images from the list '%s' of %d: some are scored "
                    "more than once", requested, samples, listed.source, listed.length)
        return Plan(int(requested), samples)
    if requested < listed.batches:
        log.info("Scoring the first %d of the %d images of the list '%s' (--iterations=%d)",
                 samples, listed.length, listed.source, requested)
    return Plan(int(requested), min(samples, listed.length))


# ---- the confusion matrix -----------------------------------------------------------------------

class Evaluation:
    """A confusion matrix over the run, from predictions and labels the caller gives, class names
    for the report, and optional PNGs of the predictions."""

    def __init__(self, ignore: list[int], output_dir: str, names: Callable[[int], str],
                 class_names: dict[int, str], scoring: str):
        self.ignore = ignore
        self.output_dir = Path(output_dir) if output_dir else None
        if self.output_dir is not None:
            self.output_dir.mkdir(parents=True, exist_ok=True)
        self.names = names
        self.class_names = class_names
        self.scoring = scoring
        self.matrix: torch.Tensor | None = None
        self.samples = 0

    def add(self, scores: torch.Tensor, labels: torch.Tensor | None, sizes: list[tuple[int, int]],
            score_blob: str) -> None:
        """Count predictions from (N, C, H, W) scores against (N, H, W) labels (None: nothing to
        count); write them, each cut to its size in `sizes` (empty: uncut), if asked."""
        predictions = predict_labels(scores.detach()).cpu()
        if labels is not None:
            self._count(predictions, labels.detach().cpu(), scores.shape[1], score_blob)
        if self.output_dir is not None:
            for n in range(predictions.shape[0]):
                height, width = sizes[n] if sizes else predictions.shape[-2:]
                path = self.output_dir / f"{self.names(self.samples + n)}.png"
                write_label_png(predictions[n, :height, :width].numpy(), path)
        self.samples += predictions.shape[0]

    def _count(self, predictions: torch.Tensor, labels: torch.Tensor, classes: int, score_blob: str) -> None:
        if labels.shape[-2:] != predictions.shape[-2:] or labels.numel() != predictions.numel():
            raise DataError(f"scores '{score_blob}' give predictions of shape {tuple(predictions.shape)}, "
                            f"the labels have shape {tuple(labels.shape)}: choose a score blob of the label's "
                            "size with --score_blob")
        counts = confusion_matrix(labels.reshape(predictions.shape), predictions, classes, self.ignore)
        self.matrix = counts if self.matrix is None else self.matrix + counts

    def class_labels(self) -> list[str]:
        return labels_of(self.class_names, self.matrix.shape[0])

    def metrics(self, iterations: int) -> dict:
        """The run's metrics from the accumulated confusion matrix (NaN class IoUs as None)."""
        m = self.matrix
        ious = [None if np.isnan(v) else float(v) for v in class_iou(m).tolist()]
        names = self.class_labels()
        return {
            "pixel_accuracy": float(pixel_accuracy(m)), "mean_accuracy": float(mean_class_accuracy(m)),
            "mean_iou": float(mean_iou(m)), "mean_iou_caffe": float(mean_iou_caffe(m)),
            "class_iou": ious, "class_names": names, "class_iou_by_name": dict(zip(names, ious)),
            "samples": self.samples, "labelled_pixels": int(m.sum()), "iterations": iterations,
            "scoring": self.scoring,
        }

    def write_json(self, path: str, iterations: int) -> None:
        Path(path).write_text(json.dumps(self.metrics(iterations), indent=1) + "\n")

    def report(self, iterations: int) -> None:
        if self.matrix is None:
            return
        m = self.matrix
        log.info("Confusion-matrix summary over %d iterations (%d samples, %d labelled pixels, %d classes; %s):",
                 iterations, self.samples, int(m.sum()), m.shape[0], self.scoring.replace("_", " "))
        log.info("    pixel accuracy = %s", caffe_number(pixel_accuracy(m)))
        log.info("    mean accuracy = %s", caffe_number(mean_class_accuracy(m)))
        log.info("    mean IoU = %s", caffe_number(mean_iou(m)))
        log.info("    mean IoU (SegAccuracy convention, absent classes count 1) = %s",
                 caffe_number(mean_iou_caffe(m)))
        for index, (name, iou) in enumerate(zip(self.class_labels(), class_iou(m).tolist())):
            shown = "- (in neither the ground truth nor the predictions)" if np.isnan(iou) else caffe_number(iou)
            log.info("    IoU of class %d (%s) = %s", index, name, shown)


def sample_names(net: Net) -> Callable[[int], str]:
    """Sample k's file name: the image name of line k of the test list (when one unshuffled
    ImageSegData layer reads it), else a zero-padded index."""
    readers = [layer for layer in net.layers if layer.param.type == READER_TYPE]
    fallback = "{:06d}".format
    if len(readers) != 1:
        return fallback
    data_param = readers[0].param.image_data_param
    if data_param.shuffle or data_param.rand_skip:
        return fallback
    try:
        entries = read_list(data_param.source, False, readers[0].name)
    except RlossError:
        return fallback
    return lambda k: Path(entries[k % len(entries)].image).stem


def class_names(given: str, net: Net) -> dict[int, str]:
    """--classes, else the classes.txt of the dataset the first list layer reads, else none."""
    if given:
        return read_class_names(Path(given))
    layer = next((layer for layer in net.layers if layer.param.type in LIST_LAYERS), None)
    found = classes_file_of(layer.param.image_data_param) if layer is not None else None
    if found is None:
        return {}
    log.info("Class names from %s", found)
    return read_class_names(found)


# ---- the two ways of scoring --------------------------------------------------------------------

def valid_sizes(net: Net, count: int) -> list[tuple[int, int]]:
    """Per sample, the image size before padding (the `data_dim` blob of DeepLab test nets)."""
    dims = net.blob_data.get("data_dim")
    if dims is None or dims.numel() < 2 * count:
        return []
    values = dims.reshape(-1, 2)[:count].to(torch.int64).tolist()
    return [(int(h), int(w)) for h, w in values]


class CenterCrop:
    """Caffe's scoring: after each forward of the net, its first `samples` scores and labels."""

    def __init__(self, net: Net, score_blob: str, evaluation: Evaluation, samples: int | None):
        self.net, self.score_blob, self.evaluation = net, score_blob, evaluation
        accuracy = accuracy_layer(net)
        bottoms = net.layer_bottoms(accuracy.name) if accuracy is not None else []
        self.label_blob = bottoms[1] if bottoms else ("label" if "label" in net.blob_shapes else "")
        self.left = samples

    def after_forward(self) -> None:
        scores = self.net.blob_data[self.score_blob]
        count = scores.shape[0] if self.left is None else min(self.left, scores.shape[0])
        if self.left is not None:
            self.left -= count
        if count:
            labels = self.net.blob_data[self.label_blob][:count] if self.label_blob else None
            self.evaluation.add(scores[:count], labels, valid_sizes(self.net, count), self.score_blob)


class WholeImages:
    """Whole-image scoring: a test iteration reads the next batch_size images whole (fewer at the
    end of the list) and scores each with rloss.whole_image; the net's data layer is not used."""

    def __init__(self, net: Net, score_blob: str, evaluation: Evaluation, samples: int | None):
        reader = image_reader_param(net.net_param, net.source)
        fed = Net(fed_test_param(net.net_param, net.source), caffe_pb2.TEST, source=net.source).to(net.device)
        fed.precision = net.precision
        fed.share_trained_layers_with(net)
        for layer in net.data_layers():
            getattr(layer, "close", lambda: None)()  # its read-ahead threads: the net's batches are not used
        self.whole = WholeImageNet(fed, reader, score_blob)
        self.score_blob, self.evaluation = score_blob, evaluation
        self.batch_size = int(reader.image_data_param.batch_size)
        self.has_labels = reader.image_data_param.label_type == caffe_pb2.ImageDataParameter.PIXEL
        self.left = samples
        self.tiles = 0
        self.reader = whole_image_reader(reader)

    def __call__(self) -> tuple[float, Outputs]:
        tally = Scores()
        count = self.batch_size if self.left is None else min(self.left, self.batch_size)
        for _ in range(count):
            data, label = self.reader.forward()[:2]
            result = self.whole.run(data[0], label[0, 0], outputs=True)
            labels = label[:, 0] if self.has_labels else None
            self.evaluation.add(result.scores[None], labels, [], self.score_blob)
            tally.add(result.loss, result.outputs)
            self.tiles += result.tiles
        if self.left is not None:
            self.left -= count
        return float(tally.mean_loss()), tally.means()

    def close(self) -> None:
        self.reader.close()


def test(args: argparse.Namespace) -> None:
    """caffe.bin test, then the confusion-matrix summary (module doc)."""
    net = load_model(args, caffe_pb2.TEST)
    for name in filter(None, (w.strip() for w in args.weights.split(","))):
        net.copy_from(str(resolve_input(name)))
    plan = plan_iterations(args.iterations, test_list(net), args.allow_wrap)
    score_blob = prediction_blob(net, args.score_blob)
    readers = sum(layer.param.type == READER_TYPE for layer in net.layers)
    whole = bool(score_blob) and readers == 1 and not args.center_crop
    accuracy = accuracy_layer(net)
    ignore = list(accuracy.param.seg_accuracy_param.ignore_label) if accuracy is not None else [255]
    evaluation = Evaluation(ignore, args.output_dir, sample_names(net), class_names(args.classes, net),
                            "whole_images" if whole else "center_crop")
    whole_images = WholeImages(net, score_blob, evaluation, plan.samples) if whole else None
    center_crop = CenterCrop(net, score_blob, evaluation, plan.samples) if score_blob and not whole else None
    log.info("Running for %d iterations (%s).", plan.iterations,
             "whole images" if whole else "the net's own batches")
    progress = Progress(plan.iterations, "iterations", PROGRESS_SECONDS)

    def after_batch(i: int, outputs: list[tuple[str, float]]) -> None:
        for name, value in outputs:
            log.info("Batch %d, %s = %s", i, name, caffe_float(value))
        if center_crop is not None:
            center_crop.after_forward()
        line = progress.advance()
        if line is not None:
            log.info("Progress: %s", line)

    try:
        scores = score(net, plan.iterations, after_batch, step=whole_images)
    finally:
        if whole_images is not None:
            whole_images.close()
    log.info("Loss: %s", caffe_float(scores.mean_loss()))
    weights = dict(net.loss_top_names())
    for name, mean in scores.means():
        log.info("%s = %s%s", name, caffe_float(mean), loss_suffix(weights.get(name, 0.0), mean))
    if whole_images is not None:
        log.info("Scored %d whole images in %d forward passes", evaluation.samples, whole_images.tiles)
    if not score_blob:
        log.info("No SegAccuracy layer and no --score_blob: no confusion-matrix summary")
    evaluation.report(plan.iterations)
    if args.metrics_json:
        if evaluation.matrix is None:
            log.warning("No labels were scored: --metrics_json=%s is not written", args.metrics_json)
        else:
            evaluation.write_json(args.metrics_json, plan.iterations)
    if evaluation.output_dir is not None:
        log.info("Wrote %d predictions to %s", evaluation.samples, evaluation.output_dir)
