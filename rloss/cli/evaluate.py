"""`python -m rloss test`: caffe.bin test (Batch lines, Loss, per-output means), then a summary from a
confusion matrix accumulated over the whole run (pixel accuracy, mean accuracy, mean IoU), and with
`--output_dir` the predicted label maps as VOC-palette PNGs."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from rloss.caffe_log import caffe_float, caffe_number, loss_suffix
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
from rloss.proto import caffe_pb2
from rloss.scoring import score

log = logging.getLogger("rloss")


class Evaluation:
    """A confusion matrix over the run, from the scores blob (the one feeding the SegAccuracy layer
    unless --score_blob names another) and the label blob, and optional PNGs of the predictions."""

    def __init__(self, net: Net, requested_score_blob: str, output_dir: str):
        self.net = net
        accuracy = accuracy_layer(net)
        bottoms = net.layer_bottoms(accuracy.name) if accuracy is not None else []
        self.score_blob = prediction_blob(net, requested_score_blob)
        self.label_blob = bottoms[1] if bottoms else ("label" if "label" in net.blob_shapes else "")
        self.ignore = list(accuracy.param.seg_accuracy_param.ignore_label) if accuracy is not None else [255]
        self.output_dir = Path(output_dir) if output_dir else None
        if self.output_dir is not None:
            self.output_dir.mkdir(parents=True, exist_ok=True)
        self.names = sample_names(net)
        self.matrix: torch.Tensor | None = None
        self.samples = 0

    @property
    def active(self) -> bool:
        return bool(self.score_blob)

    def add(self) -> None:
        """Count the last forward's predictions; write them if asked."""
        scores = self.net.blob_data[self.score_blob].detach()
        predictions = predict_labels(scores).cpu()
        if self.label_blob:
            self._count(predictions)
        if self.output_dir is not None:
            self._write(predictions)
        self.samples += predictions.shape[0]

    def _count(self, predictions: torch.Tensor) -> None:
        labels = self.net.blob_data[self.label_blob].detach().cpu()
        if labels.shape[-2:] != predictions.shape[-2:] or labels.numel() != predictions.numel():
            raise DataError(f"scores '{self.score_blob}' give predictions of shape {tuple(predictions.shape)}, "
                            f"labels '{self.label_blob}' have shape {tuple(labels.shape)}: choose a score blob "
                            f"of the label's size with --score_blob")
        classes = self.net.blob_data[self.score_blob].shape[1]
        counts = confusion_matrix(labels.reshape(predictions.shape), predictions, classes, self.ignore)
        self.matrix = counts if self.matrix is None else self.matrix + counts

    def _write(self, predictions: torch.Tensor) -> None:
        sizes = self._valid_sizes(predictions.shape[0])
        for n in range(predictions.shape[0]):
            height, width = sizes[n] if sizes else predictions.shape[-2:]
            name = self.names(self.samples + n)
            write_label_png(predictions[n, :height, :width].numpy(), self.output_dir / f"{name}.png")

    def _valid_sizes(self, count: int) -> list[tuple[int, int]]:
        """Per sample, the image size before padding (the `data_dim` blob of DeepLab test nets)."""
        dims = self.net.blob_data.get("data_dim")
        if dims is None or dims.numel() != 2 * count:
            return []
        values = dims.reshape(count, 2).to(torch.int64).tolist()
        return [(int(h), int(w)) for h, w in values]

    def metrics(self) -> dict:
        """The run's metrics from the accumulated confusion matrix (NaN class IoUs as None)."""
        m = self.matrix
        return {
            "pixel_accuracy": float(pixel_accuracy(m)), "mean_accuracy": float(mean_class_accuracy(m)),
            "mean_iou": float(mean_iou(m)), "mean_iou_caffe": float(mean_iou_caffe(m)),
            "class_iou": [None if np.isnan(v) else float(v) for v in class_iou(m).tolist()],
            "samples": self.samples, "labelled_pixels": int(m.sum()),
        }

    def write_json(self, path: str) -> None:
        import json

        Path(path).write_text(json.dumps(self.metrics(), indent=1) + "\n")

    def report(self, iterations: int) -> None:
        if self.matrix is None:
            return
        m = self.matrix
        log.info("Confusion-matrix summary over %d iterations (%d samples, %d labelled pixels, %d classes):",
                 iterations, self.samples, int(m.sum()), m.shape[0])
        log.info("    pixel accuracy = %s", caffe_number(pixel_accuracy(m)))
        log.info("    mean accuracy = %s", caffe_number(mean_class_accuracy(m)))
        log.info("    mean IoU = %s", caffe_number(mean_iou(m)))
        log.info("    mean IoU (SegAccuracy convention, absent classes count 1) = %s",
                 caffe_number(mean_iou_caffe(m)))
        per_class = " ".join("-" if np.isnan(v) else caffe_number(v) for v in class_iou(m).tolist())
        log.info("    class IoU = %s", per_class)


def sample_names(net: Net) -> Callable[[int], str]:
    """Sample k's file name: the image name of line k of the test list (when one unshuffled
    ImageSegData layer reads it), else a zero-padded index."""
    readers = [layer for layer in net.layers if layer.param.type == "ImageSegData"]
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


def test(args: argparse.Namespace) -> None:
    """caffe.bin test, then the confusion-matrix summary."""
    net = load_model(args, caffe_pb2.TEST)
    for name in filter(None, (w.strip() for w in args.weights.split(","))):
        net.copy_from(str(resolve_input(name)))
    evaluation = Evaluation(net, args.score_blob, args.output_dir)
    log.info("Running for %d iterations.", args.iterations)

    def after_batch(i: int, outputs: list[tuple[str, float]]) -> None:
        for name, value in outputs:
            log.info("Batch %d, %s = %s", i, name, caffe_float(value))
        if evaluation.active:
            evaluation.add()

    scores = score(net, args.iterations, after_batch)
    log.info("Loss: %s", caffe_float(scores.mean_loss()))
    weights = dict(net.loss_top_names())
    for name, mean in scores.means():
        log.info("%s = %s%s", name, caffe_float(mean), loss_suffix(weights.get(name, 0.0), mean))
    if not evaluation.active:
        log.info("No SegAccuracy layer and no --score_blob: no confusion-matrix summary")
    evaluation.report(args.iterations)
    if args.metrics_json:
        evaluation.write_json(args.metrics_json)
    if evaluation.output_dir is not None:
        log.info("Wrote %d predictions to %s", evaluation.samples, evaluation.output_dir)
