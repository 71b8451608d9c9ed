"""`data scribbles --from-masks`: a folder of full label maps becomes a folder of scribble label maps
(rloss.datasets.scribble_strokes), checked whole before anything is written."""

from __future__ import annotations

from pathlib import Path

from rloss.datasets.files import LABEL_SUFFIXES, files_by_stem
from rloss.datasets.labels import read_source_label, write_label_folder
from rloss.datasets.problems import Problems
from rloss.datasets.scribble_strokes import generator_for, strokes_from_mask
from rloss.datasets.staging import note_if_exists


def scribbles_from_masks(masks: Path, out: Path, seed: int = 0, width: int = 3, margin: int = 3) -> int:
    """Write OUT/STEM.png for every MASKS/STEM.png; returns the number of files written."""
    problems = Problems()
    note_if_exists(out, problems)
    found = files_by_stem(masks, LABEL_SUFFIXES, "mask", problems)
    for path in found.files.values():
        problems.attempt(lambda path=path: read_source_label(str(path), "mask"))
    problems.raise_if_any(f"data scribbles: nothing written to '{out}'")

    def make(stem: str):
        mask = read_source_label(str(found.files[stem]), "mask")
        return strokes_from_mask(mask, generator_for(seed, stem), width, margin)

    write_label_folder(out, sorted(found.files), make)
    return len(found.files)
