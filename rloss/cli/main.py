"""`python -m rloss {train,test,time,device_query,infer,plot,data,upgrade,draw} [flags]`: caffe.bin's commands and flags
(`--solver=PATH` and `--solver PATH` both work, as do gflags' single-dash forms), plus `--set VAR=VALUE`.

* `train`: as `caffe.bin train` (see rloss.cli.train).
* `test`: as `caffe.bin test` (Batch lines, Loss, per-output means), then a summary from a confusion
  matrix accumulated over the whole run (pixel accuracy, mean accuracy, mean IoU), and with
  `--output_dir` the predicted label maps as VOC-palette PNGs.
* `time`: as `caffe.bin time`: average forward and backward milliseconds per layer.
* `infer`: segment one image or a folder with a test net (VOC-palette PNGs, overlays, optional
  DenseCRF post-processing and MatWrite .mat features; see rloss.cli.infer).
* `plot`: training curves of our logs and caffe.bin's as a figure, and a CSV (see rloss.cli.plot).
* `data`: prepare, check and make one's own datasets (prepare, check, scribbles, scribblesup; see rloss.cli.data).
* `upgrade IN OUT`: an old net, solver or .caffemodel in the V2 form (see rloss.cli.upgrade).
* `draw NET OUT`: a picture of the net, as Caffe's draw_net.py (see rloss.cli.draw).

`test`, `time` and `infer` take `--precision {fp32,bf16,fp16}` (rloss.precision), `test` and `time`
`--checkpoint_activations`.

Errors in the user's files end with one line `rloss: error: ...` (exit 1); bad flags exit 2.
"""

from __future__ import annotations

import argparse
import sys
from typing import Callable, Sequence

from rloss.cli.common import add_checkpoint_flag, add_precision_flag, add_set_flag, run
from rloss.cli.data import add_data_parser, data
from rloss.cli.draw import add_draw_flags, draw
from rloss.cli.evaluate import ITERATIONS_HELP, add_test_flags, test
from rloss.cli.infer import add_infer_flags, check_infer_args, infer
from rloss.cli.plot import add_plot_flags, plot
from rloss.cli.timing import device_query, time_command
from rloss.cli.train import add_train_flags, check_train_args, train
from rloss.cli.upgrade import add_upgrade_flags, upgrade


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rloss", description="caffe.bin's commands on PyTorch.")
    commands = parser.add_subparsers(dest="command",
                                     metavar="{train,test,time,device_query,infer,plot,data,upgrade,draw}")
    commands.required = True
    train_parser = commands.add_parser("train", help="train a solver file")
    train_parser.add_argument("--solver", "-solver", default="", help="solver prototxt")
    add_train_flags(train_parser)
    test_parser = commands.add_parser("test", help="score a model with its weights")
    _model_flags(test_parser, None, ITERATIONS_HELP)
    add_test_flags(test_parser)
    time_parser = commands.add_parser("time", help="per-layer forward/backward timing")
    _model_flags(time_parser)
    commands.add_parser("device_query", help="list CUDA devices")
    infer_parser = commands.add_parser("infer", help="segment images with a test net and its weights")
    add_infer_flags(infer_parser)
    add_set_flag(infer_parser)
    add_plot_flags(commands.add_parser("plot", help="draw training curves of logs (and write them as CSV)"))
    add_data_parser(commands)
    add_upgrade_flags(commands.add_parser("upgrade", help="write an old net, solver or model in the V2 form"))
    add_draw_flags(commands.add_parser("draw", help="draw a net's layers and blobs (Graphviz, or DOT text)"))
    return parser


def _model_flags(parser: argparse.ArgumentParser, iterations: int | None = 50,
                 iterations_help: str = "forward passes (default 50)") -> None:
    parser.add_argument("--model", "-model", default="", help="net prototxt")
    parser.add_argument("--iterations", "-iterations", type=int, default=iterations, help=iterations_help)
    parser.add_argument("--gpu", "-gpu", default="", help="CUDA device id; empty: the CPU")
    add_precision_flag(parser)
    add_checkpoint_flag(parser)
    add_set_flag(parser)


def infer_command(args: argparse.Namespace) -> None:
    infer(args)


COMMANDS: dict[str, Callable[[argparse.Namespace], None]] = {
    "train": train, "test": test, "time": time_command, "device_query": device_query, "infer": infer_command,
    "plot": plot, "data": data, "upgrade": upgrade, "draw": draw,
}


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "train":
        check_train_args(parser, args)
        args.relaunch = ("rloss", list(sys.argv[1:] if argv is None else argv))
    elif args.command == "infer":
        check_infer_args(parser, args)
    elif args.command in ("test", "time"):
        if not args.model:
            parser.error(f"{args.command} needs a net: --model=NET.prototxt")
        if args.iterations is not None and args.iterations < 0:
            parser.error(f"--iterations must be >= 0, got {args.iterations}")
        if args.command == "test" and not args.weights:
            parser.error("test needs model weights to score: --weights=MODEL.caffemodel")
    return run(COMMANDS[args.command], args)
