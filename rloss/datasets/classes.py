"""The classes of a dataset: read from a user's file or an existing tree's classes.txt, or taken
from the label values found; written as classes.txt, one `INDEX NAME` line per class, as the
synthetic writer does (the run script counts its lines for NUM_LABELS).

A classes file has one class per line, either `INDEX NAME` lines or plain `NAME` lines (numbered
from 0 in order); blank lines and lines starting with '#' are skipped. Indices must be 0..K-1, each
once, because a net's NUM_LABELS outputs are classes 0..NUM_LABELS-1. A `255 NAME` line names the
unlabelled value and is not a class.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from rloss.datasets.problems import Problems

IGNORE = 255


@dataclass(frozen=True)
class ClassTable:
    """Class names by index, and where they came from (for messages and the report)."""

    names: tuple[str, ...]
    source: str

    def __len__(self) -> int:
        return len(self.names)

    def invalid_values(self, counts: np.ndarray) -> list[int]:
        """The values present in a label histogram (256 bins) that are neither a class nor 255."""
        present = np.flatnonzero(counts)
        return [int(v) for v in present if v >= len(self.names) and v != IGNORE]

    def describe(self) -> str:
        return f"classes 0..{len(self.names) - 1} from {self.source}; {IGNORE} = unlabelled"


def _index(token: str) -> int | None:
    try:
        return int(token)
    except ValueError:
        return None


def parse_classes(path: Path, problems: Problems) -> ClassTable | None:
    """The classes of `path` (see the module doc), or None with the problems noted."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        problems.add(f"classes file '{path}': cannot read it: {error}")
        return None
    lines = [(n, line.strip()) for n, line in enumerate(text.splitlines(), 1)]
    lines = [(n, line) for n, line in lines if line and not line.startswith("#")]
    if not lines:
        problems.add(f"classes file '{path}': it names no class")
        return None
    indexed = [(n, _index(line.split(None, 1)[0]), line) for n, line in lines]
    if all(index is None for _, index, _ in indexed):
        return ClassTable(tuple(line for _, line in lines), str(path))
    before = len(problems)
    names: dict[int, str] = {}
    for number, index, line in indexed:
        parts = line.split(None, 1)
        where = f"classes file '{path}' line {number}"
        if index is None:
            problems.add(f"{where}: '{line}' has no index, but other lines do; give INDEX NAME on every line "
                         "or names alone on every line")
        elif len(parts) < 2:
            problems.add(f"{where}: index {index} has no name")
        elif not 0 <= index <= IGNORE:
            problems.add(f"{where}: index {index} is not in 0..{IGNORE}")
        elif index in names:
            problems.add(f"{where}: index {index} is given twice ('{names[index]}' and '{parts[1]}')")
        else:
            names[index] = parts[1]
    names.pop(IGNORE, None)
    missing = sorted(set(range(max(names, default=-1) + 1)) - set(names))
    if missing:
        problems.add(f"classes file '{path}': indices {_ranges(missing)} are missing; classes must be numbered "
                     "0..K-1 without gaps (a net's outputs are classes 0..NUM_LABELS-1)")
    if not names and len(problems) == before:
        problems.add(f"classes file '{path}': it names no class (only {IGNORE}, the unlabelled value)")
    if len(problems) > before:
        return None
    return ClassTable(tuple(names[i] for i in range(len(names))), str(path))


def classes_from_counts(counts: np.ndarray) -> ClassTable | None:
    """Classes 0..V for the largest labelled value V found (a histogram of 256 bins), named
    class_0, class_1, ...; values between that are absent still count, so the index stays the
    class number. None when nothing is labelled."""
    present = [int(v) for v in np.flatnonzero(counts) if v != IGNORE]
    if not present:
        return None
    return ClassTable(tuple(f"class_{i}" for i in range(max(present) + 1)), "the label values found")


def classes_text(table: ClassTable) -> str:
    """The text of classes.txt: `INDEX NAME` lines."""
    return "".join(f"{index} {name}\n" for index, name in enumerate(table.names))


def _ranges(values: list[int]) -> str:
    """'1, 3..5' for [1, 3, 4, 5]."""
    spans: list[list[int]] = []
    for value in values:
        if spans and value == spans[-1][1] + 1:
            spans[-1][1] = value
        else:
            spans.append([value, value])
    return ", ".join(str(a) if a == b else f"{a}..{b}" for a, b in spans)
