"""A small synthetic scribble-supervision dataset, for the embedded demo and tests.

Images are simple coloured shapes (one shape and hue per class: disc, square, triangle, ellipse,
diamond, ...) on smooth textured backgrounds, with colour jitter and pixel noise so the task is not
trivial. For each image we write the full ground truth and a scribble map: inside every visible
object, and in the background, a 3-pixel-wide stroke drawn through the region eroded by a margin, so
every scribbled pixel carries its region's true class; 255 elsewhere. About 3 % of the pixels are
scribbled, as in the PASCAL scribbles.

The tree is laid out for ImageSegData (`root_folder` = the dataset folder):
`images/<id>.png`, `SegmentationClass/<id>.png` and `scribbles/<id>.png` (8-bit grey PNGs holding
class indices, 0 = background), list files under `list/` as in the PASCAL and MSRC-21 trees:
`train.txt` (image + scribbles), `train_full.txt` (image + full ground truth), `val.txt` (image +
ground truth), `train_id.txt`, `val_id.txt`; and `classes.txt`.

Everything is a function of the seed. Images are PNG so that the files do not depend on a JPEG
encoder's version. Command line:
`python -m rloss.data.synthetic OUT_DIR [--train N] [--val N] [--size S] [--classes C]`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage

IGNORE = 255
SHAPES = ("disc", "square", "triangle", "ellipse", "diamond")
# Mean RGB colour of each class (class 0, the background, is textured grey-brown).
HUES = ((200, 40, 40), (40, 170, 50), (40, 60, 200), (210, 190, 30), (150, 50, 180), (30, 180, 190))
STROKE_MARGIN = 3
OBJECT_KEEP = 0.7  # fraction of an object's extent a stroke covers
BACKGROUND_KEEP = 0.5


@dataclass(frozen=True)
class SyntheticDataset:
    """Where `write_dataset` put things."""

    root: Path
    train_list: Path
    train_full_list: Path
    val_list: Path
    num_classes: int  # including the background


def _background(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """Smooth random texture around a random dull (greyish) colour, (H, W, 3) float."""
    base = rng.uniform(80, 160) + rng.normal(0, 12, size=3)
    coarse = rng.normal(0, 1, size=(height // 8 + 2, width // 8 + 2, 3))
    texture = ndimage.zoom(coarse, (height / coarse.shape[0], width / coarse.shape[1], 1), order=1)
    return base + 25 * texture[:height, :width]


def _shape_mask(shape: str, rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """A randomly placed and sized shape, as a boolean (H, W) mask."""
    radius = rng.uniform(0.14, 0.26) * min(height, width)
    cy = rng.uniform(radius, height - radius)
    cx = rng.uniform(radius, width - radius)
    y, x = np.mgrid[0:height, 0:width].astype(np.float64)
    dy, dx = (y - cy) / radius, (x - cx) / radius
    angle = rng.uniform(0, np.pi)
    u = dx * np.cos(angle) + dy * np.sin(angle)
    v = -dx * np.sin(angle) + dy * np.cos(angle)
    if shape == "disc":
        return dx ** 2 + dy ** 2 <= 1
    if shape == "square":
        return (np.abs(u) <= 0.8) & (np.abs(v) <= 0.8)
    if shape == "triangle":
        return (v <= 0.6) & (v >= 1.7 * np.abs(u) - 1.0)
    if shape == "ellipse":
        return u ** 2 + (v / 0.55) ** 2 <= 1.2
    return np.abs(u) + np.abs(v) <= 1.0  # diamond


def _stroke_through(region: np.ndarray, rng: np.random.Generator, keep: float) -> np.ndarray:
    """A 3-pixel-wide straight stroke inside `region` (already eroded): through its centroid along
    its long axis, the middle `keep` fraction of the longest piece inside the region."""
    ys, xs = np.nonzero(region)
    if len(ys) < 2:
        return np.zeros_like(region)
    points = np.stack([ys, xs], axis=1).astype(np.float64)
    centre = points.mean(axis=0)
    covariance = np.cov((points - centre).T) + 1e-6 * np.eye(2)
    direction = np.linalg.eigh(covariance)[1][:, -1]
    direction = direction + rng.normal(0, 0.15, size=2)
    direction /= np.linalg.norm(direction)
    reach = max(region.shape)
    steps = np.arange(-reach, reach, 0.5)
    line = np.rint(centre[None, :] + steps[:, None] * direction[None, :]).astype(np.int64)
    inside_image = ((line >= 0) & (line < np.array(region.shape))).all(axis=1)
    hit = np.zeros(len(line), dtype=bool)
    hit[inside_image] = region[line[inside_image, 0], line[inside_image, 1]]
    runs, count = ndimage.label(hit)
    if count == 0:
        return np.zeros_like(region)
    longest = np.argmax(np.bincount(runs)[1:]) + 1
    stroke = np.zeros_like(region)
    kept = line[runs == longest]
    trim = int(len(kept) * (1 - keep) / 2)
    kept = kept[trim:len(kept) - trim]
    stroke[kept[:, 0], kept[:, 1]] = True
    return ndimage.binary_dilation(stroke, structure=np.ones((3, 3), dtype=bool)) & region


def _background_strokes(background: np.ndarray, rng: np.random.Generator, count: int) -> np.ndarray:
    """`count` strokes in the background, each through a random horizontal or vertical band."""
    strokes = np.zeros_like(background)
    height, width = background.shape
    for _ in range(count):
        band = np.zeros_like(background)
        if rng.integers(2):
            row = int(rng.integers(height // 6, height - height // 6))
            band[max(row - 4, 0):row + 5] = True
        else:
            column = int(rng.integers(width // 6, width - width // 6))
            band[:, max(column - 4, 0):column + 5] = True
        strokes |= _stroke_through(background & band, rng, BACKGROUND_KEEP)
    return strokes


def make_sample(rng: np.random.Generator, height: int, width: int,
                num_classes: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One image (H, W, 3) uint8 RGB, its ground truth and its scribbles ((H, W) uint8 each)."""
    pixels = _background(rng, height, width)
    truth = np.zeros((height, width), dtype=np.uint8)
    for _ in range(int(rng.integers(1, 4))):
        label = int(rng.integers(1, num_classes))
        mask = _shape_mask(SHAPES[(label - 1) % len(SHAPES)], rng, height, width)
        colour = np.asarray(HUES[(label - 1) % len(HUES)], dtype=np.float64) + rng.normal(0, 15, size=3)
        shading = 12 * rng.normal(0, 1, size=(height, width, 1))
        pixels[mask] = (colour + shading)[mask]
        truth[mask] = label
    pixels += rng.normal(0, 6, size=pixels.shape)
    image = np.clip(np.rint(pixels), 0, 255).astype(np.uint8)
    return image, truth, _scribbles(truth, rng)


def _scribbles(truth: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """One stroke per visible object piece and per background piece, inside the eroded region."""
    scribbles = np.full(truth.shape, IGNORE, dtype=np.uint8)
    erode = np.ones((2 * STROKE_MARGIN + 1, 2 * STROKE_MARGIN + 1), dtype=bool)
    for label in np.unique(truth):
        pieces, count = ndimage.label(truth == label)
        for piece in range(1, count + 1):
            region = ndimage.binary_erosion(pieces == piece, structure=erode)
            if label == 0:
                stroke = _background_strokes(region, rng, 1)
            else:
                stroke = _stroke_through(region, rng, OBJECT_KEEP)
            scribbles[stroke] = label
    return scribbles


def _save(array: np.ndarray, path: Path) -> None:
    Image.fromarray(array).save(path, format="PNG")


def write_dataset(root: str | Path, train: int = 40, val: int = 10, height: int = 64, width: int = 64,
                  num_classes: int = 4, seed: int = 0) -> SyntheticDataset:
    """Write the dataset under `root` (created); `num_classes` counts the background."""
    if not 2 <= num_classes <= len(HUES) + 1:
        raise ValueError(f"num_classes must be in 2..{len(HUES) + 1} (background included), got {num_classes}")
    root = Path(root)
    for folder in ("images", "SegmentationClass", "scribbles"):
        (root / folder).mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    ids = {"train": [f"train_{i:04d}" for i in range(train)], "val": [f"val_{i:04d}" for i in range(val)]}
    for split_ids in ids.values():
        for name in split_ids:
            image, truth, scribbles = make_sample(rng, height, width, num_classes)
            _save(image, root / "images" / f"{name}.png")
            _save(truth, root / "SegmentationClass" / f"{name}.png")
            _save(scribbles, root / "scribbles" / f"{name}.png")
    (root / "list").mkdir(exist_ok=True)
    lists = {
        "train.txt": [f"images/{n}.png scribbles/{n}.png" for n in ids["train"]],
        "train_full.txt": [f"images/{n}.png SegmentationClass/{n}.png" for n in ids["train"]],
        "val.txt": [f"images/{n}.png SegmentationClass/{n}.png" for n in ids["val"]],
        "train_id.txt": ids["train"],
        "val_id.txt": ids["val"],
    }
    for name, lines in lists.items():
        (root / "list" / name).write_text("".join(line + "\n" for line in lines))
    classes = ["background"] + [f"{SHAPES[(c - 1) % len(SHAPES)]}_{c}" for c in range(1, num_classes)]
    (root / "classes.txt").write_text("".join(f"{i} {name}\n" for i, name in enumerate(classes)))
    listed = root / "list"
    return SyntheticDataset(root, listed / "train.txt", listed / "train_full.txt", listed / "val.txt", num_classes)


def main(argv: list[str] | None = None) -> None:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m rloss.data.synthetic",
                                     description="Write a small synthetic scribble dataset (ImageSegData layout).")
    parser.add_argument("out_dir")
    parser.add_argument("--train", type=int, default=40, help="training images (default 40)")
    parser.add_argument("--val", type=int, default=10, help="validation images (default 10)")
    parser.add_argument("--size", type=int, default=64, help="image height and width (default 64)")
    parser.add_argument("--classes", type=int, default=4, help="classes including the background (default 4)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    dataset = write_dataset(args.out_dir, args.train, args.val, args.size, args.size, args.classes, args.seed)
    print(f"wrote {args.train} train and {args.val} val images with {dataset.num_classes} classes to {dataset.root}")


if __name__ == "__main__":
    main()
