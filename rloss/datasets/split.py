"""The train/val split of prepare: a seeded draw of a fraction of the images, or a user's list."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from rloss.datasets.files import IMAGE_SUFFIXES
from rloss.datasets.problems import Problems

Split = tuple[list[str], list[str]]  # train stems, val stems, each sorted


def split_by_fraction(stems: list[str], fraction: float, seed: int, problems: Problems) -> Split:
    """`round(fraction * n)` images (at least 1, at most n - 1) drawn for val by a permutation of
    the sorted stems from numpy's generator seeded with `seed`: the same files and seed give the
    same split on every machine."""
    stems = sorted(stems)
    if len(stems) < 2:
        if stems:  # with none, the missing files are the problems
            problems.add(f"only one image has all its files ('{stems[0]}'); a train/val split needs at least 2")
        return stems, []
    count = min(max(round(fraction * len(stems)), 1), len(stems) - 1)
    chosen = set(np.random.default_rng(seed).permutation(len(stems))[:count].tolist())
    return ([s for i, s in enumerate(stems) if i not in chosen], [s for i, s in enumerate(stems) if i in chosen])


def _stem_of(token: str) -> str:
    """'x' for 'x', 'x.jpg' or 'images/x.jpg' (an image suffix is dropped, any other kept)."""
    name = Path(token).name
    return Path(name).stem if Path(name).suffix.lower() in IMAGE_SUFFIXES else name


def split_by_list(stems: list[str], val_list: Path, problems: Problems) -> Split:
    """Val is the images named in `val_list`, one per line (first token: a stem, a file name or a
    path); a name that is not among the images, an empty list and a list of every image are problems."""
    try:
        lines = val_list.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as error:
        problems.add(f"val list '{val_list}': cannot read it: {error}")
        return sorted(stems), []
    known = set(stems)
    named = set()
    for number, line in enumerate(lines, 1):
        tokens = line.split()
        if not tokens:
            continue
        stem = _stem_of(tokens[0])
        if stem in known:
            named.add(stem)
        else:
            problems.add(f"val list '{val_list}' line {number}: '{tokens[0]}' is not one of the complete images")
    if not named:
        problems.add(f"val list '{val_list}' names none of the images")
    elif named == known:
        problems.add(f"val list '{val_list}' names every image, which leaves none to train on")
    return sorted(known - named), sorted(named)
