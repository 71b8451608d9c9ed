"""`data check DATA_ROOT`: prepare's checks on an existing tree, through its list files: every line
names an image and a label that exist and read, of one size, with values within classes.txt.

Paths in the lists are taken relative to DATA_ROOT with or without a leading '/' (the original
PASCAL lists have one, ours and MSRC-21's do not): ImageSegData joins `root_folder + token`, which
works for both when DATA_ROOT is given with its trailing '/'. Files named `*_id.txt` hold image ids,
not pairs, and are not checked.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from rloss.data.imageio import read_label
from rloss.datasets.checks import Inspector
from rloss.datasets.classes import parse_classes
from rloss.datasets.problems import Problems

REQUIRED_LISTS = ("train.txt", "val.txt")


@dataclass(frozen=True)
class CheckSummary:
    lists: list[str]
    lines: int
    files: int

    def describe(self, root: Path) -> str:
        return (f"data check: '{root}': {len(self.lists)} list files ({', '.join(self.lists)}), {self.lines} lines, "
                f"{self.files} files: no problems")


def _pair_lists(root: Path, problems: Problems) -> list[Path]:
    folder = root / "list"
    if not folder.is_dir():
        problems.add(f"'{folder}' does not exist: a tree has its list files there")
        return []
    for name in REQUIRED_LISTS:
        if not (folder / name).is_file():
            problems.add(f"list file '{folder / name}' does not exist")
    return sorted(p for p in folder.glob("*.txt") if not p.name.endswith("_id.txt"))


def _check_list(root: Path, source: Path, inspector: Inspector, problems: Problems) -> int:
    """Check every line of one list; returns its number of lines."""
    try:
        lines = source.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as error:
        problems.add(f"list file '{source}': cannot read it: {error}")
        return 0
    name = source.relative_to(root)
    if not lines:
        problems.add(f"list file '{source}' is empty; ImageSegData refuses an empty list")
    for number, line in enumerate(lines, 1):
        tokens = line.split()
        where = f"{name} line {number}"
        if len(tokens) < 2:
            what = "is empty" if not tokens else f"has no label: '{line}'"
            problems.add(f"{where} {what}; each line is 'IMAGE LABEL', paths relative to DATA_ROOT")
            continue
        image, label = (root / token.lstrip("/") for token in tokens[:2])
        inspector.pair(image, label, f"{where} (image)", f"{where} (label)")
    return len(lines)


def check_tree(root: Path, classes_file: Path | None = None) -> CheckSummary:
    """Check the tree at `root` against `classes_file` (default: its classes.txt), raising one
    DatasetProblems with every problem found."""
    problems = Problems()
    if not root.is_dir():
        problems.add(f"'{root}' does not exist or is not a folder")
        problems.raise_if_any("data check")
    classes_file = classes_file or root / "classes.txt"
    classes = parse_classes(classes_file, problems) if classes_file.is_file() else None
    if not classes_file.is_file():
        problems.add(f"classes file '{classes_file}' does not exist: it gives the classes ('INDEX NAME' lines; "
                     "--classes FILE names another)")
    inspector = Inspector(problems, read_label)
    lists = _pair_lists(root, problems)
    lines = sum(_check_list(root, source, inspector, problems) for source in lists)
    if classes is not None:
        inspector.check_values(classes)
    problems.raise_if_any(f"data check: '{root}'")
    return CheckSummary([p.name for p in lists], lines, inspector.files_read)
