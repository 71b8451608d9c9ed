"""Image-size presets for the run script's small net on one's own data, and the DenseCRF loss weight
that goes with them.

The presets follow the A100 fork of the PyTorch port (image size: crop, batch, learning rate, DenseCRF
down-scaling): 40: 64, 32, 0.01, 0.25; 80: 128, 16, 0.007, 0.5; 256: 256, 8, 0.007, 0.75; 513: 513, 4,
0.007, 1, with the crops one pixel larger (65, 129, 257), since Caffe-style nets with output stride 8
and Interp take crops of 8k + 1 pixels. Ours on top: bi_xy_std in proportion to the image (100 at 513,
the port's value), bi_rgb_std 15 (the port's), and the loss weight below.

The DenseCRF loss sums, for each of the P pixels it sees, the kernel's weights over its neighbours,
about sigma_xy^2 of them, so it grows like P * sigma_xy^2 while the cross-entropy is a mean: the weight
keeps their balance if it shrinks like 1 / (P * sigma_xy^2), with P and sigma_xy as the loss sees them
(after `scale_factor`). `WEIGHT_ANCHOR` is the demo's 2e-6 at 97x97 pixels and sigma_xy 30 (where it
gains 4.5 mIoU over partial cross-entropy); the rule gives 1.64e-8 at 321x321 and 100,
where the Caffe files use 1e-8.

`python -m rloss.presets DATA_ROOT [SIZE|auto]` prints the preset as shell assignments (the run
script evaluates them for the variables the user did not set); `auto` picks the preset nearest to the
median short side of the training images.
"""

from __future__ import annotations

import statistics
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from PIL import Image

from rloss.data.listfile import read_list
from rloss.errors import DataError

WEIGHT_ANCHOR = 2e-6 * 97 * 97 * 30 * 30


@dataclass(frozen=True)
class Preset:
    size: int
    crop: int
    batch: int
    base_lr: float
    scale: float
    sigma_rgb: float = 15.0

    @property
    def sigma_xy(self) -> float:
        return round(100 * self.size / 513, 1)

    @property
    def densecrf_weight(self) -> float:
        """The loss weight for this preset's crop, scale and sigma_xy (see the module's rule)."""
        return densecrf_weight(self.crop, self.scale, self.sigma_xy)

    def assignments(self) -> dict[str, str]:
        return {"CROP_SIZE": str(self.crop), "BATCH_SIZE": str(self.batch),
                "BASE_LR": f"{self.base_lr:g}", "BASE_LR2": f"{self.base_lr:g}", "DENSECRF_SCALE": f"{self.scale:g}",
                "BI_XY_STD": f"{self.sigma_xy:g}", "BI_RGB_STD": f"{self.sigma_rgb:g}",
                "DENSECRF_LOSS_WEIGHT": f"{self.densecrf_weight:.3g}"}


PRESETS = {preset.size: preset for preset in (
    Preset(40, 65, 32, 0.01, 0.25), Preset(80, 129, 16, 0.007, 0.5), Preset(256, 257, 8, 0.007, 0.75),
    Preset(513, 513, 4, 0.007, 1.0))}


def densecrf_weight(crop: int, scale: float, sigma_xy: float) -> float:
    """The weight that gives the loss at crop x crop pixels, down-scaled by `scale`, the demo's balance."""
    pixels = (crop * scale) ** 2
    return WEIGHT_ANCHOR / (pixels * (sigma_xy * scale) ** 2)


def nearest_preset(short_side: float) -> Preset:
    return min(PRESETS.values(), key=lambda preset: abs(preset.size - short_side))


def training_short_sides(data_root: Path) -> list[int]:
    """The short sides of the images in DATA_ROOT/list/train.txt (ImageSegData's format)."""
    listing = data_root / "list" / "train.txt"
    sides = []
    for entry in read_list(str(listing), need_label=False, who="the image-size preset"):
        path = data_root / entry.image.lstrip("/")
        try:
            with Image.open(path) as image:
                sides.append(min(image.size))
        except OSError as error:
            raise DataError(f"{entry.where(str(listing))}: cannot read the image '{path}': {error}") from None
    return sides


def choose(data_root: Path, choice: str) -> Preset:
    """The preset named by `choice` (40, 80, 256, 513) or, for `auto`, the one nearest the images."""
    if choice == "auto":
        return nearest_preset(statistics.median(training_short_sides(data_root)))
    if not choice.isdigit() or int(choice) not in PRESETS:
        raise DataError(f"PRESET={choice}: expected auto or one of {', '.join(map(str, PRESETS))}")
    return PRESETS[int(choice)]


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) not in (1, 2):
        print("usage: python -m rloss.presets DATA_ROOT [40|80|256|513|auto]", file=sys.stderr)
        return 2
    try:
        preset = choose(Path(args[0]), args[1] if len(args) == 2 else "auto")
    except DataError as error:
        print(f"rloss: error: {error}", file=sys.stderr)
        return 1
    print(f"PRESET={preset.size}")
    for name, value in preset.assignments().items():
        print(f"{name}={value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
