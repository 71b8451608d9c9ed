"""Seconds per forward+backward of each regularized loss module beside the DenseCRF loss, in one process
on the same images and segmentations (the PyTorch port's size: 321x321, K=21), at batch 1 and 12.

    python bench/bench_losses.py [--crop 321] [--batches 1,12] [--labels 21] [--repeats 5] [--threads 2]
                                 [--scale 1.0]

Repeats go round the losses in turn; medians are reported with the ratio to the DenseCRF loss. The
images are smooth random colour fields (the lattice's cost depends on how spread the colours are),
the segmentations a softmax of smooth random logits. --scale is the DenseCRF and normalized cut
losses' scale_factor (the Gated CRF loss runs at a quarter of the resolution, as in exper/, and at
full size). Every step includes the softmax and its backward.
"""

from __future__ import annotations

import argparse
import functools
import statistics

import torch
import torch.nn.functional as F
from harness import timed

from rloss import DenseCRFLoss, GatedCRFLoss, GatedKernel, NormalizedCutLoss, SizeConstraintLoss


def smooth(generator: torch.Generator, shape: tuple[int, ...], cells: int) -> torch.Tensor:
    """Random values on a coarse grid of `cells` x `cells`, bilinearly enlarged: blobs, not noise."""
    coarse = torch.rand(shape[0], shape[1], cells, cells, generator=generator)
    return F.interpolate(coarse, size=shape[2:], mode="bilinear", align_corners=False)


def losses(scale: float) -> dict[str, torch.nn.Module]:
    return {
        "DenseCRF": DenseCRFLoss(1e-8, sigma_rgb=15.0, sigma_xy=100.0, scale_factor=scale),
        "DenseCRF normalized": DenseCRFLoss(1.0, sigma_rgb=15.0, sigma_xy=100.0, scale_factor=scale, normalize=True),
        "normalized cut": NormalizedCutLoss(1.0, sigma_rgb=15.0, sigma_xy=100.0, scale_factor=scale),
        "Gated CRF": GatedCRFLoss(1.0, [GatedKernel(1.0, 10.0, 25.0)], radius=5, scale_factor=0.25, normalize=True),
        "Gated CRF full size": GatedCRFLoss(1.0, [GatedKernel(1.0, 10.0, 25.0)], radius=5, normalize=True),
        "size constraint": SizeConstraintLoss(1.0, normalize=True),
    }


def median_seconds(modules: dict[str, torch.nn.Module], batch: int, crop: int, labels: int,
                   repeats: int) -> dict[str, float]:
    """Median seconds of one forward+backward per loss, on one batch of inputs shared by all."""
    generator = torch.Generator().manual_seed(batch)
    images = smooth(generator, (batch, 3, crop, crop), 12) * 255
    logits = smooth(generator, (batch, labels, crop, crop), 8) * 8
    rois = torch.ones(batch, crop, crop)
    bounds = (torch.full((batch, labels), 0.01), torch.full((batch, labels), 0.5))

    def step(name: str) -> None:
        segmentations = torch.softmax(logits, dim=1).requires_grad_(True)
        if name == "size constraint":
            loss = modules[name](segmentations, rois, *bounds)
        else:
            loss = modules[name](images, segmentations, rois)
        loss.backward()

    for name in modules:  # warm-up
        step(name)
    times: dict[str, list[float]] = {name: [] for name in modules}
    for _ in range(repeats):
        for name in modules:
            times[name].append(timed(functools.partial(step, name)))
    return {name: statistics.median(values) for name, values in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--crop", type=int, default=321)
    parser.add_argument("--batches", default="1,12")
    parser.add_argument("--labels", type=int, default=21)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--scale", type=float, default=1.0)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    modules = losses(args.scale)
    print(f"regularized losses, forward+backward, crop {args.crop}, K={args.labels}, {args.threads} threads, "
          f"median of {args.repeats}")
    batches = [int(b) for b in args.batches.split(",")]
    rows = {name: [] for name in modules}
    for batch in batches:
        for name, seconds in median_seconds(modules, batch, args.crop, args.labels, args.repeats).items():
            rows[name].append(seconds)
    print(f"{'loss':<22}" + "".join(f"{f'batch {b} s':>12}{'vs DenseCRF':>13}" for b in batches))
    for name, medians in rows.items():
        base = rows["DenseCRF"]
        print(f"{name:<22}" + "".join(f"{t:>12.3f}{t / b:>13.2f}" for t, b in zip(medians, base)))


if __name__ == "__main__":
    main()
