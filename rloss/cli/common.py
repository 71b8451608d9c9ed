"""What every command line shares: `--set`, `--precision`, `--checkpoint_activations`, loading the
--model net, the device line of the log, and the rule that rloss errors end the program with one line
`rloss: error: ...` and exit code 1."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Callable, Mapping

import torch

from rloss.caffe_log import setup_logging
from rloss.device import parse_gpu_flag
from rloss.errors import NetError, RlossError
from rloss.layers import Layer
from rloss.net import Net
from rloss.paths import anchors_of, resolve_net_file
from rloss.precision import PRECISIONS, check_precision
from rloss.proto import caffe_pb2
from rloss.proto.text import read_net
from rloss.solver_files import build_net, located
from rloss.variables import parse_assignments, variable_values

log = logging.getLogger("rloss")


def add_set_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--set", "-set", action="append", default=[], metavar="VAR=VALUE",
                        help="value of a ${VAR} placeholder in the prototxt files (repeatable); taken before "
                             "the environment and the run script's defaults")


def add_precision_flag(parser: argparse.ArgumentParser) -> None:
    # no argparse choices: an unknown name is a PrecisionError (one line, exit 1) like a device's refusal
    parser.add_argument("--precision", "-precision", default="fp32", metavar="{" + ",".join(PRECISIONS) + "}",
                        help="what the layers compute in: fp32 (default), or bf16/fp16 under torch.autocast "
                             "(weights, losses, accuracies and outputs stay float32; fp16 is for CUDA GPUs)")


def add_checkpoint_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint_activations", "--checkpoint-activations", "-checkpoint_activations",
                        action="store_true",
                        help="keep only the blobs at segment boundaries for backward and recompute the rest "
                             "(less memory, about one more forward per iteration; gradients unchanged)")


def read_model(model: str, sets: Mapping[str, str], phase: int | None = None) -> tuple[Path, caffe_pb2.NetParameter]:
    """The --model file (found as rloss.paths says, its sed template too) and its net, with `${VAR}`s
    from --set, the environment and the run script's defaults; filtered for `phase` when given."""
    values, defaults = variable_values(sets, Path(model))
    path = resolve_net_file(model, [], values, defaults)
    if not path.exists():
        raise NetError(f"model file '{model}' does not exist")
    return path, read_net(path, phase, values=values, defaults=defaults)


def load_model(args: argparse.Namespace, phase: int) -> Net:
    """The --model net for `phase`, its input paths located, on the --gpu device (CPU by default), in
    --precision (checked before the net is built), with --checkpoint_activations."""
    device = parse_gpu_flag(args.gpu) if args.gpu else torch.device("cpu")
    check_precision(args.precision, device)
    path, net_param = read_model(args.model, parse_assignments(args.set))
    log_device(device)
    net_param = located(net_param, anchors_of(path))
    net = build_net(net_param, phase, caffe_pb2.NetState(), str(path)).to(device)
    net.precision = args.precision
    net.checkpoint_activations = args.checkpoint_activations
    return net


def accuracy_layer(net: Net) -> Layer | None:
    """The net's first SegAccuracy layer: its bottoms name the scores and the labels it evaluates."""
    return next((layer for layer in net.layers if layer.param.type == "SegAccuracy"), None)


def prediction_blob(net: Net, requested: str) -> str:
    """The blob whose channel argmax is the prediction: --score_blob (which must exist), else the
    scores the SegAccuracy layer reads, else '' (the net names none)."""
    if requested:
        if requested not in net.blob_shapes:
            known = ", ".join(sorted(n for n in net.blob_shapes if not n.startswith("(")))
            raise NetError(f"--score_blob={requested}: the net has no blob '{requested}' (blobs: {known})")
        return requested
    accuracy = accuracy_layer(net)
    return net.layer_bottoms(accuracy.name)[0] if accuracy is not None else ""


def log_device(device: torch.device) -> None:
    if device.type == "cuda":
        log.info("Use GPU with device ID %d", device.index or 0)
    else:
        log.info("Use CPU.")


def run(command: Callable[[argparse.Namespace], None], args: argparse.Namespace) -> int:
    """Run a command with the glog-style log on stderr; an rloss error (or an OS error on a user's
    file) becomes one line `rloss: error: ...` and exit code 1."""
    setup_logging()
    try:
        command(args)
    except RlossError as error:
        print(f"rloss: error: {error}", file=sys.stderr)
        return 1
    except OSError as error:
        print(f"rloss: error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("rloss: interrupted", file=sys.stderr)
        return 130
    return 0
