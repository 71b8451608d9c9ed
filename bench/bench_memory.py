"""Peak memory of training the original MSc-LargeFOV phase-2 net (trainwithdensecrfloss, crop 321) at a
few batch sizes, in fp32, with activation checkpointing and under bf16, measured against rloss.memory's
estimate of each.

    python bench/bench_memory.py [--batch 4 8] [--iterations 2] [--threads 2] [--json FILE]

Each figure comes from a fresh child process: the measurement is the child's peak resident set
(`resource.getrusage(RUSAGE_SELF).ru_maxrss`) over `--iterations` solver iterations (the second runs
beside what the first left, as all later ones do), and the RSS the child had after importing torch and
rloss (libraries, not the net), which the estimate leaves out. The estimate, `estimate_training_peak`,
runs first, in another fresh child (its trials must neither raise the measured peak nor find the
DenseCRF lattices of an earlier run), with the memory check's verdict on it (`check_estimate`): a
configuration the check refuses on this machine is not run. The data are a synthetic scribble dataset
of 353x353 images written to a temporary folder, read by the file's ImageSegData layer (random crops
to 321).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "exper" / "pascal_scribble" / "config" / "deeplab_msc_largeFOV"
VARIANTS = {"fp32": {}, "fp32 + checkpointing": {"checkpoint_activations": True}, "bf16": {"precision": "bf16"}}
IMAGE_SIZE = 353
GB = 1e9


def make_solver(data_root: Path, batch: int):
    """The phase-2 solver on the file's train net at `batch`, weights drawn at random (the file's
    convolutions expect an init model), nothing written."""
    from rloss.proto import caffe_pb2
    from rloss.proto.text import read_net, read_solver
    from rloss.solver import Solver

    values = {"NUM_LABELS": "21", "DENSECRF_LOSS_WEIGHT": "2e-9", "DATA_ROOT": f"{data_root}/",
              "EXP": "pascal_scribble", "TRAIN_SET": "train", "NET_ID": "deeplab_msc_largeFOV"}
    param = read_solver(CONFIG / "solverwithdensecrfloss.prototxt", values)
    net = read_net(CONFIG / "trainwithdensecrfloss.prototxt", values=values)
    for layer in net.layer:
        if layer.type == "ImageSegData":
            layer.image_data_param.batch_size = batch
    param.ClearField("train_net")
    param.train_net_param.CopyFrom(net)
    param.snapshot, param.display, param.snapshot_after_train = 0, 0, False
    param.solver_mode = caffe_pb2.SolverParameter.CPU
    solver = Solver(param, values)
    with torch.no_grad():
        for entry in solver.net.learnable:
            entry.tensor.normal_(0, 0.01)
    return solver


def max_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def child(mode: str, data_root: Path, batch: int, variant: str, iterations: int) -> dict:
    """In this fresh process: the estimate and the memory check's verdict on it ("estimate"), or the
    peak RSS of training ("measure")."""
    import rloss.net  # noqa: F401  (the libraries the baseline counts)
    from rloss.errors import MemoryPlanError
    from rloss.memory import check_estimate, estimate_training_peak

    baseline = max_rss()
    os.chdir(data_root.parent)  # the file's list path, pascal_scribble/list/train.txt, is relative
    solver = make_solver(data_root, batch)
    for name, value in VARIANTS[variant].items():
        setattr(solver.net, name, value)
    start = time.perf_counter()
    if mode == "estimate":
        estimate = estimate_training_peak(solver.net)
        seconds = time.perf_counter() - start
        try:
            check_estimate(estimate, f"batch {batch} {variant}")
            refused = ""
        except MemoryPlanError as error:
            refused = str(error)
        return {"bytes": estimate.total, "described": estimate.describe(), "seconds": seconds,
                "refused": refused}
    solver.step(iterations)
    return {"peak": max_rss(), "baseline": baseline,
            "seconds_per_iteration": (time.perf_counter() - start) / iterations}


def run_child(mode: str, data_root: Path, batch: int, variant: str, args: argparse.Namespace) -> dict:
    command = [sys.executable, __file__, "--child", mode, "--data", str(data_root), "--batch", str(batch),
               "--variant", variant, "--iterations", str(args.iterations), "--threads", str(args.threads)]
    environment = {**os.environ, "RLOSS_SKIP_MEMORY_CHECK": "1"}  # the solver's own check would run trials
    done = subprocess.run(command, capture_output=True, text=True, cwd=REPO, env=environment)
    if done.returncode != 0:
        raise SystemExit(f"{mode} of batch {batch} {variant} failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def write_data(folder: Path, count: int) -> Path:
    """A synthetic dataset under folder/pascal_scribble (also where the file's list path points)."""
    from rloss.data.synthetic import write_dataset

    root = folder / "pascal_scribble"
    write_dataset(root, train=count, val=0, height=IMAGE_SIZE, width=IMAGE_SIZE, num_classes=6)
    return root


def row(batch: int, variant: str, measured: dict, estimated: dict) -> str:
    start = f"{batch:5d}  {variant:22}"
    if estimated["refused"]:
        return f"{start} {'refused':>10} {'':>12} {estimated['bytes'] / GB:10.2f}   (the memory check refused it)"
    net_peak = measured["peak"] - measured["baseline"]
    return (f"{start} {measured['peak'] / GB:10.2f} {net_peak / GB:12.2f} {estimated['bytes'] / GB:10.2f} "
            f"{estimated['bytes'] / net_peak:8.2f} {measured['seconds_per_iteration']:6.1f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, nargs="+", default=[4, 8])
    parser.add_argument("--iterations", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--json", default="", help="also write the figures to this file")
    parser.add_argument("--child", choices=("measure", "estimate"), help=argparse.SUPPRESS)
    parser.add_argument("--data", default="", help=argparse.SUPPRESS)
    parser.add_argument("--variant", default="fp32", help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.child:
        print(json.dumps(child(args.child, Path(args.data), args.batch[0], args.variant, args.iterations)))
        return
    results = []
    with tempfile.TemporaryDirectory(prefix="rloss_bench_memory_") as folder:
        data_root = write_data(Path(folder), max(args.batch) * args.iterations)
        print(f"MSc-LargeFOV trainwithdensecrfloss, crop 321, {args.iterations} solver iterations, "
              f"{args.threads} threads")
        print(f"{'batch':>5}  {'variant':22} {'max RSS GB':>10} {'- baseline':>12} {'estimate':>10} "
              f"{'est/meas':>8} {'s/it':>6}")
        for batch in args.batch:
            for variant in args.variants:
                estimated = run_child("estimate", data_root, batch, variant, args)
                measured = run_child("measure", data_root, batch, variant, args) \
                    if not estimated["refused"] else {}
                print(row(batch, variant, measured, estimated), flush=True)
                results.append({"batch": batch, "variant": variant, "measured": measured, "estimated": estimated})
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
