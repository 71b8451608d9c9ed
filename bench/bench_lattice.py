"""Benchmark of the DenseCRF loss on our permutohedral lattice (not a test).

Times the prototxt `DenseCRFLoss` layer itself, forward + backward, inside an rloss Net (inputs: a
321x321 real image, trainimage1.png, mean-subtracted BGR, and K = 21 softmax channels that get the
gradient; loss_weight 1e-8), as training runs it. Compares with the original Caffe layer's measured
times on this machine and with our own lattice used the original's way (one channel at a time, one
thread per image, the mask and dot products in torch) in the same run. Also reports where the time
goes, scaling with pixel count and with K, and peak memory at 513x513.

The original's way is bench-only C++ (bench/baseline_lattice.cpp), compiled on the first run with the
production lattice sources into build/bench_baseline/ (about 20 s; rebuilt when a source changes).

    python bench/bench_lattice.py [--threads 2] [--repeats 15] [--quick]
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import io
import os
import sys
import time
from pathlib import Path
from types import ModuleType
from typing import Callable

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # numpy's BLAS threads would only compete for cores

import numpy as np  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from google.protobuf import text_format  # noqa: E402

from rloss import lattice as lat  # noqa: E402
from rloss.net import Net  # noqa: E402
from rloss.proto import caffe_pb2  # noqa: E402

ext = lat.extension()

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("RLOSS_SHARED", str(ROOT.parent / "shared")))
TRAIN_IMAGE = SHARED / "reference" / "rloss-exper" / "exper" / "visualization" / "trainimage1.png"
MEAN_BGR = np.array([104.008, 116.669, 122.675], dtype=np.float32)
SIGMA_XY, SIGMA_RGB, LOSS_WEIGHT = 100.0, 15.0, 1e-8
# The original Caffe DenseCRFLoss layer on this machine (golden/04_timing, 2 threads): fwd, bwd in ms.
CAFFE_MS = {1: (122.0, 11.0), 2: (301.0, 26.0)}


def build_baseline() -> ModuleType:
    """The bench-only extension rloss_bench_baseline (bench/baseline_lattice.cpp plus the lattice sources
    of csrc/ but their bindings), compiled into build/bench_baseline/ unless it is up to date, and imported."""
    from setuptools import Distribution, Extension

    try:
        import pybind11

        pybind11_include = pybind11.get_include()
    except ImportError:  # torch ships the pybind11 headers
        from torch.utils.cpp_extension import include_paths

        pybind11_include = include_paths()[0]
    csrc = ROOT / "csrc"
    lattice_sources = sorted(p for p in csrc.glob("*.cpp") if p.name != "bindings.cpp")
    sources = [ROOT / "bench" / "baseline_lattice.cpp", *lattice_sources]
    extension = Extension(
        "rloss_bench_baseline",
        [str(p) for p in sources],
        depends=[str(p) for p in sorted(csrc.glob("*.h"))],
        include_dirs=[str(csrc), pybind11_include],
        language="c++",
        extra_compile_args=["-O3", "-std=c++17", "-fvisibility=hidden", "-fopenmp"],
        extra_link_args=["-fopenmp"],
    )
    build = ROOT / "build" / "bench_baseline"
    command = Distribution({"name": "rloss_bench_baseline", "ext_modules": [extension]}).get_command_obj("build_ext")
    command.build_lib, command.build_temp, command.parallel = str(build), str(build / "temp"), os.cpu_count()
    command.ensure_finalized()
    with contextlib.redirect_stdout(io.StringIO()):  # setuptools' progress lines
        command.run()
    path = command.get_ext_fullpath("rloss_bench_baseline")
    spec = importlib.util.spec_from_file_location("rloss_bench_baseline", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def load_image(size: int) -> np.ndarray:
    """(3, size, size) mean-subtracted BGR float32, like Caffe's data blob."""
    from PIL import Image

    if TRAIN_IMAGE.exists():
        im = Image.open(TRAIN_IMAGE).convert("RGB").resize((size, size), Image.BILINEAR)
        rgb = np.asarray(im, dtype=np.float32)
    else:  # fall back to a synthetic image so the script still runs
        print(f"warning: {TRAIN_IMAGE} not found, using a synthetic image")
        y, x = np.mgrid[0:size, 0:size].astype(np.float32)
        rgb = np.stack([x % 97 * 2.5, y % 83 * 3.0, (x + y) % 51 * 5.0], -1)
    return np.ascontiguousarray((rgb[:, :, ::-1] - MEAN_BGR).transpose(2, 0, 1))


def softmax_seg(b: int, k: int, h: int, w: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    logits = torch.nn.functional.interpolate(
        torch.randn(b, k, h // 8 + 1, w // 8 + 1, generator=g) * 3, (h, w), mode="bilinear", align_corners=True
    )
    return torch.softmax(logits, 1).contiguous()


def densecrf_net(b: int, k: int, h: int, w: int) -> Net:
    """A Net holding just the DenseCRFLoss layer, its segmentation input receiving the gradient."""
    text = f"""force_backward: true
        input: "data" input_shape {{ dim: {b} dim: 3 dim: {h} dim: {w} }}
        input: "prob" input_shape {{ dim: {b} dim: {k} dim: {h} dim: {w} }}
        layer {{ name: "densecrf_loss" type: "DenseCRFLoss" bottom: "data" bottom: "prob" top: "densecrf_loss"
                loss_weight: {LOSS_WEIGHT} propagate_down: false propagate_down: true
                densecrf_loss_param {{ bi_xy_std: {SIGMA_XY} bi_rgb_std: {SIGMA_RGB} }} }}"""
    return Net(text_format.Parse(text, caffe_pb2.NetParameter()), caffe_pb2.TRAIN)


class LayerRun:
    """Forward + backward of the DenseCRFLoss layer of a Net, as a training iteration runs it."""

    def __init__(self, image: torch.Tensor, seg: torch.Tensor) -> None:
        self.net = densecrf_net(*seg.shape)
        self.feeds = {"data": image, "prob": seg}

    def __call__(self) -> tuple[float, torch.Tensor]:
        objective = self.net.forward(self.feeds)
        objective.backward()
        return float(objective.detach()), self.net.blob_diff("prob")


def original_way(baseline: ModuleType, image: torch.Tensor, seg: torch.Tensor,
                 threads: int) -> tuple[float, torch.Tensor]:
    """The original's way on our lattice: mask tensor, one channel at a time, one thread per image,
    the dot products and the gradient scaling in torch."""
    n = image.shape[0]
    mask = lat.caffe_roi_mask(image)
    filt = torch.from_numpy(
        baseline.filter_image_batch_per_channel(image.numpy(), seg.numpy(), SIGMA_XY, SIGMA_RGB, mask=mask.numpy(),
                                                num_threads=threads)
    ) * mask[:, None]
    loss = -torch.dot(seg.reshape(-1), filt.reshape(-1)) / n
    return float(loss) * LOSS_WEIGHT, filt * (-2.0 * LOSS_WEIGHT / n)


def same_result(ours: tuple[float, torch.Tensor], theirs: tuple[float, torch.Tensor]) -> str:
    loss = abs(ours[0] - theirs[0]) / abs(theirs[0])
    grad = float((ours[1] - theirs[1]).abs().max() / theirs[1].abs().max())
    return f"{loss:.1e} / {grad:.1e}"


def timeit(fn, repeats: int, warmup: int = 2) -> tuple[float, float]:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return float(np.median(times)) * 1e3, float(np.min(times)) * 1e3


def timeit_interleaved(runs: list[tuple[Callable[[], object], int]], rounds: int = 5) -> list[tuple[float, float]]:
    """(median, min) ms of each (function, repeats), timed in `rounds` alternating rounds so that a
    machine whose speed drifts (a shared VM) affects all of them alike."""
    for fn, _ in runs:
        fn()
    times: list[list[float]] = [[] for _ in runs]
    for _ in range(rounds):
        for (fn, repeats), bucket in zip(runs, times):
            for _ in range(max(1, -(-repeats // rounds))):
                t0 = time.perf_counter()
                fn()
                bucket.append(time.perf_counter() - t0)
    return [(float(np.median(t)) * 1e3, float(np.min(t)) * 1e3) for t in times]


def phase_breakdown(image: np.ndarray, seg: np.ndarray, threads: int, repeats: int) -> dict:
    """Median per-phase times (ms) of the C++ side of the loss's forward + backward, from its timing
    counters."""
    batch = ext.DenseCRFLossBatch()
    ext.set_timing(True)
    rows = []
    for _ in range(repeats):
        ext.reset_timers()
        batch.forward(image, seg, SIGMA_XY, SIGMA_RGB, num_threads=threads)
        batch.backward(-2.0 * LOSS_WEIGHT, num_threads=threads)
        rows.append(ext.timers())
    ext.set_timing(False)
    return {k: float(np.median([r[k] for r in rows])) * 1e3 for k in rows[0]}


def peak_memory_child(threads: int) -> None:
    """Run in a fresh process: peak RSS growth of one 513x513, K=21 layer fwd+bwd over the inputs."""
    img = torch.from_numpy(load_image(513)[None])
    seg = softmax_seg(1, 21, 513, 513)
    with open("/proc/self/status") as f:
        rss0 = next(int(x.split()[1]) for x in f if x.startswith("VmRSS"))
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak (VmHWM) to the current RSS
    LayerRun(img, seg)()
    with open("/proc/self/status") as f:
        hwm = next(int(x.split()[1]) for x in f if x.startswith("VmHWM"))
    print(f"{(hwm - rss0) / 1024:.2f} {ext.workspace_bytes() / 2**20:.2f} {seg.numel() * 4 / 2**20:.2f}")


def peak_memory_513(threads: int) -> tuple[float, float, float]:
    """(peak RSS growth MiB, lattice workspace MiB, gradient tensor MiB), measured in a subprocess."""
    import subprocess

    try:
        res = subprocess.run(
            [sys.executable, __file__, "--peak-memory-child", "--threads", str(threads)],
            capture_output=True,
            text=True,
            timeout=300,
        )
        peak, ws, outs = (float(x) for x in res.stdout.split()[-3:])
        return peak, ws, outs
    except Exception as e:  # noqa: BLE001 - report, do not fail the benchmark
        print(f"peak memory measurement failed: {e}")
        return float("nan"), float("nan"), float("nan")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--quick", action="store_true", help="fewer repeats and sizes")
    ap.add_argument("--peak-memory-child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.peak_memory_child:
        torch.set_num_threads(args.threads)
        peak_memory_child(args.threads)
        return
    threads, reps = args.threads, (5 if args.quick else args.repeats)
    torch.set_num_threads(threads)
    baseline = build_baseline()
    load0 = os.getloadavg()
    print(
        f"rloss lattice benchmark: kernels {ext.kernel_isa()}, OpenMP {ext.have_openmp()}, threads {threads}, "
        f"torch {torch.__version__}, cpus {os.cpu_count()}, load avg {load0[0]:.2f} {load0[1]:.2f} {load0[2]:.2f}"
    )
    print(
        "times are medians (min in brackets) in ms of the DenseCRFLoss layer's forward + backward in a Net "
        "(loss_weight 1e-8, the gradient reaching the segmentation input); ours and the original's way are "
        "timed in alternating rounds"
    )

    base = torch.from_numpy(load_image(321))
    print("\n== 321x321, K=21: ours vs Caffe layer vs our lattice used the original's way ==")
    print(
        f"{'batch':>5} | {'ours':>15} | {'orig. way':>15} | {'Caffe fwd+bwd':>13} | {'vs Caffe':>8} | "
        f"{'vs orig. way':>12} | per image"
    )
    agree: list[str] = []
    for b in (1, 2, 12):
        img = base[None].repeat(b, 1, 1, 1).contiguous()
        img[1::2] = img[1::2].flip(-1)
        seg = softmax_seg(b, 21, 321, 321)
        r = max(3, reps // (1 + b // 4))
        layer = LayerRun(img, seg)
        (ours, ours_min), (orig, orig_min) = timeit_interleaved(
            [(layer, r), (lambda img=img, seg=seg: original_way(baseline, img, seg, threads), max(3, r // 3))]
        )
        agree.append(same_result(layer(), original_way(baseline, img, seg, threads)))
        caffe = sum(CAFFE_MS[b]) if b in CAFFE_MS else float("nan")
        vs_caffe = f"{caffe / ours:7.1f}x" if b in CAFFE_MS else "     n/a"
        caffe_s = f"{caffe:13.0f}" if b in CAFFE_MS else f"{'n/a':>13}"
        print(
            f"{b:5d} | {ours:7.2f} [{ours_min:6.2f}] | {orig:7.1f} [{orig_min:6.1f}] | {caffe_s} | {vs_caffe} | "
            f"{orig / ours:11.1f}x | {ours / b:6.2f}"
        )
    print("targets: >= 10x vs Caffe at batch 1 and >= 6x at batch 2 (acceptable minimum 6x / 4x)")
    print(f"ours vs the original's way, relative difference (loss, max |grad|): {', '.join(agree)}")
    if threads > 1:
        # Single-threaded reference (torch too): no synchronisation at all, so it shows the pure work even
        # when other processes keep the cores busy (then every barrier of the threaded run costs a time slice).
        torch.set_num_threads(1)
        for b in (1, 2):
            img = base[None].repeat(b, 1, 1, 1).contiguous()
            seg = softmax_seg(b, 21, 321, 321)
            one, one_min = timeit(LayerRun(img, seg), reps)
            print(
                f"(1 thread, batch {b}: ours {one:.2f} [{one_min:.2f}] ms = {sum(CAFFE_MS[b]) / one:.1f}x faster "
                "than the 2-thread Caffe layer)"
            )
        torch.set_num_threads(threads)

    print("\n== where the time goes (C++ phase counters, 321x321, K=21, batch 1, median ms) ==")
    img1 = base[None].numpy()
    seg1 = softmax_seg(1, 21, 321, 321).numpy()
    for t in sorted({1, threads}):
        ph = phase_breakdown(img1, seg1, t, reps)
        build = ph["embed+hash"] + ph["merge"] + ph["slots+neighbours"]
        print(
            f"threads {t}: build {build:5.2f} (embed+hash {ph['embed+hash']:.2f}, merge {ph['merge']:.2f}, "
            f"slots+neighbours {ph['slots+neighbours']:.2f}) | splat {ph['splat']:.2f} | blur {ph['blur']:.2f} | "
            f"slice {ph['slice']:.2f} | sum {build + ph['splat'] + ph['blur'] + ph['slice']:.2f}"
        )
    lattice = ext.Lattice(
        np.ascontiguousarray(
            np.stack(
                [
                    *np.mgrid[0:321, 0:321][::-1].astype(np.float32) / np.float32(SIGMA_XY),
                    *(img1[0] / np.float32(SIGMA_RGB)),
                ],
                -1,
            ).reshape(-1, 5)
        )
    )
    print(f"(lattice points M = {lattice.lattice_size} for N = {321 * 321} pixels)")

    print("\n== time vs pixel count (K=21, batch 1) ==")
    print(f"{'size':>7} | {'pixels':>7} | {'ours':>8} | {'orig. way':>9} | ratio | us/pixel")
    sizes = (41, 81, 161, 321) if args.quick else (41, 81, 161, 321, 513)
    for s in sizes:
        img = torch.from_numpy(load_image(s)[None])
        seg = softmax_seg(1, 21, s, s)
        r = max(3, reps * 2 if s <= 161 else reps // (1 + s // 321))
        ours, _ = timeit(LayerRun(img, seg), r)
        orig, _ = timeit(lambda img=img, seg=seg: original_way(baseline, img, seg, threads), max(3, r // 3), warmup=1)
        print(f"{s:4d}^2 | {s * s:7d} | {ours:8.2f} | {orig:9.1f} | {orig / ours:4.1f}x | {ours * 1e3 / (s * s):.3f}")

    print("\n== time vs K (321x321, batch 1) ==")
    print(f"{'K':>3} | {'ours':>8} | {'orig. way':>9} | ratio | ours per channel")
    img = base[None].contiguous()
    for k in (1, 2, 5, 10, 21, 40, 60):
        seg = softmax_seg(1, k, 321, 321)
        ours, _ = timeit(LayerRun(img, seg), reps)
        orig, _ = timeit(lambda seg=seg: original_way(baseline, img, seg, threads), max(3, reps // 3), warmup=1)
        print(f"{k:3d} | {ours:8.2f} | {orig:9.1f} | {orig / ours:4.1f}x | {ours / k:.3f}")

    print("\n== peak memory, 513x513, K=21, batch 1 ==")
    peak, ws, tensors = peak_memory_513(threads)
    print(
        f"peak RSS growth of one loss fwd+bwd (fresh process, inputs already allocated): {peak:.1f} MiB, of which "
        f"the gradient tensor {tensors:.1f} MiB and lattice workspace (kept for reuse) {ws:.1f} MiB"
    )
    load1 = os.getloadavg()
    print(
        f"\nload avg at end {load1[0]:.2f} {load1[1]:.2f} {load1[2]:.2f} (a busy 2-core machine inflates the "
        "2-thread numbers)"
    )


if __name__ == "__main__":
    main()
