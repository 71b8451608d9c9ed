"""`python -m rloss.solve SOLVER [--weights W[,W2]] [--snapshot S] [--set VAR=VALUE ...] [--gpu ID]`:
train one solver file, as `caffe.bin train --solver=SOLVER` does.

Also home of the pieces both command lines share: the `train` command, `--set`/`--gpu` handling,
and the rule that rloss errors end the program with one line `rloss: error: ...` and exit code 1.
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Callable, Sequence

import torch

from rloss.caffe_log import setup_logging
from rloss.errors import RlossError
from rloss.paths import parse_assignments
from rloss.solver import SGDSolver, parse_gpu_flag

log = logging.getLogger("rloss")


def add_set_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--set", "-set", action="append", default=[], metavar="VAR=VALUE",
                        help="value of a ${VAR} placeholder in the prototxt files (repeatable); taken before "
                             "the environment and the run script's defaults")


def add_train_flags(parser: argparse.ArgumentParser) -> None:
    """caffe.bin train's flags other than --solver."""
    parser.add_argument("--weights", "-weights", default="",
                        help="comma-separated .caffemodel files to initialise from (by layer name)")
    parser.add_argument("--snapshot", "-snapshot", default="", help=".solverstate to resume training from")
    parser.add_argument("--gpu", "-gpu", default="",
                        help="CUDA device id (or 'all'); empty: the solver's solver_mode/device_id")
    parser.add_argument("--sigint_effect", "-sigint_effect", default="stop", choices=("stop", "snapshot", "none"),
                        help="what Ctrl-C does: stop (after a final snapshot), snapshot, or none")
    parser.add_argument("--sighup_effect", "-sighup_effect", default="snapshot",
                        choices=("stop", "snapshot", "none"), help="what SIGHUP does")
    add_set_flag(parser)


def train(args: argparse.Namespace) -> None:
    """caffe.bin train: build the solver, resume or load weights, solve."""
    device = parse_gpu_flag(args.gpu) if args.gpu else None
    solver = SGDSolver(args.solver, values=parse_assignments(args.set), device=device,
                       sigint_effect=args.sigint_effect, sighup_effect=args.sighup_effect)
    log_device(solver.device)
    if args.snapshot:
        log.info("Resuming from %s", args.snapshot)
        solver.restore(args.snapshot)
    elif args.weights:
        solver.copy_weights(args.weights)
    log.info("Starting Optimization")
    solver.solve()
    log.info("Optimization Done.")


def check_train_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if not args.solver:
        parser.error("train needs a solver: --solver=SOLVER.prototxt")
    if args.snapshot and args.weights:
        parser.error("give --snapshot to resume training or --weights to finetune, not both")


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


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m rloss.solve",
                                     description="Train a Caffe solver file (caffe.bin train).")
    parser.add_argument("solver", help="solver prototxt")
    add_train_flags(parser)
    args = parser.parse_args(argv)
    check_train_args(parser, args)
    return run(train, args)


if __name__ == "__main__":
    sys.exit(main())
