"""Smoke runs of the four pascal_scribble experiments, unchanged files, on this machine (a benchmark
script, not a CI test: it takes tens of minutes on 2 CPU cores).

    python bench/smoke_experiments.py [--iter N] [--nets deeplab_largeFOV,...] [--sources generated,original]

For each network (deeplab_largeFOV, deeplab_msc_largeFOV, deeplab_vgg16, resnet-101, in that order:
ResNet last) and each source of files, our generated `exper/pascal_scribble/config/<net>/` and the
original files in `../shared/reference/rloss-exper/exper/pascal_scribble/config/<net>/` (used as they
are, through their paths), it runs the phases of the original run script on MSRC-21
(`../shared/data/msrc21`, DATA_ROOT), with NUM_LABELS=21 and the script's defaults for the other
variables (EXP=pascal_scribble, TRAIN_SET=train, TEST_SET=val, DENSECRF_LOSS_WEIGHT=1e-8):

1. `solver.prototxt` (partial cross-entropy) from the nets' fillers (the ImageNet init models are not
   here), then a snapshot;
2. `solverwithdensecrfloss.prototxt` (+ DenseCRF loss) from the phase-1 snapshot (for msc_largeFOV the
   original took the largeFOV phase-2 model instead; here every net continues from its own phase 1);
3. `python -m rloss test --model test.prototxt --weights <phase-2 snapshot> --iterations 2`.

The working directory is a temporary `exper/` whose `pascal_scribble/list/{train,val}.txt` are copies of
MSRC-21's lists, so the files' `${EXP}/list/${TRAIN_SET}.txt` read MSRC-21 (the net and solver files
themselves are found through rloss.paths' rules: the `_train`/`_val` names fall back to the templates).
Batch sizes and crops are the files' (20/30/10/1 x 321, test 1 x 513).

The solver files say max_iter 9000-20000; to stop after a few iterations without editing them, the
training phases use the Python API (`rloss.solver.Solver(file)`, `copy_weights`, `step(1)` N times,
then `snapshot()`), each phase in a worker process; N is 2 by default, and 1 for ResNet-101, whose
iterations are 10 forward/backward passes each (iter_size 10, three scales). Seconds per iteration are
the mean over the iterations after the first (the first also starts the data loaders), or the only
iteration when there is one. The test phase is the `test` command line itself; its speed is the time
of the second test image's forward pass (between the log's time stamps).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("RLOSS_SHARED", REPO.parent / "shared"))
DATA_ROOT = SHARED / "data" / "msrc21"
SOURCES = {
    "generated": REPO / "exper" / "pascal_scribble" / "config",
    "original": SHARED / "reference" / "rloss-exper" / "exper" / "pascal_scribble" / "config",
}
NETS = ("deeplab_largeFOV", "deeplab_msc_largeFOV", "deeplab_vgg16", "resnet-101")
DEFAULT_ITERATIONS = {"resnet-101": 1}  # the others: 2
TEST_ITERATIONS = 2
LISTS = ("train.txt", "val.txt", "train_id.txt", "val_id.txt")


# ---- the worker: one training phase -----------------------------------------------------------------

def train_phase(solver_file: str, weights: str, iterations: int, variables: dict, result_file: str) -> None:
    """Build the solver of an unchanged file, load `weights`, take `iterations` steps, snapshot, and
    write what happened as JSON."""
    from rloss.caffe_log import setup_logging
    from rloss.io import read_net_param
    from rloss.proto.blob import blob_to_array
    from rloss.solver import Solver

    setup_logging()
    solver = Solver(solver_file, values=variables)
    loaded = 0
    if weights:
        solver.copy_weights(weights)
        loaded = _layers_equal_to(solver.net, read_net_param(weights), blob_to_array)
    seconds, losses, crf_losses = [], [], []
    for _ in range(iterations):
        start = time.perf_counter()
        solver.step(1)
        seconds.append(time.perf_counter() - start)
        losses.append(solver.smoothed_loss)
        crf = solver.net.blob_data.get("densecrf_loss")
        crf_losses.append(None if crf is None else float(crf.detach().reshape(-1)[0]))
    solver.snapshot()
    Path(result_file).write_text(json.dumps({
        "seconds": seconds, "losses": losses, "densecrf_losses": crf_losses, "weights_layers_loaded": loaded,
        "snapshot": str(Path(solver.snapshot_name(".caffemodel")).resolve()),
        "batch": list(solver.net.blob_shapes["data"]), "iter_size": solver.param.iter_size,
    }))


def _layers_equal_to(net, source, blob_to_array) -> int:
    """How many layers of the net hold exactly the weights the file gives them (checks the copy)."""
    import numpy as np

    by_name = {layer.name: layer for layer in net.layers}
    equal = 0
    for layer in source.layer:
        target = by_name.get(layer.name)
        if target is None or not len(layer.blobs):
            continue
        pairs = zip(layer.blobs, target.blobs)
        if all(np.array_equal(blob_to_array(blob, layer.name).reshape(-1), param.detach().cpu().numpy().reshape(-1))
               for blob, param in pairs):
            equal += 1
    return equal


# ---- the driver ---------------------------------------------------------------------------------------

def make_exper(root: Path) -> Path:
    """A temporary exper/ whose pascal_scribble/list holds MSRC-21's lists."""
    lists = root / "exper" / "pascal_scribble" / "list"
    lists.mkdir(parents=True)
    for name in LISTS:
        shutil.copyfile(DATA_ROOT / "list" / name, lists / name)
    return root / "exper"


def variables(net: str) -> dict:
    return {"DATA_ROOT": f"{DATA_ROOT}/", "NUM_LABELS": "21", "NET_ID": net}


def worker_environment() -> dict:
    """The environment of the phases: rloss importable from this clone."""
    path = os.environ.get("PYTHONPATH", "")
    return dict(os.environ, PYTHONPATH=f"{REPO}{os.pathsep}{path}" if path else str(REPO))


def run_training(exper: Path, solver: Path, weights: str, iterations: int, net: str, log: Path) -> dict:
    result = log.with_suffix(".json")
    arguments = json.dumps([str(solver), weights, iterations, variables(net), str(result)])
    start = time.perf_counter()
    with open(log, "w") as handle:
        status = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--worker", arguments], cwd=exper,
                                stdout=handle, stderr=subprocess.STDOUT, env=worker_environment()).returncode
    if status != 0 or not result.exists():
        return {"error": _last_line(log), "wall": time.perf_counter() - start}
    return {**json.loads(result.read_text()), "wall": time.perf_counter() - start}


def run_test(exper: Path, model: Path, weights: str, net: str, log: Path) -> dict:
    metrics = log.with_suffix(".json")
    flags = [f"--set={name}={value}" for name, value in variables(net).items()]
    command = [sys.executable, "-m", "rloss", "test", f"--model={model}", f"--weights={weights}",
               f"--iterations={TEST_ITERATIONS}", f"--metrics_json={metrics}", *flags]
    start = time.perf_counter()
    with open(log, "w") as handle:
        status = subprocess.run(command, cwd=exper, stdout=handle, stderr=subprocess.STDOUT,
                                env=worker_environment()).returncode
    wall = time.perf_counter() - start
    if status != 0:
        return {"error": _last_line(log), "wall": wall}
    values = json.loads(metrics.read_text())
    text = log.read_text()
    return {"mean_iou": values["mean_iou"], "pixel_accuracy": values["pixel_accuracy"],
            "printed": "mean IoU = " in text, "seconds_per_image": seconds_per_image(text), "wall": wall}


def seconds_per_image(log_text: str) -> float:
    """Time of the last test forward: between the glog stamps of the first `Batch k` lines of the
    last two batches (NaN with fewer than two)."""
    stamps: dict[int, float] = {}
    for match in re.finditer(r"^I\d{4} (\d\d):(\d\d):(\d\d\.\d+) .*\] Batch (\d+),", log_text, re.MULTILINE):
        hours, minutes, seconds, batch = match.groups()
        stamps.setdefault(int(batch), int(hours) * 3600 + int(minutes) * 60 + float(seconds))
    if len(stamps) < 2:
        return math.nan
    last = max(stamps)
    return (stamps[last] - stamps[last - 1]) % 86400


def _last_line(log: Path) -> str:
    lines = [line for line in log.read_text().splitlines() if line.strip()]
    return lines[-1][-200:] if lines else "(no output)"


def smoke(source: str, net: str, iterations: int, work: Path) -> list[dict]:
    """The three phases of one network from one source of files; one row per phase."""
    config = SOURCES[source] / net
    exper = make_exper(work / f"{source}-{net}")
    (exper / "pascal_scribble" / "model" / net).mkdir(parents=True)
    logs = work / "logs"
    logs.mkdir(exist_ok=True)
    rows = []
    weights = ""
    for phase, solver in (("train", "solver"), ("trainwithdensecrfloss", "solverwithdensecrfloss")):
        print(f"[{source} {net}] {phase}: {iterations} iteration(s) ...", flush=True)
        outcome = run_training(exper, config / f"{solver}.prototxt", weights, iterations, net,
                               logs / f"{source}-{net}-{phase}.log")
        rows.append({"source": source, "net": net, "phase": phase, "from": weights, **outcome})
        if "error" in outcome:
            return rows
        weights = outcome["snapshot"]
    print(f"[{source} {net}] test: {TEST_ITERATIONS} images ...", flush=True)
    outcome = run_test(exper, config / "test.prototxt", weights, net, logs / f"{source}-{net}-test.log")
    rows.append({"source": source, "net": net, "phase": "test", "from": weights, **outcome})
    return rows


def seconds_per_iteration(row: dict) -> float:
    seconds = row.get("seconds") or []
    steady = seconds[1:] or seconds
    return sum(steady) / len(steady) if steady else math.nan


def describe(row: dict) -> list[str]:
    """The table cells of one phase."""
    source_model = Path(row["from"]).name if row["from"] else "fillers"
    if "error" in row:
        return [row["source"], row["net"], row["phase"], source_model, "FAILED", "", "", "", row["error"]]
    if row["phase"] == "test":
        return [row["source"], row["net"], "test", source_model, "-", "-", "-",
                f"{row['seconds_per_image']:.1f} s/img",
                f"mIoU {100 * row['mean_iou']:.2f} (printed: {'yes' if row['printed'] else 'NO'})"]
    losses = row["losses"]
    finite = all(math.isfinite(v) for v in losses)
    loaded = f", {row['weights_layers_loaded']} layers loaded" if row["from"] else ""
    crf = [v for v in row["densecrf_losses"] if v is not None]
    loss_text = " ".join(f"{v:.4g}" for v in losses) + (f" (crf {crf[-1]:.3g})" if crf else "")
    batch = f"{row['batch'][0]}x{row['batch'][2]}" + (f" x{row['iter_size']}" if row["iter_size"] > 1 else "")
    return [row["source"], row["net"], row["phase"], source_model + loaded, batch, loss_text,
            "yes" if finite else "NO", f"{seconds_per_iteration(row):.1f} s/it", Path(row["snapshot"]).name]


def print_table(rows: list[dict]) -> None:
    header = ["source", "net", "phase", "started from", "batch", "losses", "finite", "speed", "snapshot / result"]
    table = [header] + [describe(row) for row in rows]
    widths = [max(len(line[i]) for line in table) for i in range(len(header))]
    for index, line in enumerate(table):
        print(" | ".join(cell.ljust(width) for cell, width in zip(line, widths)))
        if index == 0:
            print("-+-".join("-" * width for width in widths))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--iter", type=int, default=0, help="training iterations per phase (default 2, ResNet 1)")
    parser.add_argument("--nets", default=",".join(NETS), help="comma-separated networks")
    parser.add_argument("--sources", default=",".join(SOURCES), help="generated, original or both")
    parser.add_argument("--keep", default="", help="keep the work folder (snapshots, logs) here")
    parser.add_argument("--worker", default="", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        train_phase(*json.loads(args.worker))
        return 0
    if not DATA_ROOT.exists():
        print(f"{DATA_ROOT} is absent: the smoke runs need ../shared/data/msrc21", file=sys.stderr)
        return 1
    nets = [n for n in args.nets.split(",") if n]
    sources = [s for s in args.sources.split(",") if s]
    for name in nets + sources:
        if name not in NETS and name not in SOURCES:
            parser.error(f"unknown network or source '{name}'")
    work = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="rloss-smoke-"))
    work.mkdir(parents=True, exist_ok=True)
    rows: list[dict] = []
    try:
        for net in nets:
            for source in sources:
                rows += smoke(source, net, args.iter or DEFAULT_ITERATIONS.get(net, 2), work)
                print_table(rows)
    finally:
        (work / "results.json").write_text(json.dumps(rows, indent=1))
    failed = any("error" in row for row in rows)
    if args.keep or failed:
        print(f"logs, snapshots and results.json are in {work}")
    else:
        shutil.rmtree(work, ignore_errors=True)
    print()
    print_table(rows)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
