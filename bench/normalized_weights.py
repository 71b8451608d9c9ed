"""The `normalize: true` weights that match the published DenseCRF loss weights, measured on real photos.

    python bench/normalized_weights.py [--images DIR] [--count 40]

A normalized loss is the plain loss divided by z = <m, A m> per image, so the weight that pulls as
hard as a published plain weight w is w * z, with z measured where the published setting ran: the
Caffe files (1e-8, crop 321, sigma_xy 100, sigma_rgb 15, no scaling) and the PyTorch port (2e-9, crop
513, scale_factor 0.5, sigma_xy 100, sigma_rgb 15). z depends on the photos' colours; it is measured
here on MSRC-21 photos (from ../shared/data/msrc21, or --images) resized to each crop, and reported as
median and range.
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from rloss import DenseCRFLoss

SETTINGS = (  # name, published weight, crop, scale_factor, sigma_xy, sigma_rgb
    ("Caffe files (DeepLab VGG nets)", 1e-8, 321, 1.0, 100.0, 15.0),
    ("PyTorch port", 2e-9, 513, 0.5, 100.0, 15.0),
)
DEFAULT_IMAGES = Path(__file__).resolve().parents[2] / "shared" / "data" / "msrc21" / "JPEGImages"


def roi_response(image: torch.Tensor, scale: float, sigma_xy: float, sigma_rgb: float) -> float:
    """z = <m, A m> of one RGB image (1, 3, H, W) with m all ones: minus the plain loss of one class."""
    ones = torch.ones(1, 1, *image.shape[2:])
    loss = DenseCRFLoss(1.0, sigma_rgb, sigma_xy, scale_factor=scale)(image, ones, torch.ones(1, *image.shape[2:]))
    return -float(loss)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=Path, default=DEFAULT_IMAGES)
    parser.add_argument("--count", type=int, default=40)
    args = parser.parse_args()
    paths = sorted(args.images.glob("*.jpg"))[: args.count]
    if not paths:
        raise SystemExit(f"no .jpg images in {args.images} (give --images DIR)")
    print(f"z = <m, A m> on {len(paths)} photos of {args.images}, each resized to the crop")
    print(f"{'setting':<32}{'weight':>9}{'median z':>12}{'z range':>24}{'normalized weight':>19}")
    for name, weight, crop, scale, sigma_xy, sigma_rgb in SETTINGS:
        responses = []
        for path in paths:
            picture = Image.open(path).convert("RGB").resize((crop, crop), Image.BILINEAR)
            image = torch.from_numpy(np.asarray(picture, np.float32).transpose(2, 0, 1).copy())[None]
            responses.append(roi_response(image, scale, sigma_xy, sigma_rgb))
        median = statistics.median(responses)
        spread = f"{min(responses):.3g} .. {max(responses):.3g}"
        print(f"{name:<32}{weight:>9.0e}{median:>12.3g}{spread:>24}{weight * median:>19.3g}")


if __name__ == "__main__":
    main()
