"""`python -m rloss.solve SOLVER [--weights W[,W2]] [--snapshot S] [--set VAR=VALUE ...] [--gpu IDS]`:
train one solver file, as `caffe.bin train --solver=SOLVER` does.

`--gpu=0,1` (or `all`) trains data-parallel, one rank per GPU, as caffe.bin does; under torchrun the
command is one rank of the job (rloss.distributed)."""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Sequence

from rloss import distributed
from rloss.cli.common import add_checkpoint_flag, add_precision_flag, add_set_flag, log_device, run
from rloss.device import cuda_or_cpu, parse_gpu_ids
from rloss.errors import DistributedError, RlossError
from rloss.solver import Solver
from rloss.tensorboard_log import attach_tensorboard
from rloss.variables import parse_assignments

log = logging.getLogger("rloss")


def add_train_flags(parser: argparse.ArgumentParser) -> None:
    """caffe.bin train's flags other than --solver."""
    parser.add_argument("--weights", "-weights", default="",
                        help="comma-separated .caffemodel files to initialise from (by layer name)")
    parser.add_argument("--snapshot", "-snapshot", default="", help=".solverstate to resume training from")
    parser.add_argument("--gpu", "-gpu", default="",
                        help="CUDA device ids, comma-separated (several: one data-parallel rank each), or "
                             "'all'; empty: the solver's solver_mode/device_id")
    add_precision_flag(parser)
    add_checkpoint_flag(parser)
    parser.add_argument("--tensorboard", "-tensorboard", default="", metavar="DIR",
                        help="also write the loss, lr and test outputs as TensorBoard scalars to DIR "
                             "(pip install tensorboard)")
    parser.add_argument("--threads", "-threads", type=int, default=None,
                        help="CPU threads of this process (torch and the DenseCRF lattice); default: torch's, "
                             "or the machine's cores shared among its ranks")
    parser.add_argument("--sigint_effect", "-sigint_effect", default="stop", choices=("stop", "snapshot", "none"),
                        help="what Ctrl-C does: stop (after a final snapshot), snapshot, or none")
    parser.add_argument("--sighup_effect", "-sighup_effect", default="snapshot",
                        choices=("stop", "snapshot", "none"), help="what SIGHUP does")
    add_set_flag(parser)


def train(args: argparse.Namespace) -> None:
    """caffe.bin train: build the solver, resume or load weights, solve; with several --gpu ids,
    start one rank per device running this same command."""
    gpu_ids = parse_gpu_ids(args.gpu) if args.gpu else []
    ranks = distributed.environment_ranks()
    if len(gpu_ids) > 1 and ranks.size == 1:
        module, argv = args.relaunch
        distributed.launch(len(gpu_ids), module, argv)
        return
    distributed.start(ranks)
    try:
        _train_rank(args, gpu_ids, ranks)
        distributed.finish()
    except RlossError as error:
        distributed.report_failure(str(error))
        if ranks.size > 1 and not str(error).startswith("rank "):
            raise DistributedError(f"rank {ranks.rank}: {error}") from None
        raise
    finally:
        distributed.stop()


def _train_rank(args: argparse.Namespace, gpu_ids: list[int], ranks: distributed.Ranks) -> None:
    """The training of one rank (the only one outside a data-parallel job)."""
    if not ranks.is_root:
        log.setLevel(logging.ERROR)  # one log: rank 0's (the others print only their errors)
    detach = attach_tensorboard(args.tensorboard) if args.tensorboard and ranks.is_root else None
    try:
        _solve(args, gpu_ids, ranks)
    finally:
        if detach is not None:
            detach()


def _solve(args: argparse.Namespace, gpu_ids: list[int], ranks: distributed.Ranks) -> None:
    """Build the rank's solver on its device, resume or load weights, solve."""
    threads = distributed.share_threads(ranks, args.threads)
    device = None
    if gpu_ids:
        device = cuda_or_cpu(distributed.rank_gpu(gpu_ids, ranks) if ranks.size > 1 else gpu_ids[0])
    solver = Solver(args.solver, values=parse_assignments(args.set), device=device,
                       sigint_effect=args.sigint_effect, sighup_effect=args.sighup_effect,
                       precision=args.precision, checkpoint_activations=args.checkpoint_activations)
    log_device(solver.device)
    if ranks.size > 1:
        log.info("Rank %d of %d, %d thread%s per rank", ranks.rank, ranks.size, threads, "s" if threads > 1 else "")
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
    args.relaunch = ("rloss.solve", list(sys.argv[1:] if argv is None else argv))
    return run(train, args)

