"""`python -m rloss {train,test,time,device_query,infer} [flags]`: caffe.bin's commands and flags
(`--solver=PATH` and `--solver PATH` both work, as do gflags' single-dash forms), plus `--set VAR=VALUE`.

* `train`: as `caffe.bin train` (see rloss.solve).
* `test`: as `caffe.bin test` (Batch lines, Loss, per-output means), then a summary from a confusion
  matrix accumulated over the whole run (pixel accuracy, mean accuracy, mean IoU), and with
  `--output_dir` the predicted label maps as VOC-palette PNGs.
* `time`: as `caffe.bin time`: average forward and backward milliseconds per layer.
* `infer`: segment one image or a folder with a test net (VOC-palette PNGs, overlays, optional
  DenseCRF post-processing and MatWrite .mat features; see rloss.infer).

Errors in the user's files end with one line `rloss: error: ...` (exit 1); bad flags exit 2.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from rloss.caffe_log import caffe_float, caffe_number
from rloss.data.listfile import read_list
from rloss.errors import DataError, NetError, RlossError
from rloss.infer import add_infer_flags, check_infer_args, infer
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
from rloss.paths import (
    anchors_of,
    parse_assignments,
    resolve_input,
    resolve_net_file,
    resolve_net_paths,
    variable_values,
)
from rloss.proto import caffe_pb2
from rloss.proto.text import read_net
from rloss.solve import add_set_flag, add_train_flags, check_train_args, log_device, run, train
from rloss.solver import build_net, loss_suffix, output_values, parse_gpu_flag

log = logging.getLogger("rloss")


# ---- shared -------------------------------------------------------------------------------------------

def load_model(args: argparse.Namespace, phase: int) -> Net:
    """The --model net for `phase`, with `${VAR}`s expanded, on the --gpu device (CPU by default)."""
    sets = parse_assignments(args.set)
    values, defaults = variable_values(sets, Path(args.model))
    path = resolve_net_file(args.model, [], values, defaults)
    if not path.exists():
        raise NetError(f"model file '{args.model}' does not exist")
    device = parse_gpu_flag(args.gpu) if args.gpu else torch.device("cpu")
    log_device(device)
    net_param = read_net(path, values=values, defaults=defaults)
    for written, used in resolve_net_paths(net_param, anchors_of(path)):
        log.info("Using %s for %s", used, written)
    return build_net(net_param, phase, caffe_pb2.NetState(), str(path)).to(device)


# ---- test ---------------------------------------------------------------------------------------------

class Evaluation:
    """A confusion matrix over the run, from the scores blob (the one feeding the SegAccuracy layer
    unless --score_blob names another) and the label blob, and optional PNGs of the predictions."""

    def __init__(self, net: Net, score_blob: str, output_dir: str):
        self.net = net
        accuracy = next((layer for layer in net.layers if layer.param.type == "SegAccuracy"), None)
        bottoms = net.layer_bottoms(accuracy.name) if accuracy is not None else []
        self.score_blob = score_blob or (bottoms[0] if bottoms else "")
        self.label_blob = bottoms[1] if bottoms else ("label" if "label" in net.blob_shapes else "")
        self.ignore = list(accuracy.param.seg_accuracy_param.ignore_label) if accuracy is not None else [255]
        if self.score_blob and self.score_blob not in net.blob_shapes:
            known = ", ".join(sorted(n for n in net.blob_shapes if not n.startswith("(")))
            raise NetError(f"--score_blob={self.score_blob}: the net has no such blob (blobs: {known})")
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
    sums: list[np.float32] = []
    names: list[str] = []
    loss = np.float32(0)
    with torch.no_grad():
        for i in range(args.iterations):
            loss = np.float32(loss + np.float32(net.forward().item()))
            values = output_values(net)
            for name, value in values:
                log.info("Batch %d, %s = %s", i, name, caffe_float(value))
            sums = [np.float32(v) for _, v in values] if i == 0 else [
                np.float32(s + np.float32(v)) for s, (_, v) in zip(sums, values)]
            names = [name for name, _ in values]
            if evaluation.active:
                evaluation.add()
    count = np.float32(max(1, args.iterations))
    log.info("Loss: %s", caffe_float(loss / count))
    weights = dict(net.loss_top_names())
    for name, total in zip(names, sums):
        mean = np.float32(total / count)
        log.info("%s = %s%s", name, caffe_float(mean), loss_suffix(weights.get(name, 0.0), mean))
    if not evaluation.active:
        log.info("No SegAccuracy layer and no --score_blob: no confusion-matrix summary")
    evaluation.report(args.iterations)
    if args.metrics_json:
        evaluation.write_json(args.metrics_json)
    if evaluation.output_dir is not None:
        log.info("Wrote %d predictions to %s", evaluation.samples, evaluation.output_dir)


# ---- time ---------------------------------------------------------------------------------------------

class LayerTimer:
    """Per-layer forward and backward wall time through module and tensor hooks.

    Forward: between a layer's forward pre-hook and forward hook. Backward: from the moment autograd
    reaches the first of the layer's outputs to the moment the last of its inputs' (or parameters')
    gradients is ready; autograd runs later layers' nodes first, so these windows do not overlap."""

    def __init__(self, net: Net):
        self.net = net
        self.names = [layer.name for layer in net.layers]
        count = len(self.names)
        self.forward_ms = [0.0] * count
        self.backward_ms = [0.0] * count
        self._start = [0.0] * count
        self._events: list[dict[str, list[float]]] = []
        self._param_stamps: list = []
        self._handles = []
        for index, layer in enumerate(net.layers):
            self._handles.append(layer.register_forward_pre_hook(self._pre_hook(index)))
            self._handles.append(layer.register_forward_hook(self._post_hook(index)))

    def _pre_hook(self, index: int):
        def hook(module, inputs):
            self._start[index] = time.perf_counter()
        return hook

    def _post_hook(self, index: int):
        def hook(module, inputs, outputs):
            self.forward_ms[index] += (time.perf_counter() - self._start[index]) * 1e3
            if torch.is_grad_enabled():
                self._watch_backward(index, module, inputs, outputs)
        return hook

    def _watch_backward(self, index: int, module, inputs, outputs) -> None:
        events = self._events[index]

        def stamp(kind: str):
            def hook(grad):
                events[kind].append(time.perf_counter())
            return hook

        for tensor in outputs:
            if isinstance(tensor, torch.Tensor) and tensor.requires_grad:
                tensor.register_hook(stamp("start"))
        for tensor in inputs:
            if isinstance(tensor, torch.Tensor) and tensor.requires_grad and tensor.grad_fn is not None:
                tensor.register_hook(stamp("end"))
        for param in module.blobs:
            if param.requires_grad:
                self._param_stamps.append(param.register_post_accumulate_grad_hook(
                    lambda p, e=events: e["end"].append(time.perf_counter())))

    def begin_iteration(self) -> None:
        self._events = [{"start": [], "end": []} for _ in self.names]
        self._param_stamps = []

    def end_iteration(self) -> None:
        for index, events in enumerate(self._events):
            if events["start"] and events["end"]:
                self.backward_ms[index] += max(0.0, (max(events["end"]) - min(events["start"])) * 1e3)
        for handle in self._param_stamps:
            handle.remove()

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()


def objective(net: Net, loss: torch.Tensor) -> torch.Tensor | None:
    """What to back-propagate: the loss, or for a net without one, zero times its outputs (Caffe's
    time command runs Backward with zero top diffs)."""
    if loss.requires_grad:
        return loss
    outputs = [net.blob_data[name] for name in net.outputs if net.blob_data[name].requires_grad]
    return sum(output.sum() * 0 for output in outputs) if outputs else None


def time_command(args: argparse.Namespace) -> None:
    """caffe.bin time: forward and backward of the TRAIN-phase net, averaged per layer."""
    net = load_model(args, caffe_pb2.TRAIN)
    log.info("Performing Forward")
    loss = net.forward()
    log.info("Initial loss: %s", caffe_float(loss.item()))
    log.info("Performing Backward")
    target = objective(net, loss)
    if target is not None:
        target.backward()
    timer = LayerTimer(net)
    log.info("*** Benchmark begins ***")
    log.info("Testing for %d iterations.", args.iterations)
    forward_total = backward_total = 0.0
    begin = time.perf_counter()
    for j in range(args.iterations):
        for tensor in net.learnable_tensors():
            tensor.grad = None
        timer.begin_iteration()
        start = time.perf_counter()
        loss = net.forward()
        middle = time.perf_counter()
        target = objective(net, loss)
        if target is not None:
            target.backward()
        end = time.perf_counter()
        timer.end_iteration()
        forward_total += (middle - start) * 1e3
        backward_total += (end - middle) * 1e3
        log.info("Iteration: %d forward-backward time: %s ms.", j + 1, caffe_number((end - start) * 1e3))
    total = (time.perf_counter() - begin) * 1e3
    timer.close()
    count = max(1, args.iterations)
    log.info("Average time per layer: ")
    for index, name in enumerate(timer.names):
        log.info("%10s\tforward: %s ms.", name, caffe_number(timer.forward_ms[index] / count))
        log.info("%10s\tbackward: %s ms.", name, caffe_number(timer.backward_ms[index] / count))
    log.info("Average Forward pass: %s ms.", caffe_number(forward_total / count))
    log.info("Average Backward pass: %s ms.", caffe_number(backward_total / count))
    log.info("Average Forward-Backward: %s ms.", caffe_number(total / count))
    log.info("Total Time: %s ms.", caffe_number(total))
    log.info("*** Benchmark ends ***")


def device_query(args: argparse.Namespace) -> None:
    if not torch.cuda.is_available():
        log.info("No CUDA device is available; rloss runs on the CPU")
        return
    for index in range(torch.cuda.device_count()):
        props = torch.cuda.get_device_properties(index)
        log.info("Device id: %d, name: %s, total memory: %d MB", index, props.name, props.total_memory >> 20)


# ---- parsing ------------------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rloss", description="caffe.bin's commands on PyTorch.")
    commands = parser.add_subparsers(dest="command", metavar="{train,test,time,device_query,infer}")
    commands.required = True
    train_parser = commands.add_parser("train", help="train a solver file")
    train_parser.add_argument("--solver", "-solver", default="", help="solver prototxt")
    add_train_flags(train_parser)
    test_parser = commands.add_parser("test", help="score a model with its weights")
    _model_flags(test_parser)
    test_parser.add_argument("--weights", "-weights", default="", help=".caffemodel to score (required)")
    test_parser.add_argument("--output_dir", "-output_dir", default="",
                             help="write the predicted label maps there as VOC-palette PNGs")
    test_parser.add_argument("--metrics_json", "-metrics_json", default="",
                             help="also write the metrics (pixel accuracy, mean IoU, ...) to this JSON file")
    test_parser.add_argument("--score_blob", "-score_blob", default="",
                             help="blob whose channel argmax is the prediction (default: SegAccuracy's scores)")
    time_parser = commands.add_parser("time", help="per-layer forward/backward timing")
    _model_flags(time_parser)
    commands.add_parser("device_query", help="list CUDA devices")
    infer_parser = commands.add_parser("infer", help="segment images with a test net and its weights")
    add_infer_flags(infer_parser)
    add_set_flag(infer_parser)
    return parser


def _model_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", "-model", default="", help="net prototxt")
    parser.add_argument("--iterations", "-iterations", type=int, default=50, help="forward passes (default 50)")
    parser.add_argument("--gpu", "-gpu", default="", help="CUDA device id; empty: the CPU")
    add_set_flag(parser)


def infer_command(args: argparse.Namespace) -> None:
    infer(args)


COMMANDS: dict[str, Callable[[argparse.Namespace], None]] = {
    "train": train, "test": test, "time": time_command, "device_query": device_query, "infer": infer_command,
}


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "train":
        check_train_args(parser, args)
    elif args.command == "infer":
        check_infer_args(parser, args)
    elif args.command in ("test", "time"):
        if not args.model:
            parser.error(f"{args.command} needs a net: --model=NET.prototxt")
        if args.iterations < 0:
            parser.error(f"--iterations must be >= 0, got {args.iterations}")
        if args.command == "test" and not args.weights:
            parser.error("test needs model weights to score: --weights=MODEL.caffemodel")
    return run(COMMANDS[args.command], args)


if __name__ == "__main__":
    sys.exit(main())
