"""report.txt of a prepared tree: what a user should look at before training (how many images and
of what sizes, the classes, how much the scribbles cover, how the pixels share out over the classes),
so a wrong folder, a missing class or near-empty scribbles show before hours of training."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from rloss.datasets.checks import LabelInfo, Size
from rloss.datasets.classes import IGNORE, ClassTable

NAMES_SHOWN = 5


@dataclass(frozen=True)
class SampleInfo:
    """A checked sample: its image size and its label maps' histograms."""

    stem: str
    size: Size
    scribbles: LabelInfo
    truth: LabelInfo | None


def _percent(part: float, whole: float) -> str:
    return f"{100 * part / whole:.2f}%" if whole else "-"


def _sizes(samples: list[SampleInfo]) -> str:
    sizes = sorted({s.size for s in samples}, key=lambda size: (size[0] * size[1], size))
    text = [f"{w}x{h}" for h, w in sizes]
    return f"all {text[0]}" if len(sizes) == 1 else f"{text[0]} to {text[-1]} ({len(sizes)} sizes, width x height)"


def _coverage(infos: list[LabelInfo], stems: list[str]) -> str:
    labelled = np.array([info.counts.sum() - info.counts[IGNORE] for info in infos], dtype=np.float64)
    pixels = np.array([info.counts.sum() for info in infos], dtype=np.float64)
    shares = labelled / pixels
    text = (f"{_percent(labelled.sum(), pixels.sum())} of the pixels labelled; per image "
            f"{100 * shares.min():.2f}% to {100 * shares.max():.2f}% (median {100 * np.median(shares):.2f}%)")
    empty = [stem for stem, count in zip(stems, labelled) if count == 0]
    if empty:
        names = ", ".join(empty[:NAMES_SHOWN]) + (", ..." if len(empty) > NAMES_SHOWN else "")
        text += f"; {len(empty)} with none: {names}"
    return text


def report_text(title: str, samples: list[SampleInfo], classes: ClassTable, split: str) -> str:
    """The report of `samples` (all images, train and val), `split` saying how val was chosen."""
    stems = [s.stem for s in samples]
    rows = [("images", f"{len(samples)} ({split})"), ("image sizes", _sizes(samples)),
            ("classes", f"{len(classes)} (from {classes.source})"),
            ("scribbles", _coverage([s.scribbles for s in samples], stems))]
    columns = [("scribbles", sum(s.scribbles.counts for s in samples))]
    truths = [s.truth for s in samples if s.truth is not None]
    if truths:
        rows.append(("ground truth", _coverage(truths, stems)))
        columns.append(("ground truth", sum(t.counts for t in truths)))
    lines = [title, *(f"{key:<13} {value}" for key, value in rows), "",
             "pixel shares of the classes (of the labelled pixels):"]
    width = max(len("name"), *(len(name) for name in classes.names))
    lines.append(f"  {'class':>5}  {'name':<{width}}" + "".join(f"  {label:>12}" for label, _ in columns))
    for index, name in enumerate(classes.names):
        shares = "".join(f"  {_percent(counts[index], counts.sum() - counts[IGNORE]):>12}" for _, counts in columns)
        lines.append(f"  {index:>5}  {name:<{width}}{shares}")
    return "\n".join(lines) + "\n"
