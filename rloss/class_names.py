"""Class names for reports and legends: a classes file as `data prepare` and `rloss.data.synthetic`
write it (`INDEX NAME` lines, or plain names; read by rloss.datasets.classes), found at a test net's
DATA_ROOT or beside its list."""

from __future__ import annotations

from pathlib import Path

from rloss.datasets.classes import parse_classes
from rloss.datasets.problems import Problems
from rloss.errors import DataError
from rloss.proto import caffe_pb2

CLASSES_FILE = "classes.txt"


def read_class_names(path: Path) -> dict[int, str]:
    """{index: name} of a classes file; a DataError listing its problems for a bad one."""
    if not path.is_file():
        raise DataError(f"classes file '{path}' does not exist")
    problems = Problems()
    table = parse_classes(path, problems)
    problems.raise_if_any(f"classes file '{path}'")
    return dict(enumerate(table.names))


def classes_file_of(data_param: caffe_pb2.ImageDataParameter) -> Path | None:
    """The classes.txt of a data layer's dataset: in its root folder (DATA_ROOT), else beside its
    list file or one folder up (DATA_ROOT/list/val.txt); None when there is none."""
    candidates = []
    if data_param.root_folder:
        candidates.append(Path(data_param.root_folder + CLASSES_FILE))
    if data_param.source:
        listed = Path(data_param.source).parent
        candidates += [listed / CLASSES_FILE, listed.parent / CLASSES_FILE]
    return next((path for path in candidates if path.is_file()), None)


def labels_of(names: dict[int, str], count: int) -> list[str]:
    """The names of classes 0..count-1 (the index where the file names none)."""
    return [names.get(index, str(index)) for index in range(count)]
