"""The PASCAL-Scribble annotations of ScribbleSup (Lin et al., CVPR 2016) as label PNGs.

The original files are one XML file per image, `<annotation>` holding `<size>` (`<width>`,
`<height>`) and one `<polygon>` per scribble: a `<tag>` (the class name) and its `<point>`s
(`<X>`, `<Y>`), the pixels along the stroke, 0-based. As the original rloss repository's MATLAB
converter (data/pascal_scribble/convertscribbles.m) did, a scribble is drawn as the straight
segments between its consecutive points, 3 pixels wide, with its class's index; points outside the
image are clamped into it; later scribbles cover earlier ones; every other pixel is 255. A class's
index is the position of its tag in the class list, background first: by default PASCAL VOC's 21
classes under the tags these files use for them (VOC_TAGS, in VOC's order, so the labels match VOC's
ground truth), or the names of a classes file. A tag that is not in the list is a problem: ScribbleSup
also annotated PASCAL-Context, whose further classes have tags such as 'sky' and 'grass'; those need a
classes file that names every tag, in the order of the indices wanted.
"""

from __future__ import annotations

import xml.etree.ElementTree as ElementTree
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from rloss.datasets.classes import IGNORE, ClassTable, classes_text, parse_classes
from rloss.datasets.draw import polyline, widen
from rloss.datasets.files import files_by_stem
from rloss.datasets.labels import write_label_folder
from rloss.datasets.problems import Problems
from rloss.datasets.staging import note_if_exists

VOC_TAGS = ("background", "plane", "bike", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow", "table",
            "dog", "horse", "motorbike", "person", "plant", "sheep", "sofa", "train", "monitor")
STROKE_WIDTH = 3


@dataclass(frozen=True)
class Scribble:
    tag: str
    points: np.ndarray  # (N, 2) x, y


@dataclass(frozen=True)
class Annotation:
    path: Path
    height: int
    width: int
    scribbles: list[Scribble]


def _number(element: ElementTree.Element, name: str, path: Path) -> float:
    text = element.findtext(name)
    try:
        return float(text.strip())
    except (AttributeError, ValueError) as error:
        raise ValueError(f"'{path}': <{element.tag}> has no number in <{name}> (found {text!r})") from error


def _parse(path: Path) -> Annotation:
    root = ElementTree.parse(path).getroot()
    if root.tag != "annotation":
        raise ValueError(f"'{path}': the root element is <{root.tag}>, not <annotation>")
    size = root.find("size")
    if size is None:
        raise ValueError(f"'{path}': no <size> element")
    width, height = int(_number(size, "width", path)), int(_number(size, "height", path))
    if width <= 0 or height <= 0:
        raise ValueError(f"'{path}': the image size {width}x{height} is empty")
    scribbles = []
    for polygon in root.findall("polygon"):
        tag = (polygon.findtext("tag") or "").strip()
        points = [(_number(point, "X", path), _number(point, "Y", path)) for point in polygon.findall("point")]
        scribbles.append(Scribble(tag, np.asarray(points, dtype=np.float64).reshape(-1, 2)))
    return Annotation(path, height, width, scribbles)


def read_annotation(path: Path, problems: Problems) -> Annotation | None:
    """The annotation in `path`, or None with the problem noted."""
    try:
        return _parse(path)
    except (OSError, ElementTree.ParseError) as error:
        problems.add(f"annotation '{path}': cannot read it: {error}")
    except ValueError as error:
        problems.add(f"annotation {error}")
    return None


def rasterize(annotation: Annotation, classes: dict[str, int], width: int = STROKE_WIDTH) -> np.ndarray:
    """The annotation's label map: (H, W) uint8, the scribbles drawn in file order, 255 elsewhere."""
    labels = np.full((annotation.height, annotation.width), IGNORE, dtype=np.uint8)
    for scribble in annotation.scribbles:
        if len(scribble.points):
            labels[widen(polyline(scribble.points, labels.shape), width)] = classes[scribble.tag]
    return labels


def _unknown_tags(annotation: Annotation, classes: dict[str, int], table: ClassTable, problems: Problems) -> None:
    unknown = sorted({s.tag for s in annotation.scribbles} - classes.keys())
    if unknown:
        problems.add(f"annotation '{annotation.path}': tags {', '.join(repr(t) for t in unknown)} are not among the "
                     f"{len(table)} classes ({table.source}); give --classes FILE naming them")


def convert_annotations(folder: Path, out: Path, classes_file: Path | None = None) -> int:
    """Write OUT/STEM.png for every FOLDER/STEM.xml, and OUT/classes.txt (the class list used, for
    `data prepare --classes`); returns the number of label maps written."""
    problems = Problems()
    note_if_exists(out, problems)
    table = parse_classes(classes_file, problems) if classes_file is not None else \
        ClassTable(VOC_TAGS, "PASCAL VOC's 21 classes under ScribbleSup's tags")
    found = files_by_stem(folder, (".xml",), "annotation", problems)
    annotations = {stem: read_annotation(path, problems) for stem, path in found.files.items()}
    classes = {} if table is None else {name: index for index, name in enumerate(table.names)}
    for annotation in annotations.values():
        if annotation is not None and table is not None:
            _unknown_tags(annotation, classes, table, problems)
    problems.raise_if_any(f"data scribblesup: nothing written to '{out}'")
    assert table is not None  # else a problem was noted
    write_label_folder(out, sorted(annotations), lambda stem: rasterize(annotations[stem], classes),
                       {"classes.txt": classes_text(table)})
    return len(annotations)
