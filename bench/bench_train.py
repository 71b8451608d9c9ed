"""Training speed of DeepLab-LargeFOV (our exper/ files) at crop 321, batch 2, with and without the
DenseCRF loss, on real images (../shared/data/msrc21): seconds per solver iteration, the share of an
iteration spent waiting for data, and the share spent in the DenseCRF loss layer (forward + backward).

    python bench/bench_train.py [--iterations 5] [--batch 2] [--threads 2]

The original Caffe on this machine (../shared/golden/04_timing, `caffe time`, forward + backward
only): train 25.1 s/it, trainwithdensecrfloss 30.4 s/it at batch 2; printed for reference.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch

from rloss.proto.text import read_net, read_solver
from rloss.solver import Solver

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("RLOSS_SHARED", REPO.parent / "shared"))
CONFIG = REPO / "exper" / "pascal_scribble" / "config" / "deeplab_largeFOV"


class LayerClock:
    """Wall time spent in one layer's forward and backward: module hooks time the forward, gradient
    hooks on its tops and bottoms the backward (from the tops' gradient to the bottoms')."""

    def __init__(self, layer: torch.nn.Module):
        self.seconds = 0.0
        self._start = 0.0
        layer.register_forward_pre_hook(self._forward_begins)
        layer.register_forward_hook(self._forward_ends)

    def _begin(self, *args) -> None:
        self._start = time.perf_counter()

    def _end(self, *args) -> None:
        self.seconds += time.perf_counter() - self._start

    def _forward_begins(self, layer, bottoms) -> None:
        self._begin()
        for bottom in bottoms:
            if bottom.requires_grad:
                bottom.register_hook(self._end)

    def _forward_ends(self, layer, bottoms, tops) -> None:
        self._end()
        for top in tops:
            if top.requires_grad:
                top.register_hook(self._begin)


def make_solver(kind: str, workdir: Path, batch: int) -> Solver:
    values = {"NUM_LABELS": "21", "DENSECRF_LOSS_WEIGHT": "1e-8", "DATA_ROOT": f"{SHARED / 'data' / 'msrc21'}/",
              "EXP": "pascal_scribble", "TRAIN_SET": "train", "NET_ID": "deeplab_largeFOV"}
    solver_file = "solver" if kind == "train" else "solverwithdensecrfloss"
    param = read_solver(CONFIG / f"{solver_file}.prototxt", values)
    net = read_net(CONFIG / f"{kind}.prototxt", values=values)
    for layer in net.layer:
        if layer.type == "ImageSegData":
            layer.image_data_param.batch_size = batch
    param.ClearField("train_net")
    param.train_net_param.CopyFrom(net)
    param.snapshot = 0
    param.display = 0
    param.max_iter = 10**6
    param.snapshot_prefix = str(workdir / "snap")
    solver = Solver(param, values)
    with torch.no_grad():
        for entry in solver.net.learnable:  # the file's convolutions have no fillers (they expect an init model)
            entry.tensor.normal_(0, 0.01)
    return solver


def measure(kind: str, workdir: Path, batch: int, iterations: int) -> dict:
    solver = make_solver(kind, workdir, batch)
    data = next(layer for layer in solver.net.layers if layer.type_name == "ImageSegData")
    crf = [LayerClock(layer) for layer in solver.net.layers if layer.type_name == "DenseCRFLoss"]
    solver.step(1)  # warm-up
    times, waits, crf_times = [], [], []
    for _ in range(iterations):
        wait0, crf0 = data.data_wait_seconds, sum(c.seconds for c in crf)
        start = time.perf_counter()
        solver.step(1)
        times.append(time.perf_counter() - start)
        waits.append(data.data_wait_seconds - wait0)
        crf_times.append(sum(c.seconds for c in crf) - crf0)
    total = sum(times)
    return {"s_per_iter": statistics.median(times), "data_wait_share": sum(waits) / total,
            "densecrf_share": sum(crf_times) / total, "densecrf_s_per_iter": statistics.median(crf_times)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=5)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", default="", help="also write the figures to this file")
    args = parser.parse_args()
    if not (SHARED / "data" / "msrc21").is_dir():
        raise SystemExit(f"{SHARED / 'data' / 'msrc21'} is absent: this benchmark trains on real images")
    torch.set_num_threads(args.threads)
    workdir = Path(tempfile.mkdtemp(prefix="rloss_bench_"))
    lists = workdir / "pascal_scribble" / "list"
    lists.mkdir(parents=True)
    shutil.copy(SHARED / "data" / "msrc21" / "list" / "train.txt", lists / "train.txt")
    os.chdir(workdir)  # the experiment files name their lists relative to exper/, as the original did
    results = {kind: measure(kind, workdir, args.batch, args.iterations) for kind in ("train", "trainwithdensecrfloss")}
    caffe = {"train": 25.081, "trainwithdensecrfloss": 30.375}
    print(f"DeepLab-LargeFOV, crop 321, batch {args.batch}, {args.threads} threads, median of {args.iterations} "
          "solver iterations")
    print(f"{'net':24} {'s/it':>7} {'data wait':>10} {'DenseCRF':>9} {'Caffe fwd+bwd s/it':>19}")
    for kind, r in results.items():
        print(f"{kind:24} {r['s_per_iter']:7.2f} {100 * r['data_wait_share']:9.1f}% "
              f"{100 * r['densecrf_share']:8.1f}% {caffe[kind]:19.1f}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
