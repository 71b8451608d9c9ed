"""Scribble label maps made by `python -m rloss data`: strokes from full masks (seeded, inside their
regions, one in every region) and ScribbleSup's PASCAL-Scribble XML files as label PNGs."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from rloss.cli.main import main
from rloss.datasets.draw import disc
from rloss.datasets.scribble_strokes import EIGHT, generator_for, strokes_from_mask
from rloss.datasets.scribblesup import VOC_TAGS, convert_annotations
from rloss.datasets.skeleton import longest_paths, thin
from rloss.palette import write_label_png


def _mask(seed: int) -> np.ndarray:
    """A 60x80 map: background 0, a disc of 1, a bar of 2 in two pieces, a 2x2 speck of 3, void 255."""
    mask = np.zeros((60, 80), dtype=np.uint8)
    y, x = np.mgrid[0:60, 0:80]
    mask[(y - 20 - seed) ** 2 + (x - 22) ** 2 <= 12 ** 2] = 1
    mask[40:50, 5:35] = 2
    mask[40:50, 50:75] = 2
    mask[5:7, 70:72] = 3
    mask[55:, :] = 255
    return mask


def _pieces(mask: np.ndarray):
    for value in np.unique(mask):
        if value != 255:
            pieces, count = ndimage.label(mask == value, structure=EIGHT)
            for number in range(1, count + 1):
                yield value, pieces == number


def test_strokes_lie_inside_their_regions_and_cover_every_region():
    for seed in range(4):
        mask = _mask(seed)
        scribbles = strokes_from_mask(mask, generator_for(seed, "x"))
        marked = scribbles != 255
        assert np.array_equal(scribbles[marked], mask[marked]) and not marked[mask == 255].any()
        for value, piece in _pieces(mask):
            assert (scribbles[piece] == value).any(), (seed, value)
        assert 0.01 < marked.mean() < 0.15


def test_strokes_are_a_function_of_the_seed_and_the_file():
    mask = _mask(0)
    first = strokes_from_mask(mask, generator_for(5, "a"))
    assert np.array_equal(first, strokes_from_mask(mask, generator_for(5, "a")))
    assert not np.array_equal(first, strokes_from_mask(mask, generator_for(6, "a")))
    assert not np.array_equal(first, strokes_from_mask(mask, generator_for(5, "b")))


def test_strokes_keep_a_margin_and_have_the_width_asked():
    mask = np.zeros((40, 100), dtype=np.uint8)
    mask[10:30, 10:90] = 1  # a bar: its skeleton runs along the middle row
    scribbles = strokes_from_mask(mask, generator_for(0, "bar"), width=5, margin=4)
    rows = np.flatnonzero((scribbles == 1).any(axis=1))
    assert rows.min() >= 14 and rows.max() <= 25 and 4 <= len(rows) <= 7
    inner = ndimage.binary_erosion(mask == 1, structure=disc(9))
    assert (scribbles == 1).sum() > 0 and not ((scribbles == 1) & ~ndimage.binary_dilation(inner, disc(5))).any()


def test_the_skeleton_of_a_bar_is_its_middle_line():
    bar = np.zeros((11, 40), dtype=bool)
    bar[3:8, 5:35] = True
    skeleton = thin(bar)
    assert skeleton.any() and not (skeleton & ~bar).any()
    (path,) = longest_paths(skeleton)
    assert set(path[:, 0].tolist()) <= {4, 5, 6} and path[:, 1].max() - path[:, 1].min() >= 20
    assert (np.abs(np.diff(path, axis=0)) <= 1).all()  # consecutive pixels touch


def test_the_scribbles_command_writes_a_folder_of_label_pngs(tmp_path, capsys):
    masks = tmp_path / "masks"
    masks.mkdir()
    for index in range(3):
        write_label_png(_mask(index), masks / f"m{index}.png")  # palette masks give their indices
    args = ["data", "scribbles", "--from-masks", str(masks), "--seed", "3", "--width", "3"]
    assert main([*args, "--out", str(tmp_path / "a")]) == 0
    assert main([*args, "--out", str(tmp_path / "b")]) == 0
    assert "wrote 3 scribble label maps" in capsys.readouterr().out
    for index in range(3):
        written = Image.open(tmp_path / "a" / f"m{index}.png")
        assert written.mode == "L"
        assert (tmp_path / "a" / f"m{index}.png").read_bytes() == (tmp_path / "b" / f"m{index}.png").read_bytes()
        assert np.array_equal(np.asarray(written), strokes_from_mask(_mask(index), generator_for(3, f"m{index}")))
    (masks / "m1.png").write_bytes(b"\x89PNG broken")
    Image.new("RGB", (4, 4)).save(masks / "m2.png")
    assert main([*args, "--out", str(tmp_path / "c")]) == 1
    error = capsys.readouterr().err
    assert "2 problems" in error and "m1.png" in error and "m2.png' is a RGB colour image" in error
    assert not (tmp_path / "c").exists()
    with pytest.raises(SystemExit) as raised:
        main([*args, "--out", str(tmp_path / "d"), "--width", "0"])
    assert raised.value.code == 2


ANNOTATION = """<?xml version="1.0" encoding="utf-8"?>
<annotation>
  <filename>2007_000032.jpg</filename>
  <size><width>12</width><height>8</height><depth>3</depth></size>
  <segmented>1</segmented>
  <polygon><tag>background</tag>
    <point><X>0</X><Y>1</Y></point><point><X>11</X><Y>1</Y></point></polygon>
  <polygon><tag>plane</tag>
    <point><X>3</X><Y>5</Y></point><point><X>7</X><Y>5</Y></point><point><X>7</X><Y>30</Y></point></polygon>
  <polygon><tag>person</tag><point><X>10</X><Y>6</Y></point></polygon>
</annotation>
"""


def test_scribblesup_annotations_become_label_pngs(tmp_path, capsys):
    annotations = tmp_path / "pascal_2012"
    annotations.mkdir()
    (annotations / "2007_000032.xml").write_text(ANNOTATION)
    out = tmp_path / "pascal_2012_scribble"
    assert main(["data", "scribblesup", "--annotations", str(annotations), "--out", str(out)]) == 0
    labels = np.asarray(Image.open(out / "2007_000032.png"))
    expected = np.full((8, 12), 255, dtype=np.uint8)
    expected[0:3, :] = 0  # the background stroke along row 1, 3 pixels wide
    expected[4:7, 2:9] = 1  # 'plane' (VOC class 1) from (3, 5) to (7, 5) ...
    expected[4:8, 6:9] = 1  # ... then down to (7, 30), clamped into the image at row 7
    expected[5:8, 9:12] = 15  # 'person' (VOC class 15): one point, widened
    assert np.array_equal(labels, expected), labels
    assert (out / "classes.txt").read_text().splitlines()[:2] == ["0 background", "1 plane"]
    assert len(VOC_TAGS) == 21 and VOC_TAGS.index("monitor") == 20


def test_scribblesup_reports_unknown_tags_and_bad_files_and_takes_a_classes_file(tmp_path, capsys):
    annotations = tmp_path / "xml"
    annotations.mkdir()
    (annotations / "a.xml").write_text(ANNOTATION.replace("person", "sky"))
    (annotations / "b.xml").write_text("<annotation><size><width>x</width></size></annotation>")
    (annotations / "c.xml").write_text("<annotation>")
    assert main(["data", "scribblesup", "--annotations", str(annotations), "--out", str(tmp_path / "out")]) == 1
    error = capsys.readouterr().err
    assert "3 problems" in error and "tags 'sky' are not among the 21 classes" in error
    assert "b.xml': <size> has no number in <width>" in error and "c.xml': cannot read it" in error
    assert not (tmp_path / "out").exists()
    (annotations / "b.xml").unlink()
    (annotations / "c.xml").unlink()
    (tmp_path / "tags.txt").write_text("background\nsky\nplane\n")
    assert convert_annotations(annotations, tmp_path / "out", tmp_path / "tags.txt") == 1
    labels = np.asarray(Image.open(tmp_path / "out" / "a.png"))
    assert labels[6, 11] == 1 and labels[5, 4] == 2 and labels[1, 0] == 0
