"""`python -m rloss.solve SOLVER [--weights W[,W2]] [--snapshot S] [--set VAR=VALUE ...] [--gpu ID]`:
train one solver file, as `caffe.bin train --solver=SOLVER` does."""

from __future__ import annotations

import argparse
import logging
from typing import Sequence

from rloss.cli.common import add_set_flag, log_device, run
from rloss.device import parse_gpu_flag
from rloss.solver import SGDSolver
from rloss.variables import parse_assignments

log = logging.getLogger("rloss")


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


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m rloss.solve",
                                     description="Train a Caffe solver file (caffe.bin train).")
    parser.add_argument("solver", help="solver prototxt")
    add_train_flags(parser)
    args = parser.parse_args(argv)
    check_train_args(parser, args)
    return run(train, args)

