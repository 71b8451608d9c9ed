"""`data prepare`: folders of images, scribbles and (optionally) full ground truth become a DATA_ROOT
tree that ImageSegData and the run script read (the layout of rloss.data.synthetic and the MSRC-21
tree: `images/`, `scribbles/`, `SegmentationClass/`, `list/*.txt` with paths relative to DATA_ROOT,
`classes.txt`), plus report.txt.

Every file is checked before anything is written, and every problem is reported in one error; the
tree is written into a hidden sibling folder and renamed into place at the end. Images are copied
byte for byte; labels are written as grey PNGs of their values (palette PNGs give their indices).
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

from rloss.datasets.checks import Inspector
from rloss.datasets.classes import ClassTable, classes_from_counts, classes_text, parse_classes
from rloss.datasets.files import IMAGE_SUFFIXES, LABEL_SUFFIXES, Found, Sample, files_by_stem, pair
from rloss.datasets.labels import read_source_label, write_label
from rloss.datasets.problems import Problems
from rloss.datasets.report import SampleInfo, report_text
from rloss.datasets.split import Split, split_by_fraction, split_by_list
from rloss.datasets.staging import note_if_exists, staged_folder

IMAGES, SCRIBBLES, TRUTH = "images", "scribbles", "SegmentationClass"


@dataclass(frozen=True)
class PrepareOptions:
    images: Path
    scribbles: Path
    out: Path
    truth: Path | None = None
    classes: Path | None = None
    val_fraction: float = 0.2
    val_list: Path | None = None
    seed: int = 0


def _check_samples(samples: list[Sample], inspector: Inspector) -> list[SampleInfo]:
    infos = []
    for sample in samples:
        scribbles = inspector.pair(sample.image, sample.scribbles, "image", "scribbles")
        truth = inspector.pair(sample.image, sample.truth, "image", "ground truth") if sample.truth else None
        if scribbles is not None and (truth is not None or sample.truth is None):
            infos.append(SampleInfo(sample.stem, scribbles.size, scribbles, truth))
    return infos


def _read_unpaired(found: list[Found], samples: list[Sample], inspector: Inspector) -> None:
    """Read the files that pair() left out too, so an unreadable one is reported in the same run."""
    paired = {path for s in samples for path in (s.image, s.scribbles, s.truth)}
    for group in found:
        for path in group.files.values():
            if path not in paired:
                if group.role == "image":
                    inspector.image_size(path, group.role)
                else:
                    inspector.label(path, group.role)


def _classes(options: PrepareOptions, inspector: Inspector, problems: Problems) -> ClassTable | None:
    if options.classes is not None:
        return parse_classes(options.classes, problems)
    counts = inspector.label_counts()
    table = classes_from_counts(counts)
    if table is None and counts.any():
        problems.add("no label file has a labelled pixel (every value is 255); nothing to train on")
    return table


def _split(options: PrepareOptions, stems: list[str], problems: Problems) -> tuple[Split, str]:
    if options.val_list is not None:
        return split_by_list(stems, options.val_list, problems), f"val from the list '{options.val_list}'"
    split = split_by_fraction(stems, options.val_fraction, options.seed, problems)
    return split, f"val drawn with seed {options.seed}, fraction {options.val_fraction:g}"


def check_sources(options: PrepareOptions) -> tuple[list[Sample], list[SampleInfo], ClassTable, Split, str]:
    """Every check of prepare, raising one DatasetProblems with all the problems found."""
    problems = Problems()
    note_if_exists(options.out, problems)
    found = [files_by_stem(options.images, IMAGE_SUFFIXES, "image", problems),
             files_by_stem(options.scribbles, LABEL_SUFFIXES, "scribbles", problems)]
    if options.truth is not None:
        found.append(files_by_stem(options.truth, LABEL_SUFFIXES, "ground truth", problems))
    samples = pair(found[0], found[1], found[2] if len(found) > 2 else None, problems)
    inspector = Inspector(problems, read_source_label)
    infos = _check_samples(samples, inspector)
    _read_unpaired(found, samples, inspector)
    classes = _classes(options, inspector, problems)
    if classes is not None:
        inspector.check_values(classes)
    split, how = _split(options, [s.stem for s in samples], problems)
    problems.raise_if_any(f"data prepare: nothing written to '{options.out}'")
    assert classes is not None  # else a problem was noted
    return samples, infos, classes, split, f"train {len(split[0])}, val {len(split[1])}; {how}"


def _list_lines(samples: list[Sample], label_folder: str) -> str:
    return "".join(f"{IMAGES}/{s.image.name} {label_folder}/{s.stem}.png\n" for s in samples)


def _write_tree(root: Path, samples: list[Sample], classes: ClassTable, split: Split, report: str) -> None:
    has_truth = samples[0].truth is not None
    for folder in (IMAGES, SCRIBBLES, TRUTH) if has_truth else (IMAGES, SCRIBBLES):
        (root / folder).mkdir()
    for sample in samples:
        shutil.copyfile(sample.image, root / IMAGES / sample.image.name)
        write_label(read_source_label(str(sample.scribbles), "scribbles"), root / SCRIBBLES / f"{sample.stem}.png")
        if sample.truth is not None:
            write_label(read_source_label(str(sample.truth), "ground truth"), root / TRUTH / f"{sample.stem}.png")
    by_stem = {s.stem: s for s in samples}
    train, val = ([by_stem[stem] for stem in stems] for stems in split)
    lists = {"train.txt": _list_lines(train, SCRIBBLES), "val.txt": _list_lines(val, TRUTH if has_truth else SCRIBBLES),
             "train_id.txt": "".join(f"{s.stem}\n" for s in train), "val_id.txt": "".join(f"{s.stem}\n" for s in val)}
    if has_truth:
        lists["train_full.txt"] = _list_lines(train, TRUTH)
    (root / "list").mkdir()
    for name, text in lists.items():
        (root / "list" / name).write_text(text, encoding="utf-8")
    (root / "classes.txt").write_text(classes_text(classes), encoding="utf-8")
    (root / "report.txt").write_text(report, encoding="utf-8")


def prepare(options: PrepareOptions) -> str:
    """Check the sources, then write the tree at `options.out`; returns the report."""
    samples, infos, classes, split, how = check_sources(options)
    report = report_text(f"rloss data prepare: {options.out}", infos, classes, how)
    with staged_folder(options.out) as stage:
        _write_tree(stage, samples, classes, split, report)
    return report
