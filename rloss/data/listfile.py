"""List files (`image_data_param.source`) and Caffe's cursor over them.

A list file has one sample per line. ImageSegData's lines (the DeepLab fork reads them with `>>`)
are whitespace-separated tokens: token 1 the image path, token 2 the label image path (or class);
extra tokens are ignored (`read_list`). ImageData's lines are split, as upstream Caffe splits them,
at their LAST space: the image path is everything before it, spaces included, and the class is the
text after it (`read_class_list`). Paths are used as `root_folder + path`, plain concatenation as in
Caffe (no separator inserted). Caffe makes an entry of every line, so a blank line in the middle
fails only when it is reached; we refuse it when the list is read, naming the line.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from rloss.errors import DataError


@dataclass(frozen=True)
class ListEntry:
    """One line of a list file: its number (from 1), the image token and the label token."""

    line: int
    image: str
    label: str | None

    def where(self, source: str) -> str:
        return f"line {self.line} of the list '{source}'"


def _lines(source: str, who: str) -> list[str]:
    """The lines as C++'s getline gives them: a final newline does not start an extra line."""
    try:
        with open(source, encoding="utf-8", newline="") as handle:
            text = handle.read()
    except (OSError, UnicodeDecodeError) as error:
        raise DataError(f"{who}: cannot read the list file '{source}': {error}") from error
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    return lines


def _numbered_lines(source: str, who: str) -> list[tuple[int, str]]:
    """(number, text) of every line; blank lines and an empty list refused (Caffe CHECKs the
    list is not empty)."""
    lines = list(enumerate(_lines(source, who), 1))
    if not lines:
        raise DataError(f"{who}: the list file '{source}' is empty")
    for number, line in lines:
        if not line.strip():
            raise DataError(f"{who}: line {number} of the list '{source}' is empty (Caffe would fail "
                            "when it reaches it); remove blank lines")
    return lines


def read_list(source: str, need_label: bool, who: str) -> list[ListEntry]:
    """Parse `source` into whitespace-separated tokens; `need_label` demands a second token on
    every line. `who` names the layer."""
    entries = []
    for number, line in _numbered_lines(source, who):
        tokens = line.split()
        if need_label and len(tokens) < 2:
            raise DataError(f"{who}: line {number} of the list '{source}' has no label token: '{line}'")
        entries.append(ListEntry(number, tokens[0], tokens[1] if len(tokens) > 1 else None))
    return entries


def read_class_list(source: str, who: str) -> list[ListEntry]:
    """Parse an ImageData list: each line split at its last space (upstream Caffe's rule, so paths
    may hold spaces). The label text is returned as read, for the caller to check."""
    entries = []
    for number, line in _numbered_lines(source, who):
        image, space, label = line.rpartition(" ")
        if not space or not image:
            raise DataError(f"{who}: line {number} of the list '{source}' is not 'path label': '{line}' "
                            "(Caffe takes the text after the last space as the label; tabs do not separate)")
        entries.append(ListEntry(number, image, label))
    return entries


@dataclass(frozen=True)
class OrderState:
    """Where a SampleOrder stands, enough to continue exactly: the current pass's permutation, the
    cursor in it, the passes completed and the state dict of its generator's bit generator."""

    order: np.ndarray
    cursor: int
    epoch: int
    generator: dict[str, Any]


class SampleOrder:
    """Which list entry each successive sample is, as Caffe's data layers walk the list.

    With `shuffle` the list is permuted at set-up and again every time the cursor wraps around;
    batches do not stop at the end of the list (a batch may straddle two epochs). `skip` is where
    the cursor starts (Caffe's `rand_skip` draw), counted in the first permutation. `rng` is also
    the layer's source of per-sample seeds, so `state()` covers every draw the layer makes."""

    def __init__(self, count: int, shuffle: bool, rng: np.random.Generator, skip: int = 0):
        self.count = count
        self.shuffle = shuffle
        self.rng = rng
        self.order = self._permutation()
        self.cursor = skip
        self.epoch = 0

    def _permutation(self) -> np.ndarray:
        if self.shuffle:
            return self.rng.permutation(self.count)
        return np.arange(self.count)

    def peek(self) -> int:
        """The entry index of the next sample, without moving."""
        return int(self.order[self.cursor])

    def take(self, n: int) -> list[int]:
        """The entry indices of the next `n` samples."""
        taken = []
        for _ in range(n):
            taken.append(self.peek())
            self.cursor += 1
            if self.cursor == self.count:
                self.cursor = 0
                self.epoch += 1
                self.order = self._permutation()
        return taken

    def state(self) -> OrderState:
        """A snapshot of the position and the generator (later draws do not change it)."""
        return OrderState(self.order.copy(), self.cursor, self.epoch, self.rng.bit_generator.state)

    def set_state(self, state: OrderState) -> None:
        """Continue from `state` (checked by the caller: a permutation of `count` entries)."""
        self.order = np.array(state.order, dtype=np.int64)
        self.cursor, self.epoch = state.cursor, state.epoch
        self.rng.bit_generator.state = state.generator
